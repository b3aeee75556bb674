"""Start and stop a real `kvserve serve` process on 127.0.0.1 for tests (one copy of the spawn-and-wait loop)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_kvserve(args: list[str], log_path: Path, timeout: float = 300.0,
                  drop_env: tuple[str, ...] = (), command: str = "serve") -> tuple[subprocess.Popen, str]:
    """`kvserve serve --host 127.0.0.1 --port <free> ARGS` (or `ray-serve`), waited for until /health answers 200;
    (process, url). Raises with the server's log if it exits or is not healthy within `timeout` seconds."""
    port = free_port()
    cmd = [sys.executable, "-m", "kvserve.cli", command, "--host", "127.0.0.1", "--port", str(port), *args]
    env = dict(os.environ, KVSERVE_NO_TQDM="1", TOKENIZERS_PARALLELISM="false")
    for key in drop_env:
        env.pop(key, None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait(10)
            raise RuntimeError(f"server not healthy in time:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.5)


def stop_kvserve(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM (the graceful path: drain, flush the KV store), then kill if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
