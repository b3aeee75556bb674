"""The prefix summary a router reads (rule 1: plain, exact blocks only), to the exact hash and version."""

from kvserve.core.hashing import hash_block_chain
from kvserve.core.kv_cache_manager import KVCacheManager
from tests.core.test_blend import BS, TOKENS, blend_req, make_sched, plain_req
from tests.core.test_block_pool import make_req
from tests.core.test_scheduler import run
from tests.core.fake_runner import FakeRunner


def test_summary_lists_cached_plain_blocks_and_changes_version_only_on_change():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    v0, hashes = kv.prefix_summary(None)
    assert hashes == [] and kv.prefix_summary(v0) == (v0, None)  # unchanged: nothing resent
    r1 = make_req("r1", list(range(10)))  # 2 full blocks + 2 tokens
    kv.allocate_slots(r1, 10)
    kv.cache_blocks(r1, 10)
    chain = hash_block_chain(list(range(10)), BS, None)
    v1, hashes = kv.prefix_summary(v0)
    assert v1 == v0 + 2 and hashes == chain
    assert kv.prefix_summary(v1) == (v1, None)
    kv.free(r1)  # freed but still cached: still advertised, same version
    assert kv.prefix_summary(v1) == (v1, None)
    # a 4-block request reuses nothing and takes every free block: the cached ones are evicted, and the summary says so
    r2 = make_req("r2", list(range(100, 116)))
    kv.allocate_slots(r2, 16)
    v2, hashes = kv.prefix_summary(v1)
    assert hashes == [] and v2 == v1 + 2
    kv.pool.check_invariants()
    kv.cache_blocks(r2, 16)
    v3, hashes = kv.prefix_summary(v2)
    assert hashes == hash_block_chain(list(range(100, 116)), BS, None) and v3 == v2 + 4
    kv.free(r2)
    assert kv.reset_prefix_cache()
    v4, hashes = kv.prefix_summary(v3)
    assert hashes == [] and v4 == v3 + 1


def test_salted_chains_are_advertised_under_their_own_hashes():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    r = make_req("r", list(range(9)), salt="tenant-a")
    kv.allocate_slots(r, 9)
    kv.cache_blocks(r, 9)
    _, hashes = kv.prefix_summary(None)
    assert hashes == hash_block_chain(list(range(9)), BS, "tenant-a") != hash_block_chain(list(range(9)), BS, None)


def test_blended_and_segment_blocks_are_never_advertised():
    sched, runner = make_sched(), FakeRunner(BS)
    sched.add_request(blend_req("a"))  # none mode: segments computed alone (own namespace), then blended
    run(sched, runner)
    plain = hash_block_chain(TOKENS, BS, None)
    _, advertised = sched.kv.prefix_summary(None)
    # only block 0 (before segment 1's first token) is plain; segments and blended blocks are cached, not advertised
    assert advertised == plain[:1]
    assert len(sched.kv.pool.cached) > 1
    sched.add_request(plain_req("p"))
    run(sched, runner)
    _, advertised = sched.kv.prefix_summary(None)
    assert advertised[:len(plain)] == plain and set(advertised) <= set(sched.kv.pool.cached)
    sched.kv.pool.check_invariants()
