"""Speculative drafts in the scheduler, with the fake runner (which reads every context back through the block
tables): budgets, slot allocation, rollback of rejected drafts to the exact block, prefix-cache registration of
accepted tokens only, stops inside accepted drafts, and randomized runs identical to decoding without drafts."""

import random

from kvserve.core.request import RequestStatus

from tests.core.fake_runner import FakeRunner, next_token
from tests.core.test_scheduler import BS, make_sched, req, run


def true_next(r, extra=()):
    return next_token(list(r.token_ids) + list(extra))


def oracle_drafts(r, k, wrong_at=None):
    """The k tokens greedy decoding will produce next, with the one at `wrong_at` replaced (a rejected draft)."""
    out = []
    for j in range(k):
        t = true_next(r, out)
        out.append(t + 1 if j == wrong_at else t)
    return out


def decoding(sched):
    return [r for r in sched.running if r.num_tokens - r.num_computed_tokens == 1]


def decoding_request(n_prompt, max_tokens, rid="a", num_blocks=64, budget=64):
    """A scheduler whose one request has its prompt computed and a first token sampled: its next step can verify
    drafts."""
    sched = make_sched(num_blocks=num_blocks, budget=budget)
    runner = FakeRunner(BS)
    r = req(rid, n_prompt, max_tokens=max_tokens)
    sched.add_request(r)
    sched.update(so := sched.schedule(), runner.execute(so))
    return sched, runner, r


def test_drafts_are_budgeted_verified_and_rolled_back_to_the_block():
    sched, runner, r = decoding_request(30, max_tokens=40)  # prompt (30 tokens) + first output token
    assert r.num_tokens == 31 and r.num_computed_tokens == 30
    assert sched.kv.get_block_ids("a") == [0, 1]

    # 5 drafts, the third wrong: the step runs 6 tokens at positions 30..35 over 3 blocks
    r.spec_token_ids = oracle_drafts(r, 5, wrong_at=2)
    so = sched.schedule()
    (sr,) = so.scheduled
    assert (sr.start, sr.num_new_tokens, sr.spec_token_ids) == (30, 6, oracle_drafts(r, 5, wrong_at=2))
    assert sr.block_ids == [0, 1, 2] and r.spec_token_ids == []  # consumed, never in token_ids
    assert r.num_tokens == 31
    sched.update(so, runner.execute(so))
    # accepted 2 drafts + the corrected third token: 3 new tokens; KV kept for positions 0..32
    assert r.num_tokens == 34 and r.num_computed_tokens == 33
    assert sched.kv.get_block_ids("a") == [0, 1, 2]  # block 2 still needed for position 33
    assert r.output_token_ids == [true_next_of(r, i) for i in range(4)]
    sched.check_invariants()

    # drafts reaching into a 4th block, all rejected: the 4th block goes back to the pool
    r.spec_token_ids = oracle_drafts(r, 15, wrong_at=0)
    so = sched.schedule()
    assert so.scheduled[0].block_ids == [0, 1, 2, 3]
    sched.update(so, runner.execute(so))
    assert r.num_tokens == 35 and r.num_computed_tokens == 34
    assert sched.kv.get_block_ids("a") == [0, 1, 2]
    assert sched.kv.pool.num_free_blocks == 64 - 3
    sched.check_invariants()
    run(sched, runner)  # the rest without drafts reads every context back: the rolled-back slots were rewritten
    assert len(r.output_token_ids) == 40 and r.output_token_ids == [true_next_of(r, i) for i in range(40)]


def true_next_of(r, i):
    """The i-th output token greedy decoding produces for r's prompt."""
    toks = list(r.prompt_token_ids)
    for _ in range(i + 1):
        toks.append(next_token(toks))
    return toks[-1]


def test_only_blocks_of_accepted_tokens_are_cached():
    sched, runner, r = decoding_request(14, max_tokens=40)
    assert r.num_computed_tokens == 14 and r.num_tokens == 15
    # drafts fill block 0 (positions 14, 15) and run into block 1, the first is wrong: nothing new is cached
    r.spec_token_ids = oracle_drafts(r, 4, wrong_at=0)
    sched.update(so := sched.schedule(), runner.execute(so))
    assert r.num_computed_tokens == 15 and sched.kv.pool.blocks[0].block_hash is None
    # all accepted: positions 15..19 computed, block 0 (tokens 0..15, all accepted) is cached
    r.spec_token_ids = oracle_drafts(r, 4)
    sched.update(so := sched.schedule(), runner.execute(so))
    assert r.num_computed_tokens == 20 and r.num_tokens == 21
    assert sched.kv.pool.blocks[0].block_hash == r.block_hashes[0]
    assert sched.kv.pool.blocks[1].block_hash is None
    sched.check_invariants()


def test_a_stop_id_inside_accepted_drafts_ends_the_request_there():
    sched, runner, r = decoding_request(20, max_tokens=40)
    drafts = oracle_drafts(r, 6)
    stop = drafts[2]
    r.sampling_params = r.sampling_params.replace(stop_token_ids=(stop,))
    r.spec_token_ids = drafts
    updates = sched.update(so := sched.schedule(), runner.execute(so))
    (u,) = updates
    assert u.new_token_ids == drafts[:3] and u.finish_reason.value == "stop" and u.stop_reason == stop
    assert r.status == RequestStatus.FINISHED_STOPPED and not sched.kv.req_blocks
    sched.check_invariants()


def test_drafts_never_pass_max_tokens_or_the_budget():
    sched, runner, r = decoding_request(7, max_tokens=4, budget=8)
    r.spec_token_ids = oracle_drafts(r, 10)
    so = sched.schedule()
    assert so.scheduled[0].num_new_tokens == 1 + 2  # 1 output so far: at most 3 more tokens, the last sampled
    sched.update(so, runner.execute(so))
    assert r.num_output_tokens == 4 and r.is_finished

    sched, runner, r = decoding_request(7, max_tokens=40, rid="b", budget=8)
    r.spec_token_ids = oracle_drafts(r, 20)
    so = sched.schedule()
    assert so.num_batched_tokens == 8 and len(so.scheduled[0].spec_token_ids) == 7


def test_drafts_are_dropped_rather_than_preempting():
    sched = make_sched(num_blocks=4, budget=64)  # 64 token slots
    runner = FakeRunner(BS)
    a, b = req("a", 31, max_tokens=30), req("b", 31, max_tokens=30)
    sched.add_request(a)
    sched.add_request(b)
    sched.update(so := sched.schedule(), runner.execute(so))
    assert a.num_computed_tokens == 31 and b.num_computed_tokens == 31  # 2 blocks each, pool full
    a.spec_token_ids = oracle_drafts(a, 4)
    so = sched.schedule()
    assert [s.num_new_tokens for s in so.scheduled] == [1, 1] and not so.preempted_ids
    sched.update(so, runner.execute(so))
    sched.check_invariants()


def test_drafts_get_only_the_budget_that_prompts_leave():
    """A waiting prompt and a running prefill chunk go before drafts: drafts verify with what is left of the step's
    token budget (at saturation they would otherwise delay every prompt behind them)."""
    sched, runner, a = decoding_request(14, max_tokens=40, budget=16)
    assert sched.kv.get_block_ids("a") == [0]
    sched.add_request(b := req("b", 12))
    assert sched.prefill_ahead_of_drafts() == [(0, 12)]  # what the drafter's step-cost rule counts
    a.spec_token_ids = oracle_drafts(a, 10)
    so = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in so.scheduled] == [("a", 1 + 3), ("b", 12)]
    assert so.scheduled[0].spec_token_ids == oracle_drafts(a, 3)
    assert sched.kv.get_block_ids("a") == [0, 2] and sched.kv.get_block_ids("b") == [1]  # the drafts' block last
    sched.update(so, runner.execute(so))
    assert a.num_computed_tokens == 18 and b.num_computed_tokens == 12
    sched.check_invariants()

    # a prompt longer than the budget: its chunk takes all of it, the drafts wait (unused, they are dropped)
    sched.add_request(req("c", 40))
    assert sched.prefill_ahead_of_drafts() == [(0, 14)]
    a.spec_token_ids = oracle_drafts(a, 10)
    b.spec_token_ids = oracle_drafts(b, 10)
    so = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in so.scheduled] == [("a", 1), ("b", 1), ("c", 14)]
    assert all(not s.spec_token_ids for s in so.scheduled) and a.spec_token_ids == b.spec_token_ids == []
    sched.update(so, runner.execute(so))
    # the next step: c's running prefill chunk (26 tokens left) also goes first
    assert sched.prefill_ahead_of_drafts() == [(14, 14)]
    a.spec_token_ids = oracle_drafts(a, 10)
    so = sched.schedule()
    assert [(s.request_id, s.num_new_tokens) for s in so.scheduled] == [("a", 1), ("b", 1), ("c", 14)]
    sched.update(so, runner.execute(so))
    a.spec_token_ids = oracle_drafts(a, 10)
    so = sched.schedule()  # c's last 12 tokens, then the drafts: 16 - 1 - 1 - 12 = 2
    assert [(s.request_id, s.num_new_tokens) for s in so.scheduled] == [("a", 1 + 2), ("b", 1), ("c", 12)]
    sched.update(so, runner.execute(so))
    sched.check_invariants()
    run(sched, runner)
    assert a.output_token_ids == [true_next_of(a, i) for i in range(40)]


def test_drafts_that_need_a_new_block_shrink_to_the_slots_held():
    sched = make_sched(num_blocks=4, budget=64)
    runner = FakeRunner(BS)
    a, b = req("a", 20, max_tokens=30), req("b", 31, max_tokens=30)
    sched.add_request(a)
    sched.add_request(b)
    sched.update(so := sched.schedule(), runner.execute(so))
    assert sched.kv.get_block_ids("a") == [0, 1] and sched.kv.pool.num_free_blocks == 0
    a.spec_token_ids = oracle_drafts(a, 20)  # position 20 and 20 drafts: 21 slots, block 1 holds 12 of them
    so = sched.schedule()
    assert [s.num_new_tokens for s in so.scheduled] == [12, 1] and not so.preempted_ids
    assert so.scheduled[0].spec_token_ids == oracle_drafts(a, 11) and so.scheduled[0].block_ids == [0, 1]
    sched.update(so, runner.execute(so))
    assert a.num_computed_tokens == 32 and a.num_tokens == 33
    sched.check_invariants()


def test_randomized_drafts_give_the_tokens_of_decoding_without_them():
    """Random drafts (right, wrong at a random place, of random length) for random requests, under a tight pool
    (preemptions) and prefix sharing: outputs equal a run without drafts, invariants hold every step."""
    def make(seed):
        sched = make_sched(num_blocks=40, budget=48, max_seqs=6)
        rng = random.Random(seed)
        reqs = [req(f"r{i}", rng.randrange(5, 90), max_tokens=rng.randrange(1, 60),
                    seed_tokens=rng.randrange(3)) for i in range(12)]  # shared prompts
        for r in reqs:
            sched.add_request(r)
        return sched

    for seed in range(4):
        plain = run(make(seed), FakeRunner(BS))
        sched = make(seed)
        rng = random.Random(100 + seed)
        drafted = [0]

        def propose(step, so):
            for r in decoding(sched):
                k = rng.randrange(0, 9)
                wrong = rng.choice([None, rng.randrange(max(k, 1))])
                r.spec_token_ids = oracle_drafts(r, k, wrong)
                drafted[0] += k

        spec = run(sched, FakeRunner(BS), on_step=propose)
        assert spec == plain
        assert drafted[0] > 100
        assert sched.kv.num_used_blocks == 0
