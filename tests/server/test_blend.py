"""CacheBlend behind the API: prompt_segments in /v1/completions, kv_reuse in /v1/chat/completions (the official
client), reused and recomputed counts in usage, the 400s naming the field, and the segment-cache metrics."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from kvserve.server.app import build_app
from kvserve.server.config import ServerConfig

from tests.engine.test_async_engine import idle_stats

DOCS = [" ".join(f"Document {i}. Fact number {i} is that the {w} is blue." for _ in range(5)) + "\n"
        for i, w in enumerate(["door", "lamp", "boat"])]
SEGMENTS = ["Read the documents.\n", *DOCS, "Question: what is blue in document 1? Answer:"]


async def test_completions_with_segments_usage_errors_and_metrics(make_async_llm):
    engine = make_async_llm()
    app = build_app(engine, ServerConfig(served_model_name="m"))
    body = {"model": "m", "prompt_segments": SEGMENTS, "max_tokens": 4, "temperature": 0, "cache_salt": "s1"}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            first = r.json()["usage"]["prompt_tokens_details"]
            assert first["blended_tokens"] > 0 and first["cached_tokens"] >= first["blended_tokens"]
            assert 0 < first["recomputed_tokens"] < first["blended_tokens"]
            # the same segments in another order still reuse every document: the one now first by prefix (its cache
            # entry is the exact prompt [segment 0, document]: prefix mode), the others blended
            r = await c.post("/v1/completions", json={**body, "prompt_segments": [SEGMENTS[0], *DOCS[::-1],
                                                                                  SEGMENTS[-1]]})
            again = r.json()["usage"]["prompt_tokens_details"]
            assert again["cached_tokens"] > again["blended_tokens"] > 0
            # ratio 1: every reused token recomputed; a plain prompt reports no blend fields
            r = await c.post("/v1/completions", json={**body, "blend_recompute_ratio": 1.0, "cache_salt": "s2"})
            d = r.json()["usage"]["prompt_tokens_details"]
            assert d["recomputed_tokens"] == d["blended_tokens"] > 0
            # APE's parallel mode: the same cached documents, nothing recomputed
            r = await c.post("/v1/completions", json={**body, "kv_reuse": "parallel", "ape_temperature": 0.9})
            d = r.json()["usage"]["prompt_tokens_details"]
            assert r.status_code == 200 and d["blended_tokens"] > 0 and d["recomputed_tokens"] == 0, r.text
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2,
                                                      "cache_salt": "s1"})
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
            bad = [
                ({"prompt_segments": []}, "prompt_segments"),
                ({"prompt_segments": "one string"}, "prompt_segments"),
                ({"prompt_segments": ["a", ""]}, "prompt_segments"),
                ({"prompt_segments": ["a", 3.5]}, "prompt_segments"),
                ({"prompt": "a"}, "prompt_segments"),  # both prompt and prompt_segments
                ({"prompt_segments": ["a", "b"], "blend_recompute_ratio": -0.1}, "blend_recompute_ratio"),
                ({"prompt_segments": ["word " * 9000, "b"]}, "prompt_segments"),  # over the context
                ({"prompt_segments": ["a", "b"], "echo": True, "logprobs": 1}, "prompt_logprobs"),
                ({"prompt_segments": ["a", "b"], "cache_salt": "bad\x00salt"}, "cache_salt"),
                ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "blend_recompute_ratio": 0.5},
                 "blend_recompute_ratio"),
                ({"prompt_segments": ["a", "b"], "ape_scale": 0.5}, "ape_scale"),  # blend has no scale
                ({"prompt_segments": ["a", "b"], "kv_reuse": "parallel", "ape_temperature": 0}, "ape_temperature"),
                ({"prompt_segments": ["a", "b"], "kv_reuse": "copy"}, "kv_reuse"),
            ]
            for extra, param in bad:
                r = await c.post("/v1/completions", json={**body, **extra})
                assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == param, (extra, r.text)
            for name in ("blend_recompute_ratio", "ape_temperature"):
                r = await c.post("/v1/completions", json={"model": "m", "prompt": "a", name: 0.5})
                assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
            m = (await c.get("/metrics")).text
        await idle_stats(engine)
    # at arrival, under 2 salts: documents 1 and 2 (document 0 follows segment 0 as in its cache entry: a plain prefix)
    assert "kvserve:segment_cache_misses_total{model_name=\"m\"} 4.0" in m
    reused = re.search(r'^kvserve:blend_reused_tokens_total\{model_name="m"\} (\S+)$', m, re.M)
    assert reused and float(reused.group(1)) > 0, m  # the value, not only the series


def test_chat_kv_reuse_with_the_official_client(client, server):
    messages = [{"role": "system", "content": "Answer from the documents."},
                {"role": "user", "content": [{"type": "text", "text": d} for d in DOCS]
                 + [{"type": "text", "text": "What is blue in document 2?"}]}]
    kw = dict(model=server.model, messages=messages, max_tokens=4, temperature=0)
    first = client.chat.completions.create(**kw, extra_body={"kv_reuse": "blend", "cache_salt": "chat"})
    assert first.usage.prompt_tokens_details.blended_tokens > 0
    exact = client.chat.completions.create(**kw, extra_body={"kv_reuse": "blend", "cache_salt": "chat2",
                                                             "blend_recompute_ratio": 1.0})
    plain = client.chat.completions.create(**kw, extra_body={"cache_salt": "chat3"})
    assert exact.choices[0].message.content == plain.choices[0].message.content
    assert getattr(plain.usage.prompt_tokens_details, "blended_tokens", None) is None
    ape = client.chat.completions.create(**kw, extra_body={"kv_reuse": "parallel", "cache_salt": "chat",
                                                           "ape_temperature": 0.9, "ape_scale": 0.8})
    assert ape.usage.prompt_tokens_details.blended_tokens > 0 and ape.usage.prompt_tokens_details.recomputed_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw, extra_body={"ape_scale": 0.8})
    assert e.value.body["param"] == "ape_scale"
