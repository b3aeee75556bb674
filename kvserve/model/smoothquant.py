"""SmoothQuant for w8a8: move activation outliers into the weights before quantizing both (in groups of 64 inputs).

An int8 scale per token (or per group of a token's inputs) is set by its largest channel; a few channels of a
Llama's normed hidden states and of its MLP's silu(gate) * up run 10-100x larger than the rest, so they flatten
every other channel to a handful of int8 levels. SmoothQuant (Xiao et al., 2023) divides input channel j by s_j =
max|X_j|^a / max|W_j|^(1-a) and multiplies weight column j by s_j, which leaves x W^T unchanged in exact arithmetic;
the division is folded into the producer of X (the RMSNorm weight for q/k/v and gate/up, the up projection's rows
for down), so it costs nothing at run time. max|X_j| comes from one forward pass over a fixed calibration text
shipped with kvserve (nothing is downloaded).
"""

from __future__ import annotations

import torch

from kvserve.config import ModelConfig

# Calibration text: varied registers (prose, dialogue, code, lists, numbers), not the benchmark's text, so the
# quality figures measured on that text are not fitted to it.
CALIBRATION_TEXT = """\
The committee met on a rainy Tuesday to decide whether the old railway bridge should be repaired or replaced.
Engineers reported that two of the five piers had cracked, while the steel deck, built in 1931, was sound.
"We can't keep patching it," said the mayor. "Every spring the river rises and we hold our breath."
A resident asked how long a new bridge would take. About three years, the engineer replied, and the cost would be
roughly 42 million dollars, of which the state would cover sixty percent.

def merge_intervals(intervals):
    intervals.sort(key=lambda iv: iv[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged

Ingredients: 2 cups of flour, 1 teaspoon of baking soda, a pinch of salt, 3 ripe bananas, 1/2 cup of melted butter.
1. Preheat the oven to 180 C. 2. Mash the bananas. 3. Stir in the butter, then fold in the dry ingredients.
Q: What causes the seasons on Earth? A: The tilt of Earth's axis, about 23.4 degrees, changes how directly sunlight
strikes each hemisphere over the year; the distance to the Sun matters far less.
user: Can you translate "good morning" into French and Spanish?
assistant: Sure! In French it is "bonjour", and in Spanish it is "buenos dias".
Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2. Chlorophyll absorbs
mostly blue and red light, which is why leaves look green. In autumn the chlorophyll breaks down and other pigments,
such as carotenoids, become visible.
SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id GROUP BY name;
The sonnet has fourteen lines; Shakespeare's end with a rhyming couplet that often turns the argument around.
"""


def input_absmax(model, token_ids: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per layer, max |x_j| over the calibration tokens of the inputs of qkv, gate_up and down: {name: (in,)}."""
    stats: list[dict[str, torch.Tensor]] = [{} for _ in model.layers]

    class Recorder:
        def __init__(self, inner, slot: dict, name: str):
            self.inner, self.slot, self.name = inner, slot, name

        def __call__(self, x):
            amax = x.detach().abs().amax(0).float()  # x: (T, in)
            prev = self.slot.get(self.name)
            self.slot[self.name] = amax if prev is None else torch.maximum(prev, amax)
            return self.inner(x)

    originals = []
    for lw, slot in zip(model.layers, stats):
        originals.append((lw.qkv, lw.gate_up, lw.down))
        lw.qkv, lw.gate_up, lw.down = (Recorder(lw.qkv, slot, "qkv"), Recorder(lw.gate_up, slot, "gate_up"),
                                       Recorder(lw.down, slot, "down"))
    try:
        model.prefill_logits(token_ids)
    finally:
        for lw, (qkv, gate_up, down) in zip(model.layers, originals):
            lw.qkv, lw.gate_up, lw.down = qkv, gate_up, down
    return stats


def smooth_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^a / max|W_j|^(1-a) over input channels j of weight (out, in); 1 where a channel is dead."""
    w_amax = weight.abs().amax(0).float().clamp(min=1e-5)
    s = act_amax.clamp(min=1e-5).pow(alpha) / w_amax.pow(1 - alpha)
    return torch.where(act_amax > 0, s, torch.ones_like(s)).clamp(min=1e-5)


def smoothed_weights(config: ModelConfig, weights: dict[str, torch.Tensor], stats: list[dict[str, torch.Tensor]],
                     alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """A copy of `weights` (HF names) with every layer's qkv / gate_up / down inputs smoothed; the rest shared."""
    from kvserve.model.quant import as_float

    weights = {k: as_float(v) for k, v in weights.items()}  # smoothing rescales float weights (a GGUF file's too)
    out = dict(weights)
    for i, st in enumerate(stats):
        p = f"model.layers.{i}."
        qkv = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        s = smooth_factors(st["qkv"], torch.cat([weights[n] for n in qkv]), alpha)
        out[p + "input_layernorm.weight"] = weights[p + "input_layernorm.weight"].float() / s
        for n in qkv:
            out[n] = weights[n].float() * s
        gu = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        s = smooth_factors(st["gate_up"], torch.cat([weights[n] for n in gu]), alpha)
        out[p + "post_attention_layernorm.weight"] = weights[p + "post_attention_layernorm.weight"].float() / s
        for n in gu:
            out[n] = weights[n].float() * s
        down = p + "mlp.down_proj.weight"
        s = smooth_factors(st["down"], weights[down], alpha)
        out[down] = weights[down].float() * s
        out[p + "mlp.up_proj.weight"] = out[p + "mlp.up_proj.weight"] / s[:, None]  # silu(gate) * up / s
    return out


def smooth_for_w8a8(config: ModelConfig, weights: dict[str, torch.Tensor], calibration_ids: list[int],
                    dtype: torch.dtype = torch.bfloat16, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Weights to build a w8a8 model from: calibrated on the unquantized model in `dtype`, then smoothed with
    SmoothQuant's default migration strength."""
    from kvserve.model.llama import LlamaModel

    stats = input_absmax(LlamaModel(config, weights, dtype), calibration_ids)
    return smoothed_weights(config, weights, stats, alpha)
