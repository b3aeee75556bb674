"""Engine behaviour on the real model: detokenization, stop handling, n > 1, logprobs, penalties, validation."""

from __future__ import annotations

import pytest

from kvserve import LLM, SamplingParams
from kvserve.model.tokenizer import IncrementalDetokenizer
from kvserve.sampling import ParamError


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def llm(engine):
    return LLM.from_engine(engine)


def test_incremental_detokenizer_multibyte_and_spaces(fp32_parts):
    tok = fp32_parts[1]
    text = " Grüße aus 日本 — naïve café 🎉 done"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces), "a partial UTF-8 character leaked into a delta"


def test_stop_string_never_leaks_in_stream(engine, llm):
    sp = SamplingParams(temperature=0, max_tokens=40)
    ref = llm.generate("Count: 1, 2, 3, 4, 5,", sp, use_tqdm=False)[0].outputs[0].text
    assert len(ref) > 8
    stop = ref[4:7]
    engine.add_request("stream-1", "Count: 1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=40, stop=[stop]))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            final = out
    streamed = "".join(deltas)
    assert final.finished and final.outputs[0].finish_reason == "stop" and final.outputs[0].stop_reason == stop
    assert streamed == final.outputs[0].text == ref[: ref.index(stop)]
    assert stop not in streamed
    inc = llm.generate("Count: 1, 2, 3, 4, 5,", sp.replace(stop=(stop,), include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0].text
    assert inc == ref[: ref.index(stop) + len(stop)]
    assert engine.stats().kv_blocks_used == 0


def test_n_outputs_share_prompt_and_differ(engine, llm):
    prompt = "Write a one-line poem about the moon." * 3
    out = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    again = llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12), use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    greedy = llm.generate(prompt, SamplingParams(n=2, temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    assert engine.stats().kv_blocks_used == 0


def test_logprobs_are_consistent(llm):
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, pos in zip(out.token_ids, out.logprobs):
        assert pos[tok].rank == 1  # greedy picks the top token
        assert len(pos) == 3
        assert all(lp.logprob <= 0 for lp in pos.values())
    assert abs(out.cumulative_logprob - sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs))) < 1e-4


def test_stop_token_ids_max_tokens_and_ignore_eos(llm):
    ref = llm.generate("List: apple, banana,", SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    toks = ref[0].outputs[0].token_ids
    stopped = llm.generate("List: apple, banana,", SamplingParams(temperature=0, max_tokens=10,
                                                                  stop_token_ids=[toks[3]]), use_tqdm=False)[0]
    first = toks.index(toks[3])
    assert stopped.outputs[0].token_ids == toks[: first + 1] and stopped.outputs[0].stop_reason == toks[3]
    assert ref[0].outputs[0].finish_reason in ("length", "stop")
    long = llm.generate("Hi", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    assert len(long.outputs[0].token_ids) == 30 and long.outputs[0].finish_reason == "length"


def test_penalties_change_repetitive_output(llm):
    prompt = "Repeat after me: the the the the the the the the"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    pen = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8,
                                              frequency_penalty=1.5), use_tqdm=False)
    b, p = base[0].outputs[0].token_ids, pen[0].outputs[0].token_ids
    assert b != p
    assert len(set(p)) >= len(set(b))


def test_top_k_one_and_min_p_one_equal_greedy(llm):
    greedy = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    topk = llm.generate("Once upon a time", SamplingParams(temperature=1.5, top_k=1, max_tokens=12), use_tqdm=False)
    minp = llm.generate("Once upon a time", SamplingParams(temperature=1.5, min_p=1.0, max_tokens=12), use_tqdm=False)
    assert topk[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids == minp[0].outputs[0].token_ids


def test_chat_applies_template(llm, fp32_parts):
    out = llm.chat([{"role": "user", "content": "What is 2+2?"}], SamplingParams(temperature=0, max_tokens=16),
                   use_tqdm=False)[0]
    expected = fp32_parts[1].apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert out.prompt_token_ids == expected
    assert "4" in out.outputs[0].text


def test_bad_input_is_rejected_without_leaking(engine):
    with pytest.raises(ParamError):
        SamplingParams(temperature=-1)
    with pytest.raises(ParamError):
        SamplingParams(n=10_000)
    with pytest.raises(ParamError, match="context"):
        engine.add_request(None, {"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=10**6))
    with pytest.raises(ParamError):
        engine.add_request(None, {"prompt_token_ids": [10**9]})
    with pytest.raises(ParamError):
        engine.add_request(None, {"prompt_token_ids": []})
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_blocks_used == 0


def test_abort_mid_generation_frees_blocks(engine):
    engine.add_request("to-abort", "Tell me a long story.", SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    out = engine.abort_request("to-abort")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished_requests()
