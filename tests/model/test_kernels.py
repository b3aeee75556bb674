"""Native kernels and packed matmuls against their plain PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from kvserve.kernels import load, paged_decode_attention_fn
from kvserve.model.layers import Linear, decode_attention_torch
from kvserve.worker.batch import ForwardBatch


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 8, 8)])
def test_native_decode_attention_matches_reference(dtype, tol, head_dim, heads, kv_heads):
    assert load("paged_attention") is not None, "the C++ kernel should build on this machine (g++ + ninja)"
    fn = paged_decode_attention_fn()
    g = torch.Generator().manual_seed(0)
    nb, bs, b = 80, 16, 7
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 5, 16, 17, 100, 33, 64], dtype=torch.int32)
    mb = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(nb, generator=g)[: b * mb].view(b, mb)
    q = torch.randn(b, heads, head_dim, generator=g).to(dtype)
    batch = ForwardBatch(torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long),
                         torch.zeros(b, dtype=torch.long), num_decodes=b, decode_block_tables=tables,
                         decode_seq_lens=lens)
    ours = fn(q, kc, vc, batch, head_dim ** -0.5).float()
    ref = decode_attention_torch(q, kc, vc, batch, head_dim ** -0.5).float()
    assert (ours - ref).abs().max().item() < tol


def test_packed_bf16_linear_is_bit_identical():
    w = torch.randn(96, 64).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16)
    lin = Linear(w, b)
    for m in (1, 3, 64):
        x = torch.randn(m, 64).to(torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, w, b))
