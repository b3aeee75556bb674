"""Micro-benchmarks behind kvserve's kernel choices (docs/benchmarks.md, "Why the kernels").

    python -m kvserve.bench.micro [--threads 2]
    python -m kvserve.bench.micro --threads 1 --decode-shapes 8x1024,2x4096,9x4096   # decode attention only
    python -m kvserve.bench.micro --decode-shapes 64x192,8x1024 --layers 30           # ... with its KV in DRAM
    python -m kvserve.bench.micro --digests                                           # KV store entry digests
    python -m kvserve.bench.micro --verify-shapes 4x512,8x2048   # one sequence's speculative verification rows
    python -m kvserve.bench.micro --fused-tokens 1,4,64,2048     # one layer's elementwise ops only
    python -m kvserve.bench.micro --prefill                      # prefill attention only

1. decode attention over the paged KV cache: PyTorch gather + einsum vs the native in-place kernel;
2. prefill attention of one fresh prompt and of a chunk over a cached prefix: SDPA (as kvserve calls it without
   the native kernel: causal, or gathered prefix + mask) vs the native kernel reading the paged KV in place;
3. one layer's elementwise ops at a step's token count: eager PyTorch vs the fused kernels;
4. bf16 linear layers: F.linear vs oneDNN with the weight pre-packed once (kvserve.model.layers.Linear).
Medians of repeated timings after a warm-up at the same shapes.
"""

from __future__ import annotations

import argparse
import itertools
import torch
import torch.nn.functional as F

from kvserve.bench.offline import median_time


def timeit(fn, repeats: int = 30, warmup: int = 5) -> float:
    return median_time(fn, warmup, repeats) * 1e3  # ms


def decode_attention_inputs(batch: int, ctx: int, layers: int, dtype: torch.dtype, g: torch.Generator):
    """(q, k_cache, v_cache, one block table per layer, seq_lens) for the paged decode kernel at 9 heads over 3 KV
    heads of 64 dims (SmolLM2), blocks of 16 in a random order. layers > 1: the pool holds that many layers' caches
    of disjoint blocks, for calls that read each in turn as a decode step does (30 layers of 64 x 192 tokens are
    ~280 MB of KV: each call's KV comes from DRAM, not the last level cache that one layer's 9 MB fits in)."""
    bs, hkv, d, h = 16, 3, 64, 9
    mb = -(-ctx // bs)
    nb = max(2000, layers * batch * mb + 100)  # a pool larger than the caches: KV comes from DRAM, as served
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    tables = [perm[i * batch * mb:(i + 1) * batch * mb].view(batch, mb) for i in range(layers)]
    q = torch.randn(batch, h, d, generator=g).to(dtype)
    return q, kc, vc, tables, torch.full((batch,), ctx, dtype=torch.int32)


def bench_decode_attention(batch: int = 64, ctx: int = 183, layers: int = 1) -> list[tuple[str, float]]:
    from kvserve.kernels import decode_attention_kernel
    from kvserve.model.attention import decode_attention_torch

    native = decode_attention_kernel()
    g = torch.Generator().manual_seed(0)
    where = f", {layers} layers in turn" if layers > 1 else ""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        q, kc, vc, tables, lens = decode_attention_inputs(batch, ctx, layers, dtype, g)
        name = str(dtype).replace("torch.", "")
        turn = itertools.cycle(tables)
        rows.append((f"decode attention, torch gather+einsum, {name}, B={batch} ctx={ctx}{where}",
                     timeit(lambda: decode_attention_torch(q, kc, vc, next(turn), lens, 0.125), 10)))
        if native is not None:
            rows.append((f"decode attention, native in-place kernel, {name}, B={batch} ctx={ctx}{where}",
                         timeit(lambda: native(q, kc, vc, next(turn), lens, 0.125), 30 * layers)))
    return rows


def bench_verify_rows(n: int, ctx: int, layers: int = 30) -> list[tuple[str, float]]:
    """One sequence's n verification rows (lengths ctx + 1 .. ctx + n, one block table) through the native decode
    kernel, against the same rows each with its own table (read once per row), for all layers of a step."""
    from kvserve.kernels import decode_attention_kernel

    native = decode_attention_kernel()
    if native is None:
        return []
    g = torch.Generator().manual_seed(0)
    bs, hkv, d, h = 16, 3, 64, 9
    mb = -(-(ctx + n) // bs)
    nb = max(2000, (n + 1) * mb * layers // 4)
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    lens = torch.arange(ctx + 1, ctx + n + 1, dtype=torch.int32)
    q = torch.randn(n, h, d, generator=g).to(torch.bfloat16)
    # a table per layer, so the step reads 30 layers' worth of KV as a real one does
    one = [torch.randperm(nb, generator=g)[:mb].repeat(n, 1) for _ in range(layers)]
    apart = [torch.randperm(nb, generator=g)[: n * mb].view(n, mb) for _ in range(layers)]

    def step(tables):
        for t in tables:
            native(q, kc, vc, t, lens, 0.125)

    return [(f"verification attention, {layers} layers, {n} rows at ctx {ctx}, one table", timeit(lambda: step(one))),
            (f"verification attention, {layers} layers, {n} rows at ctx {ctx}, a table per row",
             timeit(lambda: step(apart)))]


def bench_digests(tokens: int = 256) -> list[tuple[str, float]]:
    """The KV store's integrity digest over one stored chunk of the embedded model (30 layers, K and V, 3 heads of 64,
    bf16): what a loading instance pays per chunk before it may use the entry (docs/kvstore.md)."""
    import hashlib
    import os

    import xxhash

    payload = os.urandom(30 * 2 * tokens * 3 * 64 * 2)
    return [(f"digest of a {tokens}-token chunk ({len(payload) >> 20} MiB), {name}", timeit(fn, 10, 2))
            for name, fn in (("BLAKE2b-256", lambda: hashlib.blake2b(payload, digest_size=32).digest()),
                             ("SHA-256", lambda: hashlib.sha256(payload).digest()),
                             ("XXH3-128 (entry v3)", lambda: xxhash.xxh3_128_digest(payload)))]


def bench_prefill_attention() -> list[tuple[str, float]]:
    from kvserve.kernels import load, prefill_attention_kernel
    from kvserve.model.attention import prefill_attention
    from kvserve.model.batch import PrefillSeq

    native = prefill_attention_kernel()
    g = torch.Generator().manual_seed(0)
    nb, bs, hkv, d, h = 600, 16, 3, 64, 9
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    rows = []
    for ctx_start, n in ((0, 128), (0, 1024), (3584, 512)):
        blocks = torch.randperm(nb, generator=g)[: -(-(ctx_start + n) // bs)]
        seq = PrefillSeq(0, n, ctx_start, blocks)
        q = torch.randn(n, h, d, generator=g).to(torch.bfloat16)
        k = kc[blocks].view(-1, hkv, d)[ctx_start:ctx_start + n]  # this chunk's own K/V (the fresh-prompt path)
        v = vc[blocks].view(-1, hkv, d)[ctx_start:ctx_start + n]
        chunk = (torch.tensor([0]), torch.tensor([n]), torch.tensor([ctx_start]), blocks[None])  # one chunk
        out = torch.zeros(n, h, d, dtype=torch.bfloat16)
        label = f"prefill attention bf16, {n} tokens after {ctx_start} cached"
        rows.append((f"{label}: SDPA", timeit(lambda: prefill_attention(q, k, v, kc, vc, seq, 0.125), 10)))
        if native is None:
            continue
        attn = load("paged_attention")
        amx = attn is not None and attn.amx_enabled()
        if amx:  # on AMX the engine declines the kernel for plain chunks and runs SDPA: time the kernel anyway
            attn.set_amx(False)
        try:
            rows.append((f"{label}: native paged kernel" + (" (the engine runs SDPA here: AMX)" if amx else ""),
                         timeit(lambda: native(q, kc, vc, *chunk, out, 0.125), 10)))
        finally:
            if amx:
                attn.set_amx(True)
    return rows


def bench_fused_ops(tokens: int = 64) -> list[tuple[str, float]]:
    """One layer's elementwise work: input norm, RoPE + KV write, residual add + post norm, SiLU * up."""
    from kvserve.model.batch import ForwardBatch
    from kvserve.model.layers import RotaryEmbedding, TorchOps, native_ops

    rotary = RotaryEmbedding(64, 8192, 10000.0, None, None, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 576, generator=g).to(torch.bfloat16)
    w = torch.randn(576, generator=g).to(torch.bfloat16)
    delta = (torch.randn(tokens, 576, generator=g) * 1e-3).to(torch.bfloat16)
    qkv = torch.randn(tokens, 960, generator=g).to(torch.bfloat16)
    gu = torch.randn(tokens, 3072, generator=g).to(torch.bfloat16)
    caches = torch.zeros(2, 600, 16, 3, 64, dtype=torch.bfloat16)
    pos = torch.arange(tokens) + 100
    fb = ForwardBatch(pos, pos, torch.randperm(600 * 16, generator=g)[:tokens])
    rows = []
    for name, ops in (("eager PyTorch", TorchOps(rotary)), ("fused kernels", native_ops(rotary))):
        if ops is None:
            continue

        def layer():
            ops.rms_norm(h, w, 1e-5)
            ops.rope_qkv_write_(qkv, fb, ops.rope_tables(pos), caches[0], caches[1], 9, 3)
            ops.add_rms_norm_(h, delta, w, 1e-5)
            ops.silu_mul(gu)

        rows.append((f"a layer's elementwise ops, {tokens} tokens: {name}", timeit(layer)))
        rows.append((f"SiLU * up alone, {tokens} tokens: {name}", timeit(lambda: ops.silu_mul(gu))))
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
    ap.add_argument("--decode-shapes", default=None, metavar="BxCTX,...",
                    help="only decode attention, at these batch x context shapes (e.g. 8x1024,2x4096)")
    ap.add_argument("--layers", type=int, default=1,
                    help="with --decode-shapes: each call reads the next of this many layers' caches (30: KV from "
                         "DRAM, as in a decode step)")
    ap.add_argument("--digests", action="store_true", help="only the KV store's entry digests")
    ap.add_argument("--verify-shapes", default=None, metavar="NxCTX,...",
                    help="only one sequence's N speculative verification rows at context CTX (e.g. 4x512,8x2048)")
    ap.add_argument("--prefill", action="store_true", help="only prefill attention (AMX and AVX-512 side by side)")
    ap.add_argument("--fused-tokens", default=None, metavar="T,...",
                    help="only one layer's elementwise ops, at these token counts (e.g. 1,4,64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| what | median ms |\n| --- | --- |")
    if args.digests:
        rows = bench_digests()
    elif args.verify_shapes:
        rows = [r for shape in args.verify_shapes.split(",")
                for r in bench_verify_rows(*(int(x) for x in shape.lower().split("x")))]
    elif args.prefill:
        rows = bench_prefill_attention()
    elif args.fused_tokens:
        rows = [r for t in args.fused_tokens.split(",") for r in bench_fused_ops(int(t))]
    elif args.decode_shapes:
        rows = [r for shape in args.decode_shapes.split(",")
                for r in bench_decode_attention(*(int(x) for x in shape.lower().split("x")), layers=args.layers)]
    else:
        rows = bench_decode_attention() + bench_prefill_attention() + bench_fused_ops() + bench_fused_ops(2048) + \
            bench_linear()
    for name, ms in rows:
        print(f"| {name} | {ms:.4f} |")


if __name__ == "__main__":
    main()
