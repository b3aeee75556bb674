"""The tiered KV store as the engine sees it: chunk keys from the prefix hash chain, a save thread, a fetch thread
with a load-or-recompute cost model, and counters for /metrics.

The scheduler talks to it through four calls that never block (`start_fetch`, `poll_finished`, `cancel`,
`is_known`); the engine hands it copies of finished requests' KV (`save`) and its measured prefill speed
(`observe_prefill`). Every tier operation happens on the store's own threads, so a slow or dead tier costs a
request its reuse, never the step loop its time.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from kvserve.kvstore import codec as codecs
from kvserve.kvstore.config import KVStoreConfig
from kvserve.kvstore.entry import EntryError, EntryIdentity, pack, unpack
from kvserve.kvstore.tiers import Tier, make_tier

log = logging.getLogger("kvserve.kvstore")

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Before anything is measured: what a fresh tier is assumed to deliver (bytes/s, seconds per get).
_DEFAULT_BANDWIDTH = {"memory": 4e9, "disk": 1e9, "redis": 4e8}
_DEFAULT_LATENCY = {"memory": 1e-5, "disk": 2e-4, "redis": 1e-3}
_DEFAULT_PREFILL_TPS = 2000.0


@dataclass
class FetchedKV:
    """KV for prompt tokens [start, end), ready to be copied into freshly allocated blocks."""

    start: int
    end: int
    parts: list[torch.Tensor]  # consecutive (layers, 2, tokens, kv_heads, head_dim) entries, engine dtype
    tiers: list[str] = field(default_factory=list)  # where each chunk came from

    def pieces(self, offset: int, num_tokens: int):
        """(destination token offset, KV view) pieces covering [offset, offset + num_tokens) of this range: the
        entries are copied into the pool as they are, never concatenated first (a 4k prompt is ~94 MB)."""
        base, end = 0, offset + num_tokens
        for part in self.parts:
            n = part.shape[2]
            lo, hi = max(offset, base), min(end, base + n)
            if lo < hi:
                yield lo - offset, part[:, :, lo - base:hi - base]
            base += n


_POLL = object()  # the fetch queue had nothing for TRANSFER_POLL_S: look at the waiting transfers again


@dataclass
class _FetchJob:
    request_id: str
    chunks: list[tuple[bytes, int]]  # (hash-chain value at the entry's last block, its tokens), consecutive
    start: int  # token index of the first chunk
    deadline: float = 0.0  # time.monotonic() until which missing entries are waited for (a P/D transfer)
    force: bool = False  # load whatever the cost model says (a P/D transfer: the decode instance must not prefill)


class CostModel:
    """Load a chunk only when fetching + verifying + decoding it is expected to beat recomputing it. Both sides are
    exponential moving averages of what this process measured: per tier, the seconds per byte of the whole load path
    (which includes its latency) and the typical entry size; and the engine's prefill tokens/s. Before a tier's first
    load it is assumed to deliver its default bandwidth after its default latency."""

    ALPHA = 0.3
    PREFILL_ALPHA = 0.2
    PROBE_EVERY = 8

    def __init__(self):
        self.rates: dict[str, float] = {}  # "prefill" -> tokens/s
        self.sec_per_byte: dict[str, float] = {}
        self.entry_bytes: dict[str, float] = {}  # typical encoded size per tier (its codec)
        self.declined: dict[str, int] = {}  # chunks in a row the model chose to recompute rather than load, per tier

    @staticmethod
    def _ema(table: dict, key: str, value: float, alpha: float) -> None:
        table[key] = value if key not in table else (1 - alpha) * table[key] + alpha * value

    @property
    def prefill_tps(self) -> float:
        return self.rates.get("prefill", _DEFAULT_PREFILL_TPS)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < 32 or seconds <= 0:
            return  # decode-only steps say nothing about prefill speed
        self._ema(self.rates, "prefill", tokens / seconds, self.PREFILL_ALPHA)

    def observe_load(self, tier: Tier, nbytes: int, seconds: float) -> None:
        self._ema(self.sec_per_byte, tier.spec.label, seconds / max(nbytes, 1), self.ALPHA)
        self._ema(self.entry_bytes, tier.spec.label, nbytes, self.ALPHA)

    def load_seconds(self, tier: Tier, raw_bytes: int) -> float:
        label = tier.spec.label
        nbytes = self.entry_bytes.get(label, raw_bytes)
        if label in self.sec_per_byte:
            return nbytes * self.sec_per_byte[label]
        return _DEFAULT_LATENCY[tier.name] + nbytes / _DEFAULT_BANDWIDTH[tier.name]

    def recompute_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tps

    def should_load(self, tier: Tier, tokens: int, raw_bytes: int) -> bool:
        return self.load_seconds(tier, raw_bytes) < self.recompute_seconds(tokens)

    def decide(self, tier: Tier, tokens: int, raw_bytes: int) -> bool:
        """should_load, except that every PROBE_EVERY-th chunk a tier loses is loaded anyway: a declined tier is
        never measured again, so one slow load (a cold connection, a busy moment) would otherwise rule it out for
        the life of the process."""
        if self.should_load(tier, tokens, raw_bytes):
            self.declined[tier.spec.label] = 0
            return True
        n = self.declined.get(tier.spec.label, 0) + 1
        self.declined[tier.spec.label] = 0 if n >= self.PROBE_EVERY else n
        return n >= self.PROBE_EVERY


def model_fingerprint(name: str, config, weights: dict[str, torch.Tensor] | None = None,
                      quantization: str = "none") -> str:
    """Model identity for stored KV: name, architecture, the weights' run-time quantization and a digest of a few
    weight slices, so two checkpoints that share a name (a fine-tune, another quantization) never read each other's KV
    (the same file run as q8_0 and as bf16 computes different KV)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(repr(config).encode())
    h.update(b"quantization=" + quantization.encode())
    for key in sorted(weights or {})[:8]:
        t = weights[key].detach().reshape(-1)[:4096].float().contiguous()
        h.update(key.encode())
        h.update(t.numpy().tobytes())
    return f"{name}@{h.hexdigest()}"


class KVStore:
    MAX_KNOWN = 200_000
    TRANSFER_POLL_S = 0.002  # how often a P/D transfer looks again for entries still being written

    def __init__(self, config: KVStoreConfig, model_id: str, dtype: torch.dtype, num_layers: int,
                 num_kv_heads: int, head_dim: int, block_size: int):
        config.check_block_size(block_size)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"KV store: unsupported dtype {dtype}")
        self.config = config
        self.chunk_size = config.chunk_size
        self.block_size = block_size
        self.model_id = model_id
        self.dtype = dtype
        self.dtype_name = _DTYPE_NAMES[dtype]
        self.chunk_shape = (num_layers, 2, config.chunk_size, num_kv_heads, head_dim)
        self.raw_chunk_bytes = codecs.raw_size(self.chunk_shape, dtype)
        layout = f"L{num_layers}.2.T{config.chunk_size}.H{num_kv_heads}.D{head_dim}"
        self.namespace = hashlib.blake2b(f"{model_id}|{self.dtype_name}|{layout}".encode(),
                                         digest_size=8).hexdigest()
        self.tiers: list[Tier] = [make_tier(spec, self.namespace) for spec in config.tiers]
        self.cost = CostModel()
        self._known: OrderedDict[bytes, None] = OrderedDict()  # chunk hashes stored (or seen stored) by us
        self._lock = threading.Lock()
        self._done: dict[str, FetchedKV | None] = {}
        self._cancelled: set[str] = set()
        self._fetch_q: queue.Queue[_FetchJob | None] = queue.Queue()
        self._save_q: queue.Queue = queue.Queue(maxsize=config.save_queue_chunks)
        self._fetch_event = threading.Event()
        self._pending_saves = 0
        self._saves_idle = threading.Condition(self._lock)
        self.counters: Counter = Counter()
        self.rejected: Counter = Counter()  # verification failures by reason
        self._closed = False
        self._threads = [threading.Thread(target=self._fetch_loop, name="kvstore-fetch", daemon=True),
                         threading.Thread(target=self._save_loop, name="kvstore-save", daemon=True)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ keys
    def key(self, chunk_hash: bytes) -> str:
        return f"kvserve:{self.namespace}:{chunk_hash.hex()}"

    def shape(self, num_tokens: int) -> tuple[int, ...]:
        """An entry's KV shape: a full chunk, or a P/D transfer's tail (the prompt's last full blocks)."""
        return (*self.chunk_shape[:2], num_tokens, *self.chunk_shape[3:])

    def identity(self, chunk_hash: bytes, num_tokens: int | None = None) -> EntryIdentity:
        return EntryIdentity(self.model_id, self.dtype_name, self.shape(num_tokens or self.chunk_size),
                             chunk_hash.hex())

    def is_known(self, chunk_hash: bytes) -> bool:
        with self._lock:
            return chunk_hash in self._known

    def _remember(self, chunk_hash: bytes) -> None:
        with self._lock:
            self._known[chunk_hash] = None
            self._known.move_to_end(chunk_hash)
            if len(self._known) > self.MAX_KNOWN:
                self._known.popitem(last=False)

    def _forget(self, chunk_hash: bytes) -> None:
        with self._lock:
            self._known.pop(chunk_hash, None)

    # ------------------------------------------------------------------ scheduler side (never blocks)
    def start_fetch(self, request_id: str, chunks: list[tuple[bytes, int]], start_token: int,
                    wait_s: float = 0.0, force: bool = False) -> None:
        """Fetch consecutive entries (hash, tokens) from `start_token`. `wait_s` > 0 (a P/D transfer): entries not
        stored yet are waited for that long (the prefill instance may still be writing them); `force`: loaded
        whatever the cost model would choose."""
        self.counters["fetches"] += 1
        deadline = time.monotonic() + wait_s if wait_s > 0 else 0.0
        self._fetch_q.put(_FetchJob(request_id, list(chunks), start_token, deadline, force))

    def poll_finished(self) -> dict[str, FetchedKV | None]:
        with self._lock:
            done, self._done = self._done, {}
            self._fetch_event.clear()
        return done

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if self._done.pop(request_id, "absent") == "absent":
                self._cancelled.add(request_id)

    def wait_for_fetch(self, timeout: float) -> None:
        """The engine's idle wait while every runnable request is being fetched."""
        self._fetch_event.wait(timeout)

    # ------------------------------------------------------------------ engine side
    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.cost.observe_prefill(tokens, seconds)

    def save(self, chunks: list[tuple[bytes, torch.Tensor]]) -> None:
        """Queue (chunk hash, KV copy) pairs for writing; drops (and counts) what does not fit the queue. A copy
        is a full chunk or, for a P/D transfer, the prompt's tail of full blocks (its token count is in its shape)."""
        for chunk_hash, kv in chunks:
            if self.is_known(chunk_hash):
                continue
            try:
                with self._lock:
                    self._pending_saves += 1
                self._save_q.put_nowait((chunk_hash, kv))
                self._remember(chunk_hash)
            except queue.Full:
                with self._lock:
                    self._pending_saves -= 1
                self.counters["saves_dropped"] += 1

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every queued save is written (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout
        with self._saves_idle:
            while self._pending_saves:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._saves_idle.wait(left)
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fetch_q.put(None)
        self._save_q.put(None)
        for t in self._threads:
            t.join(timeout=10)
        for tier in self.tiers:
            tier.close()

    # ------------------------------------------------------------------ save thread
    def _save_loop(self) -> None:
        while True:
            item = self._save_q.get()
            if item is None:
                return
            chunk_hash, kv = item
            try:
                self._write(chunk_hash, kv)
            except Exception:  # noqa: BLE001 - a bad save must never kill the thread
                log.exception("kv store: saving a chunk failed")
                self.counters["save_errors"] += 1
                self._forget(chunk_hash)
            finally:
                with self._saves_idle:
                    self._pending_saves -= 1
                    self._saves_idle.notify_all()

    def _write(self, chunk_hash: bytes, kv: torch.Tensor) -> None:
        key = self.key(chunk_hash)
        ident = self.identity(chunk_hash, kv.shape[2])
        blobs: dict[str, bytes] = {}
        stored = False
        for tier in self.tiers:
            if not tier.available or not tier.accepts_writes():
                continue
            if tier.codec not in blobs:
                t0 = time.perf_counter()
                payload = codecs.encode(kv, tier.codec, self.config.zstd_level,
                                        self.config.int4_high_precision_layers)
                blobs[tier.codec] = pack(ident, tier.codec, payload, self.config.key)
                self.counters[f"encode_seconds_{tier.codec}"] += time.perf_counter() - t0
            stored |= tier.put(key, blobs[tier.codec])
        if stored:
            self.counters["chunks_saved"] += 1
        else:
            self._forget(chunk_hash)  # nothing took it: let a later finish try again

    # ------------------------------------------------------------------ fetch thread
    def _fetch_loop(self) -> None:
        """Jobs in arrival order; a P/D transfer whose entries are not all stored yet is set aside and looked at
        again every TRANSFER_POLL_S until its deadline, so a transfer that never arrives (or a client naming KV that
        does not exist) delays no other request's fetch."""
        waiting: list[_FetchJob] = []
        while True:
            try:
                job = self._fetch_q.get(timeout=self.TRANSFER_POLL_S if waiting else None)
            except queue.Empty:
                job = _POLL
            if job is None:
                return
            jobs, waiting = ([job] if job is not _POLL else []) + waiting, []
            for j in jobs:
                self._run(j, waiting)

    def _run(self, job: _FetchJob, waiting: list[_FetchJob]) -> None:
        result = None
        try:
            with self._lock:
                cancelled = job.request_id in self._cancelled
                self._cancelled.discard(job.request_id)
            if cancelled:
                return
            if job.deadline and time.monotonic() < job.deadline:
                owners = self._lookup([self.key(h) for h, _ in job.chunks], count=False)
                if owners and owners[-1] is None:  # the prefill instance may still be writing it
                    self.counters["transfer_waits"] += 1
                    waiting.append(job)
                    return
            result = self._fetch(job)
        except Exception:  # noqa: BLE001
            log.exception("kv store: fetch failed; the request recomputes")
            self.counters["fetch_errors"] += 1
            result = None
        with self._lock:
            if job.request_id in self._cancelled:
                self._cancelled.discard(job.request_id)
                return
            self._done[job.request_id] = result
            self._fetch_event.set()

    def _lookup(self, keys: list[str], count: bool = True) -> list[Tier | None]:
        """For each key, the first tier holding it, up to the first key no tier holds. `count`: a miss counts in
        the tiers' stats (not while a transfer polls for entries being written)."""
        found: list[list[bool]] = [t.contains(keys) for t in self.tiers]  # an unavailable tier answers all False
        owners: list[Tier | None] = []
        for i in range(len(keys)):
            owner = next((t for t, f in zip(self.tiers, found) if f[i]), None)
            for t, f in zip(self.tiers, found):
                if count and not f[i]:
                    t.stats.misses += 1
            owners.append(owner)
            if owner is None:
                break
        return owners

    def _fetch(self, job: _FetchJob) -> FetchedKV | None:
        keys = [self.key(h) for h, _ in job.chunks]
        owners = self._lookup(keys)
        parts: list[torch.Tensor] = []
        sources: list[str] = []
        for i, (h, n) in enumerate(job.chunks[: len(owners)]):
            kv, source = self._load_chunk(h, n, keys[i], owners[i], job.force)
            if kv is None:
                break
            parts.append(kv)
            sources.append(source)
        if not parts:
            return None
        self.counters["loaded_chunks"] += len(parts)
        return FetchedKV(job.start, job.start + sum(p.shape[2] for p in parts), parts, sources)

    def _load_chunk(self, chunk_hash: bytes, num_tokens: int, key: str, first: Tier | None,
                    force: bool = False) -> tuple[torch.Tensor | None, str]:
        """Try the tiers in order starting from the first that holds the key; a rejected entry is deleted there."""
        if first is None:
            return None, ""
        ident = self.identity(chunk_hash, num_tokens)
        raw_bytes = self.raw_chunk_bytes * num_tokens // self.chunk_size
        for tier in self.tiers[self.tiers.index(first):]:
            if not tier.available:
                continue
            if (self.config.load_policy == "auto" and not force
                    and not self.cost.decide(tier, num_tokens, raw_bytes)):
                self.counters["decisions_recompute"] += 1
                return None, ""
            t0 = time.perf_counter()
            blob = tier.get(key)
            if blob is None:
                continue
            try:
                codec, payload = unpack(blob, ident, self.config.key)
                kv = codecs.decode(payload, codec, ident.shape, self.dtype,
                                   self.config.int4_high_precision_layers)
            except (EntryError, codecs.CodecError) as e:
                tier.stats.rejected += 1
                self.rejected[e.reason] += 1
                log.warning("kv store: dropped entry %s from %s (%s)", key, tier.spec.label, e)
                tier.delete(key)
                self._forget(chunk_hash)  # so the recomputed chunk is written again
                continue
            seconds = time.perf_counter() - t0
            tier.stats.hits += 1
            tier.stats.observe_load(seconds)
            self.cost.observe_load(tier, len(blob), seconds)
            self.counters["decisions_load"] += 1
            self._remember(chunk_hash)
            return kv, tier.spec.label
        return None, ""

    # ------------------------------------------------------------------ metrics
    def stats(self) -> dict:
        tiers = []
        for t in self.tiers:
            s = t.stats
            tiers.append({
                "tier": t.spec.label, "kind": t.name, "codec": t.codec, "healthy": t.healthy,
                "accepts_writes": t.accepts_writes(), "capacity_bytes": t.capacity, "used_bytes": t.used_bytes(),
                "hits": s.hits, "misses": s.misses, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
                "errors": s.errors, "rejected": s.rejected, "evictions": s.evictions, "writes": s.writes,
                "load_seconds_buckets": list(s.load_seconds), "load_seconds_sum": s.load_seconds_sum,
                "load_seconds_count": s.load_count,
            })
        return {"tiers": tiers, "counters": dict(self.counters), "rejected": dict(self.rejected),
                "prefill_tokens_per_s": self.cost.prefill_tps, "pending_saves": self._pending_saves}
