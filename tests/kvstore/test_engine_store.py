"""The tiered KV store end to end on the real SmolLM2 weights (float32): instances sharing KV through a real
redis-server, the disk tier across restarts, every kind of bad entry detected and recomputed, Redis killed mid-run,
and the store's numbers in /metrics."""

from __future__ import annotations

import glob
import os

import pytest

from kvserve.kvstore.entry import EntryIdentity, pack
from kvserve.sampling import SamplingParams

from tests.kvstore.conftest import start_redis

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT_TOKENS = 1100  # four full 256-token chunks + a tail


@pytest.fixture(scope="module")
def prompt(fp32_parts):
    _, tok, _ = fp32_parts
    text = ("The harbour master kept a handwritten log of every repair since the day she took the job. " * 80)
    ids = tok.encode(text)
    assert len(ids) >= PROMPT_TOKENS
    return ids[:PROMPT_TOKENS]


@pytest.fixture(scope="module")
def reference(make_engine, prompt):
    """Greedy tokens with no store at all: what every path below must reproduce."""
    return generate(make_engine(), prompt)


def generate(engine, ids, params=GREEDY, salt=None):
    rid = engine.add_request(None, {"prompt_token_ids": ids}, params, cache_salt=salt)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                return out.outputs[0].token_ids


def stats(engine):
    s = engine.stats()
    return s.prompt_tokens_computed, s.prompt_tokens_loaded, s.kv_store


def test_two_instances_share_kv_through_redis(make_engine, prompt, reference, redis_server):
    url = f"{redis_server.url}?timeout=5"
    a = make_engine(kv_store=url)
    b = make_engine(kv_store=url)  # another instance: its own pool, its own store client
    try:
        assert generate(a, prompt) == reference
        assert a.core.kv_store.flush(30)
        assert stats(a)[2].counters["chunks_saved"] == 4
        assert generate(b, prompt) == reference
        computed, loaded, store = stats(b)
        assert loaded == 1024 and computed == PROMPT_TOKENS - 1024  # 76 of 1100 prompt tokens computed
        tier = store.tiers[0]
        assert tier.hits == 4 and tier.rejected == 0 and tier.bytes_out > 4 * 256 * 23040 * 2
    finally:
        a.close()
        b.close()


def test_disk_tier_serves_after_a_restart(make_engine, prompt, reference, tmp_path):
    spec = f"disk:{tmp_path}:1GB"
    first = make_engine(kv_store=spec)
    assert generate(first, prompt) == reference
    first.close()  # flushes the writer
    assert len(glob.glob(f"{tmp_path}/*/*.kv")) == 4
    restarted = make_engine(kv_store=spec)
    try:
        assert generate(restarted, prompt) == reference
        assert stats(restarted)[1] == 1024
    finally:
        restarted.close()


def _entry_files(engine, prompt_ids, salt=None):
    """The four chunk files of `prompt_ids` in chunk order."""
    from kvserve.core.request import Request

    r = Request("probe", prompt_ids, GREEDY, 16, cache_salt=salt)
    tier = engine.core.kv_store.tiers[0]
    hashes = [r.block_hashes[(k + 1) * 16 - 1] for k in range(4)]
    return hashes, [tier.file_path(engine.core.kv_store.key(h)) for h in hashes]


def test_bad_entries_are_detected_dropped_and_recomputed(make_engine, prompt, reference, tmp_path):
    spec = f"disk:{tmp_path}:1GB"
    writer = make_engine(kv_store=spec)
    assert generate(writer, prompt) == reference
    hashes, files = _entry_files(writer, prompt)
    writer.close()

    def tamper_and_run(mutate, expect_loaded, reason):
        mutate()
        engine = make_engine(kv_store=spec)
        try:
            assert generate(engine, prompt) == reference
            computed, loaded, store = stats(engine)
            assert loaded == expect_loaded and computed == PROMPT_TOKENS - expect_loaded
            assert store.rejected == {reason: 1}
            assert store.tiers[0].rejected == 1
        finally:
            engine.close()  # writes the recomputed chunk back

    def flip_a_payload_byte():
        blob = bytearray(open(files[3], "rb").read())
        blob[-1000] ^= 0x40
        open(files[3], "wb").write(bytes(blob))

    def truncate():
        blob = open(files[2], "rb").read()
        open(files[2], "wb").write(blob[: len(blob) // 2])

    def foreign_model():
        blob = open(files[1], "rb").read()
        header_len = int.from_bytes(blob[6:10], "little")
        payload = blob[10 + header_len:]
        shape = (30, 2, 256, 3, 64)
        open(files[1], "wb").write(pack(EntryIdentity("other-model@123", "float32", shape, hashes[1].hex()),
                                        "none", payload))

    tamper_and_run(flip_a_payload_byte, 768, "corrupt")
    tamper_and_run(truncate, 512, "truncated")
    tamper_and_run(foreign_model, 256, "foreign_model")

    # an entry copied under another salt's key: the header's prefix hash (which covers the salt) gives it away
    salted_hashes, salted_files = _entry_files(writer, prompt, salt="tenant-b")
    os.makedirs(os.path.dirname(salted_files[0]), exist_ok=True)
    open(salted_files[0], "wb").write(open(files[0], "rb").read())
    engine = make_engine(kv_store=spec)
    try:
        assert generate(engine, prompt, salt="tenant-b") == reference
        computed, loaded, store = stats(engine)
        assert loaded == 0 and store.rejected == {"identity": 1}
    finally:
        engine.close()


def test_killing_redis_mid_run_leaves_every_request_answered(make_engine, fp32_parts, reference,
                                                             prompt):
    server = start_redis()
    engine = make_engine(kv_store=f"{server.url}?timeout=0.3")
    plain = make_engine()
    _, tok, _ = fp32_parts
    prompts = [prompt] + [tok.encode(f"Request {i}: " + "tell me about paged attention and KV caches. " * (20 + 9 * i))
                          for i in range(5)]
    try:
        expected = [generate(plain, p) for p in prompts]
        assert generate(engine, prompts[0]) == reference
        assert engine.core.kv_store.flush(30)
        engine.reset_prefix_cache()
        ids = [engine.add_request(None, {"prompt_token_ids": p}, GREEDY) for p in prompts]
        results, steps = {}, 0
        while len(results) < len(ids):
            if steps == 3:
                server.stop()  # Redis dies while requests are fetching, computing and saving
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out.outputs[0].token_ids
            steps += 1
            assert steps < 2000
        assert [results[i] for i in ids] == expected
        late = generate(engine, prompts[1])  # after the crash: the tier is skipped, the request still succeeds
        assert late == expected[1]
        tier = stats(engine)[2].tiers[0]
        assert tier.errors >= 1 and not tier.healthy
        assert engine.stats().kv_blocks_used == 0
    finally:
        server.stop()
        engine.close()


def test_auto_policy_loads_only_what_beats_recomputing(make_engine, prompt, reference):
    """The cost model with its prefill rate pinned: recomputing at a huge rate beats any load, so the fetch stops at
    the first chunk; at one token per second every stored chunk is worth loading."""
    engine = make_engine(kv_store="memory:64MB", kv_store_load="auto")
    try:
        assert generate(engine, prompt) == reference
        assert engine.core.kv_store.flush(30)
        cost = engine.core.kv_store.cost

        engine.reset_prefix_cache()
        cost.rates["prefill"] = 1e12
        computed_before, loaded_before, _ = stats(engine)
        assert generate(engine, prompt) == reference
        computed, loaded, store = stats(engine)
        assert loaded == loaded_before and computed - computed_before == PROMPT_TOKENS
        assert store.counters["decisions_recompute"] == 1 and store.counters.get("decisions_load", 0) == 0

        engine.reset_prefix_cache()
        cost.rates["prefill"] = 1.0
        assert generate(engine, prompt) == reference
        computed2, loaded2, store = stats(engine)
        assert loaded2 - loaded == 1024 and computed2 - computed == PROMPT_TOKENS - 1024
        assert store.counters["decisions_load"] == 4
    finally:
        engine.close()


def test_store_numbers_reach_prometheus(make_engine, prompt, tmp_path):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from kvserve.server.metrics import ServerMetrics

    engine = make_engine(kv_store=f"memory:64MB:int8,disk:{tmp_path}:1GB:int4")
    try:
        generate(engine, prompt)
        engine.core.kv_store.flush(30)
        engine.reset_prefix_cache()
        generate(engine, prompt)
        metrics = ServerMetrics("smollm2")
        metrics.engine.snapshot = engine.stats()
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
        hits = {s.labels["tier"]: s.value for s in families["kvserve:kv_store_hits"].samples}
        assert hits == {"memory": 4.0, f"disk:{tmp_path}": 0.0}
        used = {s.labels["codec"]: s.value for s in families["kvserve:kv_store_used_bytes"].samples}
        assert 0 < used["int4"] < used["int8"] < 4 * 256 * 23040 * 2  # fp32 KV, compressed in both tiers
        assert families["kvserve:prompt_tokens_loaded"].samples[0].value == 1024
        load = [s for s in families["kvserve:kv_store_load_seconds"].samples if s.name.endswith("_count")]
        assert {s.labels["tier"]: s.value for s in load}["memory"] == 4
    finally:
        engine.close()


def test_a_hung_redis_costs_reuse_not_time(make_engine, prompt, reference):
    """A Redis that stops answering (SIGSTOP) is a slow tier: its socket timeout marks it down, the request
    recomputes, and once Redis answers again the tier is retried after its backoff."""
    import signal
    import time

    server = start_redis()
    engine = make_engine(kv_store=f"{server.url}?timeout=0.3")
    try:
        assert generate(engine, prompt) == reference
        assert engine.core.kv_store.flush(30)
        engine.reset_prefix_cache()
        started = time.monotonic()
        plain_ids = prompt[::-1]  # same length, nothing stored: the recompute time for comparison
        generate(engine, plain_ids)
        recompute_s = time.monotonic() - started
        engine.reset_prefix_cache()

        os.kill(server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        assert generate(engine, prompt) == reference
        assert time.monotonic() - started < recompute_s + 2.0  # one timed-out lookup, no waiting on Redis after
        assert stats(engine)[2].tiers[0].errors >= 1
        assert "Timeout" in engine.core.kv_store.tiers[0].last_error

        os.kill(server.proc.pid, signal.SIGCONT)
        time.sleep(engine.core.kv_store.tiers[0].BACKOFF_START * 2 + 0.5)  # past the backoff (it may have doubled)
        engine.reset_prefix_cache()
        loaded_before = stats(engine)[1]
        assert generate(engine, prompt) == reference
        assert stats(engine)[1] - loaded_before == 1024 and stats(engine)[2].tiers[0].healthy
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
        engine.close()
