"""The KV-aware router against round robin (issue 15's router bar; docs/scaleout.md, docs/benchmarks.md).

For each routing policy and workload: two fresh kvserve instances (one thread each, each pinned to its own core with
taskset when there are two, KV pools of --pool-blocks blocks: about 4 of the 8 system prompts, so round robin
thrashes), a `kvserve router` in front, and `kvserve bench serve` through it. Reported per run: the instances' prefix-
cache hit rate (hit / looked-up prompt tokens, from their /metrics), TTFT percentiles, and the share of requests the
busiest instance served (from the router's /metrics).

Policy `ray`: the same two engines (one thread, one Ray CPU each) as `kvserve ray-serve` replicas on a local Ray
cluster of the 2 CPUs, the same KV-aware routing as Ray Serve's request router (issue 15's Ray Serve bar: its
throughput against the standalone router's). Hit rates come from the responses' cached_tokens for every policy
(Ray's replicas have no /metrics of their own); the instances' counters are reported beside them where they exist.

    python -m kvserve.bench.router --out docs/results/router/router.json
    python -m kvserve.bench.router --policies kv,ray --request-rate inf --repeats 3 --out docs/results/router/ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvserve.bench import elapsed_log, free_port, stop_processes, write_json

WORKLOAD_ARGS = {
    "shared-prefix": ["-W", "num_prefixes=8", "-W", "prefix_len=1024", "-W", "question_min=32",
                      "-W", "question_max=96", "-W", "output_min=16", "-W", "output_max=48"],
    "multi-turn": ["-W", "num_systems=8", "-W", "system_len=1024", "-W", "turns_min=2", "-W", "turns_max=6",
                   "-W", "user_min=32", "-W", "user_max=96", "-W", "output_min=16", "-W", "output_max=48"],
}


def wait_ok(url: str, proc: subprocess.Popen, timeout: float, log: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not up in {timeout:.0f}s; see {log}")
        time.sleep(0.5)


def start_router(urls: list[str], extra: list[str], log_path: str, env: dict, procs: list) -> str:
    """`kvserve router` over `urls` (its process appended to `procs`); returns its URL once every backend is
    healthy."""
    port = free_port()
    cmd = [sys.executable, "-m", "kvserve.cli", "router", "--port", str(port), "--log-level", "warning", *extra,
           *[x for u in urls for x in ("--backend", u)]]
    procs.append(subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env))
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/health", procs[-1], 120, log_path)
    while not all(b["healthy"] for b in httpx.get(f"{url}/router/status").json()["backends"]):
        time.sleep(0.2)
    return url


def metrics(url: str, drop: tuple[str, ...] = ("model_name",)) -> dict[str, float]:
    """name{label=value,...} -> value, summed over the labels in `drop` (the instances label by model)."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in drop)
            key = f"{s.name}{{{labels}}}"
            out[key] = out.get(key, 0.0) + s.value
    return out


def _instances(policy: str, name: str, args, workdir: str, env: dict, procs: list) -> tuple[str, list[str]]:
    """Start the two engines and what routes to them; returns (the URL clients use, the instances' URLs)."""
    common = ["--num-threads", "1", "--num-kv-blocks", str(args.pool_blocks), "--log-level", "warning",
              "--no-access-log", "--enable-prompt-tokens-details"]
    if policy == "ray":
        port = free_port()
        path = os.path.join(workdir, f"{name}-ray.log")
        cmd = [sys.executable, "-m", "kvserve.cli", "ray-serve", "--port", str(port), "--replicas", "2",
               "--num-cpus", "2", "--cpus-per-replica", "1", *common]
        procs.append(subprocess.Popen(cmd, stdout=open(path, "ab"), stderr=subprocess.STDOUT, env=env))
        url = f"http://127.0.0.1:{port}"
        wait_ok(f"{url}/health", procs[-1], 600, path)
        return url, []
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    urls = []
    for i in range(2):
        port = free_port()
        cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), *common]
        if pin:
            cmd = ["taskset", "-c", str(i)] + cmd
        path = os.path.join(workdir, f"{name}-instance{i}.log")
        procs.append(subprocess.Popen(cmd, stdout=open(path, "ab"), stderr=subprocess.STDOUT, env=env))
        urls.append(f"http://127.0.0.1:{port}")
    for u, p in zip(urls, procs):
        wait_ok(f"{u}/health", p, 600, workdir)
    router = start_router(urls, ["--policy", policy], os.path.join(workdir, f"{name}-router.log"),
                          env, procs)
    return router, urls


def _probe_ms(url: str, n: int = 30) -> float:
    """Median latency of a one-token request with a 4-token prompt on the idle system: the front end's own cost
    per request (proxy hops, hashing) beside one engine step."""
    times = []
    with httpx.Client(timeout=60) as client:
        model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
        for i in range(n + 3):
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/completions", json={"model": model, "prompt": f"Hello {i}", "max_tokens": 1})
            r.raise_for_status()
            if i >= 3:  # warm-up
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_one(policy: str, workload: str, args, workdir: str, log, repeat: int = 0) -> dict:
    env = dict(os.environ, KVSERVE_NO_TQDM="1", TOKENIZERS_PARALLELISM="false")
    procs = []
    try:
        name = f"{policy}-{workload}-r{repeat}"
        front, urls = _instances(policy, name, args, workdir, env, procs)
        probe = _probe_ms(front)
        out = os.path.join(workdir, f"{name}.json")
        cmd = [sys.executable, "-m", "kvserve.bench", "serve", "--base-url", front, "--endpoint", "chat",
               "--label", f"router-{policy}", "--workload", workload, *WORKLOAD_ARGS[workload],
               "--num-requests", str(args.num_requests), "--request-rate", str(args.request_rate),
               "--max-concurrency", str(args.max_concurrency), "--seed", str(args.seed), "--no-progress",
               "--out", out]
        log(f"{policy} {workload}: {' '.join(cmd[2:])}")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        summary = json.load(open(out))["summary"]
        res = {"policy": policy, "workload": workload, "repeat": repeat, "probe_latency_ms_p50": probe,
               "cached_token_rate": summary["total_cached_tokens"] / summary["total_input_tokens"]
               if summary.get("total_cached_tokens") is not None and summary["total_input_tokens"] else None,
               **{k: summary[k] for k in ("completed", "failed", "duration", "p50_ttft_ms", "p90_ttft_ms",
                                          "p99_ttft_ms", "mean_ttft_ms", "p50_tpot_ms", "output_throughput")}}
        if urls:  # the standalone router: the instances' own counters and the router's per-backend counts
            inst = [metrics(u) for u in urls]
            hits = sum(m.get("kvserve:prefix_cache_hits_total{}", 0) for m in inst)
            queried = sum(m.get("kvserve:prefix_cache_queries_total{}", 0) for m in inst)
            rm = metrics(front)
            routed = [sum(v for k, v in rm.items() if k.startswith("kvserve_router:requests_routed_total{")
                          and f"backend={i}," in k) for i in range(2)]
            reasons = {}
            for k, v in rm.items():
                if k.startswith("kvserve_router:requests_routed_total{"):
                    r = k.split("reason=")[1].rstrip("}")
                    reasons[r] = reasons.get(r, 0) + v
            res.update({"prefix_cache_hit_rate": hits / queried if queried else 0.0, "hit_tokens": hits,
                        "queried_tokens": queried, "routed_per_instance": routed,
                        "busiest_share": max(routed) / sum(routed) if sum(routed) else None, "reasons": reasons,
                        "preemptions": sum(m.get("kvserve:num_preemptions_total{}", 0) for m in inst)})
        log(f"{policy:11s} {workload:13s}: cached-token rate {res['cached_token_rate']:.3f}, TTFT p50 "
            f"{res['p50_ttft_ms']:.0f} ms p99 {res['p99_ttft_ms']:.0f} ms, routed {res.get('routed_per_instance')}, "
            f"{res['output_throughput']:.1f} tok/s, {res['completed']} ok / {res['failed']} failed, idle one-token "
            f"request {probe:.1f} ms")
        return res
    finally:
        stop_processes(procs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="shared-prefix,multi-turn")
    ap.add_argument("--policies", default="kv,round_robin")
    ap.add_argument("--pool-blocks", type=int, default=320,
                    help="KV blocks per instance: 4 system prompts of 1,024 tokens are 256 blocks of 16")
    ap.add_argument("--num-requests", type=int, default=96)
    ap.add_argument("--request-rate", type=float, default=2.0)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every (workload, policy) this many times, interleaved; ratios are medians over repeats")
    ap.add_argument("--keep-dir", default=None, help="keep logs and per-run JSON here (default: a temporary dir)")
    args = ap.parse_args(argv)
    started = time.time()
    log = elapsed_log()

    workdir = args.keep_dir or tempfile.mkdtemp(prefix="kvserve-router-bench-")
    os.makedirs(workdir, exist_ok=True)
    runs = [run_one(p, w, args, workdir, log, r) for r in range(args.repeats) for w in args.workloads.split(",")
            for p in args.policies.split(",")]
    result = {"command": "python -m kvserve.bench.router " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpus": os.cpu_count(), "runs": runs, "seconds": time.time() - started}
    for w in args.workloads.split(","):
        reps = [{r["policy"]: r for r in runs if r["workload"] == w and r["repeat"] == k} for k in range(args.repeats)]
        ratios = result.setdefault("ratios", {}).setdefault(w, {})

        def med(fn, a: str, b: str) -> float | None:
            """The median over repeats of fn(run of policy a, run of policy b) from the same repeat."""
            vals = [fn(rep[a], rep[b]) for rep in reps if a in rep and b in rep]
            vals = [v for v in vals if v is not None]
            return statistics.median(vals) if vals else None

        if reps and "kv" in reps[0] and "round_robin" in reps[0]:
            ratios.update({
                "hit_rate_x": med(lambda kv, rr: kv["prefix_cache_hit_rate"] / rr["prefix_cache_hit_rate"]
                                  if rr["prefix_cache_hit_rate"] else None, "kv", "round_robin"),
                "ttft_p50_x_lower": med(lambda kv, rr: rr["p50_ttft_ms"] / kv["p50_ttft_ms"], "kv", "round_robin"),
                "kv_busiest_share": med(lambda kv, rr: kv["busiest_share"], "kv", "round_robin")})
            log(f"{w}: kv vs round robin (median of {args.repeats}): hit rate x{ratios['hit_rate_x']:.2f}, TTFT p50 "
                f"{ratios['ttft_p50_x_lower']:.2f}x lower, busiest instance {100 * ratios['kv_busiest_share']:.0f}%")
        if reps and "kv" in reps[0] and "ray" in reps[0]:
            costs = [1 - rep["ray"]["output_throughput"] / rep["kv"]["output_throughput"] for rep in reps]
            ratios.update({
                "ray_throughput_cost_per_repeat": costs,
                "ray_throughput_cost": statistics.median(costs),
                "ray_probe_extra_ms": med(lambda kv, ray: ray["probe_latency_ms_p50"] - kv["probe_latency_ms_p50"],
                                          "kv", "ray"),
                "ray_ttft_p50_x": med(lambda kv, ray: ray["p50_ttft_ms"] / kv["p50_ttft_ms"], "kv", "ray"),
                "ray_cached_token_rate_x": med(lambda kv, ray: ray["cached_token_rate"] / kv["cached_token_rate"]
                                               if kv["cached_token_rate"] else None, "kv", "ray")})
            log(f"{w}: Ray Serve vs the standalone router (median of {args.repeats}): throughput cost "
                f"{100 * ratios['ray_throughput_cost']:.1f}% (per repeat {[round(100 * c, 1) for c in costs]}), "
                f"TTFT p50 x{ratios['ray_ttft_p50_x']:.2f}, idle one-token request "
                f"+{ratios['ray_probe_extra_ms']:.1f} ms, cached-token rate x{ratios['ray_cached_token_rate_x']:.2f}")
    write_json(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
