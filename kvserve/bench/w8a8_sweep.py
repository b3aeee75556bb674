"""w8a8 quality against SmoothQuant's migration strength, and with the MLP down projection kept at q8_0.

    python -m kvserve.bench.w8a8_sweep [--alphas 0.5,0.65,0.8] [--tokens 1024]

Teacher-forced over the quant_quality text against the bf16 model (as `python -m kvserve.bench.quant_quality`): per
alpha, the top-1 agreement and KL of w8a8 (calibrated on kvserve.model.smoothquant's own text), then the same model
with every layer's down projection (the input with the largest activation outliers, after SiLU x up) as q8_0.
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = quality_token_ids(args.tokens)
    loaded = load_model(None)
    tok = Tokenizer(loaded.tokenizer_source, loaded.chat_template)
    bf16 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="none")
    ref = prompt_logprobs(bf16, ids)
    stats = input_absmax(bf16, tok.encode(CALIBRATION_TEXT))
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


if __name__ == "__main__":
    raise SystemExit(main())
