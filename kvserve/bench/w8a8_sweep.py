"""w8a8 quality against SmoothQuant's migration strength, and with the MLP down projection kept at q8_0.

    python -m kvserve.bench.w8a8_sweep [--alphas 0.5,0.65,0.8] [--tokens 1024]
    python -m kvserve.bench.w8a8_sweep --heads     # the output matrix (lm_head) at w8a8, q8_0 and bf16 instead
    python -m kvserve.bench.w8a8_sweep --groups 64,192   # activation and weight scales per group of g inputs
    ... --held-out [--tokens 3072]                      # over CPython's help topics instead of the quality text

Teacher-forced over the quant_quality text against the bf16 model (as `python -m kvserve.bench.quant_quality`): per
alpha, the top-1 agreement and KL of w8a8 (calibrated on kvserve.model.smoothquant's own text), then the same model
with every layer's down projection (the input with the largest activation outliers, after SiLU x up) as q8_0.
`--heads` asks what the output matrix's precision buys (llama.cpp's quantized files keep it at 6-8 bits; both int8
formats build it at q8_0): w8a8 (alpha 0.5) and q8_0 with their lm_head at w8a8, q8_0 and bf16, and w8a8 with the
down projections at q8_0 and a bf16 lm_head.
`--groups` asks what the scale group does to w8a8 (SmoothQuant at 0.5; it ships with groups of 64 on both sides, and
was first a scale per token and per weight row): every layer's activations at one
scale per g inputs, its weights per g inputs too or per row, computed in float64 PyTorch as the int8 kernels would;
the lm_head at the layers' scheme, q8_0 and bf16. g must divide every layer's input width (576 and 1536 here:
64, 96, 192).
"""

from __future__ import annotations

import argparse

import torch

from kvserve.bench.kernel_quality import held_out_token_ids, quality_token_ids
from kvserve.bench.quant_quality import compare, prompt_logprobs
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_model
from kvserve.model.quant import Int8Linear, as_float, quantize_blocks
from kvserve.model.smoothquant import CALIBRATION_TEXT, input_absmax, smoothed_weights
from kvserve.model.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.5,0.65,0.8")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--held-out", action="store_true",
                    help="over CPython's help topics (kernel_quality.held_out_token_ids) instead of the quality text")
    ap.add_argument("--heads", action="store_true", help="the lm_head's precision instead of alpha")
    ap.add_argument("--groups", default=None, help="comma list of scale group sizes instead of alpha")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    tok = Tokenizer(loaded.tokenizer_source, loaded.chat_template)
    ids = held_out_token_ids(args.tokens, tok) if args.held_out else quality_token_ids(args.tokens)
    bf16 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="none")
    ref = prompt_logprobs(bf16, ids)
    stats = input_absmax(bf16, tok.encode(CALIBRATION_TEXT))
    if args.heads:
        return heads(loaded, bf16, ids, ref, stats)
    if args.groups:
        return groups(loaded, bf16, ids, ref, stats, [int(g) for g in args.groups.split(",")])
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
        built = model.lm_head.format
        row(model, name, built)  # as the engine builds it (q8_0 for both)
        for fmt in ("w8a8", "q8_0"):
            if fmt != built:
                model.lm_head = Int8Linear(head, fmt)
                row(model, name, fmt)
        model.lm_head = bf16.lm_head
        row(model, name, "bf16")
    for i, lw in enumerate(w8a8.layers):
        lw.down = Int8Linear(w[f"model.layers.{i}.mlp.down_proj.weight"], "q8_0")
    row(w8a8, "w8a8, down projections q8_0", "bf16")
    return 0


class GroupInt8Linear:
    """Int8 activations with one scale per `ga` inputs of a token and int8 weights with one per `gw` inputs of a row
    (None: the whole row), computed as the kernels would (exact int dots, scaled) in float64 PyTorch."""

    def __init__(self, weight, ga: int, gw: int | None = None):
        k = weight.shape[1]
        gw = gw or k
        if k % ga or k % gw:
            raise ValueError(f"groups {ga}, {gw} do not divide the input width {k}")
        self.ga = ga
        q, d = quantize_blocks(as_float(weight), gw)  # (N, K) int8, (N, K/gw)
        self.w = (q.double().reshape(q.shape[0], k // gw, gw) * d.double()[..., None]).reshape(q.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t, k = x.shape
        xq, xd = quantize_blocks(x, self.ga)  # (T, K) int8, (T, K/ga)
        xf = (xq.double().reshape(t, k // self.ga, self.ga) * xd.double()[..., None]).reshape(t, k)
        return (xf @ self.w.T).to(x.dtype)  # (T, N)


def groups(loaded, bf16: LlamaModel, ids: list[int], ref, stats, sizes: list[int]) -> int:
    w = smoothed_weights(loaded.config, loaded.weights, stats, 0.5)
    bf16_head = loaded.weights["model.embed_tokens.weight" if loaded.config.tie_word_embeddings else "lm_head.weight"]
    print("| activation scales per | weight scales per | lm_head | top-1 / mean KL |")
    print("| --- | --- | --- | --- |")
    for g in sizes:
        for gw in (g, None):
            m = LlamaModel(loaded.config, w, torch.bfloat16, quantization="w8a8")
            for i, lw in enumerate(m.layers):
                p = f"model.layers.{i}."
                qkv = torch.cat([w[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
                lw.qkv = GroupInt8Linear(qkv, g, gw)
                lw.o = GroupInt8Linear(w[p + "self_attn.o_proj.weight"], g, gw)
                gate_up = torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
                lw.gate_up = GroupInt8Linear(gate_up, g, gw)
                lw.down = GroupInt8Linear(w[p + "mlp.down_proj.weight"], g, gw)
            for head in ("layers'", "q8_0", "bf16"):
                if head == "layers'":  # the layers' own scheme
                    m.lm_head = GroupInt8Linear(bf16_head, g, gw)
                elif head == "q8_0":
                    m.lm_head = Int8Linear(bf16_head, "q8_0")
                else:
                    m.lm_head = bf16.lm_head
                r = compare(ref, prompt_logprobs(m, ids))
                print(f"| {g} inputs | {gw or 'row'} | {head} | {r['top1_agreement']:.2%} / {r['mean_kl']:.4f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
