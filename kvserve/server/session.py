"""A generation request's life on the server: admission slot, deadline, engine streams, SSE or JSON response.

Ending a Session for any reason (done, timeout, disconnect, stalled reader, shutdown, engine death) aborts whatever
is still running in the engine, so no KV block outlives its client. Outputs a client has not read yet are merged
(deltas concatenated), so a slow reader costs one output per prompt, and a reader that stops altogether is cut off
after the write timeout with its slot and KV released.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse

from kvserve.engine.async_llm import merge_outputs
from kvserve.engine.protocol import EngineDeadError
from kvserve.outputs import RequestOutput
from kvserve.sampling import ParamError, SamplingParams
from kvserve.server.errors import ApiError, error_body, error_response
from kvserve.server.inputs import EngineInput
from kvserve.server.metrics import RequestTracker
from kvserve.server.responses import SSE_DONE, sse
from kvserve.server.tenants import DEFAULT_OUTPUT_ESTIMATE, RequestScope

if TYPE_CHECKING:
    from kvserve.server.state import ServerState

log = logging.getLogger("kvserve.server")


class _Outputs:
    """Per-prompt latest outputs of a session, merged while unread; the end of each prompt's stream; a first error."""

    def __init__(self) -> None:
        self.pending: dict[int, RequestOutput] = {}
        self.ended: set[int] = set()
        self.error: BaseException | None = None
        self.event = asyncio.Event()

    def put(self, i: int, out: RequestOutput) -> None:
        old = self.pending.get(i)
        self.pending[i] = merge_outputs(old, out) if old is not None else out
        self.event.set()

    def end(self, i: int) -> None:
        self.ended.add(i)
        self.event.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.event.set()


class Session:
    def __init__(self, state: "ServerState", cost: int, n: int, param: str, scope: RequestScope = RequestScope()):
        tenant = scope.tenant
        state.admit(cost, param, tenant)
        try:
            self.ticket = state.limits.acquire(tenant, cost)
        except ApiError as e:
            state.release(cost)
            state.count_refusal(e, tenant)
            raise
        self.state, self.cost, self.n, self.tenant, self.scope = state, cost, n, tenant, scope
        self.ids: list[str] = []
        self.trackers: list[RequestTracker] = []
        self.tasks: list[asyncio.Task] = []
        self.buffer = _Outputs()
        self.reason: str | None = None
        self.completed = False
        self.closed = False
        self.holds_slot = True
        state.sessions.add(self)
        timeout = state.config.request_timeout
        self.timer = asyncio.get_running_loop().call_later(timeout, self.expire, "timeout") if timeout else None

    def start(self, base_id: str, inputs: list[EngineInput], params: SamplingParams, salt: str | None) -> None:
        """Reserve the tokens against the tenant's rate limit (429 if over), then start one engine request per
        prompt."""
        max_len = self.state.info.max_model_len
        expected = sum(len(inp.ids) + params.n * (params.max_tokens if params.max_tokens is not None
                                                  else min(DEFAULT_OUTPUT_ESTIMATE, max_len - len(inp.ids)))
                       for inp in inputs)
        try:
            self.state.limits.reserve_tokens(self.ticket, expected)
        except ApiError as e:
            self.state.count_refusal(e, self.tenant)
            raise
        for i, inp in enumerate(inputs):
            rid = f"{base_id}-{i}"
            self.ids.append(rid)
            self.trackers.append(self.state.metrics.tracker(self.n))
            self.tasks.append(asyncio.create_task(self._pump(i, rid, inp, params, salt)))

    async def _pump(self, i: int, rid: str, inp: EngineInput, params: SamplingParams, salt: str | None) -> None:
        # No await between this check and the engine's add: an expire() that ran first means we never start.
        if self.reason is not None:
            self.buffer.end(i)
            return
        try:
            async for out in self.state.engine.generate(inp.engine_prompt(), params, rid, self.scope.routing(salt)):
                self.trackers[i].observe(out)
                self.buffer.put(i, out)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which turns it into an error response
            self.buffer.fail(e)
            return
        self.buffer.end(i)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        b = self.buffer
        while True:
            await b.event.wait()
            b.event.clear()
            if b.error is not None:
                raise b.error
            ready, b.pending = b.pending, {}
            for i in sorted(ready):
                yield i, ready[i]
            if len(b.ended) == len(self.tasks) and not b.pending:
                return

    def expire(self, reason: str) -> None:
        """End the request early: the engine aborts each id. A timeout also gives the admission slot back at once,
        even while a stalled client keeps the response open."""
        if self.closed or self.completed:
            return
        if self.reason is None:
            self.reason = reason
        for rid in self.ids:
            self.state.engine.abort(rid)
        if reason in ("timeout", "client_stalled"):
            self._release_slot()
        self.buffer.event.set()  # wake the consumer so it reports the reason

    def _release_slot(self) -> None:
        if self.holds_slot:
            self.holds_slot = False
            self.state.release(self.cost)
            used = sum(len(t.last.prompt_token_ids) + sum(len(o.token_ids) for o in t.last.outputs)
                       for t in self.trackers if t.last is not None)
            self.state.limits.release(self.ticket, used)

    def close(self, reason: str = "client_disconnect") -> None:
        """Idempotent and synchronous, so it also works from a cancelled task."""
        if self.closed:
            return
        if not self.completed:
            self.expire(reason)
        self.closed = True
        for t in self.tasks:
            t.cancel()
        if self.timer is not None:
            self.timer.cancel()
        for tr in self.trackers:
            tr.close()
        if self.reason is not None and self.ids:
            self.state.metrics.aborted(self.reason)
        self._release_slot()
        self.state.sessions.discard(self)

    def error(self) -> ApiError:
        """The error for a session the server ended early."""
        if self.reason == "timeout":
            return ApiError(408, f"the request did not finish within {self.state.config.request_timeout:g} seconds",
                            code="timeout")
        if self.reason == "shutdown":
            return ApiError(503, "the server shut down before the request finished", code="service_unavailable")
        if self.reason in ("client_disconnect", "client_stalled"):
            return ApiError(499, "the client closed the connection", code="client_closed_request")
        return ApiError(500, "the request was aborted", code="aborted")

    async def collect(self, request: Request) -> list[RequestOutput]:
        """Final output per prompt; a client disconnect ends the session (and frees its KV) at once."""
        watcher = asyncio.create_task(_watch_disconnect(request, self))
        finals: list[RequestOutput | None] = [None] * len(self.tasks)
        try:
            async for i, out in self.outputs():
                if out.finished:
                    finals[i] = out
                if self.reason is not None:
                    break
        finally:
            watcher.cancel()
        if self.reason is None and any(f is not None and rejected(f) for f in finals):
            self.state.count_refusal(err := self.state.queue_wait_error(), self.tenant)
            raise err
        if self.reason is not None or any(f is None or aborted(f) for f in finals):
            raise self.error()
        self.completed = True
        return finals  # type: ignore[return-value]


async def _watch_disconnect(request: Request, session: Session) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            session.expire("client_disconnect")
            return


def aborted(out: RequestOutput) -> bool:
    return any(o.finish_reason in ("abort", "rejected") for o in out.outputs)


def rejected(out: RequestOutput) -> bool:
    """The engine dropped it unscheduled (queue-wait deadline): the server answers 503."""
    return any(o.finish_reason == "rejected" for o in out.outputs)


class _RejectedBeforeFirstChunk(Exception):
    """Raised by a stream's body before its first chunk: the response can still be a plain HTTP error."""

    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


class SSEResponse(StreamingResponse):
    """A stream whose session is closed however the response ends, even if its iterator never started; a chunk the
    client does not take within `write_timeout` seconds ends it (the socket buffers are full: the reader stalled)."""

    def __init__(self, content: AsyncIterator[bytes], session: Session, write_timeout: float,
                 hold_headers: bool = False):
        """`hold_headers`: send the status line with the first chunk, so a request the engine rejects before it
        ran (queue-wait deadline) gets a real 503 with Retry-After instead of a 200 stream with an error event."""
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.session = session
        self.write_timeout = write_timeout
        self.hold_headers = hold_headers

    async def stream_response(self, send) -> None:
        if self.hold_headers:
            try:
                first = await anext(aiter(self.body_iterator))
            except _RejectedBeforeFirstChunk as e:
                await error_response(e.error.status, e.error.message, e.error.param, e.error.code,
                                     e.error.headers)({"type": "http"}, None, send)
                return
            except StopAsyncIteration:
                first = None
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if first is not None:
                await send({"type": "http.response.body", "body": first, "more_body": True})
        else:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            try:
                async with asyncio.timeout(self.write_timeout):
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except TimeoutError:
                log.warning("a streaming client read nothing for %.0fs; ending its request", self.write_timeout)
                self.session.expire("client_stalled")
                raise ClientDisconnect() from None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.session.close()


async def _stream(session: Session, on_output: Callable[[int, RequestOutput], list[bytes]],
                  usage_chunk: Callable[[], bytes] | None) -> AsyncIterator[bytes]:
    """SSE body: chunks, then usage if asked, then [DONE]; errors become an error event before [DONE]."""
    sent = False
    try:
        async for i, out in session.outputs():
            if session.reason is not None:
                break
            if rejected(out):
                err = session.state.queue_wait_error()
                session.state.count_refusal(err, session.tenant)
                if not sent:
                    raise _RejectedBeforeFirstChunk(err)
                raise err
            for chunk in on_output(i, out):
                sent = True
                yield chunk
        if session.reason is not None:
            raise session.error()
        session.completed = True
        if usage_chunk is not None:
            yield usage_chunk()
    except ApiError as e:
        session.expire("error")
        yield sse(e.body())
    except EngineDeadError as e:
        session.expire("error")
        yield sse(ApiError.from_engine_dead(e).body())
    except ParamError as e:
        session.expire("error")
        yield sse(ApiError.from_param_error(e).body())
    except _RejectedBeforeFirstChunk:
        session.expire("error")
        raise
    except Exception:  # noqa: BLE001 - never a traceback to the client; the log has it
        log.exception("stream failed")
        session.expire("error")
        yield sse(error_body(500, "internal server error", code="internal_error"))
    yield SSE_DONE


async def generate(request: Request, session: Session, stream: bool,
                   on_output: Callable[[int, RequestOutput], list[bytes]], usage_chunk: Callable[[], bytes] | None,
                   respond: Callable[[list[RequestOutput]], Response]) -> Response:
    if stream:
        return SSEResponse(_stream(session, on_output, usage_chunk), session, session.state.config.write_timeout,
                           hold_headers=session.state.info.max_queue_wait_s is not None)
    try:
        finals = await session.collect(request)
        return respond(finals)
    except EngineDeadError as e:
        raise ApiError.from_engine_dead(e) from None
    except ParamError as e:
        raise ApiError.from_param_error(e) from None
    finally:
        session.close("error")
