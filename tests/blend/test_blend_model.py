"""CacheBlend on the real model in float32: re-rotation equals RoPE at the new positions, ratio 1 is the plain
prefill, the selective path with every reused token chosen is the plain prefill too, the check layer picks the tokens
whose cached KV deviates, segments shared through a KV tier, and the engine-level checks of a segmented prompt."""

from __future__ import annotations

import pytest
import torch

from kvserve import SamplingParams
from kvserve.config import ConfigError
from kvserve.model.blend import BlendChunk, select_recompute
from kvserve.sampling import ParamError
from kvserve.worker.kv_cache import KVCache

from tests.eviction.test_engine import generate as run

SYSTEM = "<|im_start|>system\nAnswer from the documents.<|im_end|>\n<|im_start|>user\n"
FACTS = ["The capital of Veloria is Marbin.", "Tom Kessler was born in 1931.",
         "The river Ostra flows into Lake Min.", "Anna Brovik plays the cello."]
DOCS = [" ".join(f"Document {i}. {f}" for _ in range(6)) + "\n" for i, f in enumerate(FACTS)]
QUESTION = "Question: What instrument does Anna Brovik play?<|im_end|>\n<|im_start|>assistant\n"
SEGMENTS = [SYSTEM, *DOCS, QUESTION]


def cached_doc_tokens(tokenizer, docs, context: str) -> int:
    """Tokens of `docs` in whole cached blocks: alone from position 0, or after the system prompt (prefix mode)."""
    n_sys = len(tokenizer.encode(SYSTEM)) if context == "prefix" else 0
    return sum((n_sys + len(tokenizer.encode(d, add_special_tokens=False))) // 16 * 16 - n_sys for d in docs)


def top_logprobs(out):
    return {t: lp.logprob for t, lp in out.outputs[0].logprobs[0].items()}


def test_rerotation_equals_rope_at_the_new_positions(fp32_parts):
    model = fp32_parts[0]
    c = model.config
    torch.manual_seed(0)
    tokens = torch.randint(100, 10_000, (20,))
    lw = model.layers[0]
    x = torch.nn.functional.rms_norm(model.embed[tokens], (c.hidden_size,), lw.input_norm, c.rms_norm_eps)
    k_raw = lw.qkv(x)[:, model.q_size:model.q_size + model.kv_size].view(20, c.num_kv_heads, c.head_dim)
    v_raw = lw.qkv(x)[:, model.q_size + model.kv_size:].view(20, c.num_kv_heads, c.head_dim)

    def at(positions):
        cos, sin = model.rotary.tables(positions)
        return model.rotary._apply(k_raw, cos, sin)

    cache = KVCache(c, 8, 16, torch.float32)
    flat_k = cache.tensor[:, 0].view(c.num_layers, -1, c.num_kv_heads, c.head_dim)
    flat_v = cache.tensor[:, 1].view(c.num_layers, -1, c.num_kv_heads, c.head_dim)
    flat_k[:, :20] = at(torch.arange(20))
    flat_v[:, :20] = v_raw
    def exact(positions):  # float64 angles: what both float32 computations approximate
        freqs = positions.double()[:, None] * model.rotary.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return model.rotary._apply(k_raw.double(), emb.cos()[:, None], emb.sin()[:, None])

    for delta in (1, 37, 5000):
        dst = list(range(40, 60))
        cache.rerotate(list(range(20)), dst, delta, model.rotary)
        positions = torch.arange(delta, delta + 20)
        fresh, moved = at(positions), flat_k[0, 40:60]
        # RoPE's float32 tables lose precision at large positions (angle rounding), so the two agree to that
        # rounding, and the re-rotated copy is no further from the exact rotation than the fresh one
        torch.testing.assert_close(moved, fresh, atol=2e-5 if delta < 100 else 1e-3, rtol=1e-4)
        ref = exact(positions)
        assert (moved.double() - ref).abs().max() <= (fresh.double() - ref).abs().max() + 2e-5
        assert torch.equal(flat_v[:, 40:60], flat_v[:, :20])


def test_select_recompute_takes_the_largest_deviations():
    dev = torch.tensor([0.1, 5.0, 0.3, 7.0, 2.0, 0.0])
    assert select_recompute(dev, 0.34).tolist() == [1, 3]  # round(0.34 * 6) = 2, ascending row order
    assert select_recompute(dev, 0.5).tolist() == [1, 3, 4]
    assert select_recompute(dev, 0.0).tolist() == [] and select_recompute(dev, 1.0).tolist() == list(range(6))


def test_the_check_layer_picks_the_tokens_whose_cached_kv_deviates(fp32_parts):
    """Exact KV everywhere (a plain prefill) except three tokens whose V at the check layer is corrupted: exactly
    those three are recomputed."""
    model, tok, _ = fp32_parts
    c = model.config
    ids = tok.encode(SYSTEM + DOCS[0] + DOCS[1])
    n = len(ids)
    cache = KVCache(c, -(-n // 16) + 1, 16, torch.float32)
    blocks = torch.arange(-(-n // 16))
    chunk = BlendChunk(torch.tensor(ids), torch.arange(n), torch.arange(n), blocks, 0, torch.zeros(n, dtype=torch.bool),
                       1.0)
    model.forward_blend(chunk, cache.layers, 1)  # a plain prefill: exact KV in every layer
    reused = torch.zeros(n, dtype=torch.bool)
    reused[10:n - 5] = True
    corrupt = [17, 40, n - 9]
    v_cache = cache.layers[1][1].view(-1, model.kv_size)
    v_cache[corrupt] += 3.0
    m = int(reused.sum())
    chunk = BlendChunk(torch.tensor(ids), torch.arange(n), torch.arange(n), blocks, 0, reused, 3 / m)
    _, chosen = model.forward_blend(chunk, cache.layers, 1)
    assert chosen.tolist() == corrupt


@pytest.fixture(scope="module")
def plain_reference(make_engine):
    engine = make_engine()
    ids, _ = engine.tokenizer.encode_segments(SEGMENTS)
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5)
    return ids, run(engine, [{"prompt_token_ids": ids}], params)[0]


@pytest.mark.parametrize("ratio", [1.0, 0.99999])
def test_full_recompute_equals_the_plain_prefill(make_engine, plain_reference, ratio):
    """Ratio 1 takes the plain prefill path on blended KV; a ratio that still chooses every reused token goes
    through the selective path (gathered rows, masked attention): both give the plain prefill's output."""
    ids, ref = plain_reference
    engine = make_engine()
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=5)
    [out] = run(engine, [{"prompt_segments": SEGMENTS, "blend_recompute_ratio": ratio}], params)
    assert out.prompt_token_ids == ids  # the segments' concatenation is the plain prompt
    assert out.num_blended_tokens > 0 and out.num_recomputed_tokens == out.num_blended_tokens
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    got, want = top_logprobs(out), top_logprobs(ref)
    assert got.keys() == want.keys()
    for t in want:
        assert abs(got[t] - want[t]) < 1e-3
    assert engine.core.kv_manager.num_used_blocks == 0


@pytest.mark.parametrize("context", ["prefix", "none"])
def test_partial_recompute_and_naive_reuse(make_engine, plain_reference, context):
    """Ratio 0.15 recomputes its share of the reused tokens (how close that stays to the plain prefill is the
    benchmark's question); later blend requests reuse the blended blocks by prefix, plain requests never. In prefix
    mode the first document follows the system prompt as in its cache entry: a plain prefix, not blended."""
    ids, ref = plain_reference
    engine = make_engine(blend_segment_context=context)
    params = SamplingParams(temperature=0, max_tokens=12)
    cached = engine.core.scheduler
    out15, = run(engine, [{"prompt_segments": SEGMENTS, "blend_recompute_ratio": 0.15}], params)
    m = out15.num_blended_tokens
    assert m > 0 and 0 < out15.num_recomputed_tokens <= round(0.15 * m) + 4 * len(DOCS)  # rounding per chunk
    reused_docs = DOCS[1:] if context == "prefix" else DOCS
    assert m == cached_doc_tokens(engine.tokenizer, reused_docs, context)
    again, = run(engine, [{"prompt_segments": SEGMENTS, "blend_recompute_ratio": 0.0}], params)
    assert again.num_cached_tokens >= len(ids) - 16 and again.num_blended_tokens == 0  # by prefix: blended blocks
    plain, = run(engine, [{"prompt_token_ids": ids}], params)
    first_doc_end = len(engine.tokenizer.encode(SYSTEM)) + len(engine.tokenizer.encode(DOCS[0], add_special_tokens=False))
    # never the blended blocks: in prefix mode up to the block holding document 1's start, else segment 0's
    limit = first_doc_end + 16 if context == "prefix" else len(engine.tokenizer.encode(SYSTEM)) + 16
    assert plain.num_cached_tokens < limit
    assert plain.outputs[0].token_ids == ref.outputs[0].token_ids
    assert cached.num_segment_misses == len(reused_docs)  # the first request's documents were computed first
    assert cached.num_segment_hits == 2 * len(reused_docs)  # found at its admission, and at the second's arrival


def test_precompute_and_segments_shared_through_a_kv_tier(make_engine, tmp_path, plain_reference):
    store = f"disk:{tmp_path}:1GB"
    a = make_engine(kv_store=store, kv_store_chunk_size=32)
    assert a.core.kv_store is not None
    from kvserve.engine.llm_engine import LLM
    llm = LLM.from_engine(a)
    with pytest.raises(ValueError, match="prefix"):
        llm.precompute_segments(DOCS)  # prefix mode: the documents' KV follows the system prompt
    cached = llm.precompute_segments(DOCS, prefix=SYSTEM)
    assert cached == cached_doc_tokens(a.tokenizer, DOCS, "prefix")
    # the cache entries are exact plain prompts: the plain prefill of [system, document] finds them
    doc_ids = a.tokenizer.encode_segments([SYSTEM, DOCS[2]])[0]
    hit, = run(a, [{"prompt_token_ids": doc_ids}], SamplingParams(max_tokens=1))
    assert hit.num_cached_tokens == (len(doc_ids) - 1) // 16 * 16
    a.close()
    b = make_engine(kv_store=store, kv_store_chunk_size=32)
    params = SamplingParams(temperature=0, max_tokens=12)
    out, = run(b, [{"prompt_segments": SEGMENTS, "blend_recompute_ratio": 1.0}], params)
    assert b.stats().prompt_tokens_loaded > 0  # the segment requests loaded the documents from the tier
    assert out.num_blended_tokens > 0 and out.outputs[0].token_ids == plain_reference[1].outputs[0].token_ids
    b.close()


def test_bad_segmented_prompts_fail_clearly(make_engine):
    engine = make_engine()
    cases = [
        ({"prompt_segments": []}, "prompt_segments"),
        ({"prompt_segments": "text"}, "prompt_segments"),
        ({"prompt_segments": ["a", ""]}, "prompt_segments"),
        ({"prompt_segments": ["a", 5]}, "prompt_segments"),
        ({"prompt_segments": ["a"], "prompt": "b"}, "prompt_segments"),
        ({"prompt_segments": ["a", "b"], "blend_recompute_ratio": 1.5}, "blend_recompute_ratio"),
        ({"prompt_segments": ["a", "b"], "kv_reuse": "magic"}, "kv_reuse"),
        ({"prompt_segments": ["word " * 9000, "b"]}, "prompt"),  # over the context
    ]
    for prompt, param in cases:
        with pytest.raises(ParamError) as e:
            engine.add_request(None, prompt, SamplingParams(max_tokens=2))
        assert e.value.param == param, (prompt, e.value)
    with pytest.raises(ParamError) as e:
        engine.add_request(None, {"prompt_segments": ["a", "b"]}, SamplingParams(max_tokens=2, prompt_logprobs=1))
    assert e.value.param == "prompt_logprobs"
    assert not engine.has_unfinished_requests()
    with pytest.raises(ConfigError):
        make_engine(blend_recompute_ratio=2.0)
    with pytest.raises(ConfigError):
        make_engine(blend_check_layer=30)
    with pytest.raises(ConfigError, match="blend_segment_context"):
        make_engine(blend_segment_context="suffix")


def test_chat_segments_put_the_system_prompt_in_segment_zero(fp32_parts):
    """The documents of a multi-part user turn are segments; the system prompt and the headers before them are
    segment 0 (their context in prefix mode); a one-part message is not split."""
    tok = fp32_parts[1]
    messages = [{"role": "system", "content": "Answer from the documents."},
                {"role": "user", "content": DOCS[0] + DOCS[1] + "Which?"}]
    parts = [["Answer from the documents."], [DOCS[0], DOCS[1], "Which?"]]
    ids, starts = tok.chat_segments(messages, parts)
    assert ids == tok.apply_chat_template(messages)
    text = tok.render_chat_template(messages)
    head = text[:text.index(DOCS[0])]  # "<|im_start|>system\n...<|im_end|>\n<|im_start|>user\n"
    assert ids[:starts[0]] == tok.encode(head, add_special_tokens=False)  # segment 0 ends where document 0 starts
    assert len(starts) == 4  # documents 0 and 1, the question, the template's tail
    one = tok.chat_segments(messages, [["Answer from the documents."], [DOCS[0] + DOCS[1] + "Which?"]])
    assert one == (ids, [])
