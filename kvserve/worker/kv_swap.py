"""The swap space's memory and its copies (architecture rule 4: applied in list order before the forward pass).

A host-memory tensor shaped like the pool's blocks, allocated on the first copy out (an engine that never swaps
never pays for it). Copies are block-granular gathers/scatters over all layers at once; their bytes and seconds go
back to the scheduler, whose swap-or-recompute model learns the copy speed from them."""

from __future__ import annotations

import time

import torch

from kvserve.core.outputs import KVSwapIn, KVSwapOut
from kvserve.worker.kv_cache import KVCache


class SwapBuffer:
    def __init__(self, kv_cache: KVCache, num_slots: int):
        self.kv_cache = kv_cache
        self.num_slots = num_slots
        self.tensor: torch.Tensor | None = None
        self.bytes_copied = 0
        self.seconds = 0.0

    def _buffer(self) -> torch.Tensor:
        if self.tensor is None:
            layers, two, _, bs, heads, dim = self.kv_cache.tensor.shape
            # (layers, 2, slots, block_size, Hkv, D)
            self.tensor = torch.empty(layers, two, self.num_slots, bs, heads, dim, dtype=self.kv_cache.tensor.dtype)
        return self.tensor

    def apply(self, op: KVSwapOut | KVSwapIn) -> None:
        started = time.perf_counter()
        buf, pool = self._buffer(), self.kv_cache.tensor
        if isinstance(op, KVSwapOut):
            src, dst = torch.tensor(op.block_ids, dtype=torch.long), torch.tensor(op.slots, dtype=torch.long)
            buf[:, :, dst] = pool[:, :, src]
        else:
            src, dst = torch.tensor(op.slots, dtype=torch.long), torch.tensor(op.block_ids, dtype=torch.long)
            pool[:, :, dst] = buf[:, :, src]
        self.seconds += time.perf_counter() - started
        self.bytes_copied += len(src) * buf[:, :, 0].numel() * buf.element_size()

    def take_measurement(self) -> tuple[int, float]:
        """(bytes, seconds) copied since the last call."""
        out = (self.bytes_copied, self.seconds)
        self.bytes_copied, self.seconds = 0, 0.0
        return out
