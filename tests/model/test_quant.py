"""Int8 weights (q8_0, w8a8): the native VNNI kernel against its PyTorch reference and its portable path, the
packing, the model and engine wiring, and a quality bound on the real model against bfloat16."""

from __future__ import annotations

import pytest
import torch

from kvserve import kernels
from kvserve.config import ConfigError
from kvserve.kvstore import model_fingerprint
from kvserve.model.quant import (
    Int8Linear,
    block_size,
    pack_int8,
    quantize_blocks,
    reference_int8_linear,
    resolve_quantization,
    unpack_int8,
)

mod = kernels.quant_gemm_module()
needs_kernel = pytest.mark.skipif(mod is None, reason="native quant_gemm kernel did not build")
FORMATS = ("q8_0", "w8a8")
PATHS = (0, 1, 2) if mod is not None and mod.has_avx2() else (0, 2)  # best, AVX2 forced, portable forced


def _weights(n, k, fmt, seed=0):
    """(float weights, codes, the scales as stored: fp16-rounded for q8_0)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column, as real layers have
    q, d = quantize_blocks(w, block_size(fmt, k))
    return w, q, unpack_int8(*pack_int8(q, d))[1]


def test_quantize_blocks_rule():
    w = torch.tensor([[0.0] * 32, [1.0, -2.0] + [0.5] * 30])
    q, d = quantize_blocks(w, 32)
    assert d[0, 0] == 0 and q[0].abs().sum() == 0  # an all-zero block: scale 0, no division by zero
    assert d[1, 0] == pytest.approx(2.0 / 127) and q[1, 1] == -127 and q[1, 0] == 64  # round(63.5) -> 64 (even)


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_roundtrip(fmt):
    _, q, d = _weights(48, 96, fmt)
    packed, scales = pack_int8(q, d)
    assert packed.shape == (3, 3, 8, 64) and scales.shape == (3, d.shape[1], 16)
    assert scales.dtype == torch.float16  # GGUF's fp16 block scales
    assert d.shape[1] == 96 // block_size(fmt, 96) == 3  # 96 is no multiple of 64: w8a8 falls back to 32
    q2, d2 = unpack_int8(packed, scales)
    assert torch.equal(q, q2) and torch.equal(d.to(scales.dtype).float(), d2)
    # row 17, k = 37 (block 1, vector 1, lane 1 of group 1) sits at byte 4 * 1 + 1 of that vector, stored + 128
    assert packed[1, 1, 1, 4 * 1 + 1] == q[17, 37] + 128


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (5, 576, 1536), (6, 32, 32), (13, 3072, 576), (130, 48, 64)])
def test_kernel_matches_reference(fmt, m, n, k):
    _, q, d = _weights(n, k, fmt, seed=m)
    packed, scales = pack_int8(q, d)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)) * 2
    x[0, 5] = 40.0  # an activation outlier
    ref = reference_int8_linear(x, q, d)
    for path in PATHS:  # the best path (VNNI here), AVX2 (laptops without AVX-512) and the portable one, each forced
        y = mod.int8_linear(x, packed, scales, path)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    for path in PATHS:
        yb = mod.int8_linear(xb, packed, scales, path)
        assert yb.dtype == torch.bfloat16
        # the same float32 sums rounded once to bfloat16: at most one bf16 ulp apart where the order of sums differs
        torch.testing.assert_close(yb.float(), reference_int8_linear(xb, q, d).float(), rtol=2 ** -7, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 96, 192, 576])
def test_kernel_any_scale_group(group):
    """One scale per `group` inputs (q8_0: 32, w8a8: 64; the layout takes any multiple of 32 dividing K, a whole
    row included): every path against the reference, for one token (its two int32 chains) and a tile and a tail."""
    n, k = 48, 576
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(group)) * 0.05
    q, d = quantize_blocks(w, group)
    packed, scales = pack_int8(q, d)
    assert scales.shape == (3, k // group, 16)
    d = unpack_int8(packed, scales)[1]  # fp16-rounded, as stored
    for m in (1, 6, 9):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2
        x[0, 5] = 40.0
        ref = reference_int8_linear(x, q, d)
        for path in PATHS:
            torch.testing.assert_close(mod.int8_linear(x, packed, scales, path), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_pair_tiles_give_the_same_bits(fmt):
    """From 48 tokens the VNNI path runs two row groups per tile: the same sums in the same order as one at a
    time, so the same bits, for full tiles and a tail; an odd number of row groups stays one at a time."""
    for n, m in ((96, 130), (64, 257), (80, 140), (96, 50)):  # 6, 4, 5 and 6 row groups
        _, q, d = _weights(n, 576, fmt, seed=n)
        packed, scales = pack_int8(q, d)
        x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m)).bfloat16()
        try:
            mod.set_pair_tiles(False)
            one = mod.int8_linear(x, packed, scales, 0)
            mod.set_pair_tiles(True)
            two = mod.int8_linear(x, packed, scales, 0)
        finally:
            mod.set_pair_tiles(True)
        assert torch.equal(one, two)
        torch.testing.assert_close(two.float(), reference_int8_linear(x, q, d).float(), rtol=2 ** -7, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_dynamic_tiles_give_the_same_bits(fmt):
    """From 48 tokens the threads take (weight chunk, 64-token pass) units from a shared counter: every output
    written once, by the same tile as the fixed split, at any thread count. Shapes: 96 row-group pairs in chunks of
    7 (the last one short) over three passes, the last a 2-token tail; K = 1536 in chunks of 2 pairs; 5 groups
    (odd: one group per tile, the fixed split)."""
    threads = torch.get_num_threads()
    try:
        for n, k, m in ((3072, 576, 130), (576, 1536, 100), (80, 576, 64)):
            _, q, d = _weights(n, k, fmt, seed=n)
            packed, scales = pack_int8(q, d)
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16()
            mod.set_dynamic_tiles(False)
            fixed = mod.int8_linear(x, packed, scales, 0)
            mod.set_dynamic_tiles(True)
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                assert torch.equal(mod.int8_linear(x, packed, scales, 0), fixed), (n, k, m, t)
            torch.testing.assert_close(fixed.float(), reference_int8_linear(x, q, d).float(), rtol=2 ** -7,
                                       atol=1e-5)
    finally:
        mod.set_dynamic_tiles(True)
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bs", [32, 64, 576])
def test_activation_quantization_matches_torch(dtype, bs):
    x = (torch.randn(9, 576, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    x[2] = 0  # a zero row: scale 0, all codes 128
    xq, xd, start = mod.quantize_activations(x, bs)
    q, d = quantize_blocks(x, bs)
    assert torch.equal(xq, q) and torch.equal(xd, d)
    assert torch.equal(start, -128 * q.reshape(9, -1, bs).int().sum(-1))  # vpdpbusd's +128 on the weights, undone


@needs_kernel
def test_kernel_rejects_bad_input():
    _, q, d = _weights(32, 64, "q8_0")
    packed, scales = pack_int8(q, d)
    with pytest.raises(RuntimeError, match="K"):
        mod.int8_linear(torch.randn(2, 96), packed, scales, 0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        mod.int8_linear(torch.randn(2, 64).half(), packed, scales, 0)
    with pytest.raises(RuntimeError, match="scales"):  # 2 blocks of 32 cannot make 3 scale groups
        mod.int8_linear(torch.randn(2, 64), packed, torch.cat([scales, scales[:, :1]], 1).contiguous(), 0)
    with pytest.raises(RuntimeError, match="scales"):
        mod.int8_linear(torch.randn(2, 64), packed, scales.float(), 0)
    with pytest.raises(RuntimeError, match="uint8"):
        mod.int8_linear(torch.randn(2, 64), packed.view(torch.int8), scales, 0)
    assert mod.int8_linear(torch.empty(0, 64), packed, scales, 0).shape == (0, 32)
    with pytest.raises(RuntimeError, match="path must be"):
        mod.int8_linear(torch.randn(2, 64), packed, scales, 3)


@needs_kernel
def test_prefetch_distance_changes_no_result():
    """The software prefetch is a hint: with it off, at the default 8 KB and far past a row group, every kernel path
    gives the same bits; the benchmark's setter refuses distances it cannot mean."""
    from kvserve.model.quant import pack_q4, quantize_q4

    _, q, d = _weights(64, 256, "q8_0")
    packed, scales = pack_int8(q, d)
    w4 = torch.randn(64, 256) * 0.05
    p4, dm = pack_q4(*quantize_q4(w4, "q4_1"))
    x = torch.randn(3, 256).bfloat16()
    paths = [0, 2] + ([1] if mod.has_avx2() else [])
    try:
        outs = {}
        for dist in (0, 8192, 65536):
            mod.set_prefetch_bytes(dist)
            outs[dist] = [(mod.int8_linear(x, packed, scales, p), mod.q4_linear(x, p4, dm, p)) for p in paths]
        for dist in (8192, 65536):
            same = [torch.equal(a8, b8) and torch.equal(a4, b4) for (a8, a4), (b8, b4) in zip(outs[0], outs[dist])]
            assert same == [True] * len(paths)  # every path compared, each the same bits
    finally:
        mod.set_prefetch_bytes(8192)
    assert mod.prefetch_bytes() == 8192
    for bad in (-64, 100, 65600):
        with pytest.raises(RuntimeError, match="prefetch distance"):
            mod.set_prefetch_bytes(bad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_linear_fallback_equals_kernel(fmt):
    w, q, d = _weights(64, 128, fmt)
    bias = torch.randn(64)
    x = torch.randn(3, 128)
    fallback = Int8Linear(w, fmt, bias, native=False)
    assert fallback.mod is None and fallback.nbytes < w.numel() * 2  # fewer bytes than bfloat16
    y = fallback(x)
    torch.testing.assert_close(y, reference_int8_linear(x, q, d) + bias)
    if mod is not None:
        torch.testing.assert_close(Int8Linear(w, fmt, bias)(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_features"):
        Int8Linear(torch.randn(10, 128), fmt)


def test_can_quantize_shapes():
    from kvserve.model.quant import can_quantize

    assert can_quantize(torch.empty(48, 96)) and not can_quantize(torch.empty(40, 96))
    assert not can_quantize(torch.empty(48, 100))


def test_resolve_quantization():
    for fmt in ("q8_0", "q4_0", "q4_1", "q4_k"):  # a GGUF file's own format runs as stored (llama.cpp's way)
        assert resolve_quantization("auto", fmt) == fmt
        assert resolve_quantization("auto", fmt, float32=True) == "none"  # float32: the exact, HF-checked path
    assert resolve_quantization("auto", "q6_k") == "none"  # no kernel for it: dequantized
    assert resolve_quantization("auto", None) == "none"
    assert resolve_quantization("q4_1", "q8_0", float32=True) == "q4_1"  # asked for: always honoured
    assert resolve_quantization("w8a8", "bf16") == "w8a8"
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("q3", None)


def test_engine_args_validate_quantization():
    from kvserve.engine.core import EngineArgs

    with pytest.raises(ConfigError, match="quantization must be one of"):
        EngineArgs(quantization="int4")


def test_kv_identity_includes_quantization():
    from kvserve.model.quant import format_identity

    ids = {model_fingerprint("m", ("cfg",), None, format_identity(q)) for q in ("none", "q8_0", "w8a8")}
    assert len(ids) == 3
    # w8a8's groups of 64 are not the first w8a8's arithmetic: KV stored under the bare name is not reused
    assert format_identity("w8a8") != "w8a8" and "64" in format_identity("w8a8")
    assert model_fingerprint("m", ("cfg",), None, format_identity("w8a8")) != model_fingerprint("m", ("cfg",), None,
                                                                                                  "w8a8")


# ---------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def loaded():
    from kvserve.model.loader import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def text_ids(fp32_parts):
    _, tok, _ = fp32_parts
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
            "books were made, sold and read across Europe. Before it, scribes copied each page by hand, and a "
            "single book could take months. ") * 3
    return tok.encode(text)[:96]


def test_q8_0_model_quality_against_bf16(loaded, text_ids):
    from kvserve.bench.quant_quality import compare, prompt_logprobs
    from kvserve.model.llama import LlamaModel

    bf16 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16)
    q8 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q8_0")
    assert q8.weight_bytes() < 0.65 * bf16.weight_bytes()
    ref = prompt_logprobs(bf16, text_ids)
    got = prompt_logprobs(q8, text_ids)
    c = compare(ref, got)
    # measured on 1,024 tokens: 0.98 top-1 agreement, mean KL 0.004 (docs/benchmarks.md)
    assert c["top1_agreement"] >= 0.94 and c["mean_kl"] < 0.02, c


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_model_matmul_equals_reference(loaded, text_ids, monkeypatch, fmt):
    """Each int8 matmul of a real forward pass (real weights, real activations with their outliers), kernel against
    its PyTorch reference. (Whole-model outputs are not compared: activation rounding is discontinuous, so the
    reference's different order of float32 sums flips a few int8 codes, and 30 layers amplify that.)"""
    from kvserve.bench.quant_quality import prompt_logprobs
    from kvserve.model import quant
    from kvserve.model.llama import LlamaModel

    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization=fmt)
    assert model.lm_head.format == "q8_0"  # w8a8 too: its groups of 64 cost the logits more than the layers
    down = model.layers[0].down
    assert down.format == fmt and down.scales.shape[1] == 1536 // block_size(fmt, 1536)
    calls = []
    kernel_call = quant.Int8Linear.__call__

    def checked(self, x):
        y = kernel_call(self, x)
        q, d = unpack_int8(self.packed, self.scales)
        ref = reference_int8_linear(x.contiguous(), q, d)
        torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-4)
        calls.append(x.shape)
        return y

    monkeypatch.setattr(quant.Int8Linear, "__call__", checked)
    prompt_logprobs(model, text_ids[:40])
    assert len(calls) == 4 * loaded.config.num_layers + 1  # every layer's four matmuls and the lm_head


def test_engine_runs_quantized_model(loaded, fp32_parts):
    from kvserve.engine.llm_engine import LLM, EngineArgs, LLMEngine
    from kvserve.model.llama import LlamaModel
    from kvserve.sampling import SamplingParams

    _, tok, name = fp32_parts
    model = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q8_0")
    with pytest.raises(ConfigError, match="quantized as q8_0"):
        LLMEngine(EngineArgs(quantization="w8a8", kv_cache_memory_gb=0.1), model=model, tokenizer=tok)
    engine = LLMEngine(EngineArgs(quantization="auto", kv_cache_memory_gb=0.1), model=model, tokenizer=tok,
                       model_name=name)
    assert engine.info.quantization == "q8_0"
    out = LLM.from_engine(engine).generate(["The capital of France is"], SamplingParams(max_tokens=6, temperature=0),
                                           use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text


def test_smoothquant_is_exact_before_quantization_and_helps_w8a8(loaded, text_ids, fp32_parts):
    """Smoothing moves scale between activations and weights: without quantization the outputs stay (float32: up to
    rounding); with w8a8 the distance to bf16 drops (docs/benchmarks.md, "Int8 formats")."""
    from kvserve.bench.quant_quality import compare, prompt_logprobs
    from kvserve.model.llama import LlamaModel
    from kvserve.model.smoothquant import CALIBRATION_TEXT, input_absmax, smooth_for_w8a8, smoothed_weights

    _, tok, _ = fp32_parts
    cal = tok.encode(CALIBRATION_TEXT)
    fp32 = LlamaModel(loaded.config, loaded.weights, torch.float32)
    stats = input_absmax(fp32, cal[:128])
    assert stats[0]["qkv"].shape == (loaded.config.hidden_size,)
    assert stats[0]["down"].shape == (loaded.config.intermediate_size,)
    smoothed = LlamaModel(loaded.config, smoothed_weights(loaded.config, loaded.weights, stats), torch.float32)
    ids = text_ids[:32]
    assert (prompt_logprobs(fp32, ids) - prompt_logprobs(smoothed, ids)).abs().max() < 2e-3

    ref = prompt_logprobs(LlamaModel(loaded.config, loaded.weights, torch.bfloat16), text_ids)
    plain = compare(ref, prompt_logprobs(LlamaModel(loaded.config, loaded.weights, torch.bfloat16,
                                                    quantization="w8a8"), text_ids))
    weights = smooth_for_w8a8(loaded.config, loaded.weights, cal)
    smooth = compare(ref, prompt_logprobs(LlamaModel(loaded.config, weights, torch.bfloat16, quantization="w8a8"),
                                          text_ids))
    assert smooth["mean_kl"] < 0.8 * plain["mean_kl"], (smooth, plain)


def test_cli_quantization_flag():
    from kvserve.cli import _engine_args, build_parser

    for command in (["serve"], ["generate", "--prompt", "x"]):
        assert _engine_args(build_parser().parse_args(command)).quantization == "auto"
        args = build_parser().parse_args(command + ["--quantization", "q8_0"])
        assert _engine_args(args).quantization == "q8_0"
    with pytest.raises(SystemExit):  # argparse rejects an unknown format before any model is loaded
        build_parser().parse_args(["serve", "--quantization", "q4"])


# ---------------------------------------------------------------------------------------------- 4-bit


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
def test_q4_quantization_rules_and_packing(fmt):
    from kvserve.model.quant import pack_q4, quantize_q4, unpack_q4

    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 64, generator=g)
    q, d, m = quantize_q4(w, fmt)
    blocks, codes = w.reshape(32, 2, 32), q.reshape(32, 2, 32)
    deq = (q.float().reshape(32, 2, 32) * d[..., None] + m[..., None]).reshape(32, 64)
    assert (deq - w).abs().max() <= (d.abs().max() * 0.5 + 1e-3)  # within half a step (plus fp16 rounding)
    if fmt == "q4_0":  # the block's largest magnitude sits at -8 steps: code 0, and d carries its sign
        big = blocks.abs().argmax(-1, keepdim=True)
        assert (codes.gather(-1, big) == 0).all()
        assert torch.equal(torch.sign(d), -torch.sign(blocks.gather(-1, big).squeeze(-1)))
    else:  # each block spans [min, max] in 15 steps: its minimum is code 0 (and m), its maximum code 15
        assert torch.allclose(m, blocks.amin(-1), atol=1e-3)
        assert (codes.gather(-1, blocks.argmin(-1, keepdim=True)) == 0).all()
        assert (codes.gather(-1, blocks.argmax(-1, keepdim=True)) == 15).all()
    packed, dm = pack_q4(q, d, m)
    assert packed.shape == (2, 2, 4, 64) and dm.shape == (2, 2, 2, 16) and dm.dtype == torch.float16
    assert packed[0, 1, 2, 4 * 5 + 3] == q[5, 32 + 4 * 2 + 3] | (q[5, 32 + 4 * 6 + 3] << 4)  # vectors 2 and 6
    q2, d2, m2 = unpack_q4(packed, dm)
    assert torch.equal(q, q2) and torch.equal(d, d2) and torch.equal(m, m2)


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1"])
@pytest.mark.parametrize("m,n,k", [(1, 960, 576), (5, 576, 1536), (13, 48, 64), (130, 32, 32)])
def test_q4_kernel_matches_reference(fmt, m, n, k):
    from kvserve.model.quant import pack_q4, quantize_q4, reference_q4_linear

    g = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=g) * 0.05
    q, d, mn = quantize_q4(w, fmt)
    packed, dm = pack_q4(q, d, mn)
    x = torch.randn(m, k, generator=g) * 2
    x[0, 1] = -30.0
    ref = reference_q4_linear(x, q, d, mn)
    for path in PATHS:
        torch.testing.assert_close(mod.q4_linear(x, packed, dm, path), ref, rtol=1e-5, atol=1e-5)
    for path in PATHS:
        yb = mod.q4_linear(x.bfloat16(), packed, dm, path)
        torch.testing.assert_close(yb.float(), reference_q4_linear(x.bfloat16(), q, d, mn).float(), rtol=2 ** -7,
                                   atol=1e-5)
    with pytest.raises(RuntimeError, match="dm"):
        mod.q4_linear(x, packed, dm.float(), 0)


def test_q4_model_quality_against_bf16(loaded, text_ids):
    from kvserve.bench.quant_quality import compare, prompt_logprobs
    from kvserve.model.llama import LlamaModel

    ref = prompt_logprobs(LlamaModel(loaded.config, loaded.weights, torch.bfloat16), text_ids)
    q4 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q4_1")
    assert q4.weight_bytes() < 0.4 * 269e6
    c = compare(ref, prompt_logprobs(q4, text_ids))
    # the embedded file is Q4_1 (its token_embd Q8_0): its own codes come back, so the error is the activations'
    assert c["top1_agreement"] >= 0.95 and c["mean_kl"] < 0.01, c  # 1,024 tokens: 0.981, 0.0028


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_bf16_copy_of_the_weights_is_exact(fmt):
    """dequantize_t (prefill on AMX) widens the stored codes to W^T in bfloat16: d q + m (4-bit) or d c (q8_0) in
    float32, rounded once, so it equals the reference dequantization rounded to bf16, bit for bit."""
    from kvserve.model.quant import pack_q4, quantize_q4, unpack_q4

    g = torch.Generator().manual_seed(7)
    w = torch.randn(48, 96, generator=g) * 0.05
    if fmt == "q8_0":
        q, d = quantize_blocks(w, 32)
        packed, scales = pack_int8(q, d)
        q, d = unpack_int8(packed, scales)
        ref = q.float() * d.repeat_interleave(32, 1)
    else:
        packed, scales = pack_q4(*quantize_q4(w, fmt))
        q, d, m = unpack_q4(packed, scales)
        ref = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    wt = mod.dequantize_t(packed, scales)
    assert wt.dtype == torch.bfloat16 and wt.shape == (96, 48)
    assert torch.equal(wt, ref.t().bfloat16())
    with pytest.raises(RuntimeError, match="scales"):
        mod.dequantize_t(packed, scales.float())


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_prefill_sized_calls_take_bf16_tiles_where_amx_runs(fmt):
    """From PREFILL_BF16_MIN_TOKENS bf16 tokens on, an AMX machine multiplies by the bf16 copy through oneDNN (the
    same bits as F.linear on it); below, and with the route switched off, the int8 kernel runs as before."""
    from kvserve.model.quant import PREFILL_BF16_MIN_TOKENS, Q4Linear

    if not mod.has_amx():
        pytest.skip("no AMX tiles on this CPU or OS: prefill stays on the int8 kernel (covered above)")
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 128, generator=g) * 0.05
    bias = torch.randn(64, generator=g).bfloat16()
    lin = Q4Linear(w, fmt, bias) if fmt.startswith("q4") else Int8Linear(w, fmt, bias)
    assert lin.prefill_bf16
    kernel = (lambda x: mod.q4_linear(x, lin.packed, lin.scales, 0)) if fmt.startswith("q4") else \
        (lambda x: mod.int8_linear(x, lin.packed, lin.scales, 0))
    x = torch.randn(PREFILL_BF16_MIN_TOKENS, 128, generator=g).bfloat16()
    y = lin(x)
    assert torch.equal(y, torch.nn.functional.linear(x, mod.dequantize_t(lin.packed, lin.scales).t(), bias))
    assert not torch.equal(y, kernel(x) + bias)  # int8 activations round otherwise: the route did change
    torch.testing.assert_close(y.float(), (kernel(x) + bias).float(), rtol=2 ** -6, atol=2e-2)
    short = x[:-1]
    assert torch.equal(lin(short), kernel(short) + bias)
    lin.prefill_bf16 = False
    assert torch.equal(lin(x), kernel(x) + bias)


def test_q4_prefill_on_bf16_tiles_keeps_quality(loaded, fp32_parts):
    """A 4-bit model's prompt through the bf16 route (chunks of >= 128 tokens on AMX) against bfloat16 weights: at
    least as close as the int8 route (no activation rounding; the same 4-bit weights)."""
    from kvserve.bench.quant_quality import compare, prompt_logprobs
    from kvserve.model.llama import LlamaModel

    _, tok, _ = fp32_parts
    ids = tok.encode("Movable type changed how books were made, sold and read across Europe. " * 20)[:320]
    ref = prompt_logprobs(LlamaModel(loaded.config, loaded.weights, torch.bfloat16), ids)
    q4 = LlamaModel(loaded.config, loaded.weights, torch.bfloat16, quantization="q4_1")
    layers = [lin for lw in q4.layers for lin in (lw.qkv, lw.o, lw.gate_up, lw.down)]
    assert all(lin.prefill_bf16 == mod.has_amx() for lin in layers)  # the route is on exactly where AMX runs
    for lin in layers:  # forced on elsewhere (slower there, the same numbers), so its quality is checked on any CPU
        lin.prefill_bf16 = True
    route_lp = prompt_logprobs(q4, ids)
    for lin in layers:
        lin.prefill_bf16 = False
    kernel_lp = prompt_logprobs(q4, ids)
    assert not torch.equal(route_lp, kernel_lp)  # the prompt did take the bf16 route: int8 rounds activations
    route, kernel = compare(ref, route_lp), compare(ref, kernel_lp)
    assert route["top1_agreement"] >= 0.95 and route["mean_kl"] < 0.01, route
    assert route["mean_kl"] <= kernel["mean_kl"] * 1.25, (route, kernel)
