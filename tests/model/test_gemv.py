"""The small-batch bfloat16 linear kernel (kernels/gemv.cpp) against float32 math, and Linear's choice of path."""

from __future__ import annotations

import pytest
import torch

from kvserve import kernels
from kvserve.model.layers import GEMV_MAX_TOKENS, Linear

mod = kernels.gemv_module()
pytestmark = pytest.mark.skipif(mod is None, reason="gemv kernel did not build (no AVX512-BF16)")


@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (3, 576, 1536), (8, 48, 6), (5, 16, 2)])
def test_gemv_matches_float32(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(m, k, generator=g).bfloat16()
    packed = mod.pack(w)
    assert packed.shape == (n // 16, k // 2, 32)
    assert packed[1 if n > 16 else 0, 0, 2 * 3 + 1] == w[(16 if n > 16 else 0) + 3, 1]  # row 3 of the group, k = 1
    y = mod.gemv(x, packed)
    ref = x.float() @ w.float().t()  # exact products of bf16 inputs; only the order of float32 sums differs
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())


def test_gemv_rejects_bad_input():
    packed = mod.pack(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="at most"):
        mod.gemv(torch.randn(9, 64).bfloat16(), packed)
    with pytest.raises(RuntimeError, match="K"):
        mod.gemv(torch.randn(2, 32).bfloat16(), packed)
    with pytest.raises(RuntimeError, match="bf16"):
        mod.gemv(torch.randn(2, 64), packed)
    with pytest.raises(RuntimeError, match="N % 16"):
        mod.pack(torch.randn(20, 64).bfloat16())


def test_linear_uses_gemv_for_small_batches_only():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g).bfloat16()
    bias = torch.randn(64, generator=g).bfloat16()
    lin = Linear(w, bias)
    plain = Linear(w, bias, small_batch_kernel=False)
    assert lin.gemv is not None and plain.gemv is None
    for m in (1, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 1):
        x = torch.randn(m, 96, generator=g).bfloat16()
        ref = (x.float() @ w.float().t() + bias.float())
        for layer in (lin, plain):
            torch.testing.assert_close(layer(x).float(), ref, rtol=2 ** -6, atol=0.05)
    x = torch.randn(GEMV_MAX_TOKENS + 1, 96, generator=g).bfloat16()
    assert torch.equal(lin(x), plain(x))  # above the threshold both are oneDNN's
