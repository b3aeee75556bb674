"""AsyncLLM: the server's front end of the engine. Validation, detokenization and stop strings run here, on the event
loop; the engine core runs behind a core client: in its own process over ZeroMQ (`MPCoreClient`, what `kvserve serve`
uses) or in a thread of this process (`InprocCoreClient`, for tests and embedding).

Each request gets a stream whose undelivered outputs are merged into one (deltas concatenated), so a consumer that
falls behind costs one RequestOutput of memory, never a growing queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Protocol

import msgspec

from kvserve.core.request import RequestStatus
from kvserve.engine.ipc import Rejected
from kvserve.engine.output_processor import OutputProcessor
from kvserve.engine.protocol import (
    EngineCoreRequest,
    EngineDeadError,
    EngineInfo,
    KVSummary,
    PLAIN,
    EngineStats,
    KVTransferParams,
    PromptSegments,
    RequestRouting,
    SessionKey,
    StepOutputs,
    check_kv_transfer,
    check_new_id,
    check_segments,
    validate_request,
)
from kvserve.model.tokenizer import Tokenizer
from kvserve.outputs import RequestOutput
from kvserve.sampling import ParamError, SamplingParams

if TYPE_CHECKING:
    from kvserve.engine.core import EngineCore

log = logging.getLogger("kvserve.engine")


class CoreEvents:
    """What a core client reports to AsyncLLM, always on the event loop."""

    def __init__(self, on_ready: Callable[[EngineInfo], None], on_outputs: Callable[[StepOutputs], None],
                 on_rejected: Callable[[Rejected], None], on_died: Callable[[str, bool], None]):
        self.ready, self.outputs, self.rejected, self.died = on_ready, on_outputs, on_rejected, on_died


class CoreClient(Protocol):
    """What AsyncLLM needs of an engine core: InprocCoreClient (a thread) or core_proc.MPCoreClient (a process)."""

    def start(self, loop: asyncio.AbstractEventLoop, events: CoreEvents) -> None: ...

    def add(self, request: EngineCoreRequest) -> None: ...

    def finish(self, ids: list[str], stopped: bool) -> None: ...

    async def call(self, method: str, *args) -> Any: ...

    async def shutdown(self) -> None: ...


class OutputStream:
    """One request's outputs; what the consumer has not taken yet is merged, never queued."""

    def __init__(self) -> None:
        self.pending: RequestOutput | BaseException | None = None
        self.event = asyncio.Event()
        self.started = False  # an output was delivered: the request can no longer be replayed silently

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput):
            self.started = True
            if isinstance(self.pending, RequestOutput):
                item = merge_outputs(self.pending, item)
        if not isinstance(self.pending, BaseException):  # an error is final
            self.pending = item
        self.event.set()

    async def get(self) -> RequestOutput:
        await self.event.wait()
        self.event.clear()
        item, self.pending = self.pending, None
        if isinstance(item, BaseException):
            raise item
        return item


def merge_outputs(old: RequestOutput, new: RequestOutput) -> RequestOutput:
    """`new` (cumulative fields are already current) with the deltas of `old` in front of its own."""
    previous = {o.index: o for o in old.outputs}
    for o in new.outputs:
        p = previous.get(o.index)
        if p is not None:
            o.delta_text = p.delta_text + o.delta_text
            o.delta_token_ids = p.delta_token_ids + o.delta_token_ids
    return new


class AsyncLLM:
    def __init__(self, client: CoreClient, tokenizer: Tokenizer | None = None):
        """`tokenizer`: share one already loaded (tests); otherwise it is loaded from the core's EngineInfo."""
        self.client = client
        self.info: EngineInfo | None = None
        self.tokenizer: Tokenizer | None = tokenizer
        self.output_processor: OutputProcessor | None = None
        self.state = "loading"  # loading -> ready; restarting after a death; dead when restarts are used up
        self.error: str | None = None
        self._streams: dict[str, OutputStream] = {}
        self._requests: dict[str, EngineCoreRequest] = {}  # kept until the first output, for replay after a death
        self._ready = asyncio.Event()
        self.num_restarts = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, timeout: float | None = None) -> None:
        """Start the core and wait until it has loaded the model."""
        self.client.start(asyncio.get_running_loop(),
                          CoreEvents(self._on_ready, self._on_outputs, self._on_rejected, self._on_died))
        async with asyncio.timeout(timeout):
            await self._ready.wait()
        if self.state == "dead":
            raise EngineDeadError(self.error or "the engine core failed to start")

    async def shutdown(self) -> None:
        await self.client.shutdown()

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    @property
    def num_active(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ API
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, routing: RequestRouting = PLAIN,
                 segments: PromptSegments | None = None, kv_transfer: KVTransferParams | None = None) -> None:
        info = self._info()
        validate_request(info, prompt_token_ids, params, routing)
        if segments is not None:
            check_segments(info, len(prompt_token_ids), segments, params, routing)
        if kv_transfer is not None:
            check_kv_transfer(info, len(prompt_token_ids), kv_transfer, params, segments is not None)

    async def generate(self, prompt: dict, params: SamplingParams, request_id: str,
                       routing: RequestRouting = PLAIN) -> AsyncIterator[RequestOutput]:
        """`prompt` is {"prompt_token_ids": [...], "prompt": text or None, "segments": PromptSegments or None,
        "kv_transfer": KVTransferParams or None}. Raises ParamError before anything is queued; EngineDeadError if
        the core dies after this request produced output."""
        if self.state == "dead":
            raise EngineDeadError(f"the engine core is dead: {self.error}")
        ids = list(prompt["prompt_token_ids"])
        segments, transfer = prompt.get("segments"), prompt.get("kv_transfer")
        self.validate(ids, params, routing, segments, transfer)
        check_new_id(request_id, self._streams)
        request = EngineCoreRequest(request_id, ids, params, time.monotonic(), routing, segments, transfer)
        stream = OutputStream()
        self._streams[request_id] = stream
        self.output_processor.add(request_id, prompt.get("prompt"), ids, params, request.arrival_time, transfer)
        self._requests[request_id] = request
        if self.state == "ready":
            self.client.add(request)  # otherwise sent when the restarted core is ready
        finished = False
        try:
            while True:
                out = await stream.get()
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            self._requests.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """End a request (idempotent): its stream ends with finish_reason "abort"; its KV blocks are freed by the
        core's next command drain."""
        self._requests.pop(request_id, None)
        final = self.output_processor.abort(request_id) if self.output_processor is not None else None
        if final is None:
            return
        if self.state == "ready":
            self.client.finish([request_id], stopped=False)
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(final)

    async def stats(self) -> EngineStats:
        stats = await self.client.call("stats")
        return msgspec.structs.replace(stats, engine_restarts=self.num_restarts)

    async def reset_prefix_cache(self) -> bool:
        return await self.client.call("reset_prefix_cache")

    async def kv_summary(self, since: str | None = None) -> KVSummary:
        """The engine's advertised prefix hashes (None while unchanged since `since`) and load, for a router."""
        return await self.client.call("kv_summary", since)

    async def release_session(self, key: SessionKey) -> int:
        """Unpin a session's KV; the tokens that were pinned (0 if none)."""
        return await self.client.call("release_session", key)

    # ------------------------------------------------------------------ core events (on the event loop)
    def _info(self) -> EngineInfo:
        if self.info is None:
            raise EngineDeadError("the engine core is still loading")
        return self.info

    def _on_ready(self, info: EngineInfo) -> None:
        if self.info is None:
            self.info = info
            self.tokenizer = self.tokenizer or Tokenizer(info.tokenizer_source, info.chat_template)
            self.output_processor = OutputProcessor(self.tokenizer)
        self.state = "ready"
        self.error = None
        for request in self._requests.values():  # requests that produced nothing yet: replay on the new core
            self.client.add(request)
        self._ready.set()

    def _on_outputs(self, step: StepOutputs) -> None:
        outputs, stopped = self.output_processor.process(step.updates, step.first_scheduled)
        if stopped:
            self.client.finish(stopped, stopped=True)
        for out in outputs:
            self._requests.pop(out.request_id, None)
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _on_rejected(self, r: Rejected) -> None:
        self._requests.pop(r.request_id, None)
        if self.output_processor is not None:
            self.output_processor.abort(r.request_id)
        stream = self._streams.get(r.request_id)
        if stream is not None:
            stream.put(ParamError(r.message, r.param, r.code))

    def _on_died(self, reason: str, restarting: bool) -> None:
        """Started requests fail now (their KV is gone); the others wait for the restarted core."""
        self.error = reason
        self.state = "restarting" if restarting else "dead"
        if restarting:
            self.num_restarts += 1
        for rid, stream in list(self._streams.items()):
            if stream.started or not restarting:
                self._requests.pop(rid, None)
                self.output_processor.abort(rid)
                stream.put(EngineDeadError(f"the engine core died: {reason}"))
        if not restarting:
            self._ready.set()  # wake a start() that is still waiting


class InprocCoreClient:
    """The engine core in a thread of this process: torch releases the GIL in its kernels, so the event loop stays
    responsive, but every Python line of the front end still competes with the step loop (hence MPCoreClient)."""

    def __init__(self, make_core: Callable[[], "EngineCore"]):
        self._make_core = make_core
        self.core: "EngineCore | None" = None
        self._commands: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: CoreEvents | None = None

    def start(self, loop: asyncio.AbstractEventLoop, events: CoreEvents) -> None:
        self._loop, self._events = loop, events
        self._thread = threading.Thread(target=self._run, name="kvserve-engine", daemon=True)
        self._thread.start()

    def add(self, request: EngineCoreRequest) -> None:
        self._command(("add", request))

    def finish(self, ids: list[str], stopped: bool) -> None:
        self._command(("finish", (ids, stopped)))

    async def call(self, method: str, *args):
        future = self._loop.create_future()
        self._command(("call", (method, args, future)))
        return await future

    async def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30.0)

    def _command(self, cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _emit(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is gone
            pass

    def _resolve(self, future: asyncio.Future, value) -> None:
        def done():
            if not future.done():
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        self._emit(done)

    def _drain(self, core: "EngineCore") -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    core.add_request(payload)
                except ParamError as e:
                    self._emit(self._events.rejected, Rejected(0, payload.request_id, str(e), e.param, e.code))
            elif kind == "finish":
                ids, stopped = payload
                core.finish_requests(ids, RequestStatus.FINISHED_STOPPED if stopped else
                                     RequestStatus.FINISHED_ABORTED)
            else:
                method, args, future = payload
                try:
                    self._resolve(future, getattr(core, method)(*args))
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    self._resolve(future, e)

    def _run(self) -> None:
        try:
            core = self.core = self._make_core()
        except BaseException as e:  # noqa: BLE001 - reported as a dead engine, not a hung start()
            log.exception("engine core failed to start")
            self._emit(self._events.died, f"failed to start: {e}", False)
            return
        self._emit(self._events.ready, core.info)
        try:
            while not self._stop.is_set():
                self._drain(core)
                if not core.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                step = core.step()
                if step.updates:
                    self._emit(self._events.outputs, step)
        except BaseException as e:  # noqa: BLE001 - a bug in a step must not hang every client
            log.exception("engine loop died")
            self._emit(self._events.died, f"{type(e).__name__}: {e}", False)
        finally:
            core.close()
            self._fail_pending_calls()

    def _fail_pending_calls(self) -> None:
        """No caller of call() may wait forever on an engine that stopped."""
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                self._resolve(payload[1], EngineDeadError("the engine core stopped"))
