"""The `--kv-store` spec: which tiers, their caps and codecs. Parsed and validated once, into frozen dataclasses.

Grammar (comma-separated tiers, tried in the order given when loading):
    memory:SIZE[:CODEC]
    disk:PATH:SIZE[:CODEC]
    redis://[[USER]:PASSWORD@]HOST:PORT[/DB][?cap=SIZE&codec=CODEC&timeout=SECONDS]
SIZE is bytes with an optional K/M/G/T suffix (powers of 1024, `B` optional): 512MB, 4GB, 20G.
A Redis URL's userinfo (its password) is kept only to connect: labels, reprs and logs show `redis://***@HOST...`.
The optional key (`--kv-store-key-file`, $KVSERVE_KV_STORE_KEY) makes every entry carry an HMAC (see entry.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from kvserve.config import ConfigError

CODECS = ("none", "zstd", "int8", "int4")
LOAD_POLICIES = ("auto", "always")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
KEY_ENV = "KVSERVE_KV_STORE_KEY"


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 4GB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return n


def redact_url(url: str) -> str:
    """`url` with its userinfo replaced by `***`: a Redis password must never reach a metric label or a log line."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def read_key(path: str | None) -> str | None:
    """The KV store's MAC key: the first line of `path` (a file, so the key never shows up in `ps` or shell
    history), else $KVSERVE_KV_STORE_KEY, else None (entries are then integrity-checked but not authenticated)."""
    if path is None:
        return os.environ.get(KEY_ENV) or None
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            key = f.readline().strip()
    except UnicodeDecodeError:  # its message would quote a byte of the key
        raise ConfigError(f"kv store key file {path!r} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read kv store key file {path!r}: {e}") from e
    if not key:
        raise ConfigError(f"kv store key file {path!r} is empty")
    return key


def _codec(text: str, where: str) -> str:
    if text not in CODECS:
        raise ConfigError(f"{where}: unknown codec {text!r}; choose one of {', '.join(CODECS)}")
    return text


@dataclass(frozen=True)
class TierSpec:
    kind: str  # "memory" | "disk" | "redis"
    capacity_bytes: int
    codec: str = "none"
    path: str | None = None  # disk directory
    url: str | None = field(default=None, repr=False)  # redis URL without our query options; may hold a password
    timeout_s: float = 0.5  # redis socket timeout: a slow Redis counts as down

    def __post_init__(self) -> None:
        if self.kind not in ("memory", "disk", "redis"):
            raise ConfigError(f"unknown KV store tier {self.kind!r}")
        _codec(self.codec, self.kind)
        if self.capacity_bytes <= 0:
            raise ConfigError(f"{self.kind} tier capacity must be positive")
        if self.timeout_s <= 0:
            raise ConfigError("redis timeout must be positive")

    @property
    def label(self) -> str:
        """The tier's name in metrics, stats and logs (a Redis URL without its password)."""
        return {"memory": "memory", "disk": f"disk:{self.path}", "redis": redact_url(self.url or "redis")}[self.kind]


@dataclass(frozen=True)
class KVStoreConfig:
    tiers: tuple[TierSpec, ...]
    chunk_size: int = 256  # tokens per stored entry; a multiple of the block size
    save_queue_chunks: int = 256  # chunks waiting to be written; beyond it saves are dropped (and counted)
    int4_high_precision_layers: int = 2  # first layers kept at int8 by the int4 codec (CacheGen: shallow layers matter)
    zstd_level: int = 3
    load_policy: str = "auto"  # auto: load a chunk when the cost model expects it to beat recomputing; always: load
    key: bytes | None = field(default=None, repr=False)  # HMAC key for entries (a str is taken as UTF-8); None: no MAC

    def __post_init__(self) -> None:
        if isinstance(self.key, str):
            object.__setattr__(self, "key", self.key.encode())
        if self.key is not None and not self.key:
            raise ConfigError("kv store key is empty")
        if self.load_policy not in LOAD_POLICIES:
            raise ConfigError(f"kv store load policy must be one of {', '.join(LOAD_POLICIES)}, "
                              f"got {self.load_policy!r}")
        if not self.tiers:
            raise ConfigError("a KV store needs at least one tier")
        if self.chunk_size <= 0:
            raise ConfigError("kv store chunk_size must be positive")
        kinds = [t.kind for t in self.tiers]
        if kinds.count("memory") > 1:
            raise ConfigError("at most one memory tier")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError("zstd_level must be in [1, 22]")

    def check_block_size(self, block_size: int) -> None:
        if self.chunk_size % block_size:
            raise ConfigError(f"kv store chunk_size ({self.chunk_size}) must be a multiple of the block size "
                              f"({block_size})")


def parse_tier(text: str) -> TierSpec:
    text = text.strip()
    if text.startswith(("redis://", "rediss://", "unix://")):
        parts = urlsplit(text)
        opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(opts) - {"cap", "codec", "timeout"}
        if unknown:
            raise ConfigError(f"redis tier: unknown option(s) {sorted(unknown)}; known: cap, codec, timeout")
        url = parts._replace(query="").geturl()
        try:
            timeout = float(opts.get("timeout", 0.5))
        except ValueError:
            raise ConfigError(f"redis tier: timeout must be a number of seconds, got {opts['timeout']!r}") from None
        return TierSpec("redis", parse_size(opts.get("cap", "8GB")), _codec(opts.get("codec", "none"), "redis"),
                        url=url, timeout_s=timeout)
    fields = text.split(":")
    kind = fields[0]
    if kind == "memory":
        if len(fields) not in (2, 3):
            raise ConfigError(f"memory tier {text!r}: expected memory:SIZE[:CODEC]")
        return TierSpec("memory", parse_size(fields[1]), _codec(fields[2], "memory") if len(fields) == 3 else "none")
    if kind == "disk":
        if len(fields) not in (3, 4) or not fields[1]:
            raise ConfigError(f"disk tier {text!r}: expected disk:PATH:SIZE[:CODEC]")
        return TierSpec("disk", parse_size(fields[2]), _codec(fields[3], "disk") if len(fields) == 4 else "none",
                        path=fields[1])
    raise ConfigError(f"unknown KV store tier {text!r}: use memory:SIZE, disk:PATH:SIZE or redis://HOST:PORT")


def parse_kv_store(spec: str, **options) -> KVStoreConfig:
    """`memory:4GB,disk:/path:20GB,redis://127.0.0.1:6379` -> KVStoreConfig."""
    if not spec or not spec.strip():
        raise ConfigError("empty --kv-store spec")
    return KVStoreConfig(tuple(parse_tier(t) for t in spec.split(",") if t.strip()), **options)
