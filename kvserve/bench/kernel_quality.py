"""What the bfloat16 kernels cost in quality, against the float32 engine (the HF-parity reference).

    python -m kvserve.bench.kernel_quality [--tokens 1024] [--chunk 256]

Teacher-forced over one long prompt (windows of the offline benchmark's fixed text), prefilled in chunks of --chunk
tokens so later chunks attend to a cached prefix: for each bfloat16 variant (native prefill attention + fused ops,
and plain PyTorch SDPA + eager ops) the share of positions whose top-1 next token equals float32's, and the mean
absolute difference of the log-probability float32's top-1 token gets. Both bfloat16 variants are compared with the
same float32 run, so the two lines say whether the native kernels are further from exact than PyTorch's own bf16.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvserve.bench.offline import text_token_ids
from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_model
from kvserve.model.tokenizer import Tokenizer
from kvserve.sampling import SamplingParams


def teacher_forced(llm: LLM, ids: list[int]) -> list[tuple[int, float, dict]]:
    """(top-1 token, its logprob, {token: logprob} of the top 5) for every prompt position after the first."""
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=5, temperature=0),
                       use_tqdm=False)[0]
    rows = []
    for entry in out.prompt_logprobs[1:]:
        top = {tok: lp.logprob for tok, lp in entry.items()}
        best = max(top, key=lambda t: top[t])
        rows.append((best, top[best], top))
    return rows


def quality_token_ids(tokens: int) -> list[int]:
    """The quality text: the offline benchmark's fixed text, repeated to `tokens` tokens."""
    text = text_token_ids()
    return (text * (tokens // len(text) + 1))[:tokens]


def held_out_token_ids(tokens: int, tokenizer) -> list[int]:
    """A second, longer text for quality checks: the first `tokens` tokens of CPython's own help topics
    (pydoc_data.topics, shipped with every Python: English prose and code, nothing downloaded). The quality text above
    is 400 tokens repeated, so it resolves top-1 agreement to about half a point; this one is distinct throughout.
    `tokenizer`: the model's (kvserve.model.tokenizer.Tokenizer)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[: tokens * 8], False)[:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than {tokens}")
    return ids


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=256, help="step token budget: the prompt is prefilled in chunks")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = quality_token_ids(args.tokens)
    loaded = load_model(None)
    tokenizer = Tokenizer(loaded.tokenizer_source, loaded.chat_template)

    def llm(model: LlamaModel) -> LLM:
        """An engine over a model built here: the weights are loaded once for all three runs."""
        engine_args = EngineArgs(dtype=str(model.dtype).removeprefix("torch."), max_num_batched_tokens=args.chunk,
                                 enable_prefix_caching=False, kv_cache_memory_gb=0.5)
        return LLM.from_engine(LLMEngine(engine_args, model=model, tokenizer=tokenizer, model_name=loaded.name))

    ref = teacher_forced(llm(LlamaModel(loaded.config, loaded.weights, torch.float32)), ids)
    native = LlamaModel(loaded.config, loaded.weights, torch.bfloat16)
    report = {"tokens": args.tokens, "chunk": args.chunk,
              "native_prefill_kernel": native.attention.prefill_kernel is not None}
    for name, model in {"bf16 native kernels": native,
                        "bf16 PyTorch (SDPA, eager ops)": native.with_native_kernels(False)}.items():
        got = teacher_forced(llm(model), ids)
        agree = sum(g[0] == r[0] for g, r in zip(got, ref)) / len(ref)
        # logprob of float32's top-1 token under bf16 (when it is in bf16's top 5; else bf16's 5th logprob bounds it)
        diffs = [abs(g[2].get(r[0], min(g[2].values())) - r[1]) for g, r in zip(got, ref)]
        report[name] = {"top1_agreement": round(agree, 4), "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 5)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
