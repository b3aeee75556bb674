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
                     existing: list[BlockHash] | None = None) -> list[BlockHash]:
    """Extend `existing` with the hashes of every further full block of `token_ids`."""
    hashes = list(existing) if existing else []
    parent = hashes[-1] if hashes else None
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], extra_key)
        hashes.append(parent)
    return hashes
