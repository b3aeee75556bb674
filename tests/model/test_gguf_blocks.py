"""GGUF quantized blocks kept as stored: decoded to the kernels' operands exactly (the gguf package's dequantization
is the oracle), Q4_K included, read from files without a float copy, and packed for the kernels without
requantization, on tiny files and on the embedded Q4_1 model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvserve.model.quant import (
    GGUFWeight,
    Int8Linear,
    Q4Linear,
    cat_rows,
    quantize_q4_k,
    reference_q4_linear,
    unpack_int8,
    unpack_q4,
)


def _float(n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[:, 7] *= 10  # an outlier column
    w[3, :64] = 0.0  # all-zero blocks: scale 0, no division by zero
    w[5, :32] = torch.linspace(0.01, 0.3, 32)  # an all-positive block (Q4_K's min is clamped to 0)
    return w


def _gguf(w: torch.Tensor, qtype: str) -> GGUFWeight:
    import gguf

    if qtype == "Q4_K":
        data = quantize_q4_k(w)
    else:
        data = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype]).copy())
    return GGUFWeight(qtype, tuple(w.shape), data)


def _from_codes(gw: GGUFWeight) -> torch.Tensor:
    if gw.qtype == "Q8_0":
        q, d = gw.codes()
        return (q.float().reshape(gw.shape[0], -1, 32) * d[..., None]).reshape(gw.shape)
    q, d, m = gw.codes()
    return (q.float().reshape(gw.shape[0], -1, 32) * d[..., None] + m[..., None]).reshape(gw.shape)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_codes_decode_the_file_exactly(qtype):
    w = _float(48, 512)
    gw = _gguf(w, qtype)
    ref = gw.dequantize()  # gguf-py's reference dequantization
    assert ref.shape == (48, 512) and ref.dtype == torch.float32
    torch.testing.assert_close(_from_codes(gw), ref, rtol=1e-6, atol=1e-7)
    if qtype != "Q8_0":
        q, d, m = gw.codes()
        assert q.dtype == torch.uint8 and int(q.max()) <= 15
    # a quantizer, not noise: the error is a 4-/8-bit one
    rel = ((ref - w).norm() / w.norm()).item()
    assert rel < (0.02 if qtype == "Q8_0" else 0.2), rel


def test_q4_k_quantizer_layout():
    """The packed 6-bit scales decode to what was chosen: checked against gguf-py's Q4_K dequantizer on blocks whose
    sub-blocks need the high bits of scales and mins (values >= 16) in every one of the 8 positions."""
    w = torch.zeros(16, 256)
    for j in range(8):  # sub-block j spans [-(j + 1) * 0.1, (8 - j)]: scales and mins differ per sub-block
        w[:, 32 * j:32 * (j + 1)] = torch.linspace(-(j + 1) * 0.1, 8 - j, 32)
    gw = _gguf(w, "Q4_K")
    torch.testing.assert_close(gw.dequantize(), w, atol=0.5 * (8.1 / 15) + 0.02, rtol=0)
    _, d, m = gw.codes()
    assert len(set(d[0].tolist())) == 8 and len(set(m[0].tolist())) == 8
    with pytest.raises(ValueError, match="256"):
        quantize_q4_k(torch.zeros(16, 288))


def test_cat_rows_keeps_blocks():
    a, b = _gguf(_float(32, 64, 1), "Q4_1"), _gguf(_float(16, 64, 2), "Q4_1")
    both = cat_rows([a, b])
    assert isinstance(both, GGUFWeight) and both.shape == (48, 64)
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = cat_rows([a, _gguf(_float(16, 64, 2), "Q8_0")])  # different types: float
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (48, 64)
    with pytest.raises(ValueError, match="block layout"):
        GGUFWeight("Q4_1", (32, 64), a.data[:, :-1])


@pytest.mark.parametrize("qtype,fmt", [("Q4_0", "q4_0"), ("Q4_1", "q4_1"), ("Q4_K", "q4_k")])
def test_q4_linear_packs_the_file_blocks(qtype, fmt):
    gw = _gguf(_float(48, 512), qtype)
    lin = Q4Linear(gw, fmt, native=False)
    q, d, m = unpack_q4(lin.packed, lin.scales)
    q0, d0, m0 = gw.codes()
    assert torch.equal(q, q0)  # the file's codes, not a requantization of its values
    torch.testing.assert_close(d, d0.half().float(), rtol=0, atol=0)  # exact for Q4_0/Q4_1; fp16 sub-scales Q4_K
    torch.testing.assert_close(m, m0.half().float(), rtol=0, atol=0)
    if qtype != "Q4_K":
        assert torch.equal(d, d0) and torch.equal(m, m0)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3))
    # against the file's own values: only the activations' int8 rounding (and Q4_K's fp16 sub-scales) differ
    exact = x @ gw.dequantize().T
    assert ((lin(x) - exact).norm() / exact.norm()).item() < 0.01
    native = Q4Linear(gw, fmt)  # the kernel on the file's blocks against the reference on the same codes
    if native.mod is not None:
        torch.testing.assert_close(native(x), reference_q4_linear(x, q, d, m), rtol=1e-5, atol=1e-5)


def test_q4_k_from_float_and_fallback():
    w = _float(32, 512)
    torch.testing.assert_close(Q4Linear(w, "q4_k", native=False).packed, Q4Linear(_gguf(w, "Q4_K"), "q4_k",
                                                                                  native=False).packed)
    # in_features not a multiple of 256: Q4_1's rule (llama.cpp's Q4_K files fall back for such rows too)
    w2 = _float(32, 576)
    torch.testing.assert_close(Q4Linear(w2, "q4_k", native=False).packed, Q4Linear(w2, "q4_1", native=False).packed)


def test_int8_linear_packs_q8_0_blocks():
    gw = _gguf(_float(32, 128), "Q8_0")
    lin = Int8Linear(gw, "q8_0", native=False)
    q, d = unpack_int8(lin.packed, lin.scales)
    q0, d0 = gw.codes()
    assert torch.equal(q, q0) and torch.equal(d, d0)
    # w8a8 requantizes the file's values in groups of 64
    w8 = Int8Linear(gw, "w8a8", native=False)
    assert w8.scales.shape[1] == 128 // 64 and not torch.equal(unpack_int8(w8.packed, w8.scales)[0], q0)


# ------------------------------------------------------------------------------------ files and the real model
def test_tiny_q4_k_file_loads_blocks(tmp_path):
    """A GGUF file with Q4_K and Q8_0 matmul weights (hidden 256, so Q4_K's super-blocks fit) is read into blocks,
    llama.cpp's Q/K row permutation undone on the block rows, and the model packs them as stored."""
    import gguf

    from kvserve.model.llama import LlamaModel
    from kvserve.model.loader import load_gguf, unpermute_qk

    hidden, inter, heads, kv, vocab = 256, 512, 4, 2, 512
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.05
    path = tmp_path / "tiny-q4k.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    for fn, v in (("add_block_count", 1), ("add_context_length", 256), ("add_embedding_length", hidden),
                  ("add_feed_forward_length", inter), ("add_head_count", heads), ("add_head_count_kv", kv),
                  ("add_vocab_size", vocab)):
        getattr(wr, fn)(v)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_freq_base(10000.0)
    T = gguf.GGMLQuantizationType
    tensors = {"token_embd.weight": (rnd(vocab, hidden), T.Q8_0), "output_norm.weight": (torch.ones(hidden), T.F32),
               "blk.0.attn_norm.weight": (torch.ones(hidden), T.F32), "blk.0.ffn_norm.weight": (torch.ones(hidden), T.F32),
               "blk.0.attn_q.weight": (rnd(hidden, hidden), T.Q4_K), "blk.0.attn_k.weight": (rnd(kv * 64, hidden), T.Q4_K),
               "blk.0.attn_v.weight": (rnd(kv * 64, hidden), T.Q4_K), "blk.0.attn_output.weight": (rnd(hidden, hidden), T.Q4_K),
               "blk.0.ffn_gate.weight": (rnd(inter, hidden), T.Q4_K), "blk.0.ffn_up.weight": (rnd(inter, hidden), T.Q4_K),
               "blk.0.ffn_down.weight": (rnd(hidden, inter), T.Q8_0)}
    stored = {}
    for name, (t, qt) in tensors.items():
        if qt == T.Q4_K:
            data = quantize_q4_k(t).numpy()
        else:
            data = gguf.quants.quantize(t.numpy(), qt)
        stored[name] = data
        wr.add_tensor(name, data, raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()

    loaded = load_gguf(str(path))
    assert loaded.weight_format == "q4_k"
    q_w = loaded.weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q_w, GGUFWeight) and q_w.qtype == "Q4_K"
    raw_q = gguf.quants.dequantize(stored["blk.0.attn_q.weight"], T.Q4_K).reshape(hidden, hidden)
    np.testing.assert_array_equal(q_w.dequantize().numpy(), unpermute_qk(raw_q, heads))
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, native_kernels=False, quantization="q4_k")
    qkv = model.layers[0].qkv
    assert isinstance(qkv, Q4Linear)
    codes = cat_rows([loaded.weights[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]).codes()
    assert torch.equal(unpack_q4(qkv.packed, qkv.scales)[0], codes[0])
    assert isinstance(model.layers[0].down, Q4Linear)  # a Q8_0 tensor under q4_k: requantized to 4 bits
    assert isinstance(model.lm_head, Int8Linear)  # the Q8_0 embedding's blocks as stored


def test_embedded_model_runs_its_own_q4_1_blocks():
    """The embedded Q4_1 file: the loader keeps every matmul weight in its blocks (no float copy) and `auto` packs
    them for the 4-bit kernel as stored, with the Q8_0 embedding as the output matrix's blocks."""
    from kvserve.model.llama import LlamaModel
    from kvserve.model.loader import load_model
    from kvserve.model.quant import resolve_quantization

    loaded = load_model(None)
    blocks = [v for v in loaded.weights.values() if isinstance(v, GGUFWeight)]
    assert len(blocks) == 30 * 7 + 1 and {b.qtype for b in blocks} == {"Q4_1", "Q8_0"}
    assert not any(isinstance(v, torch.Tensor) and v.dim() == 2 for v in loaded.weights.values())
    fmt = resolve_quantization("auto", loaded.weight_format)
    assert fmt == "q4_1"
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, native_kernels=False, quantization=fmt)
    down = loaded.weights["model.layers.29.mlp.down_proj.weight"]
    q, d, m = unpack_q4(model.layers[29].down.packed, model.layers[29].down.scales)
    q0, d0, m0 = down.codes()
    assert torch.equal(q, q0) and torch.equal(d, d0) and torch.equal(m, m0)
    hq, hd = unpack_int8(model.lm_head.packed, model.lm_head.scales)
    eq, ed = loaded.weights["model.embed_tokens.weight"].codes()
    assert torch.equal(hq, eq) and torch.equal(hd, ed)
