"""Allocation of the paged KV tensors from a memory budget."""

from __future__ import annotations

import torch

from kvserve.config import ModelConfig


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def num_blocks_for_budget(model: ModelConfig, block_size: int, dtype: torch.dtype, memory_gb: float) -> int:
    n = int(memory_gb * (1 << 30)) // bytes_per_block(model, block_size, dtype)
    if n < 2:
        raise ValueError(f"kv_cache_memory_gb={memory_gb} holds fewer than 2 blocks of {block_size} tokens")
    return n


class KVCache:
    """One tensor (layers, 2, num_blocks + 1, block_size, Hkv, D). The extra last block is a scratch slot that
    padding tokens write into, so padded step shapes never touch a request's KV."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(model.num_layers, 2, num_blocks + 1, block_size, model.num_kv_heads,
                                  model.head_dim, dtype=dtype)
        self.layers = [(self.tensor[i, 0], self.tensor[i, 1]) for i in range(model.num_layers)]
        self.scratch_slot = num_blocks * block_size

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def write_blocks(self, block_ids: list[int], kv: torch.Tensor) -> None:
        """Fill whole blocks from a (layers, 2, len(block_ids) * block_size, Hkv, D) tensor (KV loaded from a tier)."""
        layers, two, tokens, heads, dim = kv.shape
        if tokens != len(block_ids) * self.block_size:
            raise ValueError(f"{tokens} tokens do not fill {len(block_ids)} blocks of {self.block_size}")
        idx = torch.tensor(block_ids, dtype=torch.long)
        self.tensor.index_copy_(2, idx, kv.reshape(layers, two, len(block_ids), self.block_size, heads, dim).to(
            self.tensor.dtype))

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Token slot src[i] -> dst[i] in every layer, K and V; all sources are read before any destination is
        written (a KV compaction may move tokens into slots another move reads)."""
        if not src:
            return
        layers, two, nb, bs, heads, dim = self.tensor.shape
        flat = self.tensor.view(layers, two, nb * bs, heads, dim)
        flat[:, :, torch.tensor(dst, dtype=torch.long)] = flat[:, :, torch.tensor(src, dtype=torch.long)]

    def rerotate(self, src: list[int], dst: list[int], delta: int, rotary) -> None:
        """Token slot src[i] -> dst[i] in every layer, K rotated by RoPE from its position to +delta (V as is): a
        cached segment's KV moved to where the segment sits in a prompt (CacheBlend)."""
        if not src:
            return
        layers, two, nb, bs, heads, dim = self.tensor.shape
        flat = self.tensor.view(layers, two, nb * bs, heads, dim)
        si, di = torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)
        k = flat[:, 0, si].float()  # (layers, n, Hkv, D)
        v = flat[:, 1, si]
        flat[:, 0, di] = rotary.rotate(k, delta).to(self.tensor.dtype)
        flat[:, 1, di] = v

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of whole blocks as (layers, 2, len(block_ids) * block_size, Hkv, D)."""
        idx = torch.tensor(block_ids, dtype=torch.long)
        kv = self.tensor.index_select(2, idx)  # (layers, 2, n, block_size, Hkv, D), a copy (faster than [:, :, idx])
        return kv.reshape(kv.shape[0], 2, -1, kv.shape[-2], kv.shape[-1])
