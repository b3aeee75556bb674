"""`kvserve bench plan`: a goodput planner (issue 15, part 4; docs/scaleout.md).

A discrete-event simulation that runs kvserve's own scheduler (the pure-Python brain: admission, chunked prefill,
prefix caching, preemption) against a virtual clock, advanced per step by a cost model fitted to this machine's
measured step times. It predicts TTFT / TPOT percentiles and SLO goodput of a workload for a layout: colocated
replicas, or prefill and decode instances (DistServe's split) joined by a KV transfer of known bandwidth.

    kvserve bench plan measure --threads 1 --out cost-1.json        # fit the step-cost model (alone on the machine)
    kvserve bench plan measure --threads 1 --served 0.3 --seed 1 --out cost-1.json   # ... to a served engine's steps
    kvserve bench plan validate --cost cost-1.json --request-rate 0.6 --runs 3 --out val-1.json   # real server vs prediction
    #   (the runs' medians compared; --self-check: also simulate each run with its own traced step costs)
    kvserve bench plan recommend --cost cost-1.json --cost cost-2.json --cores 8,32,128 --out plan.json

The step cost is linear in a step's features (one scheduler output): a constant (the weights read once a step),
the tokens of a step that holds a prefill chunk (all of them go through the GEMMs; a decode-only step runs the
small-batch kernels instead), decoding sequences (their per-sequence work and sampling), the decode context read
(KV bytes), and the prefill attention work (sum over chunks of chunk x (start + chunk / 2)). Thread counts beyond the measured ones (1 and 2 here) are
extrapolated with Amdahl's law per coefficient, and memory-bandwidth limits are not modelled: recommendations for
8, 32 and 128 cores are labelled as extrapolations.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

from kvserve.bench import elapsed_log, free_port, write_json
from kvserve.core.step_trace import BASE, step_features

# what a step is measured by (step_features), and the model's terms (expand): the decode sequences enter piecewise,
# because a decode-only step's cost is concave in its batch (the weights are read once; the first rows are cheap)
FEATURES = ("step", "gemm_tokens", "decode_seqs_first8", "decode_seqs_beyond8", "decode_context_k",
            "prefill_attention_m")


def expand(base: list[float]) -> list[float]:
    d = base[2]
    return [base[0], base[1], min(d, 8.0), max(d - 8.0, 0.0), base[3], base[4]]
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2-135M in bf16: layers x (K, V) x KV heads x head dim x bytes


# ---------------------------------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class CostModel:
    threads: int
    coef: tuple[float, ...]  # seconds per unit of each of FEATURES
    fit: dict = field(default_factory=dict)  # fit quality: steps, median relative error, r2

    def seconds(self, base: list[float]) -> float:
        """A step's seconds from its measured features (BASE)."""
        return max(sum(c * f for c, f in zip(self.coef, expand(base))), 1e-4)

    def at_threads(self, other: "CostModel", threads: int) -> "CostModel":
        """Amdahl per coefficient from two measured thread counts (self: fewer): w(t) = s + p / t."""
        t1, t2 = self.threads, other.threads
        coef = []
        for w1, w2 in zip(self.coef, other.coef):
            # w1 = s + p / t1, w2 = s + p / t2
            p = (w1 - w2) / (1 / t1 - 1 / t2) if t1 != t2 else 0.0
            p = max(p, 0.0)
            s = max(w1 - p / t1, 0.0)
            coef.append(s + p / threads)
        return CostModel(threads, tuple(coef), {"extrapolated_from": [t1, t2]})

    @staticmethod
    def load(path: str) -> "CostModel":
        d = json.load(open(path))
        return CostModel(d["threads"], tuple(d["coef"]), d.get("fit", {}))


def fit_cost(rows: list[tuple[list[float], float]], threads: int) -> CostModel:
    """Least squares on (BASE features, seconds), then again without the steps more than 4 MADs off (first-use
    kernel builds, a noisy neighbour)."""
    import numpy as np

    X = np.array([expand(r[0]) for r in rows])
    y = np.array([r[1] for r in rows])
    keep = np.ones(len(y), dtype=bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(X[keep], y[keep], rcond=None)
        res = y - X @ coef
        mad = np.median(np.abs(res[keep] - np.median(res[keep]))) + 1e-9
        keep = np.abs(res - np.median(res[keep])) < 4 * 1.4826 * mad
    coef = np.maximum(coef, 0.0)
    pred = np.maximum(X @ coef, 1e-4)
    rel = np.abs(pred[keep] - y[keep]) / y[keep]
    ss = float(((y[keep] - y[keep].mean()) ** 2).sum())
    r2 = 1 - float(((pred[keep] - y[keep]) ** 2).sum()) / ss if ss else 1.0
    return CostModel(threads, tuple(float(c) for c in coef),
                     {"steps": int(len(y)), "kept": int(keep.sum()), "median_rel_error": float(np.median(rel)),
                      "p90_rel_error": float(np.percentile(rel, 90)), "r2": r2})


def measure(threads: int, dtype: str, num_requests: int, seed: int, log) -> CostModel:
    """Runs a mixed workload (sharegpt-like prompts arriving while others decode, up to 64 running) through the real
    engine in this process and fits the step-cost model to each step's time."""
    import torch

    from kvserve.bench import workloads as W
    from kvserve.engine.core import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine
    from kvserve.sampling import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine(EngineArgs(dtype=dtype, num_threads=threads, max_num_batched_tokens=512, max_num_seqs=128,
                                  kv_cache_memory_gb=2.0))
    tok = engine.tokenizer
    reqs = W.generate("sharegpt-like", tok, num_requests, seed, max_output=256)
    prompts = [tok.encode("\n\n".join(m["content"] for m in r.messages)) for r in reqs]
    sched = engine.core.scheduler
    outs: list = []
    original = sched.schedule

    def recording():
        so = original()
        outs.append(so)
        return so

    sched.schedule = recording  # a benchmark's probe: the features of each step
    rng = random.Random(seed)
    rows: list[tuple[list[float], float]] = []
    pending = list(range(len(reqs)))
    started = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        # keep the running set between 1 and 64 and add prompts at random moments: every mix of chunks and decodes
        while pending and (not engine.has_unfinished_requests() or
                           (sched.num_running + sched.num_waiting < 64 and rng.random() < 0.25)):
            i = pending.pop(0)
            engine.add_request(f"m{i}", {"prompt_token_ids": prompts[i]},
                               SamplingParams(temperature=0, max_tokens=reqs[i].max_tokens, ignore_eos=True))
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        if outs and outs[-1].scheduled:
            rows.append((step_features(outs[-1])[0], dt))
        outs.clear()
    sched.schedule = original
    engine.close()
    warm = rows[20:]  # the first steps build kernels per shape
    model = fit_cost(warm, threads)
    log(f"measured {len(rows)} steps at {threads} thread(s) in {time.perf_counter() - started:.0f}s: "
        f"coef {dict(zip(FEATURES, (round(c, 6) for c in model.coef)))}, fit {model.fit}")
    model.fit["rows"] = [[round(x, 6) for x in f] + [round(t, 6)] for f, t in rows]
    return model


# ---------------------------------------------------------------------------------------------------- simulation
@dataclass
class SimRequest:
    request_id: str
    arrival: float
    prompt: list[int]
    max_tokens: int


@dataclass
class SimResult:
    request_id: str
    send: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first - self.send

    @property
    def tpot(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass(frozen=True)
class InstanceConfig:
    """What the simulated instance runs with: `kvserve serve`'s defaults."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    num_blocks: int = 5000  # 2 GiB of bf16 KV for the embedded model (the CLI default) is ~5,800 blocks
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True


class SimInstance:
    """One engine: the real scheduler, a virtual clock, step times from the cost model."""

    def __init__(self, cost: CostModel, cfg: InstanceConfig, transfer_gbps: float = 0.0):
        from kvserve.config import SchedulerConfig
        from kvserve.core.kv_cache_manager import KVCacheManager
        from kvserve.core.scheduler import Scheduler

        self.cost, self.cfg = cost, cfg
        self.clock = 0.0
        self.sched = Scheduler(SchedulerConfig(cfg.max_num_batched_tokens, cfg.max_num_seqs, 8192,
                                               cfg.enable_chunked_prefill),
                               KVCacheManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching),
                               clock=lambda: self.clock)
        self.transfer_gbps = transfer_gbps
        self.loaded: set[str] = set()  # requests whose prompt KV arrives by transfer (P/D decode side)
        self.busy_until = 0.0
        self.outstanding = 0

    def add(self, r: SimRequest, loaded: bool = False) -> None:
        from kvserve.core.request import Request
        from kvserve.sampling import SamplingParams

        self.sched.add_request(Request(r.request_id, list(r.prompt), SamplingParams(
            temperature=0, max_tokens=r.max_tokens, ignore_eos=True), self.cfg.block_size,
            arrival_time=self.clock, max_model_len=8192))
        if loaded:
            self.loaded.add(r.request_id)
        self.outstanding += 1

    def step(self) -> tuple[float, list]:
        """One step at the current clock: (its duration, the RequestUpdates)."""
        from kvserve.core.outputs import ModelOutput

        so = self.sched.schedule()
        if not so.scheduled:  # nothing could run (cannot happen without a KV store): let time pass
            self.sched.update(so, ModelOutput())
            return 1e-3, []
        feats, moved = step_features(so, frozenset(self.loaded))
        dt = self.cost.seconds(feats) if feats[1] or feats[2] else 0.0
        if moved and self.transfer_gbps:
            dt += moved * KV_BYTES_PER_TOKEN / (self.transfer_gbps * 1e9)
        out = ModelOutput(sampled={s.request.request_id: [100 + s.request.num_tokens % 50]
                                   for s in so.scheduled if s.sample})
        updates = self.sched.update(so, out)
        for u in updates:
            if u.finish_reason is not None:
                self.outstanding -= 1
                self.loaded.discard(u.request_id)
        return max(dt, 1e-4), updates


def simulate(requests: list[SimRequest], instances: list[SimInstance], max_concurrency: int | None = None,
             decode: list[SimInstance] | None = None) -> dict[str, SimResult]:
    """Event loop over several instances (each steps on its own clock); new requests go to the instance with the
    fewest outstanding requests. With `decode` instances, `instances` are prefill instances: a request's first token
    comes from its prefill instance, then its prompt KV moves (the decode instance's transfer bandwidth) and the
    decode instance makes the rest."""
    results: dict[str, SimResult] = {}
    queue = sorted(requests, key=lambda r: r.arrival)
    waiting_slot: list[SimRequest] = []
    in_flight = 0
    events: list[tuple[float, int, int, str]] = []  # (time, order, kind, payload): kind 0 = arrival
    order = 0
    for r in queue:
        heapq.heappush(events, (r.arrival, order, 0, r.request_id))
        order += 1
    by_id = {r.request_id: r for r in requests}
    all_inst = instances + (decode or [])
    handoff: dict[str, SimRequest] = {}

    # instances with work, by clock: (clock, tie-break, index); an instance is in it at most once
    ready: list[tuple[float, int, int]] = []
    queued: set[int] = set()
    index = {id(x): k for k, x in enumerate(all_inst)}

    def wake(inst: SimInstance, now: float) -> None:
        """`inst` got a request: an idle instance's clock jumps to now (it waited), and it joins the ready heap."""
        nonlocal order
        k = index[id(inst)]
        if k not in queued:
            inst.clock = max(inst.clock, now)
            heapq.heappush(ready, (inst.clock, order, k))
            order += 1
            queued.add(k)

    def dispatch(r: SimRequest, now: float) -> None:
        inst = min(instances, key=lambda x: x.outstanding)
        wake(inst, now)
        results[r.request_id] = SimResult(r.request_id, send=now)
        prefill_only = decode is not None
        inst.add(SimRequest(r.request_id, r.arrival, r.prompt, 1 if prefill_only else r.max_tokens))

    now = 0.0
    while events or ready:
        # the next thing to happen: an arrival, or the step of the instance whose clock is earliest (a heap: the
        # loop costs O(log instances) per step, so 128-core layouts simulate in seconds)
        next_step = ready[0][0] if ready else math.inf
        if events and events[0][0] <= next_step:
            t, _, kind, rid = heapq.heappop(events)
            now = t
            if kind == 0:
                r = by_id[rid]
                if max_concurrency and in_flight >= max_concurrency:
                    waiting_slot.append(r)
                    continue
                in_flight += 1
                dispatch(r, now)
            else:  # a prefilled request's KV reaches a decode instance
                r = handoff.pop(rid)
                inst = min(decode, key=lambda x: x.outstanding)
                wake(inst, now)
                inst.add(r, loaded=True)
            continue
        _, _, k = heapq.heappop(ready)
        queued.discard(k)
        inst = all_inst[k]
        dt, updates = inst.step()
        inst.clock += dt
        now = inst.clock
        if inst.sched.has_unfinished_requests():
            heapq.heappush(ready, (inst.clock, order, k))
            order += 1
            queued.add(k)
        for u in updates:
            res = results[u.request_id]
            if u.new_token_ids:
                if res.first is None:
                    res.first = inst.clock
                res.tokens += len(u.new_token_ids)
                res.last = inst.clock
            if u.finish_reason is not None:
                r = by_id[u.request_id]
                if decode is not None and inst in instances and r.max_tokens > 1:
                    # its prompt KV (computed prompt + the first token) goes to a decode instance
                    handoff[r.request_id] = SimRequest(r.request_id, r.arrival, r.prompt + [100], r.max_tokens - 1)
                    heapq.heappush(events, (inst.clock, order, 1, r.request_id))
                    order += 1
                    continue
                in_flight -= 1
                if waiting_slot:
                    nxt = waiting_slot.pop(0)
                    in_flight += 1
                    dispatch(nxt, inst.clock)
    return results


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.array(values) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def summarize(results: dict[str, SimResult], slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
    done = [r for r in results.values() if r.first is not None]
    ttft = [r.ttft for r in done]
    tpot = [r.tpot for r in done if r.tpot is not None]
    good = sum(1 for r in done if r.ttft * 1e3 <= slo_ttft_ms and (r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms))
    span = max((r.last for r in done), default=0.0) - min((r.send for r in done), default=0.0)
    return {"requests": len(done), "ttft_ms": percentiles(ttft), "tpot_ms": percentiles(tpot),
            "slo_attainment": good / len(done) if done else 0.0,
            "goodput_rps": good / span if span > 0 else 0.0, "duration_s": span}


# ---------------------------------------------------------------------------------------------------- workloads
def sim_requests(workload: str, params: list[str], num_requests: int, seed: int, rate: float, burstiness: float,
                 tok) -> list[SimRequest]:
    """The requests `kvserve bench serve --endpoint completions` sends for the same arguments: the same texts (the
    completions prompt joins the messages), the same arrival times (its generator, its seed)."""
    from kvserve.bench import workloads as W
    from kvserve.bench.serve import arrival_offsets

    reqs = W.generate(workload, tok, num_requests, seed, **W.parse_params(workload, params))
    if any(r.conversation is not None for r in reqs):
        raise ValueError("the planner replays independent requests; multi-turn conversations are not supported")
    rng = random.Random(seed + 1_000_003)
    fixed = all(r.arrival is not None for r in reqs)
    offsets = [r.arrival for r in reqs] if fixed else arrival_offsets(len(reqs), rate, burstiness, rng)
    return [SimRequest(r.request_id, arrival=off, prompt=tok.encode("\n\n".join(m["content"] for m in r.messages)),
                       max_tokens=r.max_tokens) for r, off in zip(reqs, offsets)]


# ---------------------------------------------------------------------------------------------------- commands
def cmd_measure(args, log) -> dict:
    if args.served is None:
        model = measure(args.threads, args.dtype, args.num_requests, args.seed, log)
        rows = model.fit.pop("rows")
        return {"threads": model.threads, "coef": list(model.coef), "features": list(FEATURES), "fit": model.fit,
                "dtype": args.dtype, "source": "offline", "steps": rows}
    return measure_served(args, log)


def measure_served(args, log) -> dict:
    """The step-cost model fitted to a served engine's own steps (`kvserve serve --step-trace`) under a workload at
    `--served RATE`: the cycle of the engine loop as it runs beside the API server, its messaging included. Use
    another seed than the validation's, so the model is not fitted to the run it predicts."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        trace = os.path.join(d, "steps.jsonl")
        t = time.perf_counter()
        summary = served_run(args.threads, args.dtype, args.workload, args.workload_arg, args.num_requests,
                             args.seed, args.served, args.slo_ttft_ms, args.slo_tpot_ms, step_trace=trace)
        with open(trace) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    rows = [(x["base"], x["cycle_s"]) for x in lines]
    model = fit_cost(rows, args.threads)
    log(f"served {summary['completed']} requests at {args.served} req/s, {len(rows)} busy steps traced in "
        f"{time.perf_counter() - t:.0f}s: coef {dict(zip(FEATURES, (round(c, 6) for c in model.coef)))}, "
        f"fit {model.fit}")
    return {"threads": model.threads, "coef": list(model.coef), "features": list(FEATURES), "fit": model.fit,
            "dtype": args.dtype, "source": f"served: {args.workload} at {args.served} req/s, seed {args.seed}",
            "steps": [[round(v, 6) for v in f] + [round(c, 6)] for f, c in rows]}


def cmd_refit(args, log) -> dict:
    """The model fitted again to the steps that one or more `measure` runs saved: after a change of the model's terms,
    or to join traces that cover different batch ranges (a served run at a low rate and one at a high rate). Each
    file's first 20 steps are left out (warm-up)."""
    files = [json.load(open(p)) for p in args.steps]
    threads = {d["threads"] for d in files}
    if len(threads) != 1:
        raise SystemExit(f"refit joins steps at one thread count only, got {sorted(threads)}")
    rows = [(r[:len(BASE)], r[len(BASE)]) for d in files for r in d["steps"][20:]]
    model = fit_cost(rows, files[0]["threads"])
    log(f"refit {len(rows)} steps from {len(files)} file(s) at {model.threads} thread(s): coef "
        f"{dict(zip(FEATURES, (round(c, 6) for c in model.coef)))}, fit {model.fit}")
    source = " + ".join(d.get("source", "offline") for d in files)
    return {**files[0], "coef": list(model.coef), "features": list(FEATURES), "fit": model.fit, "source": source,
            "steps": [r for d in files for r in d["steps"]]}


def served_run(threads: int, dtype: str, workload: str, workload_args: list[str], num_requests: int, seed: int,
               rate: float, slo_ttft_ms: float, slo_tpot_ms: float, step_trace: str | None = None) -> dict:
    """`kvserve bench serve` against a fresh `kvserve serve --num-threads T` (a short warm-up run first, for the
    kernels' shapes); its summary. With `step_trace`, the server traces its steps there, from after the warm-up."""
    import subprocess
    import tempfile

    import httpx

    wargs = [x for p in workload_args for x in ("-W", p)]
    port = free_port()
    env = dict(os.environ, KVSERVE_NO_TQDM="1")
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--num-threads", str(threads),
           "--dtype", dtype, "--log-level", "warning", "--no-access-log"]
    if step_trace is not None:
        cmd += ["--step-trace", step_trace]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            time.sleep(0.5)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "real.json")
            subprocess.run([sys.executable, "-m", "kvserve.bench", "serve", "--base-url", url, "--workload",
                            workload, *wargs, "--num-requests", "8", "--seed", str(seed + 99),
                            "--request-rate", "inf", "--no-progress"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            if step_trace is not None:
                time.sleep(1.0)  # the warm-up's last steps are written ...
                open(step_trace, "w").close()  # ... and dropped (the core appends)
            subprocess.run([sys.executable, "-m", "kvserve.bench", "serve", "--base-url", url, "--workload",
                            workload, *wargs, "--num-requests", str(num_requests), "--seed", str(seed),
                            "--request-rate", str(rate), "--no-progress", "--slo-ttft-ms", str(slo_ttft_ms),
                            "--slo-tpot-ms", str(slo_tpot_ms), "--out", out], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            return json.load(open(out))["summary"]
    finally:
        server.terminate()
        server.wait(60)


def cmd_validate(args, log) -> dict:
    """The same workload through a real `kvserve serve --num-threads T` and through the simulator."""
    import tempfile

    from kvserve.bench.workloads import load_tokenizer

    cost = CostModel.load(args.cost)
    tok = load_tokenizer()
    reqs = sim_requests(args.workload, args.workload_arg, args.num_requests, args.seed, args.request_rate,
                        1.0, tok)
    t = time.perf_counter()
    pred = summarize(simulate(reqs, [SimInstance(cost, InstanceConfig())]), args.slo_ttft_ms, args.slo_tpot_ms)
    log(f"simulated {len(reqs)} requests in {time.perf_counter() - t:.1f}s: TTFT {pred['ttft_ms']}, "
        f"TPOT {pred['tpot_ms']}")
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    runs: list[dict] = []
    for path in args.measured_from or []:  # real runs of earlier validations with the same workload, seed and rate
        prev = json.load(open(path))
        if (prev["workload"], prev["request_rate"], prev["threads"]) != (args.workload, args.request_rate,
                                                                         cost.threads):
            raise SystemExit(f"--measured-from {path} holds another workload, rate or thread count")
        runs += prev.get("runs") or [prev["measured"]]
    self_checks: list[dict] = []
    for _ in range(args.runs if not args.measured_from else 0):
        with tempfile.TemporaryDirectory() as d:
            trace = os.path.join(d, "steps.jsonl") if args.self_check else None
            real = served_run(cost.threads, args.dtype, args.workload, args.workload_arg, args.num_requests,
                              args.seed, args.request_rate, args.slo_ttft_ms, args.slo_tpot_ms, step_trace=trace)
            run = {"ttft_ms": {q: real[f"{q}_ttft_ms"] for q in ("p50", "p90", "p99")},
                   "tpot_ms": {q: real[f"{q}_tpot_ms"] for q in ("p50", "p90", "p99")},
                   "slo_attainment": real["good_requests"] / real["completed"] if real["completed"] else 0.0}
            runs.append(run)
            log(f"real run {len(runs)}: TTFT {run['ttft_ms']}, TPOT {run['tpot_ms']}")
            if trace is not None:
                self_checks.append(_self_check(trace, cost, reqs, run, args, log))
    out = _compare(pred, runs, cost, args, log, reused=args.measured_from)
    if self_checks:
        out["self_checks"] = self_checks
    return out


def _self_check(trace: str, cost: CostModel, reqs, run: dict, args, log) -> dict:
    """The simulator fed the run's own step costs: a model fitted to the steps this very run traced (not a
    prediction; a diagnostic). Its error against the run is the simulator's and the fit's own; what the real
    prediction misses beyond it is the host's speed between the cost traces and the run."""
    with open(trace) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    rows = [(x["base"], x["cycle_s"]) for x in lines][20:]  # the first steps are warm-up, as refit drops them
    own = fit_cost(rows, cost.threads)
    sim = summarize(simulate(reqs, [SimInstance(own, InstanceConfig())]), args.slo_ttft_ms, args.slo_tpot_ms)
    err = relative_errors(sim, run)
    log(f"  self-check (the run's own {len(rows)} steps, fit {own.fit}): TTFT {sim['ttft_ms']}, TPOT "
        f"{sim['tpot_ms']}; errors { {k: round(v, 3) for k, v in err.items()} }")
    return {"steps": len(rows), "coef": list(own.coef), "fit": own.fit, "simulated": sim, "relative_error": err,
            "within_bars": within_bars(err)}


def median_of_runs(runs: list[dict]) -> dict:
    """Each figure's median over real runs of one seeded workload: the host's run-to-run spread on identical input
    (18% in TPOT p50 ten minutes apart, docs/benchmarks.md) is the size of the bar, so one run is one noisy sample."""
    return {m: {q: statistics.median(r[m][q] for r in runs) for q in ("p50", "p90", "p99")}
            for m in ("ttft_ms", "tpot_ms")} | {"slo_attainment": statistics.median(r["slo_attainment"] for r in runs)}


def relative_errors(pred: dict, measured: dict) -> dict[str, float]:
    return {f"{m}_{q}": (pred[m][q] - measured[m][q]) / measured[m][q]
            for m in ("ttft_ms", "tpot_ms") for q in ("p50", "p99") if measured[m][q]}


def within_bars(err: dict[str, float]) -> bool:
    return all(abs(err[k]) <= (0.20 if k.endswith("p50") else 0.35) for k in err)


def _compare(pred: dict, runs: list[dict], cost: CostModel, args, log, reused: list[str] | None = None) -> dict:
    measured = median_of_runs(runs)
    err = relative_errors(pred, measured)
    ok = within_bars(err)
    per_run = [relative_errors(pred, r) for r in runs]
    log(f"measured ({'median of ' if len(runs) > 1 else ''}{len(runs)} run{'s' if len(runs) > 1 else ''}) TTFT "
        f"{measured['ttft_ms']}, TPOT {measured['tpot_ms']}; relative errors "
        f"{ {k: round(v, 3) for k, v in err.items()} } -> {'within' if ok else 'NOT within'} 20% (p50) / 35% (p99)")
    if len(runs) > 1:
        log("single runs within the bars: " + ", ".join("yes" if within_bars(e) else "no" for e in per_run))
    return {"threads": cost.threads, "predicted": pred, "measured": measured, "relative_error": err,
            "within_bars": ok, "runs": runs, "relative_error_per_run": per_run,
            "within_bars_per_run": [within_bars(e) for e in per_run], "workload": args.workload,
            "request_rate": args.request_rate, "measured_from": reused}


def layouts(cores: int) -> list[dict]:
    """Colocated replicas of t threads; prefill/decode splits with a quarter or half of the cores prefilling."""
    out = []
    for t in (1, 2, 4, 8, 16):
        if t <= cores and cores % t == 0:
            out.append({"kind": "colocated", "replicas": cores // t, "threads": t})
    for t in (1, 2, 4, 8):
        n = cores // t
        for share in (4, 2):
            p = n // share
            if p >= 1 and n - p >= 1 and cores % t == 0:
                out.append({"kind": "pd", "prefill": p, "decode": n - p, "threads": t})
    return out


def cmd_recommend(args, log) -> dict:
    from kvserve.bench.workloads import load_tokenizer

    costs = sorted((CostModel.load(p) for p in args.cost), key=lambda c: c.threads)
    if len(costs) < 2:
        raise SystemExit("recommend needs cost models at two thread counts (--cost A --cost B)")
    tok = load_tokenizer()
    out = {"note": "extrapolations: step costs beyond the measured thread counts follow Amdahl's law per "
                   "coefficient, memory bandwidth and cross-socket effects are not modelled",
           "measured_threads": [c.threads for c in costs], "by_cores": {}}
    for cores in [int(c) for c in args.cores.split(",")]:
        rate = args.rate_per_core * cores
        reqs = sim_requests(args.workload, args.workload_arg, int(args.requests_per_core * cores), args.seed, rate,
                            1.0, tok)
        rows = []
        for lay in layouts(cores):
            t = lay["threads"]
            cost = next((c for c in costs if c.threads == t), None) or costs[0].at_threads(costs[-1], t)
            if lay["kind"] == "colocated":
                res = simulate(reqs, [SimInstance(cost, InstanceConfig()) for _ in range(lay["replicas"])])
            else:
                res = simulate(reqs, [SimInstance(cost, InstanceConfig()) for _ in range(lay["prefill"])],
                               decode=[SimInstance(cost, InstanceConfig(), args.transfer_gbps)
                                       for _ in range(lay["decode"])])
            s = summarize(res, args.slo_ttft_ms, args.slo_tpot_ms)
            rows.append({**lay, **s})
            log(f"{cores:4d} cores, {rate:6.1f} req/s: {lay} -> SLO {100 * s['slo_attainment']:.0f}%, goodput "
                f"{s['goodput_rps']:.2f} req/s, TTFT p50/p99 {s['ttft_ms']['p50']:.0f}/{s['ttft_ms']['p99']:.0f} ms, "
                f"TPOT p50/p99 {s['tpot_ms']['p50'] or 0:.0f}/{s['tpot_ms']['p99'] or 0:.0f} ms")
        best = max(rows, key=lambda r: (r["goodput_rps"], -r["ttft_ms"]["p99"]))
        out["by_cores"][str(cores)] = {"request_rate": rate, "layouts": rows, "best": best}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvserve bench plan", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--num-requests", type=int, default=160)
    m.add_argument("--served", type=float, default=None, metavar="RATE",
                   help="fit to a served engine's traced steps under the workload at RATE requests/s (instead of "
                        "the in-process engine's)")
    for p in (m,):
        p.add_argument("--dtype", default="bfloat16")
    f = sub.add_parser("refit")
    f.add_argument("steps", nargs="+", help="measure runs' JSON files (their saved steps), at one thread count")
    v = sub.add_parser("validate")
    r = sub.add_parser("recommend")
    for p in (m, v, r):
        p.add_argument("--workload", default="sharegpt-like")
        p.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE")
        p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
        p.add_argument("--slo-tpot-ms", type=float, default=200.0)
    v.add_argument("--cost", required=True)
    v.add_argument("--dtype", default="bfloat16")
    v.add_argument("--num-requests", type=int, default=120)
    v.add_argument("--request-rate", type=float, required=True)
    v.add_argument("--runs", type=int, default=1,
                   help="real runs of the workload (fresh server each); the figures compared are their medians")
    v.add_argument("--self-check", action="store_true",
                   help="also trace each real run's steps and simulate it with a model fitted to them (a diagnostic "
                        "that separates the simulator's error from the host's speed drift)")
    v.add_argument("--measured-from", nargs="+", default=None, metavar="JSON",
                   help="compare with the real runs of these earlier validations (their medians) instead of running "
                        "the server again")
    r.add_argument("--cost", action="append", required=True)
    r.add_argument("--cores", default="8,32,128")
    r.add_argument("--rate-per-core", type=float, default=0.5)
    r.add_argument("--requests-per-core", type=float, default=60)
    r.add_argument("--transfer-gbps", type=float, default=5.0,
                   help="KV transfer bandwidth between a prefill and a decode instance (GB/s)")
    for p in (m, v, r, f):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    log = elapsed_log()

    result = {"measure": cmd_measure, "validate": cmd_validate, "recommend": cmd_recommend,
              "refit": cmd_refit}[args.command](args, log)
    result["command"] = "kvserve bench plan " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.out:
        write_json(args.out, result)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
