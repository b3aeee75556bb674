"""50 concurrent streaming clients that hang up at random (plus a few impatient non-streaming ones) leak nothing.

Clients that hang up ask for 1000 tokens, so a server that failed to abort them would still be busy for minutes;
being idle again within seconds is the proof that disconnects abort and free KV blocks.
"""

from __future__ import annotations

import asyncio
import random

import httpx

NUM_STREAMS = 50
NUM_IMPATIENT = 6
LONG = 1000


async def _client(server, i: int, kind: str, rng: random.Random) -> str:
    chat = i % 2 == 0
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": server.model, "temperature": 0.8, "seed": i, "stream": True,
            "max_tokens": 8 if kind == "complete" else LONG, "ignore_eos": kind != "complete"}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Story number {i}, please."}]
    else:
        body["prompt"] = f"Story number {i}:"
    if i % 10 == 3:
        body["n"] = 2
    async with httpx.AsyncClient(timeout=90) as c:  # own connection: closing it is the disconnect
        if kind == "cancel":  # hang up at a random moment, maybe before the response starts
            try:
                await asyncio.wait_for(c.post(f"{server.url}{path}", json=body, headers=server.headers),
                                       rng.uniform(0.01, 1.0))
            except asyncio.TimeoutError:
                return "cancelled"
            return "finished"
        async with c.stream("POST", f"{server.url}{path}", json=body, headers=server.headers) as r:
            assert r.status_code == 200, await r.aread()
            if kind == "headers":
                return "hung up after headers"
            wanted = rng.randint(1, 12) if kind == "midway" else None
            seen = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                seen += 1
                if line == "data: [DONE]":
                    assert kind == "complete", "a long stream should not have finished"
                    return "complete"
                assert '"error"' not in line, line
                if wanted is not None and seen >= wanted:
                    return f"hung up after {seen} events"
    raise AssertionError(f"client {i} ({kind}) ended without [DONE]")


async def _impatient(server, i: int) -> None:
    body = {"model": server.model, "prompt": f"Essay {i}:", "max_tokens": LONG, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=0.5 + i * 0.1) as c:
        try:
            await c.post(f"{server.url}/v1/completions", json=body, headers=server.headers)
        except httpx.TimeoutException:
            return
    raise AssertionError("a 1000-token request answered within the client's timeout")


async def test_random_disconnects_leak_nothing(server):
    rng = random.Random(1234)
    kinds = [rng.choice(["complete", "midway", "midway", "headers", "cancel"]) for _ in range(NUM_STREAMS)]
    before = server.metrics()
    results = await asyncio.wait_for(asyncio.gather(
        *(_client(server, i, kind, rng) for i, kind in enumerate(kinds)),
        *(_impatient(server, i) for i in range(NUM_IMPATIENT))), timeout=150)
    assert len(results) == NUM_STREAMS + NUM_IMPATIENT
    after = server.wait_idle(timeout=60)
    hung_up = sum(k in ("midway", "headers") for k in kinds) + NUM_IMPATIENT
    cancelled = kinds.count("cancel")
    key = "kvserve:request_aborted_total{reason=client_disconnect}"
    aborted = after[key] - before[key]
    assert hung_up <= aborted <= hung_up + cancelled, (aborted, hung_up, cancelled)
    assert after["kvserve:request_aborted_total{reason=error}"] == before["kvserve:request_aborted_total{reason=error}"]
    assert after["kvserve:kv_cache_blocks_used{}"] == 0
    # and the server still serves
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=60,
                   json={"model": server.model, "prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
