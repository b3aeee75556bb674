"""`kvserve bench ...`: one entry point for the benchmark tools.

    kvserve bench serve --base-url URL [...]     load generator for any OpenAI-compatible server (bench/serve.py)
    kvserve bench compare a.json b.json [...]    side-by-side table and plot (bench/compare.py)
    kvserve bench offline [...]                  offline throughput vs HF transformers and vLLM-CPU (bench/offline.py)
    kvserve bench roofline [--results ...]       copy bandwidth, bf16/fp32 matmul peaks (bench/roofline.py)
    kvserve bench workloads [--workload W ...]   the workloads and their parameters; --dump writes one as JSONL
    kvserve bench plan {measure,validate,recommend}  goodput planner: simulated layouts (bench/plan.py)
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

USAGE = __doc__.split("\n\n", 1)[1]


def workloads_main(argv: list[str]) -> int:
    from kvserve.bench import workloads as W

    ap = argparse.ArgumentParser(prog="kvserve bench workloads",
                                 description="List the workloads, or generate one and write it as JSONL.")
    ap.add_argument("--workload", choices=list(W.WORKLOADS), default=None)
    ap.add_argument("-W", "--workload-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dump", default=None, help="write the generated requests here, one JSON object a line")
    args = ap.parse_args(argv)
    if args.workload is None or args.dump is None:
        print(W.__doc__.split("\n\n", 1)[1])
        for name, fn in W.WORKLOADS.items():
            params = [f"{p}={v.default}" for p, v in inspect.signature(fn).parameters.items()
                      if p not in ("tok", "num_requests", "seed")]
            print(f"{name}: " + " ".join(params))
        return 0
    tok = W.load_tokenizer(args.tokenizer)
    reqs = W.generate(args.workload, tok, args.num_requests, args.seed,
                      **W.parse_params(args.workload, args.workload_arg))
    with open(args.dump, "w") as f:
        for r in reqs:
            f.write(json.dumps(r.to_dict()) + "\n")
    print(f"wrote {len(reqs)} requests to {args.dump}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: kvserve bench {serve,compare,offline,roofline,workloads,plan} ...\n\n" + USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from kvserve.bench.serve import main as run
    elif cmd == "compare":
        from kvserve.bench.compare import main as run
    elif cmd == "offline":
        from kvserve.bench.offline import main as run
    elif cmd == "roofline":
        from kvserve.bench.roofline import main as run
    elif cmd == "workloads":
        run = workloads_main
    elif cmd == "plan":
        from kvserve.bench.plan import main as run
    else:
        print(f"kvserve bench: unknown command {cmd!r}\n\n" + USAGE, file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
