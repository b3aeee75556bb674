"""Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) over the paged KV cache, on flattened tokens."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvserve.config import ModelConfig
from kvserve.model.attention import AttentionBackend
from kvserve.model.batch import ForwardBatch
from kvserve import kernels
from kvserve.model.layers import GEMV_MAX_TOKENS, Linear, NativeOps, RotaryEmbedding
from kvserve.model.hugepages import to_huge_pages
from kvserve.model.quant import INT8_FORMATS, Q4_FORMATS, GGUFWeight, Int8Linear, Q4Linear, as_float, can_quantize, cat_rows


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv: Linear | Int8Linear | Q4Linear  # ((H + 2 Hkv) D, hidden): q, k, v fused into one matmul (+ Qwen2 bias)
    o: Linear | Int8Linear | Q4Linear  # (hidden, H D)
    post_norm: torch.Tensor
    gate_up: Linear | Int8Linear | Q4Linear  # (2 I, hidden)
    down: Linear | Int8Linear | Q4Linear  # (hidden, I)


class LlamaModel:
    """Plain tensors, no nn.Module: the forward is a short loop the runner calls under inference_mode."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor | GGUFWeight],
                 dtype: torch.dtype = torch.bfloat16,
                 native_kernels: bool = True, quantization: str = "none"):
        """`native_kernels`: attend and fuse elementwise ops with the JIT-built C++ kernels where they build.
        `quantization`: "none" keeps the matmul weights in `dtype`; the others store them quantized
        (kvserve.model.quant): a GGUF file's blocks of that format as stored, anything else quantized here."""
        if quantization not in ("none", *INT8_FORMATS, *Q4_FORMATS):
            raise ValueError(f"quantization must be none or one of {INT8_FORMATS + Q4_FORMATS}, got {quantization!r}")
        self.config = config
        self.dtype = dtype
        self.quantization = quantization
        c = config

        def raw(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"checkpoint is missing tensor {name}")
            return weights[name]

        def w(name: str) -> torch.Tensor:
            return as_float(raw(name)).to(dtype).contiguous()

        def linear(parts: list[str], bias: torch.Tensor | None = None) -> Linear | Int8Linear | Q4Linear:
            """One matmul over the named weights stacked by rows; quantized where asked and the shape allows (a
            GGUF file's blocks in the format asked for are packed as stored)."""
            full = cat_rows([raw(p) for p in parts])
            if quantization in Q4_FORMATS and can_quantize(full):
                return Q4Linear(full, quantization, bias, native=native_kernels)
            if quantization != "none" and can_quantize(full):
                return Int8Linear(full, quantization, bias, native=native_kernels)
            return Linear(as_float(full).to(dtype).contiguous(), bias, small_batch_kernel=native_kernels)

        self.embed = w("model.embed_tokens.weight")  # (vocab, hidden)
        if self.embed.shape != (c.vocab_size, c.hidden_size):
            raise ValueError(f"embedding shape {tuple(self.embed.shape)} does not match the config "
                             f"({c.vocab_size}, {c.hidden_size})")
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if (quantization in Q4_FORMATS or quantization == "w8a8") and can_quantize(raw(head)):
            # the output matrix at q8_0 (llama.cpp's Q4 types keep it at 8 bits; the embedded Q4_1 file's
            # token_embd is Q8_0): 4-bit logits cost 6 points of top-1 agreement, w8a8's groups of 64 15-30% more
            # mean KL than a q8_0 output matrix (docs/benchmarks.md)
            self.lm_head = Int8Linear(raw(head), "q8_0", native=native_kernels)
        else:
            self.lm_head = linear([head])
        self.norm = w("model.norm.weight")
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            bias = None
            if c.attention_bias:
                bias = torch.cat([w(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            self.layers.append(LayerWeights(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=linear([p + f"self_attn.{x}_proj.weight" for x in "qkv"], bias),
                o=linear([p + "self_attn.o_proj.weight"]),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=linear([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                down=linear([p + "mlp.down_proj.weight"]),
            ))
        self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling_dict,
                                      weights.get("rope_freqs"), dtype)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.scale = c.head_dim ** -0.5
        self.attention = AttentionBackend.build(self.rotary, native_kernels)
        self.plan_steps = True  # the plan also runs the output side (run_decode_steps in one native call)
        to_huge_pages(self.streamed_weights())  # in reading order, on 2 MiB pages: 1.04-1.08x batch-1 decode here
        self.decode_plan = self.build_decode_plan() if native_kernels and dtype == torch.bfloat16 else None
        # decode rows the plan takes in one call (run; run_steps, with the output side): 8 with bf16 layers (gemv),
        # 256 where every layer is int8/4-bit (and the lm_head, for run_steps)
        plan = self.decode_plan
        self.plan_rows = plan.max_rows() if plan is not None else 0
        self.plan_step_rows = plan.max_step_rows() if plan is not None and self.plan_steps else 0

    def streamed_weights(self) -> list[tuple[object, str]]:
        """(linear, attribute) of every weight tensor a decode step reads, in the order it reads them."""
        linears = [lin for lw in self.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [self.lm_head]
        return [(lin, name) for lin in linears for name in lin.STREAMED if getattr(lin, name) is not None]

    def build_decode_plan(self):
        """Every layer of a small decode batch in one native call (kernels/decode_step.cpp), where every piece it
        needs is native: gemv or int8 linears without bias, the fused ops and the paged decode kernel."""
        mod = kernels.decode_step_module()
        if mod is None or not isinstance(self.attention.ops, NativeOps) or self.attention.decode_kernel is None:
            return None
        kinds, a, b, norms = [], [], [], []
        empty = torch.empty(0)
        for lw in self.layers:
            norms += [lw.input_norm, lw.post_norm]
            for lin in (lw.qkv, lw.o, lw.gate_up, lw.down):
                if lin.bias is not None:
                    return None
                if isinstance(lin, Q4Linear) and lin.mod is not None:
                    kinds.append(2)
                    a.append(lin.packed)
                    b.append(lin.scales)
                elif isinstance(lin, Int8Linear) and lin.mod is not None:
                    kinds.append(1)
                    a.append(lin.packed)
                    b.append(lin.scales)
                elif isinstance(lin, Linear) and lin.gemv is not None:
                    kinds.append(0)
                    a.append(lin.gemv_weight)
                    b.append(empty)
                else:
                    return None
        c = self.config
        plan = mod.DecodePlan(norms, kinds, a, b, c.num_heads, c.num_kv_heads, c.rms_norm_eps, self.scale)
        head = self.lm_head
        if head.bias is None and isinstance(head, Int8Linear) and head.mod is not None:
            plan.set_head(self.embed, self.norm, 1, head.packed, head.scales)
        elif head.bias is None and isinstance(head, Linear) and head.gemv is not None:
            plan.set_head(self.embed, self.norm, 0, head.gemv_weight, empty)
        else:
            self.plan_steps = False
        return plan

    @property
    def unpadded_decode_rows(self) -> int:
        """Decode-only steps up to this many rows need no shape buckets: they run on kvserve's own kernels (gemv up to
        8 rows; int8/4-bit layers at any count, through the decode plan), not oneDNN's shape-compiled ones."""
        return max(GEMV_MAX_TOKENS, self.plan_rows if self.decode_plan is not None else 0)

    @property
    def uses_native_kernels(self) -> bool:
        return self.attention.native

    def with_native_kernels(self, native_kernels: bool) -> LlamaModel:
        """The same weights under another backend, for comparing the native kernels with PyTorch."""
        view = copy.copy(self)
        view.attention = AttentionBackend.build(self.rotary, native_kernels)
        if not native_kernels:
            view.decode_plan = None
            view.plan_rows = view.plan_step_rows = 0
        return view

    def fingerprint_weights(self) -> dict[str, torch.Tensor]:
        """A few plain tensors that differ between checkpoints (stored KV is keyed by them)."""
        return {"embed": self.embed, "norm": self.norm, "layer0.input_norm": self.layers[0].input_norm,
                "last.post_norm": self.layers[-1].post_norm}

    def weight_bytes(self) -> int:
        """Bytes read per decode step (the lm_head counted once when tied)."""
        total = self.lm_head.nbytes + self.norm.numel() * self.norm.element_size()
        for lw in self.layers:
            total += sum(lin.nbytes for lin in (lw.qkv, lw.o, lw.gate_up, lw.down))
            total += sum(t.numel() * t.element_size() for t in (lw.input_norm, lw.post_norm))
        return total

    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Returns the final hidden states of the rows in batch.logits_indices: (R, hidden)."""
        c = self.config
        ops = self.attention.ops
        t = batch.num_tokens
        h = F.embedding(batch.input_ids, self.embed)  # (T, hidden)
        rope = ops.rope_tables(batch.positions)
        x = ops.rms_norm(h, self.layers[0].input_norm, c.rms_norm_eps)
        # fewer KV caches than layers: an early exit through the first layers (layer-skip drafting), then the norm;
        # eviction scores come from the per-layer attention calls below
        if (self.decode_plan is not None and not batch.prefills and batch.num_decodes == t <= self.plan_rows
                and h.dtype == torch.bfloat16 and len(kv_caches) == len(self.layers)
                and batch.decode_scores is None and batch.decode_key_spans is None):  # one native call
            h = self.decode_plan.run(h, x, [k for k, _ in kv_caches], [v for _, v in kv_caches], batch.positions,
                                     batch.slot_mapping, batch.decode_block_tables, batch.decode_seq_lens,
                                     batch.num_decodes, self.rotary.cos, self.rotary.sin)
            if batch.logits_indices is not None:
                h = h[batch.logits_indices]
            return ops.rms_norm(h.contiguous(), self.norm, c.rms_norm_eps)
        for i, (lw, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            qkv = lw.qkv(x)  # (T, (H + 2 Hkv) D)
            ops.rope_qkv_write_(qkv, batch, rope, k_cache, v_cache, c.num_heads, c.num_kv_heads)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(t, c.num_heads, c.head_dim)
            k = k.view(t, c.num_kv_heads, c.head_dim)
            v = v.view(t, c.num_kv_heads, c.head_dim)
            attn = self.attention(q, k, v, k_cache, v_cache, batch, self.scale)  # (T, H, D)
            x = ops.add_rms_norm_(h, lw.o(attn.reshape(t, self.q_size)), lw.post_norm, c.rms_norm_eps)
            mlp = lw.down(ops.silu_mul(lw.gate_up(x)))  # (T, hidden)
            if i + 1 < len(self.layers):  # the residual add fused with the next layer's input norm
                x = ops.add_rms_norm_(h, mlp, self.layers[i + 1].input_norm, c.rms_norm_eps)
            else:
                h.add_(mlp)
        if batch.logits_indices is not None:
            h = h[batch.logits_indices]
        return ops.rms_norm(h.contiguous(), self.norm, c.rms_norm_eps)

    def run_decode_steps(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
        """Greedy decode steps of T sequences in one native call (the decode plan with the output side): ids (T,),
        positions (T,) and seq_lens (T,) of the first step, slots (k, T). Returns the (k, T) tokens, the same as k
        forward + compute_logits + argmax rounds; None where the plan cannot take them (the caller loops)."""
        t = ids.shape[0]
        if self.decode_plan is None or t > self.plan_step_rows or len(kv_caches) != len(self.layers):
            return None
        return self.decode_plan.run_steps(ids, [k for k, _ in kv_caches], [v for _, v in kv_caches], positions, slots,
                                          block_tables, seq_lens, self.rotary.cos, self.rotary.sin)

    def forward_blend(self, chunk, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], check_layer: int):
        """One CacheBlend chunk (kvserve.model.blend): (final hidden of its last token or None, rows recomputed)."""
        from kvserve.model.blend import forward_blend

        return forward_blend(self, chunk, kv_caches, check_layer)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # (R, vocab)

    def prefill_logits(self, ids: list[int], block_size: int = 16) -> torch.Tensor:
        """Next-token logits at every position of one plain prefill over a private KV cache: (N, vocab) float32.
        For calibration and quality measurements, outside any engine."""
        from kvserve.model.batch import PrefillSeq

        c = self.config
        n = len(ids)
        num_blocks = (n + block_size - 1) // block_size
        cache = torch.zeros(c.num_layers, 2, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=self.dtype)
        blocks = torch.arange(num_blocks, dtype=torch.long)
        rows = torch.arange(n, dtype=torch.long)
        batch = ForwardBatch(torch.tensor(ids, dtype=torch.long), rows.clone(), rows.clone(),
                             prefills=[PrefillSeq(0, n, 0, blocks)], logits_indices=rows,
                             prefill_token_starts=torch.tensor([0]), prefill_num_tokens=torch.tensor([n]),
                             prefill_ctx_starts=torch.tensor([0]), prefill_block_tables=blocks[None])
        with torch.inference_mode():
            return self.compute_logits(self.forward(batch, [(cache[i, 0], cache[i, 1]) for i in range(c.num_layers)]))
