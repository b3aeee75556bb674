"""w8a8 quality against SmoothQuant's migration strength, and with the MLP down projection kept at q8_0.

    python -m kvserve.bench.w8a8_sweep [--alphas 0.5,0.65,0.8] [--tokens 1024]
    python -m kvserve.bench.w8a8_sweep --heads     # the output matrix (lm_head) at w8a8, q8_0 and bf16 instead

Teacher-forced over the quant_quality text against the bf16 model (as `python -m kvserve.bench.quant_quality`): per
alpha, the top-1 agreement and KL of w8a8 (calibrated on kvserve.model.smoothquant's own text), then the same model
with every layer's down projection (the input with the largest activation outliers, after SiLU x up) as q8_0.
`--heads` asks what keeping the output matrix at higher precision buys (llama.cpp's quantized files keep it at
6-8 bits): w8a8 (alpha 0.5) and q8_0 with their lm_head at each precision, and w8a8 with the down projections at
q8_0 and a bf16 lm_head.
"""

from __future__ import annotations

import argparse

import torch

from kvserve.bench.kernel_quality import quality_token_ids
from kvserve.bench.quant_quality import compare, prompt_logprobs
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_model
from kvserve.model.quant import Int8Linear
from kvserve.model.smoothquant import CALIBRATION_TEXT, input_absmax, smoothed_weights
from kvserve.model.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.5,0.65,0.8")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", action="store_true", help="the lm_head's precision instead of alpha")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = quality_token_ids(args.tokens)
    loaded = load_model(None)
    tok = Tokenizer(loaded.tokenizer_source, loaded.chat_template)
    bf16 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="none")
    ref = prompt_logprobs(bf16, ids)
    stats = input_absmax(bf16, tok.encode(CALIBRATION_TEXT))
    if args.heads:
        return heads(loaded, bf16, ids, ref, stats)
    print("| alpha | w8a8 top-1 / mean KL | w8a8, down q8_0: top-1 / mean KL |")
    print("| --- | --- | --- |")
    for alpha in (float(a) for a in args.alphas.split(",")):
        w = smoothed_weights(loaded.config, loaded.weights, stats, alpha)
        m = LlamaModel(loaded.config, w, torch.bfloat16, quantization="w8a8")
        plain = compare(ref, prompt_logprobs(m, ids))
        for i, lw in enumerate(m.layers):
            lw.down = Int8Linear(w[f"model.layers.{i}.mlp.down_proj.weight"], "q8_0")
        mixed = compare(ref, prompt_logprobs(m, ids))
        print(f"| {alpha} | {plain['top1_agreement']:.2%} / {plain['mean_kl']:.4f} | "
              f"{mixed['top1_agreement']:.2%} / {mixed['mean_kl']:.4f} |", flush=True)
    return 0


def heads(loaded, bf16: LlamaModel, ids: list[int], ref, stats) -> int:
    head = loaded.weights["model.embed_tokens.weight" if loaded.config.tie_word_embeddings else "lm_head.weight"]
    w = smoothed_weights(loaded.config, loaded.weights, stats, 0.5)
    w8a8 = LlamaModel(loaded.config, w, torch.bfloat16, quantization="w8a8")
    q8 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q8_0")
    print("| layers | lm_head | top-1 / mean KL |")
    print("| --- | --- | --- |")

    def row(model: LlamaModel, layers: str, lm_head: str) -> None:
        r = compare(ref, prompt_logprobs(model, ids))
        print(f"| {layers} | {lm_head} | {r['top1_agreement']:.2%} / {r['mean_kl']:.4f} |", flush=True)

    for model, name in ((w8a8, "w8a8"), (q8, "q8_0")):
        row(model, name, model.lm_head.format)  # as the engine builds it
        if model.lm_head.format != "q8_0":
            model.lm_head = Int8Linear(head, "q8_0")
            row(model, name, "q8_0")
        model.lm_head = bf16.lm_head
        row(model, name, "bf16")
    for i, lw in enumerate(w8a8.layers):
        lw.down = Int8Linear(w[f"model.layers.{i}.mlp.down_proj.weight"], "q8_0")
    row(w8a8, "w8a8, down projections q8_0", "bf16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
