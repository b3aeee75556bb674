"""The layer matmuls of one decode step, per weight format and token count: what the kernel choices rest on.

    python -m kvserve.bench.linear_sweep [--tokens 1,4,8,64,256] [--layers 30] [--threads 2] [--paths best]
    python -m kvserve.bench.linear_sweep --prefetch-bytes 0,2048,8192 [--tokens 1,8] [--rounds 15]
    python -m kvserve.bench.linear_sweep --pair-tiles --tokens 64,128,256 [--rounds 15]
    python -m kvserve.bench.linear_sweep --dynamic-tiles --tokens 64,512,2048 --layers 4 [--rounds 15]

Random weights of SmolLM2's shapes (q/k/v 960x576, o 576x576, gate/up 3072x576, down 576x1536) for --layers layers,
so the weights do not fit in cache, as in a real step; each layer's four matmuls are called in order on fresh
activations of T tokens. Formats: bf16 through oneDNN with a pre-packed weight, bf16 through kvserve's Linear (the
gemv kernel up to 8 tokens, oneDNN above), q8_0, w8a8, q4_1. Prints the median of 15 sweeps in ms, the weight read
rate in GB/s and the speed-up over oneDNN bf16. `--paths best,avx2,portable` adds the quantized formats run by the
kernel's AVX2 path (what CPUs without AVX-512 run) and its portable C++ path, each forced on this CPU. Where AMX
runs, q8_0 and q4_1 take bf16 tiles from 128 tokens on (kvserve.model.quant.PREFILL_BF16_MIN_TOKENS), and `q8_0 int8
kernel` / `q4_1 int8 kernel` show the int8 kernel at every size beside them.

`--prefetch-bytes` compares the kernels' software prefetch distances instead (bf16 `Linear`, q8_0 and q4_1 on their
best path): each round times one sweep per distance, the distances' order rotated from round to round (on this host
whichever variant runs first after a change of buffers is slower), and prints each distance's median over the rounds.
`--pair-tiles` compares, the same way, the int8 kernel's tiles over one group of 16 weight rows and over two at once
(q8_0 and w8a8; the kernel takes two from 48 tokens on, so pass --tokens of 48 and more); `--dynamic-tiles` its two
ways of sharing a prompt-sized matmul between threads (a fixed half of the row groups each, or cache-sized units taken
from a shared counter; from 65 tokens, more than one 64-token pass). These tables add each variant's median per-round
speed-up over the first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


def build(layers: int, paths: list[str]) -> dict[str, list]:
    from kvserve.model.layers import Linear
    from kvserve.model.quant import KERNEL_PATHS, Int8Linear, Q4Linear

    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=g) * 0.02 for n, k in SHAPES] for _ in range(layers)]
    out = {
        "bf16 oneDNN": [[Linear(w.bfloat16(), small_batch_kernel=False) for w in ws] for ws in weights],
        "bf16 (Linear)": [[Linear(w.bfloat16()) for w in ws] for ws in weights],
    }
    for path in paths:
        for fmt, make in (("q8_0", Int8Linear), ("w8a8", Int8Linear), ("q4_1", Q4Linear)):
            lins = [[make(w, fmt) for w in ws] for ws in weights]
            for lin in (x for row in lins for x in row):
                lin.path = KERNEL_PATHS[path]
            out[fmt if path == "best" else f"{fmt} {path}"] = lins
            if fmt != "w8a8" and path == "best" and lins[0][0].prefill_bf16:  # AMX: the int8 kernel at every size
                kernel_only = [[make(w, fmt) for w in ws] for ws in weights]
                for lin in (x for row in kernel_only for x in row):
                    lin.prefill_bf16 = False
                out[f"{fmt} int8 kernel"] = kernel_only
    return out


def sweep_ms(layers: list, tokens: int, repeats: int = 15) -> float:
    xs = {k: torch.randn(tokens, k).bfloat16() for k in (576, 1536)}

    def once():
        for lins in layers:
            for (_, k), lin in zip(SHAPES, lins):
                lin(xs[k])

    once()
    once()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def variant_table(tokens: list[int], formats: dict[str, list], variants: dict[str, object], rounds: int) -> None:
    """Each round times one sweep per variant (`variants`: label -> a function that switches it on), the variants'
    order rotated from round to round; prints each variant's median over the rounds."""
    labels = list(variants)
    print("| tokens | format | " + " | ".join(labels) + " |")
    print("|---:|---|" + "---:|" * len(labels))
    for t in tokens:
        for name, lins in formats.items():
            times: dict[str, list[float]] = {v: [] for v in labels}
            for r in range(rounds):
                for i in range(len(labels)):
                    v = labels[(i + r) % len(labels)]
                    variants[v]()
                    times[v].append(sweep_ms(lins, t, repeats=1))
            nbytes = sum(lin.nbytes for row in lins for lin in row)
            first = times[labels[0]]
            cells = [f"{statistics.median(times[v]):.2f} ms, {nbytes / statistics.median(times[v]) / 1e6:.1f} GB/s, "
                     f"{statistics.median(a / b for a, b in zip(first, times[v])):.3f}x" for v in labels]
            print(f"| {t} | {name} | " + " | ".join(cells) + " |", flush=True)


def prefetch_table(tokens: list[int], layers: int, distances: list[int], rounds: int) -> None:
    from kvserve.bench.decode1 import set_prefetch

    formats = {k: v for k, v in build(layers, ["best"]).items() if k in ("bf16 (Linear)", "q8_0", "q4_1")}
    before = set_prefetch(0)
    try:
        variant_table(tokens, formats, {f"{d} B ahead": (lambda d=d: set_prefetch(d)) for d in distances}, rounds)
    finally:
        set_prefetch(before)


SWITCHES = {  # --pair-tiles / --dynamic-tiles: quant_gemm.cpp's switches, each compared off against on
    "pair": ("set_pair_tiles", "one row group", "two row groups"),
    "dynamic": ("set_dynamic_tiles", "fixed split", "cache-sized units, shared counter"),
}


def switch_table(switch: str, tokens: list[int], layers: int, rounds: int) -> None:
    """One of the int8 kernel's switches (SWITCHES), off against on, for q8_0 and w8a8."""
    from kvserve import kernels

    setter, off, on = SWITCHES[switch]
    flip = getattr(kernels.quant_gemm_module(), setter)
    formats = {k: v for k, v in build(layers, ["best"]).items() if k in ("q8_0", "w8a8")}
    try:
        variant_table(tokens, formats, {off: lambda: flip(False), on: lambda: flip(True)}, rounds)
    finally:
        flip(True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1,4,8,64,256")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="best", help="kernel paths of the quantized formats: best, avx2, portable")
    ap.add_argument("--prefetch-bytes", default=None,
                    help="compare these software prefetch distances (bytes, comma-separated; 0: off)")
    ap.add_argument("--pair-tiles", action="store_true",
                    help="compare the int8 kernel's tiles over one row group and over two (from 48 tokens)")
    ap.add_argument("--dynamic-tiles", action="store_true",
                    help="compare the int8 kernel's fixed split of row groups across threads with cache-sized units "
                         "taken from a shared counter (from 65 tokens)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the --prefetch-bytes / switch comparisons")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prefetch_bytes:
        prefetch_table([int(x) for x in args.tokens.split(",")], args.layers,
                       [int(x) for x in args.prefetch_bytes.split(",")], args.rounds)
        return 0
    for switch in ("pair", "dynamic"):
        if getattr(args, f"{switch}_tiles"):
            switch_table(switch, [int(x) for x in args.tokens.split(",")], args.layers, args.rounds)
            return 0
    formats = build(args.layers, args.paths.split(","))
    print("| tokens | " + " | ".join(formats) + " |")
    print("|---:|" + "---:|" * len(formats))
    for t in (int(x) for x in args.tokens.split(",")):
        ms = {name: sweep_ms(layers, t) for name, layers in formats.items()}
        base = ms["bf16 oneDNN"]
        cells = []
        for name, layers in formats.items():
            nbytes = sum(lin.nbytes for lins in layers for lin in lins)
            cells.append(f"{ms[name]:.2f} ms, {nbytes / ms[name] / 1e6:.1f} GB/s, {base / ms[name]:.2f}x")
        print(f"| {t} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
