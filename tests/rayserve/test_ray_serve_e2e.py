"""`kvserve ray-serve` on a local Ray cluster of 2 CPUs with 2 engine replicas of 1 CPU each (docs/scaleout.md),
driven over 127.0.0.1 with the official openai client and httpx: answers equal the engine's own, errors and the API
key pass through, Ray Serve's request router sends a prompt to the replica holding its prefix even when that replica
is busier, a fresh prompt to the idle one, and a replica killed mid-run costs clean errors only, after which Ray
replaces it and the app serves on."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from kvserve.engine.llm_engine import LLM
from kvserve.sampling import SamplingParams
from tests.rayserve.conftest import ray_serve

KEY = "ray-test-key-7"
MODEL = "SmolLM2-135M-Instruct"
SYSTEMS = [f"You are assistant number {i}. " + "Answer politely, briefly and with care for the facts. " * 12
           for i in range(4)]
REPLICA = "x-kvserve-replica"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray")
    (tmp / "key").write_text(KEY + "\n")
    with ray_serve(["--replicas", "2", "--cpus-per-replica", "1", "--api-key-file", str(tmp / "key"),
                    "--routing-stats-period", "0.2", "--health-check-period", "1"], tmp / "ray-serve.log") as url:
        yield url


def _post(url: str, body: dict, key: str = KEY) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_answers_errors_and_key_are_those_of_kvserve_serve(app, make_engine):
    prompts = [SYSTEMS[2] + "Question: what is your number?", "The three primary colours are"]
    local = LLM.from_engine(make_engine())
    expected = [o.outputs[0].text for o in local.generate(prompts, SamplingParams(max_tokens=12, temperature=0))]
    got = [_post(app, {"prompt": p, "max_tokens": 12, "temperature": 0}).json()["choices"][0]["text"]
           for p in prompts]
    assert got == expected

    client = openai.OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0, timeout=120)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=8, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=8, temperature=0)
    assert text == whole.choices[0].message.content and text
    assert [m.id for m in client.models.list().data] == [MODEL]

    r = _post(app, {"prompt": "hi", "max_tokens": -3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = _post(app, {"prompt": "hi"}, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{app}/v1/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_prefix_beats_load_and_fresh_prompts_go_to_the_idle_replica(app):
    first = _post(app, {"prompt": SYSTEMS[0] + "Q: one?", "max_tokens": 2, "temperature": 0})
    assert first.status_code == 200
    holder = first.headers[REPLICA]
    time.sleep(1.5)  # its prefix-cache summary reaches the router (stats every 0.2 s)
    with httpx.stream("POST", f"{app}/v1/completions", timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": SYSTEMS[0] + "Q: a long story?", "max_tokens": 64,
                            "temperature": 0, "stream": True, "ignore_eos": True}) as busy:
        assert busy.headers[REPLICA] == holder  # the prefix is there
        chunks = busy.iter_raw()
        next(chunks)  # streaming: the holder is now the busier replica
        same = _post(app, {"prompt": SYSTEMS[0] + "Q: two?", "max_tokens": 2, "temperature": 0})
        fresh = _post(app, {"prompt": SYSTEMS[3] + "Q: three?", "max_tokens": 2, "temperature": 0})
        for _ in chunks:
            pass
    # Ray's default power-of-two router would send both to the idle replica
    assert same.headers[REPLICA] == holder
    assert fresh.headers[REPLICA] != holder


def _replica_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:kvserve:engine" in line]


def _stream(url: str, i: int) -> str:
    return _stream_from(url, i)[0]


def _stream_from(url: str, i: int) -> tuple[str, str | None]:
    """('ok' for a whole stream, 'error' for one that ended with an error event or a clean failure status; the
    replica that answered)."""
    replica = None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=90, headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "prompt": f"Story {i}: " + SYSTEMS[i % 4], "max_tokens": 48,
                                "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            replica = r.headers.get(REPLICA)
            if r.status_code != 200:
                return ("error" if r.status_code in (500, 503) else f"status {r.status_code}"), replica
            body = b"".join(r.iter_raw()).decode()
    except httpx.HTTPError as e:
        return f"transport error {e!r}", replica
    if '"error"' in body:
        return "error", replica
    # every token arrived: the last chunk ends the choice at max_tokens (several tokens may share a chunk)
    ok = body.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in body
    return ("ok" if ok else f"cut {body[-200:]!r}"), replica


def test_a_killed_replica_costs_clean_errors_and_is_replaced(app):
    pids = _replica_pids()
    assert len(pids) == 2, pids
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_stream, app, i) for i in range(4)]
        time.sleep(2.0)  # all four are streaming, spread over both replicas
        os.kill(pids[0], signal.SIGKILL)
        results = [f.result(timeout=100) for f in futures]
    assert all(r in ("ok", "error") for r in results), results
    assert "ok" in results  # the other replica's streams went on
    deadline = time.monotonic() + 120
    k = 4
    while True:  # Ray replaces the dead replica; meanwhile requests go to the live one
        r = _post(app, {"prompt": "The three primary colours are", "max_tokens": 4, "temperature": 0})
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200 and len(_replica_pids()) == 2:
            # once the replacement serves, two streams at once with prompts cached nowhere go to two replicas
            with ThreadPoolExecutor(2) as pool:
                after = list(pool.map(lambda i: _stream_from(app, i), (k, k + 1)))
            k += 2
            assert [res for res, _ in after] == ["ok", "ok"], after
            if len({replica for _, replica in after}) == 2:
                break
        assert time.monotonic() < deadline, "Ray did not bring a replacement replica into service in 120 s"
        time.sleep(1.0)
    assert httpx.get(f"{app}/health", timeout=30).is_success
