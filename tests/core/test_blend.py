"""CacheBlend in the brain: the blend namespace of a segmented prompt's hash chain, segment requests computing the
segment cache first, re-rotation ops to the exact slot, what plain and other-salt requests can find, segments lost
before use, and a randomized run whose fake runner reads every context back (a re-rotated copy that lands on the
wrong slot or position shows up as a wrong context)."""

import math
import random

from kvserve.config import KeySpan, SchedulerConfig
from kvserve.core.hashing import blend_key, hash_block_chain, segment_key
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.outputs import KVRerotate
from kvserve.core.request import BlendSpec, Request
from kvserve.core.scheduler import Scheduler
from kvserve.sampling import SamplingParams

from tests.core.fake_runner import FakeRunner
from tests.core.test_scheduler import run

BS = 4
PREFIX, D1, D2, Q = [1, 2, 3, 4, 5, 6], list(range(20, 28)), list(range(40, 50)), [7, 8, 9]
TOKENS = PREFIX + D1 + D2 + Q  # 27 tokens; segments start at 6, 14, 24
STARTS = (6, 14, 24)


def make_sched(num_blocks=64, budget=64, max_seqs=8):
    return Scheduler(SchedulerConfig(budget, max_seqs, 4096, True), KVCacheManager(num_blocks, BS, True))


def blend_req(rid, tokens=TOKENS, starts=STARTS, ratio=0.5, salt=None, max_tokens=3, prefix_mode=False, ape=None):
    """prefix_mode: segments are cached after segment 0 (context_len = its length) instead of alone. ape:
    (temperature, scale) of kv_reuse "parallel" (ratio 0)."""
    return Request(rid, tokens, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), BS,
                   cache_salt=salt, blend=BlendSpec(starts, 0.0 if ape else ratio,
                                                    context_len=starts[0] if prefix_mode else 0, ape=ape))


def plain_req(rid, tokens=TOKENS, salt=None, max_tokens=3):
    return Request(rid, tokens, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), BS,
                   cache_salt=salt)


def test_blend_chain_is_plain_up_to_segment_one_and_namespaced_after():
    r = blend_req("a")
    plain = hash_block_chain(TOKENS, BS, None)
    # blocks 0 (tokens 0-3) and ... block 1 holds token 6, segment 1's first: namespaced from there on
    assert r.block_hashes[:1] == plain[:1]
    assert all(a != b for a, b in zip(r.block_hashes[1:], plain[1:]))
    assert r.block_hashes[1:] == hash_block_chain(TOKENS, BS, None, plain[:1], switch=(1, blend_key(None)))[1:]
    assert blend_req("s", salt="t").block_hashes[0] != r.block_hashes[0]
    # a segment's own chain: neither the plain chain of the same tokens nor another salt's
    own = hash_block_chain(D1, BS, segment_key(None))
    assert own != hash_block_chain(D1, BS, None) and own != hash_block_chain(D1, BS, segment_key("t"))
    # output tokens extend the namespaced chain
    r.append_output_token(99)
    assert r.block_hashes[-1] == hash_block_chain(r.token_ids, BS, None, switch=(1, blend_key(None)))[-1]


def test_segments_are_computed_alone_first_then_reused_by_rerotation_to_the_exact_slot():
    sched, runner = make_sched(), FakeRunner(BS)
    a = blend_req("a")
    sched.add_request(a)
    assert a.segment_fills == ["a\x00segment0", "a\x00segment1"]  # D1 and D2; the question never
    so = sched.schedule()
    # the request waits while its segments are computed alone; D1 takes blocks 0-1, D2 blocks 2-4
    assert [(s.request_id, s.start, s.num_new_tokens, s.block_ids) for s in so.scheduled] == [
        ("a\x00segment0", 0, 8, [0, 1]), ("a\x00segment1", 0, 10, [2, 3, 4])]
    updates = sched.update(so, runner.execute(so))
    assert updates == []  # segment requests are internal: nothing reaches the front end
    sched.check_invariants()
    so = sched.schedule()
    assert [s.request_id for s in so.scheduled] == ["a"]
    assert sched.kv.get_block_ids("a") == [5, 6, 7, 8, 9, 10, 11]  # the whole prompt, allocated at once
    # D1 (8 tokens, 2 cached blocks) and D2's 2 full blocks (its last 2 tokens are computed) move to positions 6-13
    # and 14-21 of the request's own blocks
    assert so.kv_ops == [
        KVRerotate("a", list(range(0, 8)), list(range(26, 34)), 6),
        KVRerotate("a", list(range(8, 16)), [34, 35, 36, 37, 38, 39, 40, 41], 14)]
    assert so.scheduled[0].blend_reused == [(6, 14), (14, 22)] and so.scheduled[0].blend_ratio == 0.5
    assert a.num_cached_tokens == 16 and a.num_blended_tokens == 16
    [u] = sched.update(so, runner.execute(so))  # the fake runner reads the context back through the block table
    out = run(sched, runner)
    assert len(u.new_token_ids + out["a"]) == 3 and set(out) == {"a"}
    # looked up at arrival (missing: computed alone) and at admission (found)
    assert (sched.num_segment_hits, sched.num_segment_misses, sched.num_blended_tokens) == (2, 2, 16)


def test_prefix_mode_caches_segments_after_segment_zero_as_exact_plain_prompts():
    sched, runner = make_sched(), FakeRunner(BS)
    a = blend_req("a", prefix_mode=True)
    # D1 follows the prefix in the prompt as in the cache: a plain prefix (no fill, not blended); only D2 is reused
    assert a.blend.reusable(a.num_prompt_tokens) == [(14, 24)]
    assert a.block_hashes[:3] == hash_block_chain(TOKENS, BS, None)[:3]  # plain up to the block holding D2's start
    sched.add_request(a)
    assert a.segment_fills == ["a\x00segment0"]
    so = sched.schedule()
    # the fill is the exact prompt PREFIX + D2 (16 tokens, blocks 0-3) under the plain key
    assert [(s.request_id, s.start, s.num_new_tokens, s.block_ids) for s in so.scheduled] == [
        ("a\x00segment0", 0, 16, [0, 1, 2, 3])]
    assert so.scheduled[0].token_ids == PREFIX + D2
    sched.update(so, runner.execute(so))
    sched.check_invariants()
    so = sched.schedule()
    # block 0 (the prefix's first 4 tokens) is shared with the fill; D2 sat at positions 6-15 of the fill (slots 6-15
    # of blocks 1-3) and moves to positions 14-23, K re-rotated by 14 - 6
    assert [(s.request_id, s.start, s.num_new_tokens, s.block_ids, s.blend_reused) for s in so.scheduled] == [
        ("a", 4, 23, [0, 4, 5, 6, 7, 8, 9], [(14, 24)])]
    assert so.kv_ops == [KVRerotate("a", list(range(6, 16)), list(range(26, 36)), 8)]
    assert a.num_cached_tokens == 4 + 10 and a.num_blended_tokens == 10
    sched.update(so, runner.execute(so))
    ref = run(sched, runner)
    # the fill's KV is exact: a plain request for PREFIX + D2 finds all of it, and so does a blend request whose
    # first document is D2 (a plain prefix hit there, nothing blended)
    p = plain_req("p", PREFIX + D2 + [5])
    assert sched.kv.match_prefix(p).num_blocks == 4
    b = blend_req("b", PREFIX + D2 + D1 + Q, (6, 16, 24), prefix_mode=True)
    sched.add_request(b)
    # no fill for D1 either: "a" computed PREFIX + D1[:6] exactly as its own first 3 blocks (plain key), the whole
    # blocks of PREFIX + D1; D1's first 6 tokens are reused from them, its last 2 computed
    assert b.segment_fills == []
    out = run(sched, runner)
    assert (b.num_cached_tokens, b.num_blended_tokens) == (16 + 6, 6) and len(out["b"]) == 3 and len(ref["a"]) == 2
    sched.check_invariants()


def test_blended_blocks_are_found_by_blend_requests_only():
    sched, runner = make_sched(), FakeRunner(BS)
    sched.add_request(blend_req("a"))
    ref = run(sched, runner)["a"]
    # a plain request with the same tokens finds only the block before segment 1
    p = plain_req("p")
    assert sched.kv.match_prefix(p).num_blocks == 1
    # another blend request with the same segments finds all of it by prefix (any ratio)
    b = blend_req("b", ratio=0.0)
    assert sched.kv.match_prefix(b).num_blocks == 6
    sched.add_request(b)
    assert b.segment_fills == []  # the segments are cached
    out = run(sched, runner)
    assert out["b"] == ref and b.num_cached_tokens == 24 and b.num_blended_tokens == 0
    sched.add_request(p)
    assert run(sched, runner)["p"] == ref and p.num_cached_tokens == 4


def test_cache_salt_isolates_segments():
    sched, runner = make_sched(), FakeRunner(BS)
    sched.add_request(blend_req("a", salt="t1"))
    run(sched, runner)
    b = blend_req("b", salt="t2")
    sched.add_request(b)
    assert len(b.segment_fills) == 2  # the other salt's segments are not found
    run(sched, runner)
    assert sched.num_segment_misses == 4 and sched.num_segment_hits == 4


def test_segments_lost_before_use_are_recomputed():
    sched, runner = make_sched(), FakeRunner(BS)
    sched.add_request(blend_req("warm", tokens=[8] * 6 + D1 + D2 + [9]))  # caches D1 and D2
    run(sched, runner)
    a = blend_req("a")
    sched.add_request(a)
    assert a.segment_fills == []  # found at arrival ...
    assert sched.kv.reset_prefix_cache()  # ... and gone before admission (evicted)
    so = sched.schedule()
    assert not any(isinstance(op, KVRerotate) for op in so.kv_ops) and so.scheduled[0].blend_reused == []
    sched.update(so, runner.execute(so))
    out = run(sched, runner)
    assert len(out["a"]) == 2 and a.num_blended_tokens == 0  # (the first token came from the step above)
    assert sched.num_segment_misses == 2 + 2  # the warm-up's arrival, then the lost ones at admission


def test_randomized_blend_runs_read_back_the_same_context_as_plain_runs():
    """Documents reused in random orders, a pool small enough to preempt, random ratios and budgets: every sampled
    context read back through the block tables (re-rotated copies included) is the request's own, so outputs equal
    a plain run's, and the invariants hold every step."""
    rng = random.Random(7)
    docs = [[rng.randrange(100, 900) for _ in range(rng.randrange(3, 14))] for _ in range(6)]
    prompts = []
    for i in range(14):
        chosen = rng.sample(docs, rng.randrange(1, 4))
        segs = [[1 + i % 3] * rng.randrange(1, 7), *chosen, [rng.randrange(3, 99) for _ in range(rng.randrange(1, 5))]]
        toks, starts = [], []
        for j, sgm in enumerate(segs):
            if j:
                starts.append(len(toks))
            toks += sgm
        prompts.append((toks, tuple(starts)))
    expected = {}
    sched, runner = make_sched(num_blocks=40, budget=24), FakeRunner(BS)
    for i, (toks, _) in enumerate(prompts):
        sched.add_request(plain_req(f"r{i}", toks, max_tokens=5))
    expected = run(sched, runner)
    for budget, prefix_mode in ((8, False), (24, False), (8, True), (24, True)):
        sched, runner = make_sched(num_blocks=40, budget=budget), FakeRunner(BS)
        for i, (toks, starts) in enumerate(prompts):
            sched.add_request(blend_req(f"r{i}", toks, starts, ratio=rng.choice([0.0, 0.15, 1.0]), max_tokens=5,
                                        salt=rng.choice([None, "x"]), prefix_mode=prefix_mode))
        assert run(sched, runner) == expected
        assert sched.num_blended_tokens > 0
        assert sched.kv.num_used_blocks == 0


def test_parallel_mode_spans_the_middle_segments_and_keys_its_blocks_by_temperature_and_scale():
    a = blend_req("a", prefix_mode=True, ape=(0.5, 0.8))
    assert a.blend.key_span() == KeySpan(6, 24, 2.0, math.log(0.8))  # from segment 0's end to the question
    assert blend_req("n", prefix_mode=True).blend.key_span() is None  # CacheBlend: no span
    # namespaced from the block holding the first reused token (D2 at 14: block 3), as blend, under the APE key
    plain = hash_block_chain(TOKENS, BS, None)
    assert a.block_hashes[:3] == plain[:3]
    assert a.block_hashes[3:] == hash_block_chain(TOKENS, BS, None, switch=(3, blend_key(None, (0.5, 0.8))))[3:]
    blend = blend_req("b", prefix_mode=True, ratio=0.0)
    other = blend_req("o", prefix_mode=True, ape=(0.5, 0.9))
    assert all(len({x, y, z}) == 3 for x, y, z in zip(a.block_hashes[3:], blend.block_hashes[3:], other.block_hashes[3:]))
    # nothing reused (one document, a plain prefix hit in prefix mode): the question still attends tempered, so
    # its block (24 // 4 = 6) starts the namespace
    one = blend_req("1", PREFIX + D1 + Q, (6, 14), prefix_mode=True, ape=(0.5, 0.8))
    assert one.blend.reusable(one.num_prompt_tokens) == [] and one.blend.key_span() == KeySpan(6, 14, 2.0,
                                                                                              math.log(0.8))
    assert one.block_hashes[:3] == hash_block_chain(PREFIX + D1 + Q, BS, None)[:3]
    assert one.block_hashes[3:] != hash_block_chain(PREFIX + D1 + Q, BS, None)[3:]
    assert blend_req("1b", PREFIX + D1 + Q, (6, 14), prefix_mode=True).block_hashes == \
        hash_block_chain(PREFIX + D1 + Q, BS, None)  # ... while CacheBlend's is all plain (all exact)


def test_parallel_mode_schedules_every_chunk_with_its_span_and_shares_blocks_only_with_the_same_values():
    sched, runner = make_sched(), FakeRunner(BS)
    a = blend_req("a", prefix_mode=True, ape=(0.5, 0.8))
    sched.add_request(a)
    so = sched.schedule()  # the fill of PREFIX + D2: exact, no span
    assert [(s.request_id, s.key_span) for s in so.scheduled] == [("a\x00segment0", None)]
    sched.update(so, runner.execute(so))
    spans = []
    out = run(sched, runner, on_step=lambda i, so: spans.extend((s.request_id, s.key_span) for s in so.scheduled))
    assert spans and all(span == ("a", KeySpan(6, 24, 2.0, math.log(0.8))) for span in spans)
    assert a.num_blended_tokens == 10 and len(out["a"]) == 3
    # a plain or CacheBlend request finds only the exact blocks; the same APE values find everything
    assert sched.kv.match_prefix(plain_req("p")).num_blocks == 3
    assert sched.kv.match_prefix(blend_req("b", prefix_mode=True, ratio=0.0)).num_blocks == 3
    assert sched.kv.match_prefix(blend_req("o", prefix_mode=True, ape=(0.5, 0.9))).num_blocks == 3
    assert sched.kv.match_prefix(blend_req("c", prefix_mode=True, ape=(0.5, 0.8))).num_blocks == 6
    sched.check_invariants()
