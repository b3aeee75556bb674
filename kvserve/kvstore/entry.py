"""Stored entry format: magic, version, a small JSON header, then the codec's payload. No pickle anywhere.

    b"KVSV" | u16 version | u32 header length | header (UTF-8 JSON) | payload

The header names everything a load must agree with: model identity, dtype, shape, codec, token count, the chunk's
prefix hash (which covers every earlier token and the cache salt), and the payload's length and BLAKE2b-256 digest.
`verify` rejects an entry unless all of them match what the request expects, so a corrupt, truncated, foreign-model,
wrong-salt or mislabelled entry is never decoded into the KV cache.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

MAGIC = b"KVSV"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")
MAX_HEADER = 16 * 1024


class EntryError(ValueError):
    """The entry cannot be used; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class EntryIdentity:
    """What a chunk must be to be usable by a given request on a given engine."""

    model_id: str
    dtype: str
    shape: tuple[int, ...]  # (layers, 2, tokens, kv_heads, head_dim)
    chunk_hash: str  # hex of the hash-chain value at the chunk's last block


def digest(payload: bytes | memoryview) -> str:
    return hashlib.blake2b(payload, digest_size=32).hexdigest()


def pack(identity: EntryIdentity, codec: str, payload: bytes) -> bytes:
    header = json.dumps({
        "model": identity.model_id, "dtype": identity.dtype, "shape": list(identity.shape), "codec": codec,
        "tokens": identity.shape[2], "chunk": identity.chunk_hash, "payload_len": len(payload),
        "payload_blake2b": digest(payload),
    }, separators=(",", ":"), sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload


def unpack(blob: bytes, expected: EntryIdentity) -> tuple[str, memoryview]:
    """Verify `blob` against `expected`; returns (codec, payload) or raises EntryError."""
    view = memoryview(blob)
    if len(view) < _PREFIX.size:
        raise EntryError("truncated", f"{len(view)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise EntryError("corrupt", "bad magic")
    if version != VERSION:
        raise EntryError("version", f"entry version {version}, this build reads {VERSION}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(view):
        raise EntryError("truncated", "header runs past the end")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EntryError("corrupt", f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise EntryError("corrupt", "header is not an object")
    if header.get("model") != expected.model_id:
        raise EntryError("foreign_model", f"entry is for model {header.get('model')!r}")
    if header.get("dtype") != expected.dtype:
        raise EntryError("identity", f"dtype {header.get('dtype')!r} != {expected.dtype!r}")
    if header.get("chunk") != expected.chunk_hash:
        raise EntryError("identity", "prefix hash differs (other tokens or cache salt)")
    if header.get("shape") != list(expected.shape) or header.get("tokens") != expected.shape[2]:
        raise EntryError("identity", f"shape {header.get('shape')} != {list(expected.shape)}")
    payload = view[_PREFIX.size + hlen:]
    if header.get("payload_len") != len(payload):
        raise EntryError("truncated", f"payload has {len(payload)} bytes, header says {header.get('payload_len')}")
    if header.get("payload_blake2b") != digest(payload):
        raise EntryError("corrupt", "payload digest mismatch")
    codec = header.get("codec")
    if not isinstance(codec, str):
        raise EntryError("corrupt", "no codec")
    return codec, payload
