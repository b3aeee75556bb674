"""`kvserve ray-serve` started for a test module on 127.0.0.1; skipped only where Ray cannot start a local cluster."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.serving import start_kvserve, stop_kvserve


@contextmanager
def ray_serve(args: list[str], log: Path):
    """Yields the app's URL; SIGTERM at the end (the command shuts down Ray Serve and the local cluster)."""
    try:
        proc, url = start_kvserve(["--num-cpus", "2", "--dtype", "float32", "--num-threads", "1",
                                   "--kv-cache-memory-gb", "0.05", "--log-level", "warning", "--no-access-log",
                                   *args], log, timeout=420, drop_env=("KVSERVE_API_KEY",), command="ray-serve")
    except RuntimeError as e:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Started a local Ray instance" not in text:
            pytest.skip(f"Ray could not start a local cluster here: {str(e)[-600:]}")
        raise
    try:
        yield url
    finally:
        stop_kvserve(proc)
