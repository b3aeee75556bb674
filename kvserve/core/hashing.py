"""Prefix hash chain over full KV blocks: h_k = H(h_{k-1}, tokens_k, extra_keys).

sha256 (not Python's hash()) so that a crafted prompt cannot collide with another tenant's block, and so that the
same chain can later key KV stored outside this process.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_key: str | None) -> BlockHash:
    h = hashlib.sha256()
    h.update(parent if parent is not None else b"\x00" * 32)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_key is not None:
        raw = extra_key.encode("utf-8", "surrogatepass")
        h.update(struct.pack("<q", len(raw)))
        h.update(raw)
    return h.digest()


def hash_block_chain(token_ids: Sequence[int], block_size: int, extra_key: str | None,
                     existing: list[BlockHash] | None = None,
                     switch: tuple[int, str] | None = None) -> list[BlockHash]:
    """Extend `existing` with the hashes of every further full block of `token_ids`. `switch` = (block index, key):
    blocks from that index on are hashed under the other key (a namespace), chained to the plain ones before."""
    hashes = list(existing) if existing else []
    parent = hashes[-1] if hashes else None
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        key = switch[1] if switch is not None and start // block_size >= switch[0] else extra_key
        parent = hash_block(parent, token_ids[start:start + block_size], key)
        hashes.append(parent)
    return hashes


# Namespaced chains (docs/kvreuse.md). A plain chain's extra key is the request's cache_salt, which validation keeps
# printable, so a key starting with NUL can never be a plain one: approximate (blended) KV is never found by a plain
# request, and a segment's KV (computed alone, from position 0) never by a prefix lookup.
SEGMENT_KEY_VERSION = 1


def segment_key(cache_salt: str | None) -> str:
    """Extra key of a segment's own chain: the key version, the context mode (none: each segment is computed alone)
    and its hash (empty), the position base (0) and the salt. The model's identity is the pool's (one model per
    pool) and, in the tiers, the store's namespace (model fingerprint, dtype, layout)."""
    return f"\x00segment:v{SEGMENT_KEY_VERSION}:ctx=none:ctxhash=:base=0\x00{cache_salt or ''}"


def blend_key(cache_salt: str | None, ape: tuple[float, float] | None = None) -> str:
    """Extra key of a blended request's blocks from the first one that may hold reused (approximate) KV on. APE's
    parallel mode attends with its temperature and scale, so its KV is keyed by them too: a blend request, or one
    with other APE values, never finds it."""
    if ape is not None:
        return f"\x00ape\x00t={ape[0]!r}:s={ape[1]!r}\x00{cache_salt or ''}"
    return f"\x00blend\x00{cache_salt or ''}"
