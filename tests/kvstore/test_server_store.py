"""`kvserve serve --kv-store disk:...` as a user runs it: a long prompt's KV written at shutdown survives a restart,
the restarted server answers the same with the prompt loaded (usage.cached_tokens), and /metrics shows the tier."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from kvserve.kvstore.redis_server import free_port

pytestmark = pytest.mark.slow


def start_server(port: int, store: str, log_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--kv-cache-memory-gb", "0.25", "--kv-store", store, "--log-level", "warning",
           "--no-access-log"]
    env = dict(os.environ, KVSERVE_NO_TQDM="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {open(log_path).read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, open(log_path).read()
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_disk_store_survives_a_server_restart(tmp_path):
    store = f"disk:{tmp_path / 'kv'}:1GB:zstd"
    prompt = "The harbour master kept a handwritten log of every repair since the day she took the job. " * 70
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    port = free_port()
    proc = start_server(port, store, tmp_path / "server.log")
    try:
        first = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300).json()
        assert first["usage"]["prompt_tokens"] > 1024
    finally:
        stop_server(proc)  # shutdown flushes the store's writer
    assert len([f for d in (tmp_path / "kv").iterdir() for f in d.iterdir() if f.suffix == ".kv"]) >= 4

    port = free_port()
    proc = start_server(port, store, tmp_path / "server.log")
    try:
        again = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=300).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1024
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        hits = [line for line in metrics.splitlines() if line.startswith("kvserve:kv_store_hits_total{")]
        assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 4 and 'codec="zstd"' in hits[0]
    finally:
        stop_server(proc)
