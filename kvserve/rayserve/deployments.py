"""The Ray Serve deployments behind `kvserve ray-serve` (docs/scaleout.md).

EngineReplica: one kvserve engine (its core in its own process, as `kvserve serve` runs it) and the same server app,
called in-process (kvserve.rayserve.asgi), so auth, validation, errors and streaming are those of `kvserve serve`.
It reports its prefix-cache summary to Ray Serve's request routers and its health to Ray's health checks.

Ingress: the HTTP entry (Ray Serve's proxy calls it). It hashes each prompt as the engines would and calls an engine
deployment through a handle; kvserve.rayserve.request_router.KVRequestRouter picks the replica. With prefill and
decode deployments it splits requests as `kvserve router` does (kvserve.router.pd).
"""

# no `from __future__ import annotations`: Ray Serve rebuilds the ingress methods' signatures for FastAPI and
# needs the annotations as objects
import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvserve.engine.protocol import SUMMARY_HASH_BYTES
from kvserve.rayserve.asgi import ResponseHead, call_app
from kvserve.rayserve.request_router import AVOID_KWARG, HASHES_KWARG, SESSION_KWARG
from kvserve.rayserve.stats import ReplicaSummary
from kvserve.router.pd import (PrefillResult, UpstreamBroken, broken_stream_event, decode_body, prefill_body,
                               prefill_only, split_stream, splittable)
from kvserve.router.prompt import CHAT_PATH, COMPLETIONS_PATH, PromptHasher
from kvserve.server.errors import ApiError, error_response, install_handlers
from kvserve.server.inputs import read_body

log = logging.getLogger("kvserve.rayserve")

FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "user-agent")
DROP_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
REPLICA_HEADER = "x-kvserve-replica"
STATS_TIMEOUT_S = 10.0
CALL_ATTEMPTS = 3  # a replica that died or answered 503 before its first byte: tried again elsewhere


class EngineReplica:
    async def __init__(self, engine_args, server_config, max_restarts: int, log_level: str):
        from kvserve.engine.async_llm import AsyncLLM
        from kvserve.engine.core_proc import MPCoreClient
        from kvserve.server.app import build_app

        self.app = build_app(AsyncLLM(MPCoreClient(engine_args, max_restarts=max_restarts, log_level=log_level)),
                             server_config)
        self.state = self.app.state.kvserve
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # the model is loaded before Ray marks the replica running
        self._summary: ReplicaSummary | None = None

    async def handle_request(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                             client: tuple[str, int] | None = None, **routing) -> AsyncIterator[object]:
        """The response to one HTTP request: a ResponseHead, then body chunks. `routing` (block hashes, session,
        replicas to avoid) is for the request router only."""
        async for item in call_app(self.app, method, path, headers, body, client or ("127.0.0.1", 0),
                                   self.replica):
            yield item

    async def info(self) -> dict:
        info = self.state.info
        return {"model": self.state.model_name, "kv_identity": info.kv_identity, "block_size": info.block_size,
                "role": info.role}

    async def record_routing_stats(self) -> dict:
        """Ray Serve calls this every request_routing_stats_period_s; the hash list is re-read only on change."""
        engine = self.state.engine
        if not engine.is_ready:
            return {}
        since = self._summary.version if self._summary is not None else None
        s = await asyncio.wait_for(engine.kv_summary(since), STATS_TIMEOUT_S)
        hashes = s.hashes if s.hashes is not None else self._summary.hashes
        self._summary = ReplicaSummary(s.version, hashes, s.num_running, s.num_waiting, s.kv_usage)
        return self._summary.to_stats()

    async def check_health(self) -> None:
        """Ray restarts a replica whose engine core is dead for good (its own restarts used up); one restarting
        its core is left to finish."""
        engine = self.state.engine
        if engine.state == "dead":
            raise RuntimeError(f"the engine core is dead: {engine.error}")

    async def __del__(self) -> None:
        self.state.request_drain()
        await self._lifespan.__aexit__(None, None, None)


class RayUpstream:
    """One engine deployment call, opened: its head, then its body chunks (kvserve.router.pd.Upstream)."""

    def __init__(self, head: ResponseHead, stream):
        self.head, self.status, self._stream = head, head.status, stream

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._stream:
                yield chunk
        except RayActorError as e:
            raise UpstreamBroken(f"{type(e).__name__}: {e}") from e

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def close(self) -> None:
        self._stream.cancel()

    def headers(self) -> dict[str, str]:
        out = {k: v for k, v in self.head.headers if k.lower() not in DROP_RESPONSE_HEADERS}
        out[REPLICA_HEADER] = self.head.replica
        return out


ingress_app = FastAPI(title="kvserve on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)
install_handlers(ingress_app)


# everything Ingress uses must be defined above it: serve.ingress pickles the class where it is decorated
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engine, prefill=None, decode=None, model: str | None = None,
                 max_body_bytes: int = 8 * 1024 * 1024):
        """`engine`: the deployment serving whole requests (None when there are only prefill and decode ones)."""
        from kvserve.model.loader import tokenizer_source
        from kvserve.model.tokenizer import Tokenizer

        self.engine, self.prefill, self.decode = engine, prefill, decode
        self.hasher = PromptHasher(Tokenizer(*tokenizer_source(model)))
        self.max_body_bytes = max_body_bytes
        self._info: dict | None = None

    async def _block_size(self) -> int | None:
        if self._info is None:
            handle = self.engine or self.decode
            try:
                self._info = await handle.info.remote()
            except (RayActorError, BackPressureError):
                return None
        return self._info["block_size"]

    async def _hashes(self, path: str, body: bytes) -> tuple[list[bytes], str | None]:
        block_size = await self._block_size()
        try:
            data = json.loads(body)
        except ValueError:
            return [], None  # the engine answers the error
        if block_size is None or not isinstance(data, dict):
            return [], None
        return await asyncio.get_running_loop().run_in_executor(
            None, self.hasher.block_hashes, path, data, block_size, SUMMARY_HASH_BYTES)

    async def _open(self, handle, path: str, body: bytes, headers: list[tuple[str, str]], client,
                    hashes: list[bytes], session: str | None) -> RayUpstream:
        """Call the deployment; a replica that dies or answers 503 before its first byte is avoided next try."""
        avoid: list[str] = []
        last = "no replica answered"
        for attempt in range(CALL_ATTEMPTS):
            stream = handle.options(stream=True).handle_request.remote(
                "POST", path, headers, body, client, **{HASHES_KWARG: hashes, SESSION_KWARG: session,
                                                        AVOID_KWARG: avoid})
            try:
                head = await stream.__anext__()
            except (RayActorError, BackPressureError) as e:
                last = f"{type(e).__name__}: {e}"
                log.warning("an engine replica failed a request before its first byte (%s); trying again", last)
                await asyncio.sleep(0.1 * (attempt + 1))
                continue
            except StopAsyncIteration:
                last = "the replica answered nothing"
                continue
            if head.status == 503 and attempt + 1 < CALL_ATTEMPTS:
                stream.cancel()
                avoid.append(head.replica)
                last = f"replica {head.replica} answered 503"
                continue
            return RayUpstream(head, stream)
        raise ApiError(503, f"no engine replica could take the request ({last})", code="no_backend")

    def _relay(self, upstream: RayUpstream) -> Response:
        async def body():
            try:
                async for chunk in upstream.chunks():
                    yield chunk
            except UpstreamBroken as e:  # the replica died mid-stream: an event stream ends with an error event
                log.warning("an engine replica broke a stream: %s", e)
                if upstream.status == 200 and upstream.head.is_event_stream:
                    yield broken_stream_event("the engine replica serving this stream died")
            finally:
                await upstream.close()

        return StreamingResponse(body(), status_code=upstream.status, headers=upstream.headers())

    async def _route(self, request: Request, path: str) -> Response:
        body = await read_body(request, self.max_body_bytes)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS]
        client = (request.client.host, request.client.port) if request.client else None
        hashes, session = await self._hashes(path, body)
        if self.prefill is not None:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if splittable(path, data):
                return await self._route_pd(path, data, headers, client, hashes, session)
        handle = self.engine or self.decode
        return self._relay(await self._open(handle, path, body, headers, client, hashes, session))

    async def _route_pd(self, path: str, data: dict, headers, client, hashes, session) -> Response:
        """Prefill on a prefill replica (first token, KV published), decode on a decode replica (kvserve.router.pd)."""
        result = None
        try:
            up = await self._open(self.prefill, path, prefill_body(path, data), headers, client, hashes, session)
            raw = await up.read()
            if 400 <= up.status < 500:  # the request itself is wrong: the decode replica would say so too
                return Response(raw, status_code=up.status, headers=up.headers())
            if up.status == 200:
                result = PrefillResult(json.loads(raw), data.get("n", 1))
        except (ApiError, UpstreamBroken, ValueError) as e:
            log.warning("prefill failed (%s); the request is served whole, recomputed by a decode replica", e)
        if result is not None and result.finished:
            body, media_type = prefill_only(result, path, data)
            return Response(body, media_type=media_type)
        if result is None or not result.continues:
            return self._relay(await self._open(self.decode, path, json.dumps(data).encode(), headers, client,
                                                hashes, session))
        body = decode_body(data, result.transfer)
        if not data.get("stream"):
            return self._relay(await self._open(self.decode, path, body, headers, client, hashes, session))
        return StreamingResponse(split_stream(result, path, data, lambda: self._open(
            self.decode, path, body, headers, client, hashes, session)), media_type="text/event-stream")

    @ingress_app.post(COMPLETIONS_PATH)
    async def completions(self, request: Request) -> Response:
        return await self._route(request, COMPLETIONS_PATH)

    @ingress_app.post(CHAT_PATH)
    async def chat(self, request: Request) -> Response:
        return await self._route(request, CHAT_PATH)

    @ingress_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS]
        handle = self.engine or self.decode
        try:
            stream = handle.options(stream=True).handle_request.remote("GET", "/v1/models", headers, b"")
            head = await stream.__anext__()
            raw = b"".join([c async for c in stream])
        except (RayActorError, BackPressureError, StopAsyncIteration) as e:
            raise ApiError(503, f"no engine replica answered: {e}", code="no_backend") from None
        return Response(raw, status_code=head.status, headers=RayUpstream(head, stream).headers())

    @ingress_app.get("/health")
    async def health(self) -> Response:
        handle = self.engine or self.decode
        try:
            await asyncio.wait_for(handle.info.remote(), STATS_TIMEOUT_S)
        except (asyncio.TimeoutError, RayActorError, BackPressureError) as e:
            return error_response(503, f"no engine replica answered: {e}", code="no_backend")
        return JSONResponse({"status": "ok"})
