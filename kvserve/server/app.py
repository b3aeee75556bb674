"""The FastAPI app: `build_app(engine, config)`. Generation routes live in completions.py and chat.py; this file has
the small routes (models, health, metrics, tokenize, detokenize), the auth/status middleware and the lifespan that
starts the engine (the port serves only once the model is loaded) and stops it."""

from __future__ import annotations

import asyncio
import base64
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response

from kvserve.engine.async_llm import AsyncLLM
from kvserve.engine.protocol import SUMMARY_HASH_BYTES, EngineDeadError, SessionKey
from kvserve.server import chat, completions
from kvserve.server import protocol as p
from kvserve.server.chat import apply_template
from kvserve.server.config import ServerConfig
from kvserve.server.errors import ApiError, error_response, install_handlers
from kvserve.server.inputs import check_token_ids, parse_request
from kvserve.server.responses import json_response
from kvserve.server.state import ServerState
from kvserve.server.tenants import TENANT_SCOPE_KEY, request_tenant

log = logging.getLogger("kvserve.server")

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/v1/sessions/release", "/kv/summary")
OPEN_PATHS = frozenset({"/health"})
STATS_TIMEOUT_S = 10.0

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.kvserve


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    card = p.ModelCard(id=state.model_name, root=state.info.model_name, max_model_len=state.info.max_model_len)
    return json_response(p.ModelList(data=[card]))


@router.get("/health")
async def health(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return error_response(503, "the server is shutting down", code="service_unavailable")
    if state.engine.state == "restarting":
        return error_response(503, f"the engine core is restarting: {state.engine.error}", code="engine_restarting")
    if not state.engine.is_ready:
        return error_response(503, f"the engine is not running: {state.engine.error}", code="engine_dead")
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = _state(request)
    if state.engine.is_ready:
        try:
            state.metrics.set_engine_stats(await asyncio.wait_for(state.engine.stats(), STATS_TIMEOUT_S))
        except (asyncio.TimeoutError, EngineDeadError):
            pass  # serve the last snapshot rather than fail the scrape
    state.metrics.engine_state(state.engine.state, state.engine.num_restarts)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    state = _state(request)
    req: p.TokenizeRequest = await parse_request(request, p.TokenizeRequest, state.config.max_body_bytes)
    state.check_model(req.model)
    # tokenizer work queues behind generation's: it takes a slot like a sequence
    state.admit(1, "prompt", request_tenant(request))
    try:
        tok = state.tokenizer
        if req.prompt is not None:
            state.check_text_length(len(req.prompt), "prompt")
            ids = await state.tokenize(tok.encode, req.prompt,
                                       True if req.add_special_tokens is None else req.add_special_tokens)
        else:
            messages = [m.as_template_dict() for m in req.messages or ()]
            state.check_text_length(sum(len(m["content"]) for m in messages), "messages")
            inp = await state.tokenize(apply_template, tok, messages, req.add_generation_prompt,
                                       bool(req.add_special_tokens))
            ids = inp.ids
    finally:
        state.release(1)
    return json_response(p.TokenizeResponse(count=len(ids), max_model_len=state.info.max_model_len, tokens=ids))


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    state = _state(request)
    req: p.DetokenizeRequest = await parse_request(request, p.DetokenizeRequest, state.config.max_body_bytes)
    state.check_model(req.model)
    check_token_ids(req.tokens, state.info.vocab_size, "tokens")
    state.admit(1, "tokens", request_tenant(request))
    try:
        text = await state.tokenize(state.tokenizer.decode, req.tokens, False)
    finally:
        state.release(1)
    return json_response(p.DetokenizeResponse(prompt=text))


@router.get("/kv/summary")
async def kv_summary(request: Request, since: str | None = None) -> Response:
    """The prefix-cache summary a KV-aware router polls (docs/scaleout.md): the engine's identity, its advertised
    block hashes (first SUMMARY_HASH_BYTES bytes of each, base64; null while unchanged since `since`) and its load.
    Behind the API key like the generation routes: it tells which prompts are cached."""
    state = _state(request)
    if since is not None and len(since) > 64:
        raise ApiError(400, "since: a version is at most 64 characters", "since", "invalid_value")
    try:
        s = await asyncio.wait_for(state.engine.kv_summary(since), STATS_TIMEOUT_S)
    except (asyncio.TimeoutError, EngineDeadError) as e:
        raise ApiError(503, f"the engine did not answer: {e}", code="engine_dead") from None
    info = state.info
    return json_response(p.KVSummaryResponse(
        model=state.model_name, kv_identity=info.kv_identity, block_size=info.block_size,
        hash_bytes=SUMMARY_HASH_BYTES, version=s.version,
        hashes=None if s.hashes is None else base64.b64encode(s.hashes).decode("ascii"),
        num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
        max_num_seqs=info.max_num_seqs, role=info.role))


@router.post("/v1/sessions/release")
async def release_session(request: Request) -> Response:
    """Unpin an agent session's KV now (it will not continue); only its own tenant (and cache_salt) can."""
    state = _state(request)
    req: p.ReleaseSessionRequest = await parse_request(request, p.ReleaseSessionRequest, state.config.max_body_bytes)
    key = SessionKey(request_tenant(request).name, req.cache_salt, req.session_id)
    try:
        released = await asyncio.wait_for(state.engine.release_session(key), STATS_TIMEOUT_S)
    except (asyncio.TimeoutError, EngineDeadError) as e:
        raise ApiError(503, f"the engine did not answer: {e}", code="engine_dead") from None
    return json_response(p.ReleaseSessionResponse(session_id=req.session_id, released_tokens=released))


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
            tenant = self.state.authenticate(_header(scope, b"authorization"))
            scope.setdefault("state", {})[TENANT_SCOPE_KEY] = tenant
            if path not in OPEN_PATHS and tenant is None:
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


def build_app(engine: AsyncLLM, config: ServerConfig) -> FastAPI:
    """The app; its lifespan waits for the engine core to load the model and stops it on shutdown."""
    state = ServerState(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        await state.start_engine()
        try:
            yield
        finally:
            state.expire_all("shutdown")
            await engine.shutdown()
            state.tok_pool.shutdown(wait=False)

    app = FastAPI(title="kvserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kvserve = state
    app.include_router(router)
    app.include_router(completions.router)
    app.include_router(chat.router)
    install_handlers(app)
    app.add_middleware(_GuardMiddleware, state=state)
    return app
