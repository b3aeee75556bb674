"""The decode step's weights on huge pages (kvserve.model.hugepages): same values, one arena, the reading order."""

from __future__ import annotations

import os
import types
import weakref

import torch

from kvserve.model.hugepages import ALIGN, HUGE_PAGE, huge_page_bytes, to_huge_pages


def vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds address ptr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


def thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def test_huge_page_bytes_is_zeroed_aligned_and_advised():
    buf = huge_page_bytes(3 * HUGE_PAGE + 5)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * HUGE_PAGE + 5 and buf.is_contiguous()
    assert buf.data_ptr() % HUGE_PAGE == 0
    assert int(buf.count_nonzero()) == 0
    buf[-1] = 7  # writable to the last byte
    if os.path.exists("/proc/self/smaps") and thp_mode() is not None:
        assert "hg" in vm_flags(buf.data_ptr())  # MADV_HUGEPAGE took: the kernel may back it with 2 MiB pages


def test_to_huge_pages_moves_each_tensor_in_order_with_its_values():
    g = torch.Generator().manual_seed(0)
    a = types.SimpleNamespace(w=torch.randint(0, 255, (48, 3, 8, 64), dtype=torch.uint8, generator=g),
                              s=torch.randn(48, 3, 16, generator=g).half())
    b = types.SimpleNamespace(w=torch.randn(100, 7, generator=g).bfloat16(),
                              t=torch.randn(9, 16, generator=g)[:, ::2])  # a strided view: placed contiguous
    holders = [(a, "w"), (a, "s"), (b, "w"), (b, "t")]
    before = [getattr(o, n).clone() for o, n in holders]
    originals = [weakref.ref(getattr(o, n)) for o, n in holders]
    to_huge_pages(holders)
    assert all(r() is None for r in originals)  # nothing keeps the originals: a load holds the weights once
    after = [getattr(o, n) for o, n in holders]
    for old, new in zip(before, after):
        assert new.dtype == old.dtype and new.shape == old.shape and new.is_contiguous()
        assert torch.equal(new, old)
    ptrs = [t.data_ptr() for t in after]
    assert ptrs[0] % HUGE_PAGE == 0 and all(p % ALIGN == 0 for p in ptrs)
    for t, nxt in zip(after, ptrs[1:]):  # back to back in the given order, each on the next cache line
        end = t.data_ptr() + t.numel() * t.element_size()
        assert end <= nxt < end + ALIGN


def test_the_models_streamed_weights_share_one_arena_in_reading_order():
    from kvserve.model.loader import load_model
    from kvserve.model.llama import LlamaModel

    loaded = load_model(None)
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q4_1")
    held = model.streamed_weights()
    names = [name for _, name in held]
    assert len(held) == 2 * (4 * loaded.config.num_layers + 1) and set(names) == {"packed", "scales"}
    assert held[0][0] is model.layers[0].qkv and held[-1][0] is model.lm_head  # layer by layer, the head last
    ptrs = [getattr(o, n).data_ptr() for o, n in held]
    assert ptrs == sorted(ptrs) and ptrs[0] % HUGE_PAGE == 0
    span = ptrs[-1] + getattr(*held[-1]).numel() * 2 - ptrs[0]
    assert span < model.weight_bytes() + len(held) * ALIGN  # one run of memory: nothing else between them
