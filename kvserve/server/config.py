"""ServerConfig: every HTTP-side limit in one frozen object, validated once when the server starts."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from kvserve.config import ConfigError, require
from kvserve.server.tenants import TenantsConfig



@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # None: no authentication. Compared in constant time against `Authorization: Bearer <key>`.
    api_key: str | None = None
    served_model_name: str | None = None  # None: the engine's model name
    # Sequences (prompts x n) waiting beyond the engine's max_num_seqs running ones before new requests get 429.
    max_queued_requests: int = 256
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None: no limit
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 30.0  # after SIGTERM, streams still running this long end with an error event
    retry_after_s: int = 1  # Retry-After header on 429
    # a streaming client that takes no bytes for this long (socket buffers full) is cut off, its slot and KV freed
    write_timeout: float = 30.0
    enable_prompt_tokens_details: bool = False  # report cached prompt tokens to every client (a cross-tenant oracle)
    require_cache_salt: bool = False  # refuse generation requests without a cache_salt
    max_connections: int | None = 1024  # uvicorn limit_concurrency: more open connections get 503
    keep_alive_timeout: float = 5.0  # idle keep-alive connections are closed after this many seconds
    header_timeout: float = 10.0  # request headers must be complete this long after a connection (re)starts
    # None: every request is tenant `default`. Else the API key picks the tenant (kvserve.server.tenants)
    tenants: TenantsConfig | None = field(default=None, repr=False)
    max_kv_pin_seconds: float = 300.0  # requests asking for a longer kv_pin_seconds get 400

    def __post_init__(self) -> None:
        require(isinstance(self.port, int) and 0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        require(bool(self.host), "host must not be empty")
        require(self.api_key is None or (isinstance(self.api_key, str) and self.api_key.strip() == self.api_key
                                          and len(self.api_key) > 0 and self.api_key.isprintable()),
                 "api key must be a non-empty printable string without surrounding whitespace")
        require(self.served_model_name is None or (self.served_model_name.strip() != ""
                                                     and len(self.served_model_name) <= 256),
                 "served model name must be a non-empty string of at most 256 characters")
        require(isinstance(self.max_queued_requests, int) and self.max_queued_requests >= 0,
                 "max queued requests must be a non-negative integer")
        require(self.request_timeout is None or (math.isfinite(self.request_timeout) and self.request_timeout > 0),
                 "request timeout must be a positive number of seconds")
        require(isinstance(self.max_body_bytes, int) and self.max_body_bytes >= 1024,
                 "max body bytes must be at least 1024")
        require(math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0,
                 "shutdown timeout must be a non-negative number of seconds")
        require(isinstance(self.retry_after_s, int) and self.retry_after_s >= 1, "retry-after must be >= 1 second")
        require(math.isfinite(self.write_timeout) and self.write_timeout > 0,
                 "stream write timeout must be a positive number of seconds")
        require(self.max_connections is None or (isinstance(self.max_connections, int) and self.max_connections >= 1),
                 "max connections must be a positive integer")
        require(math.isfinite(self.max_kv_pin_seconds) and self.max_kv_pin_seconds >= 0,
                 "max kv pin seconds must be a non-negative number of seconds")
        for name in ("keep_alive_timeout", "header_timeout"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"{name.replace('_', ' ')} must be a positive number of seconds")

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")


def read_api_key_file(path: str) -> str:
    """Reads a key from a file (first line, stripped) so it never shows up in `ps` or shell history."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            key = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read api key file {path!r}: {e}") from e
    require(bool(key), f"api key file {path!r} is empty")
    return key
