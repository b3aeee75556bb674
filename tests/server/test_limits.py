"""Admission control and deadlines on an in-process app with tiny limits (2 running + 1 queued sequence, 2 s timeout).

Tiny limits would make the shared server useless for the other tests, so this builds its own app around an engine
that shares the session's float32 weights; httpx's ASGI transport drives it without a socket.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from kvserve.engine.async_engine import AsyncLLMEngine
from kvserve.server.api import build_app
from kvserve.server.config import ServerConfig

TIMEOUT_S = 2.0


@pytest.fixture
def small_app(make_engine):
    engine = AsyncLLMEngine(make_engine(max_num_seqs=2))
    engine.start()
    app = build_app(engine, ServerConfig(max_queued_requests=1, request_timeout=TIMEOUT_S, served_model_name="m"))
    yield app, engine
    engine.shutdown()


async def _idle_stats(engine: AsyncLLMEngine) -> dict:
    loop = asyncio.get_running_loop()
    for _ in range(100):
        stats = await loop.run_in_executor(None, engine.call_in_engine, lambda e: e.stats())
        if stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {stats}")


async def test_queue_full_429_then_timeouts_408_and_stream_error(small_app):
    app, engine = small_app
    state = app.state.kvserve
    long = {"model": "m", "prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
        too_many = await c.post("/v1/completions", json={**long, "n": 4})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        hog = asyncio.create_task(c.post("/v1/completions", json={**long, "n": 3}))
        for _ in range(500):
            if state.in_flight == 3:
                break
            await asyncio.sleep(0.01)
        assert state.in_flight == 3
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"

        r = await asyncio.wait_for(hog, 30)
        assert r.status_code == 408, r.text
        assert r.json()["error"] == {"message": f"the request did not finish within {TIMEOUT_S:g} seconds",
                                     "type": "timeout_error", "param": None, "code": "timeout"}
        assert state.in_flight == 0
        await _idle_stats(engine)

        r = await c.post("/v1/chat/completions", json={"model": "m", "stream": True, "max_tokens": 4000,
                                                       "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": "Go on forever."}]})
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert len(events) > 3  # it streamed tokens before the deadline
        await _idle_stats(engine)
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2

    text = state.metrics.render().decode()
    assert 'kvserve:request_aborted_total{model_name="m",reason="timeout"} 2.0' in text
    assert 'kvserve:http_requests_total{endpoint="/v1/completions",model_name="m",status_code="429"} 1.0' in text


async def test_cancel_while_the_add_is_queued_leaks_nothing(make_engine):
    """A client gone while its request waits to enter the engine: the abort must follow the add, not precede it."""
    from kvserve.sampling import SamplingParams

    engine = AsyncLLMEngine(make_engine())
    agen = engine.generate("Hello", SamplingParams(max_tokens=4000, ignore_eos=True), "cancelled-early")
    step = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.05)  # the add is queued; the engine loop is not running yet
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    engine.start()
    try:
        stats = await _idle_stats(engine)
        assert stats["kv_blocks_used"] == 0 and engine.num_active == 0
        assert not await asyncio.get_running_loop().run_in_executor(
            None, engine.call_in_engine, lambda e: e.has_unfinished_requests())
    finally:
        engine.shutdown()
