"""A real redis-server on 127.0.0.1 for the KV store tests (`make test` installs the Debian package)."""

from __future__ import annotations

import pytest

from kvserve.kvstore.redis_server import RedisServer


def start_redis() -> RedisServer:
    """A fresh redis-server; skips (naming the reason) only where the binary is not installed at all."""
    try:
        return RedisServer().start()
    except FileNotFoundError as e:
        pytest.skip(f"{e}; `make test` installs it")


@pytest.fixture(scope="session")
def redis_server():
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_engine(make_engine):
    """The root fixture with `kv_store_load="always"` by default: these tests check what is loaded; whether loading
    pays off on this machine at that moment is the cost model's business, tested with pinned rates."""

    def build(**kw):
        kw.setdefault("kv_store_load", "always")
        return make_engine(**kw)

    return build
