"""Hundreds of malformed, oversized and adversarial requests: each gets the status we expect and an OpenAI-style error
body, none gets a 5xx, and afterwards the server still answers and its KV usage is back to the idle value."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass

import httpx

MB = 1024 * 1024
COMP, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"


@dataclass
class Case:
    name: str
    path: str
    body: bytes | None = None
    statuses: tuple[int, ...] = (400,)
    param: str | None = None
    method: str = "POST"
    headers: dict | None = None  # None: the valid API key
    chunked: bool = False


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**70, rng.randint(-10**6, 10**6), rng.uniform(-1e9, 1e9)])
    if kind == 2:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if kind == 3:
        return rng.choice(["model", "prompt", "messages", "n", "", "\u0000", "\U0001F600" * 3])
    if kind == 4:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = ["model", "prompt", "messages", "max_tokens", "n", "stream", "temperature", "x", "seed", "stop"]
    return {rng.choice(keys) + ("" if rng.random() < 0.5 else str(rng.randrange(9))): _random_json(rng, depth + 1)
            for _ in range(rng.randrange(6))}


def build_cases(model: str, rng: random.Random) -> list[Case]:
    comp = {"model": model, "prompt": "Hello", "max_tokens": 3}
    # both limits set (equal): a mutation that nulls one still leaves the request bounded
    chat = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "max_completion_tokens": 3}
    cases: list[Case] = []
    add = cases.append

    # random JSON documents: never a valid request (no model + prompt/messages pair survives)
    for i in range(50):
        doc = _random_json(rng)
        if isinstance(doc, dict):
            doc.pop("model", None)
        add(Case(f"random-json-{i}", rng.choice([COMP, CHAT]), _j(doc), (400,)))
    # random bytes
    for i in range(20):
        add(Case(f"random-bytes-{i}", rng.choice([COMP, CHAT, TOK]), rng.randbytes(rng.randrange(1, 2000)), (400,)))
    # every field replaced by values of the wrong type (some happen to be valid: 200 is then fine)
    wrong = [None, True, -1, 0, 1.5, 1e308, "x", "", [], {}, [[]], [None], {"a": 1}, "\ud800", 2**64]
    for base, path in ((comp, COMP), (chat, CHAT)):
        for field in base:
            for value in wrong:
                body = dict(base, **{field: value})
                add(Case(f"{path}-{field}={value!r}", path, _j(body), (200, 400, 404)))
    # numeric limits, each naming its parameter
    limits = [("n", 0), ("n", 17), ("n", 10**6), ("n", 2**63), ("n", -1), ("max_tokens", 10**9),
              ("max_tokens", 2**64), ("max_tokens", -5), ("max_tokens", 8192), ("logprobs", 21),
              ("logprobs", 10**6), ("logprobs", -1), ("seed", 2**64), ("seed", -(2**64)), ("seed", 10**40),
              ("temperature", 1e10), ("temperature", -1), ("top_p", 0), ("top_p", 2), ("top_k", -2),
              ("top_k", 1.5), ("min_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -3),
              ("repetition_penalty", 0), ("stop", ["x"] * 17), ("stop", "x" * 1000), ("stop", [""]),
              ("stop_token_ids", [-1]), ("min_tokens", -1)]
    for field, value in limits:
        add(Case(f"limit-{field}={str(value)[:20]}", COMP, _j(dict(comp, **{field: value})), (400,), field))
    add(Case("chat-top_logprobs-21", CHAT, _j(dict(chat, logprobs=True, top_logprobs=21)), (400,), "top_logprobs"))
    add(Case("chat-top_logprobs-no-logprobs", CHAT, _j(dict(chat, top_logprobs=2)), (400,)))
    add(Case("chat-n-huge", CHAT, _j(dict(chat, n=10**9)), (400,), "n"))
    add(Case("scoring-n2", COMP, _j(dict(comp, max_tokens=0, n=2)), (400,), "n"))
    add(Case("both-max-tokens", CHAT, _j(dict(chat, max_tokens=3, max_completion_tokens=4)), (400,)))
    # invalid UTF-8 and unencodable strings
    for i, raw in enumerate([b"\xff\xfe", b"\x80" * 100, b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80",
                             b"\xe2\x82", b"\xfe\xfe\xff\xff"]):
        add(Case(f"bad-utf8-body-{i}", COMP, b'{"model": "' + raw + b'", "prompt": "x"}', (400,)))
        add(Case(f"bad-utf8-prompt-{i}", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "' + raw
                 + b'"}]}', (400,)))
    for s in ["\ud800", "a\udfffb", "\udc00\ud800"]:
        add(Case(f"surrogate-prompt-{s!r}", COMP, _j(dict(comp, prompt=s)), (400,), "prompt"))
        add(Case(f"surrogate-stop-{s!r}", COMP, _j(dict(comp, stop=[s])), (400,), "stop"))
        add(Case(f"surrogate-tokenize-{s!r}", TOK, _j({"prompt": s}), (400,), "prompt"))
    # deep nesting
    for depth in (1000, 10_000, 100_000):
        add(Case(f"deep-array-{depth}", COMP, b"[" * depth + b"]" * depth, (400,)))
        add(Case(f"deep-object-{depth}", CHAT, b'{"a":' * depth + b"1" + b"}" * depth, (400,)))
        add(Case(f"deep-prompt-{depth}", COMP, b'{"model": "m", "prompt": ' + b"[" * depth + b"]" * depth + b"}",
                 (400,)))
        add(Case(f"unclosed-{depth}", COMP, b"[" * depth, (400,)))
    add(Case("deep-messages", CHAT, _j(dict(chat, messages=json.loads("[" * 300 + "]" * 300))), (400,), "messages.0"))
    # oversized bodies (cap: 8 MiB)
    big = "x" * (10 * MB)
    add(Case("10MB-prompt", COMP, _j(dict(comp, prompt=big)), (413,)))
    add(Case("10MB-random", CHAT, rng.randbytes(10 * MB), (413,)))
    add(Case("10MB-chunked", COMP, _j(dict(comp, prompt=big)), (413,), chunked=True))
    add(Case("10MB-tokenize", TOK, _j({"prompt": big}), (413,)))
    add(Case("7MB-prompt-over-context", COMP, _j(dict(comp, prompt="y" * (7 * MB))), (400,), "prompt"))
    add(Case("long-prompt-over-context", COMP, _j(dict(comp, prompt="hi " * 20_000)), (400,), "prompt"))
    add(Case("ids-over-context", COMP, _j(dict(comp, prompt=[5] * 9000)), (400,), "prompt"))
    add(Case("ids-at-context", COMP, _j(dict(comp, prompt=[5] * 8190, max_tokens=8)), (400,), "max_tokens"))
    add(Case("many-prompts", COMP, _j(dict(comp, prompt=["a"] * 500)), (400,), "prompt"))
    add(Case("many-messages", CHAT, _j(dict(chat, messages=[{"role": "user", "content": "hi"}] * 5000)), (400,),
             "messages"))
    # cache salts
    for salt in ["", "s" * 257, 123, [], {}, True, 1.5, ["a"], "\ud800"]:
        add(Case(f"salt-{str(salt)[:10]!r}", rng.choice([COMP, CHAT]), _j(dict(comp if rng.random() < .5 else chat,
                                                                               cache_salt=salt)), (400,), None))
    for salt in ["", "s" * 257, 7]:
        add(Case(f"salt-comp-{str(salt)[:10]!r}", COMP, _j(dict(comp, cache_salt=salt)), (400,), "cache_salt"))
    # unknown and unsupported parameters name themselves
    unsupported = [("tools", [{"type": "function"}]), ("tool_choice", "auto"), ("response_format", {"type": "json_object"}),
                   ("logit_bias", {"1": 5}), ("functions", [{}]), ("parallel_tool_calls", True), ("frobnicate", 1),
                   ("prompt_cache_key", "k"), ("audio", {}), ("modalities", ["audio"])]
    for field, value in unsupported:
        add(Case(f"unsupported-{field}", CHAT, _j(dict(chat, **{field: value})), (400,), field))
    for field, value in [("suffix", "!"), ("best_of", 3), ("logit_bias", {"1": 5}), ("foo", None)]:
        add(Case(f"unsupported-comp-{field}", COMP, _j(dict(comp, **{field: value})), (400,), field))
    add(Case("stream-options-extra", CHAT, _j(dict(chat, stream=True, stream_options={"continuous_usage_stats": True})),
             (400,), "stream_options.continuous_usage_stats"))
    add(Case("message-name", CHAT, _j(dict(chat, messages=[{"role": "user", "content": "x", "name": "bob"}])),
             (400,), "messages.0.name"))
    add(Case("stream-options-without-stream", CHAT, _j(dict(chat, stream_options={"include_usage": True})), (400,)))
    # malformed JSON
    for i, raw in enumerate([b"", b"{", b'{"model":', b"nul", b"NaN", b'{"model": "m", "prompt": "x", "temperature": NaN}',
                             b'{"temperature": Infinity}', b"{} x", b"{'model': 'm'}", b'{"temperature": 1e999}',
                             b'{"n": ' + b"1" * 5000 + b"}", b'"just a string"', b"[]", b"null", b"123",
                             b'{"model": "m", "prompt": "x",}', b"\x00\x00\x00"]):
        add(Case(f"malformed-{i}", rng.choice([COMP, CHAT, TOK, DETOK]), raw, (400,)))
    # messages
    bad_messages = [[], [{}], [{"role": "tool", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": None}],
                    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
                    [{"role": "user", "content": 5}], [{"role": 5, "content": "x"}], "hi", {"role": "user"},
                    [{"role": "user", "content": [{"type": "text"}]}], [{"role": "function", "content": "x"}],
                    [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], [None], [[]]]
    for i, msgs in enumerate(bad_messages):
        add(Case(f"messages-{i}", CHAT, _j(dict(chat, messages=msgs)), (400,), None))
    # token-id prompts
    for i, prompt in enumerate([[-1], [49152], [10**30], [1.5], [True], [[]], [[1, "a"]], [], [[1], [-5]], [[]] * 3]):
        add(Case(f"token-prompt-{i}", COMP, _j(dict(comp, prompt=prompt)), (400,), "prompt"))
    # tokenize / detokenize
    for i, body in enumerate([{}, {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, {"prompt": 5},
                              {"messages": []}, {"prompt": "x", "model": "nope"}, {"prompt": "x", "extra": 1}]):
        add(Case(f"tokenize-{i}", TOK, _j(body), (404,) if body.get("model") == "nope" else (400,)))
    for i, body in enumerate([{}, {"tokens": [-1]}, {"tokens": [10**9]}, {"tokens": "abc"}, {"tokens": [1.5]},
                              {"tokens": [[1]]}, {"tokens": [1], "x": 1}]):
        add(Case(f"detokenize-{i}", DETOK, _j(body), (400,)))
    # authentication
    for i, headers in enumerate([{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                                 {"Authorization": "Bearer  x"}, {"Authorization": "Bearer"},
                                 {"Authorization": b"Bearer \xc3\xa9"}, {"X-Api-Key": "whatever"},
                                 {"Authorization": "Token abc"}]):
        add(Case(f"auth-{i}", rng.choice([COMP, CHAT, TOK]), _j(comp), (401,), headers=headers))
    # routes, methods, models
    for i, (method, path) in enumerate([("GET", COMP), ("PUT", CHAT), ("POST", "/v1/models"), ("DELETE", "/health"),
                                        ("POST", "/v1/embeddings"), ("GET", "/v1/../../etc/passwd"),
                                        ("POST", "/v1/completions/x"), ("GET", "/docs"), ("GET", "/openapi.json")]):
        add(Case(f"route-{i}", path, b"{}", (404, 405), method=method))
    for i, name in enumerate(["gpt-4o", "", model + " ", model.upper(), "../" + model]):
        add(Case(f"model-{i}", rng.choice([COMP, CHAT]), _j(dict(chat if rng.random() < .5 else comp, model=name)),
                 (404, 400)))
    return cases


def _check_error_body(case: Case, r: httpx.Response) -> None:
    body = r.json()
    assert set(body) == {"error"}, (case.name, body)
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, (case.name, err)
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), (case.name, err)
    if case.param is not None:
        assert err["param"] == case.param, (case.name, err)


async def _send(c: httpx.AsyncClient, server, case: Case) -> tuple[Case, httpx.Response]:
    headers = dict(server.headers) if case.headers is None else dict(case.headers)
    headers.setdefault("Content-Type", "application/json")
    content = case.body
    if case.chunked and content is not None:
        data = content

        async def gen():
            for i in range(0, len(data), 1 << 20):
                yield data[i:i + (1 << 20)]
        content = gen()
    r = await c.request(case.method, f"{server.url}{case.path}", content=content, headers=headers)
    return case, r


async def test_fuzz_never_breaks_the_server(server):
    rng = random.Random(20250601)
    cases = build_cases(server.model, rng)
    assert len(cases) >= 300, len(cases)
    idle = server.wait_idle()["kvserve:kv_cache_blocks_used{}"]
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=120) as c:
        async def one(case):
            async with sem:
                return await _send(c, server, case)
        results = await asyncio.wait_for(asyncio.gather(*(one(case) for case in cases)), timeout=150)
    failures = []
    for case, r in results:
        if r.status_code not in case.statuses:
            failures.append((case.name, r.status_code, r.text[:300]))
            continue
        if r.status_code != 200:
            _check_error_body(case, r)
    assert not failures, failures[:10]
    assert server.proc.poll() is None
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                   json={"model": server.model, "prompt": "After the storm,", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    after = server.wait_idle()
    assert after["kvserve:kv_cache_blocks_used{}"] == idle == 0
    assert not any(k.startswith("kvserve:http_requests_total") and "status_code=5" in k for k in after), \
        [k for k in after if "status_code=5" in k]
