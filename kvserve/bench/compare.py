"""`kvserve bench compare a.json b.json ...`: serving-benchmark results side by side.

    kvserve bench compare kvserve.json vllm.json llamacpp.json --out table.md --plot compare.png

Prints (and with --out writes) one markdown table, one column per run (its label and pace), one row per metric of
`kvserve bench serve`; with --plot, a PNG of the TTFT and ITL CDFs of every run and, per engine label, output
throughput and p99 TTFT against the offered request rate (runs of one label at several rates make the curve).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from kvserve.bench.metrics import REPORT_ROWS, fmt


def load(path: str) -> dict:
    with open(path) as f:
        res = json.load(f)
    if "summary" not in res or "config" not in res:
        raise SystemExit(f"{path}: not a `kvserve bench serve` result (no config / summary)")
    return res


def run_name(res: dict) -> str:
    c = res["config"]
    rate = c.get("request_rate")
    inf = rate in (None, "inf") or (isinstance(rate, float) and math.isinf(rate))
    pace = "inf" if inf else f"{float(rate):g}/s"
    if c.get("max_concurrency"):
        pace += f" c={c['max_concurrency']}"
    return f"{c.get('label') or '?'} @ {pace}"


def markdown(results: list[dict], names: list[str]) -> str:
    head = "| metric | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    cfg_rows = [("workload", lambda c: c.get("workload")), ("endpoint", lambda c: c.get("endpoint")),
                ("requests", lambda c: c.get("num_requests")), ("seed", lambda c: c.get("seed")),
                ("model", lambda c: c.get("model"))]
    for label, get in cfg_rows:
        vals = [get(r["config"]) for r in results]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else str(v) for v in vals) + " |")
    for key, label, spec in REPORT_ROWS:
        vals = [r["summary"].get(key) for r in results]
        if all(v is None for v in vals):
            continue
        lines.append(f"| {label} | " + " | ".join(fmt(v, spec) for v in vals) + " |")
    groups = sorted({g for r in results for g in (r["summary"].get("groups") or {})})
    for g in groups:
        for key in ("median_itl_ms", "p99_itl_ms", "max_itl_ms", "median_ttft_ms"):
            label = next(lab for k, lab, _ in REPORT_ROWS if k == key)
            vals = [(r["summary"].get("groups") or {}).get(g, {}).get(key) for r in results]
            lines.append(f"| [{g}] {label} | " + " | ".join(fmt(v, "{:.2f}") for v in vals) + " |")
    slo = {(r["config"].get("slo_ttft_ms"), r["config"].get("slo_tpot_ms")) for r in results}
    if len(slo) > 1:
        lines.append("")
        lines.append("Note: the runs used different SLOs; goodput is not comparable across them.")
    return "\n".join(lines) + "\n"


def build_parser(prog: str = "kvserve bench compare") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Side-by-side table and plot of serve results.")
    ap.add_argument("results", nargs="+", help="JSON files written by `kvserve bench serve --out`")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--plot", default=None, help="write the PNG here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = [load(p) for p in args.results]
    names = [run_name(r) for r in results]
    if len({r["config"].get("workload") for r in results}) > 1:
        names = [f"{n} [{r['config'].get('workload')}]" for n, r in zip(names, results)]
    seen: dict[str, int] = {}
    counts = {n: names.count(n) for n in names}
    for i, n in enumerate(list(names)):  # the same label and pace twice: number them
        if counts[n] > 1:
            seen[n] = seen.get(n, 0) + 1
            names[i] = f"{n} #{seen[n]}"
    table = markdown(results, names)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    if args.plot:
        from kvserve.bench.plots import plot_compare
        plot_compare(results, names, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
