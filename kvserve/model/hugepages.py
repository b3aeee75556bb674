"""Tensors in memory backed by 2 MiB pages (Linux transparent huge pages, asked for with madvise).

A batch-1 decode step streams every weight once: on 4 KiB pages that is a TLB miss every 4 KiB and a hardware
prefetcher that stops at every page boundary. Most distributions ship THP in `madvise` mode, where only memory that
asks for huge pages gets them, and torch's allocator does not ask. On this host (AMD EPYC, 2 cores) batch-1 decode
ran 1.04-1.08x faster with the weights on 2 MiB pages (q4_1, q8_0, bf16; docs/benchmarks.md, "Weights on huge
pages"); the KV cache on them measured no faster (1.01x at 1,024-1,280 tokens of context), so it stays on torch's
allocator. Where THP is off, or the platform has no madvise, this is ordinary anonymous memory: the same tensors.
"""

from __future__ import annotations

import ctypes
import functools
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
    step that reads them in that order streams one run of memory): same shapes, dtypes and values, contiguous.

    Each original is freed, and glibc told to give freed heap memory back (malloc_trim), as soon as it is copied:
    tensors of a few MB come from glibc's heap once its mmap threshold has grown, and stay resident there when freed.
    Without that, a bf16 model's peak RSS at load rose 257 MB (its gemv copies held twice); with it, the peak is about
    the weights plus the largest tensor (the output matrix): +32-34 MB for q4_1 and bf16, none for q8_0
    (`kvserve.bench.load_memory`)."""
    sizes = [getattr(obj, name).numel() * getattr(obj, name).element_size() for obj, name in holders]
    arena = huge_page_bytes(sum(_aligned(n) for n in sizes))
    trim = _malloc_trim()
    off = 0
    for (obj, name), n in zip(holders, sizes):
        t = getattr(obj, name)
        new = arena[off:off + n].view(t.dtype).view(t.shape)
        new.copy_(t)
        setattr(obj, name, new)
        del t
        off += _aligned(n)
        if trim is not None and n >= TRIM_BYTES:
            trim(0)


TRIM_BYTES = 1 << 20  # smaller tensors are trimmed with the next large one


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is another."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
