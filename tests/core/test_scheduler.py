"""Scheduler with a fake model runner: budgets, stall-free decodes, preemption, sharing, randomized invariants."""

import random

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.scheduler import RequestTooLongError, Scheduler
from kvserve.sampling import SamplingParams

from tests.core.fake_runner import FakeRunner

BS = 16


def make_sched(num_blocks=256, budget=64, max_seqs=16, caching=True, max_len=8192, chunked=True):
    kv = KVCacheManager(num_blocks, BS, caching)
    return Scheduler(SchedulerConfig(budget, max_seqs, max_len, chunked), kv)


def req(rid, n_prompt, max_tokens=8, seed_tokens=None, salt=None, share=None, eos=(), **sp):
    rng = random.Random(rid if seed_tokens is None else seed_tokens)
    toks = [rng.randrange(3, 1000) for _ in range(n_prompt)]
    return Request(rid, toks, SamplingParams(temperature=0, max_tokens=max_tokens, **sp), BS, eos, cache_salt=salt,
                   share_prompt_with=share)


def run(sched, runner, max_steps=10_000, check=True, on_step=None):
    outputs: dict[str, list[int]] = {}
    steps = 0
    while sched.has_unfinished_requests() or sched.has_pending_kv_ops():  # as EngineCore steps
        so = sched.schedule()
        assert so.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert len(so.scheduled) <= sched.config.max_num_seqs
        mo = runner.execute(so)
        for u in sched.update(so, mo):
            outputs.setdefault(u.request_id, []).extend(u.new_token_ids)
        if check:
            sched.check_invariants()
        if on_step:
            on_step(steps, so)
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
    return outputs


def random_step(sched, runner, rng, abort_p: float, aborted: set, results: dict) -> None:
    """One step of a randomized run: maybe abort a random request, then schedule, execute and update, checking the
    invariants after each."""
    if rng.random() < abort_p and sched.requests:
        victim = rng.choice(sorted(sched.requests))
        sched.finish_request(victim, RequestStatus.FINISHED_ABORTED)
        aborted.add(victim)
        sched.check_invariants()
    so = sched.schedule()
    sched.check_invariants()
    for u in sched.update(so, runner.execute(so)):
        results.setdefault(u.request_id, []).extend(u.new_token_ids)
    sched.check_invariants()


def assert_as_reference(added, results: dict, aborted: set, ref: dict, what: str) -> None:
    """Every request's tokens equal the reference run's (an aborted one's, a prefix of them)."""
    for r in added:
        got = results.get(r.request_id, [])
        want = ref[r.request_id][:len(got)] if r.request_id in aborted else ref[r.request_id]
        assert got == want, f"{r.request_id} (preempted {r.num_preemptions}x) differs from {what}"


def test_budget_and_chunking_flatten_many_requests():
    sched = make_sched(budget=64)
    runner = FakeRunner(BS)
    for i in range(6):
        sched.add_request(req(f"r{i}", 100 + 7 * i, max_tokens=5))
    out = run(sched, runner)
    assert all(len(v) == 5 for v in out.values()) and len(out) == 6
    first = runner.steps[0]
    assert first.num_batched_tokens == 64 and [s.num_new_tokens for s in first.scheduled] == [64]
    # a step mixes decodes and prefill chunks of several requests
    assert any(len({s.request_id for s in so.scheduled}) > 1 and
               any(s.num_new_tokens == 1 for s in so.scheduled) and
               any(s.num_new_tokens > 1 for s in so.scheduled) for so in runner.steps)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def test_long_prefill_never_stalls_running_decodes():
    sched = make_sched(num_blocks=600, budget=256)
    runner = FakeRunner(BS)
    for i in range(4):
        sched.add_request(req(f"d{i}", 20, max_tokens=60))
    # let the decoders start
    for _ in range(3):
        so = sched.schedule()
        sched.update(so, runner.execute(so))
    decoding = {r.request_id for r in sched.running if not r.in_prefill}
    assert len(decoding) == 4
    sched.add_request(req("long", 4096, max_tokens=2))

    def check(step, so):
        ids = {s.request_id for s in so.scheduled}
        live = {rid for rid in decoding if rid in sched.requests or rid in ids}
        missing = live - ids
        assert not missing, f"step {step}: decodes {missing} were not scheduled while the long prompt prefilled"

    run(sched, runner, on_step=check)
    long_chunks = [s.num_new_tokens for so in runner.steps for s in so.scheduled if s.request_id == "long"]
    assert sum(long_chunks[:-1]) + 1 >= 4096 and max(long_chunks) <= 256 - 0


def test_no_chunking_waits_for_whole_prompt_budget():
    sched = make_sched(budget=300, max_len=300, chunked=False)
    runner = FakeRunner(BS)
    sched.add_request(req("a", 200, max_tokens=3))
    sched.add_request(req("b", 200, max_tokens=3))
    run(sched, runner)
    first = runner.steps[0]
    assert [s.num_new_tokens for s in first.scheduled] == [200]


def test_preemption_and_resume_give_same_tokens():
    def go(num_blocks):
        sched = make_sched(num_blocks=num_blocks, budget=64, max_seqs=8)
        runner = FakeRunner(BS)
        for i in range(8):
            sched.add_request(req(f"r{i}", 40 + 3 * i, max_tokens=40))
        return run(sched, runner), sched

    ref, s_ref = go(400)
    out, s_small = go(24)
    assert s_ref.num_preemptions == 0
    assert s_small.num_preemptions > 0
    assert out == ref
    assert s_small.kv.pool.num_free_blocks == 24


def test_prefix_hit_reported_and_reused_blocks_are_the_cached_ones():
    sched = make_sched(budget=512)
    runner = FakeRunner(BS)
    a = req("a", 100, max_tokens=2, seed_tokens=7)
    sched.add_request(a)
    run(sched, runner)
    cached_ids = [sched.kv.pool.get_cached_block(h).block_id for h in a.block_hashes[:6]]
    b = req("b", 100, max_tokens=2, seed_tokens=7)
    sched.add_request(b)
    so = sched.schedule()
    (sb,) = so.scheduled
    assert sb.start == 96 and sb.num_new_tokens == 4 and b.num_cached_tokens == 96
    assert sb.block_ids[:6] == cached_ids
    sched.update(so, runner.execute(so))
    run(sched, runner)
    assert sched.kv.stats.hit_tokens == 96


def test_n_siblings_share_prompt_blocks():
    sched = make_sched(budget=512)
    runner = FakeRunner(BS)
    first = req("g#0", 70, max_tokens=4, seed_tokens=1)
    sibs = [req(f"g#{i}", 70, max_tokens=4, seed_tokens=1, share=first) for i in (1, 2)]
    sched.add_request(first)
    for s in sibs:
        sched.add_request(s)
    assert sched.num_waiting == 3
    so = sched.schedule()
    assert [s.request_id for s in so.scheduled] == ["g#0"]  # siblings wait for the prompt
    sched.update(so, runner.execute(so))
    so = sched.schedule()
    by_id = {s.request_id: s for s in so.scheduled}
    shared = by_id["g#0"].block_ids[:4]
    for sid in ("g#1", "g#2"):
        assert by_id[sid].block_ids[:4] == shared and by_id[sid].start == 64 and by_id[sid].num_new_tokens == 6
    assert all(sched.kv.pool.blocks[b].ref_cnt == 3 for b in shared)
    sched.update(so, runner.execute(so))
    sched.check_invariants()
    run(sched, runner)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@pytest.mark.parametrize("caching", [True, False])
def test_sibling_resumed_after_preemption_does_not_reuse_parent_output_kv(caching):
    """n = 2 at temperature > 0 under KV pressure: the sibling is preempted once its output fills blocks past the
    prompt and resumes while the parent still decodes. The parent's blocks past the prompt's full blocks hold the
    parent's own output, which differs from the sibling's: the sibling must not start on them."""
    def start(num_blocks):
        sched = make_sched(num_blocks=num_blocks, budget=64, caching=caching)
        parent = req("g#0", 20, max_tokens=80, seed_tokens=1)
        sib = req("g#1", 20, max_tokens=80, seed_tokens=1, share=parent)
        for r in (parent, sib, req("other", 40, max_tokens=200)):  # "other" takes blocks until it is aborted
            sched.add_request(r)
        return sched, parent, sib

    ref_sched, _, _ = start(256)
    ref = run(ref_sched, FakeRunner(BS, sampling=True))
    assert ref_sched.num_preemptions == 0 and ref["g#0"] != ref["g#1"]

    sched, parent, sib = start(12)
    runner = FakeRunner(BS, sampling=True)
    out: dict[str, list[int]] = {}

    def step(so=None):
        if so is None:
            so = sched.schedule()
            sched.check_invariants()
        for u in sched.update(so, runner.execute(so)):
            out.setdefault(u.request_id, []).extend(u.new_token_ids)
        sched.check_invariants()

    while sib.num_preemptions == 0:
        step()
        assert len(runner.steps) < 200
    # preempted (the newest running sequence is the victim) with whole blocks of its own output past the prompt
    assert sib.status == RequestStatus.PREEMPTED and parent.status == RequestStatus.RUNNING
    assert sib.num_tokens > 3 * BS and parent.num_tokens > 3 * BS
    sched.finish_request("other", RequestStatus.FINISHED_ABORTED)  # frees room: the sibling resumes next step
    sched.check_invariants()
    parent_blocks = sched.kv.get_block_ids("g#0")
    so = sched.schedule()  # checked before the fake runner reads the KV back (and fails on a mix-up itself)
    sched.check_invariants()
    assert "g#1" in {s.request_id for s in so.scheduled} and parent.status == RequestStatus.RUNNING
    table = sched.kv.get_block_ids("g#1")
    n_prompt_blocks = sib.num_prompt_tokens // BS
    assert table[:n_prompt_blocks] == parent_blocks[:n_prompt_blocks]  # the prompt's full blocks: shared or cached
    assert not set(table) & set(parent_blocks[n_prompt_blocks:]), "resumed sibling runs on the parent's output KV"
    (resumed,) = [s for s in so.scheduled if s.request_id == "g#1"]
    # with prefix caching its own freed blocks (hashes cover every token) still hold its output: it resumes on them
    assert resumed.start == ((sib.num_tokens - 1) // BS * BS if caching else n_prompt_blocks * BS)
    step(so)

    while sched.has_unfinished_requests():
        step()
        assert len(runner.steps) < 1000
    assert out["g#0"] == ref["g#0"] and out["g#1"] == ref["g#1"]
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


def test_too_long_prompt_rejected_at_admission():
    sched = make_sched(max_len=128)
    with pytest.raises(RequestTooLongError):
        sched.add_request(req("x", 128))
    assert not sched.has_unfinished_requests()


def test_abort_frees_blocks_immediately():
    sched = make_sched()
    runner = FakeRunner(BS)
    sched.add_request(req("a", 100, max_tokens=50))
    so = sched.schedule()
    sched.update(so, runner.execute(so))
    assert sched.kv.pool.num_used_blocks > 0
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_used_blocks == 0 and not sched.has_unfinished_requests()
    sched.check_invariants()


def test_eos_and_stop_token_finish():
    sched = make_sched()
    runner = FakeRunner(BS, eos=2, eos_after=3)
    r = req("a", 20, max_tokens=50, eos=(2,))
    sched.add_request(r)
    out = run(sched, runner)
    assert out["a"][-1] == 2 and len(out["a"]) == 3 and r.finish_reason.value == "stop"


@pytest.mark.parametrize("seed", range(12))
def test_randomized_invariants(seed):
    """Random arrivals, n > 1, aborts, a pool from tiny to ample. The fake runner samples per sequence, so siblings
    diverge and a sequence running on another's KV gives other tokens; every sequence's tokens must equal a run of the
    same requests with no KV pressure (an aborted one's, a prefix of them)."""
    rng = random.Random(seed)
    caching = seed % 2 == 0
    budget, max_seqs = rng.choice([16, 48, 128]), rng.choice([2, 5, 16])
    sched = make_sched(num_blocks=rng.choice([12, 40, 200]), budget=budget, max_seqs=max_seqs, caching=caching,
                       max_len=512)
    runner = FakeRunner(BS, sampling=True)
    added: list[Request] = []
    aborted = set()
    prefixes = [[rng.randrange(3, 1000) for _ in range(rng.choice([16, 40, 64]))] for _ in range(3)]
    n_added = 0
    pending = 25
    results = {}
    steps = 0
    while pending or sched.has_unfinished_requests():
        if pending and rng.random() < 0.5:
            body = [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 60))]
            toks = (rng.choice(prefixes) if rng.random() < 0.6 else []) + body
            n = rng.choice([1, 1, 1, 2, 3])
            rid = f"q{n_added}"
            # up to 186 tokens: even the 12-block pool holds any one sequence alone (none ends for lack of blocks)
            sp = SamplingParams(temperature=1.0, max_tokens=rng.randrange(1, 64))
            first = Request(f"{rid}#0", toks, sp, BS, (), cache_salt=rng.choice([None, None, "s"]))
            sched.add_request(first)
            added.append(first)
            for i in range(1, n):
                sched.add_request(Request(f"{rid}#{i}", toks, sp, BS, (), cache_salt=first.cache_salt,
                                          share_prompt_with=first))
                added.append(sched.requests[f"{rid}#{i}"])
            n_added += 1
            pending -= 1
        random_step(sched, runner, rng, 0.05, aborted, results)
        steps += 1
        assert steps < 20_000
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks, "blocks leaked"
    assert not sched.kv.req_blocks

    # the same requests, fresh, with room for all of them at once: nothing is preempted
    ref_sched = make_sched(num_blocks=sum(r.num_prompt_tokens + r.max_tokens for r in added) // BS + len(added),
                           budget=budget, max_seqs=max_seqs, caching=caching, max_len=512)
    parents = {}
    for r in added:
        parent = r.share_prompt_with and parents[r.share_prompt_with.request_id]
        parents[r.request_id] = Request(r.request_id, r.prompt_token_ids, r.sampling_params, BS, (),
                                        cache_salt=r.cache_salt, share_prompt_with=parent)
        ref_sched.add_request(parents[r.request_id])
    ref = run(ref_sched, FakeRunner(BS, sampling=True))
    assert ref_sched.num_preemptions == 0
    assert all(len(ref[r.request_id]) == r.max_tokens for r in added)
    groups = [r for r in added if r.share_prompt_with is not None]
    assert all(ref[r.request_id] != ref[r.share_prompt_with.request_id] for r in groups), "siblings must diverge"
    assert_as_reference(added, results, aborted, ref, "the unpressured run")


def test_sequence_larger_than_pool_ends_instead_of_spinning():
    sched = make_sched(num_blocks=4, budget=64)
    runner = FakeRunner(BS)
    with pytest.raises(RequestTooLongError):
        sched.add_request(req("huge", 64))
    r = req("grows", 60, max_tokens=100)
    sched.add_request(r)
    out = run(sched, runner)
    assert r.finish_reason.value == "length" and len(out["grows"]) == 64 + 1 - 60
    assert sched.kv.pool.num_free_blocks == 4


# ---------------------------------------------------------------- several decode steps per engine step
def steps_sched(steps, num_blocks=64, budget=64, max_seqs=4, caching=True):
    return Scheduler(SchedulerConfig(budget, max_seqs, 8192, True, decode_steps=steps),
                     KVCacheManager(num_blocks, BS, caching))


def decode_runs(runner):
    return [[(s.request_id, s.num_new_tokens, s.decode_steps) for s in so.scheduled] for so in runner.steps]


def test_decode_steps_take_several_greedy_steps_and_keep_their_kv():
    single, runner1 = steps_sched(1), FakeRunner(BS)
    single.add_request(req("a", 30, max_tokens=10))
    want = run(single, runner1)["a"]
    sched, runner = steps_sched(4), FakeRunner(BS)
    r = req("a", 30, max_tokens=10)
    sched.add_request(r)
    seen_blocks = []
    out = run(sched, runner, on_step=lambda i, so: seen_blocks.append([list(s.block_ids) for s in so.scheduled]))
    assert out["a"] == want and len(want) == 10
    # the prompt samples 1 token; then 4 + 4 tokens in two engine steps; the last token alone (max_tokens)
    assert decode_runs(runner) == [[("a", 30, 1)], [("a", 4, 4)], [("a", 4, 4)], [("a", 1, 1)]]
    # positions 30-33 need a third block, 34-37 no more; the blocks the runs wrote are the request's own
    assert [len(b[0]) for b in seen_blocks] == [2, 3, 3, 3]
    assert seen_blocks[1][0][:2] == seen_blocks[0][0] and seen_blocks[2][0] == seen_blocks[1][0]
    assert r.num_computed_tokens == 39 and r.finish_reason.value == "length"
    assert sched.kv.pool.num_free_blocks == 64 and not sched.kv.req_blocks


def test_decode_steps_stop_inside_a_run_like_single_steps():
    single, runner1 = steps_sched(1), FakeRunner(BS)
    single.add_request(req("a", 20, max_tokens=30))
    free = run(single, runner1)["a"]
    stop = free[5]  # the 6th token: inside the second run of 4
    single, runner1 = steps_sched(1), FakeRunner(BS)
    single.add_request(req("a", 20, max_tokens=30, stop_token_ids=(stop,)))
    want = run(single, runner1)["a"]
    sched, runner = steps_sched(4), FakeRunner(BS)
    r = req("a", 20, max_tokens=30, stop_token_ids=(stop,))
    sched.add_request(r)
    assert run(sched, runner)["a"] == want and want[-1] == stop and len(want) == free.index(stop) + 1
    assert r.finish_reason.value == "stop" and sched.kv.pool.num_free_blocks == 64


@pytest.mark.parametrize("case", ["waiting", "sampled", "logprobs", "min_tokens", "penalty"])
def test_decode_steps_only_for_plain_greedy_decodes_with_nothing_waiting(case):
    sched, runner = steps_sched(4, max_seqs=1 if case == "waiting" else 4), FakeRunner(BS, sampling=case == "sampled")
    extra = {"sampled": {"temperature": 1.0}, "logprobs": {"logprobs": 2}, "min_tokens": {"min_tokens": 6},
             "penalty": {"repetition_penalty": 1.2}}.get(case, {})
    a = Request("a", list(range(3, 23)), SamplingParams(**{"temperature": 0, "max_tokens": 9, **extra}), BS, ())
    sched.add_request(a)
    if case == "waiting":
        sched.add_request(req("b", 20, max_tokens=9))
    out = run(sched, runner)
    runs = [s.decode_steps for so in runner.steps for s in so.scheduled if s.request_id == "a"]
    if case == "min_tokens":  # several steps once min_tokens is reached: 1 prompt + 5 single steps, then 3
        assert runs == [1] * 6 + [3] and len(out["a"]) == 9
    else:
        assert runs == [1] * 9
    if case == "waiting":  # b runs when a is done: alone, so in runs of 4
        assert [s.decode_steps for so in runner.steps for s in so.scheduled if s.request_id == "b"] == [1, 4, 4]


def test_decode_steps_capped_by_the_step_token_budget():
    sched, runner = steps_sched(8, budget=8), FakeRunner(BS)
    for i in range(4):
        sched.add_request(req(f"r{i}", 8, max_tokens=30))
    run(sched, runner)  # checks no step goes over the budget
    # the budget, not max_tokens, sets the runs: 8 // 4 and 8 // 3 sequences = 2 steps each
    runs = [(len(so.scheduled), so.scheduled[0].decode_steps) for so in runner.steps
            if so.scheduled[0].decode_steps > 1]
    assert runs == [(4, 2)] * 12 + [(3, 2)]


def test_decode_steps_shrink_to_the_slots_a_full_pool_leaves():
    # alone in a 2-block pool: 30 prompt tokens leave 2 free slots, so a run of 2, not 4, then the pool is out
    sched, runner = steps_sched(4, num_blocks=2), FakeRunner(BS)
    r = req("a", 30, max_tokens=10)
    sched.add_request(r)
    run(sched, runner)
    assert decode_runs(runner)[:2] == [[("a", 30, 1)], [("a", 2, 2)]]
    assert r.finish_reason.value == "length" and r.num_output_tokens == 3 and sched.kv.pool.num_free_blocks == 2


def test_decode_steps_fall_back_to_one_and_return_the_blocks_taken():
    # a (30 tokens, 2 free slots) takes the pool's last block for a run of 4; b (31 tokens, 1 free slot) cannot,
    # so the step is a single one and a's extra block goes back before the forward pass
    sched, runner = steps_sched(4, num_blocks=5), FakeRunner(BS)
    sched.add_request(req("a", 30, max_tokens=5))
    sched.add_request(req("b", 31, max_tokens=5))
    so = sched.schedule()
    sched.update(so, runner.execute(so))
    so = sched.schedule()
    assert [(s.request_id, s.num_new_tokens, s.decode_steps) for s in so.scheduled] == [("a", 1, 1), ("b", 1, 1)]
    assert sched.kv.pool.num_free_blocks == 1 and [len(s.block_ids) for s in so.scheduled] == [2, 2]
    sched.check_invariants()


@pytest.mark.parametrize("seed", range(8))
def test_decode_steps_randomized_match_single_steps(seed):
    """Random greedy arrivals, stop ids hit at random inside runs, aborts, pools from tiny to ample: every sequence's
    tokens equal a run of the same requests one decode step at a time with room for all."""
    rng = random.Random(seed)
    steps = rng.choice([2, 3, 4, 8])
    budget, max_seqs = rng.choice([8, 48, 128]), rng.choice([1, 3, 8])
    sched = steps_sched(steps, num_blocks=rng.choice([12, 40, 200]), budget=budget, max_seqs=max_seqs,
                        caching=seed % 2 == 0)
    runner = FakeRunner(BS)
    stops = tuple(range(3, 1000, 41))
    added, aborted, results = [], set(), {}
    pending, n = 20, 0
    while pending or sched.has_unfinished_requests():
        if pending and rng.random() < 0.3:
            toks = [rng.randrange(3, 1000) for _ in range(rng.randrange(1, 90))]
            sp = SamplingParams(temperature=0, max_tokens=rng.randrange(1, 60),
                                stop_token_ids=stops if rng.random() < 0.5 else ())
            r = Request(f"q{n}", toks, sp, BS, ())
            sched.add_request(r)
            added.append(r)
            n += 1
            pending -= 1
        random_step(sched, runner, rng, 0.03, aborted, results)
        assert len(runner.steps) < 20_000
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks and not sched.kv.req_blocks
    assert any(s.decode_steps > 1 for so in runner.steps for s in so.scheduled), "no run of several steps"
    ref_sched = steps_sched(1, num_blocks=sum(r.num_prompt_tokens + r.max_tokens for r in added) // BS + len(added),
                            budget=budget, max_seqs=max_seqs)
    for r in added:
        ref_sched.add_request(Request(r.request_id, r.prompt_token_ids, r.sampling_params, BS, ()))
    assert_as_reference(added, results, aborted, run(ref_sched, FakeRunner(BS)), "single steps")


def test_decode_steps_config_checked_at_the_edge():
    from kvserve.cli import _engine_args, build_parser
    from kvserve.config import ConfigError
    from kvserve.engine.core import EngineArgs

    for bad in (0, 65, 2.0, True):
        with pytest.raises(ConfigError, match="decode_steps must be an integer in"):
            SchedulerConfig(decode_steps=bad)
    with pytest.raises(ConfigError, match="decode_steps must be an integer in"):
        EngineArgs(decode_steps=0)  # the engine's arguments, before any model is loaded
    with pytest.raises(ConfigError, match="pick one"):
        EngineArgs(decode_steps=4, speculative_config={"method": "ngram"})
    for command in (["serve"], ["generate", "--prompt", "x"]):
        assert _engine_args(build_parser().parse_args(command)).decode_steps == 1
        assert _engine_args(build_parser().parse_args(command + ["--decode-steps", "8"])).decode_steps == 8
