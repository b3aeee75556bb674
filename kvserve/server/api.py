"""OpenAI-compatible HTTP API over AsyncLLMEngine: `build_app(engine, config)` returns the FastAPI app.

Every request is parsed and validated here, before the engine sees it, so that each bad input gets an OpenAI-style
error with the right status instead of a 500. A generation request is a `Session`: it holds an admission slot, a
deadline and its engine request ids, and ending it for any reason (done, timeout, disconnect, shutdown) aborts
whatever is still running in the engine, so no KV block outlives its client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvserve.engine.async_engine import AsyncLLMEngine, EngineDeadError
from kvserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from kvserve.sampling import ParamError, SamplingParams
from kvserve.server import protocol as p
from kvserve.server.config import ServerConfig
from kvserve.server.metrics import RequestTracker, ServerMetrics

log = logging.getLogger("kvserve.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request", 500: "server_error", 503: "server_error"}
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize")
OPEN_PATHS = frozenset({"/health"})
DRAIN_LIMIT = 64 * 1024 * 1024  # an oversized body is read and dropped up to here, so the client sees the 413
BODY_READ_TIMEOUT_S = 60.0
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens this way too


class ApiError(Exception):
    """An error that becomes an OpenAI-style JSON body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------------------ parsing input
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    if not body:
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _is_type_tag(part: Any) -> bool:
    """Pydantic puts union member names ('list[int]', 'function-after[...]') in error locations; users need not."""
    return isinstance(part, str) and ("[" in part or "(" in part)


def validation_error(e: ValidationError) -> ApiError:
    errors = e.errors(include_url=False, include_input=False)
    err = errors[0]
    loc = [str(x) for x in err["loc"] if not _is_type_tag(x)]
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "unsupported_parameter":
        loc.append(str(ctx.get("name")))
        path = ".".join(loc)
        detail = f" ({ctx['detail']})" if ctx.get("detail") else ""
        return ApiError(400, f"unsupported parameter: {path}{detail}", path, "unsupported_parameter")
    if not loc and ctx.get("param"):  # a model-level check that names its parameter in the message already
        return ApiError(400, err["msg"], str(ctx["param"]), "invalid_value")
    path = ".".join(loc)
    if kind == "extra_forbidden":
        return ApiError(400, f"unsupported parameter: {path}", path, "unsupported_parameter")
    if kind == "missing":
        return ApiError(400, f"missing required parameter: {path}", path, "missing_required_parameter")
    message = f"{path}: {err['msg']}" if path else err["msg"]
    return ApiError(400, message, path or None, "invalid_value")


def parse_model(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None


async def read_body(request: Request, cap: int) -> bytes:
    """The body, or 413 past `cap` bytes (checked on Content-Length first and again while reading)."""
    declared = request.headers.get("content-length")
    too_big = False
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header", code="invalid_request")
        too_big = int(declared) > cap
    chunks, size = [], 0
    async with asyncio.timeout(BODY_READ_TIMEOUT_S):
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                too_big = True
            if too_big:
                if size > DRAIN_LIMIT:
                    break
                continue
            chunks.append(chunk)
    if too_big:
        raise ApiError(413, f"the request body is larger than the limit of {cap} bytes", code="request_too_large")
    return b"".join(chunks)


# ------------------------------------------------------------------------------------------------------- server state
@dataclass(frozen=True)
class EngineInput:
    text: str | None
    ids: list[int]

    def engine_prompt(self) -> dict:
        return {"prompt_token_ids": self.ids, "prompt": self.text}


class ServerState:
    """Everything the routes share; one per app, no module globals, so tests can build several apps."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig):
        core = engine.engine
        self.engine = engine
        self.config = config
        self.model_name = config.served_model_name or core.model_name
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.vocab_size = core.model_config.vocab_size
        self.kv_capacity_tokens = core.kv_manager.pool.num_blocks * core.cache_config.block_size
        # a text longer than this cannot fit in the context whatever it tokenizes to (no token is longer)
        self.max_prompt_chars = self.max_model_len * max(map(len, self.tokenizer.hf.get_vocab()), default=64)
        self.capacity = core.scheduler_config.max_num_seqs + config.max_queued_requests
        self.metrics = ServerMetrics(self.model_name)
        self.api_key = config.api_key.encode() if config.api_key else None
        self.in_flight = 0
        self.draining = False
        self.sessions: set[Session] = set()
        self.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-tok")  # one tokenizer user at a time
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def check_auth(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        # compare even on a bad scheme so timing does not tell the two failures apart
        ok = hmac.compare_digest(token.strip().encode("utf-8", "replace"), self.api_key)
        return ok and scheme.lower() == "bearer"

    async def tokenize(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.tok_pool, fn, *args)

    def validate_input(self, inp: EngineInput, params: SamplingParams, names: dict[str, str]) -> None:
        try:
            self.engine.engine.validate_prompt_ids(inp.ids, params)
        except ParamError as e:
            code = "context_length_exceeded" if "context length" in str(e) else "invalid_value"
            raise ApiError(400, str(e), names.get(e.param, e.param), code) from None
        if len(inp.ids) + 1 > self.kv_capacity_tokens:
            raise ApiError(400, f"the prompt has {len(inp.ids)} tokens but the KV cache holds at most "
                                f"{self.kv_capacity_tokens - 1}", "prompt", "context_length_exceeded")

    def check_text_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens and the input "
                                f"has {chars} characters, more than that many tokens can hold", param,
                           "context_length_exceeded")

    # ---------------------------------------------------------------- admission
    def open_session(self, cost: int, n: int, param: str) -> "Session":
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="service_unavailable")
        if not self.engine.is_running:
            raise ApiError(503, "the engine is not running", code="service_unavailable")
        if cost > self.capacity:
            raise ApiError(400, f"this request needs {cost} sequences (prompts x n) but the server admits at most "
                                f"{self.capacity} at a time", param, "invalid_value")
        if self.in_flight + cost > self.capacity:
            raise ApiError(429, f"the server is busy ({self.in_flight} sequences in flight, limit {self.capacity}); "
                                "retry later", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)})
        return Session(self, cost, n)

    # ---------------------------------------------------------------- shutdown
    def request_drain(self) -> None:
        """Called from the SIGTERM handler (any thread)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d requests in flight get %.0fs to finish", len(self.sessions),
                 self.config.shutdown_timeout)
        asyncio.get_running_loop().call_later(self.config.shutdown_timeout, self.expire_all, "shutdown")

    def expire_all(self, reason: str) -> None:
        for s in list(self.sessions):
            s.expire(reason)


class Session:
    """One generation request: admission slot, deadline, engine streams (one task per prompt) and metrics."""

    def __init__(self, state: ServerState, cost: int, n: int):
        self.state, self.cost, self.n = state, cost, n
        self.ids: list[str] = []
        self.trackers: list[RequestTracker] = []
        self.tasks: list[asyncio.Task] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reason: str | None = None
        self.completed = False
        self.closed = False
        state.in_flight += cost
        state.metrics.in_flight.set(state.in_flight)
        state.sessions.add(self)
        timeout = state.config.request_timeout
        self.timer = asyncio.get_running_loop().call_later(timeout, self.expire, "timeout") if timeout else None

    def start(self, base_id: str, inputs: list[EngineInput], params: SamplingParams, salt: str | None) -> None:
        for i, inp in enumerate(inputs):
            rid = f"{base_id}-{i}"
            self.ids.append(rid)
            self.trackers.append(self.state.metrics.tracker(self.n))
            self.tasks.append(asyncio.create_task(self._pump(i, rid, inp, params, salt)))

    async def _pump(self, i: int, rid: str, inp: EngineInput, params: SamplingParams, salt: str | None) -> None:
        # No await between this check and the engine's add: an expire() that ran first means we never start.
        if self.reason is not None:
            self.queue.put_nowait((i, None))
            return
        try:
            async for out in self.state.engine.generate(inp.engine_prompt(), params, rid, cache_salt=salt):
                self.trackers[i].observe(out)
                self.queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which turns it into an error response
            self.queue.put_nowait((i, e))
            return
        self.queue.put_nowait((i, None))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        live = len(self.tasks)
        while live:
            i, item = await self.queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    def expire(self, reason: str) -> None:
        """End the request early: the engine aborts each id (commands run in order, so after its add)."""
        if self.closed or self.completed:
            return
        if self.reason is None:
            self.reason = reason
        for rid in self.ids:
            self.state.engine.abort(rid)

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
        self.state.in_flight -= self.cost
        self.state.metrics.in_flight.set(self.state.in_flight)
        self.state.sessions.discard(self)

    def error(self) -> ApiError:
        """The error for a session the server ended early."""
        if self.reason == "timeout":
            return ApiError(408, f"the request did not finish within {self.state.config.request_timeout:g} seconds",
                            code="timeout")
        if self.reason == "shutdown":
            return ApiError(503, "the server shut down before the request finished", code="service_unavailable")
        if self.reason == "client_disconnect":
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
        finally:
            watcher.cancel()
        if self.reason is not None or any(f is None or _aborted(f) for f in finals):
            raise self.error()
        self.completed = True
        return finals  # type: ignore[return-value]


async def _watch_disconnect(request: Request, session: Session) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            session.expire("client_disconnect")
            return


def _aborted(out: RequestOutput) -> bool:
    return any(o.finish_reason == "abort" for o in out.outputs)


class _SSEResponse(StreamingResponse):
    """A stream whose session is closed however the response ends, even if its iterator never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(data: dict | BaseModel) -> bytes:
    if isinstance(data, BaseModel):
        data = _dump(data)
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
_OPTIONAL_KEYS = ("token_ids", "prompt_token_ids")


def _dump(model: BaseModel, keep_usage: bool = True) -> dict:
    """model_dump without the opt-in extension fields when they were not asked for."""
    data = model.model_dump()
    for key in _OPTIONAL_KEYS:
        if data.get(key, 0) is None:
            del data[key]
    for choice in data.get("choices") or ():
        for key in _OPTIONAL_KEYS:
            if choice.get(key, 0) is None:
                del choice[key]
        if "delta" in choice:  # a delta carries only what changed, as OpenAI's chunks do
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    if not keep_usage:
        data.pop("usage", None)
    return data


def _json(model: BaseModel) -> JSONResponse:
    return JSONResponse(_dump(model))


# ---------------------------------------------------------------------------------------------------------- logprobs
def _lp(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def _completion_logprobs(tok, entries: Iterable[tuple[int, PositionLogprobs | None]], offset: int) \
        -> tuple[p.CompletionLogprobs, int]:
    """OpenAI's legacy logprobs object for (token id, logprobs at that position) pairs; returns it and the new offset."""
    out = p.CompletionLogprobs()
    for tid, pos in entries:
        if pos is None or tid not in pos:
            piece, value, top = tok.id_to_piece(tid), None, None
        else:
            piece = pos[tid].decoded_token or ""
            value = _lp(pos[tid].logprob)
            top = {(lp.decoded_token or ""): _lp(lp.logprob) for lp in pos.values()}
        out.tokens.append(piece)
        out.token_logprobs.append(value)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(piece)
    return out, offset


def _chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], k: int) -> p.ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid)
        if chosen is None:
            continue
        tops = sorted((lp for lp in pos.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        piece = chosen.decoded_token or ""
        content.append(p.TokenLogprob(
            token=piece, logprob=_lp(chosen.logprob), bytes=list(piece.encode("utf-8")),
            top_logprobs=[p.TopLogprob(token=lp.decoded_token or "", logprob=_lp(lp.logprob),
                                       bytes=list((lp.decoded_token or "").encode("utf-8"))) for lp in tops]))
    return p.ChatLogprobs(content=content)


def _usage(finals: Iterable[RequestOutput]) -> p.Usage:
    prompt = completion = cached = 0
    for out in finals:
        prompt += len(out.prompt_token_ids)
        completion += sum(len(o.token_ids) for o in out.outputs)
        cached += out.num_cached_tokens
    return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached))


# ------------------------------------------------------------------------------------------------------- completions
def _tokenize_prompts(tok, prompts: list, add_special_tokens: bool, echo: bool) -> list[EngineInput]:
    inputs = []
    for prompt in prompts:
        if isinstance(prompt, str):
            inputs.append(EngineInput(prompt, tok.encode(prompt, add_special_tokens=add_special_tokens)))
        else:
            text = tok.decode(prompt, skip_special_tokens=False) if echo else None
            inputs.append(EngineInput(text, list(prompt)))
    return inputs


def _check_token_ids(ids: list[int], vocab: int, param: str) -> None:
    if any(t < 0 or t >= vocab for t in ids):
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param, "invalid_value")


def _completion_choice(state: ServerState, req: p.CompletionRequest, i: int, out: RequestOutput,
                       o: CompletionOutput) -> p.CompletionChoice:
    tok, prefix = state.tokenizer, (out.prompt or "") if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        entries: list = []
        if req.echo:
            plp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            entries += list(zip(out.prompt_token_ids, plp))
        entries += list(zip(o.token_ids, o.logprobs or []))
        logprobs, _ = _completion_logprobs(tok, entries, 0)
    return p.CompletionChoice(index=i * req.n + o.index, text=prefix + o.text, logprobs=logprobs,
                              finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                              token_ids=list(o.token_ids) if req.return_token_ids else None,
                              prompt_token_ids=list(out.prompt_token_ids) if req.return_token_ids else None)


class _CompletionStreamer:
    """Per-choice state for streamed completions: echo sent, logprobs sent, text offset, finish sent."""

    def __init__(self, state: ServerState, req: p.CompletionRequest, rid: str, num_prompts: int):
        self.state, self.req, self.rid, self.created = state, req, rid, int(time.time())
        self.last: list[RequestOutput | None] = [None] * num_prompts
        self.echoed: set[int] = set()
        self.lp_sent: dict[int, int] = {}
        self.offset: dict[int, int] = {}
        self.finished: set[int] = set()

    def chunks(self, i: int, out: RequestOutput) -> list[bytes]:
        self.last[i] = out
        if _aborted(out):
            return []  # the session reports why
        result = []
        for o in out.outputs:
            index = i * self.req.n + o.index
            if index in self.finished:
                continue
            choice = self._choice(index, out, o)
            if choice is not None:
                chunk = p.CompletionChunk(id=self.rid, created=self.created, model=self.state.model_name,
                                          choices=[choice])
                result.append(_sse(_dump(chunk, self.req.include_usage_in_stream)))
        return result

    def _choice(self, index: int, out: RequestOutput, o: CompletionOutput) -> p.CompletionChoice | None:
        req, text, entries = self.req, o.delta_text, []
        if req.echo and index not in self.echoed:
            if not o.token_ids and o.finish_reason is None:
                return None  # the prompt is still being computed (its logprobs arrive chunk by chunk)
            self.echoed.add(index)
            text = (out.prompt or "") + text
            if req.logprobs is not None:
                entries += list(zip(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)))
        if req.logprobs is not None:
            sent = self.lp_sent.get(index, 0)
            new = (o.logprobs or [])[sent:]
            entries += list(zip(o.token_ids[sent:sent + len(new)], new))
            self.lp_sent[index] = sent + len(new)
        if o.finish_reason is not None:
            self.finished.add(index)
        if not text and not entries and o.finish_reason is None:
            return None
        logprobs = None
        if req.logprobs is not None:
            logprobs, self.offset[index] = _completion_logprobs(self.state.tokenizer, entries,
                                                                self.offset.get(index, 0))
        return p.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason,
                                  token_ids=list(o.delta_token_ids) if req.return_token_ids else None)

    def usage_chunk(self) -> bytes:
        chunk = p.CompletionChunk(id=self.rid, created=self.created, model=self.state.model_name, choices=[],
                                  usage=_usage(o for o in self.last if o is not None))
        return _sse(chunk)


# -------------------------------------------------------------------------------------------------------------- chat
def _apply_template(tok, messages: list[dict], add_generation_prompt: bool,
                    add_special_tokens: bool = False) -> EngineInput:
    try:
        if not add_special_tokens:
            return EngineInput(None, tok.apply_chat_template(messages, add_generation_prompt))
        text = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return EngineInput(None, tok.encode(text, add_special_tokens=True))
    except Exception as e:  # noqa: BLE001 - template errors (jinja, no template) are the caller's input problem
        raise ApiError(400, f"messages: the chat template could not be applied: {e}", "messages",
                       "invalid_value") from None


def _chat_choice(req: p.ChatCompletionRequest, o: CompletionOutput) -> p.ChatChoice:
    logprobs = _chat_logprobs(o.token_ids, o.logprobs or [], req.top_logprobs or 0) if req.logprobs else None
    return p.ChatChoice(index=o.index, message=p.AssistantMessage(content=o.text), logprobs=logprobs,
                        finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                        token_ids=list(o.token_ids) if req.return_token_ids else None)


class _ChatStreamer:
    def __init__(self, state: ServerState, req: p.ChatCompletionRequest, rid: str):
        self.state, self.req, self.rid, self.created = state, req, rid, int(time.time())
        self.last: RequestOutput | None = None
        self.started: set[int] = set()
        self.lp_sent: dict[int, int] = {}
        self.finished: set[int] = set()

    def _chunk(self, choice: p.ChatChunkChoice) -> bytes:
        chunk = p.ChatCompletionChunk(id=self.rid, created=self.created, model=self.state.model_name,
                                      choices=[choice])
        return _sse(_dump(chunk, self.req.include_usage_in_stream))

    def chunks(self, out: RequestOutput) -> list[bytes]:
        self.last = out
        if _aborted(out):
            return []
        result = []
        for o in out.outputs:
            if o.index in self.finished:
                continue
            if o.index not in self.started:  # OpenAI sends the role first, with empty content
                self.started.add(o.index)
                result.append(self._chunk(p.ChatChunkChoice(index=o.index,
                                                            delta=p.DeltaMessage(role="assistant", content=""))))
            logprobs = None
            if self.req.logprobs:
                sent = self.lp_sent.get(o.index, 0)
                new = (o.logprobs or [])[sent:]
                self.lp_sent[o.index] = sent + len(new)
                logprobs = _chat_logprobs(o.token_ids[sent:sent + len(new)], new, self.req.top_logprobs or 0)
            if o.finish_reason is not None:
                self.finished.add(o.index)
            if not o.delta_text and o.finish_reason is None and not (logprobs and logprobs.content):
                continue
            result.append(self._chunk(p.ChatChunkChoice(
                index=o.index, delta=p.DeltaMessage(content=o.delta_text or None), logprobs=logprobs,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                token_ids=list(o.delta_token_ids) if self.req.return_token_ids else None)))
        return result

    def usage_chunk(self) -> bytes:
        chunk = p.ChatCompletionChunk(id=self.rid, created=self.created, model=self.state.model_name, choices=[],
                                      usage=_usage([self.last] if self.last is not None else []))
        return _sse(chunk)


# ------------------------------------------------------------------------------------------------------- generation
async def _stream(session: Session, on_output: Callable[[int, RequestOutput], list[bytes]],
                  usage_chunk: Callable[[], bytes] | None) -> AsyncIterator[bytes]:
    """SSE body: chunks, then usage if asked, then [DONE]; errors become an error event before [DONE]."""
    try:
        async for i, out in session.outputs():
            for chunk in on_output(i, out):
                yield chunk
        if session.reason is not None:
            raise session.error()
        session.completed = True
        if usage_chunk is not None:
            yield usage_chunk()
    except ApiError as e:
        session.expire("error")
        yield _sse(e.body())
    except EngineDeadError as e:
        session.expire("error")
        yield _sse(error_body(503, str(e), code="engine_dead"))
    except ParamError as e:
        session.expire("error")
        yield _sse(error_body(400, str(e), e.param, "invalid_value"))
    except Exception:  # noqa: BLE001 - never a traceback to the client; the log has it
        log.exception("stream failed")
        session.expire("error")
        yield _sse(error_body(500, "internal server error", code="internal_error"))
    yield SSE_DONE


async def _generate(request: Request, session: Session, stream: bool,
                    on_output: Callable[[int, RequestOutput], list[bytes]], usage_chunk: Callable[[], bytes] | None,
                    respond: Callable[[list[RequestOutput]], Response]) -> Response:
    if stream:
        return _SSEResponse(_stream(session, on_output, usage_chunk), session.close)
    try:
        finals = await session.collect(request)
        return respond(finals)
    except EngineDeadError as e:
        raise ApiError(503, str(e), code="engine_dead") from None
    except ParamError as e:
        raise ApiError(400, str(e), e.param, "invalid_value") from None
    finally:
        session.close("error")


def _state(request: Request) -> ServerState:
    return request.app.state.kvserve


async def _parse(request: Request, cls: type[BaseModel]) -> Any:
    state = _state(request)
    return parse_model(cls, parse_json(await read_body(request, state.config.max_body_bytes)))


def _sampling(req, names: dict[str, str]) -> SamplingParams:
    try:
        return req.sampling_params()
    except ParamError as e:
        raise ApiError(400, str(e), names.get(e.param, e.param), "invalid_value") from None


router = APIRouter()


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state = _state(request)
    req: p.CompletionRequest = await _parse(request, p.CompletionRequest)
    state.check_model(req.model)
    params = _sampling(req, {})
    prompts = req.prompts()
    for prompt in prompts:
        if isinstance(prompt, str):
            state.check_text_length(len(prompt), "prompt")
        else:
            _check_token_ids(prompt, state.vocab_size, "prompt")
    session = state.open_session(len(prompts) * params.n, params.n, "prompt" if len(prompts) > 1 else "n")
    rid = f"cmpl-{uuid.uuid4().hex}"
    log.debug("%s: %d prompt(s), user=%r", rid, len(prompts), req.user)
    try:
        inputs = await state.tokenize(_tokenize_prompts, state.tokenizer, prompts, req.add_special_tokens, req.echo)
        for inp in inputs:
            state.validate_input(inp, params, {})
        session.start(rid, inputs, params, req.cache_salt)
    except BaseException:
        session.close("error")
        raise
    streamer = _CompletionStreamer(state, req, rid, len(prompts))

    def respond(finals: list[RequestOutput]) -> Response:
        choices = [_completion_choice(state, req, i, out, o) for i, out in enumerate(finals) for o in out.outputs]
        return _json(p.CompletionResponse(id=rid, model=state.model_name, choices=choices, usage=_usage(finals)))

    return await _generate(request, session, bool(req.stream), streamer.chunks,
                           streamer.usage_chunk if req.include_usage_in_stream else None, respond)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state = _state(request)
    req: p.ChatCompletionRequest = await _parse(request, p.ChatCompletionRequest)
    state.check_model(req.model)
    names = {"logprobs": "top_logprobs", "max_tokens": req.max_tokens_param, "prompt": "messages"}
    params = _sampling(req, names)
    messages = req.template_messages()
    state.check_text_length(sum(len(m["content"]) for m in messages), "messages")
    session = state.open_session(params.n, params.n, "n")
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    log.debug("%s: %d message(s), user=%r", rid, len(messages), req.user)
    try:
        inp = await state.tokenize(_apply_template, state.tokenizer, messages, req.add_generation_prompt)
        state.validate_input(inp, params, names)
        session.start(rid, [inp], params, req.cache_salt)
    except BaseException:
        session.close("error")
        raise
    streamer = _ChatStreamer(state, req, rid)

    def respond(finals: list[RequestOutput]) -> Response:
        out = finals[0]
        return _json(p.ChatCompletionResponse(
            id=rid, model=state.model_name, choices=[_chat_choice(req, o) for o in out.outputs], usage=_usage(finals),
            prompt_token_ids=list(out.prompt_token_ids) if req.return_token_ids else None))

    return await _generate(request, session, bool(req.stream), lambda i, out: streamer.chunks(out),
                           streamer.usage_chunk if req.include_usage_in_stream else None, respond)


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    card = p.ModelCard(id=state.model_name, root=state.engine.engine.model_name, max_model_len=state.max_model_len)
    return _json(p.ModelList(data=[card]))


@router.get("/health")
async def health(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return error_response(503, "the server is shutting down", code="service_unavailable")
    if not state.engine.is_running:
        return error_response(503, "the engine is not running", code="engine_dead")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    if state.engine.is_running:
        try:
            stats = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(
                None, state.engine.call_in_engine, lambda e: e.stats()), timeout=10.0)
            state.metrics.set_engine_stats(stats)
        except (asyncio.TimeoutError, EngineDeadError):
            pass  # serve the last snapshot rather than fail the scrape
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    state = _state(request)
    req: p.TokenizeRequest = await _parse(request, p.TokenizeRequest)
    state.check_model(req.model)
    tok = state.tokenizer
    if req.prompt is not None:
        ids = await state.tokenize(tok.encode, req.prompt,
                                   True if req.add_special_tokens is None else req.add_special_tokens)
    else:
        messages = [m.as_template_dict() for m in req.messages or ()]
        inp = await state.tokenize(_apply_template, tok, messages, req.add_generation_prompt,
                                   bool(req.add_special_tokens))
        ids = inp.ids
    return _json(p.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids))


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    state = _state(request)
    req: p.DetokenizeRequest = await _parse(request, p.DetokenizeRequest)
    state.check_model(req.model)
    _check_token_ids(req.tokens, state.vocab_size, "tokens")
    text = await state.tokenize(state.tokenizer.decode, req.tokens, False)
    return _json(p.DetokenizeResponse(prompt=text))


# ------------------------------------------------------------------------------------------------------- middleware
class _GuardMiddleware:
    """Pure ASGI (so streaming and disconnects pass straight through): API-key check, then HTTP status counting."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        status = [500]

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS and not self.state.check_auth(_header(scope, b"authorization")):
                status[0] = 401
                await error_response(401, "missing or invalid API key; send `Authorization: Bearer <key>`",
                                     code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            self.state.metrics.http_response(endpoint, status[0])


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# -------------------------------------------------------------------------------------------------------------- app
async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(exc.status_code, message, code=code, headers=getattr(exc, "headers", None))


async def _request_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(400, "invalid request", code="invalid_value")


async def _client_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    return error_response(499, "the client closed the connection", code="client_closed_request")


async def _timeout_error(request: Request, exc: TimeoutError) -> Response:
    return error_response(408, "timed out reading the request", code="timeout")


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", code="internal_error")


def build_app(engine: AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    """The app; its lifespan starts the engine loop and stops it on shutdown."""
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        state.loop = loop
        # each in-flight add waits on a thread until the engine takes it; the default pool (cores + 4) is too small
        loop.set_default_executor(ThreadPoolExecutor(max_workers=64, thread_name_prefix="kvserve-io"))
        engine.start()
        try:
            yield
        finally:
            state.expire_all("shutdown")
            await loop.run_in_executor(None, engine.shutdown)
            state.tok_pool.shutdown(wait=False)

    app = FastAPI(title="kvserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kvserve = state
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(TimeoutError, _timeout_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(_GuardMiddleware, state=state)
    return app
