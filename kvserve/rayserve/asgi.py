"""Call a kvserve server app in-process, the way uvicorn would, and hand its response on as items (no ray import).

A Ray Serve engine replica runs the same FastAPI app as `kvserve serve` (auth, validation, errors, SSE), without a
socket: the ingress sends it the request's bytes, it answers with a `ResponseHead` and then the body's chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

STREAM_QUEUE = 64  # response chunks buffered before the app waits for the caller (backpressure)
CLOSE_GRACE_S = 5.0  # after the caller leaves, how long the app gets to see the disconnect and free the request


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: tuple[tuple[str, str], ...]
    replica: str = ""  # which replica answered (the ingress avoids it when it retries a 503)

    @property
    def is_event_stream(self) -> bool:
        return any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in self.headers)


async def call_app(app, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                   client: tuple[str, int] = ("127.0.0.1", 0), replica: str = "") -> AsyncIterator[object]:
    """Yields one ResponseHead, then the body's non-empty chunks (bytes). Closing the iterator early is a client
    disconnect: the app sees `http.disconnect` (a stream then ends and frees its KV) and is cancelled after
    CLOSE_GRACE_S if it has not finished."""
    out: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
    disconnected = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnected.is_set():
            raise OSError("the client went away")  # what a server's send does after a disconnect
        await out.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    path_only, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path_only, "raw_path": path_only.encode("latin-1"),
             "query_string": query.encode("latin-1"), "root_path": "", "client": client,
             "server": ("127.0.0.1", 0),
             "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]}
    task = asyncio.create_task(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield ResponseHead(message["status"], tuple((k.decode("latin-1"), v.decode("latin-1"))
                                                            for k, v in message.get("headers") or ()), replica)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield bytes(message["body"])
                if not message.get("more_body"):
                    break
    finally:
        disconnected.set()
        while not out.empty():  # unblock a send waiting on a full queue
            out.get_nowait()
        try:
            await asyncio.wait_for(asyncio.shield(task), CLOSE_GRACE_S)
        except asyncio.TimeoutError:
            task.cancel()
        except Exception:  # noqa: BLE001 - the app's own failure after the caller left: nothing to answer
            pass
