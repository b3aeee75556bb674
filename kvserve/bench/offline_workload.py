"""A serving workload's exact requests run offline through `kvserve.LLM`, all at once, with the engine settings
`kvserve.bench.baselines kvserve` serves with: the ceiling a served run at saturation is measured against
(served output tok/s / offline output tok/s = what the HTTP server, IPC and front end cost).

    python -m kvserve.bench.offline_workload --workload sharegpt-like --num-requests 100 [--threads 2] [--out r.json]
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="sharegpt-like")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-gb", type=float, default=4.0)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="the server's default step budget")
    ap.add_argument("--quantization", default="none",
                    help="as `kvserve.bench.baselines kvserve` serves: bf16 weights (auto would run the file's Q4_1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from kvserve import LLM, SamplingParams
    from kvserve.bench.workloads import generate

    llm = LLM(dtype="bfloat16", quantization=args.quantization, num_threads=args.threads,
              kv_cache_memory_gb=args.kv_gb, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    tok = llm.engine.tokenizer
    reqs = generate(args.workload, tok, args.num_requests, args.seed)
    # what `kvserve bench serve` sends by default: /v1/completions with the messages' contents joined
    prompts = [{"prompt_token_ids": tok.encode(r.prompt_text())} for r in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    # warm-up at the timed shapes' buckets, on other text so the prefix cache cannot help the timed run
    warm = generate(args.workload, tok, min(32, args.num_requests), args.seed + 1)
    llm.generate([{"prompt_token_ids": tok.encode(r.prompt_text())} for r in warm],
                 SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outs)
    res = {"workload": args.workload, "num_requests": len(reqs), "seed": args.seed, "elapsed_s": elapsed,
           "output_tokens": out_tokens, "prompt_tokens": in_tokens, "output_tok_s": out_tokens / elapsed,
           "total_tok_s": (out_tokens + in_tokens) / elapsed, "threads": args.threads, "quantization": args.quantization,
           "max_num_batched_tokens": args.max_num_batched_tokens}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
