"""One real `kvserve serve` process per test session (127.0.0.1, free port, float32, small KV pool, API key file).

Its teardown is also the graceful-shutdown test: a long stream is running when SIGTERM arrives, and it must end with
an error event and [DONE] (not a cut connection) before the process exits.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import start_kvserve

API_KEY = "test-key-0123456789"
SHUTDOWN_TIMEOUT_S = 3
MAX_NUM_SEQS = 16
MAX_QUEUED = 64


@dataclass
class ServerHandle:
    url: str
    api_key: str
    model: str
    proc: subprocess.Popen
    log_path: Path
    headers: dict = field(default_factory=dict)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def metrics(self) -> dict[str, float]:
        """{"name{label=value,...}": value} for every sample; parsing also checks the exposition format."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Metrics once nothing runs, waits or holds a KV block; fails with the last values on timeout."""
        deadline = time.monotonic() + timeout
        keys = ("kvserve:kv_cache_blocks_used{}", "kvserve:num_requests_running{}", "kvserve:num_requests_waiting{}",
                "kvserve:num_requests_in_flight{}")
        while True:
            m = self.metrics()
            if all(m[k] == 0 for k in keys):
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: { {k: m[k] for k in keys} }")
            time.sleep(0.2)


def _start(tmp: Path) -> ServerHandle:
    key_file = tmp / "api-key"
    key_file.write_text(API_KEY + "\n")
    log_path = tmp / "server.log"
    proc, url = start_kvserve(
        ["--api-key-file", str(key_file), "--dtype", "float32", "--kv-cache-memory-gb", "0.25",
         "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queued-requests", str(MAX_QUEUED), "--request-timeout", "120",
         "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S), "--log-level", "warning", "--no-access-log"],
        log_path, drop_env=("KVSERVE_API_KEY",))
    headers = {"Authorization": f"Bearer {API_KEY}"}
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    return ServerHandle(url, API_KEY, model, proc, log_path, headers)


def _check_graceful_shutdown(server: ServerHandle) -> None:
    """SIGTERM with a long stream in flight: the stream ends with an error event + [DONE], then the process exits."""
    events: list[str] = []
    first = threading.Event()

    def consume() -> None:
        body = {"model": server.model, "prompt": "Count to a thousand:", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=server.headers,
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert first.wait(60), "stream never started"
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:  # draining: health says 503 while the listener is still open, then connections are refused
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
    except httpx.TransportError:
        pass
    t.join(SHUTDOWN_TIMEOUT_S + 20)
    assert not t.is_alive(), "stream did not end after SIGTERM"
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["error"]["code"] == "service_unavailable", last
    server.proc.wait(timeout=30)
    assert server.proc.returncode in (0, -signal.SIGTERM), server.proc.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerHandle:
    handle = _start(tmp_path_factory.mktemp("kvserve-server"))
    try:
        yield handle
        _check_graceful_shutdown(handle)
    finally:
        if handle.proc.poll() is None:
            handle.proc.kill()
            handle.proc.wait(10)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=120)


@pytest.fixture
def aclient(server):
    import openai

    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0, timeout=120)
