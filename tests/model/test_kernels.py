"""Native kernels and packed matmuls against their plain PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from kvserve.kernels import fused_ops, load, paged_decode_attention_fn, prefill_attention_fn
from kvserve.model.layers import Linear, RotaryEmbedding, TorchOps, decode_attention_torch
from kvserve.worker.batch import ForwardBatch, PrefillSeq


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 8, 8)])
@pytest.mark.parametrize("b", [3, 14])  # one KV head per work item (few sequences), all heads per item (many)
def test_native_decode_attention_matches_reference(dtype, tol, head_dim, heads, kv_heads, b):
    assert load("paged_attention") is not None, "the C++ kernel should build on this machine (g++ + ninja)"
    fn = paged_decode_attention_fn()
    g = torch.Generator().manual_seed(0)
    nb, bs = 200, 16
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 5, 16, 17, 100, 33, 64, 2, 31, 32, 48, 49, 160, 7][:b], dtype=torch.int32)
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


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def op_pair(request):
    dtype = request.param
    rotary = RotaryEmbedding(64, 4096, 10000.0, None, None, dtype)
    native = fused_ops(rotary)
    assert native is not None, "the fused C++ kernels should build on this machine (g++ + ninja)"
    return dtype, TorchOps(rotary), native


def _same(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """bf16: bit for bit (the kernels round every intermediate where PyTorch does); fp32: within a few ulps
    (the kernels contract multiply-adds and sum in another order)."""
    if dtype == torch.bfloat16:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_norms_and_silu_match_eager(op_pair):
    dtype, ref, nat = op_pair
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(37, 576, generator=g) * 3).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    _same(nat.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    delta = torch.randn(37, 576, generator=g).to(dtype)
    h_ref, h_nat = x.clone(), x.clone()
    out_ref, out_nat = ref.add_rms_norm_(h_ref, delta, w, 1e-5), nat.add_rms_norm_(h_nat, delta, w, 1e-5)
    assert torch.equal(h_nat, h_ref), "the residual add rounds exactly like h + delta"
    _same(out_nat, out_ref, dtype)
    gu = (torch.randn(37, 2 * 1536, generator=g) * 6).to(dtype)  # covers exp's range well past |x| = 10
    _same(nat.silu_mul(gu), ref.silu_mul(gu), dtype)


def test_fused_rope_writes_the_same_kv(op_pair):
    dtype, ref, nat = op_pair
    g = torch.Generator().manual_seed(2)
    t, heads, kv_heads, d = 23, 9, 3, 64
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    positions = torch.randint(0, 4096, (t,), generator=g)
    slots = torch.randperm(40 * 16, generator=g)[:t]
    batch = ForwardBatch(positions, positions, slots)
    results = []
    for ops in (ref, nat):
        caches = torch.zeros(2, 40, 16, kv_heads, d, dtype=dtype)
        x = qkv.clone()
        ops.rope_qkv_write_(x, batch, ops.rope_tables(positions), caches[0], caches[1], heads, kv_heads)
        results.append((x, caches))
    _same(results[1][0], results[0][0], dtype)
    _same(results[1][1], results[0][1], dtype)
    untouched = torch.ones(40 * 16, dtype=torch.bool)
    untouched[slots] = False
    assert results[1][1].view(2, 40 * 16, -1)[:, untouched].abs().sum() == 0, "only the given slots are written"


def test_fused_rope_rejects_bad_slots_and_positions(op_pair):
    dtype, _, nat = op_pair
    caches = torch.zeros(2, 4, 16, 3, 64, dtype=dtype)
    qkv = torch.zeros(2, 15 * 64, dtype=dtype)
    for positions, slots in (([0, 1], [0, 64]), ([0, 4096], [0, 1]), ([0, -1], [0, 1])):
        batch = ForwardBatch(torch.tensor(positions), torch.tensor(positions), torch.tensor(slots))
        with pytest.raises(RuntimeError, match="out of range"):
            nat.rope_qkv_write_(qkv, batch, None, caches[0], caches[1], 9, 3)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 4, 2)])
def test_native_prefill_attention_matches_sdpa(head_dim, heads, kv_heads):
    """Fresh prompts and chunks over a cached prefix, all in one call, against SDPA on the gathered float32 KV."""
    fn = prefill_attention_fn()
    assert fn is not None, "the C++ kernel should build on this machine (g++ + ninja)"
    g = torch.Generator().manual_seed(3)
    nb, bs = 300, 16
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(torch.bfloat16)
    chunks = [(0, 5), (0, 37), (20, 13), (100, 64), (3, 1), (0, 130), (16, 16)]  # (tokens cached before, chunk)
    t = sum(n for _, n in chunks) + 3  # + 3 padding rows
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(torch.bfloat16)
    q = qkv[:, :heads * head_dim].view(t, heads, head_dim)  # a strided view, as the model passes it
    perm, used, row, seqs = torch.randperm(nb, generator=g), 0, 0, []
    for c, n in chunks:
        nblk = -(-(c + n) // bs)
        seqs.append(PrefillSeq(row, n, c, perm[used:used + nblk]))
        used, row = used + nblk, row + n
    batch = ForwardBatch(torch.zeros(t, dtype=torch.long), torch.zeros(t, dtype=torch.long),
                         torch.zeros(t, dtype=torch.long), prefills=seqs)
    batch.prefill_token_starts = torch.tensor([s.token_start for s in seqs])
    batch.prefill_num_tokens = torch.tensor([s.num_tokens for s in seqs])
    batch.prefill_ctx_starts = torch.tensor([s.ctx_start for s in seqs])
    batch.prefill_block_tables = torch.zeros(len(seqs), max(s.block_ids.numel() for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch.prefill_block_tables[i, :s.block_ids.numel()] = s.block_ids
    out = torch.zeros(t, heads, head_dim, dtype=torch.bfloat16)
    assert fn(q, kc, vc, batch, out, head_dim ** -0.5)
    for s in seqs:
        ctx = s.ctx_start + s.num_tokens
        k = kc[s.block_ids].reshape(-1, kv_heads, head_dim)[:ctx].float()
        v = vc[s.block_ids].reshape(-1, kv_heads, head_dim)[:ctx].float()
        mask = torch.arange(ctx)[None, :] <= torch.arange(s.ctx_start, ctx)[:, None]
        ref = F.scaled_dot_product_attention(
            q[s.token_start:s.token_start + s.num_tokens].float().transpose(0, 1), k.transpose(0, 1),
            v.transpose(0, 1), attn_mask=mask, scale=head_dim ** -0.5, enable_gqa=True).transpose(0, 1)
        got = out[s.token_start:s.token_start + s.num_tokens].float()
        assert (got - ref).abs().max().item() < 2e-2, (s.ctx_start, s.num_tokens)
    assert out[row:].abs().sum() == 0, "rows outside the chunks are not written"
    bad = batch.prefill_block_tables.clone()
    bad[0, 0] = nb
    batch.prefill_block_tables = bad
    with pytest.raises(RuntimeError, match="block id out of range"):
        fn(q, kc, vc, batch, out, head_dim ** -0.5)


def test_native_prefill_attention_declines_what_it_does_not_cover():
    """float32 (the parity path) and layouts outside the kernel go to SDPA: the function says no, writes nothing."""
    fn = prefill_attention_fn()
    batch = ForwardBatch(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                         torch.zeros(4, dtype=torch.long))
    for dtype, heads, kv_heads, d in ((torch.float32, 9, 3, 64), (torch.bfloat16, 32, 1, 64),
                                      (torch.bfloat16, 4, 2, 80)):
        q = torch.ones(4, heads, d, dtype=dtype)
        cache = torch.ones(4, 16, kv_heads, d, dtype=dtype)
        out = torch.zeros_like(q)
        assert fn(q, cache, cache, batch, out, 0.125) is False
        assert out.abs().sum() == 0
