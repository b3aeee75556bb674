"""What int8 weights cost in quality and buy in bytes, against the bfloat16 model (and float32, for scale).

    python -m kvserve.bench.quant_quality [--tokens 1024] [--formats q8_0,w8a8]

Teacher-forced over the kernel_quality text (the offline benchmark's fixed text, --tokens long, one prefill): per
format, the share of positions whose top-1 next token equals bfloat16's, the mean KL(bf16 || format) of the next-token
distributions over the full vocabulary, and the bytes of weights a decode step reads. bfloat16 against float32 is
printed too: the rounding the engine already accepts, the yardstick for the int8 formats' numbers. w8a8 is built as
the engine builds it (SmoothQuant-calibrated on kvserve.model.smoothquant's own text, not this one). Where AMX runs,
q8_0 and 4-bit prompts of >= 128 tokens go through a bf16 copy of each layer's weights (kvserve.model.quant), so
`vs_bf16_int8_kernel` repeats the comparison on the int8 kernel, the route every decode step takes.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvserve.bench.kernel_quality import held_out_token_ids, quality_token_ids
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_model
from kvserve.model.smoothquant import CALIBRATION_TEXT, smooth_for_w8a8
from kvserve.model.tokenizer import Tokenizer


def prompt_logprobs(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """Log-softmax of the next-token logits at every position of one prefill: (N, vocab) float32."""
    return torch.log_softmax(model.prefill_logits(ids), dim=-1)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    agree = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    kl = (ref.exp() * (ref - got)).sum(-1)  # (N,) KL(ref || got)
    return {"top1_agreement": round(agree, 4), "mean_kl": round(kl.mean().item(), 5),
            "p99_kl": round(kl.quantile(0.99).item(), 5)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--formats", default="q8_0,w8a8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-out", action="store_true",
                    help="over CPython's help topics (kernel_quality.held_out_token_ids) instead of the quality text")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    tokenizer = Tokenizer(loaded.tokenizer_source, loaded.chat_template)
    ids = held_out_token_ids(args.tokens, tokenizer) if args.held_out else quality_token_ids(args.tokens)
    bf16 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16)
    ref = prompt_logprobs(bf16, ids)
    fp32 = prompt_logprobs(LlamaModel(loaded.config, loaded.weights, torch.float32), ids)
    report = {"model": loaded.name, "source_format": loaded.weight_format, "tokens": args.tokens,
              "bf16": {"weight_bytes": bf16.weight_bytes(), "vs_float32": compare(fp32, ref)}}
    for fmt in args.formats.split(","):
        weights = loaded.weights
        if fmt == "w8a8":  # as the engine builds it
            weights = smooth_for_w8a8(loaded.config, weights, tokenizer.encode(CALIBRATION_TEXT))
        model = LlamaModel(loaded.config, weights, torch.bfloat16, quantization=fmt)
        got = prompt_logprobs(model, ids)
        report[fmt] = {"weight_bytes": model.weight_bytes(), "vs_bf16": compare(ref, got),
                       "vs_float32": compare(fp32, got)}
        linears = [lin for lw in model.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)]
        if any(getattr(lin, "prefill_bf16", False) for lin in linears):  # AMX: the prefill above took bf16 tiles
            for lin in linears:
                lin.prefill_bf16 = False
            report[fmt]["vs_bf16_int8_kernel"] = compare(ref, prompt_logprobs(model, ids))  # what decode steps run
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
