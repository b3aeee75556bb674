"""Background step loop in its own thread; each request gets an asyncio stream of RequestOutput deltas; abort frees KV.

The model runs in one engine thread (torch releases the GIL in its kernels), so the event loop that serves HTTP stays
responsive. Requests and aborts reach the thread through a queue; outputs come back with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from kvserve.engine.llm_engine import EngineArgs, LLMEngine, Prompt
from kvserve.outputs import RequestOutput
from kvserve.sampling import ParamError, SamplingParams

log = logging.getLogger("kvserve.engine")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class _AsyncReply:
    """Answer from the engine thread to a coroutine, without parking a thread-pool worker on the wait."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.future = loop.create_future()

    def set(self, value) -> None:
        def resolve():
            if not self.future.done():
                self.future.set_result(value)
        try:
            self.loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the caller's event loop is gone
            pass


class _ThreadReply:
    def __init__(self):
        self.done = threading.Event()
        self.value = None

    def set(self, value) -> None:
        self.value = value
        self.done.set()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dead_error: BaseException | None = None
        self.step_listeners: list = []  # callables(outputs, engine) run in the engine thread after each step

    @classmethod
    def from_args(cls, args: EngineArgs) -> "AsyncLLMEngine":
        return cls(LLMEngine(args))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self.engine.close()  # the KV store writes what is queued, then stops its threads

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ API
    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       cache_salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Validates synchronously (raising ParamError before anything is queued), then streams outputs."""
        if self.dead_error is not None:
            raise EngineDeadError(f"engine loop died: {self.dead_error}")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ParamError(f"duplicate request id {request_id!r}", "request_id")
            self._streams[request_id] = stream
        reply = _AsyncReply(loop)
        self._commands.put(("add", (request_id, prompt, params, cache_salt, priority), reply))
        self._wake.set()
        try:
            error = await reply.future
        except BaseException:  # cancelled while the add is queued: abort it (commands run in order, so after the add)
            with self._lock:
                self._streams.pop(request_id, None)
            self.abort(request_id)
            raise
        if error is not None:
            with self._lock:
                self._streams.pop(request_id, None)
            raise error
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    def call_in_engine(self, fn):
        """Run fn(engine) in the engine thread between steps and return its result (blocking)."""
        reply = _ThreadReply()
        self._commands.put(("call", fn, reply))
        self._wake.set()
        reply.done.wait()
        if isinstance(reply.value, BaseException):
            raise reply.value
        return reply.value

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # event loop closed
                pass

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    rid, prompt, params, salt, priority = payload
                    self.engine.add_request(rid, prompt, params, cache_salt=salt, priority=priority)
                    reply.set(None)
                except Exception as e:  # validation errors go back to the caller
                    reply.set(e)
            elif kind == "abort":
                out = self.engine.abort_request(payload)
                if out is not None:
                    self._deliver(payload, out)
            elif kind == "call":
                try:
                    reply.set(payload(self.engine))
                except Exception as e:
                    reply.set(e)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                for out in outputs:
                    self._deliver(out.request_id, out)
                for fn in self.step_listeners:
                    fn(outputs, self.engine)
        except BaseException as e:  # a bug in a step must not hang every client
            log.exception("engine loop died")
            self.dead_error = e
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                self._deliver(rid, EngineDeadError(f"engine loop died: {e}"))
        finally:
            self._drain_final()

    def _drain_final(self) -> None:
        # fail pending adds so no caller waits forever
        while True:
            try:
                kind, _, reply = self._commands.get_nowait()
            except queue.Empty:
                return
            if reply is not None:
                reply.set(EngineDeadError("engine stopped"))
