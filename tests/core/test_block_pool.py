"""Block pool and KV cache manager, checked to the exact block id and free-list order."""

import sys

import pytest

from kvserve.core.block_pool import BlockPool, FreeBlockQueue, Block
from kvserve.core.hashing import hash_block, hash_block_chain
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request
from kvserve.sampling import SamplingParams

BS = 4


def make_req(rid, tokens, salt=None, max_tokens=8):
    return Request(rid, tokens, SamplingParams(temperature=0, max_tokens=max_tokens), BS, (0,), cache_salt=salt)


def test_core_does_not_import_torch():
    import subprocess
    code = ("import sys; import kvserve.core.scheduler, kvserve.core.kv_cache_manager; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_free_queue_order_and_o1_removal():
    blocks = [Block(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4]
    q.remove(blocks[2])
    assert q.block_ids() == [0, 1, 3, 4] and q.num_free_blocks == 4
    assert q.popleft().block_id == 0
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 4, 0]
    with pytest.raises(ValueError):
        q.remove(blocks[2])


def test_hash_chain_depends_on_parent_and_salt():
    a = hash_block_chain([1, 2, 3, 4, 5, 6, 7, 8, 9], BS, None)
    assert len(a) == 2
    assert a[1] == hash_block(a[0], [5, 6, 7, 8], None)
    assert hash_block(None, [5, 6, 7, 8], None) != a[1]
    assert hash_block_chain([1, 2, 3, 4], BS, "tenant-a") != hash_block_chain([1, 2, 3, 4], BS, "tenant-b")


def test_allocate_cache_hit_free_and_evict_exact_ids():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    r1 = make_req("r1", list(range(10)))  # 2 full blocks + 2 tokens
    m = kv.match_prefix(r1)
    assert m.blocks == [] and m.miss_cause == "no_match"
    assert [b.block_id for b in kv.allocate_slots(r1, 10)] == [0, 1, 2]
    r1.num_computed_tokens = 10
    kv.cache_blocks(r1, 10)
    assert kv.pool.free_queue.block_ids() == [3, 4, 5]

    # same prefix: hits blocks 0 and 1 and never the block holding the last token
    r2 = make_req("r2", list(range(8)) + [99, 98])
    m2 = kv.match_prefix(r2)
    assert [b.block_id for b in m2.blocks] == [0, 1] and m2.miss_cause is None
    assert [b.block_id for b in kv.allocate_slots(r2, 2, m2.blocks)] == [3]
    assert [b.ref_cnt for b in kv.pool.blocks] == [2, 2, 1, 1, 0, 0]
    kv.check_invariants()

    # a prompt of exactly two blocks may only reuse one: the last token's logits are needed
    r3 = make_req("r3", list(range(8)))
    assert [b.block_id for b in kv.match_prefix(r3).blocks] == [0]

    # freeing returns blocks tail-first: the shared prefix is evicted last
    kv.free(r1)
    assert kv.pool.free_queue.block_ids() == [4, 5, 2]
    kv.free(r2)
    assert kv.pool.free_queue.block_ids() == [4, 5, 2, 3, 1, 0]
    kv.check_invariants()
    # unreferenced cached blocks stay findable
    assert [b.block_id for b in kv.match_prefix(make_req("r4", list(range(9)))).blocks] == [0, 1]

    # allocation takes uncached free blocks in LRU order and evicts cached ones only when it must
    r5 = make_req("r5", [50 + i for i in range(16)])
    assert [b.block_id for b in kv.allocate_slots(r5, 16)] == [4, 5, 2, 3]
    assert kv.pool.num_evictions == 0  # blocks 2 and 3 held partial/unhashed content
    r6 = make_req("r6", [70 + i for i in range(5)])
    assert [b.block_id for b in kv.allocate_slots(r6, 5)] == [1, 0]
    assert kv.pool.num_evictions == 2
    again = make_req("r7", list(range(9)))
    m7 = kv.match_prefix(again)
    assert m7.blocks == [] and m7.miss_cause == "evicted"
    assert kv.allocate_slots(again, 9) is None  # pool exhausted: nothing changes
    kv.check_invariants()


def test_miss_causes_short_prompt_and_salt():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert kv.match_prefix(make_req("a", [1, 2, 3, 4])).miss_cause == "short_prompt"
    r = make_req("b", list(range(9)), salt="alice")
    kv.allocate_slots(r, 9)
    r.num_computed_tokens = 9
    kv.cache_blocks(r, 9)
    m = kv.match_prefix(make_req("c", list(range(9)), salt="bob"))
    assert m.blocks == [] and m.miss_cause == "different_salt"
    m = kv.match_prefix(make_req("d", list(range(9)), salt="alice"))
    assert [b.block_id for b in m.blocks] == [0, 1] and m.miss_cause is None
    kv.record_lookup(make_req("d", list(range(9)), salt="alice"), m)
    assert kv.stats.hit_tokens == 8 and kv.stats.queries == 1


def test_prefix_caching_disabled_never_shares():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    r = make_req("b", list(range(9)))
    kv.allocate_slots(r, 9)
    r.num_computed_tokens = 9
    kv.cache_blocks(r, 9)
    assert kv.match_prefix(make_req("c", list(range(9)))).blocks == []
    assert kv.pool.cached == {}


def test_double_free_raises():
    pool = BlockPool(3)
    b = pool.get_new_blocks(1)
    pool.free_blocks(b)
    with pytest.raises(ValueError):
        pool.free_blocks(b)
