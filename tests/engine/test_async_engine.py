"""AsyncLLM over an in-process core: concurrent streams equal offline results, deltas add up, abandoned streams free
their KV, a slow consumer's undelivered outputs are merged (one pending output, deltas intact)."""

from __future__ import annotations

import asyncio

import pytest

from kvserve import LLM, SamplingParams
from kvserve.sampling import ParamError


@pytest.fixture()
async def async_llm(make_async_llm):
    llm = make_async_llm(max_num_batched_tokens=64)
    await llm.start()
    yield llm
    await llm.shutdown()


async def collect(llm, prompt, sp, rid, delay=0.0):
    text, ids, last = "", [], None
    async for out in llm.generate(prompt, sp, rid):
        text += out.outputs[0].delta_text
        ids += out.outputs[0].delta_token_ids
        last = out
        await asyncio.sleep(delay)
    return text, ids, last


def ids_of(llm, text):
    return {"prompt_token_ids": llm.tokenizer.encode(text), "prompt": text}


async def idle_stats(llm):
    for _ in range(200):
        stats = await llm.stats()
        if stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {stats}")


async def test_concurrent_streams_match_offline(async_llm, make_engine):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=12)
    # the last consumer is slow: its outputs pile up and must be merged without losing a delta
    results = await asyncio.gather(*(collect(async_llm, ids_of(async_llm, p), sp, f"r{i}", 0.3 if i == 5 else 0.0)
                                     for i, p in enumerate(prompts)))
    offline = LLM.from_engine(make_engine(max_num_batched_tokens=512)).generate(prompts, sp, use_tqdm=False)
    for (text, ids, last), ref in zip(results, offline):
        assert last.finished
        assert text == last.outputs[0].text == ref.outputs[0].text
        assert ids == last.outputs[0].token_ids == ref.outputs[0].token_ids


async def test_abandoned_stream_is_aborted_and_frees_blocks(async_llm):
    sp = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    gen = async_llm.generate(ids_of(async_llm, "Tell me everything about the ocean."), sp, "long")
    async for out in gen:
        if len(out.outputs[0].token_ids) >= 3:
            break
    await gen.aclose()  # what a disconnecting client does
    await idle_stats(async_llm)
    assert async_llm.num_active == 0


async def test_cancel_before_the_first_output_leaks_nothing(async_llm):
    """A client gone while its request waits to enter the engine: the abort follows the add, never precedes it."""
    agen = async_llm.generate(ids_of(async_llm, "Hello"), SamplingParams(max_tokens=4000, ignore_eos=True), "early")
    step = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0)  # the add is queued, no step has run yet
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    await agen.aclose()
    await idle_stats(async_llm)
    assert async_llm.num_active == 0


async def test_validation_error_raised_before_streaming(async_llm):
    with pytest.raises(ParamError) as e:
        async for _ in async_llm.generate({"prompt_token_ids": []}, SamplingParams(), "bad"):
            pass
    assert e.value.param == "prompt"
    long = {"prompt_token_ids": [1] * async_llm.info.max_model_len}
    with pytest.raises(ParamError) as e:
        async for _ in async_llm.generate(long, SamplingParams(), "long"):
            pass
    assert e.value.code == "context_length_exceeded"
    assert async_llm.num_active == 0


async def test_decode_steps_stream_the_same_text_in_runs(make_async_llm, make_engine):
    """decode_steps: a greedy stream gets its tokens in runs (up to 4 per engine step), the same text and token ids as
    one step at a time, and a stop string inside a run still ends the text where it completes."""
    llm = make_async_llm(max_num_batched_tokens=64, decode_steps=4)
    await llm.start()
    try:
        prompt = ids_of(llm, "Write a short story about a lighthouse keeper.")
        free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        ref = LLM.from_engine(make_engine()).generate(prompt, free, use_tqdm=False)[0].outputs[0]
        stop = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[ref.text[40:46]])
        ref_stop = LLM.from_engine(make_engine()).generate(prompt, stop, use_tqdm=False)[0].outputs[0]
        runs = []
        text, ids = "", []
        async for out in llm.generate(prompt, free, "runs"):
            runs.append(len(out.outputs[0].delta_token_ids))
            text += out.outputs[0].delta_text
            ids += out.outputs[0].delta_token_ids
        assert text == ref.text and ids == ref.token_ids
        # the prompt's token, then runs of 4 (a consumer that falls behind gets outputs merged, so only "more than
        # one token at once" is certain)
        assert max(runs) > 1, runs
        text, ids, last = await collect(llm, prompt, stop, "stop")
        assert text == ref_stop.text and ids == ref_stop.token_ids and last.outputs[0].finish_reason == "stop"
        assert len(ref_stop.token_ids) < 30
        await idle_stats(llm)
    finally:
        await llm.shutdown()
