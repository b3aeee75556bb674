"""Quantized linear layers executed natively (kvserve/kernels/quant_gemm.cpp): Q8_0 and w8a8 (int8), Q4_0, Q4_1 and
Q4_K (4-bit), built from float weights or straight from a GGUF file's blocks (`GGUFWeight`, no float copy).

q8_0: int8 weights in blocks of 32 along the input dimension with one fp16 scale per (row, block) (GGUF's Q8_0), 34
bytes per 32 weights against 64 in bfloat16, so a bandwidth-bound decode step reads half the bytes. Activations are
quantized on the fly to the same blocks (llama.cpp's scheme for Q8_0): each block is an exact int32 dot product on
VNNI and the error stays near the weights' own, no per-token activation scale to be ruined by an outlier.

w8a8: int8 weights and activations in groups of 64 inputs (one fp16 scale per (row, group) and per (token, group),
the activations' dynamic), over SmoothQuant-smoothed weights (kvserve.model.smoothquant), the output matrix at q8_0:
q8_0's batch speed at less error (mean KL to bf16 0.0028 against 0.0034). A scale per whole row and per token, the
first w8a8, ran batches faster (1.37x bf16 on the offline workload (a) on 2026-12-05, against 1.23-1.34x) but measured
96.5% top-1 agreement with bf16 against 98% (docs/benchmarks.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvserve import kernels
from kvserve.config import QUANTIZATIONS

INT8_FORMATS = ("q8_0", "w8a8")
QK = 32  # weights per block
NR = 16  # rows per packed group (kernel layout)
NATIVE_FILE_FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k")  # GGUF types whose blocks the kernels run as stored
# the kernel's code paths (quant_gemm.cpp): the best compiled in (AVX512-VNNI, else AVX2, else portable) or one forced
KERNEL_PATHS = {"best": 0, "avx2": 1, "portable": 2}
# From this many tokens a 4-bit or q8_0 layer's weights are widened to bfloat16 (one layer at a time) and multiplied
# by oneDNN where AMX runs bf16 tiles: 3x faster than the int8 kernel at 512 tokens, slower below ~100
# (`python -m kvserve.bench.linear_sweep --tokens 64,128,512`: q4_1 against `q4_1 int8 kernel`)
PREFILL_BF16_MIN_TOKENS = 128


def resolve_quantization(requested: str, source_format: str | None, float32: bool = False) -> str:
    """The format the model runs in. `auto` keeps a GGUF file's own format where a kernel runs it (Q8_0, Q4_0,
    Q4_1, Q4_K: the embedded model runs as Q4_1, as llama.cpp runs it), else none; in float32 `auto` is none: float32
    is the exact path, the one checked token for token against HF transformers, which dequantizes the file too."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return source_format if source_format in NATIVE_FILE_FORMATS and not float32 else "none"


# ------------------------------------------------------------------------------------- weights kept in GGUF blocks

# GGML type -> (weights per block, bytes per block)
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}


class GGUFWeight:
    """A matmul weight as a GGUF file stores it (rows of GGML blocks): the model packs the blocks for the kernels
    without ever making a float copy, or dequantizes them one tensor at a time when it runs another format."""

    def __init__(self, qtype: str, shape: tuple[int, int], data: torch.Tensor):
        per_block, nbytes = GGUF_BLOCKS[qtype]
        n, k = shape
        if k % per_block or tuple(data.shape) != (n, k // per_block * nbytes) or data.dtype != torch.uint8:
            raise ValueError(f"{qtype} tensor {shape}: {tuple(data.shape)} {data.dtype} is not its block layout")
        self.qtype, self.shape, self.data = qtype, (n, k), data

    @property
    def format(self) -> str:
        return self.qtype.lower()

    def dequantize(self) -> torch.Tensor:
        """float32 (N, K) through the gguf package's reference dequantization (the oracle the tests use too)."""
        import gguf

        arr = gguf.quants.dequantize(self.data.numpy(), gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(arr.reshape(self.shape).astype("float32", copy=False))

    def codes(self) -> tuple[torch.Tensor, ...]:
        """The blocks decoded to the kernels' operands: Q8_0 -> (q int8 (N, K), d (N, K/32)); 4-bit -> (codes uint8
        0..15 (N, K), d, m (N, K/32)) with w = d q + m. Exact, except Q4_K's sub-block scales d_s sc and mins
        dmin_s m, which the kernel stores in fp16 (relative rounding <= 2^-11)."""
        n, k = self.shape
        per_block, nbytes = GGUF_BLOCKS[self.qtype]
        blocks = self.data.reshape(n, k // per_block, nbytes)
        half = lambda b: b.contiguous().view(torch.float16).float().squeeze(-1)  # (N, KB, 2) bytes -> (N, KB)
        if self.qtype == "Q8_0":
            return blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), half(blocks[..., :2])
        if self.qtype in ("Q4_0", "Q4_1"):
            start = 2 if self.qtype == "Q4_0" else 4
            qs = blocks[..., start:].to(torch.uint8)  # (N, KB, 16): weight j in byte j's low nibble, j+16 high
            q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)
            d = half(blocks[..., :2])
            m = -8 * d if self.qtype == "Q4_0" else half(blocks[..., 2:4])
            return q, d, m
        # Q4_K: super-blocks of 256 = 8 sub-blocks of 32 with 6-bit scales and mins (ggml's get_scale_min_k4)
        d, dmin = half(blocks[..., 0:2]), half(blocks[..., 2:4])  # (N, SB)
        sc = blocks[..., 4:16].to(torch.int32)  # (N, SB, 12)
        lo_s, lo_m, hi = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
        scale = torch.cat([lo_s & 63, (hi & 0x0F) | ((lo_s >> 6) << 4)], dim=-1)  # (N, SB, 8)
        mins = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
        qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)  # 64 weights per 32 bytes: low nibbles, then high
        q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(n, k)
        sub_d = (d[..., None] * scale.float()).reshape(n, k // QK)
        sub_m = -(dmin[..., None] * mins.float()).reshape(n, k // QK)
        return q, sub_d, sub_m


def quantize_q4_k(w: torch.Tensor) -> torch.Tensor:
    """w (N, K) float, K % 256 == 0 -> GGUF Q4_K blocks (N, K/256 * 144) uint8, by the simple rule (each sub-block
    spans [min(0, lo), hi] in 15 steps; its scale and min in 6 bits against the super-block's largest): for test
    files and tools (gguf-py has no Q4_K quantizer; llama.cpp's refines the scales iteratively, slightly better)."""
    n, k = w.shape
    if k % 256:
        raise ValueError(f"Q4_K needs in_features % 256 == 0, got {k}")
    sb = w.float().reshape(n, k // 256, 8, 32)
    lo = sb.amin(-1).clamp(max=0)
    scale = (sb.amax(-1) - lo) / 15  # (N, SB, 8)
    d = (scale.amax(-1) / 63).half().float()
    dmin = ((-lo).amax(-1) / 63).half().float()
    inv = lambda x: torch.where(x > 0, 1 / x, torch.zeros_like(x))
    sc = (scale * inv(d)[..., None]).round().clamp(0, 63).to(torch.int32)
    mn = (-lo * inv(dmin)[..., None]).round().clamp(0, 63).to(torch.int32)
    sub_d, sub_m = d[..., None] * sc, -(dmin[..., None] * mn)
    q = ((sb - sub_m[..., None]) * inv(sub_d)[..., None]).round().clamp(0, 15).to(torch.int32)
    scales = torch.cat([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6), (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
                        (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], dim=-1).to(torch.uint8)
    q = q.reshape(n, k // 256, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).to(torch.uint8).reshape(n, k // 256, 128)
    dd = torch.stack([d, dmin], dim=-1).half().view(torch.uint8).reshape(n, k // 256, 4)
    return torch.cat([dd, scales, qs], dim=-1).reshape(n, k // 256 * 144).contiguous()


def as_float(w: torch.Tensor | GGUFWeight) -> torch.Tensor:
    return w.dequantize() if isinstance(w, GGUFWeight) else w


def cat_rows(parts: list[torch.Tensor | GGUFWeight]) -> torch.Tensor | GGUFWeight:
    """Weights stacked by rows for a fused matmul (q|k|v, gate|up): GGUF blocks stay blocks when every part has the
    same type (a row of blocks is a row of weights), else float."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, GGUFWeight) for p in parts) and len({(p.qtype, p.shape[1]) for p in parts}) == 1:
        return GGUFWeight(parts[0].qtype, (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                          torch.cat([p.data for p in parts]))
    return torch.cat([as_float(p) for p in parts])


W8A8_GROUP = 64  # inputs per w8a8 scale (32 where a layer's width is not a multiple of 64)
# A format's numerics, for the KV store's model identity: stored KV is only valid for the arithmetic that made it, and
# w8a8 meant a scale per row and token before it meant groups of 64 (and a q8_0 output matrix).
_FORMAT_IDENTITY = {"w8a8": f"w8a8/groups-{W8A8_GROUP}/lm_head-q8_0"}


def format_identity(fmt: str) -> str:
    """The string that names `fmt`'s arithmetic in stored KV's model identity (kvserve.kvstore.model_fingerprint)."""
    return _FORMAT_IDENTITY.get(fmt, fmt)


def block_size(fmt: str, k: int) -> int:
    """Values per scale along the input dimension (weights and activations alike)."""
    return W8A8_GROUP if fmt == "w8a8" and k % W8A8_GROUP == 0 else QK


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
    """q (N, K) int8, d (N, SB) with SB = K/32 (q8_0) or K/64 (w8a8) -> the kernel's layout (see quant_gemm.cpp):
    packed (N/16, K/32, 8, 64) uint8 (q + 128), scales (N/16, SB, 16) float16 (GGUF's 34 bytes per 32 weights)."""
    n, k = q.shape
    g, kb, sb = n // NR, k // QK, d.shape[1]
    codes = (q.to(torch.int16) + 128).to(torch.uint8)
    packed = codes.reshape(g, NR, kb, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, kb, 8, NR * 4).contiguous()
    scales = d.to(torch.float16).reshape(g, NR, sb).permute(0, 2, 1).contiguous()
    return packed, scales


def unpack_int8(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_int8: q (N, K) int8 and the stored scales as float32 (N, SB) (tests, the fallback)."""
    g, kb = packed.shape[:2]
    codes = packed.reshape(g, kb, 8, NR, 4).permute(0, 3, 1, 2, 4).reshape(g * NR, kb * QK)
    q = (codes.to(torch.int16) - 128).to(torch.int8)
    d = scales.float().permute(0, 2, 1).reshape(g * NR, scales.shape[1])
    return q.contiguous(), d.contiguous()


def can_quantize(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this weight: whole row groups and blocks."""
    n, k = weight.shape
    return n % NR == 0 and k % QK == 0


def _bf16_route(lin: Int8Linear | Q4Linear, x: torch.Tensor) -> torch.Tensor | None:
    """A prefill-sized bf16 call through a per-call bf16 copy of W and oneDNN, where AMX makes that pay; else None."""
    if lin.prefill_bf16 and x.dtype == torch.bfloat16 and x.shape[0] >= PREFILL_BF16_MIN_TOKENS \
            and lin.path == KERNEL_PATHS["best"]:
        return F.linear(x, lin.mod.dequantize_t(lin.packed, lin.scales).t(), lin.bias)  # (K, N) -> W
    return None


class Int8Linear:
    """y = x W^T + b over int8 weights (q8_0 or w8a8): the native kernel where it builds, else its PyTorch reference
    (slow, same rounding). Holds no float copy of W."""

    STREAMED = ("packed", "scales")  # what every call reads (LlamaModel puts them on huge pages)

    def __init__(self, weight: torch.Tensor | GGUFWeight, fmt: str, bias: torch.Tensor | None = None,
                 native: bool = True):
        """`weight`: float, or a GGUF file's blocks (Q8_0 blocks run as stored under q8_0)."""
        if fmt not in INT8_FORMATS:
            raise ValueError(f"unknown int8 format {fmt!r}")
        if not can_quantize(weight):
            raise ValueError(f"{fmt} needs out_features % {NR} == 0 and in_features % {QK} == 0, "
                             f"got {tuple(weight.shape)}")
        self.format = fmt
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if isinstance(weight, GGUFWeight) and fmt == "q8_0" and weight.qtype == "Q8_0":
            q, d = weight.codes()
        else:
            q, d = quantize_blocks(as_float(weight), block_size(fmt, self.in_features))
        self.mod = kernels.quant_gemm_module() if native else None
        self.path = KERNEL_PATHS["best"]  # benchmarks force the others
        self.packed, self.scales = pack_int8(q, d)
        # the bf16 route of prefill-sized calls (_bf16_route), q8_0 only: w8a8 is the format chosen for int8 speed
        self.prefill_bf16 = fmt == "q8_0" and self.mod is not None and self.mod.has_amx()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x (T, K) -> (T, N) in x's dtype
        x = x.contiguous()
        if (y := _bf16_route(self, x)) is not None:
            return y
        if self.mod is not None and x.dtype in (torch.bfloat16, torch.float32):
            y = self.mod.int8_linear(x, self.packed, self.scales, self.path)
        else:
            q, d = unpack_int8(self.packed, self.scales)
            y = reference_int8_linear(x, q, d)
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        """Bytes read per call: int8 weights and their scales."""
        return self.packed.numel() + self.scales.numel() * self.scales.element_size()


# ---------------------------------------------------------------------------------------------- 4-bit (Q4_0, Q4_1)

Q4_FORMATS = ("q4_0", "q4_1", "q4_k")  # q4_k runs on the Q4_1 kernel: its sub-block scales and mins unpacked to fp16


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
    """y = x W^T + b over 4-bit weights (q4_0, q4_1, q4_k; 20 bytes per 32 weights in the kernel's layout): the
    native kernel, else its PyTorch reference. Holds no float copy of W.

    A GGUF file's blocks of the same format are packed as stored. q4_k keeps a file's Q4_K blocks (their 6-bit
    sub-block scales become fp16 per 32 weights: 20 bytes per 32 against the file's 18) and quantizes any other
    weight by Q4_K's rule where in_features % 256 == 0, else by Q4_1's (llama.cpp's Q4_K files fall back likewise)."""

    STREAMED = ("packed", "scales")  # what every call reads (LlamaModel puts them on huge pages)

    def __init__(self, weight: torch.Tensor | GGUFWeight, fmt: str, bias: torch.Tensor | None = None,
                 native: bool = True):
        if fmt not in Q4_FORMATS:
            raise ValueError(f"unknown 4-bit format {fmt!r}")
        if not can_quantize(weight):
            raise ValueError(f"{fmt} needs out_features % {NR} == 0 and in_features % {QK} == 0, "
                             f"got {tuple(weight.shape)}")
        self.format = fmt
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self.mod = kernels.quant_gemm_module() if native else None
        self.path = KERNEL_PATHS["best"]
        if isinstance(weight, GGUFWeight) and weight.format == fmt:
            codes = weight.codes()
        elif fmt == "q4_k" and self.in_features % 256 == 0:
            codes = GGUFWeight("Q4_K", weight.shape, quantize_q4_k(as_float(weight))).codes()
        else:
            codes = quantize_q4(as_float(weight), "q4_1" if fmt == "q4_k" else fmt)
        self.packed, self.scales = pack_q4(*codes)  # scales: dm, d and m per block
        self.prefill_bf16 = self.mod is not None and self.mod.has_amx()  # the bf16 route (_bf16_route)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if (y := _bf16_route(self, x)) is not None:
            return y
        if self.mod is not None and x.dtype in (torch.bfloat16, torch.float32):
            y = self.mod.q4_linear(x, self.packed, self.scales, self.path)
        else:
            y = reference_q4_linear(x, *unpack_q4(self.packed, self.scales))
        return y if self.bias is None else y + self.bias

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 2
