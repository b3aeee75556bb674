"""Why decode streams stall while a long prompt is prefilled: step times of 8 decoding streams alone and mixed with a
4,096-token prompt's chunks, per step budget; and the attention cost of a chunk over 4k cached tokens.

    python -m kvserve.bench.stall_steps [--budgets 512,128,64,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def step_times(budget: int) -> dict:
    from kvserve.engine.llm_engine import EngineArgs, LLMEngine
    from kvserve.sampling import SamplingParams

    e = LLMEngine(EngineArgs(max_num_batched_tokens=budget))
    for i in range(8):
        e.add_request(None, {"prompt_token_ids": [100 + i] * 64},
                      SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    for _ in range(20):  # past the streams' prefill, into steady decoding
        e.step()
    decode = []
    for _ in range(10):
        t = time.perf_counter()
        e.step()
        decode.append(time.perf_counter() - t)
    e.add_request(None, {"prompt_token_ids": list(range(200, 4296))}, SamplingParams(max_tokens=12, ignore_eos=True))
    mixed, started = [], time.perf_counter()
    sched = e.core.scheduler
    while sched.num_waiting or any(r.in_prefill for r in sched.running):
        t = time.perf_counter()
        e.step()
        mixed.append(time.perf_counter() - t)
    prefill_s = time.perf_counter() - started
    with_long = []  # the 8 streams plus the 4k-context sequence decoding beside them (what a P/D decode instance
    for _ in range(8):  # runs once a long prompt's KV has arrived)
        t = time.perf_counter()
        e.step()
        with_long.append(time.perf_counter() - t)
    return {"budget": budget, "decode_ms": 1e3 * statistics.median(decode), "mixed_steps": len(mixed),
            "mixed_median_ms": 1e3 * statistics.median(mixed), "mixed_max_ms": 1e3 * max(mixed),
            "prefill_s": prefill_s, "decode_with_4k_ms": 1e3 * statistics.median(with_long)}


def chunk_attention_ms(n: int, start: int, reps: int = 10) -> tuple[float, float, float]:
    """One layer's attention for an n-token chunk over `start` cached tokens: SDPA (kvserve's prefill path without
    the native kernels), kvserve's native decode kernel run once per query row, and the native prefill kernel."""
    from kvserve.kernels import decode_attention_kernel, prefill_attention_kernel
    from kvserve.model.attention import prefill_attention
    from kvserve.model.batch import PrefillSeq

    heads, kv_heads, dim, bs = 9, 3, 64, 16
    ctx = start + n
    nb = -(-ctx // bs)
    kc = torch.randn(nb, bs, kv_heads, dim, dtype=torch.bfloat16)
    vc = torch.randn(nb, bs, kv_heads, dim, dtype=torch.bfloat16)
    blocks = torch.arange(nb)
    q = torch.randn(n, heads, dim, dtype=torch.bfloat16)
    k = torch.randn(n, kv_heads, dim, dtype=torch.bfloat16)
    seq = PrefillSeq(0, n, start, blocks)
    # each query row as its own decode: (n, nb) block tables, (n,) lengths start + 1 .. ctx
    rows = (blocks.expand(n, nb).contiguous(), torch.arange(start + 1, ctx + 1, dtype=torch.int32))
    chunk = (torch.tensor([0]), torch.tensor([n]), torch.tensor([start]), blocks[None])  # the n tokens as one chunk
    decode = decode_attention_kernel()
    prefill = prefill_attention_kernel()
    out = torch.zeros(n, heads, dim, dtype=torch.bfloat16)

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t) / reps

    sdpa = timed(lambda: prefill_attention(q, k, k, kc, vc, seq, dim ** -0.5))
    native = timed(lambda: decode(q, kc, vc, *rows, dim ** -0.5)) if decode is not None else float("nan")
    paged = timed(lambda: prefill(q, kc, vc, *chunk, out, dim ** -0.5)) if prefill is not None else float("nan")
    return sdpa, native, paged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="512,128,64,32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| budget | decode step (8 streams) | mixed steps | mixed median | mixed max | 4k prefill "
          "| decode step (8 streams + one 4k context) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in (int(x) for x in args.budgets.split(",")):
        r = step_times(b)
        print(f"| {b} | {r['decode_ms']:.0f} ms | {r['mixed_steps']} | {r['mixed_median_ms']:.0f} ms | "
              f"{r['mixed_max_ms']:.0f} ms | {r['prefill_s']:.1f} s | {r['decode_with_4k_ms']:.0f} ms |", flush=True)
    print("\n| chunk over 4,000 cached tokens, one layer | SDPA | native decode kernel per row | native prefill kernel |")
    print("| --- | --- | --- | --- |")
    for n in (32, 128, 512):
        sdpa, native, paged = chunk_attention_ms(n, 4000)
        print(f"| {n} tokens | {sdpa:.2f} ms | {native:.2f} ms | {paged:.2f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
