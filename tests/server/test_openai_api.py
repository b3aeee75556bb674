"""The real server through the official openai client (sync, async, streaming), checked against itself and LLM."""

from __future__ import annotations

import math
import uuid

import httpx
import openai
import pytest

from kvserve.engine.llm_engine import LLM
from kvserve.sampling import SamplingParams

PROMPT = "The capital of France is"
BLOCK = 16  # the engine's default block size


def tokenize(server, text: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": text}, headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def extra(obj, name):
    """A non-OpenAI field of a response object (stop_reason, token_ids, ...)."""
    return (obj.model_extra or {}).get(name)


def test_health_is_open_everything_else_needs_the_key(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {server.api_key}"},
                    {"Authorization": f"Bearer {server.api_key}x"}, {"X-Api-Key": server.api_key}):
        for path in ("/v1/models", "/metrics", "/tokenize"):
            r = httpx.request("GET" if path != "/tokenize" else "POST", f"{server.url}{path}", headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    assert [m.id for m in client.models.list().data] == [server.model]
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completion_and_usage(server, client):
    ids = tokenize(server, PROMPT)
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert r.object == "text_completion" and r.model == server.model and r.id.startswith("cmpl-")
    assert c.text and c.finish_reason in ("length", "stop")
    assert extra(c, "prompt_token_ids") == ids
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(extra(c, "token_ids")) <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same prompt as token ids gives the same completion
    r2 = client.completions.create(model=server.model, prompt=ids, max_tokens=8, temperature=0)
    assert r2.choices[0].text == c.text


async def test_chat_sync_async_and_stream_agree(server, client, aclient):
    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2+2?"}]
    kw = dict(model=server.model, messages=msgs, max_tokens=24, temperature=0)
    sync = client.chat.completions.create(**kw)
    text = sync.choices[0].message.content
    assert sync.object == "chat.completion" and sync.choices[0].message.role == "assistant" and text
    async_r = await aclient.chat.completions.create(**kw)
    assert async_r.choices[0].message.content == text
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [sync.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sync.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    # async streaming, without usage
    stream = await aclient.chat.completions.create(**kw, stream=True)
    parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
    assert "".join(parts) == text


def test_n2_completion_and_chat(server, client):
    r = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=12, n=2,
                                  temperature=1.0, seed=7, extra_body={"return_token_ids": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == sum(len(extra(c, "token_ids")) for c in r.choices)
    chat = client.chat.completions.create(model=server.model, n=2, max_tokens=12, temperature=1.0, seed=7,
                                          messages=[{"role": "user", "content": "Say something."}])
    assert sorted(c.index for c in chat.choices) == [0, 1]
    # a list of prompts times n: choice index = prompt * n + sample
    multi = client.completions.create(model=server.model, prompt=[PROMPT, "1, 2, 3,"], max_tokens=4, n=2,
                                      temperature=0)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text and multi.choices[2].text == multi.choices[3].text


def test_stop_strings_cut_and_never_stream(server, client):
    prompt = "List the days of the week: Monday,"
    base = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0).choices[0]
    assert len(base.text) > 16, base.text
    stop = base.text[10:14]
    expected = base.text[:base.text.index(stop)]
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop" and extra(r.choices[0], "stop_reason") == stop
    chunks = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0,
                                            stop=stop, stream=True))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == expected and stop not in streamed


def test_seed_reproducibility(server, client):
    # ignore_eos: after a finished sentence the model ends more often than not (p(EOS) = 0.57 on a full stop), and
    # two empty texts are equal whatever the seeds did
    kw = dict(model=server.model, prompt="Write a short poem about the sea.", max_tokens=16, temperature=1.0,
              top_p=0.95, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in (4321, 7, 99)}
    assert a and a == b and others - {a}
    chat_kw = dict(model=server.model, messages=[{"role": "user", "content": "Name a color."}], max_tokens=12,
                   temperature=1.2, seed=99, n=2)
    first = [ch.message.content for ch in client.chat.completions.create(**chat_kw).choices]
    second = [ch.message.content for ch in client.chat.completions.create(**chat_kw).choices]
    assert first == second


def test_logprobs_completion_and_chat(server, client):
    r = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"return_token_ids": True})
    c = r.choices[0]
    lp = c.logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        assert top[tok] == value == max(top.values())  # greedy picks the top-1 token
    chat = client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
    # streamed logprobs carry the same values
    stream = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                       stream=True)
    streamed = [v for ch in stream if ch.choices and ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs


def test_echo_scoring_with_max_tokens_zero(server, client):
    gen = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0,
                                    extra_body={"return_token_ids": True})
    gen_id = extra(gen.choices[0], "token_ids")[0]
    gen_lp = gen.choices[0].logprobs.token_logprobs[0]
    ids = tokenize(server, PROMPT) + [gen_id]
    r = client.completions.create(model=server.model, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT + gen.choices[0].text
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    # scoring the generated token gives the logprob it was generated with
    assert abs(lp.token_logprobs[-1] - gen_lp) < 1e-3
    # streamed, echo comes first, with the prompt's logprobs
    chunks = [ch for ch in client.completions.create(model=server.model, prompt=ids, max_tokens=2, echo=True,
                                                     logprobs=1, temperature=0, stream=True) if ch.choices]
    assert chunks[0].choices[0].text.startswith(c.text)
    streamed = [v for ch in chunks for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[:len(ids)] == lp.token_logprobs and len(streamed) == len(ids) + 2


def test_cached_tokens_and_cache_salt_isolation(server, client):
    prompt = f"{uuid.uuid4().hex} " + "The quick brown fox jumps over the lazy dog. " * 8
    n = len(tokenize(server, prompt))
    full = (n - 1) // BLOCK * BLOCK  # every full block but the one holding the last token

    def cached(**kw) -> int | None:
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=1, temperature=0, **kw)
        assert r.usage.prompt_tokens == n
        details = r.usage.prompt_tokens_details
        return None if details is None else details.cached_tokens

    before = server.metrics()
    # without a salt (and without --enable-prompt-tokens-details) the count is not told: it would tell a client
    # whether another tenant sent the same prefix
    assert cached() is None
    assert cached() is None
    assert cached(extra_body={"cache_salt": "tenant-a"}) == 0
    assert cached(extra_body={"cache_salt": "tenant-a"}) == full
    assert cached(extra_body={"cache_salt": "tenant-b"}) == 0
    after = server.metrics()
    key = "kvserve:prefix_cache_misses_total{cause=different_salt}"
    assert after[key] - before[key] == 2
    assert after["kvserve:prefix_cache_hits_total{}"] - before["kvserve:prefix_cache_hits_total{}"] == 2 * full
    queried = after["kvserve:prefix_cache_queries_total{}"] - before["kvserve:prefix_cache_queries_total{}"]
    assert queried == 5 * n


@pytest.fixture(scope="module")
def local_llm(make_engine):
    return LLM.from_engine(make_engine())


def test_greedy_through_server_equals_llm_generate(server, client, local_llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    local = local_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    r = client.completions.create(model=server.model, prompt=prompts, max_tokens=24, temperature=0,
                                  extra_body={"return_token_ids": True})
    for choice, out in zip(r.choices, local):
        assert extra(choice, "token_ids") == out.outputs[0].token_ids
        assert choice.text == out.outputs[0].text
    msgs = [{"role": "user", "content": "Give me three tips for learning to cook."}]
    local_chat = local_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    chat = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=32, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert extra(chat, "prompt_token_ids") == local_chat.prompt_token_ids
    assert extra(chat.choices[0], "token_ids") == local_chat.outputs[0].token_ids
    assert chat.choices[0].message.content == local_chat.outputs[0].text


def test_tokenize_detokenize(server, client):
    ids = tokenize(server, PROMPT)
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids, "model": server.model}, headers=server.headers)
    assert r.json() == {"prompt": PROMPT}
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    t = httpx.post(f"{server.url}/tokenize", json={"messages": msgs}, headers=server.headers).json()
    chat = client.chat.completions.create(model=server.model, messages=msgs, max_tokens=1)
    assert t["count"] == len(t["tokens"]) == chat.usage.prompt_tokens and t["max_model_len"] > 0
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}, headers=server.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_errors_name_the_parameter(server, client):
    m = server.model

    def bad(fn, status, param=None, code=None, **kw):
        with pytest.raises(openai.APIStatusError) as info:
            fn(**kw)
        e = info.value
        assert e.status_code == status, (kw, e.body)
        assert set(e.body) == {"message", "type", "param", "code"}, e.body
        if param is not None:
            assert e.param == param, e.body
        if code is not None:
            assert e.code == code, e.body
        return e

    comp, chat = client.completions.create, client.chat.completions.create
    e = bad(comp, 400, "max_tokens", "context_length_exceeded", model=m, prompt="hi", max_tokens=9000)
    assert "8192" in e.message and "9000" in e.message  # the numbers, not just "too long"
    bad(comp, 400, "n", model=m, prompt="hi", n=17)
    bad(comp, 400, "logprobs", model=m, prompt="hi", logprobs=21)
    bad(chat, 400, "top_logprobs", model=m, messages=[{"role": "user", "content": "x"}], logprobs=True,
        top_logprobs=21)
    bad(chat, 400, "messages", model=m, messages=[])
    bad(comp, 404, "model", "model_not_found", model="gpt-4o", prompt="hi")
    bad(chat, 400, "tools", "unsupported_parameter", model=m, messages=[{"role": "user", "content": "x"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    bad(comp, 400, "suffix", "unsupported_parameter", model=m, prompt="hi", suffix="!")
    bad(comp, 400, "frobnicate", "unsupported_parameter", model=m, prompt="hi", extra_body={"frobnicate": 1})
    bad(comp, 400, "cache_salt", model=m, prompt="hi", extra_body={"cache_salt": ""})
    bad(comp, 400, "temperature", model=m, prompt="hi", temperature=-1)
    bad(comp, 413, None, "request_too_large", model=m, prompt="x" * (9 * 1024 * 1024))
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=server.headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{server.url}/v1/completions", headers=server.headers)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_metrics_parse_and_count(server, client):
    client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert families[f"kvserve:{name}"].type == "histogram"
    m = server.metrics()
    for name in ("time_to_first_token_seconds_count", "inter_token_latency_seconds_count",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count", "prompt_tokens_total",
                 "generation_tokens_total", "kv_cache_blocks_total"):
        assert m[f"kvserve:{name}{{}}"] > 0, name
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_requests_in_flight"):
        assert f"kvserve:{name}{{}}" in m, name
    for cause in ("no_match", "short_prompt", "evicted", "different_salt"):
        assert f"kvserve:prefix_cache_misses_total{{cause={cause}}}" in m
    assert m["kvserve:request_success_total{finished_reason=length}"] > 0
    config = [k for k in m if k.startswith("kvserve:model_config_info{")]
    assert len(config) == 1 and m[config[0]] == 1
    assert "dtype=float32" in config[0] and "quantization=none" in config[0] and "block_size=16" in config[0]
    assert m["kvserve:http_requests_total{endpoint=/v1/completions,status_code=200}"] > 0
    bad = {k: v for k, v in m.items() if not (math.isfinite(v) and v >= 0)}
    assert not bad, bad  # every sample a finite, non-negative number (no NaN gauge, no counter gone negative)
