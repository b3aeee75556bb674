"""KV chunk codecs (CacheGen-style): per-token symmetric quantization, then lossless zstd.

A chunk is a tensor (layers, 2, tokens, kv_heads, head_dim) in the model's dtype (post-RoPE K, V).
  none  raw bytes of the tensor (exact)
  zstd  raw bytes + zstd (exact)
  int8  one fp16 scale per (layer, K|V, token, head) = absmax / 127, int8 values, + zstd
  int4  CacheGen's bins: 4-bit V (levels -7..7, packed two per byte), 5-bit K (-15..15, one byte each, which zstd
        entropy-codes to ~4.5 bits), 5-bit V in the first `high_precision_layers` layers; one fp16 scale per 32
        channels of a token; + zstd. About 3.7x smaller than bf16 on SmolLM2 (docs/benchmarks.md).
Decoding checks every size against the shape first, so a payload that passed the integrity hash but disagrees with
its header still cannot be misread, and never inflates past the size its shape decodes to (no decompression bomb).
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from kvserve.kvstore.config import CODECS  # noqa: F401  (re-exported: the codec names)

LOSSLESS = ("none", "zstd")

_NUMPY_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}


class CodecError(ValueError):
    """The payload cannot be decoded; `reason` is a short metric label, as for entry.EntryError."""

    def __init__(self, detail: str, reason: str = "corrupt"):
        super().__init__(detail)
        self.reason = reason


def _raw_bytes(x: torch.Tensor) -> bytes:
    x = x.contiguous()
    view = _NUMPY_VIEW.get(x.dtype)
    if view is None:
        raise CodecError(f"unsupported KV dtype {x.dtype}")
    return x.view(view).numpy().tobytes()


def _from_raw(buf: bytes | memoryview, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    view = _NUMPY_VIEW.get(dtype)
    if view is None:
        raise CodecError(f"unsupported KV dtype {dtype}")
    np_dtype = {torch.int16: np.int16, torch.float16: np.float16, torch.float32: np.float32}[view]
    if len(buf) != raw_size(shape, dtype):
        raise CodecError(f"payload has {len(buf)} bytes, shape {shape} needs {raw_size(shape, dtype)}")
    arr = np.frombuffer(buf, dtype=np_dtype)
    if arr.size != int(np.prod(shape)):
        raise CodecError(f"payload holds {arr.size} values, shape {shape} needs {int(np.prod(shape))}")
    return torch.from_numpy(arr.copy()).view(dtype).view(shape)


INT4_GROUP = 32  # channels sharing one scale in the int4 codec


def _plan(codec: str, num_layers: int, head_dim: int, hp: int) -> list[tuple[int, int, int, int, int]]:
    """Sections (first layer, end layer, 0=K|1=V, levels, group size) in payload order.

    int8: 127 levels, one scale per (layer, token, head). int4 follows CacheGen's bins: K keeps 31 levels (its
    outlier channels make 4-bit K cost ~10 points of greedy agreement on SmolLM2), V gets 15 levels (4 bits, packed
    two per byte) except in the first `hp` layers, where it keeps 31; one scale per 32 channels of a token."""
    if codec == "int8":
        return [(0, num_layers, 0, 127, head_dim), (0, num_layers, 1, 127, head_dim)]
    g = INT4_GROUP if head_dim % INT4_GROUP == 0 else head_dim
    hp = min(hp, num_layers)
    plan = [(0, hp, 0, 15, g), (0, hp, 1, 15, g), (hp, num_layers, 0, 15, g), (hp, num_layers, 1, 7, g)]
    return [p for p in plan if p[1] > p[0]]


def _quantize(x: torch.Tensor, levels: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization in groups of `group` channels: (int8 values in [-levels, levels],
    fp16 scales of shape (..., head_dim // group))."""
    xf = x.float().unflatten(-1, (-1, group))  # (..., groups, group)
    scale = (xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6) / levels).half().float()  # what the decoder sees
    q = torch.round(xf / scale).clamp_(-levels, levels).to(torch.int8)
    return q.flatten(-2), scale.squeeze(-1).half()


def _pack4(q: torch.Tensor) -> torch.Tensor:
    u = (q + 8).to(torch.uint8)  # 1..15
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(p: torch.Tensor) -> torch.Tensor:
    lo = (p & 15).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _encode_sections(x: torch.Tensor, plan) -> bytes:
    scales, values = [], []
    for l0, l1, kv, levels, group in plan:
        q, s = _quantize(x[l0:l1, kv], levels, group)
        scales.append(s.numpy().tobytes())
        values.append((_pack4(q) if levels <= 7 else q).numpy().tobytes())
    return b"".join(scales + values)  # scales first: similar bytes together compress better


def _take(buf: memoryview, pos: int, n: int) -> tuple[memoryview, int]:
    if pos + n > len(buf):
        raise CodecError("payload shorter than its shape needs")
    return buf[pos:pos + n], pos + n


def _decode_sections(buf: memoryview, plan, shape: tuple) -> torch.Tensor:
    _, _, tokens, heads, dim = shape
    out = torch.empty(shape, dtype=torch.float32)
    pos, scales = 0, []
    for l0, l1, kv, levels, group in plan:
        sshape = (l1 - l0, tokens, heads, dim // group)
        raw, pos = _take(buf, pos, 2 * int(np.prod(sshape)))
        scales.append(torch.from_numpy(np.frombuffer(raw, dtype=np.float16).copy()).view(sshape))
    for (l0, l1, kv, levels, group), scale in zip(plan, scales):
        vshape = (l1 - l0, tokens, heads, dim)
        if levels <= 7:
            pshape = (*vshape[:-1], dim // 2)
            raw, pos = _take(buf, pos, int(np.prod(pshape)))
            q = _unpack4(torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(pshape))
        else:
            raw, pos = _take(buf, pos, int(np.prod(vshape)))
            q = torch.from_numpy(np.frombuffer(raw, dtype=np.int8).copy()).view(vshape)
        out[l0:l1, kv] = (q.float().unflatten(-1, (-1, group)) * scale.float().unsqueeze(-1)).flatten(-2)
    if pos != len(buf):
        raise CodecError("payload longer than its shape needs")
    return out


def encode(x: torch.Tensor, codec: str, zstd_level: int = 3, high_precision_layers: int = 2) -> bytes:
    """(layers, 2, tokens, kv_heads, head_dim) -> payload bytes."""
    if x.dim() != 5 or x.shape[1] != 2:
        raise CodecError(f"expected a (layers, 2, tokens, heads, head_dim) tensor, got {tuple(x.shape)}")
    if codec == "none":
        return _raw_bytes(x)
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=zstd_level).compress(_raw_bytes(x))
    if codec not in ("int8", "int4"):
        raise CodecError(f"unknown codec {codec!r}")
    if x.shape[-1] % 2:
        raise CodecError("quantized codecs need an even head_dim")
    data = _encode_sections(x, _plan(codec, x.shape[0], x.shape[-1], high_precision_layers))
    return zstandard.ZstdCompressor(level=zstd_level).compress(data)


def raw_size(shape: tuple, dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def decoded_size(codec: str, shape: tuple, dtype: torch.dtype, high_precision_layers: int = 2) -> int:
    """Bytes a compressed codec's zstd frame must decompress to for a chunk of `shape`."""
    if codec == "zstd":
        return raw_size(shape, dtype)
    _, _, tokens, heads, dim = shape
    total = 0
    for l0, l1, _, levels, group in _plan(codec, shape[0], dim, high_precision_layers):
        values = (l1 - l0) * tokens * heads * dim
        total += 2 * values // group + (values // 2 if levels <= 7 else values)
    return total


def _decompress(payload: bytes, limit: int) -> bytes:
    """zstd, never past `limit` bytes. python-zstandard ignores max_output_size when the frame declares its content
    size and allocates whatever the frame declares, so a forged frame claiming gigabytes is refused before that."""
    try:
        declared = zstandard.frame_content_size(payload)  # -1: not declared, then max_output_size holds
        if declared > limit:
            raise CodecError(f"zstd frame declares {declared} bytes, the chunk decodes to {limit}", "oversized")
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd: {e}") from None


def decode(payload: bytes, codec: str, shape: tuple, dtype: torch.dtype,
           high_precision_layers: int = 2) -> torch.Tensor:
    """payload bytes -> (layers, 2, tokens, kv_heads, head_dim) tensor in `dtype`."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != 5 or shape[1] != 2 or min(shape) <= 0:
        raise CodecError(f"bad chunk shape {shape}")
    if codec == "none":
        return _from_raw(payload, shape, dtype)
    if codec not in ("zstd", "int8", "int4"):
        raise CodecError(f"unknown codec {codec!r}")
    data = _decompress(payload, decoded_size(codec, shape, dtype, high_precision_layers))
    if codec == "zstd":
        return _from_raw(data, shape, dtype)
    x = _decode_sections(memoryview(data), _plan(codec, shape[0], shape[-1], high_precision_layers), shape)
    return x.to(dtype)
