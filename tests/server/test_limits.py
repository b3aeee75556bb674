"""Admission control and deadlines on an in-process app with tiny limits (2 running + 1 queued sequence, 2 s timeout).

Tiny limits would make the shared server useless for the other tests, so this builds its own app around an engine
that shares the session's float32 weights; httpx's ASGI transport drives it without a socket.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from kvserve.server.app import build_app
from kvserve.server.config import ServerConfig

from tests.engine.test_async_engine import idle_stats

TIMEOUT_S = 2.0


@pytest.fixture
async def small_app(make_async_llm):
    engine = make_async_llm(max_num_seqs=2)
    app = build_app(engine, ServerConfig(max_queued_requests=1, request_timeout=TIMEOUT_S, served_model_name="m"))
    async with app.router.lifespan_context(app):
        yield app, engine


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
        await idle_stats(engine)

        r = await c.post("/v1/chat/completions", json={"model": "m", "stream": True, "max_tokens": 4000,
                                                       "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": "Go on forever."}]})
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert len(events) > 3  # it streamed tokens before the deadline
        await idle_stats(engine)
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2

    text = state.metrics.render().decode()
    assert 'kvserve:request_aborted_total{model_name="m",reason="timeout"} 2.0' in text
    assert 'kvserve:http_requests_total{endpoint="/v1/completions",model_name="m",status_code="429"} 1.0' in text


async def test_require_cache_salt_and_non_ascii_api_key(make_async_llm):
    """--require-cache-salt refuses unsalted generation; an API key with non-ASCII characters matches the UTF-8 bytes
    a client sends (ASGI hands headers over as latin-1) and nothing else."""
    key = "clé-ü-🔑"
    engine = make_async_llm()
    app = build_app(engine, ServerConfig(served_model_name="m", require_cache_salt=True, api_key=key))
    auth = {"Authorization": b"Bearer " + key.encode("utf-8")}
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            wrong = {"Authorization": b"Bearer " + key.encode("latin-1", "replace")}
            assert (await c.post("/v1/completions", json=body, headers=wrong)).status_code == 401
            r = await c.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
            r = await c.post("/v1/completions", json={**body, "cache_salt": "t1"}, headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # salted: told
