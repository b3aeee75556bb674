"""Serving-benchmark metrics on hand-made timelines: every expected value is worked out by hand."""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import pytest

from kvserve.bench import metrics as M
from kvserve.bench.serve import Client, arrival_offsets


def timeline() -> list[M.RequestRecord]:
    return [
        # TTFT 0.5, E2EL 1.5, ITLs 0.25 0.25 0.5, TPOT (1.5 - 0.5) / 3
        M.RequestRecord("r1", 0.0, 0.5, [0.5, 0.75, 1.0, 1.5], 1.5, prompt_tokens=10, output_tokens=4,
                        cached_tokens=0, success=True, group="a"),
        # TTFT 0.25, E2EL 1.25, ITL 1.0, TPOT 1.0
        M.RequestRecord("r2", 1.0, 1.25, [1.25, 2.25], 2.25, prompt_tokens=20, output_tokens=2, cached_tokens=16,
                        success=True, group="b"),
        # TTFT 1.0, E2EL 1.0, one token: no ITL, no TPOT; the server reported no cached tokens
        M.RequestRecord("r3", 2.0, 3.0, [3.0], 3.0, prompt_tokens=5, output_tokens=1, success=True, group="b"),
        M.RequestRecord("r4", 2.5, None, [], 2.6, prompt_tokens=7, error="HTTP 500: boom", group="a"),
    ]


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-9)


def test_per_request_values():
    r1, r2, r3, r4 = timeline()
    assert r1.ttft == 0.5 and r1.e2el == 1.5 and r1.itls == [0.25, 0.25, 0.5] and r1.tpot == approx(1 / 3)
    assert r2.ttft == 0.25 and r2.tpot == 1.0 and r2.itls == [1.0]
    assert r3.tpot is None and r3.itls == []
    assert r4.ttft is None and r4.tpot is None


def test_summary_exact():
    s = M.summarize(timeline(), duration=4.0)
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["duration"] == 4.0
    assert s["total_input_tokens"] == 35 and s["total_output_tokens"] == 7  # completed requests only
    assert s["total_cached_tokens"] == 16
    assert s["prefix_cache_hit_rate"] == approx(16 / 30)  # over the requests that reported cached tokens
    assert s["request_throughput"] == 0.75
    assert s["output_throughput"] == 1.75
    assert s["total_token_throughput"] == 10.5
    assert s["request_goodput"] is None and s["good_requests"] is None
    # TTFT ms: 500, 250, 1000 -> sorted 250, 500, 1000
    assert s["mean_ttft_ms"] == approx(1750 / 3)
    assert s["median_ttft_ms"] == approx(500) and s["p50_ttft_ms"] == approx(500)
    assert s["p90_ttft_ms"] == approx(900)  # h = 1.8: 500 + 0.8 * 500
    assert s["p99_ttft_ms"] == approx(990)  # h = 1.98
    assert s["std_ttft_ms"] == approx(math.sqrt(((500 - 1750 / 3) ** 2 + (250 - 1750 / 3) ** 2 +
                                                 (1000 - 1750 / 3) ** 2) / 3))
    assert s["max_ttft_ms"] == approx(1000)
    # TPOT ms: 333.33, 1000
    assert s["mean_tpot_ms"] == approx(2000 / 3)
    assert s["median_tpot_ms"] == approx(2000 / 3)
    assert s["p90_tpot_ms"] == approx(1000 / 3 + 0.9 * 2000 / 3)
    assert s["p99_tpot_ms"] == approx(1000 / 3 + 0.99 * 2000 / 3)
    # ITL ms: 250, 250, 500, 1000 (all gaps pooled)
    assert s["mean_itl_ms"] == approx(500)
    assert s["median_itl_ms"] == approx(375)  # h = 1.5
    assert s["p90_itl_ms"] == approx(850)  # h = 2.7
    assert s["p99_itl_ms"] == approx(985)  # h = 2.97
    assert s["max_itl_ms"] == approx(1000)
    # E2EL ms: 1500, 1250, 1000
    assert s["mean_e2el_ms"] == approx(1250) and s["median_e2el_ms"] == approx(1250)
    assert s["p90_e2el_ms"] == approx(1450) and s["p99_e2el_ms"] == approx(1495)
    assert s["errors"] == {"HTTP 500": 1}


def test_default_duration_is_first_send_to_last_end():
    s = M.summarize(timeline())
    assert s["duration"] == 3.0
    assert s["request_throughput"] == 1.0


def test_goodput():
    # TTFT <= 600 and TPOT <= 500: r1 only (r2's TPOT is 1000, r3's TTFT is 1000)
    s = M.summarize(timeline(), duration=4.0, slo_ttft_ms=600, slo_tpot_ms=500)
    assert s["good_requests"] == 1 and s["request_goodput"] == 0.25
    assert s["slo_ttft_ms"] == 600 and s["slo_tpot_ms"] == 500
    # limits are inclusive; a one-token request has no TPOT and passes the TPOT SLO; failures never count
    s = M.summarize(timeline(), duration=4.0, slo_ttft_ms=1000, slo_tpot_ms=1000)
    assert s["good_requests"] == 3 and s["request_goodput"] == 0.75
    s = M.summarize(timeline(), duration=4.0, slo_e2el_ms=1250)
    assert s["good_requests"] == 2


def test_groups():
    s = M.summarize(timeline(), duration=4.0)
    a, b = s["groups"]["a"], s["groups"]["b"]
    assert a["completed"] == 1 and a["failed"] == 1 and a["max_itl_ms"] == approx(500)
    assert b["completed"] == 2 and b["max_itl_ms"] == approx(1000) and b["median_ttft_ms"] == approx(625)
    assert "groups" not in a


def test_empty_and_all_failed():
    s = M.summarize([], duration=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    s = M.summarize([M.RequestRecord("x", 0.0, end_time=1.0, error="timeout: no end")])
    assert s["failed"] == 1 and s["output_throughput"] == 0.0 and s["max_e2el_ms"] is None
    assert "Failed requests" in M.report_text(s)


def test_percentile_matches_numpy():
    import numpy as np  # a dependency of the project (torch, gguf), always installed
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        vals = [rng.random() * 100 for _ in range(n)]
        for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
            assert M.percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)), rel=1e-12)
    assert M.percentile([], 50) is None
    with pytest.raises(ValueError):
        M.percentile([1.0], 101)


def test_record_roundtrip_and_report():
    r = timeline()[0]
    d = r.to_dict()
    assert "output_text" not in d and json.loads(json.dumps(d)) == d
    assert M.RequestRecord.from_dict(d) == r
    text = M.report_text(M.summarize(timeline(), 4.0, slo_ttft_ms=600, slo_tpot_ms=500))
    assert "Request goodput (req/s):" in text and "0.25" in text and "group b" in text


def test_arrival_offsets():
    assert arrival_offsets(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    a = arrival_offsets(5, 2.0, 1.0, random.Random(7))
    assert a == arrival_offsets(5, 2.0, 1.0, random.Random(7)) and a[0] == 0.0
    assert all(x < y for x, y in zip(a, a[1:]))
    many = arrival_offsets(20001, 4.0, 1.0, random.Random(1))
    assert many[-1] / 20000 == pytest.approx(0.25, rel=0.03)  # mean gap 1 / rate
    bursty = arrival_offsets(20001, 4.0, 0.5, random.Random(1))
    assert bursty[-1] / 20000 == pytest.approx(0.25, rel=0.05)  # same mean, burstier gaps
    with pytest.raises(ValueError):
        arrival_offsets(2, 0.0, 1.0, random.Random(0))


# ================================================================================================== SSE parsing
def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def run_stream(body: bytes, status: int = 200, endpoint: str = "chat") -> M.RequestRecord:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))

    async def go():
        client = Client("http://test/v1", "key", 10, transport=transport)
        rec = M.RequestRecord("t", 0.0)
        await client.stream(endpoint, {"model": "m"}, rec, 0.0)
        await client.close()
        return rec

    return asyncio.run(go())


def test_stream_chat_with_usage():
    rec = run_stream(sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},  # role only: no token
                         {"choices": [{"delta": {"content": "Hel"}}]},
                         {"choices": [{"delta": {"content": "lo"}, "finish_reason": None}]},
                         {"choices": [{"delta": {}, "finish_reason": "length"}]},
                         {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3,
                                                   "prompt_tokens_details": {"cached_tokens": 8}}},
                         b"[DONE]"))
    assert rec.success and rec.error is None
    assert len(rec.token_times) == 2 and rec.first_token_time == rec.token_times[0]
    assert rec.output_text == "Hello"
    assert (rec.prompt_tokens, rec.output_tokens, rec.cached_tokens) == (9, 3, 8)  # usage wins over chunk counts
    assert rec.end_time >= rec.token_times[-1] >= rec.send_time


def test_stream_completions_without_usage():
    rec = run_stream(sse({"choices": [{"text": "a"}]}, {"choices": [{"text": "b", "finish_reason": "stop"}]},
                         b"[DONE]"), endpoint="completions")
    assert rec.success and rec.output_tokens == 2 and rec.cached_tokens is None


def test_stream_failures_are_recorded():
    rec = run_stream(b'{"error": {"message": "queue full"}}', status=429)
    assert not rec.success and rec.error.startswith("HTTP 429")
    rec = run_stream(sse({"choices": [{"delta": {"content": "x"}}]},
                         {"error": {"message": "shutting down", "code": "service_unavailable"}}, b"[DONE]"))
    assert not rec.success and "shutting down" in rec.error
    rec = run_stream(sse({"choices": [{"delta": {"content": "x"}}]}))  # cut: no finish_reason, no [DONE]
    assert not rec.success and "without" in rec.error
    rec = run_stream(sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}, b"[DONE]"))
    assert not rec.success and rec.error == "no token received"


def test_several_base_urls_alternate_conversation_turns():
    """`--base-url A,B`: turn k of a conversation goes to URL k mod 2, other requests round robin."""
    import argparse

    from kvserve.bench import workloads as W
    from kvserve.bench.serve import Runner

    hosts = []

    def answer(request):
        hosts.append((request.url.host, request.url.path))
        return httpx.Response(200, content=sse({"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]},
                                                b"[DONE]"))

    turns = [W.BenchRequest(f"c0-t{t}", [{"role": "user", "content": f"q{t}"}], 4, 2, conversation=0, turn=t)
             for t in range(3)]
    args = argparse.Namespace(max_concurrency=None, timeout=10, seed=0, request_rate=float("inf"), burstiness=1.0,
                              no_progress=True, workload="multi-turn", label="t", endpoint="chat", model="m",
                              ignore_eos=False, min_tokens=False, temperature=0.0, top_p=None, extra_body={})

    async def go():
        client = Client("http://a/v1, http://b", None, 10, transport=httpx.MockTransport(answer))
        records, _ = await Runner(args, turns, None, client).run()
        await client.close()
        return records

    records = asyncio.run(go())
    assert all(r.success for r in records)
    assert hosts == [("a", "/v1/chat/completions"), ("b", "/v1/chat/completions"), ("a", "/v1/chat/completions")]
