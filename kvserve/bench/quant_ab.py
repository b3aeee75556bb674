"""Offline workload (a) in several weight formats, alternating in one process: the format bars' "in the same run".

    python -m kvserve.bench.quant_ab [--quantization none,w8a8] [--rounds 8] [--decode-steps 1] [--json PATH]

One engine per format (kvserve.bench.offline's KvserveEngine, each warmed up on the workload's shapes) and, per
round, one timed run of (a) (64 requests, 128 prompt + 128 output tokens, greedy; fresh prompts every round, the same
for every format) per format, the formats' order rotated from round to round. This host's speed drifts by 15-30%
from one minute to the next, which separate processes a minute apart turn into noise in their ratio; here each
round's ratio compares runs seconds apart. Prints output tok/s per round and format, each format's median, and the
median of the per-round ratios to the first format.
"""

from __future__ import annotations

import argparse
import json
import statistics

from kvserve.bench.offline import KvserveEngine, make_prompts, text_token_ids, warmup_shapes, workload_shapes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="none,w8a8", help="comma list; the first is the ratios' base")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-gb", type=float, default=2.0, help="KV cache GiB per engine")
    ap.add_argument("--decode-steps", type=int, default=1, help="every engine's decode_steps (EngineArgs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    formats = args.quantization.split(",")
    if len(formats) < 2 or len(set(formats)) != len(formats):
        raise SystemExit("--quantization needs two or more distinct formats")
    text = text_token_ids()
    shapes = workload_shapes("a")
    opts = {"threads": args.threads, "max_num_seqs": 256, "kv_gb": args.kv_gb, "decode_steps": args.decode_steps}
    engines = {}
    for fmt in formats:
        engines[fmt] = KvserveEngine({**opts, "quantization": fmt})
        engines[fmt].generate(make_prompts(warmup_shapes(shapes, 64, 16), text, 1000))
    rates: dict[str, list[float]] = {f: [] for f in formats}
    out_tokens = sum(n for _, n in shapes)
    print("| round | " + " | ".join(formats) + " |")
    print("|---:|" + "---:|" * len(formats))
    for r in range(args.rounds):
        reqs = make_prompts(shapes, text, 1001 + r)
        for i in range(len(formats)):
            fmt = formats[(i + r) % len(formats)]
            rates[fmt].append(out_tokens / engines[fmt].generate(reqs)["elapsed_s"])
        print(f"| {r + 1} | " + " | ".join(f"{rates[f][-1]:.1f}" for f in formats) + " |", flush=True)
    base = formats[0]
    report = {"formats": formats, "rounds": args.rounds, "output_tok_s": rates,
              "median_tok_s": {f: statistics.median(v) for f, v in rates.items()},
              "median_ratio": {f: statistics.median(a / b for a, b in zip(rates[f], rates[base]))
                               for f in formats[1:]}}
    print("| median | " + " | ".join(f"{report['median_tok_s'][f]:.1f}" for f in formats) + " |")
    print("median of the per-round ratios to " + base + ": "
          + ", ".join(f"{f} {v:.3f}x" for f, v in report["median_ratio"].items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
