"""Scheduling benchmarks on a live `kvserve serve` (issue 13's bars).

Scenarios (each starts its own server per configuration on 127.0.0.1, `--max-num-seqs 16` so the engine is the
bottleneck, requests with ignore_eos):
- `demand`: tenant A closed-loop at 32 concurrent requests, tenant B open-loop (Poisson) at a rate that alone
  would use about a third of the engine (calibrated from A's service rate in the same run), equal weights; under
  fcfs and vtc: B's share of the service, B's demand, and B's TTFT.
- `weights`: A and B both closed-loop (backlogged), weights 3:1, vtc: the split of the service.
- `priority`: one closed loop at 32 concurrent in which 10% of requests carry priority -1 (the rest 0); under
  fcfs and priority: TTFT of the high-priority requests.
- `agents`: multi-turn conversations (8-16 turns, 2-10 s tool pauses) plus background sharegpt-like traffic, a KV
  pool (--kv-gb) too small for every idle conversation: TTFT of turns 2+ and throughput with and without KV pins.
- `swap`: sharegpt-like with a KV pool a fraction of the working set: p99 TTFT and ITL with swap-or-recompute
  preemption (auto) against recompute only, and the per-victim choices from the server log.

Service is measured the way VTC charges it (prompt tokens computed + 2 x output tokens, from the server's
per-tenant counters on /metrics) over the measured window (after a warm-up). Results go to --out as JSON.

    python -m kvserve.bench.scheduling --scenario demand --duration 120 --out docs/results/scheduling/demand.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvserve.bench import metrics as M
from kvserve.bench import workloads as W
from kvserve.bench.baselines import REPO_ROOT, stop, wait_healthy
from kvserve.bench.serve import Client
from kvserve.server.tenants import hash_key

KEYS = {"A": "bench-tenant-a-key", "B": "bench-tenant-b-key"}
VTC_OUTPUT_WEIGHT = 2


def log(msg: str) -> None:
    print(f"[bench scheduling] {msg}", file=sys.stderr, flush=True)


def tenants_file(weights: dict[str, float], directory: str) -> str:
    path = os.path.join(directory, "tenants.toml")
    with open(path, "w") as f:
        for name, key in KEYS.items():
            f.write(f'[tenants.{name}]\napi_keys = ["{hash_key(key)}"]\nweight = {weights.get(name, 1.0)}\n\n')
    return path


def start_server(args, policy: str, tenants: str | None, port: int, log_path: str,
                 extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--scheduling-policy", policy, "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-memory-gb", str(args.kv_gb), "--no-access-log", "--log-level", "warning",
           "--request-timeout", "0", "--max-queued-requests", "1024", "--enable-prompt-tokens-details",
           "--quantization", "none", *extra]  # bf16, as every scheduling figure so far
    if tenants:
        cmd += ["--tenants", tenants]
    env = dict(os.environ, KVSERVE_NO_TQDM="1", OMP_NUM_THREADS=str(args.threads))
    log(f"{policy}: " + " ".join(cmd[2:]))
    with open(log_path, "w") as lf:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=lf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{port}", proc, 300)
    return proc


async def tenant_service(client: Client) -> dict[str, float]:
    """Per-tenant service in VTC units (prompt tokens computed + 2 x output tokens) from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.http.get(f"{client.base_url}/metrics", headers=client.headers)
    r.raise_for_status()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            t = s.labels.get("tenant")
            if s.name == "kvserve:tenant_prompt_tokens_computed_total":
                out[t] = out.get(t, 0.0) + s.value
            elif s.name == "kvserve:tenant_generation_tokens_total":
                out[t] = out.get(t, 0.0) + VTC_OUTPUT_WEIGHT * s.value
    return out


class Load:
    """Closed and open loops of streaming chat requests for one tenant; records what each request saw."""

    def __init__(self, url: str, tenant: str, requests: list[W.BenchRequest], model: str):
        self.client = Client(url, KEYS[tenant], timeout=3600)
        self.tenant, self.requests, self.model = tenant, requests, model
        self.records: list[tuple[M.RequestRecord, int]] = []  # (record, priority)
        self._next = 0
        self.t0 = 0.0

    def _take(self) -> W.BenchRequest:
        r = self.requests[self._next % len(self.requests)]
        self._next += 1
        return r

    async def one(self, req: W.BenchRequest, priority: int = 0) -> None:
        body = {"model": self.model, "messages": req.messages, "max_tokens": req.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if priority:
            body["priority"] = priority
        rec = M.RequestRecord(f"{self.tenant}-{self._next}", send_time=0.0, max_tokens=req.max_tokens,
                              group=self.tenant)
        self.records.append((rec, priority))
        await self.client.stream("chat", body, rec, self.t0)

    async def closed(self, concurrency: int, until: float, high_priority_frac: float = 0.0, seed: int = 0):
        rng = random.Random(seed)

        async def worker():
            while time.perf_counter() < until:
                await self.one(self._take(), -1 if rng.random() < high_priority_frac else 0)
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    async def open(self, rate: float, until: float, seed: int = 0):
        rng, tasks = random.Random(seed), []
        while True:
            await asyncio.sleep(rng.expovariate(rate))
            if time.perf_counter() >= until:
                break
            tasks.append(asyncio.create_task(self.one(self._take())))
        await asyncio.gather(*tasks)


def ttft_summary(records: list[M.RequestRecord], since: float) -> dict:
    ttfts = sorted(r.ttft for r in records if r.ttft is not None and r.send_time >= since)
    return {"n": len(ttfts), "p50_s": statistics.median(ttfts) if ttfts else None,
            "p90_s": M.percentile(ttfts, 90) if ttfts else None,
            "unanswered": sum(1 for r in records if r.send_time >= since and r.ttft is None)}


async def run_policy(args, policy: str, weights: dict[str, float], scenario: str, reqs: dict, tmp: str,
                     b_rate: float | None = None) -> dict:
    port = args.port
    proc = start_server(args, policy, tenants_file(weights, tmp), port, os.path.join(tmp, f"{policy}.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        model = (await Client(url, KEYS["A"], 60).models())[0]["id"]
        a = Load(url, "A", reqs["A"], model)
        b = Load(url, "B", reqs["B"], model)
        start = time.perf_counter()
        a.t0 = b.t0 = start
        warm_end, end = start + args.warmup, start + args.warmup + args.duration
        tasks = []
        if scenario == "priority":  # fcfs refuses the field: its high-priority TTFT is a random 10% sample's
            tasks.append(a.closed(32, end, high_priority_frac=0.1 if policy == "priority" else 0.0, seed=args.seed))
        elif scenario == "weights":
            tasks += [a.closed(32, end, seed=args.seed), b.closed(32, end, seed=args.seed + 1)]
        else:  # demand: B joins (open loop) only when its rate is known
            tasks.append(a.closed(32, end, seed=args.seed))
            if b_rate is not None:
                tasks.append(b.open(b_rate, end, seed=args.seed + 1))
        gathered = asyncio.gather(*tasks)
        await asyncio.sleep(max(warm_end - time.perf_counter(), 0))
        s0, t_s0 = await tenant_service(a.client), time.perf_counter()
        await asyncio.sleep(max(end - time.perf_counter(), 0))
        s1, t_s1 = await tenant_service(a.client), time.perf_counter()
        gathered.cancel()  # requests still running are cut; what was served in the window is what counts
        await asyncio.gather(gathered, return_exceptions=True)
        for load in (a, b):
            await load.client.close()
        served = {t: s1.get(t, 0.0) - s0.get(t, 0.0) for t in ("A", "B")}
        window = t_s1 - t_s0
        total = sum(served.values())
        since = warm_end - start
        result = {"policy": policy, "window_s": window, "service_per_s": total / window if window else None,
                  "served": served, "share": {t: (v / total if total else None) for t, v in served.items()},
                  "ttft": {"A": ttft_summary([r for r, _ in a.records], since),
                           "B": ttft_summary([r for r, _ in b.records], since)}}
        if scenario == "priority":
            if policy == "priority":
                high = [r for r, p in a.records if p == -1]
            else:
                sample = random.Random(args.seed)
                high = [r for r, _ in a.records if sample.random() < 0.1]
            result["ttft"]["high"] = ttft_summary(high, since)
        if b_rate is not None:
            # B's demand in the same units: its arrival rate x its requests' mean cost (prompt tokens not served
            # from the prefix cache + 2 x output tokens, from the usage of B's finished requests)
            done = [r for r, _ in b.records if r.success]
            cost = statistics.mean(r.prompt_tokens - (r.cached_tokens or 0) + VTC_OUTPUT_WEIGHT * r.output_tokens
                                   for r in done) if done else None
            offered = b_rate * cost if cost else None
            result["B_offered_service_per_s"] = offered
            result["B_demand_share"] = offered / (total / window) if offered and total else None
        log(f"{policy}: " + json.dumps(result["share"]) + " ttft " + json.dumps(result["ttft"]))
        return result
    finally:
        stop(proc)


def serve_args(argv: list[str]):
    from kvserve.bench.serve import build_parser

    a = build_parser().parse_args(argv)
    a.extra_body = json.loads(a.extra_body)
    a.label = a.label or "kvserve"
    a.no_progress = True
    return a


async def run_loads(url: str, loads: list[list[str]]) -> list[tuple[list[M.RequestRecord], float]]:
    """`kvserve bench serve` runners (one per argument list, each with its own workload) against one server at
    once; (records, duration) of each."""
    from kvserve.bench.serve import Runner

    tok = W.load_tokenizer()
    runners, clients = [], []
    for argv in loads:
        a = serve_args(["--base-url", url, *argv])
        client = Client(url, None, a.timeout)
        a.model = a.model or (await client.models())[0]["id"]
        reqs = W.generate(a.workload, tok, a.num_requests, a.seed, **W.parse_params(a.workload, a.workload_arg))
        runners.append(Runner(a, reqs, tok, client))
        clients.append(client)
    try:
        return await asyncio.gather(*(r.run() for r in runners))
    finally:
        for c in clients:
            await c.close()


def tail(values: list[float], q: float) -> float | None:
    return M.percentile(sorted(values), q) if values else None


def agents(args, tmp: str) -> dict:
    """Multi-turn agents with tool pauses plus background sharegpt-like traffic, KV pool too small for every idle
    conversation: TTFT of turns 2+ and total throughput with and without per-session KV pins."""
    convs = ["--workload", "multi-turn", "--num-requests", str(args.agent_turns), "--request-rate",
             str(args.agent_rate), "--seed", str(args.seed), "-W", "turns_min=8", "-W", "turns_max=16",
             "-W", "think_time=2", "-W", "think_time_max=10", "-W", "output_max=96", "--timeout", "1800"]
    background = ["--workload", "sharegpt-like", "--num-requests", str(args.background_requests),
                  "--request-rate", str(args.background_rate), "--seed", str(args.seed + 7),
                  "-W", f"max_output={args.max_output}", "--timeout", "1800"]
    for kv in args.agent_arg:  # later -W values override the defaults above
        convs += ["-W", kv]
    for kv in args.background_arg:
        background += ["-W", kv]
    out = {"runs": []}
    for pin in (0.0, args.pin_seconds):
        proc = start_server(args, "fcfs", None, args.port, os.path.join(tmp, f"agents-{pin}.log"),
                            ["--max-kv-pin-seconds", str(max(pin, 1.0)),
                             "--kv-pin-max-fraction", str(args.kv_pin_max_fraction),
                             "--kv-pin-reserved-fraction", str(args.kv_pin_reserved_fraction if pin else 0.0)])
        url = f"http://127.0.0.1:{args.port}"
        try:
            started = time.perf_counter()
            flags = ["--session-pin-seconds", str(pin)] if pin else []
            (turns, t_turns), (bg, t_bg) = asyncio.run(run_loads(url, [convs + flags, background]))
            wall = time.perf_counter() - started
            metrics = asyncio.run(_scrape(url))
        finally:
            stop(proc)
        later = [r.ttft for r in turns if r.turn and r.ttft is not None]
        first = [r.ttft for r in turns if r.turn == 0 and r.ttft is not None]
        tokens = sum(r.output_tokens for r in turns + bg if r.success)
        run = {"kv_pin_seconds": pin, "turns": len(turns), "failed": sum(not r.success for r in turns + bg),
               "ttft_turn2plus_p50_s": statistics.median(later) if later else None,
               "ttft_turn2plus_p90_s": tail(later, 90), "ttft_turn1_p50_s": statistics.median(first) if first else None,
               "background_ttft_p50_s": statistics.median([r.ttft for r in bg if r.ttft is not None] or [0]),
               "output_tokens": tokens, "wall_s": wall, "output_tok_per_s": tokens / wall,
               "cached_prompt_tokens_turn2plus": sum(r.cached_tokens or 0 for r in turns if r.turn),
               "prompt_tokens_turn2plus": sum(r.prompt_tokens for r in turns if r.turn),
               "pin_events": {e: metrics.get(f"kvserve:kv_pin_events_total{{event={e}}}", 0.0)
                              for e in ("pinned", "taken_over", "expired", "released", "evicted")}}
        log(f"agents pin={pin}: " + json.dumps(run))
        out["runs"].append(run)
    off, on = out["runs"]
    out["ttft_turn2plus_p50_ratio_off_over_on"] = off["ttft_turn2plus_p50_s"] / on["ttft_turn2plus_p50_s"]
    out["throughput_ratio_on_over_off"] = on["output_tok_per_s"] / off["output_tok_per_s"]
    return out


def swap(args, tmp: str) -> dict:
    """sharegpt-like under memory pressure (a KV pool a fraction of the working set): tail TTFT and ITL with
    swap-or-recompute preemption against recompute only; the per-victim choices are counted from the log."""
    load = ["--workload", "sharegpt-like", "--num-requests", str(args.swap_requests), "--request-rate",
            str(args.swap_rate), "--seed", str(args.seed), "-W", f"max_output={args.max_output}",
            "-W", f"max_input={args.swap_max_input}", "--timeout", "1800"]
    out = {"runs": []}
    for mode in ("recompute", "auto"):
        log_path = os.path.join(tmp, f"swap-{mode}.log")
        proc = start_server(args, "fcfs", None, args.port, log_path,
                            ["--preemption-mode", mode, "--log-level", "info"])
        url = f"http://127.0.0.1:{args.port}"
        try:
            ((records, duration),) = asyncio.run(run_loads(url, [load]))
            metrics = asyncio.run(_scrape(url))
        finally:
            stop(proc)
        text = Path(log_path).read_text(errors="replace")
        ok = [r for r in records if r.success]
        itls = [g for r in ok for g in r.itls]
        run = {"mode": mode, "requests": len(records), "failed": len(records) - len(ok),
               "ttft_p50_s": statistics.median([r.ttft for r in ok]), "ttft_p99_s": tail([r.ttft for r in ok], 99),
               "itl_p50_s": statistics.median(itls) if itls else None, "itl_p99_s": tail(itls, 99),
               "output_tok_per_s": sum(r.output_tokens for r in ok) / duration,
               "preemptions": metrics.get("kvserve:num_preemptions_total"),
               "preemptions_swapped": metrics.get("kvserve:num_preemptions_swapped_total"),
               "logged_swap": text.count(": swap (estimated"), "logged_recompute": text.count(": recompute (estimated"),
               "logged_sample": [line.split("kvserve.scheduler: ")[-1] for line in text.splitlines()
                                 if "kvserve.scheduler: preempt" in line][:3]}
        log(f"swap mode={mode}: " + json.dumps(run))
        out["runs"].append(run)
    rec, auto = out["runs"]
    out["ttft_p99_ratio_recompute_over_auto"] = rec["ttft_p99_s"] / auto["ttft_p99_s"]
    out["itl_p99_ratio_recompute_over_auto"] = rec["itl_p99_s"] / auto["itl_p99_s"]
    return out


async def _scrape(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    client = Client(url, None, 60)
    try:
        r = await client.http.get(f"{url}/metrics")
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                extra = sorted((k, v) for k, v in s.labels.items() if k != "model_name")
                out[s.name + "".join(f"{{{k}={v}}}" for k, v in extra)] = s.value  # e.g. ...{event=evicted}
        return out
    finally:
        await client.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvserve.bench.scheduling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("demand", "weights", "priority", "agents", "swap"), required=True)
    ap.add_argument("--duration", type=float, default=120.0, help="measured seconds per policy")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the measured window")
    ap.add_argument("--calibration", type=float, default=45.0, help="demand: seconds of A alone to size B's rate")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--kv-gb", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8011, help="0: any free port")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-output", type=int, default=256, help="sharegpt-like output cap (keeps runs short)")
    ap.add_argument("--b-demand", type=float, default=1 / 3, help="demand: B's load as a fraction of the engine")
    ap.add_argument("--agent-turns", type=int, default=160, help="agents: turns in all (8-16 per conversation)")
    ap.add_argument("--agent-rate", type=float, default=0.1, help="agents: new conversations per second")
    ap.add_argument("--background-requests", type=int, default=120)
    ap.add_argument("--background-rate", type=float, default=0.5, help="agents: background requests per second")
    ap.add_argument("--pin-seconds", type=float, default=30.0, help="agents: kv_pin_seconds of each turn")
    ap.add_argument("--kv-pin-max-fraction", type=float, default=0.5, help="agents: the server's pin cap")
    ap.add_argument("--kv-pin-reserved-fraction", type=float, default=0.0,
                    help="agents: the share of the pool whose pins hold against waiting requests")
    ap.add_argument("--agent-arg", action="append", default=[], metavar="K=V",
                    help="agents: a multi-turn workload parameter (e.g. user_min=128), repeatable")
    ap.add_argument("--background-arg", action="append", default=[], metavar="K=V",
                    help="agents: a background sharegpt-like parameter (e.g. input_median=768), repeatable")
    ap.add_argument("--swap-requests", type=int, default=150)
    ap.add_argument("--swap-max-input", type=int, default=1024, help="swap: longest prompt (must fit the small pool)")
    ap.add_argument("--swap-rate", type=float, default=1.5, help="swap: requests per second")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not args.port:
        args.port = _free_port()
    tok = W.load_tokenizer()
    reqs = {t: W.sharegpt_like(tok, 400, args.seed + i, max_output=args.max_output) for i, t in enumerate(KEYS)}
    out: dict = {"scenario": args.scenario, "command": "python -m kvserve.bench.scheduling " + " ".join(argv or
                 sys.argv[1:]), "max_num_seqs": args.max_num_seqs, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.scenario == "demand":
            # calibration: A alone under fcfs gives the engine's service rate; B's rate is b_demand of it
            calib_args = argparse.Namespace(**{**vars(args), "duration": args.calibration})
            calib = asyncio.run(run_policy(calib_args, "fcfs", {}, "demand", reqs, tmp))
            mean_b = statistics.mean(r.content_tokens + VTC_OUTPUT_WEIGHT * r.max_tokens for r in reqs["B"])
            b_rate = args.b_demand * calib["service_per_s"] / mean_b
            out["calibration"] = calib
            out["B_rate_req_per_s"] = b_rate
            log(f"engine service {calib['service_per_s']:.0f}/s; B at {b_rate:.3f} req/s")
            for policy in ("fcfs", "vtc"):
                out["runs"].append(asyncio.run(run_policy(args, policy, {}, "demand", reqs, tmp, b_rate)))
            f, v = out["runs"]
            fair = min(v["B_demand_share"] or 0.0, 0.5)
            out["B_share_vtc"] = v["share"]["B"]
            out["B_fair_share"] = fair
            out["B_share_error_rel"] = abs(v["share"]["B"] - fair) / fair if fair else None
            out["B_ttft_p50_ratio_fcfs_over_vtc"] = (f["ttft"]["B"]["p50_s"] / v["ttft"]["B"]["p50_s"]
                                                     if f["ttft"]["B"]["p50_s"] and v["ttft"]["B"]["p50_s"] else None)
        elif args.scenario == "agents":
            out.update(agents(args, tmp))
        elif args.scenario == "swap":
            out.update(swap(args, tmp))
        elif args.scenario == "weights":
            r = asyncio.run(run_policy(args, "vtc", {"A": 3.0, "B": 1.0}, "weights", reqs, tmp))
            out["runs"].append(r)
            out["ratio_A_over_B"] = r["served"]["A"] / r["served"]["B"] if r["served"]["B"] else None
        else:
            for policy in ("fcfs", "priority"):
                out["runs"].append(asyncio.run(run_policy(args, policy, {}, "priority", reqs, tmp)))
            f, p = out["runs"]
            out["high_ttft_p50_ratio_fcfs_over_priority"] = (f["ttft"]["high"]["p50_s"] / p["ttft"]["high"]["p50_s"]
                                                             if f["ttft"]["high"]["p50_s"] and p["ttft"]["high"]["p50_s"]
                                                             else None)
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
