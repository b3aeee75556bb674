"""KV pins for agents (Continuum) with a fake runner, to the exact block id: a finished turn's blocks stay pinned,
the next turn is admitted on them and takes them over; pins expire at their TTL, are released on request, are capped
per tenant and globally (oldest first), and go before any running request is preempted."""

import random

from kvserve.config import SchedulerConfig
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import Request, RequestStatus
from kvserve.core.scheduler import Scheduler
from kvserve.sampling import SamplingParams

from tests.core.fake_runner import FakeRunner
from tests.core.test_policy import Clock, admission_order

BS = 16


def make(num_blocks=64, budget=256, max_seqs=8, pin_fraction=0.5, tenant_caps=(), clock=None, **cfg):
    kv = KVCacheManager(num_blocks, BS)
    config = SchedulerConfig(budget, max_seqs, 8192, True, kv_pin_max_fraction=pin_fraction,
                             tenant_pin_max_tokens=tenant_caps, **cfg)
    return Scheduler(config, kv, clock=clock or Clock())


def turn(rid, tokens, session="s1", pin=30.0, max_tokens=4, tenant="default", salt=None):
    return Request(rid, tokens, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), BS,
                   cache_salt=salt, tenant=tenant, session_id=session, kv_pin_seconds=pin)


def toks(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def finish(sched, runner, *requests):
    for r in requests:
        sched.add_request(r)
    admission_order(sched, runner)


def background(sched, runner):
    for i in range(4):
        finish(sched, runner, Request(f"bg{i}", toks(300, 10 + i), SamplingParams(temperature=0, max_tokens=2), BS))


def test_finished_turn_stays_pinned_and_the_next_turn_takes_it_over():
    clock, runner = Clock(), FakeRunner(BS)
    sched = make(clock=clock)
    first = turn("t1", toks(40, 1))
    finish(sched, runner, first)
    # 40 prompt + 4 output tokens; 43 computed (the last sampled token never ran): blocks 0, 1 are full and cached
    assert len(sched.pins) == 1 and sched.pins.num_blocks == 2
    pinned = [b.block_id for b in sched.pins._pins[("default", "", "s1")].blocks]
    assert all(sched.kv.pool.blocks[i].ref_cnt == 1 for i in pinned)
    assert sched.kv.num_used_blocks == 2  # pins count as used KV
    background(sched, runner)  # churns through every unpinned block of the pool
    assert [b.block_id for b in sched.pins._pins[("default", "", "s1")].blocks] == pinned
    second = turn("t2", first.token_ids + toks(20, 2))
    sched.add_request(second)
    so = sched.schedule()
    sr = next(s for s in so.scheduled if s.request_id == "t2")
    assert sr.start == 32 and sr.block_ids[:2] == pinned  # admitted on the pinned blocks
    # the same turns without a pin: the background evicts the first turn's blocks and the second recomputes them
    plain, plain_runner = make(clock=clock), FakeRunner(BS)
    first_plain = turn("t1", toks(40, 1), pin=0.0)
    finish(plain, plain_runner, first_plain)
    background(plain, plain_runner)
    plain.add_request(turn("t2", first_plain.token_ids + toks(20, 2), pin=0.0))
    so = plain.schedule()
    assert next(s for s in so.scheduled if s.request_id == "t2").start == 0
    assert len(sched.pins) == 0 and sched.pins.stats.taken_over == 1
    sched.update(so, runner.execute(so))
    admission_order(sched, runner)
    sched.check_invariants()


def test_pins_expire_release_and_are_not_made_for_aborted_turns():
    clock, runner = Clock(), FakeRunner(BS)
    sched = make(clock=clock)
    finish(sched, runner, turn("a", toks(40, 1), session="a", pin=10.0), turn("b", toks(40, 2), session="b", pin=50.0))
    assert sched.pins.num_blocks == 4
    clock.t = 11.0
    sched.schedule()  # expiry runs with each step
    assert ("default", "", "a") not in sched.pins and ("default", "", "b") in sched.pins
    assert sched.pins.stats.expired == 1
    assert sched.release_pin(("default", "", "b")) == 32 and sched.release_pin(("default", "", "b")) == 0
    assert sched.kv.num_used_blocks == 0
    aborted = turn("c", toks(40, 3), session="c", max_tokens=50)
    sched.add_request(aborted)
    for _ in range(3):
        so = sched.schedule()
        sched.update(so, runner.execute(so))
    sched.finish_request("c", RequestStatus.FINISHED_ABORTED)
    assert len(sched.pins) == 0 and sched.kv.num_used_blocks == 0
    sched.check_invariants()


def test_sessions_are_scoped_by_tenant_and_salt():
    runner = FakeRunner(BS)
    sched = make()
    prompt = toks(40, 1)
    finish(sched, runner, turn("x", prompt, tenant="A", salt="s"))
    assert ("A", "s", "s1") in sched.pins
    # the same session id from another tenant neither takes over nor releases A's pin
    finish(sched, runner, turn("y", toks(20, 5), tenant="B", salt="s", pin=0.0))
    assert ("A", "s", "s1") in sched.pins
    assert sched.release_pin(("B", "s", "s1")) == 0 and ("A", "s", "s1") in sched.pins


def test_caps_unpin_the_oldest_first():
    runner = FakeRunner(BS)
    # 32 blocks, at most 25% pinned (8 blocks); tenant T at most 64 tokens (4 blocks)
    sched = make(num_blocks=32, pin_fraction=0.25, tenant_caps=(("T", 64),))
    finish(sched, runner, turn("t1", toks(40, 1), session="t1", tenant="T"))  # 2 blocks
    finish(sched, runner, turn("t2", toks(40, 2), session="t2", tenant="T"))  # 4: at T's cap
    finish(sched, runner, turn("t3", toks(40, 3), session="t3", tenant="T"))  # 6 > 4: t1 goes
    assert [k[2] for k in sched.pins._pins] == ["t2", "t3"] and sched.pins.tenant_blocks("T") == 4
    finish(sched, runner, turn("u1", toks(72, 4), session="u1", tenant="U"))  # 4 blocks: 8 in all, at the cap
    finish(sched, runner, turn("u2", toks(40, 5), session="u2", tenant="U"))  # 10 > 8: t2 (oldest) goes
    assert [k[2] for k in sched.pins._pins] == ["t3", "u1", "u2"] and sched.pins.num_blocks == 8
    assert sched.pins.stats.evicted == 2
    sched.check_invariants()


def test_pins_go_before_a_running_request_is_preempted():
    runner = FakeRunner(BS)
    sched = make(num_blocks=12, pin_fraction=1.0, max_seqs=2)
    finish(sched, runner, turn("p1", toks(72, 1), session="p1"), turn("p2", toks(72, 2), session="p2"))
    assert sched.pins.num_blocks == 8  # 4 free blocks left
    grower = Request("g", toks(30, 3), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), BS)
    finish(sched, runner, grower)  # needs 6 blocks as it decodes: the oldest pin is released for it
    assert sched.num_preemptions == 0
    assert [k[2] for k in sched.pins._pins] == ["p2"] and sched.pins.stats.evicted == 1
    sched.check_invariants()


def test_a_pinned_sessions_next_turn_is_admitted_before_new_requests():
    runner = FakeRunner(BS)
    sched = make(max_seqs=1)
    first = turn("t1", toks(40, 1))
    finish(sched, runner, first)
    sched.add_request(Request("new", toks(30, 9), SamplingParams(temperature=0, max_tokens=2), BS))
    sched.add_request(turn("t2", first.token_ids + toks(10, 2)))
    assert admission_order(sched, runner) == ["t2", "new"]
    off = make(max_seqs=1, pinned_sessions_first=False)
    finish(off, runner, turn("t1", toks(40, 1)))
    off.add_request(Request("new", toks(30, 9), SamplingParams(temperature=0, max_tokens=2), BS))
    off.add_request(turn("t2", first.token_ids + toks(10, 2)))
    assert admission_order(off, runner) == ["new", "t2"]


def test_pins_give_way_to_a_waiting_request_that_needs_the_memory_but_keep_its_own():
    runner = FakeRunner(BS)
    sched = make(num_blocks=12, pin_fraction=1.0, max_seqs=2)
    first = turn("p1", toks(72, 1), session="p1")
    finish(sched, runner, first, turn("p2", toks(72, 2), session="p2"))
    assert sched.pins.num_blocks == 8  # 4 blocks free
    # p1's next turn needs 9 blocks, 4 of them its own pinned ones: p2's pin goes, p1's is taken over
    sched.add_request(turn("p1-next", first.token_ids + toks(60, 3), session="p1"))
    so = sched.schedule()
    sr = next(s for s in so.scheduled if s.request_id == "p1-next")
    assert sr.start == 64 and sched.pins.stats.evicted == 1 and sched.pins.stats.taken_over == 1
    sched.update(so, runner.execute(so))
    # a stranger needing 10 blocks: every pin goes rather than leave it waiting
    admission_order(sched, runner)
    assert ("default", "", "p1") in sched.pins
    big = Request("big", toks(150, 4), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), BS)
    finish(sched, runner, big)
    assert len(sched.pins) == 0 and sched.num_preemptions == 0
    sched.check_invariants()


def test_a_reserve_of_pins_holds_against_waiting_requests_but_not_running_growth():
    runner = FakeRunner(BS)
    # 12 blocks; pins may hold all of them, 4 are reserved against waiting requests
    sched = make(num_blocks=12, pin_fraction=1.0, max_seqs=2, kv_pin_reserved_fraction=4 / 12)
    finish(sched, runner, turn("p1", toks(72, 1), session="p1"), turn("p2", toks(72, 2), session="p2"))
    assert sched.pins.num_blocks == 8  # 4 blocks each, 4 free
    # a stranger needing 6 blocks: p1's pin (the oldest) goes, p2's 4 blocks are the reserve and stay
    finish(sched, runner, Request("s1", toks(90, 4), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), BS))
    assert [k[2] for k in sched.pins._pins] == ["p2"] and sched.pins.stats.evicted == 1
    # a stranger needing 9 blocks waits: only 8 blocks are outside the reserve
    big = Request("big", toks(140, 5), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), BS)
    sched.add_request(big)
    so = sched.schedule()
    assert so.scheduled == [] and sched.pins.num_blocks == 4
    # until the pin expires (30 s): then it runs
    sched.clock.t += 31
    so = sched.schedule()
    assert [s.request_id for s in so.scheduled] == ["big"] and sched.pins.stats.expired == 1
    sched.update(so, runner.execute(so))
    sched.check_invariants()
    # a running request's growth takes reserved pins too (pins never cause a preemption)
    finish(sched, runner, turn("p3", toks(72, 6), session="p3"))
    grower = Request("g", toks(30, 3), SamplingParams(temperature=0, max_tokens=120, ignore_eos=True), BS)
    finish(sched, runner, grower)  # grows to 10 blocks: the reserved pin goes
    assert sched.num_preemptions == 0 and len(sched.pins) == 0
    sched.check_invariants()


def test_reserve_is_validated():
    import pytest

    from kvserve.config import ConfigError

    from kvserve.engine.core import EngineArgs

    with pytest.raises(ConfigError, match="kv_pin_reserved_fraction"):
        SchedulerConfig(kv_pin_max_fraction=0.3, kv_pin_reserved_fraction=0.4)
    with pytest.raises(ConfigError, match="kv_pin_reserved_fraction"):  # at the edge, before any model loads
        EngineArgs(kv_pin_max_fraction=0.3, kv_pin_reserved_fraction=0.4)
    with pytest.raises(ConfigError, match="kv_pin_max_fraction"):
        EngineArgs(kv_pin_max_fraction=1.5)
