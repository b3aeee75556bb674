"""The paged decode attention kernel against a previous commit's build of it, in one process.

    python -m kvserve.bench.kernel_ab --rev 96bdb07 --decode-shapes 64x192,8x1024 --layers 30 [--rounds 15]

This host's speed drifts by 10-30% within minutes, more than most kernel changes, and separate processes a minute
apart carry that drift into their ratio. Here REV's kernel (its paged_attention.cpp and common.h, read from git) is
built as a second module beside the working tree's, and each round times both on the same tensors, one after the
other, over the same layers' caches (--layers 30: KV from DRAM, as in a decode step). Reported per shape: each
build's median microseconds per call, the median of the rounds' ratios (REV / tree: above 1, the tree is faster),
and in how many rounds the tree won. Both must give the same bits first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch

from kvserve.bench.micro import decode_attention_inputs

KERNEL_FILES = ("paged_attention.cpp", "common.h")


def build_at(rev: str):
    """REV's paged_attention module, built in a cache directory of its own (named by the commit)."""
    from torch.utils.cpp_extension import load as jit_load

    from kvserve.kernels import CFLAGS

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                          check=True).stdout.strip()
    commit = subprocess.run(["git", "rev-parse", "--short=12", rev], capture_output=True, text=True, cwd=root,
                            check=True).stdout.strip()
    src = os.path.join(tempfile.gettempdir(), f"kvserve-kernel-ab-{commit}")
    os.makedirs(src, exist_ok=True)
    for name in KERNEL_FILES:
        text = subprocess.run(["git", "show", f"{commit}:kvserve/kernels/{name}"], capture_output=True, cwd=root,
                              check=True).stdout
        with open(os.path.join(src, name), "wb") as f:
            f.write(text)
    return commit, jit_load(name=f"kvserve_paged_attention_{commit}", sources=[os.path.join(src, KERNEL_FILES[0])],
                            extra_include_paths=[src], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                            build_directory=src, verbose=False)


def compare(tree, old, batch: int, ctx: int, layers: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, kc, vc, tables, lens = decode_attention_inputs(batch, ctx, layers, torch.bfloat16, g)
    for t in tables[:3]:
        a = tree.paged_decode_attention(q, kc, vc, t, lens, 0.125, None)
        b = old.paged_decode_attention(q, kc, vc, t, lens, 0.125, None)
        if not torch.equal(a, b):
            raise SystemExit(f"B={batch} ctx={ctx}: the two builds disagree (max difference "
                             f"{(a.float() - b.float()).abs().max().item():.3g})")

    def one_pass(mod) -> float:  # microseconds per call, over every layer once
        t0 = time.perf_counter()
        for t in tables:
            mod.paged_decode_attention(q, kc, vc, t, lens, 0.125, None)
        return (time.perf_counter() - t0) / len(tables) * 1e6

    for _ in range(3):  # warm-up: both builds' code and the shapes
        one_pass(tree), one_pass(old)
    t_tree, t_old = [], []
    for i in range(rounds):
        for mod, out in ((tree, t_tree), (old, t_old)) if i % 2 == 0 else ((old, t_old), (tree, t_tree)):
            out.append(one_pass(mod))
    ratios = [o / t for o, t in zip(t_old, t_tree)]
    return {"tree_us": statistics.median(t_tree), "rev_us": statistics.median(t_old),
            "ratio": statistics.median(ratios), "tree_wins": sum(r > 1 for r in ratios), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="the commit to compare against (anything git rev-parse takes)")
    ap.add_argument("--decode-shapes", default="64x192,16x512,8x1024,4x256,1x256", metavar="BxCTX,...")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kvserve.kernels import load

    tree = load("paged_attention")
    if tree is None:
        raise SystemExit("the working tree's paged_attention kernel did not build")
    commit, old = build_at(args.rev)
    print(f"| shape | {commit}, us per call | tree, us per call | {commit} / tree, median of rounds | tree faster |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for shape in args.decode_shapes.split(","):
        b, ctx = (int(x) for x in shape.lower().split("x"))
        r = compare(tree, old, b, ctx, args.layers, args.rounds)
        print(f"| B={b} ctx={ctx} | {r['rev_us']:.1f} | {r['tree_us']:.1f} | {r['ratio']:.3f}x | "
              f"{r['tree_wins']} of {r['rounds']} |", flush=True)


if __name__ == "__main__":
    main()
