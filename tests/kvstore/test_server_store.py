"""`kvserve serve --kv-store disk:...` as a user runs it: a long prompt's KV written at shutdown survives a restart,
the restarted server answers the same with the prompt loaded (usage.cached_tokens), and /metrics shows the tier."""

from __future__ import annotations

import httpx
import pytest

from tests.serving import start_kvserve, stop_kvserve

pytestmark = pytest.mark.slow


# --kv-store-load always: the test checks what is loaded, not how fast this machine happens to be at that moment
SERVE_ARGS = ["--dtype", "float32", "--kv-cache-memory-gb", "0.25", "--log-level", "warning", "--no-access-log",
              "--kv-store-load", "always", "--enable-prompt-tokens-details"]


def test_disk_store_survives_a_server_restart(tmp_path):
    store = f"disk:{tmp_path / 'kv'}:1GB:zstd"
    prompt = "The harbour master kept a handwritten log of every repair since the day she took the job. " * 70
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    proc, url = start_kvserve(SERVE_ARGS + ["--kv-store", store], tmp_path / "server.log", 240)
    try:
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=300).json()
        assert first["usage"]["prompt_tokens"] > 1024
    finally:
        stop_kvserve(proc)  # shutdown flushes the store's writer
    assert len([f for d in (tmp_path / "kv").iterdir() for f in d.iterdir() if f.suffix == ".kv"]) >= 4

    proc, url = start_kvserve(SERVE_ARGS + ["--kv-store", store], tmp_path / "server.log", 240)
    try:
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=300).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 1024
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        hits = [line for line in metrics.splitlines() if line.startswith("kvserve:kv_store_hits_total{")]
        assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 4 and 'codec="zstd"' in hits[0]
    finally:
        stop_kvserve(proc)
