"""Speculative decoding behind the API: per-request off / lower k, 400s for out-of-range k, Prometheus counters,
the --speculative-config flag (refused before the model loads when bad) and its trip to the engine-core process."""

from __future__ import annotations

import dataclasses

import httpx
import msgspec
import pytest

from kvserve.cli import main as cli_main
from kvserve.config import SpeculativeConfig
from kvserve.engine.core import EngineArgs
from kvserve.server.app import build_app
from kvserve.server.config import ServerConfig

from tests.engine.test_async_engine import idle_stats

COPY = "Repeat after me: the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog."


async def test_per_request_speculation_and_metrics(make_async_llm):
    engine = make_async_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    app = build_app(engine, ServerConfig(served_model_name="m"))
    body = {"model": "m", "prompt": COPY, "max_tokens": 24, "temperature": 0}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            plain = await c.post("/v1/completions", json={**body, "speculative": False})
            assert plain.status_code == 200, plain.text
            assert (await engine.stats()).speculative.num_draft_tokens == 0
            spec = await c.post("/v1/completions", json={**body, "speculative": {"num_speculative_tokens": 2}})
            assert spec.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
            stats = (await engine.stats()).speculative
            assert stats.num_accepted_tokens > 0 and not any(stats.acceptance_lengths[3:])
            chat = await c.post("/v1/chat/completions", json={
                "model": "m", "max_tokens": 8, "speculative": True, "messages": [{"role": "user", "content": COPY}]})
            assert chat.status_code == 200, chat.text
            for bad, param in (({"num_speculative_tokens": 5}, "num_speculative_tokens"),
                               ({"num_speculative_tokens": -1}, "speculative"), ({"k": 2}, "speculative"),
                               ("yes", "speculative")):
                r = await c.post("/v1/completions", json={**body, "speculative": bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
            m = (await c.get("/metrics")).text
        await idle_stats(engine)
    assert 'kvserve:spec_decode_num_accepted_tokens_total{method="ngram",model_name="m"}' in m
    assert 'kvserve:spec_decode_acceptance_length_bucket{le="0",method="ngram",model_name="m"}' in m


async def test_requests_for_speculation_on_an_engine_without_it(make_async_llm):
    app = build_app(make_async_llm(), ServerConfig(served_model_name="m"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            body = {"model": "m", "prompt": "hi", "max_tokens": 2}
            assert (await c.post("/v1/completions", json={**body, "speculative": False})).status_code == 200
            r = await c.post("/v1/completions", json={**body, "speculative": {"num_speculative_tokens": 3}})
            assert r.status_code == 400 and r.json()["error"]["param"] == "num_speculative_tokens", r.text


def test_the_config_travels_to_the_engine_process():
    args = EngineArgs(speculative_config={"method": "suffix", "suffix_decoding_min_token_prob": 0.2})
    back = msgspec.json.decode(msgspec.json.encode(dataclasses.asdict(args)), type=EngineArgs)
    assert back.speculative_config == SpeculativeConfig("suffix", suffix_decoding_min_token_prob=0.2)
    assert back.speculative_config.num_speculative_tokens == 24


@pytest.mark.parametrize("flag, message", [
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be an integer in [1, 64]"),
    ('{"method": "eagle"}', "method must be one of"),
    ("{method: ngram}", "not valid JSON"),
])
def test_serve_refuses_a_bad_speculative_config_before_loading_the_model(flag, message, capsys):
    assert cli_main(["serve", "--speculative-config", flag, "--port", "0"]) == 2
    assert message in capsys.readouterr().err
