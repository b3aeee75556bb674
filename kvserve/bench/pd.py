"""Prefill/decode disaggregation against one colocated instance on the `stall` workload (issue 15's P/D bar;
docs/scaleout.md, docs/benchmarks.md).

colocated: one kvserve instance with --num-threads 2. pd: a prefill instance and a decode instance, one thread each,
each pinned to its own core (taskset), sharing a disk KV tier on /dev/shm, behind `kvserve router`. The same seeded
`stall` workload (decode streams running while 4k-token prompts arrive) goes through `kvserve bench serve` against
each; reported: the streams' ITL p50 / p99 / max (the decode stalls) and the long prompts' TTFT.

    python -m kvserve.bench.pd --out docs/results/pd/stall.json
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


from kvserve.bench import elapsed_log, free_port, stop_processes, write_json
from kvserve.bench.router import metrics, start_router, wait_ok

KEYS = ("p50_itl_ms", "p99_itl_ms", "max_itl_ms", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "completed", "failed")


def _serve(port: int, threads: int, extra: list[str], core: str | None, log: str, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--port", str(port), "--num-threads", str(threads),
           "--log-level", "warning", "--no-access-log", *extra]
    if core is not None:
        cmd = ["taskset", "-c", core] + cmd
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def run_one(mode: str, args, workdir: str, log) -> dict:
    env = dict(os.environ, KVSERVE_NO_TQDM="1", TOKENIZERS_PARALLELISM="false")
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    procs, urls = [], []
    shm = os.path.join(args.kv_dir, f"kvserve-pd-bench-{os.getpid()}")
    try:
        if mode == "colocated":
            port = free_port()
            procs.append(_serve(port, 2, [], None, os.path.join(workdir, "colocated.log"), env))
            urls.append(f"http://127.0.0.1:{port}")
            base = urls[0]
        else:
            store = ["--kv-store", f"disk:{shm}:{args.kv_store_size}", "--kv-store-load", "always"]
            for i, role in enumerate(("prefill", "decode")):
                port = free_port()
                procs.append(_serve(port, 1, ["--role", role, *store], str(i) if pin else None,
                                    os.path.join(workdir, f"{role}.log"), env))
                urls.append(f"http://127.0.0.1:{port}")
        for u, p in zip(urls, procs):
            wait_ok(f"{u}/health", p, 600, workdir)
        if mode == "pd":
            base = start_router(urls, [], os.path.join(workdir, "router.log"), env, procs)
        out = os.path.join(workdir, f"{mode}.json")
        cmd = [sys.executable, "-m", "kvserve.bench", "serve", "--base-url", base, "--endpoint", "chat",
               "--label", f"stall-{mode}", "--workload", "stall", *args.workload_args, "--seed", str(args.seed),
               "--no-progress", "--out", out]
        log(f"{mode}: {' '.join(cmd[2:])}")
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        summary = json.load(open(out))["summary"]
        res = {"mode": mode, "streams": {k: summary["groups"]["stream"][k] for k in KEYS},
               "long_prompts": {k: summary["groups"]["long-prompt"][k] for k in KEYS}}
        if mode == "pd":
            dec = metrics(urls[1])
            res["decode_prompt_tokens_loaded"] = dec.get("kvserve:prompt_tokens_loaded_total{}", 0)
            res["decode_prompt_tokens_computed"] = dec.get("kvserve:prompt_tokens_computed_total{}", 0)
            rm = metrics(base)
            res["router_pd"] = {k.split("outcome=")[1].rstrip("}"): v for k, v in rm.items()
                                if k.startswith("kvserve_router:pd_requests_total{")}
        s, lp = res["streams"], res["long_prompts"]
        log(f"{mode:9s}: streams ITL p50 {s['p50_itl_ms']:.1f} p99 {s['p99_itl_ms']:.1f} max {s['max_itl_ms']:.1f} "
            f"ms; long prompts TTFT p50 {lp['p50_ttft_ms']:.0f} ms; {s['completed'] + lp['completed']} ok / "
            f"{s['failed'] + lp['failed']} failed")
        return res
    finally:
        stop_processes(procs)
        shutil.rmtree(shm, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="pd,colocated")
    ap.add_argument("--kv-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                    help="where the P/D instances' shared disk tier lives (tmpfs: a shared-memory transfer)")
    ap.add_argument("--kv-store-size", default="4GB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-W", dest="workload_kv", action="append", default=[],
                    help="stall workload parameter KEY=VALUE (as in kvserve bench serve)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--keep-dir", default=None, help="keep logs and per-run JSON here (default: a temporary dir)")
    args = ap.parse_args(argv)
    args.workload_args = [x for kv in args.workload_kv for x in ("-W", kv)]
    started = time.time()
    log = elapsed_log()

    workdir = args.keep_dir or tempfile.mkdtemp(prefix="kvserve-pd-bench-")
    os.makedirs(workdir, exist_ok=True)
    runs = {m: run_one(m, args, workdir, log) for m in args.modes.split(",")}
    result = {"command": "python -m kvserve.bench.pd " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpus": os.cpu_count(), "runs": runs, "seconds": time.time() - started}
    if "pd" in runs and "colocated" in runs:
        pd, co = runs["pd"]["streams"], runs["colocated"]["streams"]
        result["bars"] = {
            "pd_p99_over_p50": pd["p99_itl_ms"] / pd["p50_itl_ms"],
            "max_itl_x_lower": co["max_itl_ms"] / pd["max_itl_ms"],
            "long_ttft_p50_pd_over_colocated": runs["pd"]["long_prompts"]["p50_ttft_ms"]
            / runs["colocated"]["long_prompts"]["p50_ttft_ms"]}
        b = result["bars"]
        log(f"P/D: streams' ITL p99 / p50 = {b['pd_p99_over_p50']:.2f} (bar <= 2); max ITL "
            f"{b['max_itl_x_lower']:.1f}x lower than colocated (bar >= 5); long prompts' TTFT p50 "
            f"x{b['long_ttft_p50_pd_over_colocated']:.2f} of colocated")
    write_json(args.out, result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
