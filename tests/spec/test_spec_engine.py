"""Speculative decoding on the real model in float32: lossless against decoding without drafts, for every method,
greedy and seeded sampling, with stops, logprobs and n > 1; config and per-request overrides validated."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.config import ConfigError, SpeculativeConfig
from kvserve.sampling import ParamError

def _draft_model_path() -> str:
    from kvserve.model.loader import default_model_path

    return default_model_path()


# draft_model drafts with the target's own file: the drafts are nearly always right, so long accepted runs (and the
# draft KV's catch-up after a bonus token) are exercised; layer_skip's untrained early exit is mostly rejected
# (not adaptive, so it drafts every step although the step-cost rule would stop it). ngram is not adaptive either:
# in float32 at a batch of 8 the measured step costs stop most drafting, and these checks need drafts verified;
# suffix keeps the adaptive rule on, so one method runs it end to end
METHODS = ({"method": "ngram", "num_speculative_tokens": 6, "adaptive": False}, {"method": "suffix"},
           {"method": "layer_skip", "draft_layers": 20, "num_speculative_tokens": 3, "adaptive": False},
           {"method": "draft_model", "model": "EMBEDDED", "num_speculative_tokens": 4})

# repetitive tasks (drafts get accepted) and open-ended ones (drafts mostly fail), batched together so verification
# shares steps with plain decodes and chunked prefills
PROMPTS = [
    'Copy this JSON exactly: {"id": 17, "name": "lamp", "tags": ["desk", "led"], "price": 24.5, "stock": 3}',
    "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Write a short story about a robot who learns to paint.",
    "List the numbers from 1 to 30 separated by commas: 1, 2, 3,",
    "What is the capital of France? Answer in one sentence.",
    "Translate to French: I like apples. I like pears. I like apples and pears.",
    "<ul>\n  <li>alpha</li>\n  <li>beta</li>\n  <li>gamma</li>\n",
]


@pytest.fixture(scope="module")
def plain(make_engine):
    return LLM.from_engine(make_engine(max_num_batched_tokens=96), batch_reorder=False)


@pytest.fixture(scope="module", params=METHODS, ids=lambda c: c["method"])
def spec(make_engine, request):
    cfg = dict(request.param)
    if cfg.get("model") == "EMBEDDED":
        cfg["model"] = _draft_model_path()
    return LLM.from_engine(make_engine(max_num_batched_tokens=96, speculative_config=cfg), batch_reorder=False)


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def test_greedy_is_token_identical(plain, spec):
    sp = SamplingParams(temperature=0, max_tokens=48, logprobs=2)
    ref = plain.generate(PROMPTS, sp, use_tqdm=False)
    got = spec.generate(PROMPTS, sp, use_tqdm=False)
    near_ties = []
    for r, g in zip(ref, got):
        a, b = r.outputs[0].token_ids, g.outputs[0].token_ids
        i = _first_divergence(a, b)
        if i is not None:
            top = sorted((lp.logprob for lp in r.outputs[0].logprobs[i].values()), reverse=True)
            margin = top[0] - top[1]
            assert margin < 1e-4, f"diverged at {i} with a top-2 margin of {margin}: {a[i:i + 5]} vs {b[i:i + 5]}"
            near_ties.append(margin)
        else:  # logprobs of accepted drafts come from verification rows: equal to the plain run's up to rounding
            for x, y in zip(r.outputs[0].logprobs, g.outputs[0].logprobs):
                t = max(x, key=lambda k: x[k].logprob)
                assert abs(x[t].logprob - y[t].logprob) < 1e-3
    assert len(near_ties) <= 1, near_ties
    stats = spec.engine.stats().speculative
    assert stats.num_accepted_tokens > 20, stats  # drafts were verified and accepted, not just left alone
    assert spec.engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_token_identical(plain, spec):
    """Each position is sampled with the request's own draw, in order: same seed, same tokens, drafts or not."""
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=11 + i, max_tokens=40,
                             repetition_penalty=1.05 if i % 2 else 1.0, presence_penalty=0.2 if i % 3 == 0 else 0.0,
                             min_tokens=5, top_k=50 if i == 2 else 0)
              for i in range(len(PROMPTS))]
    ref = plain.generate(PROMPTS, params, use_tqdm=False)
    before = spec.engine.stats().speculative.num_accepted_tokens
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert [r.outputs[0].token_ids for r in ref] == [g.outputs[0].token_ids for g in got]
    assert spec.engine.stats().speculative.num_accepted_tokens > before  # sampled drafts were accepted too


def test_stops_and_n_behave_as_without_drafts(plain, spec):
    prompt = PROMPTS[1]
    text = plain.generate(prompt, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0].text
    stop = text[text.index("fox") + 4:][:6]  # lies inside a copied (drafted) stretch
    cases = [SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
             SamplingParams(temperature=0, max_tokens=40, stop=[stop], include_stop_str_in_output=True),
             SamplingParams(temperature=0, max_tokens=13),
             SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=24)]
    for sp in cases:
        a = plain.generate(prompt, sp, use_tqdm=False)[0]
        b = spec.generate(prompt, sp, use_tqdm=False)[0]
        assert [(o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in a.outputs] == \
               [(o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in b.outputs], sp


def test_a_request_can_turn_speculation_off(make_engine):
    # adaptive drafting off: its back-off prices drafts from the engine's own step timings, and on a loaded host a
    # noisy attention slope can price every draft out (a CI run drafted nothing), which is not what this test is about
    llm = LLM.from_engine(make_engine(speculative_config={"method": "ngram", "adaptive": False}))
    before = llm.engine.stats().speculative.num_draft_tokens
    llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, num_speculative_tokens=0), use_tqdm=False)
    assert llm.engine.stats().speculative.num_draft_tokens == before
    llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=30, num_speculative_tokens=2), use_tqdm=False)
    stats = llm.engine.stats().speculative
    assert stats.num_draft_tokens > before and not any(stats.acceptance_lengths[3:])  # never more than 2 drafts
    with pytest.raises(ParamError, match="at most 5"):
        llm.engine.add_request(None, "hi", SamplingParams(num_speculative_tokens=6))
    with pytest.raises(ParamError):
        SamplingParams(num_speculative_tokens=65)


def test_requests_on_an_engine_without_speculation(engine_without_spec):
    engine_without_spec.add_request(None, "hi", SamplingParams(num_speculative_tokens=0))
    with pytest.raises(ParamError, match="not enabled"):
        engine_without_spec.add_request(None, "hi", SamplingParams(num_speculative_tokens=3))


@pytest.fixture(scope="module")
def engine_without_spec(make_engine):
    return make_engine()


@pytest.mark.parametrize("bad, message", [
    ({"method": "medusa"}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"\[1, 64\]"),
    ({"method": "ngram", "num_speculative_tokens": 65}, r"\[1, 64\]"),
    ({"method": "ngram", "num_speculative_tokens": True}, r"\[1, 64\]"),
    ({"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup"),
    ({"method": "suffix", "suffix_decoding_min_token_prob": 2}, "min_token_prob"),
    ({"method": "ngram", "speculative_tokens": 3}, "unknown key"),
    ({"num_speculative_tokens": 3}, "needs a method"),
    ({"method": "layer_skip"}, "needs draft_layers"),
    ({"method": "draft_model"}, "needs model"),
    ({"method": "ngram", "draft_layers": 4}, "draft_layers is a layer_skip key"),
])
def test_bad_configs_fail_with_a_clear_message(bad, message):
    with pytest.raises(ConfigError, match=message):
        SpeculativeConfig.from_dict(bad)


def test_a_draft_model_with_another_tokenizer_is_refused(make_engine, tmp_path):
    """A tiny Llama whose tokenizer (word-level, 64 words) maps ids to other text: refused at start-up."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(63)} | {"<unk>": 63}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="another tokenizer"):
        make_engine(speculative_config={"method": "draft_model", "model": str(tmp_path)})
    with pytest.raises(ConfigError, match="draft_layers must be below the model's 30 layers"):
        make_engine(speculative_config={"method": "layer_skip", "draft_layers": 30})
