"""Swap-or-recompute preemption with a fake runner that reads every context back through the block tables (and
poisons blocks once they are copied out): swapped requests resume on exactly the KV they had, the per-victim choice
follows the cost model, a full swap space falls back to recompute, and slots are never reused within a step."""

import random

import pytest

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.outputs import KVSwapIn, KVSwapOut
from kvserve.core.request import Request
from kvserve.core.scheduler import Scheduler
from kvserve.core.swap import SwapCostModel, SwapSpace
from kvserve.sampling import SamplingParams

from tests.core.fake_runner import FakeRunner
from tests.core.test_scheduler import run

BS = 16


def make(num_blocks, mode="swap", swap_blocks=64, budget=64, max_seqs=8):
    kv = KVCacheManager(num_blocks, BS, enable_prefix_caching=False)  # nothing comes back from the prefix cache
    cfg = SchedulerConfig(budget, max_seqs, 8192, True, preemption_mode=mode, num_swap_blocks=swap_blocks,
                          kv_bytes_per_block=1000)
    return Scheduler(cfg, kv)


def workload(seed, n=6):
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(3, 1000) for _ in range(rng.randrange(10, 70))],
                    SamplingParams(temperature=0, max_tokens=rng.randrange(20, 60), ignore_eos=True), BS)
            for i in range(n)]


def run_all(sched, requests, runner):
    for r in requests:
        sched.add_request(r)
    return run(sched, runner)


@pytest.mark.parametrize("seed", range(6))
def test_swapped_requests_resume_on_their_own_kv(seed):
    reference = run_all(make(1000, mode="recompute"), workload(seed), FakeRunner(BS))
    sched, runner = make(14, mode="swap"), FakeRunner(BS, poison_swapped=True)
    out = run_all(sched, workload(seed), runner)
    assert out == reference
    assert sched.num_swapped_preemptions > 0 and sched.num_recomputed_preemptions == 0
    ops = [op for so in runner.steps for op in so.kv_ops]
    assert sum(isinstance(op, KVSwapOut) for op in ops) == sched.num_swapped_preemptions
    assert sum(isinstance(op, KVSwapIn) for op in ops) == sched.num_swapped_preemptions
    assert sched.swap.num_used == 0 and not runner.swap  # every slot copied back and freed
    # a swap-in never reads a slot that a swap-out of the same step (listed earlier) just wrote
    for so in runner.steps:
        out_slots = {s for op in so.kv_ops if isinstance(op, KVSwapOut) for s in op.slots}
        in_slots = {s for op in so.kv_ops if isinstance(op, KVSwapIn) for s in op.slots}
        assert not out_slots & in_slots


def test_recompute_after_poisoned_swap_would_fail():
    """The poison is what makes the test above able to fail: resuming without the copy back reads it."""
    sched, runner = make(14, mode="swap"), FakeRunner(BS, poison_swapped=True)
    original = sched._admit

    def admit_without_copy_back(req, budget):
        n = original(req, budget)
        sched._kv_ops = [op for op in sched._kv_ops if not isinstance(op, KVSwapIn)]
        return n
    sched._admit = admit_without_copy_back
    with pytest.raises(AssertionError, match="slot for position"):
        run_all(sched, workload(0), runner)


def test_full_swap_space_falls_back_to_recompute():
    reference = run_all(make(1000, mode="recompute"), workload(1), FakeRunner(BS))
    sched = make(14, mode="swap", swap_blocks=3)
    assert run_all(sched, workload(1), FakeRunner(BS, poison_swapped=True)) == reference
    assert sched.num_recomputed_preemptions > 0


def test_auto_chooses_by_measured_cost():
    model = SwapCostModel(bytes_per_block=1_000_000, copy_bytes_per_s=1e9, prefill_tokens_per_s=1000)
    d = model.decide(num_tokens=160, num_blocks=10)  # swap: 2 x 10 MB at 1 GB/s = 20 ms; recompute 160 ms
    assert d.mode == "swap" and d.swap_seconds == pytest.approx(0.02) and d.recompute_seconds == pytest.approx(0.16)
    model.observe_copy(10_000_000, 1.0)  # the copies turned out slow: 10 MB/s
    assert model.copy_bytes_per_s == pytest.approx(1e7)
    assert model.decide(160, 10).mode == "recompute"
    model.observe_prefill(100, 1.0)
    model.observe_prefill(100, 1.0)
    assert model.prefill_tokens_per_s == pytest.approx(100)
    # in the scheduler: slow copies measured by the worker make every victim recompute
    reference = run_all(make(1000, mode="recompute"), workload(2), FakeRunner(BS))
    sched = make(14, mode="auto")
    sched.swap_cost.observe_copy(1, 1.0)  # 1 byte/s
    assert run_all(sched, workload(2), FakeRunner(BS)) == reference
    assert sched.num_swapped_preemptions == 0 and sched.num_recomputed_preemptions > 0


def test_swap_space_frees_slots_only_at_the_next_step():
    space = SwapSpace(4)
    a = space.allocate(3)
    assert a == [0, 1, 2] and space.allocate(2) is None
    space.free_later(a)
    assert space.allocate(2) is None and space.num_used == 0 and space.num_free == 1  # 3 wait for the next step
    space.begin_step()
    assert space.allocate(4) is not None
