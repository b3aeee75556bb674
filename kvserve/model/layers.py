"""Building blocks of a Llama-family decoder: packed linear layers, RMSNorm, rotary embedding, and a layer's
elementwise ops (eager PyTorch, or the fused native kernels)."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from kvserve import kernels
from kvserve.model.batch import ForwardBatch


# Up to this many tokens per call a bf16 Linear runs the bandwidth-bound kernel (kvserve/kernels/gemv.cpp), above it
# oneDNN: over a SmolLM2 step's 120 layer matmuls gemv is 1.64x oneDNN at 1 token, 1.37x at 4, 1.18x at 8
# (python -m kvserve.bench.linear_sweep).
GEMV_MAX_TOKENS = 8


class Linear:
    """y = x W^T + b with W prepared once for the fastest CPU matmul available.

    For bfloat16, oneDNN otherwise re-lays the weight out on every call; a pre-packed weight halves small-batch
    (decode) matmul time and gives bit-identical results. Decode-sized calls (<= GEMV_MAX_TOKENS rows) go to the
    native gemv kernel instead, which keeps its own copy of W in its layout: twice the resident bytes of a bf16
    model, for 1.5-1.8x faster small-batch decode (int8 models, kvserve.model.quant, have neither copy)."""

    STREAMED = ("gemv_weight",)  # what a small-batch call reads (LlamaModel puts it on huge pages)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True,
                 small_batch_kernel: bool = True):
        self.out_features, self.in_features = weight.shape
        self.gemv_weight = None
        self.bias = bias
        self.packed = pack and weight.dtype == torch.bfloat16 and _can_pack()
        self.gemv = None
        if small_batch_kernel and weight.dtype == torch.bfloat16 and self.out_features % 16 == 0 \
                and self.in_features % 2 == 0:
            self.gemv = kernels.gemv_module()
            self.gemv_weight = self.gemv.pack(weight) if self.gemv is not None else None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 64) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and x.shape[0] <= GEMV_MAX_TOKENS and x.dtype == torch.bfloat16:
            y = self.gemv.gemv(x.contiguous(), self.gemv_weight)
            return y if self.bias is None else y + self.bias
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    @property
    def nbytes(self) -> int:
        """Bytes read per call (one copy of W)."""
        return self.out_features * self.in_features * torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def _can_pack() -> bool:
    if os.environ.get("KVSERVE_NO_PACK") == "1":
        return False
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in float32 and cast back before the weight, as HF's LlamaRMSNorm does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, freq_factors: torch.Tensor | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # GGUF stores llama3-style scaling as per-frequency divisors
        return inv_freq / freq_factors.float()
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding:
    """cos/sin tables for every position up to the context, gathered by position (HF's rotate-half layout)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 freq_factors: torch.Tensor | None, dtype: torch.dtype):
        inv_freq = rope_inv_freq(head_dim, theta, scaling, freq_factors)
        self.inv_freq = inv_freq.double()  # (head_dim / 2,): re-rotation by a position delta (CacheBlend)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_positions, head_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = emb.cos().to(dtype)  # (max_positions, head_dim)
        self.sin = emb.sin().to(dtype)
        self.half = head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for this step's positions, gathered once and reused by every layer: (T, 1, D) each."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def __call__(self, cos_sin: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        # q: (T, H, D), k: (T, Hkv, D)
        cos, sin = cos_sin
        return self._apply(q, cos, sin), self._apply(k, cos, sin)

    def rotate(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """K already rotated at position p, rotated to p + delta: RoPE(p + delta) = R(delta) RoPE(p), one rotation
        per frequency, computed in float32 from float64 angles. k: (..., D) float32."""
        freqs = delta * self.inv_freq
        cos = torch.cat([freqs.cos(), freqs.cos()]).float()  # (D,)
        sin = torch.cat([freqs.sin(), freqs.sin()]).float()
        return self._apply(k, cos, sin)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., : self.half], x[..., self.half:]
        rotated = torch.cat((-x2, x1), dim=-1)
        return x * cos + rotated * sin


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # caches: (num_blocks, block_size, Hkv, D); k, v: (T, Hkv, D)
    num_kv, d = k_cache.shape[-2:]
    k_cache.view(-1, num_kv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv, d).index_copy_(0, slot_mapping, v)


class TorchOps:
    """The elementwise parts of a layer in eager PyTorch: the reference the fused native kernels
    (kvserve/kernels/fused_ops.cpp) must match, and the fallback where they cannot be built."""

    def __init__(self, rotary: RotaryEmbedding):
        self.rotary = rotary

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def add_rms_norm_(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """The residual add (h += delta, in place), then the next norm of h."""
        h.add_(delta)
        return rms_norm(h, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
        return F.silu(gate) * up

    def rope_tables(self, positions: torch.Tensor):
        """Per-step rotary state, computed once and passed to every layer's rope_qkv_write_."""
        return self.rotary.tables(positions)  # cos/sin rows of this step's positions: (T, 1, D) each

    def rope_qkv_write_(self, qkv: torch.Tensor, batch: ForwardBatch, tables, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
        """Rotates q and k inside qkv (T, (H + 2 Hkv) D) and writes k and v into their cache slots."""
        t = qkv.shape[0]
        d = k_cache.shape[-1]
        q_size, kv_size = num_heads * d, num_kv_heads * d
        q = qkv[:, :q_size].view(t, num_heads, d)
        k = qkv[:, q_size:q_size + kv_size].view(t, num_kv_heads, d)
        v = qkv[:, q_size + kv_size:].view(t, num_kv_heads, d)
        q_rot, k_rot = self.rotary(tables, q, k)
        q.copy_(q_rot)
        k.copy_(k_rot)
        write_kv(k_cache, v_cache, k, v, batch.slot_mapping)


class NativeOps(TorchOps):
    """The same ops as fused C++ kernels: one pass over memory each instead of five to eight eager ops."""

    def __init__(self, rotary: RotaryEmbedding, module):
        super().__init__(rotary)
        self.mod = module

    def rms_norm(self, x, weight, eps):
        return self.mod.rms_norm(x, weight, eps)

    def add_rms_norm_(self, h, delta, weight, eps):
        return self.mod.add_rms_norm_(h, delta, weight, eps)

    def silu_mul(self, gate_up):
        return self.mod.silu_mul(gate_up)

    def rope_tables(self, positions):
        return None  # the kernel reads the full cos/sin tables by position

    def rope_qkv_write_(self, qkv, batch, tables, k_cache, v_cache, num_heads, num_kv_heads):
        self.mod.rope_qkv_write_(qkv, batch.positions, self.rotary.cos, self.rotary.sin, k_cache, v_cache,
                                 batch.slot_mapping, num_heads, num_kv_heads)


def native_ops(rotary: RotaryEmbedding) -> NativeOps | None:
    """The fused ops over these rotary tables, or None where the kernels did not build."""
    module = kernels.fused_ops_module()
    return None if module is None else NativeOps(rotary, module)
