"""Storage tiers for encoded KV entries: in-process memory, a local directory, Redis. Each one is size-capped with
LRU eviction, thread-safe, counts its own traffic, and never raises into the engine: a failing tier reports the
error, is marked down and is retried after an exponential backoff; it is healthy again once a retry succeeds.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvserve.kvstore.config import TierSpec

log = logging.getLogger("kvserve.kvstore")

LOAD_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    bytes_in: int = 0  # written to the tier
    bytes_out: int = 0  # read from the tier
    errors: int = 0  # I/O or connection failures
    rejected: int = 0  # entries that failed verification (corrupt, oversized, unauthenticated, foreign model, ...)
    evictions: int = 0
    writes: int = 0
    load_seconds: list[float] = field(default_factory=lambda: [0] * (len(LOAD_LATENCY_BUCKETS) + 1))
    load_seconds_sum: float = 0.0
    load_count: int = 0

    def observe_load(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(LOAD_LATENCY_BUCKETS) if seconds <= b), len(LOAD_LATENCY_BUCKETS))
        self.load_seconds[i] += 1
        self.load_seconds_sum += seconds
        self.load_count += 1


class TierFull(OSError):
    """The backend has no room (disk full): the write is skipped, the tier stays healthy for reads."""


class Tier:
    """Common health, backoff and statistics; subclasses implement _get/_put/_contains/_delete."""

    BACKOFF_START = 1.0
    BACKOFF_MAX = 30.0

    def __init__(self, spec: TierSpec):
        self.spec = spec
        self.name = spec.kind
        self.codec = spec.codec
        self.capacity = spec.capacity_bytes
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._up = True
        self._backoff = self.BACKOFF_START
        self.last_error: str | None = None

    # ------------------------------------------------------------------ health
    @property
    def healthy(self) -> bool:
        """False from a failure until an operation succeeds again (a state, not a clock: what the gauge reports)."""
        return self._up

    @property
    def available(self) -> bool:
        """Worth calling now: healthy, or down with its backoff over (the next call is the retry)."""
        return self._up or time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self._up = False
        self.last_error = f"{what}: {exc!r}"
        self._down_until = time.monotonic() + self._backoff
        log.warning("kv store tier %s failed (%s); retrying in %.0fs", self.spec.label, self.last_error, self._backoff)
        self._backoff = min(self._backoff * 2, self.BACKOFF_MAX)

    def _ok(self) -> None:
        self._up = True
        self._backoff = self.BACKOFF_START

    # ------------------------------------------------------------------ public, never raise
    def get(self, key: str) -> bytes | None:
        if not self.available:
            return None
        try:
            blob = self._get(key)
        except Exception as e:  # noqa: BLE001 - any backend failure means "not available now"
            self._failed("get", e)
            return None
        self._ok()
        if blob is not None:
            self.stats.bytes_out += len(blob)
        return blob

    def contains(self, keys: list[str]) -> list[bool]:
        if not self.available:
            return [False] * len(keys)
        try:
            found = self._contains(keys)
        except Exception as e:  # noqa: BLE001
            self._failed("lookup", e)
            return [False] * len(keys)
        self._ok()
        return found

    def put(self, key: str, blob: bytes) -> bool:
        if not self.available or not self.accepts_writes():
            return False
        if len(blob) > self.capacity:
            return False
        try:
            self._put(key, blob)
        except TierFull:
            return False
        except Exception as e:  # noqa: BLE001
            self._failed("put", e)
            return False
        self._ok()
        self.stats.writes += 1
        self.stats.bytes_in += len(blob)
        return True

    def delete(self, key: str) -> None:
        try:
            self._delete(key)
        except Exception as e:  # noqa: BLE001
            self._failed("delete", e)

    def accepts_writes(self) -> bool:
        return True

    def used_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ backend
    def _get(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _put(self, key: str, blob: bytes) -> None:
        raise NotImplementedError

    def _contains(self, keys: list[str]) -> list[bool]:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError


class MemoryTier(Tier):
    """Encoded entries in this process's memory, LRU by access, capped in bytes."""

    def __init__(self, spec: TierSpec):
        super().__init__(spec)
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def _get(self, key: str) -> bytes | None:
        with self._lock:
            blob = self._entries.get(key)
            if blob is not None:
                self._entries.move_to_end(key)
            return blob

    def _contains(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return [k in self._entries for k in keys]

    def _put(self, key: str, blob: bytes) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._entries[key] = blob
            self._bytes += len(blob)
            while self._bytes > self.capacity:
                _, victim = self._entries.popitem(last=False)
                self._bytes -= len(victim)
                self.stats.evictions += 1

    def _delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def used_bytes(self) -> int:
        return self._bytes

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)


class DiskTier(Tier):
    """One file per entry under a directory (two-level fan-out). Writes go to a temp file in the same directory and
    are renamed into place, so a reader never sees half an entry. The LRU index is rebuilt from file times at start;
    reads bump a file's mtime. A full disk (ENOSPC/EDQUOT) stops writes until an eviction frees room or a minute
    passes."""

    SUFFIX = ".kv"
    FULL_RETRY_S = 60.0
    STALE_TMP_S = 300.0  # a temp file older than this is a crashed write's leftover

    def __init__(self, spec: TierSpec):
        super().__init__(spec)
        self.root = os.path.abspath(os.path.expanduser(spec.path))
        os.makedirs(self.root, exist_ok=True)
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, oldest first
        self._bytes = 0
        self._full_until = 0.0
        self.disk_full_events = 0
        self._scan()

    def _path(self, key: str) -> str:
        return self._file(self._key_name(key))

    def _file(self, name: str) -> str:
        return os.path.join(self.root, name[-2:], name + self.SUFFIX)

    def _scan(self) -> None:
        found = []
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for f in os.scandir(sub.path):
                if f.name.endswith(".tmp"):
                    try:
                        # a write interrupted by a crash; a fresh one may be another instance's write in progress
                        # (instances can share the directory)
                        if time.time() - f.stat().st_mtime > self.STALE_TMP_S:
                            os.unlink(f.path)
                    except OSError:
                        pass
                elif f.name.endswith(self.SUFFIX):
                    st = f.stat()
                    found.append((st.st_mtime, f.name[: -len(self.SUFFIX)], st.st_size))
        for _, name, size in sorted(found):
            self._index[name] = size
            self._bytes += size
        self._evict_to(self.capacity)

    @staticmethod
    def _key_name(key: str) -> str:
        return key.replace(":", "_").replace("/", "_")

    def accepts_writes(self) -> bool:
        return time.monotonic() >= self._full_until

    def _get(self, key: str) -> bytes | None:
        name = self._key_name(key)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            with self._lock:
                self._forget(name)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
        return blob

    def _contains(self, keys: list[str]) -> list[bool]:
        """From the index, else from the directory: another instance sharing it (P/D prefill and decode on one
        host, a /dev/shm tier) may have written the entry since this one scanned it."""
        out = []
        for k in keys:
            name = self._key_name(k)
            with self._lock:
                known = name in self._index
            if not known:
                try:
                    size = os.stat(self._path(k)).st_size
                except OSError:
                    size = None
                if size is not None:
                    with self._lock:
                        if name not in self._index:
                            self._index[name] = size
                            self._bytes += size
                    known = True
            out.append(known)
        return out

    def _put(self, key: str, blob: bytes) -> None:
        name = self._key_name(key)
        path = self._path(key)
        with self._lock:
            self._evict_to(self.capacity - len(blob))
        tmp = None
        try:  # creating the fan-out directory and the temp file can hit a full disk as much as the write itself
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except OSError as e:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.disk_full_events += 1
                self._full_until = time.monotonic() + self.FULL_RETRY_S
                self.stats.errors += 1
                self.last_error = f"disk full: {e}"
                log.warning("kv store disk tier %s is full; not accepting writes for %.0fs", self.root,
                            self.FULL_RETRY_S)
                raise TierFull(str(e)) from None
            raise
        with self._lock:
            self._forget(name)
            self._index[name] = len(blob)
            self._bytes += len(blob)

    def _forget(self, name: str) -> None:
        size = self._index.pop(name, None)
        if size is not None:
            self._bytes -= size

    def _evict_to(self, limit: int) -> None:
        while self._index and self._bytes > limit:
            name, size = self._index.popitem(last=False)
            self._bytes -= size
            self.stats.evictions += 1
            self._full_until = 0.0  # room was made
            try:
                os.unlink(self._file(name))
            except OSError:
                pass

    def _delete(self, key: str) -> None:
        name = self._key_name(key)
        with self._lock:
            self._forget(name)
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def used_bytes(self) -> int:
        return self._bytes

    def file_path(self, key: str) -> str:
        return self._path(key)


# Atomic put with a shared LRU cap: every kvserve instance using the same Redis and namespace sees one budget.
_PUT_LUA = """
local old = redis.call('HGET', KEYS[3], KEYS[1])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
local size = string.len(ARGV[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size)
local cap = tonumber(ARGV[3])
local evicted = 0
while total > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  local k = oldest[1]
  local sz = tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('DEL', k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('HDEL', KEYS[3], k)
  total = redis.call('DECRBY', KEYS[4], sz)
  evicted = evicted + 1
end
return {evicted, total}
"""

# Delete with the byte counter in the same atomic step: decremented apart, a put in between would see the deleted
# bytes as still used and evict live entries for them, and a client dying in between would leak them for good.
_DELETE_LUA = """
local size = redis.call('HGET', KEYS[3], KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
if size then return redis.call('DECRBY', KEYS[4], size) end
return tonumber(redis.call('GET', KEYS[4]) or '0')
"""


class RedisTier(Tier):
    """Entries in Redis, shared by every instance pointing at it. A sorted set of access times per namespace gives
    the LRU order; the put script evicts the oldest entries past the cap atomically. Socket timeouts are short: a
    slow Redis is treated as a down one (the request recomputes) rather than something to wait for."""

    def __init__(self, spec: TierSpec, namespace: str):
        super().__init__(spec)
        import redis  # imported here: only deployments with a Redis tier need the package

        self._redis = redis.Redis.from_url(spec.url, socket_timeout=spec.timeout_s,
                                           socket_connect_timeout=spec.timeout_s, health_check_interval=0)
        self._lru = f"kvserve:{namespace}:lru"
        self._sizes = f"kvserve:{namespace}:sizes"
        self._total = f"kvserve:{namespace}:bytes"
        self._script = self._redis.register_script(_PUT_LUA)
        self._delete_script = self._redis.register_script(_DELETE_LUA)
        self._used = 0

    def _get(self, key: str) -> bytes | None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.zadd(self._lru, {key: time.time()}, xx=True)
        blob, _ = pipe.execute()
        return blob

    def _contains(self, keys: list[str]) -> list[bool]:
        pipe = self._redis.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(n) for n in pipe.execute()]

    def _put(self, key: str, blob: bytes) -> None:
        evicted, total = self._script(keys=[key, self._lru, self._sizes, self._total],
                                      args=[blob, time.time(), self.capacity])
        self.stats.evictions += int(evicted)
        self._used = int(total)

    def _delete(self, key: str) -> None:
        self._used = int(self._delete_script(keys=[key, self._lru, self._sizes, self._total]))

    def used_bytes(self) -> int:
        """As of this instance's last write or delete (a metrics scrape must not wait on Redis)."""
        return self._used

    def close(self) -> None:
        try:
            self._redis.close()
        except Exception:  # noqa: BLE001
            pass


def make_tier(spec: TierSpec, namespace: str) -> Tier:
    if spec.kind == "memory":
        return MemoryTier(spec)
    if spec.kind == "disk":
        return DiskTier(spec)
    return RedisTier(spec, namespace)
