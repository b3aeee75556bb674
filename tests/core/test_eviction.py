"""KV eviction in the brain: compaction to the exact slot and block id, copy-on-write of cached and shared blocks,
admission that counts the prefill peak, and a randomized run whose fake runner evicts at random and reads every
context back through the block tables (the budget is never exceeded; every cached block holds exactly the tokens
its hash names, so no block holding compacted KV can be found by a prefix lookup)."""

import random

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.outputs import KVCompact, KVSwapIn, KVSwapOut, ModelOutput, SchedulerOutput
from kvserve.core.request import Request
from kvserve.core.scheduler import Scheduler
from kvserve.sampling import SamplingParams

from tests.core.fake_runner import next_token
from tests.core.test_scheduler import run

BS = 4


def make_req(rid, n_tokens, budget=0, max_tokens=8, tokens=None):
    toks = tokens or [10 + i for i in range(n_tokens)]
    return Request(rid, toks, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), BS,
                   kv_budget=budget)


def computed(kv, r, n):
    """`r` with n tokens computed in blocks allocated by `kv`."""
    assert kv.allocate_slots(r, n) is not None
    r.num_computed_tokens = n
    return kv.get_block_ids(r.request_id)


def test_compact_fills_holes_from_the_tail_and_frees_emptied_blocks():
    kv = KVCacheManager(10, BS, enable_prefix_caching=False)
    r = make_req("a", 12)
    assert computed(kv, r, 12) == [0, 1, 2]
    op = kv.compact(r, [1, 5, 6, 7])
    # 8 tokens stay: holes 1, 5, 6, 7 take the kept tokens 8, 9, 10, 11 (block 2), which is then empty and freed
    assert op == KVCompact("a", [8, 9, 10, 11], [1, 5, 6, 7], [(8, 1), (9, 5), (10, 6), (11, 7)], 8)
    assert kv.get_block_ids("a") == [0, 1]
    assert r.num_evicted_tokens == 4 and r.num_kv_tokens == 8
    assert kv.num_free_blocks == 8
    kv.check_invariants()
    # kept tokens past the new length that were evicted themselves move nowhere; a partial last block stays
    r2 = make_req("b", 7)
    assert computed(kv, r2, 7) == [3, 4]
    op = kv.compact(r2, [0, 6])
    assert op.moves == [(5, 0)] and op.src_slots == [4 * BS + 1] and op.dst_slots == [3 * BS + 0]
    assert op.num_kv_tokens == 5 and kv.get_block_ids("b") == [3, 4]
    kv.check_invariants()


def test_compact_copies_cached_and_shared_blocks_before_writing():
    kv = KVCacheManager(12, BS, enable_prefix_caching=True)
    r = make_req("a", 12)
    blocks = computed(kv, r, 12)
    kv.cache_blocks(r, 12)
    assert blocks == [0, 1, 2]
    hashes = list(r.block_hashes[:3])
    op = kv.compact(r, [1, 2, 3, 9])
    # block 0 gets holes: cached, so its kept slots (0 and the moved 8, 10, 11) go to a fresh block instead; block 1
    # has none and stays; block 2 is emptied: freed, and stays cached with its exact (untouched) KV
    new = kv.get_block_ids("a")
    assert new[1] == 1 and new[0] not in (0, 1, 2)
    assert op.dst_slots == [new[0] * BS + o for o in range(4)]
    assert op.src_slots == [0, 8, 10, 11]
    for h, b in zip(hashes, (0, 1, 2)):
        assert kv.pool.get_cached_block(h).block_id == b  # the originals keep their hashes: exact KV
    # nothing is registered for an evicting request from now on, even for blocks that fill up later
    r.num_computed_tokens += 4
    assert kv.allocate_slots(r, 0) is not None
    kv.cache_blocks(r, r.num_computed_tokens)
    assert [b.block_hash for b in kv.get_blocks("a")] == [None, hashes[1], None]
    kv.check_invariants()


def sharing_child(kv, child_tokens):
    """A cached 8-token parent "p" and a child "c" of child_tokens tokens on the parent's two blocks."""
    parent = make_req("p", 8)
    computed(kv, parent, 8)
    kv.cache_blocks(parent, 8)
    child = make_req("c", child_tokens)
    kv.share_blocks(child, kv.get_blocks("p"))
    child.num_computed_tokens = 8
    return child


def test_compact_copies_a_partial_last_block_that_is_shared():
    kv = KVCacheManager(12, BS, enable_prefix_caching=True)
    child = sharing_child(kv, 8)
    op = kv.compact(child, [6, 7])
    # 6 stay: block 0 is untouched; the shared block 1 would get the next token at offset 2, so it is copied
    ids = kv.get_block_ids("c")
    assert ids[0] == 0 and ids[1] not in (0, 1)
    assert op.src_slots == [4, 5] and op.dst_slots == [ids[1] * BS, ids[1] * BS + 1]
    assert kv.get_block_ids("p") == [0, 1]
    kv.check_invariants()


class EvictingRunner:
    """A fake runner that evicts at random when a request is over its budget and keeps its own model of which
    position each KV index holds; every sampled context is read back through the block table and compared with
    that model and the request's tokens."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.slots: dict[int, tuple[int, int]] = {}
        self.swap: dict[int, list] = {}
        self.kv_pos: dict[str, list[int]] = {}
        self.evictions = 0

    def apply(self, ops):
        for op in ops:
            if isinstance(op, KVCompact):
                values = [self.slots[s] for s in op.src_slots]  # every source read first
                for d, v in zip(op.dst_slots, values):
                    self.slots[d] = v
                kp = self.kv_pos[op.request_id]
                for src, dst in op.moves:
                    kp[dst] = kp[src]
                del kp[op.num_kv_tokens:]
            elif isinstance(op, KVSwapOut):
                for b, s in zip(op.block_ids, op.slots):
                    self.swap[s] = [self.slots.get(b * BS + i) for i in range(BS)]
            elif isinstance(op, KVSwapIn):
                for s, b in zip(op.slots, op.block_ids):
                    for i, v in enumerate(self.swap.pop(s)):
                        if v is not None:
                            self.slots[b * BS + i] = v

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        out = ModelOutput()
        self.apply(sched.kv_ops)
        for s in sched.scheduled:
            req = s.request
            kp = self.kv_pos.setdefault(s.request_id, [])
            if s.kv_start == 0 or s.start == s.kv_start:  # before any eviction, index == position
                kp[:] = list(range(s.kv_start))
            else:
                assert len(kp) >= s.kv_start, f"{s.request_id}: KV past what the runner wrote"
                del kp[s.kv_start:]
            for j in range(s.num_new_tokens):
                i = s.kv_start + j
                self.slots[s.block_ids[i // BS] * BS + i % BS] = (req.token_ids[s.start + j], s.start + j)
                kp.append(s.start + j)
            if not s.sample:
                continue
            length = s.kv_start + s.num_new_tokens
            for i in range(length):
                tok, pos = self.slots[s.block_ids[i // BS] * BS + i % BS]
                assert pos == kp[i] and tok == req.token_ids[pos], f"{s.request_id}: KV index {i} is wrong"
            kept = sorted(kp)
            assert len(set(kept)) == len(kept)
            out.sampled[s.request_id] = [next_token([req.token_ids[p] for p in kept])]
            if s.kv_budget and length > s.kv_budget:
                out.evicted[s.request_id] = sorted(self.rng.sample(range(length), length - s.kv_budget))
                self.evictions += 1
        return out


def check_cached_blocks_exact(sched: Scheduler, runner: EvictingRunner, hashes: dict) -> None:
    """Every block findable by a prefix lookup holds exactly the tokens and positions its hash names."""
    for b in sched.kv.pool.blocks:
        if b.block_hash is None:
            continue
        tokens, index = hashes[b.block_hash]
        for o in range(BS):
            assert runner.slots[b.block_id * BS + o] == (tokens[index * BS + o], index * BS + o), \
                f"cached block {b.block_id} holds other KV than its hash names"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_randomized_eviction_budget_and_exact_cache(seed, mode):
    rng = random.Random(seed)
    kv = KVCacheManager(20 + rng.randrange(8), BS, enable_prefix_caching=True)
    cfg = SchedulerConfig(rng.choice([8, 16, 32]), 6, 4096, True, preemption_mode=mode, num_swap_blocks=64,
                          kv_bytes_per_block=1000)
    sched = Scheduler(cfg, kv)
    runner = EvictingRunner(seed)
    shared = [rng.randrange(3, 1000) for _ in range(24)]  # a common prefix: cached blocks get compacted around
    hashes = {}
    requests = []
    for i in range(10):
        toks = (shared if rng.random() < 0.6 else []) + [rng.randrange(3, 1000) for _ in range(rng.randrange(3, 40))]
        budget = rng.choice([0, 9, 13, 20])
        r = Request(f"r{i}", toks, SamplingParams(temperature=0, max_tokens=rng.randrange(5, 40), ignore_eos=True),
                    BS, kv_budget=budget)
        requests.append(r)
        sched.add_request(r)

    def on_step(step, so):
        for r in requests:
            for idx, h in enumerate(r.block_hashes):
                hashes.setdefault(h, (r.token_ids, idx))
        check_cached_blocks_exact(sched, runner, hashes)

    run(sched, runner, on_step=on_step)
    assert runner.evictions > 0
    assert sched.num_evicted_tokens > 0
    assert kv.num_used_blocks == 0
    kv.check_invariants()


def test_admission_waits_for_room_for_an_evicting_prompt():
    """An evicting request peaks at its whole prompt (plus a block) before it evicts: it is admitted only when that
    fits beside the prompts evicting requests are still prefilling, so it never has to preempt one."""
    kv = KVCacheManager(12, BS, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(8, 4, 4096, True), kv)
    a, b = make_req("a", 30, budget=9), make_req("b", 30, budget=9)
    sched.add_request(a)
    sched.add_request(b)
    so = sched.schedule()
    # a needs 8 blocks (30 tokens + 1) at its peak; b's 8 more do not fit beside them in 12
    assert [s.request_id for s in so.scheduled] == ["a"]
    assert sched.num_waiting == 1


def test_compact_waits_when_a_shared_block_cannot_be_copied():
    kv = KVCacheManager(3, BS, enable_prefix_caching=True)
    child = sharing_child(kv, 12)
    assert kv.allocate_slots(child, 4) is not None  # the pool's last block
    child.num_computed_tokens = 12
    # evicting token 1 makes a hole in the shared block 0: its copy needs a block, and none is free (the tail block
    # 2 stays: 11 kept tokens need 3 blocks)
    assert kv.compact(child, [1]) is None
    assert child.num_evicted_tokens == 0 and kv.get_block_ids("c") == [0, 1, 2]
    kv.check_invariants()
    # evicting a whole block's worth frees the tail block, which the copy then takes (read before it is written)
    op = kv.compact(child, [1, 2, 3, 8])
    assert kv.get_block_ids("c") == [2, 1]
    assert op.src_slots == [0, 9, 10, 11] and op.dst_slots == [8, 9, 10, 11]
    assert kv.get_block_ids("p") == [0, 1]
    kv.check_invariants()
