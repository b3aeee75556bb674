"""A step's cost features (the goodput planner's terms) and the served-step trace, to the exact number."""

import json
from types import SimpleNamespace

from kvserve.core.step_trace import StepTrace, step_features


def _sr(rid: str, start: int, n: int, prompt: int, spec: int = 0, sample: bool = True):
    return SimpleNamespace(num_new_tokens=n, start=start, spec_token_ids=[0] * spec, sample=sample,
                           request=SimpleNamespace(request_id=rid, num_prompt_tokens=prompt))


def test_features_of_a_mixed_step():
    # a 512-token chunk at position 1,024, two decodes (contexts 100 and 2,000), one verifying 3 drafts
    so = SimpleNamespace(scheduled=[_sr("a", 1024, 512, 3000), _sr("b", 99, 1, 50), _sr("c", 1996, 4, 40, spec=3)])
    base, moved = step_features(so)
    assert moved == 0
    assert base == [1.0, 512 + 1 + 4, 2.0, (100 + 2000) / 1e3, 512 * (1024 + 256) / 1e6]
    # decode-only: no GEMM tokens (the small-batch kernels), only the per-sequence terms
    assert step_features(SimpleNamespace(scheduled=[_sr("b", 99, 1, 50)]))[0] == [1.0, 0.0, 1.0, 0.1, 0.0]


def test_a_loaded_prompt_costs_a_transfer_not_compute():
    so = SimpleNamespace(scheduled=[_sr("p", 0, 300, 300)])
    base, moved = step_features(so, loaded=frozenset({"p"}))
    assert moved == 300 and base == [1.0, 0.0, 1.0, 0.3, 0.0]


def test_trace_writes_busy_steps_with_their_cycle(tmp_path):
    path = tmp_path / "steps.jsonl"
    trace = StepTrace(str(path))
    one = SimpleNamespace(scheduled=[_sr("b", 99, 1, 50)])
    trace.step_started(10.0)
    trace.step_done(one, 10.0, busy=True)
    trace.step_started(10.025)  # the next step closes the first one's cycle
    trace.step_done(one, 10.025, busy=False)  # then the engine went idle: no cycle to measure
    trace.step_started(99.0)
    trace.step_done(SimpleNamespace(scheduled=[]), 99.0, busy=True)  # an empty step is not a cost sample
    trace.step_started(99.5)
    trace.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [{"base": [1.0, 0.0, 1.0, 0.1, 0.0], "cycle_s": 0.025}]
