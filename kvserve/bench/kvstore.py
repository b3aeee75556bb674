"""Tiered KV store benchmark: TTFT of long prompts, recompute vs load from each tier and codec; bytes per token per
codec; the quality cost of the lossy codecs against the exact path.

    python -m kvserve.bench.kvstore [--lengths 1024,4096,8000] [--tiers memory,disk,redis] [--codecs none,zstd,int8,int4]
                                    [--quality-prompts 8] [--threads 2] [--out kvstore.json]

TTFT is the wall time of a 1-token greedy request on a fresh pool: "recompute" runs the whole prompt through the
model; "load" finds every full 256-token chunk in the tier (written by an earlier run of the same prompt, then the
pool's prefix cache reset) and computes only the tail. Each figure is the median of --repeats runs after a warm-up.

Quality (teacher-forced, so one early divergence does not decide the rest): for each prompt (windows of the offline
benchmark's text, --quality-context tokens) the exact greedy continuation of --quality-tokens tokens is fed after
the context, once with the context's exact KV and once with the KV after a codec round trip. Reported: greedy
agreement (share of positions whose argmax is the same) and the mean KL(exact || codec) of the next-token
distributions, computed in float32 over the full vocabulary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time

import torch

from kvserve.bench.offline import make_prompts, text_token_ids
from kvserve.core.outputs import ScheduledRequest
from kvserve.core.request import Request
from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
from kvserve.kvstore import codec as codecs
from kvserve.sampling import SamplingParams

GREEDY1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def log(msg: str) -> None:
    print(f"[kvstore-bench] {msg}", file=sys.stderr, flush=True)


def _prompt(text_ids: list[int], length: int, seed: int) -> list[int]:
    return make_prompts([(length, 1)], text_ids, seed)[0][0]


def _ttft(engine: LLMEngine, ids: list[int]) -> tuple[float, int]:
    rid = engine.add_request(None, {"prompt_token_ids": ids}, GREEDY1)
    t0 = time.perf_counter()
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return time.perf_counter() - t0, out.num_cached_tokens


def _stored_chunks(engine: LLMEngine, ids: list[int], chunk: int) -> list[tuple[bytes, torch.Tensor]]:
    """(hash, KV) of every full chunk of `ids`, read from the blocks the last run left cached in the pool."""
    bs = engine.core.kv_cache.block_size
    probe = Request("probe", ids, GREEDY1, bs)
    blocks = engine.core.kv_manager.match_prefix(probe).blocks
    per = chunk // bs
    out = []
    for k in range(len(blocks) // per):
        ids_k = [b.block_id for b in blocks[k * per:(k + 1) * per]]
        out.append((probe.block_hashes[(k + 1) * per - 1], engine.core.kv_cache.read_blocks(ids_k)))
    return out


def bench_ttft(base: LLMEngine, text_ids: list[int], lengths: list[int], tiers: list[str], codec_names: list[str],
               repeats: int, redis_url: str | None, workdir: str) -> list[dict]:
    rows = []
    _ttft(base, _prompt(text_ids, lengths[0], 999))  # warm-up: the step shapes every run below uses
    for length in lengths:
        # recompute: a fresh prompt every run, so nothing is cached anywhere
        times = []
        for r in range(repeats):
            ids = _prompt(text_ids, length, 1000 + length + r)
            times.append(_ttft(base, ids)[0])
        rec = statistics.median(times)
        chunks = _stored_chunks(base, ids, 256)  # the last prompt's KV, as its first run would have saved it
        base.reset_prefix_cache()
        rows.append({"tokens": length, "path": "recompute", "tier": "-", "codec": "-", "ttft_s": rec, "speedup": 1.0})
        log(f"{length} tokens: recompute {rec:.3f}s")
        for tier in tiers:
            for codec in codec_names:
                spec = {"memory": f"memory:8GB:{codec}", "disk": f"disk:{workdir}/disk-{codec}:16GB:{codec}",
                        "redis": f"{redis_url}?codec={codec}&cap=8GB&timeout=5" if redis_url else None}[tier]
                if spec is None:
                    continue
                engine = LLMEngine(EngineArgs(kv_store=spec, kv_cache_memory_gb=0.5,
                                              max_num_batched_tokens=base.core.args.max_num_batched_tokens),
                                   model=base.core.model, tokenizer=base.tokenizer, model_name=base.info.model_name)
                engine.core.kv_store.observe_prefill(length, rec)  # this run's measured prefill speed
                engine.core.kv_store.save(chunks)
                engine.core.kv_store.flush(600)
                loads, cached = [], 0
                for _ in range(repeats + 1):  # the first load warms the shapes of the tail
                    engine.reset_prefix_cache()
                    t, cached = _ttft(engine, ids)
                    loads.append(t)
                t = statistics.median(loads[1:])
                rows.append({"tokens": length, "path": "load", "tier": tier, "codec": codec, "ttft_s": t,
                             "speedup": rec / t, "loaded_tokens": cached})
                log(f"{length} tokens: {tier}/{codec} {t:.3f}s ({rec / t:.1f}x), {cached} tokens loaded")
                engine.close()
    return rows


def bench_sizes(base: LLMEngine, text_ids: list[int], codec_names: list[str]) -> list[dict]:
    """Encoded bytes per token of one real 256-token chunk, and encode/decode speed."""
    kv = _context_kv(base, _prompt(text_ids, 256, 7), 256)
    raw = kv.numel() * kv.element_size()
    rows = []
    for codec in codec_names:
        t0 = time.perf_counter()
        payload = codecs.encode(kv, codec)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        codecs.decode(payload, codec, tuple(kv.shape), kv.dtype)
        dec = time.perf_counter() - t0
        rows.append({"codec": codec, "bytes_per_token": len(payload) / 256, "ratio_vs_raw": raw / len(payload),
                     "encode_MBps": raw / enc / 1e6, "decode_MBps": raw / dec / 1e6})
    return rows


@torch.inference_mode()
def _run_chunk(engine: LLMEngine, req: Request, start: int, n: int, block_ids: list[int],
               want_logits: bool) -> torch.Tensor | None:
    sr = ScheduledRequest(req, start, n, block_ids, sample=False, prompt_logprobs=want_logits)
    batch, _, (_, prompt_rows) = engine.core.runner.build_batch([sr])
    hidden = engine.core.model.forward(batch, engine.core.kv_cache.layers)
    if not want_logits:
        return None
    first, count, _ = prompt_rows[req.request_id]
    return engine.core.model.compute_logits(hidden)[first:first + count].float()


def _context_kv(engine: LLMEngine, ids: list[int], context: int) -> torch.Tensor:
    bs = engine.core.kv_cache.block_size
    block_ids = list(range(-(-len(ids) // bs)))
    req = Request("q", ids + [0], SamplingParams(), bs)
    for s in range(0, context, 512):
        _run_chunk(engine, req, s, min(512, context - s), block_ids, False)
    return engine.core.kv_cache.read_blocks(block_ids[: context // bs])


def bench_quality(base: LLMEngine, text_ids: list[int], codec_names: list[str], num_prompts: int, context: int,
                  new_tokens: int) -> list[dict]:
    bs = base.core.kv_cache.block_size
    per_codec = {c: {"agree": 0, "total": 0, "kl": []} for c in codec_names}
    for p in range(num_prompts):
        ctx = _prompt(text_ids, context, 300 + p)
        greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        cont = LLM.from_engine(base).generate({"prompt_token_ids": ctx}, greedy, use_tqdm=False)[0].outputs[0].token_ids
        base.reset_prefix_cache()  # the harness below writes blocks directly: no cached block may point at them
        ids = ctx + cont
        block_ids = list(range(-(-len(ids) // bs)))
        req = Request("q", ids + [0], SamplingParams(), bs)
        exact_kv = _context_kv(base, ids, context)
        ctx_blocks = block_ids[: context // bs]
        ref = _run_chunk(base, req, context, len(cont), block_ids, True)  # (len(cont) - 1 + 1, vocab)
        ref_lp = torch.log_softmax(ref, -1)
        for codec in codec_names:
            kv = codecs.decode(codecs.encode(exact_kv, codec), codec, tuple(exact_kv.shape), exact_kv.dtype)
            base.core.kv_cache.write_blocks(ctx_blocks, kv)
            got = torch.log_softmax(_run_chunk(base, req, context, len(cont), block_ids, True), -1)
            st = per_codec[codec]
            st["agree"] += int((got.argmax(-1) == ref_lp.argmax(-1)).sum())
            st["total"] += got.shape[0]
            st["kl"].extend((ref_lp.exp() * (ref_lp - got)).sum(-1).tolist())
        base.core.kv_cache.write_blocks(ctx_blocks, exact_kv)
    return [{"codec": c, "greedy_agreement": st["agree"] / st["total"], "mean_kl": statistics.fmean(st["kl"]),
             "max_kl": max(st["kl"]), "positions": st["total"]} for c, st in per_codec.items()]


def markdown(report: dict) -> str:
    lines = ["| prompt tokens | path | tier | codec | TTFT (s) | vs recompute |", "|---|---|---|---|---|---|"]
    for r in report["ttft"]:
        lines.append(f"| {r['tokens']} | {r['path']} | {r['tier']} | {r['codec']} | {r['ttft_s']:.3f} | "
                     f"{r['speedup']:.1f}x |")
    lines += ["", "| codec | bytes/token | smaller than raw | encode MB/s | decode MB/s |", "|---|---|---|---|---|"]
    for r in report["sizes"]:
        lines.append(f"| {r['codec']} | {r['bytes_per_token']:.0f} | {r['ratio_vs_raw']:.2f}x | "
                     f"{r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} |")
    if report.get("quality"):
        lines += ["", "| codec | greedy agreement | mean KL | max KL | positions |", "|---|---|---|---|---|"]
        for r in report["quality"]:
            lines.append(f"| {r['codec']} | {100 * r['greedy_agreement']:.1f}% | {r['mean_kl']:.5f} | "
                         f"{r['max_kl']:.4f} | {r['positions']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,8000")
    ap.add_argument("--tiers", default="memory,disk,redis")
    ap.add_argument("--codecs", default="none,zstd,int8,int4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality-prompts", type=int, default=8)
    ap.add_argument("--quality-context", type=int, default=1024)
    ap.add_argument("--quality-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workdir", default=None, help="disk tier directory (default: a temp dir, removed after)")
    ap.add_argument("--skip-ttft", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    codec_names = args.codecs.split(",")
    text_ids = text_token_ids()
    base = LLMEngine(EngineArgs(dtype=args.dtype, max_num_batched_tokens=512, kv_cache_memory_gb=2.0))
    report = {"machine": {"threads": args.threads, "torch": torch.__version__}, "dtype": args.dtype,
              "model": base.info.model_name, "chunk_size": 256}
    workdir = args.workdir or tempfile.mkdtemp(prefix="kvserve-kvbench-")
    redis = None
    try:
        report["sizes"] = bench_sizes(base, text_ids, codec_names)
        report["quality"] = bench_quality(base, text_ids, [c for c in codec_names if c not in codecs.LOSSLESS],
                                          args.quality_prompts, args.quality_context, args.quality_tokens)
        for r in report["quality"]:
            log(f"quality {r}")
        base.reset_prefix_cache()
        report["ttft"] = []
        if not args.skip_ttft:
            tiers = args.tiers.split(",")
            redis_url = None
            if "redis" in tiers:
                from kvserve.kvstore.redis_server import RedisServer
                try:
                    redis = RedisServer().start()
                    redis_url = redis.url
                except (FileNotFoundError, RuntimeError) as e:
                    log(f"skipping the redis tier: {e}")
            report["ttft"] = bench_ttft(base, text_ids, [int(x) for x in args.lengths.split(",")], tiers,
                                        codec_names, args.repeats, redis_url, workdir)
    finally:
        if redis is not None:
            redis.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
