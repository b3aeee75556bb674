"""Micro-benchmarks behind kvserve's kernel choices (docs/benchmarks.md, "Why the kernels").

    python -m kvserve.bench.micro [--threads 2]

1. decode attention over the paged KV cache: PyTorch gather + einsum vs the native in-place kernel;
2. bf16 linear layers: F.linear vs oneDNN with the weight pre-packed once (kvserve.model.layers.Linear).
Medians of repeated timings after a warm-up at the same shapes.
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F

from kvserve.bench.offline import median_time


def timeit(fn, repeats: int = 30, warmup: int = 5) -> float:
    return median_time(fn, warmup, repeats) * 1e3  # ms


def bench_decode_attention(batch: int = 64, ctx: int = 183) -> list[tuple[str, float]]:
    from kvserve.kernels import paged_decode_attention_fn
    from kvserve.model.layers import decode_attention_torch
    from kvserve.worker.batch import ForwardBatch

    native = paged_decode_attention_fn()
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d, h = 2000, 16, 3, 64, 9
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
        vc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
        lens = torch.full((batch,), ctx, dtype=torch.int32)
        mb = -(-ctx // bs)
        tables = torch.randperm(nb, generator=g)[: batch * mb].view(batch, mb)
        q = torch.randn(batch, h, d, generator=g).to(dtype)
        fb = ForwardBatch(torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long),
                          torch.zeros(batch, dtype=torch.long), num_decodes=batch, decode_block_tables=tables,
                          decode_seq_lens=lens)
        name = str(dtype).replace("torch.", "")
        rows.append((f"decode attention, torch gather+einsum, {name}, B={batch} ctx={ctx}",
                     timeit(lambda: decode_attention_torch(q, kc, vc, fb, 0.125), 10)))
        if native is not None:
            rows.append((f"decode attention, native in-place kernel, {name}, B={batch} ctx={ctx}",
                         timeit(lambda: native(q, kc, vc, fb, 0.125))))
    return rows


def bench_linear() -> list[tuple[str, float]]:
    from kvserve.model.layers import Linear

    rows = []
    shapes = [("gate_up 3072x576", 3072, 576), ("lm_head 49152x576", 49152, 576)]
    for label, out_f, in_f in shapes:
        w = torch.randn(out_f, in_f).to(torch.bfloat16)
        lin = Linear(w)
        for m in (1, 8, 64, 512):
            x = torch.randn(m, in_f).to(torch.bfloat16)
            rep = 10 if out_f > 10000 else 50
            rows.append((f"{label} M={m}: F.linear bf16", timeit(lambda: F.linear(x, w), rep)))
            rows.append((f"{label} M={m}: pre-packed bf16 (packed={lin.packed})", timeit(lambda: lin(x), rep)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| what | median ms |\n| --- | --- |")
    for name, ms in bench_decode_attention() + bench_linear():
        print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
