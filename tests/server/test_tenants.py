"""Tenants and admission on an in-process app: the API key picks the tenant (never a body field), per-tenant
concurrency and token-rate limits answer 429 with Retry-After from the tenant's own budget, priority caps, the
queue-wait deadline answers 503 (streamed or not), every refusal is counted by tenant and cause, and a tenants file
with bad fields fails at start-up naming them."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from kvserve.cli import main as cli_main
from kvserve.config import ConfigError
from kvserve.server.app import build_app
from kvserve.server.config import ServerConfig
from kvserve.server.tenants import Tenant, TenantLimits, hash_key, load_tenants

from tests.engine.test_async_engine import idle_stats

KEYS = {"alpha": "key-alpha-1", "beta": "key-beta-1"}

TENANTS_TOML = f"""
[tenants.alpha]
api_keys = ["{hash_key(KEYS['alpha'])}"]
weight = 3
max_concurrent_requests = 1
priority_cap = 2

[tenants.beta]
api_keys = ["{hash_key(KEYS['beta'])}", "{hash_key('key-beta-2')}"]
max_tokens_per_minute = 120
"""


def auth(tenant: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


@pytest.fixture
def tenants_file(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS_TOML)
    return path


def test_load_tenants_and_identify_by_key(tenants_file):
    cfg = load_tenants(str(tenants_file))
    alpha, beta = cfg.tenants
    assert (alpha.name, alpha.weight, alpha.max_concurrent_requests, alpha.priority_cap) == ("alpha", 3.0, 1, 2)
    assert (beta.max_tokens_per_minute, beta.weight, len(beta.key_hashes)) == (120, 1.0, 2)
    assert cfg.identify(b"key-beta-2") is beta and cfg.identify(b"key-alpha-1") is alpha
    assert cfg.identify(b"key-alpha-") is None and cfg.identify(b"") is None
    assert cfg.weights() == (("alpha", 3.0), ("beta", 1.0))
    assert alpha.clamp_priority(-10) == 2 and alpha.clamp_priority(7) == 7 and beta.clamp_priority(-10) == -10


def test_bad_tenants_file_fails_naming_each_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(f"""
[tenants.a]
api_keys = ["plain-text-key"]
wieght = 2
max_concurrent_requests = 0

[tenants.b]
api_keys = ["{hash_key('k')}"]
weight = -1
max_tokens_per_minute = "lots"
priority_cap = 1.5

[tenants.c]
api_keys = ["{hash_key('k')}"]
""")
    with pytest.raises(ConfigError) as e:
        load_tenants(str(path))
    msg = str(e.value)
    for part in ("tenant 'a': unknown field(s) wieght", "tenant 'a': api_keys holds 'plain-te'",
                 "tenant 'a': max_concurrent_requests must be a positive integer, got 0",
                 "tenant 'b': weight must be a positive number, got -1",
                 "tenant 'b': max_tokens_per_minute must be a positive integer, got 'lots'",
                 "tenant 'b': priority_cap must be an integer, got 1.5",
                 "tenant 'c': an api_keys entry is also a key of tenant 'b'"):
        assert part in msg, msg
    path.write_text("[tenants.x\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_tenants(str(path))
    path.write_text("[other]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown top-level key.*no tenants"):
        load_tenants(str(path))


def test_serve_refuses_a_bad_tenants_file_before_loading_the_model(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[tenants.a]\napi_keys = ["x"]\n')
    assert cli_main(["serve", "--tenants", str(path), "--port", "0"]) == 2
    assert "tenant 'a': api_keys holds 'x'" in capsys.readouterr().err


def test_hash_key_command_reads_stdin():
    out = subprocess.run([sys.executable, "-m", "kvserve.cli", "tenants", "hash-key"], input="s3cret\n",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == hash_key("s3cret"), out.stderr


def test_token_rate_retry_after_is_when_the_window_frees():
    now = [1000.0]
    limits = TenantLimits(clock=lambda: now[0])
    t = Tenant("t", max_tokens_per_minute=100, max_concurrent_requests=2)
    first = limits.acquire(t, 1)
    limits.reserve_tokens(first, 70)
    now[0] += 10
    second = limits.acquire(t, 1)
    with pytest.raises(Exception) as e:
        limits.reserve_tokens(second, 40)
    assert e.value.status == 429 and e.value.code == "tenant_token_rate_limit"
    assert e.value.headers["Retry-After"] == "50"  # the 70 tokens leave the window 60 s after they entered
    limits.release(first, 30)  # it used 30, not the 70 reserved: now 40 more fit
    limits.reserve_tokens(second, 40)
    third = limits.acquire(t, 1)  # second and third in flight: the limit
    now[0] += 4
    with pytest.raises(Exception) as e:
        limits.acquire(t, 1)
    # first took 10 s; the oldest in flight (second) started 4 s ago: expected to end in 6 s
    assert e.value.code == "tenant_concurrency_limit" and e.value.headers["Retry-After"] == "6"
    limits.release(second, None)
    limits.release(third, None)
    limits.release(third, None)  # twice: no effect
    assert limits.in_flight(t) == 0


@pytest.fixture
async def tenant_app(make_async_llm, tenants_file):
    cfg = load_tenants(str(tenants_file))
    engine = make_async_llm(max_num_seqs=4, scheduling_policy="priority", tenant_weights=cfg.weights())
    app = build_app(engine, ServerConfig(served_model_name="m", tenants=cfg, api_key="ops-key"))
    async with app.router.lifespan_context(app):
        yield app, engine


async def test_tenants_limits_and_refusal_metrics(tenant_app):
    app, engine = tenant_app
    state = app.state.kvserve
    long = {"model": "m", "prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1},
                         headers={"Authorization": "Bearer nobody"})
        assert r.status_code == 401
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1, "tenant": "beta"},
                         headers=auth("alpha"))
        assert r.status_code == 400  # the tenant is never a body field
        ops = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1},
                           headers={"Authorization": "Bearer ops-key"})
        assert ops.status_code == 200  # --api-key is the default tenant's

        hog = asyncio.create_task(c.post("/v1/completions", json=long, headers=auth("alpha")))
        for _ in range(500):
            if state.limits.in_flight(state.config.tenants.get("alpha")) == 1:
                break
            await asyncio.sleep(0.01)
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1},
                         headers=auth("alpha"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_concurrency_limit", r.text
        assert r.headers["retry-after"] == "1"
        # another tenant is not held back by alpha's limit
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 8, "ignore_eos": True},
                         headers=auth("beta"))
        assert r.status_code == 200, r.text
        used = r.json()["usage"]["total_tokens"]
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 500},
                         headers=auth("beta"))
        assert r.status_code == 400 and r.json()["error"]["code"] == "tokens_per_minute_exceeded"
        r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 120 - used},
                         headers=auth("beta"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_token_rate_limit", r.text
        assert 55 <= int(r.headers["retry-after"]) <= 60
        assert (await hog).status_code == 200

        # priority: alpha's cap (2) turns a request for -5 into 2; without the priority policy it is refused
        alpha = state.config.tenants.get("alpha")
        assert state.request_scope(alpha, priority=-5).priority == 2
        r = await c.post("/v1/chat/completions", headers=auth("alpha"),
                         json={"model": "m", "max_tokens": 2, "priority": -5,
                               "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        m = (await c.get("/metrics", headers=auth("beta"))).text
    await idle_stats(engine)
    assert 'kvserve:requests_refused_total{cause="tenant_concurrency_limit",model_name="m",status_code="429",' \
           'tenant="alpha"} 1.0' in m
    assert 'kvserve:requests_refused_total{cause="tenant_token_rate_limit",model_name="m",status_code="429",' \
           'tenant="beta"} 1.0' in m
    assert 'kvserve:tenant_generation_tokens_total{model_name="m",tenant="alpha"} 402.0' in m  # 400 + 2
    assert 'kvserve:tenant_requests_running{model_name="m",tenant="beta"} 0.0' in m


async def test_priority_field_needs_the_priority_policy(make_async_llm):
    app = build_app(make_async_llm(), ServerConfig(served_model_name="m"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1, "priority": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 1, "priority": 0})
            assert r.status_code == 200


async def test_queue_wait_deadline_answers_503_with_retry_after(make_async_llm):
    engine = make_async_llm(max_num_seqs=1, max_queue_wait_s=1.0)
    app = build_app(engine, ServerConfig(served_model_name="m"))
    state = app.state.kvserve
    long = {"model": "m", "prompt": "Tell me a very long story.", "max_tokens": 4000, "ignore_eos": True}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            hog = asyncio.create_task(c.post("/v1/completions", json={**long, "stream": True}))
            for _ in range(500):
                if (await engine.stats()).num_running == 1:
                    break
                await asyncio.sleep(0.01)
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "queue_wait_exceeded" and r.headers["retry-after"] == "1"
            r = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2, "stream": True,
                                                           "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503, r.text  # held headers: a real status, not a 200 stream with an error
            assert r.json()["error"]["code"] == "queue_wait_exceeded" and r.headers["retry-after"] == "1"
            hog.cancel()
            await asyncio.gather(hog, return_exceptions=True)
        await idle_stats(engine)
        r2 = None
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            r2 = await c.post("/v1/chat/completions", json={"model": "m", "max_tokens": 3, "stream": True,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r2.status_code == 200 and r2.text.rstrip().endswith("data: [DONE]")
    text = state.metrics.render().decode()
    assert 'kvserve:requests_refused_total{cause="queue_wait_exceeded",model_name="m",status_code="503",' \
           'tenant="default"} 2.0' in text


async def test_agent_session_kv_pin_take_over_and_release(make_async_llm, tenants_file):
    """A turn with session_id + kv_pin_seconds leaves its KV pinned; the next turn is served from it (cached
    tokens) and pins its own; the release endpoint unpins it (only for its own tenant); bad pins get 400."""
    cfg = load_tenants(str(tenants_file))
    engine = make_async_llm()
    app = build_app(engine, ServerConfig(served_model_name="m", tenants=cfg, max_kv_pin_seconds=120))
    history = [{"role": "user", "content": "Name three rivers of Europe, with one sentence on each of them."}]
    turn = {"model": "m", "max_tokens": 24, "temperature": 0, "session_id": "conv-1", "kv_pin_seconds": 60,
            "cache_salt": "agent"}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            r = await c.post("/v1/chat/completions", headers=auth("alpha"), json={**turn, "messages": history})
            assert r.status_code == 200, r.text
            stats = await engine.stats()
            assert stats.kv_pins.num_pins == 1 and stats.kv_blocks_used == stats.kv_pins.blocks_pinned > 0
            history += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                        {"role": "user", "content": "And one more?"}]
            r = await c.post("/v1/chat/completions", headers=auth("alpha"), json={**turn, "messages": history})
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 32, usage
            stats = await engine.stats()
            assert stats.kv_pins.taken_over == 1 and stats.kv_pins.num_pins == 1
            # another tenant's release of the same session id finds nothing
            r = await c.post("/v1/sessions/release", headers=auth("beta"),
                             json={"session_id": "conv-1", "cache_salt": "agent"})
            assert r.status_code == 200 and r.json()["released_tokens"] == 0
            r = await c.post("/v1/sessions/release", headers=auth("alpha"),
                             json={"session_id": "conv-1", "cache_salt": "agent"})
            assert r.status_code == 200 and r.json()["released_tokens"] >= 48, r.text
            await idle_stats(engine)
            assert (await engine.stats()).kv_blocks_used == 0
            bad = {"model": "m", "max_tokens": 2, "messages": history[:1]}
            r = await c.post("/v1/chat/completions", headers=auth("alpha"), json={**bad, "session_id": "x",
                                                                                 "kv_pin_seconds": 121})
            assert r.status_code == 400 and r.json()["error"]["param"] == "kv_pin_seconds"
            r = await c.post("/v1/chat/completions", headers=auth("alpha"), json={**bad, "kv_pin_seconds": 5})
            assert r.status_code == 400 and "needs a session_id" in r.json()["error"]["message"]
            r = await c.post("/v1/chat/completions", headers=auth("beta"), json={**bad, "session_id": "x", "n": 2,
                                                                                "kv_pin_seconds": 5})
            assert r.status_code == 400 and "n=1" in r.json()["error"]["message"]
            m = (await c.get("/metrics", headers=auth("alpha"))).text
    assert 'kvserve:kv_pin_events_total{event="taken_over",model_name="m"} 1.0' in m
    assert 'kvserve:kv_pin_events_total{event="released",model_name="m"} 1.0' in m
    assert 'kvserve:kv_pinned_sessions{model_name="m"} 0.0' in m
