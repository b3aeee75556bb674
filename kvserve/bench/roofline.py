"""`kvserve bench roofline`: this machine's ceilings, and benchmark results as a fraction of them.

    kvserve bench roofline [--threads 2] [--results run.json offline.json ...] [--out roofline.json]

Measures (kvserve.bench.offline.run_roofline, medians after a warm-up): copy bandwidth (`copy_` of 512 MiB into a
preallocated tensor, read + write bytes), bf16 and fp32 matmul GFLOP/s (n^3 square matmuls, 2 n^3 flops), and from
the embedded model's bf16 weight bytes the batch-1 decode bound (bandwidth / weight bytes) and the compute bound
(bf16 peak / 2 flops per weight).

With --results, each file is placed against them:
- a `kvserve bench serve` result: its achieved GFLOP/s, counted per request as 2 flops per non-lm_head weight for
  every token the server had to run (prompt - cached + output - 1), 2 per lm_head weight per output token, and
  attention 4 x heads x head_dim x layers flops per (query, key) pair; as a fraction of the bf16 and fp32 peaks;
- a `kvserve.bench.offline` report: each engine's workloads the same way (the report's exact flop counts when it
  has them, else the same formula on its token totals without attention), and batch-1 decode tok/s as a fraction
  of the bandwidth-bound decode rate.
"""

from __future__ import annotations

import argparse
import json
import sys


def serve_flops(result: dict, roof: dict) -> float:
    params = roof["weight_bytes"] / 2
    head = roof["lm_head_params"]
    attn = roof["attn_flops_per_ctx_token"]
    total = 0.0
    for r in result.get("requests", []):
        if not r.get("success"):
            continue
        p, o = int(r.get("prompt_tokens") or 0), int(r.get("output_tokens") or 0)
        c = min(int(r.get("cached_tokens") or 0), max(0, p - 1))
        n = max(0, p + o - 1 - c)  # positions c .. p+o-2 are run
        total += 2 * (params - head) * n + 2 * head * o + attn * n * ((c + 1) + (p + o - 1)) / 2
    return total


def place(path: str, roof: dict) -> list[str]:
    with open(path) as f:
        res = json.load(f)
    bf16, fp32 = roof["bf16_matmul_gflop_s"], roof["fp32_matmul_gflop_s"]
    lines = []
    if "summary" in res and "requests" in res:
        s, c = res["summary"], res["config"]
        dur = s.get("duration") or 0
        fl = serve_flops(res, roof)
        g = fl / dur / 1e9 if dur else 0.0
        lines.append(f"{path}: {c.get('label')} {c.get('workload')}: {s.get('output_throughput') or 0:.1f} output "
                     f"tok/s, {s.get('total_token_throughput') or 0:.1f} total tok/s; {fl / 1e12:.3f} TFLOP in "
                     f"{dur:.1f} s = {g:.1f} GFLOP/s = {100 * g / bf16:.1f}% of the bf16 peak "
                     f"({100 * g / fp32:.1f}% of fp32)")
    elif "engines" in res:
        params, head = roof["weight_bytes"] / 2, roof["lm_head_params"]
        for name, er in res["engines"].items():
            for task, tr in (er.get("tasks") or {}).items():
                if "error" in tr or not tr.get("elapsed_s"):
                    continue
                if task == "decode1":
                    lines.append(f"{path}: {name} batch-1 decode {tr['output_tok_s']:.1f} tok/s = "
                                 f"{100 * tr['output_tok_s'] / roof['decode_bound_tok_s']:.1f}% of the bandwidth "
                                 f"bound ({roof['decode_bound_tok_s']:.1f} tok/s)")
                    continue
                fl, how = tr.get("flops"), "exact"
                if not fl:
                    n = tr["prompt_tokens"] + tr["output_tokens"] - tr.get("requests", 0)
                    fl, how = 2 * (params - head) * n + 2 * head * tr["output_tokens"], "no attention"
                g = fl / tr["elapsed_s"] / 1e9
                lines.append(f"{path}: {name} workload {task}: {tr['output_tok_s']:.1f} output tok/s; {g:.1f} "
                             f"GFLOP/s ({how}) = {100 * g / bf16:.1f}% of the bf16 peak ({100 * g / fp32:.1f}% of "
                             f"fp32)")
    else:
        lines.append(f"{path}: neither a bench serve result nor an offline report")
    return lines


def build_parser(prog: str = "kvserve bench roofline") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Copy bandwidth and matmul peaks of this machine.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--copy-mib", type=int, default=512)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--results", nargs="*", default=[], help="serve or offline JSON results to place")
    ap.add_argument("--roofline", default=None, help="reuse a roofline JSON written by --out instead of measuring")
    ap.add_argument("--out", default=None, help="write the measured roofline JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.roofline:
        with open(args.roofline) as f:
            roof = json.load(f)
    else:
        from kvserve.bench.offline import run_roofline

        roof = run_roofline({"threads": args.threads, "roofline_copy_mib": args.copy_mib,
                             "roofline_matmul_n": args.matmul_n})
    print(f"threads {roof['torch_threads']}: copy {roof['copy_gb_s']:.2f} GB/s (read+write of {roof['copy_mib']} "
          f"MiB), bf16 matmul {roof['bf16_matmul_gflop_s']:.1f} GFLOP/s, fp32 matmul "
          f"{roof['fp32_matmul_gflop_s']:.1f} GFLOP/s ({roof['matmul_n']}^3)")
    print(f"embedded model: {roof['weight_bytes'] / 1e6:.1f} MB of bf16 weights -> batch-1 decode bound "
          f"{roof['decode_bound_tok_s']:.1f} tok/s, compute bound {roof['compute_bound_tok_s']:.0f} tok/s")
    for path in args.results:
        for line in place(path, roof):
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(roof, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
