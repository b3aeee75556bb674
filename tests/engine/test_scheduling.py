"""Scheduling policies through the offline LLM on the real model (float32): outputs unchanged by the order requests
run in, per-prompt priority and tenant, per-tenant stats, and the engine-side checks of both fields."""

import pytest

from kvserve.engine.llm_engine import LLM
from kvserve.sampling import ParamError, SamplingParams

PROMPTS = ["The capital of France is", "Two plus two equals", "A list of colours: red,", "Water boils at"]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_priority_and_vtc_change_order_not_outputs(make_engine):
    base = LLM.from_engine(make_engine(max_num_seqs=1), batch_reorder=False).generate(PROMPTS, GREEDY,
                                                                                     use_tqdm=False)
    prio_engine = make_engine(max_num_seqs=1, scheduling_policy="priority")
    prio = LLM.from_engine(prio_engine, batch_reorder=False)
    out = prio.generate(PROMPTS, GREEDY, use_tqdm=False, priority=[3, 0, 2, 1])
    # in input order, each the greedy answer to its own prompt
    assert [o.prompt for o in out] == PROMPTS
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in base]
    # one sequence at a time: the last prompt of the batch (priority 0) finished before the first (priority 3)
    finished = {o.request_id: o.metrics.finished_time for o in out}
    assert finished[out[1].request_id] < finished[out[3].request_id] < finished[out[2].request_id] \
        < finished[out[0].request_id]

    vtc_engine = make_engine(max_num_seqs=1, scheduling_policy="vtc", tenant_weights=(("a", 2.0),))
    vtc = LLM.from_engine(vtc_engine, batch_reorder=False)
    out = vtc.generate(PROMPTS, GREEDY, use_tqdm=False, tenant=["a", "a", "b", "b"])
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in base]
    stats = vtc_engine.stats().tenants
    assert set(stats) == {"a", "b"}
    assert stats["a"].output_tokens == stats["b"].output_tokens == 12
    assert stats["a"].num_waiting == stats["a"].num_running == 0
    # the counter is weighted service: a's is halved by its weight 2
    a_cost = stats["a"].prompt_tokens_computed + 2 * 12
    b_cost = stats["b"].prompt_tokens_computed + 2 * 12
    assert stats["a"].vtc_counter == pytest.approx(a_cost / 2) and stats["b"].vtc_counter == pytest.approx(b_cost)


def test_priority_and_tenant_are_checked_by_the_engine(make_engine):
    llm = LLM.from_engine(make_engine())
    with pytest.raises(ParamError, match="priority is only used by the priority scheduling policy"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, priority=1)
    with pytest.raises(ParamError, match="tenant must be"):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False, tenant="")
    with pytest.raises(ValueError, match="tenant list must match"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False, tenant=["a"])
    assert llm.engine.stats().num_waiting == 0 and llm.engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_swapped_and_resumed_requests_match_unpreempted_greedy_tokens(make_engine, mode):
    """A pool too small for four growing sequences: preempted ones are swapped out and back (auto: swapping a
    small context beats recomputing it on this machine) and produce the greedy tokens of an unpreempted run."""
    prompts = [f"Write a long story number {i} about a dragon and a knight." for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = LLM.from_engine(make_engine(max_num_seqs=4), batch_reorder=False)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    engine = make_engine(max_num_seqs=4, num_blocks=12, preemption_mode=mode, enable_prefix_caching=False)
    out = LLM.from_engine(engine, batch_reorder=False).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == expected
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.preemptions_swapped == stats.num_preemptions
    assert stats.swap_blocks_used == 0 and stats.kv_blocks_used == 0
