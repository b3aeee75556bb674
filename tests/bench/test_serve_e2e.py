"""`kvserve bench serve` end to end against a real `kvserve serve` process (127.0.0.1, free port), then
`kvserve bench compare` on its results: valid JSON, sane numbers, PNGs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving import start_kvserve, stop_kvserve

API_KEY = "bench-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("bench-server") / "server.log"
    proc, url = start_kvserve(["--api-key", API_KEY, "--dtype", "float32", "--kv-cache-memory-gb", "0.25",
                               "--max-num-seqs", "8", "--log-level", "warning", "--no-access-log",
                               "--enable-prompt-tokens-details"], log_path, 240)
    try:
        yield url
    finally:
        stop_kvserve(proc, 30)


def strict_json(path: Path) -> dict:
    def no_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constant)


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_sharegpt_like_cli(server, tmp_path):
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    cmd = [sys.executable, "-m", "kvserve.cli", "bench", "serve", "--base-url", server + "/v1", "--api-key", API_KEY,
           "--workload", "sharegpt-like", "--num-requests", "6", "-W", "max_input=96", "-W", "min_output=4",
           "-W", "max_output=8", "--request-rate", "20", "--seed", "3", "--slo-ttft-ms", "60000",
           "--slo-tpot-ms", "60000", "--label", "kvserve-test", "--out", str(out), "--plot", str(png),
           "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Successful requests:" in p.stdout and "Median TTFT (ms):" in p.stdout
    res = strict_json(out)
    c, s, reqs = res["config"], res["summary"], res["requests"]
    assert c["label"] == "kvserve-test" and c["workload"] == "sharegpt-like" and c["seed"] == 3
    assert c["model"] == "SmolLM2-135M-Instruct" and c["request_rate"] == 20.0
    assert s["completed"] == 6 and s["failed"] == 0 and len(reqs) == 6
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])  # generous SLOs: every request is good
    assert s["short_outputs"] == 0  # ignore_eos: exactly max_tokens each
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in reqs)
    for key in ("mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms",
                "p99_e2el_ms", "output_throughput", "total_token_throughput"):
        assert s[key] > 0, key
    for r in reqs:
        assert r["success"] and r["error"] is None
        assert r["send_time"] <= r["first_token_time"] <= r["end_time"]
        assert r["output_tokens"] == r["max_tokens"]
        assert len(r["token_times"]) >= 1 and len(r["token_times"]) <= r["output_tokens"]
        assert r["token_times"] == sorted(r["token_times"])
        assert r["prompt_tokens"] > 0 and r["cached_tokens"] is not None
    assert is_png(png)


def test_serve_multi_turn_then_compare(server, tmp_path):
    from kvserve.bench import compare, serve

    out = tmp_path / "mt.json"
    rc = serve.main(["--base-url", server, "--api-key", API_KEY, "--workload", "multi-turn", "--num-requests", "3",
                     "-W", "turns_min=3", "-W", "turns_max=3", "-W", "user_max=48", "-W", "output_min=4",
                     "-W", "output_max=6", "--max-concurrency", "2", "--out", str(out), "--no-progress",
                     "--save-text"])
    assert rc == 0
    res = strict_json(out)
    reqs = res["requests"]
    assert res["config"]["endpoint"] == "chat" and res["config"]["label"] == "kvserve"  # /v1/models owned_by
    assert [r["turn"] for r in reqs] == [0, 1, 2] and all(r["success"] for r in reqs)
    # every turn resends the history with the real answers: prompts grow and hit the prefix cache
    assert reqs[0]["prompt_tokens"] < reqs[1]["prompt_tokens"] < reqs[2]["prompt_tokens"]
    assert reqs[1]["prompt_tokens"] > reqs[0]["prompt_tokens"] + reqs[0]["output_tokens"]
    assert reqs[2]["cached_tokens"] > 0 and reqs[1]["cached_tokens"] > 0
    assert all(r["output_text"] for r in reqs)
    assert res["summary"]["total_cached_tokens"] > 0

    # the same run relabelled at another rate: compare draws one table and one PNG
    other = dict(res, config=dict(res["config"], label="other", request_rate=2.0))
    second = tmp_path / "other.json"
    second.write_text(json.dumps(other))
    table, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert compare.main([str(out), str(second), "--out", str(table), "--plot", str(png)]) == 0
    text = table.read_text()
    assert "| metric | kvserve @ inf c=2 | other @ 2/s c=2 |" in text
    assert "Output token throughput (tok/s)" in text and "P99 ITL (ms)" in text
    assert is_png(png)


def test_failures_are_counted_not_fatal(server, tmp_path):
    from kvserve.bench import serve

    out = tmp_path / "bad.json"
    # max_tokens beyond the context: the server answers 400 for each request; the run still completes
    rc = serve.main(["--base-url", server, "--api-key", API_KEY, "--workload", "sharegpt-like", "--num-requests",
                     "2", "-W", "max_input=40", "-W", "min_output=100000", "-W", "max_output=100000",
                     "-W", "output_median=100000", "--no-test-request", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = strict_json(out)["summary"]
    assert s["completed"] == 0 and s["failed"] == 2 and s["errors"] == {"HTTP 400": 2}
