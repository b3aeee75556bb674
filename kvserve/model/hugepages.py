"""Tensors in memory backed by 2 MiB pages (Linux transparent huge pages, asked for with madvise).

A batch-1 decode step streams every weight once: on 4 KiB pages that is a TLB miss every 4 KiB and a hardware
prefetcher that stops at every page boundary. Most distributions ship THP in `madvise` mode, where only memory that
asks for huge pages gets them, and torch's allocator does not ask. On this host (AMD EPYC, 2 cores) q4_1 batch-1
decode ran 1.03-1.10x faster with the weights on 2 MiB pages (docs/benchmarks.md, "Weights on huge pages"); the KV
cache on them measured no faster (1.01x at 1,024-1,280 tokens of context), so it stays on torch's allocator. Where
THP is off, or the platform has no madvise, this is ordinary anonymous memory: the same tensors, no error.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor placed in an arena starts on a cache line


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 tensor of nbytes, starting on a 2 MiB boundary, that the kernel may back with 2 MiB pages."""
    size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE) + HUGE_PAGE  # room to start on a 2 MiB boundary
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and hasattr(region, "madvise"):
        try:
            region.madvise(advice)
        except OSError:  # THP compiled out of this kernel: ordinary pages
            pass
    buf = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` open for as long as a view lives
    start = -buf.data_ptr() % HUGE_PAGE
    return buf[start:start + nbytes]


def to_huge_pages(holders: list[tuple[object, str]]) -> None:
    """Moves each holder's tensor attribute into one huge-page arena, one after another in the given order (a decode
    step that reads them in that order streams one run of memory): same shapes, dtypes and values, contiguous. Each
    original is dropped as soon as it is copied, so a load peaks at about one copy of the weights, not two."""
    sizes = [getattr(obj, name).numel() * getattr(obj, name).element_size() for obj, name in holders]
    arena = huge_page_bytes(sum(_aligned(n) for n in sizes))
    off = 0
    for (obj, name), n in zip(holders, sizes):
        t = getattr(obj, name)
        new = arena[off:off + n].view(t.dtype).view(t.shape)
        new.copy_(t)
        setattr(obj, name, new)
        off += _aligned(n)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
