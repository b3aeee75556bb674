"""`kvserve bench`: load generators, workloads, metrics and the benchmark scripts (docs/benchmarks.md)."""

from __future__ import annotations

import json


def emit_report(report: dict, out: str | None, table: str) -> None:
    """A benchmark's JSON report to `out` (if given) and stdout, then its markdown table."""
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)
    print()
    print(table)


def write_json(path: str, result: dict) -> None:
    """A benchmark's result file (its folder made first)."""
    import json
    import os

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a benchmark starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def elapsed_log():
    """A benchmark's progress logger: each line prefixed with the seconds since this call."""
    import time

    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {msg}", flush=True)

    return log


def stop_processes(procs, timeout: float = 30.0) -> None:
    """Terminate the servers a benchmark started, then kill any that do not exit within `timeout`."""
    import subprocess

    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
