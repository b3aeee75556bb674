"""Native kernels and packed matmuls against their plain PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from kvserve.kernels import decode_attention_kernel, load, prefill_attention_kernel
from kvserve.model.attention import AttentionBackend, decode_attention_torch
from kvserve.model.batch import ForwardBatch, PrefillSeq
from kvserve.model.layers import Linear, RotaryEmbedding, TorchOps, native_ops


@pytest.fixture(params=["avx512", "amx"])
def decode_path(request):
    """The bf16 decode kernel's two paths: AVX-512 everywhere, AMX tiles where the CPU and OS have them (float32
    always takes the AVX-512 path, so fp32 cases run once per path alike)."""
    mod = load("paged_attention")
    assert mod is not None, "the C++ kernel should build on this machine (g++ + ninja)"
    if request.param == "amx" and not mod.amx_available():
        pytest.skip("this CPU or kernel has no AMX tiles (the AVX-512 case covers the kernel)")
    mod.set_amx(request.param == "amx")
    yield request.param
    mod.set_amx(True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 8, 8)])
@pytest.mark.parametrize("b", [3, 14])  # one KV head per work item (few sequences), all heads per item (many)
def test_native_decode_attention_matches_reference(dtype, tol, head_dim, heads, kv_heads, b, decode_path):
    fn = decode_attention_kernel()
    g = torch.Generator().manual_seed(0)
    nb, bs = 200, 16
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([1, 5, 16, 17, 100, 33, 64, 2, 31, 32, 48, 49, 160, 7][:b], dtype=torch.int32)
    mb = int((lens.max() + bs - 1) // bs)
    tables = torch.randperm(nb, generator=g)[: b * mb].view(b, mb)
    q = torch.randn(b, heads, head_dim, generator=g).to(dtype)
    ours = fn(q, kc, vc, tables, lens, head_dim ** -0.5).float()
    ref = decode_attention_torch(q, kc, vc, tables, lens, head_dim ** -0.5).float()
    assert (ours - ref).abs().max().item() < tol
    if decode_path == "amx" and dtype == torch.bfloat16:  # the switch took: AMX rounds p to bf16 for p.v
        load("paged_attention").set_amx(False)
        assert not torch.equal(ours, fn(q, kc, vc, tables, lens, head_dim ** -0.5).float())
        load("paged_attention").set_amx(True)
    # KV eviction's attention mass: added (not written) per (row, kv head), zero past each length, the same as the
    # PyTorch reference's; each (row, kv head) sums to its G query heads' probabilities, i.e. to G
    width = mb * bs + 5
    start = torch.rand(b, kv_heads, width, generator=g)
    ours_s, ref_s = start.clone(), start.clone()
    fn(q, kc, vc, tables, lens, head_dim ** -0.5, ours_s)
    decode_attention_torch(q, kc, vc, tables, lens, head_dim ** -0.5, ref_s)
    assert (ours_s - ref_s).abs().max().item() < 2e-3
    added = ours_s - start
    assert torch.allclose(added.sum(-1), torch.full((b, kv_heads), heads / kv_heads), atol=1e-3)
    past = torch.arange(width)[None, :] >= lens[:, None]
    assert added.masked_select(past[:, None, :].expand_as(added)).abs().max().item() < 1e-6


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (64, 4, 1), (128, 8, 2)])
def test_few_sequences_split_their_context_across_threads(head_dim, heads, kv_heads):
    """bf16 AVX-512 with fewer (sequence, KV head) items than two per thread: each context is cut into one part per
    thread and the parts' softmax pieces merged (flash-decoding). Against the reference and the unsplit kernel,
    contexts from one token (a part with no block) to several hundred, one to three sequences."""
    mod = load("paged_attention")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the split needs two threads to split across (one core runs them in turn)
    mod.set_amx(False)  # the split path is the AVX-512 kernel's (where AMX runs, its tiles take the queries instead)
    try:
        _check_split(mod, head_dim, heads, kv_heads)
    finally:
        mod.set_amx(True)
        torch.set_num_threads(threads)


def _check_split(mod, head_dim, heads, kv_heads):
    fn = decode_attention_kernel()
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(200, 16, kv_heads, head_dim, generator=g).bfloat16() * 2
    vc = torch.randn(200, 16, kv_heads, head_dim, generator=g).bfloat16()
    cases = [[n] for n in range(1, 720, 7)] + [[16], [17], [3, 250]] + ([[33, 1, 90]] if kv_heads == 1 else [])
    differ = 0
    for lens in cases:
        b = len(lens)
        lens = torch.tensor(lens, dtype=torch.int32)
        mb = int((lens.max() + 15) // 16)
        tables = torch.randperm(200, generator=g)[: b * mb].view(b, mb)
        q = torch.randn(b, heads, head_dim, generator=g).bfloat16()
        split = fn(q, kc, vc, tables, lens, head_dim ** -0.5)
        mod.set_split(False)
        try:
            plain = fn(q, kc, vc, tables, lens, head_dim ** -0.5)
        finally:
            mod.set_split(True)
        ref = decode_attention_torch(q, kc, vc, tables, lens, head_dim ** -0.5).float()
        assert (split.float() - ref).abs().max().item() < 2e-2, lens
        assert (split.float() - plain.float()).abs().max().item() < 2e-2, lens
        differ += int((split != plain).sum())
    assert differ > 0, "the split path did not run (its sums round differently now and then)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verification_rows_share_one_read_and_equal_each_row_alone(dtype, decode_path):
    """A sequence's k + 1 verification rows (one table, lengths L..L+k) are one work item of the bf16 kernel; each row
    must come out bit for bit as it does alone, its attention mass too. Rows that share only full prefix blocks
    (another request on the same cached system prompt), or whose lengths do not follow on, stay apart."""
    fn = decode_attention_kernel()
    g = torch.Generator().manual_seed(3)
    nb, bs, heads, kv_heads, d = 200, 16, 9, 3, 64
    kc = torch.randn(nb, bs, kv_heads, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, d, generator=g).to(dtype)
    own = list(range(10, 90))  # 1,280 tokens: runs are grouped from 1,024 tokens of context
    other = own[:68] + [150, 151, 152]  # shares 68 full blocks with `own`, then its own
    rows = [(own, 1118), (own, 1119), (own, 1120), (own, 1121), (own, 1122),  # crosses a block end inside the run
            (other, 1123), (other, 1124),  # one token on from the last row but another table: a new run
            (own, 1100), (own, 1102),  # not consecutive: apart
            *[(own, n) for n in range(1200, 1209)],  # nine rows: more queries than a value-pass tile
            (own, 500), (own, 501), (own, 502)]  # a short context: apart on AVX-512, one run on AMX
    mb = max(-(-n // bs) for _, n in rows)
    tables = torch.zeros(len(rows), mb, dtype=torch.long)
    for i, (t, n) in enumerate(rows):
        nbk = -(-n // bs)
        tables[i, :nbk] = torch.tensor(t[:nbk])
    lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    q = torch.randn(len(rows), heads, d, generator=g).to(dtype)
    scale = d ** -0.5
    together = fn(q, kc, vc, tables, lens, scale)
    width = mb * bs
    mass = torch.zeros(len(rows), kv_heads, width)
    fn(q, kc, vc, tables, lens, scale, mass)
    for i in range(len(rows)):
        alone_mass = torch.zeros(1, kv_heads, width)
        alone = fn(q[i:i + 1], kc, vc, tables[i:i + 1], lens[i:i + 1], scale, alone_mass)
        assert torch.equal(together[i], alone[0]), f"row {i}"
        assert torch.equal(mass[i], alone_mass[0]), f"row {i}"
    ref = decode_attention_torch(q, kc, vc, tables, lens, scale).float()
    assert (together.float() - ref).abs().max().item() < (1e-5 if dtype == torch.float32 else 2e-2)


def test_packed_bf16_linear_is_bit_identical():
    """oneDNN on the pre-packed weight: the same bits as F.linear (small batches, which go to the gemv kernel, are
    tested in test_gemv.py)."""
    w = torch.randn(96, 64).to(torch.bfloat16)
    b = torch.randn(96).to(torch.bfloat16)
    lin = Linear(w, b, small_batch_kernel=False)
    for m in (1, 3, 64):
        x = torch.randn(m, 64).to(torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, w, b))


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def op_pair(request):
    dtype = request.param
    rotary = RotaryEmbedding(64, 4096, 10000.0, None, None, dtype)
    native = native_ops(rotary)
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
    gu = (torch.randn(5, 2 * 40, generator=g) * 6).to(dtype)  # 40 = two 16-lane vectors and a scalar tail
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


@pytest.mark.parametrize("vocab", [1, 7, 16, 49152, 49157])
def test_native_argmax_is_torchs(vocab):
    """The greedy sampler's argmax: torch's index on random rows, on ties (the first maximum, wherever it sits
    relative to the 16 vector lanes and the scalar tail), on -inf rows, and with NaN (torch's first NaN)."""
    mod = load("fused_ops")
    assert mod is not None
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    x[1] = x[1].round()  # many ties among whole numbers
    x[2] = 0.0
    x[3] = float("-inf")
    if vocab > 20:
        x[4, [3, 19, vocab - 1]] = 9.0  # the same maximum in two lanes and in the tail: the first wins
        x[5, [vocab - 1, 17]] = 9.0
        x[6, [20, 5]] = float("nan")
        x[7, vocab - 1] = float("nan")
        x[8, [8, 24]] = torch.tensor([-0.0, 0.0]) + 50  # equal values
    assert torch.equal(mod.argmax_rows(x), x.argmax(dim=-1))
    assert torch.equal(mod.argmax_rows(x[4:5].contiguous()), x[4:5].argmax(dim=-1))
    with pytest.raises(RuntimeError, match="float32"):
        mod.argmax_rows(x.to(torch.bfloat16))


@pytest.fixture
def without_amx():
    """The AVX-512 paths even where AMX runs (on AMX the prefill kernel declines plain chunks: SDPA is faster)."""
    mod = load("paged_attention")
    mod.set_amx(False)
    yield
    mod.set_amx(True)


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 9, 3), (128, 4, 2)])
def test_native_prefill_attention_matches_sdpa(head_dim, heads, kv_heads, without_amx):
    """Fresh prompts and chunks over a cached prefix, all in one call, against SDPA on the gathered float32 KV."""
    fn = prefill_attention_kernel()
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
    chunks_at = [torch.tensor([s.token_start for s in seqs]), torch.tensor([s.num_tokens for s in seqs]),
                 torch.tensor([s.ctx_start for s in seqs])]  # (S,) each
    tables = torch.zeros(len(seqs), max(s.block_ids.numel() for s in seqs), dtype=torch.long)  # (S, MB)
    for i, s in enumerate(seqs):
        tables[i, :s.block_ids.numel()] = s.block_ids
    out = torch.zeros(t, heads, head_dim, dtype=torch.bfloat16)
    assert fn(q, kc, vc, *chunks_at, tables, out, head_dim ** -0.5)
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
    tables[0, 0] = nb
    with pytest.raises(RuntimeError, match="block id out of range"):
        fn(q, kc, vc, *chunks_at, tables, out, head_dim ** -0.5)


@pytest.mark.parametrize("m", [1, 37, 200])
def test_scattered_queries_match_sdpa(m):
    """CacheBlend's recomputed tokens: rows at scattered, ascending positions, each over the keys up to its own (the
    prefill kernel with q_positions) against the PyTorch backend's masked SDPA, and bad positions refused."""
    g = torch.Generator().manual_seed(m)
    nb, bs, heads, kv_heads, d, ctx = 160, 16, 9, 3, 64, 2300
    kc = torch.randn(nb, bs, kv_heads, d, generator=g).to(torch.bfloat16)
    vc = torch.randn(nb, bs, kv_heads, d, generator=g).to(torch.bfloat16)
    blocks = torch.randperm(nb, generator=g)[:-(-ctx // bs)]
    rows = torch.randperm(ctx, generator=g)[:m].sort().values
    q = torch.randn(m, heads, d, generator=g).to(torch.bfloat16)
    rotary = RotaryEmbedding(d, 4096, 10000.0, None, None, torch.bfloat16)
    native, torch_backend = AttentionBackend.build(rotary), AttentionBackend.build(rotary, native_kernels=False)
    assert native.prefill_kernel is not None
    got = native.scattered(q, kc, vc, blocks, rows, d ** -0.5)
    ref = torch_backend.scattered(q.float(), kc.float(), vc.float(), blocks, rows, d ** -0.5)
    assert (got.float() - ref).abs().max().item() < 2e-2
    if m > 1:
        with pytest.raises(RuntimeError, match="ascend"):
            native.scattered(q, kc, vc, blocks, rows.flip(0), d ** -0.5)


def test_native_prefill_attention_declines_what_it_does_not_cover(without_amx):
    """float32 (the parity path) and layouts outside the kernel go to SDPA: the function says no, writes nothing.
    So do plain chunks where AMX runs (PyTorch's SDPA runs on oneDNN's tiles there and is faster); CacheBlend's
    scattered rows (q_positions) stay on the kernel."""
    fn = prefill_attention_kernel()
    one_chunk = (torch.tensor([0]), torch.tensor([4]), torch.tensor([0]), torch.tensor([[0]]))
    for dtype, heads, kv_heads, d in ((torch.float32, 9, 3, 64), (torch.bfloat16, 32, 1, 64),
                                      (torch.bfloat16, 4, 2, 80)):
        q = torch.ones(4, heads, d, dtype=dtype)
        cache = torch.ones(4, 16, kv_heads, d, dtype=dtype)
        out = torch.zeros_like(q)
        assert fn(q, cache, cache, *one_chunk, out, 0.125) is False
        assert out.abs().sum() == 0
    mod = load("paged_attention")
    if mod.amx_available():
        q = torch.ones(4, 9, 64, dtype=torch.bfloat16)
        cache = torch.ones(4, 16, 3, 64, dtype=torch.bfloat16)
        out = torch.zeros_like(q)
        assert fn(q, cache, cache, *one_chunk, out, 0.125) is True  # AMX switched off (the fixture): the kernel
        mod.set_amx(True)
        out.zero_()
        assert fn(q, cache, cache, *one_chunk, out, 0.125) is False and out.abs().sum() == 0
        assert fn(q, cache, cache, *one_chunk, out, 0.125, torch.arange(4)) is True


@pytest.mark.parametrize("dtype,head_dim,tol", [(torch.float32, 48, 0.0), (torch.bfloat16, 64, 2e-2)])
def test_backend_matches_pytorch_on_a_mixed_step(dtype, head_dim, tol):
    """Decodes and prefill chunks of one step through the native backend and the PyTorch one. Both attention
    kernels decline float32 at head_dim 48, so there the backend must answer exactly as PyTorch does."""
    heads, kv_heads, nb, bs = 6, 2, 64, 16
    g = torch.Generator().manual_seed(4)
    kc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(nb, bs, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(nb, generator=g)
    seqs = [PrefillSeq(2, 20, 0, perm[6:8]), PrefillSeq(22, 7, 30, perm[8:11])]  # a fresh prompt, a later chunk
    t = 2 + 20 + 7 + 1  # 2 decodes, the chunks, 1 padding row
    q = torch.randn(t, heads, head_dim, generator=g).to(dtype)
    k = torch.zeros(t, kv_heads, head_dim, dtype=dtype)
    v = torch.zeros(t, kv_heads, head_dim, dtype=dtype)
    for s in seqs:  # the chunks' own K/V, as the model has just written them into their slots
        rows, ctx = slice(s.token_start, s.token_start + s.num_tokens), slice(s.ctx_start, s.ctx_len)
        k[rows] = kc[s.block_ids].view(-1, kv_heads, head_dim)[ctx]
        v[rows] = vc[s.block_ids].view(-1, kv_heads, head_dim)[ctx]
    zeros = torch.zeros(t, dtype=torch.long)
    batch = ForwardBatch(zeros, zeros, zeros, num_decodes=2, decode_block_tables=perm[:6].view(2, 3),
                         decode_seq_lens=torch.tensor([9, 40], dtype=torch.int32), prefills=seqs,
                         prefill_token_starts=torch.tensor([2, 22]), prefill_num_tokens=torch.tensor([20, 7]),
                         prefill_ctx_starts=torch.tensor([0, 30]),
                         prefill_block_tables=torch.stack([torch.cat([perm[6:8], torch.zeros(1, dtype=torch.long)]),
                                                           perm[8:11]]))  # padded with block 0
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None, None, dtype)
    native = AttentionBackend.build(rotary)
    assert native.decode_kernel is not None and native.prefill_kernel is not None
    ours = native(q, k, v, kc, vc, batch, head_dim ** -0.5)
    ref = AttentionBackend.build(rotary, native_kernels=False)(q, k, v, kc, vc, batch, head_dim ** -0.5)
    assert (ours.float() - ref.float()).abs().max().item() <= tol
    assert ours[-1].abs().sum() == 0, "the padding row stays zero"


def test_a_stale_build_lock_does_not_hang_the_next_load():
    """A process killed while torch's loader held the build lock leaves a `lock` file that made every later load of
    that kernel wait forever (a server stopped during its engine core's start could not start again)."""
    import os
    import subprocess
    import sys

    from kvserve import kernels

    assert load("fused_ops") is not None, "the C++ kernel should build on this machine (g++ + ninja)"
    source = os.path.join(os.path.dirname(kernels.__file__), "fused_ops.cpp")
    stale = os.path.join(kernels._build_dir("fused_ops", source), "lock")
    open(stale, "w").close()
    code = "from kvserve.kernels import load; assert load('fused_ops') is not None"
    done = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "removed a stale build lock" in done.stderr and not os.path.exists(stale)
