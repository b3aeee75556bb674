"""Where an engine-core decode step goes: schedule, runner (batch build + forward + sample), update, and the IPC
encode of the step's outputs, at a fixed number of running sequences. The engine core's own overhead is everything
but the runner; the front end's per-step work (decode the message, detokenize, stop strings) runs in the API server
process and is listed separately.

    python -m kvserve.bench.core_overhead [--batch 64] [--steps 40] [--threads 2] [--prompt-len 128]
                                          [--temperature 0] [--seed S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import msgspec


class DecodeHarness:
    """An engine core and the API server's output processor, `batch` sequences (random `prompt_len`-token prompts)
    prefilled and decoding; `step()` runs one decode step the way the engine-core process and the front end do and
    times its parts. Shared by this script and kvserve.bench.token_cost."""

    def __init__(self, core, batch: int, prompt_len: int, params):
        from kvserve.engine.ipc import Outputs, output_codec
        from kvserve.engine.output_processor import OutputProcessor
        from kvserve.engine.protocol import EngineCoreRequest

        self.core, self.batch = core, batch
        self.front = OutputProcessor(core.tokenizer)
        rng = random.Random(0)
        for i in range(batch):
            ids = [rng.randrange(100, 40_000) for _ in range(prompt_len)]
            core.add_request(EngineCoreRequest(f"r{i}", ids, params, time.monotonic()))
            self.front.add(f"r{i}", None, ids, params, time.monotonic())
        self.codec, self.decoder = output_codec(), msgspec.msgpack.Decoder(Outputs)
        sched = core.scheduler
        while sched.num_waiting or any(r.in_prefill for r in sched.running):  # prefill everything first
            core.step()

    def step(self) -> dict:
        """Seconds per part: schedule, runner, update, ipc_encode, front_end; and frame_bytes."""
        from kvserve.engine.ipc import Outputs
        from kvserve.engine.protocol import StepOutputs

        sched = self.core.scheduler
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        out = self.core.runner.execute(so)
        t2 = time.perf_counter()
        updates = sched.update(so, out)
        t3 = time.perf_counter()
        frame = self.codec.encode(Outputs(1, StepOutputs(updates)))
        t4 = time.perf_counter()
        msg = self.decoder.decode(frame)
        self.front.process(msg.step.updates, msg.step.first_scheduled)
        t5 = time.perf_counter()
        assert len(so.scheduled) == self.batch and all(s.num_real_tokens == 1 for s in so.scheduled)
        return {"schedule": t1 - t0, "runner": t2 - t1, "update": t3 - t2, "ipc_encode": t4 - t3,
                "front_end": t5 - t4, "frame_bytes": len(frame), "decode_steps": so.scheduled[0].decode_steps}


def run(batch: int, steps: int, prompt_len: int, threads: int | None, dtype: str, temperature: float,
        seed: int | None) -> dict:
    from kvserve.engine.core import EngineArgs, EngineCore
    from kvserve.sampling import SamplingParams

    core = EngineCore(EngineArgs(dtype=dtype, max_num_seqs=batch, max_num_batched_tokens=2048, num_threads=threads))
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=4096, ignore_eos=True)
    harness = DecodeHarness(core, batch, prompt_len, params)
    for _ in range(5):  # warm oneDNN's kernels for this shape
        harness.step()
    rows = [harness.step() for _ in range(steps)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    step = med["schedule"] + med["runner"] + med["update"] + med["ipc_encode"]
    overhead = med["schedule"] + med["update"] + med["ipc_encode"]
    return {"batch": batch, "steps": steps, "prompt_len": prompt_len, "dtype": dtype, "threads": threads,
            "temperature": temperature, "seed": seed,
            "median_ms": {k: v * 1e3 for k, v in med.items() if k not in ("frame_bytes", "decode_steps")},
            "frame_bytes": med["frame_bytes"], "core_step_ms": step * 1e3,
            "core_overhead_fraction": overhead / step}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the serving benchmark samples")
    ap.add_argument("--seed", type=int, default=None, help="per-request seeded sampling (a generator per row)")
    ap.add_argument("--json", default=None, help="write the result here too")
    args = ap.parse_args(argv)
    res = run(args.batch, args.steps, args.prompt_len, args.threads, args.dtype, args.temperature, args.seed)
    m = res["median_ms"]
    print(f"decode step at {res['batch']} running sequences ({res['dtype']}, {res['threads']} threads, temperature "
          f"{res['temperature']}, seed {res['seed']}), median of {res['steps']} steps:")
    print("| part | ms | share of the core's step |")
    print("| --- | ---: | ---: |")
    for k in ("schedule", "runner", "update", "ipc_encode"):
        print(f"| {k} | {m[k]:.3f} | {m[k] / res['core_step_ms']:.1%} |")
    print(f"| engine core step | {res['core_step_ms']:.3f} | 100% |")
    print(f"| (API server: decode + detokenize + stop strings) | {m['front_end']:.3f} | other process |")
    print(f"outside the forward pass (schedule + update + IPC): {res['core_overhead_fraction']:.1%}; "
          f"message {res['frame_bytes']:.0f} bytes per step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
