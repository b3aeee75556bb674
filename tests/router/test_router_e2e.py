"""`kvserve router` in front of real kvserve instances on 127.0.0.1, driven with the official openai client: requests
go where their prefix is cached, bytes and errors pass through unchanged, the client's API key too, backends of
another model identity than the router expects are refused, and a killed backend's requests are served by the other
one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import free_port, start_kvserve, stop_kvserve

KEY = "router-test-key-42"
SYSTEMS = [f"You are assistant number {i}. " + "Answer politely, briefly and with care for the facts. " * 10
           for i in range(4)]


def _backend(tmp: Path, name: str, dtype: str):
    return start_kvserve(["--dtype", dtype, "--kv-cache-memory-gb", "0.05", "--num-threads", "1",
                          "--api-key-file", str(tmp / "key"), "--log-level", "warning", "--no-access-log"],
                         tmp / f"{name}.log", drop_env=("KVSERVE_API_KEY",))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    (tmp / "key").write_text(KEY + "\n")
    procs = []
    try:
        for name in ("a", "b"):
            procs.append(_backend(tmp, name, "float32"))
        router, url = _router(tmp, [u for _, u in procs], "main")
        routers = [router]
        _wait_status(url, tmp / "main.log", lambda b: b[0]["healthy"] and b[1]["healthy"])
        yield {"url": url, "backends": procs, "router": router, "tmp": tmp, "routers": routers}
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait(10)
        for r in locals().get("routers", []):
            r.terminate()
            r.wait(10)


def _router(tmp: Path, backends: list[str], name: str, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "kvserve.cli", "router", "--port", str(port), "--poll-interval", "0.1",
           "--backend-api-key-file", str(tmp / "key"), "--log-level", "warning", *extra]
    for u in backends:
        cmd += ["--backend", u]
    log = open(tmp / f"{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return proc, f"http://127.0.0.1:{port}"


def _wait_status(url: str, log: Path, ready) -> dict:
    deadline = time.monotonic() + 120
    while True:
        try:
            status = httpx.get(f"{url}/router/status", timeout=2).json()
            if ready(status["backends"]):
                return status
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def _ask(client, i: int, turn: int):
    r = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": SYSTEMS[i]}, {"role": "user", "content": f"What is {i} + {turn}?"}])
    return r.headers["x-kvserve-backend"], r.parse().choices[0].message.content


def _wait_advertised(url: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while sum(b["advertised_blocks"] for b in httpx.get(f"{url}/router/status").json()["backends"][:2]) < n:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_other_model_identity_is_refused(cluster):
    status = httpx.get(f"{cluster['url']}/router/status").json()
    assert status["kv_identity"].endswith("|float32|block_size=16")
    assert all(b["refused"] is None for b in status["backends"])
    # a router that expects another model (here: the same weights in bf16) refuses both float32 backends
    other = status["kv_identity"].replace("|float32|", "|bfloat16|")
    proc, url = _router(cluster["tmp"], [p[1] for p in cluster["backends"]], "other", "--kv-identity", other)
    cluster["routers"].append(proc)
    s = _wait_status(url, cluster["tmp"] / "other.log", lambda b: all(x["refused"] for x in b))
    assert all("float32" in b["refused"] and not b["healthy"] for b in s["backends"])
    assert httpx.get(f"{url}/health").status_code == 503
    r = httpx.post(f"{url}/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2},
                   headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_backend"


def test_requests_follow_their_cached_prefix_and_match_direct_outputs(cluster):
    client = _client(cluster["url"])
    first = {i: _ask(client, i, 0) for i in range(4)}
    _wait_advertised(cluster["url"], 4 * 8)  # each system prompt is > 8 blocks of 16 tokens
    again = {i: _ask(client, i, 0) for i in range(4)}
    later = {i: _ask(client, i, 1) for i in range(4)}
    for i in range(4):
        assert again[i][0] == first[i][0] and later[i][0] == first[i][0], (first, again, later)
        assert again[i][1] == first[i][1]
    assert len({backend for backend, _ in first.values()}) == 2  # the idle one takes a new prefix
    # the same answers as asking a backend directly (greedy, float32)
    direct = _client(cluster["backends"][1][1])
    for i in range(4):
        assert _ask_direct(direct, i, 1) == later[i][1]
    metrics = httpx.get(f"{cluster['url']}/metrics").text
    assert 'kvserve_router:requests_routed_total{backend="0",reason="prefix"}' in metrics


def _ask_direct(client, i: int, turn: int) -> str:
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=6, temperature=0,
        messages=[{"role": "system", "content": SYSTEMS[i]}, {"role": "user", "content": f"What is {i} + {turn}?"}]
    ).choices[0].message.content


def test_streams_and_errors_pass_through(cluster):
    client = _client(cluster["url"])
    kw = dict(model="SmolLM2-135M-Instruct", max_tokens=10, temperature=0,
              messages=[{"role": "user", "content": "Name a colour."}])
    text = client.chat.completions.create(**kw).choices[0].message.content
    stream = client.chat.completions.create(**kw, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(**{**kw, "model": "gpt-4"})
    with pytest.raises(openai.AuthenticationError):
        _client(cluster["url"], "wrong-key").completions.create(model="SmolLM2-135M-Instruct", prompt="Hi",
                                                                max_tokens=2)
    r = httpx.post(f"{cluster['url']}/v1/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # the summary a router reads is behind the API key
    backend = cluster["backends"][0][1]
    assert httpx.get(f"{backend}/kv/summary").status_code == 401
    s = httpx.get(f"{backend}/kv/summary", headers={"authorization": f"Bearer {KEY}"}).json()
    again = httpx.get(f"{backend}/kv/summary", params={"since": s["version"]},
                      headers={"authorization": f"Bearer {KEY}"}).json()
    assert s["hashes"] and again["hashes"] is None and again["version"] == s["version"]


def test_a_killed_backend_is_routed_around(cluster):
    """Last: SIGKILL the backend holding prefixes; their requests (sent at once, before a poll can notice) go to the
    other backend, with the same greedy answers."""
    client = _client(cluster["url"])
    answers = {i: _ask(client, i, 2) for i in range(4)}
    victim = answers[0][0]
    proc = cluster["backends"][int(victim)][0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for i in range(4):
        backend, text = _ask(client, i, 2)
        assert backend != victim and text == answers[i][1]
    status = httpx.get(f"{cluster['url']}/router/status").json()
    assert not status["backends"][int(victim)]["healthy"]
    assert httpx.get(f"{cluster['url']}/health").status_code == 200
    stop_kvserve(cluster["backends"][1 - int(victim)][0])
    deadline = time.monotonic() + 20
    while httpx.get(f"{cluster['url']}/health").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError, match="no backend"):
        client.completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=2)
