"""Tiered KV store parts without the model: spec parsing, codecs, entry verification, each tier (Redis real)."""

from __future__ import annotations

import errno
import os
import time

import pytest
import torch

from kvserve.config import ConfigError
from kvserve.kvstore import codec as codecs
from kvserve.kvstore.config import TierSpec, parse_kv_store, parse_size
from kvserve.kvstore.entry import EntryError, EntryIdentity, pack, unpack
from kvserve.kvstore.redis_server import free_port
from kvserve.kvstore.store import CostModel
from kvserve.kvstore.tiers import DiskTier, MemoryTier, RedisTier

SHAPE = (4, 2, 32, 3, 64)  # (layers, K|V, tokens, kv_heads, head_dim)


def kv_chunk(seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    x[:, 0, :, :, 5] *= 12  # an outlier channel in K, as real models have
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------- spec
def test_parse_spec_from_the_issue():
    cfg = parse_kv_store("memory:4GB,disk:/tmp/kv:20GB:int4,redis://127.0.0.1:6379?codec=int8&cap=1G&timeout=0.2")
    mem, disk, red = cfg.tiers
    assert (mem.kind, mem.capacity_bytes, mem.codec) == ("memory", 4 << 30, "none")
    assert (disk.kind, disk.path, disk.capacity_bytes, disk.codec) == ("disk", "/tmp/kv", 20 << 30, "int4")
    assert (red.kind, red.url, red.capacity_bytes, red.codec, red.timeout_s) == (
        "redis", "redis://127.0.0.1:6379", 1 << 30, "int8", 0.2)
    assert cfg.chunk_size == 256
    assert parse_size("512MB") == 512 << 20 and parse_size("100") == 100 and parse_size("1.5k") == 1536


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("memory", "memory:SIZE"), ("memory:lots", "bad size"), ("memory:1GB:lzma", "unknown codec"),
    ("disk:/x", "disk:PATH:SIZE"), ("tape:1GB", "unknown KV store tier"), ("memory:1G,memory:2G", "at most one"),
    ("redis://h:1?color=red", "unknown option"), ("memory:0", "positive"),
])
def test_bad_specs_give_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_kv_store(spec)


def test_unknown_load_policy_is_named():
    with pytest.raises(ConfigError, match="load policy must be one of auto, always, got 'sometimes'"):
        parse_kv_store("memory:1GB", load_policy="sometimes")


def test_chunk_size_must_be_a_multiple_of_the_block_size():
    with pytest.raises(ConfigError, match="multiple of the block size"):
        parse_kv_store("memory:1GB", chunk_size=100).check_block_size(16)


# ---------------------------------------------------------------------------------------------------- codecs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_lossless_codecs_are_bit_exact(codec, dtype):
    x = kv_chunk(1, dtype)
    y = codecs.decode(codecs.encode(x, codec), codec, SHAPE, dtype)
    assert y.dtype == dtype and torch.equal(x, y)


@pytest.mark.parametrize("codec, max_rel", [("int8", 1 / 127), ("int4", 1 / 7)])
def test_quantized_codecs_stay_within_half_a_step(codec, max_rel):
    x = kv_chunk(2, torch.float32)
    y = codecs.decode(codecs.encode(x, codec), codec, SHAPE, torch.float32)
    # symmetric quantization: error <= half a step of the group's scale (absmax / levels), fp16 scale rounding aside
    group = x.shape[-1] if codec == "int8" else codecs.INT4_GROUP
    absmax = x.abs().unflatten(-1, (-1, group)).amax(-1, keepdim=True).expand(*x.shape[:-1], -1, group).flatten(-2)
    assert ((x - y).abs() <= absmax * max_rel * 0.5 * 1.01 + 1e-6).all()


def test_int4_is_smaller_than_int8_which_is_smaller_than_raw():
    x = kv_chunk(3)
    sizes = {c: len(codecs.encode(x, c)) for c in ("none", "int8", "int4")}
    assert sizes["none"] > 1.8 * sizes["int8"] and sizes["int8"] > 1.3 * sizes["int4"]


@pytest.mark.parametrize("codec", ["none", "zstd", "int8", "int4"])
def test_decode_rejects_a_payload_of_the_wrong_size(codec):
    payload = codecs.encode(kv_chunk(4), codec)
    with pytest.raises(codecs.CodecError):
        codecs.decode(payload[:-7], codec, SHAPE, torch.bfloat16)
    other = (SHAPE[0], 2, SHAPE[2] * 2, SHAPE[3], SHAPE[4])
    with pytest.raises(codecs.CodecError):
        codecs.decode(payload, codec, other, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------- entries
IDENT = EntryIdentity("smollm2@abc", "bfloat16", SHAPE, "11" * 32)


def test_entry_round_trip_and_every_rejection():
    payload = codecs.encode(kv_chunk(5), "int8")
    blob = pack(IDENT, "int8", payload)
    codec, got = unpack(blob, IDENT)
    assert codec == "int8" and bytes(got) == payload

    def reason(b: bytes, ident: EntryIdentity = IDENT) -> str:
        with pytest.raises(EntryError) as e:
            unpack(b, ident)
        return e.value.reason

    flipped = bytearray(blob)
    flipped[-100] ^= 0x01
    assert reason(bytes(flipped)) == "corrupt"
    assert reason(blob[:-1]) == "truncated"
    assert reason(blob[:10]) == "truncated"
    assert reason(b"XXXX" + blob[4:]) == "corrupt"
    assert reason(pack(EntryIdentity("llama@def", "bfloat16", SHAPE, "11" * 32), "int8", payload)) == "foreign_model"
    assert reason(pack(EntryIdentity("smollm2@abc", "bfloat16", SHAPE, "22" * 32), "int8", payload)) == "identity"
    assert reason(blob, EntryIdentity("smollm2@abc", "float32", SHAPE, "11" * 32)) == "identity"
    assert reason(blob[:4] + b"\x09\x00" + blob[6:]) == "version"


# ---------------------------------------------------------------------------------------------------- tiers
def test_memory_tier_respects_its_cap_in_lru_order():
    tier = MemoryTier(TierSpec("memory", 1000))
    for i in range(4):
        assert tier.put(f"k{i}", bytes(300))
    assert tier.used_bytes() == 900 and tier.keys() == ["k1", "k2", "k3"] and tier.stats.evictions == 1
    assert tier.get("k1") is not None  # k1 becomes most recent: k2 goes next
    tier.put("k4", bytes(300))
    assert tier.keys() == ["k3", "k1", "k4"] and tier.used_bytes() <= 1000
    assert not tier.put("huge", bytes(1001)) and tier.used_bytes() <= 1000
    assert tier.contains(["k3", "k2"]) == [True, False]


def test_disk_tier_is_atomic_survives_restart_and_evicts(tmp_path):
    spec = TierSpec("disk", 1000, path=str(tmp_path))
    tier = DiskTier(spec)
    for i in range(3):
        assert tier.put(f"kvserve:ns:{i:02x}", bytes([i]) * 300)
    os.utime(tier.file_path("kvserve:ns:00"), (1, 1))  # oldest on disk, as after a long idle
    leftover = os.path.join(os.path.dirname(tier.file_path("kvserve:ns:01")), "crash.tmp")
    open(leftover, "wb").write(b"partial")
    os.utime(leftover, (1, 1))  # a crashed write's leftover is old
    in_progress = os.path.join(os.path.dirname(leftover), "writing.tmp")
    open(in_progress, "wb").write(b"half")  # another instance sharing the directory is writing it now
    again = DiskTier(spec)  # a restart: the index comes back from the files
    assert not os.path.exists(leftover) and os.path.exists(in_progress)
    os.unlink(in_progress)
    # an entry another instance writes after this one scanned the directory is found (P/D on one host)
    tier.put("kvserve:ns:04", b"new")
    assert again.contains(["kvserve:ns:04", "kvserve:ns:05"]) == [True, False]
    again.delete("kvserve:ns:04")
    assert again.used_bytes() == 900 and again.get("kvserve:ns:02") == bytes([2]) * 300
    assert again.put("kvserve:ns:03", bytes(300))  # over the cap: the oldest file goes
    assert not os.path.exists(again.file_path("kvserve:ns:00")) and again.stats.evictions == 1
    assert again.used_bytes() <= 1000
    assert not [f for d in os.listdir(tmp_path) for f in os.listdir(tmp_path / d) if f.endswith(".tmp")]


def test_disk_full_stops_writes_but_not_reads(tmp_path, monkeypatch):
    tier = DiskTier(TierSpec("disk", 10_000, path=str(tmp_path)))
    assert tier.put("kvserve:ns:aa", b"x" * 100)
    real_fdopen = os.fdopen

    def full(fd, *a, **k):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", full)
    assert not tier.put("kvserve:ns:bb", b"y" * 100)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert not tier.accepts_writes() and tier.disk_full_events == 1 and tier.healthy
    assert not tier.put("kvserve:ns:cc", b"z" * 100)  # still refusing, without touching the disk
    assert tier.get("kvserve:ns:aa") == b"x" * 100
    assert not [f for d in os.listdir(tmp_path) for f in os.listdir(tmp_path / d) if f.endswith(".tmp")]


def test_redis_tier_shares_entries_and_caps_them(redis_server):
    redis_url = redis_server.url
    a = RedisTier(TierSpec("redis", 1000, url=redis_url), "ns-test")
    b = RedisTier(TierSpec("redis", 1000, url=redis_url), "ns-test")  # a second instance, same namespace
    assert a.put("kvserve:ns-test:1", b"1" * 400)
    assert b.get("kvserve:ns-test:1") == b"1" * 400
    assert b.put("kvserve:ns-test:2", b"2" * 400)
    a.get("kvserve:ns-test:1")  # touched: entry 2 is now the least recent
    assert a.put("kvserve:ns-test:3", b"3" * 400)  # 1200 > 1000: the LRU entry goes, whoever wrote it
    assert a.contains(["kvserve:ns-test:1", "kvserve:ns-test:2", "kvserve:ns-test:3"]) == [True, False, True]
    assert a.used_bytes() == 800 and a.stats.evictions == 1


def test_redis_down_marks_the_tier_unhealthy_without_raising():
    spec = TierSpec("redis", 1000, url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nobody listens
    tier = RedisTier(spec, "ns")
    assert tier.get("k") is None and not tier.healthy and tier.stats.errors == 1
    assert not tier.put("k", b"v") and tier.contains(["k"]) == [False]
    assert tier.stats.errors == 1  # backing off: no new attempt, no new error
    tier._down_until = 0.0  # the backoff is over: the next call is a retry, and the tier stays down until one works
    assert tier.available and not tier.healthy
    assert tier.get("k") is None and tier.stats.errors == 2 and not tier.healthy and not tier.available


def test_cost_model_loads_when_cheaper_and_reprobes_a_declined_tier():
    cost = CostModel()
    tier = MemoryTier(TierSpec("memory", 1 << 30))
    raw = 4 << 20  # a 4 MiB chunk of 256 tokens
    cost.rates["prefill"] = 1000.0  # recompute: 0.256 s
    assert cost.decide(tier, 256, raw)  # default memory path: ~1 ms
    cost.observe_load(tier, raw, 2.0)  # one very slow load (a cold start, a busy moment)
    decisions = [cost.decide(tier, 256, raw) for _ in range(2 * CostModel.PROBE_EVERY)]
    # declined, except every PROBE_EVERY-th chunk, which is loaded to measure the tier again
    assert decisions == ([False] * (CostModel.PROBE_EVERY - 1) + [True]) * 2
    for _ in range(10):
        cost.observe_load(tier, raw, 0.004)  # the probes were fast: the average comes back down
    assert all(cost.decide(tier, 256, raw) for _ in range(3))
    cost.rates["prefill"] = 1e9  # a prefill far faster than any load: recompute
    assert not cost.decide(tier, 256, raw)


def test_a_waiting_transfer_delays_no_other_fetch_and_loads_once_written(tmp_path):
    """A P/D transfer (wait_s > 0) whose entry is not written yet is set aside: a plain fetch queued behind it is
    answered at once; the transfer loads its entry (a tail of 16 tokens, its own shape) once another writer stores
    it, and one that never arrives answers None at its deadline."""
    from tests.kvstore.test_security import kv_chunk, make_store  # entries of 32 tokens

    store = make_store(f"disk:{tmp_path}:64MB")
    writer = make_store(f"disk:{tmp_path}:64MB")  # another instance sharing the directory (the prefill side)
    try:
        full, tail, never = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
        writer.save([(full, kv_chunk(1))])
        assert writer.flush(10)
        store.start_fetch("transfer", [(full, 32), (tail, 16)], 0, wait_s=20.0, force=True)
        store.start_fetch("gone", [(never, 32)], 0, wait_s=0.3, force=True)
        store.start_fetch("plain", [(full, 32)], 0)
        done: dict = {}
        deadline = time.monotonic() + 10
        while "plain" not in done and time.monotonic() < deadline:
            store.wait_for_fetch(0.05)
            done.update(store.poll_finished())
        assert "plain" in done and "transfer" not in done
        assert torch.equal(done["plain"].parts[0], kv_chunk(1))
        while "gone" not in done and time.monotonic() < deadline:
            store.wait_for_fetch(0.05)
            done.update(store.poll_finished())
        assert done["gone"] is None and "transfer" not in done
        half = kv_chunk(2)[:, :, :16]
        writer.save([(tail, half)])
        assert writer.flush(10)
        written = time.monotonic()
        while "transfer" not in done and time.monotonic() < written + 5:
            store.wait_for_fetch(0.01)
            done.update(store.poll_finished())
        # answered within a second of the write (it is looked at every few ms), not at its 20 s deadline
        assert "transfer" in done and time.monotonic() - written < 1.0
        got = done["transfer"]
        assert (got.start, got.end) == (0, 48) and [p.shape[2] for p in got.parts] == [32, 16]
        assert torch.equal(got.parts[1], half) and store.counters["transfer_waits"] > 0
    finally:
        store.close()
        writer.close()
