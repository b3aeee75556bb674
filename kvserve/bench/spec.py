"""Speculative decoding, offline: output tok/s with and without drafts, side by side on one set of weights.

    python -m kvserve.bench.spec [--workload repetitive] [--num-prompts 8] [--configs none,ngram,suffix,ngram:k=3]
                                 [--batch 1] [--quantization auto] [--step-cost] [--step-cost-context 512,2048]
                                 [--max-decode-rows N] [--decode-rows-max-context N] [--out FILE]

Each prompt runs under every config in turn (interleaved, so drift hits all alike) after one warm-up prompt per
config; greedy. --batch B sends B prompts at once (B concurrent streams). Reported per config: output tokens /
seconds, the ratio to `none`, mean accepted drafts per verification, drafted and accepted tokens, and how many
outputs are token-identical to `none` (bf16 verification runs the drafts through the prefill kernel, so a near-tie
can round the other way; fp32 identity is a test). --step-cost times one forward pass of 1..32 tokens per
sequence at batch 1, 4 and 8 (the curve the back-off learns online). Config syntax: method[:key=value,...] with
vLLM's keys, k as short for num_speculative_tokens, e.g. ngram:k=8,prompt_lookup_max=8, layer_skip:draft_layers=20,
draft_model:model=PATH,quantization=auto.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def parse_config(text: str) -> dict | None:
    if text == "none":
        return None
    method, _, rest = text.partition(":")
    cfg: dict = {"method": method}
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        key = {"k": "num_speculative_tokens"}.get(key, key)
        cfg[key] = _value(val)
    return cfg


def _value(text: str):
    """A config value: int, float, true/false, else the string itself (a draft model's path)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def step_cost(core, tokens=(1, 2, 4, 8, 16, 32), batches=(1, 4, 8), context: int = 512, repeats: int = 5) -> dict:
    """Seconds of one forward pass (ModelRunner.execute) of n tokens per sequence at `context` tokens of KV."""
    from kvserve.core.outputs import ScheduledRequest, SchedulerOutput
    from kvserve.core.request import Request
    from kvserve.sampling import SamplingParams

    kv, bs = core.kv_manager, core.info.block_size
    out: dict = {}
    for b in batches:
        for n in tokens:
            reqs = [Request(f"cost-{b}-{n}-{i}", list(range(100, 100 + context + n)), SamplingParams(temperature=0),
                        bs) for i in range(b)]
            for r in reqs:
                kv.allocate_slots(r, context + n)
            sched = SchedulerOutput([ScheduledRequest(r, context, n, kv.get_block_ids(r.request_id), True, False,
                                                      spec_token_ids=list(range(200, 200 + n - 1)))
                                     for r in reqs])
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                core.runner.execute(sched)
                times.append(time.perf_counter() - t0)
            for r in reqs:
                kv.free(r)
            out[f"b{b}_n{n}"] = statistics.median(times[1:])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="repetitive")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default="none,ngram,suffix")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=None, help="cap on each request's output tokens")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-cost", action="store_true")
    ap.add_argument("--step-cost-context", default="512", help="comma list of context lengths for --step-cost")
    ap.add_argument("--max-decode-rows", type=int, default=None,
                    help="verification runs as decode rows in steps of at most this many tokens (0: always as a "
                         "prefill chunk); default: the runner's")
    ap.add_argument("--decode-rows-max-context", type=int, default=None,
                    help="... and contexts of at most this many tokens; default: the runner's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from kvserve import LLM, SamplingParams
    from kvserve.bench.workloads import generate
    from kvserve.engine.core import EngineArgs
    from kvserve.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    # "a:k=3,suffix" splits wrongly on the comma inside a config: rejoin key=value pieces with their method
    merged: list[str] = []
    for c in configs:
        if "=" in c and ":" not in c and merged:
            merged[-1] += "," + c
        else:
            merged.append(c)
    configs = merged
    base = LLM(model=args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory_gb=1.0,
               max_num_seqs=max(args.batch, 1), batch_reorder=False)
    core = base.engine.core
    engines = {}
    for c in configs:
        ea = EngineArgs(model=args.model, dtype=args.dtype, quantization=core.model.quantization,
                        kv_cache_memory_gb=1.0, max_num_seqs=max(args.batch, 1), max_num_batched_tokens=2048,
                        speculative_config=parse_config(c))
        engines[c] = LLM.from_engine(LLMEngine(ea, model=core.model, tokenizer=core.tokenizer,
                                               model_name=core.info.model_name), batch_reorder=False)
    tok = core.tokenizer
    reqs = generate(args.workload, tok, args.num_prompts + 1, args.seed)
    warm, reqs = reqs[0], reqs[1:]

    def params(r):
        m = r.max_tokens if args.max_tokens is None else min(r.max_tokens, args.max_tokens)
        return SamplingParams(temperature=0, max_tokens=m)

    if not reqs:  # --num-prompts 0: the step-cost curve only
        configs, engines = [], {}
    for c, llm in engines.items():  # warm-up: oneDNN shapes, suffix trees stay empty (a different scope)
        llm.chat([warm.messages], params(warm), use_tqdm=False)
    results = {c: {"seconds": 0.0, "tokens": 0, "outputs": [], "per_prompt": []} for c in configs}
    batches = [reqs[i:i + args.batch] for i in range(0, len(reqs), args.batch)]
    for group in batches:
        for c, llm in engines.items():
            t0 = time.perf_counter()
            outs = llm.chat([r.messages for r in group], [params(r) for r in group], use_tqdm=False)
            dt = time.perf_counter() - t0
            n = sum(len(o.outputs[0].token_ids) for o in outs)
            res = results[c]
            res["seconds"] += dt
            res["tokens"] += n
            res["outputs"].extend(o.outputs[0].token_ids for o in outs)
            res["per_prompt"].append(n / dt)
    ref = configs[0] if configs else None
    report = {"workload": args.workload, "num_prompts": len(reqs), "batch": args.batch, "dtype": args.dtype,
              "quantization": core.model.quantization, "threads": args.threads, "configs": {}}
    for c in configs:
        res, llm = results[c], engines[c]
        rate = res["tokens"] / res["seconds"]
        s = llm.engine.stats().speculative
        entry = {"tok_s": round(rate, 2), "ratio": round(rate / (results[ref]["tokens"] / results[ref]["seconds"]), 3),
                 "per_prompt_ratio_median": round(statistics.median(
                     a / b for a, b in zip(res["per_prompt"], results[ref]["per_prompt"])), 3),
                 "output_tokens": res["tokens"], "seconds": round(res["seconds"], 2),
                 "identical_to_first": sum(a == b for a, b in zip(res["outputs"], results[ref]["outputs"]))}
        if s is not None:
            entry.update(mean_accepted=round(s.num_accepted_tokens / max(s.num_drafts, 1), 2),
                         draft_tokens=s.num_draft_tokens, accepted_tokens=s.num_accepted_tokens,
                         verifications=s.num_drafts, backed_off=s.num_backed_off,
                         acceptance_lengths=s.acceptance_lengths,
                         learned_step_cost_ms={n: round(1e3 * v, 2) for n, v in s.step_cost_s.items()})
        report["configs"][c] = entry
        print(f"{c:28s} {rate:8.2f} tok/s  x{entry['ratio']:.2f}  identical {entry['identical_to_first']}/{len(reqs)}"
              + (f"  mean accepted {entry['mean_accepted']}" if s is not None else ""), flush=True)
    if args.step_cost:
        if args.max_decode_rows is not None:
            core.runner.max_decode_rows = args.max_decode_rows
        if args.decode_rows_max_context is not None:
            core.runner.decode_rows_max_context = args.decode_rows_max_context
        report["step_cost_s"] = {}
        for ctx in (int(c) for c in args.step_cost_context.split(",")):
            for k, v in step_cost(core, context=ctx).items():
                report["step_cost_s"][f"ctx{ctx}_{k}"] = v
                print(f"step cost ctx {ctx:5d} {k:8s} {1e3 * v:8.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
