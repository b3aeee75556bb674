"""Stored entry format: magic, version, a small JSON header, the codec's payload, an optional MAC. No pickle anywhere.

    b"KVSV" | u16 version | u32 header length | header (UTF-8 JSON) | payload | [HMAC-SHA256 tag, 32 bytes]

The header names everything a load must agree with: model identity, dtype, shape, codec, token count, the chunk's
prefix hash (which covers every earlier token and the cache salt), the payload's length and XXH3-128 digest, and
whether a tag follows. `unpack` rejects an entry unless all of them match what the request expects, so a corrupt,
truncated, foreign-model, wrong-salt or mislabelled entry is never decoded into the KV cache.

The digest only catches accidents (whoever can write to a tier can compute any digest), so it is a fast one: XXH3
verifies a 4k-token prompt's 16 chunks in ~5 ms where BLAKE2b took ~200 ms of the loading instance's core (version 3;
`python -m kvserve.bench.micro --digests`). With a key, every entry carries an
HMAC over everything before it, checked (in constant time) before the header is even parsed; an entry without one,
or with another key's, is rejected as "unauthenticated". A store without a key still reads keyed entries (their
digest holds), it just cannot tell who wrote them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVSV"
VERSION = 3  # 2: the "mac" header field and the optional tag; 3: XXH3-128 instead of BLAKE2b-256
_PREFIX = struct.Struct("<4sHI")
MAX_HEADER = 16 * 1024
MAC = "hmac-sha256"
MAC_SIZE = 32


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
    return xxhash.xxh3_128_hexdigest(payload)


def _tag(key: bytes, body: bytes | memoryview) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()


def pack(identity: EntryIdentity, codec: str, payload: bytes, key: bytes | None = None) -> bytes:
    header = json.dumps({
        "model": identity.model_id, "dtype": identity.dtype, "shape": list(identity.shape), "codec": codec,
        "tokens": identity.shape[2], "chunk": identity.chunk_hash, "payload_len": len(payload),
        "payload_xxh3": digest(payload), "mac": MAC if key else None,
    }, separators=(",", ":"), sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload
    return body + _tag(key, body) if key else body


def _authenticated_body(view: memoryview, key: bytes) -> memoryview:
    """The entry without its tag, once the tag is proven to be `key`'s HMAC of everything before it."""
    body, tag = view[:-MAC_SIZE], view[-MAC_SIZE:]
    if len(body) < _PREFIX.size or not hmac.compare_digest(_tag(key, body), tag):
        raise EntryError("unauthenticated", "no valid MAC for this store's key")
    return body


def unpack(blob: bytes, expected: EntryIdentity, key: bytes | None = None) -> tuple[str, memoryview]:
    """Verify `blob` against `expected` (and its MAC, given a key); returns (codec, payload) or raises EntryError."""
    view = memoryview(blob)
    if len(view) < _PREFIX.size:
        raise EntryError("truncated", f"{len(view)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise EntryError("corrupt", "bad magic")
    if version != VERSION:
        raise EntryError("version", f"entry version {version}, this build reads {VERSION}")
    if key is not None:
        view = _authenticated_body(view, key)
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(view):
        raise EntryError("truncated", "header runs past the end")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EntryError("corrupt", f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise EntryError("corrupt", "header is not an object")
    if key is None and header.get("mac") == MAC:
        view = view[:max(len(view) - MAC_SIZE, _PREFIX.size + hlen)]  # a keyed store's tag, which we cannot check
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
    if header.get("payload_xxh3") != digest(payload):
        raise EntryError("corrupt", "payload digest mismatch")
    codec = header.get("codec")
    if not isinstance(codec, str):
        raise EntryError("corrupt", "no codec")
    return codec, payload
