"""Peak memory of loading a model, per quantization: what reading a GGUF file's blocks as stored saves.

    python -m kvserve.bench.load_memory [--model PATH] [--quantization auto,none,q8_0] [--dtype bfloat16]

Each format loads in a fresh child process (the loader, then the model's weights built as the engine builds them,
no KV pool), which reports its peak resident set (`ru_maxrss`), its resident set after `import torch` and the other
imports (the floor every process pays), and the bytes the built weights hold (kvserve's own count: what a decode
step reads, plus the embedding table). "load overhead" = peak - floor - weights: the transient copies the load made.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import torch
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_model
from kvserve.model.quant import resolve_quantization
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
model, quant, dtype = sys.argv[1] or None, sys.argv[2], getattr(torch, sys.argv[3])
floor = rss_mb()
loaded = load_model(model)
fmt = resolve_quantization(quant, loaded.weight_format, dtype == torch.float32)
m = LlamaModel(loaded.config, loaded.weights, dtype, quantization=fmt)
del loaded
weights = m.weight_bytes() + m.embed.numel() * m.embed.element_size()
print(json.dumps({"quantization": quant, "runs_as": fmt, "floor_mb": floor,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "after_mb": rss_mb(), "weights_mb": weights / 2**20}))
"""


def measure(model: str | None, quantization: str, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, model or "", quantization, dtype], check=True,
                         capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["load_overhead_mb"] = r["peak_mb"] - r["floor_mb"] - r["weights_mb"]
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvserve.bench.load_memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default="auto,none,q8_0")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [measure(args.model, q, args.dtype) for q in args.quantization.split(",")]
    print("| --quantization | runs as | weights (MB) | peak RSS (MB) | floor (MB) | load overhead (MB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['quantization']} | {r['runs_as']} | {r['weights_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['floor_mb']:.0f} | {r['load_overhead_mb']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m kvserve.bench.load_memory " + " ".join(argv or sys.argv[1:]),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
