"""APE's parallel encoding (kv_reuse "parallel"): the tempered attention against APE's formula written out by hand,
on every path a query can take (decode rows, prefill chunks, scattered rows; native kernels and PyTorch), then on the
real model: temperature 1 and scale 1 are naive reuse exactly, other values change the output and key their blocks
apart, and bad values are refused. tests/model/test_decode_step.py checks that APE's decode rows skip the one-call
native decode."""

from __future__ import annotations

import math

import pytest
import torch

from kvserve import SamplingParams
from kvserve.config import ConfigError, KeySpan
from kvserve.core.outputs import ScheduledRequest
from kvserve.core.request import BlendSpec, Request
from kvserve.model.attention import AttentionBackend
from kvserve.model.batch import ForwardBatch, PrefillSeq
from kvserve.sampling import ParamError

from tests.blend.test_blend_model import SEGMENTS, top_logprobs
from tests.eviction.test_engine import generate as run

H, HKV, D, BS = 9, 3, 64, 16
SPAN = KeySpan.ape(5, 40, 0.6, 0.7)


def ape_reference(q, keys, values, q_index, scale, span):
    """APE's attention, written as its sums: sum_prefix e^s v + S * sum_span e^(s / T) v + sum_rest e^s v, over the
    same sums of weights. q (m, H, D) float64 at KV indices q_index; keys/values (L, Hkv, D)."""
    t, s_ = 1.0 / span.inv_temperature, math.exp(span.log_scale)
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(q.shape[0]):
        n = int(q_index[i]) + 1
        for h in range(H):
            kv = h // (H // HKV)
            logits = keys[:n, kv].double() @ q[i, h].double() * scale  # (n,)
            weights = torch.exp(logits - logits.max())
            if n > span.hi:  # a query past the span
                inside = slice(span.lo, span.hi)
                weights[inside] = s_ * torch.exp(logits[inside] / t - logits.max())
            out[i, h] = weights @ values[:n, kv].double() / weights.sum()
    return out


def paged(dtype, length, seed=0):
    """A shuffled block table over a cache holding `length` random tokens."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-length // BS)
    k_cache = torch.randn(nb + 3, BS, HKV, D, generator=g).to(dtype)
    v_cache = torch.randn(nb + 3, BS, HKV, D, generator=g).to(dtype)
    table = torch.randperm(nb + 3, generator=g)[:nb]
    flat = lambda c: c[table].reshape(-1, HKV, D)[:length]  # noqa: E731
    return k_cache, v_cache, table, flat(k_cache), flat(v_cache)


def backend(native: bool, dtype: torch.dtype) -> AttentionBackend:
    from kvserve.model.layers import RotaryEmbedding

    return AttentionBackend.build(RotaryEmbedding(D, 4096, 10000.0, None, None, dtype), native_kernels=native)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("native", [True, False])
def test_tempered_attention_is_apes_formula_on_every_path(dtype, native):
    attention = backend(native, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    scale = D ** -0.5
    length = 70
    k_cache, v_cache, table, keys, values = paged(dtype, length)
    g = torch.Generator().manual_seed(1)
    # decode: three rows over the same table at lengths 70 (past the span), 70 (no span), 30 (inside it: untouched)
    q = torch.randn(3, H, D, generator=g).to(dtype)
    lens = torch.tensor([70, 70, 30], dtype=torch.int32)
    out = attention.decode(q, k_cache, v_cache, table[None].repeat(3, 1), lens, scale, key_spans=[SPAN, None, SPAN])
    plain = KeySpan(0, 0, 1.0, 0.0)
    ref = [ape_reference(q[i:i + 1], keys, values, lens[i:i + 1] - 1, scale, s) for i, s in
           enumerate([SPAN, plain, SPAN])]
    for i in range(3):
        torch.testing.assert_close(out[i].double(), ref[i][0], atol=tol, rtol=0)
    # ... and the tempered row is not what the plain attention gives (the span changed something)
    assert not torch.allclose(out[0].double(), ape_reference(q[:1], keys, values, lens[:1] - 1, scale, plain)[0],
                              atol=1e-2)
    # a prefill chunk over KV indices 30..69 (rows 30..39 inside the span, 40.. past it) next to a plain chunk
    n = 40
    qp = torch.randn(n + 8, H, D, generator=g).to(dtype)
    kp = torch.zeros(n + 8, HKV, D, dtype=dtype)
    batch = ForwardBatch(torch.zeros(n + 8, dtype=torch.long), torch.zeros(n + 8, dtype=torch.long),
                         torch.zeros(n + 8, dtype=torch.long),
                         prefills=[PrefillSeq(0, n, 30, table, SPAN), PrefillSeq(n, 8, 62, table)],
                         prefill_token_starts=torch.tensor([0, n]), prefill_num_tokens=torch.tensor([n, 8]),
                         prefill_ctx_starts=torch.tensor([30, 62]), prefill_block_tables=torch.stack([table, table]))
    out = torch.zeros_like(qp)
    attention.prefill(qp, kp, kp, k_cache, v_cache, batch, out, scale)
    ref = ape_reference(qp[:n], keys, values, torch.arange(30, 70), scale, SPAN)
    torch.testing.assert_close(out[:n].double(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(out[n:].double(), ape_reference(qp[n:], keys, values, torch.arange(62, 70), scale,
                                                               plain), atol=tol, rtol=0)
    # scattered rows (CacheBlend's layout, which parallel mode's chunks take): inside and past the span
    idx = torch.tensor([3, 20, 39, 40, 55, 69])
    out = attention.scattered(qp[:6], k_cache, v_cache, table, idx, scale, SPAN)
    torch.testing.assert_close(out.double(), ape_reference(qp[:6], keys, values, idx, scale, SPAN), atol=tol, rtol=0)


def test_decode_rows_and_prefill_chunks_carry_the_span_into_the_batch(fp32_parts):
    """The runner hands each decode row and prefill chunk its request's span."""
    from kvserve.worker.kv_cache import KVCache
    from kvserve.worker.model_runner import ModelRunner

    model = fp32_parts[0]
    runner = ModelRunner(model, KVCache(model.config, 8, BS, torch.float32))
    blend = BlendSpec((4, 20, 36), 0.0, context_len=4, ape=(0.6, 0.7))
    a = Request("a", list(range(1, 41)), SamplingParams(max_tokens=2), BS, blend=blend)
    b = Request("b", list(range(1, 9)), SamplingParams(max_tokens=2), BS)
    span = blend.key_span()
    dec = ScheduledRequest(a, 40, 1, [0, 1, 2], True, False, key_span=span)
    a.append_output_token(7)
    plain = ScheduledRequest(b, 0, 8, [3], True, False)
    batch, _, _ = runner.build_batch([dec, plain])
    assert batch.decode_key_spans == [span] and [s.key_span for s in batch.prefills] == [None]
    batch, _, _ = runner.build_batch([ScheduledRequest(a, 32, 8, [0, 1, 2], False, False, key_span=span)])
    assert batch.decode_key_spans is None and batch.prefills[0].key_span == span


@pytest.fixture(scope="module")
def naive_reuse(make_engine):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    return run(engine, [{"prompt_segments": SEGMENTS, "blend_recompute_ratio": 0.0}], params)[0]


def test_temperature_and_scale_one_are_naive_reuse(make_engine, naive_reuse):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    out, = run(engine, [{"prompt_segments": SEGMENTS, "kv_reuse": "parallel", "ape_temperature": 1.0,
                         "ape_scale": 1.0}], params)
    assert out.num_blended_tokens == naive_reuse.num_blended_tokens > 0 and out.num_recomputed_tokens == 0
    assert out.outputs[0].token_ids == naive_reuse.outputs[0].token_ids
    for step in range(8):
        got, want = out.outputs[0].logprobs[step], naive_reuse.outputs[0].logprobs[step]
        for t in want.keys() & got.keys():
            assert abs(got[t].logprob - want[t].logprob) < 1e-3
    assert engine.core.kv_manager.num_used_blocks == 0


def test_other_values_change_the_output_and_keep_the_blocks_apart(make_engine, naive_reuse):
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5)
    out, = run(engine, [{"prompt_segments": SEGMENTS, "kv_reuse": "parallel", "ape_temperature": 0.8,
                         "ape_scale": 0.5}], params)
    assert out.num_recomputed_tokens == 0 and out.num_blended_tokens == naive_reuse.num_blended_tokens
    assert top_logprobs(out) != pytest.approx(top_logprobs(naive_reuse), abs=1e-3)
    # the same request again finds its own blocks (by prefix, nothing blended); a blend request does not
    again, = run(engine, [{"prompt_segments": SEGMENTS, "kv_reuse": "parallel", "ape_temperature": 0.8,
                           "ape_scale": 0.5}], params)
    assert again.num_blended_tokens == 0 and again.outputs[0].token_ids == out.outputs[0].token_ids
    blend, = run(engine, [{"prompt_segments": SEGMENTS, "blend_recompute_ratio": 0.0}], params)
    assert blend.num_blended_tokens > 0
    assert blend.outputs[0].token_ids == naive_reuse.outputs[0].token_ids


def test_bad_parallel_requests_fail_clearly(make_engine):
    engine = make_engine()
    cases = [
        ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "blend_recompute_ratio": 0.2},
         "blend_recompute_ratio"),
        ({"prompt_segments": ["a", "b"], "ape_temperature": 0.5}, "ape_temperature"),  # blend: no temperature
        ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "ape_temperature": 0}, "ape_temperature"),
        ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "ape_scale": -1.0}, "ape_scale"),
        ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "ape_scale": True}, "ape_scale"),
        ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "ape_temperature": 11.0}, "ape_temperature"),
    ]
    for prompt, param in cases:
        with pytest.raises(ParamError) as e:
            engine.add_request(None, prompt, SamplingParams(max_tokens=2))
        assert e.value.param == param, (prompt, e.value)
    assert not engine.has_unfinished_requests()
    with pytest.raises(ConfigError, match="ape_temperature"):
        make_engine(ape_temperature=0.0)
    with pytest.raises(ConfigError, match="ape_scale"):
        make_engine(ape_scale=float("nan"))
