"""KV eviction behind the API: per-request budgets (off, override, 400s), the evicted count in usage, Prometheus
metrics, the --kv-eviction flag (refused before the model loads when bad) and its trip to the engine-core process."""

from __future__ import annotations

import dataclasses

import httpx
import msgspec
import pytest

from kvserve.cli import main as cli_main
from kvserve.config import KVEvictionConfig
from kvserve.engine.core import EngineArgs
from kvserve.server.app import build_app
from kvserve.server.config import ServerConfig

from tests.engine.test_async_engine import idle_stats

PROMPT = "The lighthouse keeper wrote in his log every evening, and the sea was calm. " * 6


async def test_per_request_budgets_usage_and_metrics(make_async_llm):
    engine = make_async_llm(kv_eviction={"policy": "h2o", "budget_tokens": 48})
    app = build_app(engine, ServerConfig(served_model_name="m"))
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            evicted = usage["kv_evicted_tokens"]
            assert evicted == usage["prompt_tokens"] + 8 - 2 - 48
            r = await c.post("/v1/completions", json={**body, "kv_budget_tokens": 64})
            assert r.json()["usage"]["kv_evicted_tokens"] == evicted - 16
            r = await c.post("/v1/completions", json={**body, "kv_budget_tokens": 0})
            assert r.json()["usage"]["kv_evicted_tokens"] is None
            chat = await c.post("/v1/chat/completions", json={
                "model": "m", "max_tokens": 4, "kv_budget_tokens": 40, "messages": [{"role": "user", "content": PROMPT}]})
            assert chat.status_code == 200 and chat.json()["usage"]["kv_evicted_tokens"] > 0, chat.text
            for bad in (36, -1, "many"):
                r = await c.post("/v1/completions", json={**body, "kv_budget_tokens": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == "kv_budget_tokens", (bad, r.text)
            m = (await c.get("/metrics")).text
        await idle_stats(engine)
    assert 'kvserve:kv_evicted_tokens_total{model_name="m",policy="h2o"}' in m
    assert 'kvserve:kv_eviction_score_seconds_total{model_name="m",policy="h2o"}' in m


async def test_budgets_on_an_engine_without_eviction(make_async_llm):
    app = build_app(make_async_llm(), ServerConfig(served_model_name="m"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            body = {"model": "m", "prompt": "hi", "max_tokens": 2}
            assert (await c.post("/v1/completions", json={**body, "kv_budget_tokens": 0})).status_code == 200
            r = await c.post("/v1/completions", json={**body, "kv_budget_tokens": 64})
            assert r.status_code == 400 and "not enabled" in r.json()["error"]["message"], r.text


def test_the_config_travels_to_the_engine_process():
    args = EngineArgs(kv_eviction={"policy": "snapkv", "budget_tokens": 512, "pooling_kernel": 5})
    back = msgspec.json.decode(msgspec.json.encode(dataclasses.asdict(args)), type=EngineArgs)
    assert back.kv_eviction == KVEvictionConfig("snapkv", budget_tokens=512, pooling_kernel=5)


@pytest.mark.parametrize("flag, message", [
    ('{"policy": "snapkv", "budget_tokens": 8}', "budget_tokens must be an integer >= 37"),
    ('{"policy": "random"}', "policy must be one of"),
    ("{policy: h2o}", "not valid JSON"),
])
def test_serve_refuses_a_bad_eviction_config_before_loading_the_model(flag, message, capsys):
    assert cli_main(["serve", "--kv-eviction", flag, "--port", "0"]) == 2
    assert message in capsys.readouterr().err
