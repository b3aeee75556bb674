"""The KV-aware router against round robin (issue 15's router bar; docs/scaleout.md, docs/benchmarks.md).

For each routing policy and workload: two fresh kvserve instances (one thread each, each pinned to its own core with
taskset when there are two, KV pools of --pool-blocks blocks: about 4 of the 8 system prompts, so round robin
thrashes), a `kvserve router` in front, and `kvserve bench serve` through it. Reported per run: the instances' prefix-
cache hit rate (hit / looked-up prompt tokens, from their /metrics), TTFT percentiles, and the share of requests the
busiest instance served (from the router's /metrics).

    python -m kvserve.bench.router --out docs/results/router/router.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def run_one(policy: str, workload: str, args, workdir: str, log) -> dict:
    env = dict(os.environ, KVSERVE_NO_TQDM="1", TOKENIZERS_PARALLELISM="false")
    procs, urls = [], []
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    try:
        for i in range(2):
            port = free_port()
            cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--num-threads", "1",
                   "--num-kv-blocks", str(args.pool_blocks), "--log-level", "warning", "--no-access-log"]
            if pin:
                cmd = ["taskset", "-c", str(i)] + cmd
            path = os.path.join(workdir, f"{policy}-{workload}-instance{i}.log")
            procs.append(subprocess.Popen(cmd, stdout=open(path, "ab"), stderr=subprocess.STDOUT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        for u, p in zip(urls, procs):
            wait_ok(f"{u}/health", p, 600, workdir)
        router = start_router(urls, ["--policy", policy], os.path.join(workdir, f"{policy}-{workload}-router.log"),
                              env, procs)
        out = os.path.join(workdir, f"{policy}-{workload}.json")
        cmd = [sys.executable, "-m", "kvserve.bench", "serve", "--base-url", router, "--endpoint", "chat",
               "--label", f"router-{policy}", "--workload", workload, *WORKLOAD_ARGS[workload],
               "--num-requests", str(args.num_requests), "--request-rate", str(args.request_rate),
               "--max-concurrency", str(args.max_concurrency), "--seed", str(args.seed), "--no-progress",
               "--out", out]
        log(f"{policy} {workload}: {' '.join(cmd[2:])}")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        summary = json.load(open(out))["summary"]
        inst = [metrics(u) for u in urls]
        hits = sum(m.get("kvserve:prefix_cache_hits_total{}", 0) for m in inst)
        queried = sum(m.get("kvserve:prefix_cache_queries_total{}", 0) for m in inst)
        rm = metrics(router)
        routed = [sum(v for k, v in rm.items() if k.startswith("kvserve_router:requests_routed_total{")
                      and f"backend={i}," in k) for i in range(2)]
        reasons = {}
        for k, v in rm.items():
            if k.startswith("kvserve_router:requests_routed_total{"):
                r = k.split("reason=")[1].rstrip("}")
                reasons[r] = reasons.get(r, 0) + v
        res = {"policy": policy, "workload": workload, "prefix_cache_hit_rate": hits / queried if queried else 0.0,
               "hit_tokens": hits, "queried_tokens": queried, "routed_per_instance": routed,
               "busiest_share": max(routed) / sum(routed) if sum(routed) else None, "reasons": reasons,
               "preemptions": sum(m.get("kvserve:num_preemptions_total{}", 0) for m in inst),
               **{k: summary[k] for k in ("completed", "failed", "duration", "p50_ttft_ms", "p90_ttft_ms",
                                          "p99_ttft_ms", "mean_ttft_ms", "p50_tpot_ms", "output_throughput")}}
        log(f"{policy:11s} {workload:13s}: hit rate {res['prefix_cache_hit_rate']:.3f}, TTFT p50 "
            f"{res['p50_ttft_ms']:.0f} ms p99 {res['p99_ttft_ms']:.0f} ms, routed {routed}, "
            f"{res['output_throughput']:.1f} tok/s, {res['completed']} ok / {res['failed']} failed")
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
    ap.add_argument("--keep-dir", default=None, help="keep logs and per-run JSON here (default: a temporary dir)")
    args = ap.parse_args(argv)
    started = time.time()
    log = elapsed_log()

    workdir = args.keep_dir or tempfile.mkdtemp(prefix="kvserve-router-bench-")
    os.makedirs(workdir, exist_ok=True)
    runs = [run_one(p, w, args, workdir, log) for w in args.workloads.split(",") for p in args.policies.split(",")]
    result = {"command": "python -m kvserve.bench.router " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpus": os.cpu_count(), "runs": runs, "seconds": time.time() - started}
    for w in args.workloads.split(","):
        by = {r["policy"]: r for r in runs if r["workload"] == w}
        if "kv" in by and "round_robin" in by:
            kv, rr = by["kv"], by["round_robin"]
            result.setdefault("ratios", {})[w] = {
                "hit_rate_x": kv["prefix_cache_hit_rate"] / rr["prefix_cache_hit_rate"]
                if rr["prefix_cache_hit_rate"] else None,
                "ttft_p50_x_lower": rr["p50_ttft_ms"] / kv["p50_ttft_ms"] if kv["p50_ttft_ms"] else None,
                "kv_busiest_share": kv["busiest_share"]}
            log(f"{w}: kv vs round robin: hit rate x{result['ratios'][w]['hit_rate_x']:.2f}, TTFT p50 "
                f"{result['ratios'][w]['ttft_p50_x_lower']:.2f}x lower, busiest instance "
                f"{100 * kv['busiest_share']:.0f}%")
    write_json(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
