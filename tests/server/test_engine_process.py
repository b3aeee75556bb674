"""The two-process server against faults: a malformed frame on the engine core's socket, a streaming client that
never reads, the engine core killed mid-stream (errors fast, queued work replayed, served again, no API-server
restart), and the API server killed (the engine core does not outlive it). One dedicated server, tests in order."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq

from kvserve.engine.core_proc import input_address

from tests.serving import start_kvserve

MODEL = "m"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def core_pid(server_pid: int) -> int:
    (pid,) = [p for p in _children(server_pid) if "kvserve.engine.core_proc" in _cmdline(p)]
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if os.path.exists(f"/proc/{pid}/stat") else ""
    return bool(stat) and stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("engine-proc") / "server.log"
    proc, url = start_kvserve(["--dtype", "float32", "--kv-cache-memory-gb", "0.25", "--served-model-name", MODEL,
                               "--max-num-seqs", "1", "--stream-write-timeout", "2", "--max-engine-restarts", "2",
                               "--timeout-request-headers", "2",
                               "--log-level", "warning", "--no-access-log"], log_path, 300)
    yield proc, url, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def complete(url: str, prompt: str, max_tokens: int = 8, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0}, timeout=timeout)


def test_malformed_ipc_frames_are_dropped_and_counted(server):
    proc, url, _ = server
    reference = complete(url, "The capital of France is").json()["choices"][0]["text"]
    cmd = _cmdline(core_pid(proc.pid))
    ipc_dir, epoch = cmd[cmd.index("--ipc-dir") + 1], int(cmd[cmd.index("--epoch") + 1])
    assert os.stat(ipc_dir).st_mode & 0o077 == 0, "the socket directory must be private"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.connect(input_address(ipc_dir, epoch))  # what any local process of this user could do
    frames = [b"\x00garbage", msgspec.msgpack.encode({"type": "add", "requests": [{"request_id": "x"}]}),
              msgspec.msgpack.encode({"type": "call", "call_id": 1, "method": "__del__"}),
              msgspec.msgpack.encode({"type": "add", "requests": [{"request_id": "x", "prompt_token_ids": [1],
                                                                   "params": {"n": 10**6}}]})]
    for frame in frames:
        sock.send(frame)
    sock.close(linger=2000)
    ctx.term()
    wait_for(lambda: metrics(url).get("kvserve:ipc_frames_dropped_total{}") == len(frames), 30, "dropped frames")
    assert complete(url, "The capital of France is").json()["choices"][0]["text"] == reference
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_streaming_client_that_never_reads_is_cut_off_and_frees_its_slot(server):
    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 3000, "ignore_eos": True, "logprobs": True,
                       "top_logprobs": 20, "messages": [{"role": "user", "content": "Write a long essay."}]}).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small window: the server's buffers fill fast
    s.connect((host, int(port)))
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: metrics(url)["kvserve:num_requests_running{}"] == 1, 60, "the request to start")
        # never read: the stream stalls, the write timeout (2 s) ends it, the slot and its KV come back
        wait_for(lambda: metrics(url)['kvserve:request_aborted_total{reason=client_stalled}'] == 1, 120,
                 "the stalled stream to be cut off")
        m = wait_for(lambda: (lambda m: m if m["kvserve:num_requests_in_flight{}"] == 0
                              and m["kvserve:kv_cache_blocks_used{}"] == 0
                              and m["kvserve:num_requests_running{}"] == 0 else None)(metrics(url)), 30, "idle")
        assert m["kvserve:num_requests_waiting{}"] == 0
    finally:
        s.close()
    assert complete(url, "Hello").status_code == 200


def test_a_connection_whose_headers_never_complete_is_closed(server):
    _, url, _ = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")  # ... and the rest never comes
        started = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert 1.5 < time.monotonic() - started < 15
    # a keep-alive connection gets the same deadline for its next request's headers
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        response = b""
        while not response.endswith(b'{"status":"ok"}'):
            response += s.recv(4096)
        assert b"200 OK" in response
        s.sendall(b"GET /health HTTP/1.1\r\n")
        assert s.recv(1024) == b""


def test_engine_core_killed_mid_stream_errors_fast_replays_queued_and_serves_again(server):
    proc, url, log_path = server
    reference = complete(url, "Name three colours:", 8).json()["choices"][0]["text"]
    events: list[tuple[float, str]] = []
    first = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line[6:]))
                    first.set()

    queued: list[httpx.Response] = []
    t1 = threading.Thread(target=stream, daemon=True)
    t1.start()
    assert first.wait(60)
    # max-num-seqs 1: this one waits behind the stream and has produced nothing when the core dies
    t2 = threading.Thread(target=lambda: queued.append(complete(url, "Name three colours:", 8, 300)), daemon=True)
    t2.start()
    wait_for(lambda: metrics(url)["kvserve:num_requests_waiting{}"] == 1, 30, "the second request to queue")
    old = core_pid(proc.pid)
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    t1.join(30)
    assert not t1.is_alive()
    assert events[-1][1] == "[DONE]"
    error = json.loads(events[-2][1])["error"]
    assert error["code"] == "engine_dead" and "SIGKILL" in error["message"], error
    assert events[-2][0] - killed_at < 5.0, "the stream's error came later than 5 s after the engine died"
    t2.join(300)
    assert queued and queued[0].status_code == 200, queued[0].text if queued else "no answer"
    assert queued[0].json()["choices"][0]["text"] == reference  # replayed on the new core, same greedy answer
    assert proc.poll() is None, "the API server must survive its engine core"
    new = core_pid(proc.pid)
    assert new != old and not _alive(old)
    assert httpx.get(f"{url}/health").status_code == 200
    assert complete(url, "Name three colours:", 8).json()["choices"][0]["text"] == reference
    m = metrics(url)
    assert m["kvserve:engine_restarts_total{}"] == 1 and m["kvserve:engine_ready{}"] == 1
    assert "restarting (1/2)" in log_path.read_text()


def test_engine_core_exits_when_the_api_server_dies(server):
    proc, _, _ = server
    core = core_pid(proc.pid)
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not _alive(core), 15, "the orphaned engine core to exit")
