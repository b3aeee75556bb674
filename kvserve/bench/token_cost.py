"""Per-token cost breakdown of decode at small batches: where a decode step's milliseconds go.

    python -m kvserve.bench.token_cost [--batches 1,2,4,8] [--quantization none,q8_0] [--steps 40]
                                       [--decode-steps 1,8] [--json out.json]

For each batch size and weight format, an engine core decodes that many sequences (128-token prompts, greedy) and
every part of a step is timed: all layers in one native call (the decode plan, kernels/decode_step.cpp, where it
runs; it times its own kernel calls by kind, and `layers_native` is what is left of the call: allocation, views, the
gaps between kernels; --no-decode-plan times the Python layer loop instead, part by part), the layers' matmuls, the lm_head, attention, the fused elementwise ops, the rest of
the forward pass (Python, dispatch, embedding, views: the forward's time minus its timed parts), the runner's batch
build, sampling, the scheduler (schedule + update), the IPC encode of the step's outputs, and the API server's part
(decode the message, detokenize, stop strings: another process when serving, listed apart). The untimed step (no
wrappers) is measured first; the wrappers cost about a microsecond per call, and their sum is checked against it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

PARTS = ("layers_native", "matmul", "lm_head", "attention", "elementwise", "forward_other", "batch_build",
         "runner_other", "sampling", "scheduler", "ipc_encode")


class _Timers:
    def __init__(self):
        self.acc: dict[str, float] = defaultdict(float)

    def wrap(self, fn, part: str):
        acc = self.acc

        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc[part] += time.perf_counter() - t

        return timed


class _TimedCallable:
    """A callable object (the sampler) timed on call, its other attributes passed through."""

    def __init__(self, obj, timers: _Timers, part: str):
        self._obj = obj
        self._call = timers.wrap(obj.__call__, part)

    def __call__(self, *a, **kw):
        return self._call(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._obj, name)


class _TimedPlan:
    """The decode plan's one call timed as `layers_native`; inside it the plan times its own kernel calls by kind
    (DecodePlan.set_profile), booked as matmul, attention and elementwise, so layers_native keeps only the rest:
    tensor allocation, views and the gaps between kernels."""

    def __init__(self, plan, timers: _Timers):
        self._plan = plan
        self._timers = timers
        self._run = timers.wrap(plan.run, "layers_native")
        self._run_steps = timers.wrap(plan.run_steps, "layers_native")
        plan.set_profile(True)
        plan.take_profile()

    def run(self, *a, **kw):
        return self._book(self._run(*a, **kw))

    def run_steps(self, *a, **kw):
        """A run of decode steps (--decode-steps): its output side (embedding, norms, lm_head, argmax) is booked as
        lm_head, and kept apart as _steps_output so forward_other does not count it."""
        return self._book(self._run_steps(*a, **kw))

    def _book(self, out):
        spent = dict(zip(("matmul", "attention", "elementwise", "lm_head"), self._plan.take_profile()))
        acc = self._timers.acc
        for part, s in spent.items():
            acc[part] += s
            acc["layers_native"] -= s
        acc["_steps_output"] += spent["lm_head"]
        return out

    def stop(self) -> None:
        self._plan.set_profile(False)


class _TimedOps:
    """The model's elementwise ops, each call timed as `elementwise`."""

    def __init__(self, ops, timers: _Timers):
        self._ops = ops
        for name in ("rms_norm", "add_rms_norm_", "silu_mul", "rope_tables", "rope_qkv_write_"):
            setattr(self, name, timers.wrap(getattr(ops, name), "elementwise"))


class _TimedAttention:
    def __init__(self, attention, timers: _Timers):
        self._attention = attention
        self.ops = _TimedOps(attention.ops, timers)
        self._call = timers.wrap(attention.__call__, "attention")

    def __call__(self, *a, **kw):
        return self._call(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._attention, name)


def _instrument(core, timers: _Timers):
    """Wrap the parts of one engine core's step; returns a function that undoes it."""
    model, runner = core.model, core.runner
    saved = {"plan": model.decode_plan, "attention": model.attention, "lm_head": model.lm_head, "forward": model.forward,
             "compute_logits": model.compute_logits, "sampler": runner.sampler, "build_batch": runner.build_batch,
             "layers": [(lw.qkv, lw.o, lw.gate_up, lw.down) for lw in model.layers]}
    for lw in model.layers:
        lw.qkv, lw.o, lw.gate_up, lw.down = (timers.wrap(m, "matmul") for m in (lw.qkv, lw.o, lw.gate_up, lw.down))
    model.attention = _TimedAttention(model.attention, timers)
    if model.decode_plan is not None:
        model.decode_plan = _TimedPlan(model.decode_plan, timers)
    model.lm_head = timers.wrap(model.lm_head, "lm_head")
    model.forward = timers.wrap(model.forward, "_forward")
    model.run_decode_steps = timers.wrap(model.run_decode_steps, "_forward")
    model.compute_logits = timers.wrap(model.compute_logits, "_logits")
    runner.sampler = _TimedCallable(runner.sampler, timers, "sampling")
    runner.build_batch = timers.wrap(runner.build_batch, "batch_build")

    def undo():
        if isinstance(model.decode_plan, _TimedPlan):
            model.decode_plan.stop()
        model.attention, model.lm_head, model.decode_plan = saved["attention"], saved["lm_head"], saved["plan"]
        for name in ("forward", "compute_logits", "run_decode_steps"):
            delattr(model, name)  # back to the class's methods
        runner.sampler, runner.build_batch = saved["sampler"], saved["build_batch"]
        for lw, (qkv, o, gate_up, down) in zip(model.layers, saved["layers"]):
            lw.qkv, lw.o, lw.gate_up, lw.down = qkv, o, gate_up, down

    return undo


def run(batch: int, quantization: str, steps: int, prompt_len: int, threads: int, decode_plan: bool = True,
        decode_steps: int = 1) -> dict:
    """`steps` decode steps of `batch` sequences, timed; with decode_steps > 1 in runs of that many (steps /
    decode_steps engine steps, so the contexts, and with them the attention's cost, span the same range)."""
    from kvserve.bench.core_overhead import DecodeHarness
    from kvserve.engine.core import EngineArgs, EngineCore
    from kvserve.sampling import SamplingParams

    core = EngineCore(EngineArgs(max_num_seqs=batch, num_threads=threads, quantization=quantization,
                                 kv_cache_memory_gb=0.5, decode_steps=decode_steps))
    if not decode_plan:
        core.model.decode_plan = None
    harness = DecodeHarness(core, batch, prompt_len, SamplingParams(temperature=0, max_tokens=4096, ignore_eos=True))

    def one_step(timers: _Timers | None) -> dict:
        t = harness.step()
        if t["decode_steps"] != decode_steps:
            raise RuntimeError(f"an engine step took {t['decode_steps']} decode steps, not {decode_steps}")
        row = {"step": t["schedule"] + t["runner"] + t["update"] + t["ipc_encode"],
               "scheduler": t["schedule"] + t["update"], "ipc_encode": t["ipc_encode"], "api_server": t["front_end"],
               "runner": t["runner"]}
        if timers is not None:
            a = timers.acc
            row.update({k: a[k] for k in ("layers_native", "matmul", "lm_head", "attention", "elementwise", "sampling",
                                          "batch_build")})
            row["forward_other"] = (a["_forward"] - a["layers_native"] - a["matmul"] - a["attention"]
                                    - a["elementwise"] - a["_steps_output"])
            row["runner_other"] = t["runner"] - a["_forward"] - a["_logits"] - a["sampling"] - a["batch_build"]
            row["lm_head_other"] = a["_logits"] - (a["lm_head"] - a["_steps_output"])  # the float() of the logits
            a.clear()
        return row

    runs = -(-steps // decode_steps)
    for _ in range(-(-5 // decode_steps)):  # oneDNN builds its kernels for this batch's shapes
        one_step(None)
    plain = [one_step(None)["step"] for _ in range(runs)]
    timers = _Timers()
    undo = _instrument(core, timers)
    try:
        rows = [one_step(timers) for _ in range(runs)]
    finally:
        undo()
    for r in rows:
        r["runner_other"] += r.pop("lm_head_other")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    # each step's parts summed, then the median: comparable with the median step even when a noisy step moves some
    # parts' medians and not others (a sum of medians is not the median of the sums)
    parts_sum = statistics.median(sum(r[k] for k in PARTS) for r in rows)
    return {"batch": batch, "quantization": core.info.quantization, "decode_plan": core.model.decode_plan is not None,
            "threads": threads, "steps": steps, "decode_steps": decode_steps,
            "weight_bytes": core.model.weight_bytes(), "step_ms_untimed": statistics.median(plain) * 1e3,
            "step_ms_timed": med["step"] * 1e3, "parts_sum_ms": parts_sum * 1e3,
            "median_ms": {k: med[k] * 1e3 for k in (*PARTS, "api_server")}}


def markdown(results: list[dict]) -> str:
    def label(r: dict) -> str:
        return f"b={r['batch']} {r['quantization']}" + (f" k={r['decode_steps']}" if r["decode_steps"] > 1 else "")

    head = "| part | " + " | ".join(label(r) for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for part in (*PARTS, "api_server"):
        cells = []
        for r in results:
            ms = r["median_ms"][part]
            cells.append(f"{ms:.3f} ({ms / r['step_ms_timed']:.0%})" if part != "api_server" else f"{ms:.3f}")
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    lines.append("| **step (timed)** | " + " | ".join(f"**{r['step_ms_timed']:.2f}**" for r in results) + " |")
    lines.append("| step (no wrappers) | " + " | ".join(f"{r['step_ms_untimed']:.2f}" for r in results) + " |")
    per_token = (r["step_ms_untimed"] / r["batch"] / r["decode_steps"] for r in results)
    lines.append("| per token, no wrappers | " + " | ".join(f"{ms:.3f}" for ms in per_token) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--quantization", default="none,q8_0", help="comma list of none, q8_0, w8a8")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-decode-plan", action="store_true", help="time the Python layer loop, part by part")
    ap.add_argument("--decode-steps", default="1",
                    help="comma list: decode steps per engine step (EngineArgs.decode_steps; k > 1 rows are runs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = []
    for q in args.quantization.split(","):
        for b in (int(x) for x in args.batches.split(",")):
            for k in (int(x) for x in args.decode_steps.split(",")):
                results.append(run(b, q, args.steps, args.prompt_len, args.threads, not args.no_decode_plan, k))
    print("ms per engine step (share of the timed step; k > 1: a run of k decode steps, its output side booked as "
          "lm_head); api_server runs in another process when serving")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
