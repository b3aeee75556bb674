"""The KV store against someone who can write to its tiers or read its metrics: decompression bombs, forged entries
(with a correct integrity digest: whoever can write can compute it), the Redis password, and tiers that must keep
their accounting straight under concurrency and full disks. No model: stores are built on a synthetic chunk shape."""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import tempfile
import threading
import time
import tracemalloc

import pytest
import torch
import zstandard

from kvserve.config import ConfigError
from kvserve.kvstore import codec as codecs
from kvserve.kvstore.config import KEY_ENV, TierSpec, parse_kv_store, read_key
from kvserve.kvstore.entry import MAC_SIZE, EntryError, EntryIdentity, pack, unpack
from kvserve.kvstore.redis_server import free_port
from kvserve.kvstore.store import KVStore
from kvserve.kvstore.tiers import DiskTier, RedisTier

SHAPE = (4, 2, 32, 3, 64)  # (layers, K|V, tokens, kv_heads, head_dim): what `make_store` stores
MODEL = "smollm2@abc"
IDENT = EntryIdentity(MODEL, "bfloat16", SHAPE, "11" * 32)
KEY = b"correct horse battery staple"


def kv_chunk(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def make_store(spec: str, key: str | bytes | None = None) -> KVStore:
    config = parse_kv_store(spec, chunk_size=SHAPE[2], load_policy="always", key=key)
    return KVStore(config, MODEL, torch.bfloat16, num_layers=SHAPE[0], num_kv_heads=SHAPE[3], head_dim=SHAPE[4],
                   block_size=16)


def fetch(store: KVStore, chunk_hash: bytes):
    """The store's answer for one chunk (a FetchedKV or None), waited for."""
    store.start_fetch("req", [(chunk_hash, store.chunk_size)], 0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = store.poll_finished()
        if "req" in done:
            return done["req"]
        store.wait_for_fetch(0.05)
    raise AssertionError("the fetch never finished")


# ---------------------------------------------------------------------------------------------------- zstd bombs
RLE_BLOCK = 128 << 10  # zstd's largest block


def zstd_bomb(declared: int) -> bytes:
    """A well-formed zstd frame that declares `declared` bytes and really inflates to them: 128 KiB RLE blocks of
    zeros, 4 bytes each, so 4 GiB fit in 128 KiB."""
    head = struct.pack("<IBQ", 0xFD2FB528, 0xE0, declared)  # magic; single segment, 8-byte content size; the size

    def rle(last: int) -> bytes:
        return struct.pack("<I", last | 1 << 1 | RLE_BLOCK << 3)[:3] + b"\0"

    return head + rle(0) * (declared // RLE_BLOCK - 1) + rle(1)


def test_the_bomb_is_a_real_zstd_frame():
    assert zstandard.ZstdDecompressor().decompress(zstd_bomb(3 * RLE_BLOCK)) == bytes(3 * RLE_BLOCK)


@pytest.mark.parametrize("codec", ["zstd", "int8", "int4"])
def test_a_frame_declaring_gigabytes_is_refused_without_allocating_them(codec):
    bomb = zstd_bomb(4 << 30)
    tracemalloc.start()
    try:
        with pytest.raises(codecs.CodecError) as e:
            codecs.decode(bomb, codec, SHAPE, torch.bfloat16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e.value.reason == "oversized" and "declares 4294967296 bytes" in str(e.value)
    assert peak < 16 << 20


def test_a_frame_without_a_declared_size_stops_at_the_chunk_size():
    raw = codecs.raw_size(SHAPE, torch.bfloat16)
    undeclared = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(raw + 1))
    with pytest.raises(codecs.CodecError, match="zstd"):
        codecs.decode(undeclared, "zstd", SHAPE, torch.bfloat16)
    exact = zstandard.ZstdCompressor(write_content_size=False).compress(codecs.encode(kv_chunk(1), "none"))
    assert torch.equal(codecs.decode(exact, "zstd", SHAPE, torch.bfloat16), kv_chunk(1))


def test_a_stored_bomb_with_a_valid_digest_is_rejected_before_decompression(monkeypatch):
    real = zstandard.ZstdDecompressor
    calls = []

    class Spy:
        def decompress(self, data, *args, **kwargs):
            calls.append(len(data))
            return real().decompress(data, *args, **kwargs)

    store = make_store("memory:64MB")
    try:
        chunk_hash = b"\x11" * 32
        key = store.key(chunk_hash)
        store.tiers[0].put(key, pack(store.identity(chunk_hash), "zstd", zstd_bomb(4 << 30)))
        monkeypatch.setattr(zstandard, "ZstdDecompressor", Spy)
        assert fetch(store, chunk_hash) is None
        assert calls == [] and store.rejected == {"oversized": 1}
        assert store.tiers[0].contains([key]) == [False]  # deleted: the chunk is recomputed and written again
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------- MAC
def reason(blob: bytes, key: bytes | None) -> str:
    with pytest.raises(EntryError) as e:
        unpack(blob, IDENT, key)
    return e.value.reason


def test_a_keyed_entry_loads_only_with_its_key():
    payload = codecs.encode(kv_chunk(2), "int8")
    keyed = pack(IDENT, "int8", payload, KEY)
    assert unpack(keyed, IDENT, KEY) == ("int8", payload)
    assert reason(pack(IDENT, "int8", payload), KEY) == "unauthenticated"  # written without a key
    assert reason(pack(IDENT, "int8", payload, b"another key"), KEY) == "unauthenticated"
    assert reason(keyed[:-1], KEY) == "unauthenticated"
    assert reason(keyed[:12], KEY) == "unauthenticated"
    tampered = bytearray(keyed)
    tampered[-MAC_SIZE - 1] ^= 1  # the payload's last byte
    assert reason(bytes(tampered), KEY) == "unauthenticated"  # checked before the digest, which would catch it too
    # a store without a key still reads keyed entries: their digest holds, their tag is skipped
    assert unpack(keyed, IDENT) == ("int8", payload)
    assert reason(keyed[:-1], None) == "truncated"


def test_the_previous_entry_version_is_rejected_as_a_version_mismatch():
    blob = pack(IDENT, "none", codecs.encode(kv_chunk(3), "none"), KEY)
    old = blob[:4] + struct.pack("<H", 1) + blob[6:]
    assert reason(old, KEY) == "version" and reason(old, None) == "version"


@pytest.mark.parametrize("writer_key", [None, "another key"])
def test_a_store_with_a_key_rejects_deletes_and_recomputes_foreign_entries(tmp_path, writer_key):
    spec = f"disk:{tmp_path}:64MB"
    chunk_hash = b"\x22" * 32
    writer = make_store(spec, writer_key)
    writer.save([(chunk_hash, kv_chunk(4))])
    assert writer.flush(30)
    writer.close()
    reader = make_store(spec, KEY.decode())
    try:
        path = reader.tiers[0].file_path(reader.key(chunk_hash))
        assert os.path.exists(path)
        assert fetch(reader, chunk_hash) is None
        assert reader.rejected == {"unauthenticated": 1} and reader.tiers[0].stats.rejected == 1
        assert not os.path.exists(path)
        reader.save([(chunk_hash, kv_chunk(4))])  # what the engine does after recomputing it
        assert reader.flush(30)
        got = fetch(reader, chunk_hash)
        assert got is not None and torch.equal(got.parts[0], kv_chunk(4))
    finally:
        reader.close()


def test_the_same_key_loads(tmp_path):
    spec = f"disk:{tmp_path}:64MB"
    chunk_hash = b"\x33" * 32
    writer = make_store(spec, KEY)
    writer.save([(chunk_hash, kv_chunk(5))])
    assert writer.flush(30)
    writer.close()
    reader = make_store(spec, KEY.decode())  # the same key, given as text (as EngineArgs holds it)
    try:
        got = fetch(reader, chunk_hash)
        assert got is not None and torch.equal(got.parts[0], kv_chunk(5)) and not reader.rejected
    finally:
        reader.close()


def test_the_key_comes_from_a_file_or_the_environment_and_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert read_key(None) is None
    monkeypatch.setenv(KEY_ENV, "from-env")
    assert read_key(None) == "from-env"
    key_file = tmp_path / "kv.key"
    key_file.write_text("s3cret-key\nignored second line\n")
    assert read_key(str(key_file)) == "s3cret-key"  # the file wins over the environment
    cfg = parse_kv_store("memory:1GB", key=read_key(str(key_file)))
    assert cfg.key == b"s3cret-key" and "s3cret" not in repr(cfg)
    (tmp_path / "empty.key").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_key(str(tmp_path / "empty.key"))
    with pytest.raises(ConfigError, match="cannot read kv store key file"):
        read_key(str(tmp_path / "missing.key"))
    (tmp_path / "binary.key").write_bytes(b"\xffs3cret")
    with pytest.raises(ConfigError, match="is not UTF-8 text") as e:
        read_key(str(tmp_path / "binary.key"))
    assert "xff" not in str(e.value)
    with pytest.raises(ConfigError, match="key is empty"):
        parse_kv_store("memory:1GB", key="")


def test_the_cli_passes_the_key_file_or_the_environment_to_the_engine(tmp_path, monkeypatch):
    from kvserve.cli import _engine_args, build_parser

    key_file = tmp_path / "kv.key"
    key_file.write_text("s3cret-key\n")
    monkeypatch.setenv(KEY_ENV, "from-env")
    for command in (["generate", "--prompt", "hi"], ["serve"]):
        args = build_parser().parse_args(command + ["--kv-store", "memory:1GB", "--kv-store-key-file", str(key_file)])
        assert _engine_args(args).kv_store_key == "s3cret-key"
        assert _engine_args(build_parser().parse_args(command)).kv_store_key == "from-env"


# ---------------------------------------------------------------------------------------------------- Redis password
def test_a_redis_password_never_reaches_labels_stats_reprs_or_logs(caplog):
    port = free_port()  # nobody listens: every call fails and is logged
    cfg = parse_kv_store(f"redis://kvuser:hunter2@127.0.0.1:{port}/0?cap=1MB&timeout=0.2")
    (spec,) = cfg.tiers
    assert spec.url == f"redis://kvuser:hunter2@127.0.0.1:{port}/0"  # still there to connect with
    assert spec.label == f"redis://***@127.0.0.1:{port}/0"
    assert parse_kv_store(f"redis://:hunter2@127.0.0.1:{port}").tiers[0].label == f"redis://***@127.0.0.1:{port}"
    assert TierSpec("redis", 1, url=f"redis://127.0.0.1:{port}/0").label == f"redis://127.0.0.1:{port}/0"
    store = make_store(f"redis://kvuser:hunter2@127.0.0.1:{port}/0?cap=1MB&timeout=0.2")
    try:
        with caplog.at_level(logging.DEBUG, logger="kvserve"):
            assert fetch(store, b"\x44" * 32) is None
        tier = store.tiers[0]
        assert tier.stats.errors == 1 and caplog.records
        shown = [repr(cfg), repr(spec), repr(store.config), repr(tier), repr(tier._redis), str(tier.last_error),
                 json.dumps(store.stats()), caplog.text]
        assert not [s for s in shown if "hunter2" in s]
        assert store.stats()["tiers"][0]["tier"] == f"redis://***@127.0.0.1:{port}/0"
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------------- Redis counter
def test_redis_byte_counter_matches_the_stored_bytes_in_every_snapshot(redis_server):
    """Writers put and delete while an observer takes atomic snapshots (MULTI/EXEC) of the counter and the per-key
    sizes: they must agree in every one, not just once everybody is done."""
    ns = f"ns-count-{free_port()}"
    tiers = [RedisTier(TierSpec("redis", 20_000, url=redis_server.url), ns) for _ in range(3)]
    observer = tiers[0]._redis
    stop = threading.Event()
    mismatches = []

    def snapshot() -> tuple[int, int]:
        pipe = observer.pipeline(transaction=True)
        pipe.get(tiers[0]._total)
        pipe.hvals(tiers[0]._sizes)
        total, sizes = pipe.execute()
        return int(total or 0), sum(int(s) for s in sizes)

    def observe():
        while not stop.is_set():
            total, stored = snapshot()
            if total != stored:
                mismatches.append((total, stored))

    def write(i: int, tier: RedisTier):
        for j in range(150):
            key = f"kvserve:{ns}:{i}-{j % 20}"
            tier.put(key, bytes([j % 251]) * (500 + 97 * (j % 13)))
            if j % 2:
                tier.delete(f"kvserve:{ns}:{i}-{(j * 7) % 20}")

    watcher = threading.Thread(target=observe)
    watcher.start()
    writers = [threading.Thread(target=write, args=(i, t)) for i, t in enumerate(tiers)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    assert not mismatches, f"{len(mismatches)} snapshots where the counter disagreed, e.g. {mismatches[:3]}"
    assert all(t.stats.errors == 0 for t in tiers)
    total, stored = snapshot()
    keys = observer.zrange(tiers[0]._lru, 0, -1)
    assert total == stored == sum(observer.strlen(k) for k in keys) <= 20_000


# ---------------------------------------------------------------------------------------------------- disk tier
@pytest.mark.parametrize("where", ["makedirs", "mkstemp"])
def test_a_full_disk_while_creating_the_file_stops_writes_like_a_failed_write(tmp_path, monkeypatch, where):
    tier = DiskTier(TierSpec("disk", 10_000, path=str(tmp_path)))
    assert tier.put("kvserve:ns:aa", b"x" * 100)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os if where == "makedirs" else tempfile, where, full)
    assert not tier.put("kvserve:ns:bb", b"y" * 100)  # no exception, nothing written
    monkeypatch.undo()
    assert not tier.accepts_writes() and tier.disk_full_events == 1 and tier.stats.errors == 1
    assert tier.healthy and tier.get("kvserve:ns:aa") == b"x" * 100  # reads go on
    assert tier.contains(["kvserve:ns:bb"]) == [False] and tier.used_bytes() == 100


def test_a_permission_error_while_creating_the_file_is_a_counted_tier_error(tmp_path, monkeypatch):
    store = make_store(f"disk:{tmp_path}:64MB")
    try:
        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", denied)
        store.save([(b"\x55" * 32, kv_chunk(6))])
        assert store.flush(30)
        tier = store.tiers[0]
        assert tier.stats.errors == 1 and not tier.healthy and "Permission denied" in tier.last_error
        assert store.counters["save_errors"] == 0 and store.counters["chunks_saved"] == 0
        assert not store.is_known(b"\x55" * 32)  # a later finish tries again
    finally:
        store.close()
