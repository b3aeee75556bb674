"""Int8 linear layers executed natively (kvserve/kernels/quant_gemm.cpp): Q8_0 and w8a8.

q8_0: int8 weights in blocks of 32 along the input dimension with one fp16 scale per (row, block) (GGUF's Q8_0), 34
bytes per 32 weights against 64 in bfloat16, so a bandwidth-bound decode step reads half the bytes. Activations are
quantized on the fly to the same blocks (llama.cpp's scheme for Q8_0): each block is an exact int32 dot product on
VNNI and the error stays near the weights' own, no per-token activation scale to be ruined by an outlier.

w8a8: one scale per weight row and one per token (dynamic), so the int32 sums run over the whole row and nearly every
instruction is a multiply-add: for compute-bound batches, at a larger rounding error (measured in docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from kvserve import kernels

QUANTIZATIONS = ("auto", "none", "q8_0", "w8a8", "q4_0", "q4_1")
INT8_FORMATS = ("q8_0", "w8a8")
QK = 32  # weights per block
NR = 16  # rows per packed group (kernel layout)


def resolve_quantization(requested: str, source_format: str | None) -> str:
    """The format the model runs in: `auto` keeps a checkpoint's own Q8_0, else none. Q4_0 / Q4_1 files run natively
    only when asked (`q4_0` / `q4_1`): the embedded model is Q4_1, and making its default path 4-bit changes what
    every default server answers, which waits for its own review (docs/benchmarks.md has the quality cost)."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return source_format if source_format in INT8_FORMATS else "none"


def block_size(fmt: str, k: int) -> int:
    """Values per scale along the input dimension."""
    return QK if fmt == "q8_0" else k


def quantize_blocks(t: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (R, K) -> q (R, K) int8, d (R, K/bs) float32 with t ~ q * d, d = max|t| / 127 per block of bs (GGUF's rule
    for weights; the kernel's for activations, whose PyTorch twin this is)."""
    r, k = t.shape
    blocks = t.float().reshape(r, k // bs, bs)
    d = blocks.abs().amax(-1) / 127.0  # (R, K/bs)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = (blocks * inv[..., None]).round().clamp_(-127, 127).to(torch.int8).reshape(r, k)
    return q, d.contiguous()


def reference_int8_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """What the kernel computes, in PyTorch: exact int dots per scale block, scaled and summed in float32.
    x (M, K), q (N, K) int8, d (N, K/bs) -> (M, N) in x's dtype."""
    m, k = x.shape
    n, sb = d.shape
    bs = k // sb
    xq, xd = quantize_blocks(x, bs)
    # block dots as float64 matmuls: exact for |sum| < 2^53 (a row's is < 8192 * 127 * 127)
    dots = torch.einsum("mbi,nbi->mnb", xq.double().reshape(m, sb, bs), q.double().reshape(n, sb, bs))
    scale = xd[:, None, :] * d[None, :, :]  # (M, N, K/bs) float32
    return (dots.float() * scale).sum(-1).to(x.dtype)


def pack_int8(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) int8, d (N, SB) with SB = K/32 (q8_0) or 1 (w8a8) -> the kernel's layout (see quant_gemm.cpp):
    packed (N/16, K/32, 8, 64) uint8 (q + 128), scales (N/16, SB, 16): float16 for q8_0 (GGUF's 34 bytes per 32
    weights), float32 for w8a8 (one per row: no bytes worth saving)."""
    n, k = q.shape
    g, kb, sb = n // NR, k // QK, d.shape[1]
    codes = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = codes.reshape(g, NR, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, kb, 8, NR * 4).contiguous()
    scales = d.to(torch.float16 if sb > 1 else torch.float32).reshape(g, NR, sb).permute(0, 2, 1).contiguous()
    return packed, scales


def unpack_int8(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_int8: q (N, K) int8 and the stored scales as float32 (N, SB) (tests, the fallback)."""
    g, kb = packed.shape[:2]
    codes = packed.reshape(g, kb, 8, NR, 4).permute(0, 3, 1, 2, 4).reshape(g * NR, kb * QK)
    q = (codes.to(torch.int16) - 128).to(torch.int8)
    d = scales.float().permute(0, 2, 1).reshape(g * NR, scales.shape[1])
    return q.contiguous(), d.contiguous()


def can_quantize(weight: torch.Tensor, fmt: str = "q8_0") -> bool:
    """Whether the kernel takes this weight: whole row groups and blocks, and (w8a8, whose int32 sums run over the
    whole row) rows short enough not to overflow them."""
    n, k = weight.shape
    return n % NR == 0 and k % QK == 0 and (fmt != "w8a8" or k <= 65536)


class Int8Linear:
    """y = x W^T + b over int8 weights (q8_0 or w8a8): the native kernel where it builds, else its PyTorch reference
    (slow, same rounding). Holds no float copy of W."""

    def __init__(self, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None, native: bool = True):
        if fmt not in INT8_FORMATS:
            raise ValueError(f"unknown int8 format {fmt!r}")
        if not can_quantize(weight, fmt):
            raise ValueError(f"{fmt} needs out_features % {NR} == 0 and in_features % {QK} == 0 (w8a8: <= 65536), "
                             f"got {tuple(weight.shape)}")
        self.format = fmt
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        q, d = quantize_blocks(weight, block_size(fmt, self.in_features))
        self.mod = kernels.quant_gemm_module() if native else None
        self.packed, self.scales = pack_int8(q, d)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x (T, K) -> (T, N) in x's dtype
        x = x.contiguous()
        if self.mod is not None and x.dtype in (torch.bfloat16, torch.float32):
            y = self.mod.int8_linear(x, self.packed, self.scales, False)
        else:
            q, d = unpack_int8(self.packed, self.scales)
            y = reference_int8_linear(x, q, d)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        """Bytes read per call: int8 weights and their scales."""
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()


# ---------------------------------------------------------------------------------------------- 4-bit (Q4_0, Q4_1)

Q4_FORMATS = ("q4_0", "q4_1")


def quantize_q4(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float -> codes (N, K) uint8 in 0..15, d and m (N, K/32) float32 (fp16-representable) with
    w ~ d * q + m, by GGUF's rules: Q4_1 spans each block's [min, max] in 15 steps; Q4_0 puts the block's largest
    magnitude at -8 steps (m = -8 d). Codes are rounded against the stored fp16 d and m."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // QK, QK)
    if fmt == "q4_1":
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d = ((hi - lo) / 15).half().float()
        m = lo.half().float()
    elif fmt == "q4_0":
        idx = blocks.abs().argmax(-1, keepdim=True)
        signed_max = blocks.gather(-1, idx).squeeze(-1)  # the largest magnitude, with its sign
        d = (signed_max / -8).half().float()
        m = -8 * d
    else:
        raise ValueError(f"unknown 4-bit format {fmt!r}")
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = ((blocks - m[..., None]) * inv[..., None]).round().clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return q, d, m


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, K) 0..15, d and m (N, K/32) -> the kernel's layout (quant_gemm.cpp, tile_q4): packed (N/16, K/32, 4,
    64) uint8 whose low nibbles are operand vectors 0..3 of a block and high nibbles 4..7; dm (N/16, K/32, 2, 16) fp16."""
    n, k = q.shape
    g, kb = n // NR, k // QK
    vec = q.reshape(g, NR, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, kb, 8, NR * 4)  # 8 operand vectors per block
    packed = (vec[:, :, :4] | (vec[:, :, 4:] << 4)).contiguous()
    dm = torch.stack([d, m], dim=-1).half().reshape(g, NR, kb, 2).permute(0, 2, 3, 1).contiguous()
    return packed, dm


def unpack_q4(packed: torch.Tensor, dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_q4: codes (N, K) uint8, d and m (N, K/32) float32."""
    g, kb = packed.shape[:2]
    vec = torch.cat([packed & 0x0F, packed >> 4], dim=2)  # (G, KB, 8, 64)
    q = vec.reshape(g, kb, 8, NR, 4).permute(0, 3, 1, 2, 4).reshape(g * NR, kb * QK)
    d = dm[:, :, 0].float().permute(0, 2, 1).reshape(g * NR, kb)
    m = dm[:, :, 1].float().permute(0, 2, 1).reshape(g * NR, kb)
    return q.contiguous(), d.contiguous(), m.contiguous()


def reference_q4_linear(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch: per block d d_x sum(q q_x) + m d_x sum(q_x), summed in float32."""
    mt, k = x.shape
    n = q.shape[0]
    kb = k // QK
    xq, xd = quantize_blocks(x, QK)
    xb = xq.double().reshape(mt, kb, QK)
    dots = torch.einsum("mbi,nbi->mnb", xb, q.double().reshape(n, kb, QK)).float()  # exact
    xsum = xb.sum(-1).float()  # (M, KB)
    out = dots * xd[:, None, :] * d[None] + m[None] * (xsum * xd)[:, None, :]
    return out.sum(-1).to(x.dtype)


class Q4Linear:
    """y = x W^T + b over 4-bit weights (q4_0, q4_1; 20 bytes per 32 weights): the native kernel, else its PyTorch
    reference. Holds no float copy of W."""

    def __init__(self, weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None, native: bool = True):
        if not can_quantize(weight):
            raise ValueError(f"{fmt} needs out_features % {NR} == 0 and in_features % {QK} == 0, "
                             f"got {tuple(weight.shape)}")
        self.format = fmt
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.mod = kernels.quant_gemm_module() if native else None
        self.packed, self.scales = pack_q4(*quantize_q4(weight, fmt))  # scales: dm, d and m per block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.mod is not None and x.dtype in (torch.bfloat16, torch.float32):
            y = self.mod.q4_linear(x, self.packed, self.scales, False)
        else:
            y = reference_q4_linear(x, *unpack_q4(self.packed, self.scales))
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 2
