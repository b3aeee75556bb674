"""The async engine: concurrent streams equal offline results, deltas add up, abandoned streams free their KV."""

from __future__ import annotations

import asyncio

import pytest

from kvserve import LLM, SamplingParams
from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.sampling import ParamError


@pytest.fixture()
def async_engine(make_engine):
    eng = AsyncLLMEngine(make_engine(max_num_batched_tokens=64))
    eng.start()
    yield eng
    eng.shutdown()


async def collect(eng, prompt, sp, rid):
    text, last = "", None
    async for out in eng.generate(prompt, sp, rid):
        text += out.outputs[0].delta_text
        last = out
    return text, last


async def test_concurrent_streams_match_offline(async_engine, make_engine):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=12)
    results = await asyncio.gather(*(collect(async_engine, p, sp, f"r{i}") for i, p in enumerate(prompts)))
    offline = LLM.from_engine(make_engine(max_num_batched_tokens=512)).generate(prompts, sp, use_tqdm=False)
    for (text, last), ref in zip(results, offline):
        assert last.finished
        assert text == last.outputs[0].text == ref.outputs[0].text
        assert last.outputs[0].token_ids == ref.outputs[0].token_ids


async def test_abandoned_stream_is_aborted_and_frees_blocks(async_engine):
    sp = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    gen = async_engine.generate("Tell me everything about the ocean.", sp, "long")
    async for out in gen:
        if len(out.outputs[0].token_ids) >= 3:
            break
    await gen.aclose()  # what a disconnecting client does
    kv = async_engine.engine.kv_manager
    for _ in range(100):
        used = await asyncio.get_running_loop().run_in_executor(
            None, async_engine.call_in_engine, lambda e: e.kv_manager.pool.num_used_blocks)
        if used == 0:
            break
        await asyncio.sleep(0.05)
    assert kv.pool.num_used_blocks == 0
    assert not async_engine.engine.has_unfinished_requests()


async def test_validation_error_raised_before_streaming(async_engine):
    with pytest.raises(ParamError):
        async for _ in async_engine.generate({"prompt_token_ids": []}, SamplingParams(), "bad"):
            pass
    assert async_engine.num_active == 0
