"""Offline batch-1 decode against the memory-bandwidth bound of the weights' own format.

    python -m kvserve.bench.decode1 [--model PATH] [--quantization none,q8_0,w8a8] [--tokens 256] [--repeats 3]
                                    [--prompt-len 32] [--decode-steps 1]
                                    [--torch-argmax | --no-prefetch | --compare-steps N | --no-split |
                                     --small-pages]

A batch-1 decode step reads every weight once, so its ceiling is (read bandwidth) / (weight bytes). For each format
this prints the median tok/s over --repeats generations of --tokens tokens after a --prompt-len-token prompt, the
weight bytes a step reads (kvserve's own count: int8 codes and scales for q8_0), and the share of the bound, with
the bandwidth measured in the same run: the larger of a 512 MiB copy (STREAM convention, read + write bytes, as
`kvserve bench offline --roofline`) and a 512 MiB float32 sum (read only).

This host's memory speed drifts by 15-30% from one minute to the next, so one bandwidth figure taken at the end
can pair a fast decode with a slow measurement or the reverse. Both figures are therefore also measured before every
repeat and after the last: each repeat's share is its rate against the mean of the two measurements around it, and
the "paired" columns are the medians of those shares, against the read figure (issue 16's definition of the bound:
a decode step only reads its weights) and against the better of copy and read (the end-of-run column's rule; the copy
counts written bytes too, and on this host it has measured up to 1.6x the read figure in the same minute).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def bandwidth_gb_s(mib: int = 512) -> tuple[float, float]:
    """(copy: read + write bytes of a 512 MiB copy / s, read: bytes of a float32 sum over 512 MiB / s)."""
    import torch

    from kvserve.bench.offline import median_time

    x = torch.ones((mib << 20) // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    y.fill_(0)  # touch the pages first: a fresh tensor's first writes time page faults
    copy = 2 * (mib << 20) / median_time(lambda: y.copy_(x)) / 1e9
    read = (mib << 20) / median_time(lambda: x.sum()) / 1e9
    return copy, read


def paired_shares(rates: list[float], bandwidths: list[float], weight_bytes: int) -> list[float]:
    """Each repeat's share of its own bound: rates[i] tok/s against the mean of the bandwidths measured just before
    it (bandwidths[i]) and just after it (bandwidths[i + 1]), in GB/s."""
    if len(bandwidths) != len(rates) + 1:
        raise ValueError(f"{len(rates)} repeats need {len(rates) + 1} bandwidth figures, got {len(bandwidths)}")
    return [r * weight_bytes / ((bandwidths[i] + bandwidths[i + 1]) / 2 * 1e9) for i, r in enumerate(rates)]


def set_split(on: bool) -> None:
    """Splits a few sequences' decode attention across threads, or not, in every module that runs it."""
    from kvserve import kernels

    for mod in (kernels.decode_step_module(), kernels.load("paged_attention")):
        if mod is not None:
            mod.set_split(on)


def small_pages_plan(model):
    """A decode plan over copies of the streamed weights made by torch's allocator (4 KiB pages where THP is in
    madvise mode), for --small-pages; the model keeps its own weights (kvserve.model.hugepages)."""
    held = model.streamed_weights()
    originals = [getattr(obj, name) for obj, name in held]
    for (obj, name), t in zip(held, originals):
        setattr(obj, name, t.clone())
    try:
        return model.build_decode_plan()
    finally:
        for (obj, name), t in zip(held, originals):
            setattr(obj, name, t)


def set_prefetch(nbytes: int) -> int:
    """Sets the software prefetch distance of every kernel module a decode step runs (the plan's, the lm_head's);
    returns the distance they had (the kernels' default until something changes it)."""
    from kvserve import kernels

    mods = [m for m in (kernels.decode_step_module(), kernels.quant_gemm_module(), kernels.gemv_module())
            if m is not None]
    before = mods[0].prefetch_bytes() if mods else 0
    for mod in mods:
        mod.set_prefetch_bytes(nbytes)
    return before


def run(model: str | None, quantization: str, tokens: int, repeats: int, threads: int,
        torch_argmax: bool = False, no_prefetch: bool = False, bandwidth=bandwidth_gb_s, decode_steps: int = 1,
        compare_steps: int | None = None, prompt_len: int = 32, no_split: bool = False,
        small_pages: bool = False) -> dict:
    """With torch_argmax (or no_prefetch, or compare_steps), every repeat runs twice, alternating: the engine as it
    is, and with torch.argmax as the greedy argmax (the sampler's path before the native one; or with the kernels'
    software prefetch off; or an engine over the same weights taking compare_steps decode steps per engine step; or
    the decode attention not split across threads; or the decode plan over copies of the weights on ordinary pages),
    so the two are compared in one process, through the host's swings. `decode_steps`: the engine's own setting.
    `bandwidth()` ((copy, read) GB/s) is called before every repeat and after the last (see paired_shares)."""
    import torch

    from kvserve import LLM, SamplingParams
    from kvserve.engine.core import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine

    torch.set_num_threads(threads)
    kw = dict(model=model, quantization=quantization, kv_cache_memory_gb=0.25, max_num_seqs=1)
    llm = LLM(**kw, decode_steps=decode_steps)
    prompt = {"prompt_token_ids": [1000 + i % 40_000 for i in range(prompt_len)]}
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate([prompt], warm, use_tqdm=False)
    other = None
    if compare_steps is not None:
        core = llm.engine.core
        other = LLM.from_engine(LLMEngine(EngineArgs(**kw, max_num_batched_tokens=2048, decode_steps=compare_steps),
                                          model=core.model, tokenizer=core.tokenizer,
                                          model_name=llm.engine.info.model_name))
        other.generate([prompt], warm, use_tqdm=False)
    sampler = llm.engine.core.runner.sampler
    engine_argmax = sampler.argmax
    model = llm.engine.core.model
    engine_plan = model.decode_plan
    prefetch = set_prefetch(0)  # the kernels' distance; as_is() puts it back before every repeat

    def as_is():
        sampler.argmax = engine_argmax
        set_prefetch(prefetch)
        set_split(True)
        model.decode_plan = engine_plan

    def with_torch_argmax():
        sampler.argmax = lambda x: x.argmax(dim=-1)

    variants = {"engine": (llm, as_is)}
    if torch_argmax:
        variants["torch_argmax"] = (llm, with_torch_argmax)
    if no_prefetch:
        variants["no_prefetch"] = (llm, lambda: set_prefetch(0))
    if other is not None:
        variants["other_steps"] = (other, as_is)
    if no_split:
        variants["no_split"] = (llm, lambda: set_split(False))
    if small_pages:
        plan = small_pages_plan(model)
        variants["small_pages"] = (llm, lambda: setattr(model, "decode_plan", plan))
    rates: dict[str, list[float]] = {k: [] for k in variants}
    tokens_of: dict[str, list[int]] = {}
    bws: list[tuple[float, float]] = []  # (copy, read)
    for _ in range(repeats):
        bws.append(bandwidth())
        for name, (engine, setup) in variants.items():
            setup()
            t0 = time.perf_counter()
            out = engine.generate([prompt], params, use_tqdm=False)[0]
            dt = time.perf_counter() - t0
            rates[name].append(len(out.outputs[0].token_ids) / dt)
            tokens_of.setdefault(name, out.outputs[0].token_ids)
    bws.append(bandwidth())
    as_is()
    info = llm.engine.info
    wb = llm.engine.core.model.weight_bytes()
    res = {"model": info.model_name, "quantization": info.quantization, "decode_steps": decode_steps,
           "compare_steps": compare_steps, "tok_s": statistics.median(rates["engine"]),
           "runs": rates["engine"], "weight_bytes": wb, "paired_copy_read_gb_s": bws}
    if len(variants) == 1:  # with a comparison, each repeat's two generations share a bandwidth pair: no share
        res["paired_shares_read"] = paired_shares(rates["engine"], [r for _, r in bws], wb)
        res["paired_shares_best"] = paired_shares(rates["engine"], [max(b) for b in bws], wb)
        res["paired_share_read"] = statistics.median(res["paired_shares_read"])
        res["paired_share_best"] = statistics.median(res["paired_shares_best"])
    for name in list(variants)[1:]:
        res[f"{name}_tok_s"] = statistics.median(rates[name])
        res[f"{name}_runs"] = rates[name]
        res["same_tokens"] = tokens_of["engine"] == tokens_of[name]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantization", default="none,q8_0")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--torch-argmax", action="store_true",
                    help="also time each repeat with torch.argmax as the greedy sampler's argmax (alternating)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="also time each repeat with the kernels' software prefetch off (alternating)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before the timed decode")
    ap.add_argument("--no-split", action="store_true",
                    help="also time each repeat with the decode attention not split across threads (alternating)")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="the engine's greedy decode steps per engine step (EngineArgs.decode_steps)")
    ap.add_argument("--compare-steps", type=int, default=None,
                    help="also time each repeat with an engine over the same weights at this many decode steps per "
                         "engine step (alternating)")
    ap.add_argument("--small-pages", action="store_true",
                    help="also time each repeat with the decode plan over copies of the weights on ordinary pages "
                         "(alternating)")
    args = ap.parse_args(argv)
    if sum((args.torch_argmax, args.no_prefetch, args.compare_steps is not None, args.no_split,
            args.small_pages)) > 1:
        ap.error("--torch-argmax, --no-prefetch, --compare-steps, --no-split and --small-pages are separate "
                 "comparisons: pick one")
    results = [run(args.model, q, args.tokens, args.repeats, args.threads, args.torch_argmax, args.no_prefetch,
                   decode_steps=args.decode_steps, compare_steps=args.compare_steps, prompt_len=args.prompt_len,
                   no_split=args.no_split, small_pages=args.small_pages)
               for q in args.quantization.split(",")]
    copy, read = bandwidth_gb_s()
    bw = max(copy, read)  # the bound with the better of the two (the harder bar)
    print(f"copy bandwidth {copy:.2f} GB/s, read bandwidth {read:.2f} GB/s; bound at {bw:.2f} GB/s; batch-1 decode, "
          f"{args.tokens} tokens after a {args.prompt_len}-token prompt, median of {args.repeats}")
    print("| format | tok/s | ms/token | weight MB | bound tok/s | % of bound | paired, read: % per repeat (read "
          "GB/s around it) | paired median, read | paired median, better of copy and read |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in results:
        bound = bw * 1e9 / r["weight_bytes"]
        r["bound_tok_s"], r["copy_gb_s"], r["read_gb_s"] = bound, copy, read
        per, p_read, p_best = "", "", ""
        if "paired_share_read" in r:
            b = [x for _, x in r["paired_copy_read_gb_s"]]
            per = ", ".join(f"{100 * s:.1f}% ({(b[i] + b[i + 1]) / 2:.1f})"
                            for i, s in enumerate(r["paired_shares_read"]))
            p_read, p_best = f"{100 * r['paired_share_read']:.1f}%", f"{100 * r['paired_share_best']:.1f}%"
        print(f"| {r['quantization']} | {r['tok_s']:.1f} | {1e3 / r['tok_s']:.2f} | {r['weight_bytes'] / 1e6:.0f} | "
              f"{bound:.1f} | {100 * r['tok_s'] / bound:.1f}% | {per} | {p_read} | {p_best} |")
    labels = {"torch_argmax": ("with torch.argmax", "the engine's argmax"),
              "no_prefetch": ("with the prefetch off", "with it on"),
              "other_steps": (f"at {args.compare_steps} decode steps per engine step",
                              f"at {args.decode_steps}"),
              "no_split": ("with the attention unsplit", "split"),
              "small_pages": ("with the weights on ordinary pages", "on huge pages")}
    for r in results:
        for name, (other, ours) in labels.items():
            if f"{name}_tok_s" not in r:
                continue
            pairs = sum(a > b for a, b in zip(r["runs"], r[f"{name}_runs"]))
            print(f"{r['quantization']}: {other} {r[f'{name}_tok_s']:.1f} tok/s ({1e3 / r[f'{name}_tok_s']:.3f} "
                  f"ms/token); {ours} {r['tok_s'] / r[f'{name}_tok_s']:.3f}x, faster in {pairs} of "
                  f"{len(r['runs'])} pairs; same tokens: {r['same_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
