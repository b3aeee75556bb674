"""`kvserve router`: an OpenAI-compatible front door for several kvserve instances (docs/scaleout.md).

Each backend's /kv/summary is polled (a full hash list only after a change); a generation request is tokenized and
hashed as the backends would, scored by kvserve.router.policy, and proxied with its bytes (the client's API key
included) streamed through unchanged. A backend that refuses the connection, or answers 503 before any byte, is left
out and the request tried on the next best; a backend whose model identity differs from the first one's is refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvserve.router.config import RouterConfig
from kvserve.router.pd import (PrefillResult, UpstreamBroken, decode_body, prefill_body, prefill_only, splittable,
                               split_stream)
from kvserve.router.policy import BackendState, Choice, NoBackend, choose
from kvserve.router.prompt import CHAT_PATH, COMPLETIONS_PATH, PromptHasher
from kvserve.server.errors import ApiError, error_response, install_handlers
from kvserve.server.inputs import read_body
from kvserve.server.protocol import KVSummaryResponse

log = logging.getLogger("kvserve.router")

FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id", "user-agent")
DROP_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
BACKEND_HEADER = "x-kvserve-backend"  # which backend (its index in --backend order) served the response


class _HttpUpstream:
    """A decode instance's streamed HTTP response, as kvserve.router.pd.split_stream reads it."""

    def __init__(self, response: httpx.Response, on_close):
        self.response, self.status, self._on_close, self._closed = response, response.status_code, on_close, False

    async def read(self) -> bytes:
        return await self.response.aread()

    async def chunks(self):
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            raise UpstreamBroken(str(e)) from e

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.response.aclose()
            self._on_close()


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        P = "kvserve_router:"
        self.routed = Counter(P + "requests_routed", "Requests sent to a backend, by why it was chosen.",
                              ["backend", "reason"], registry=self.registry)
        self.retries = Counter(P + "retries", "Requests tried again on another backend before their first byte.",
                               ["backend"], registry=self.registry)
        self.failed = Counter(P + "requests_failed", "Requests answered by the router itself (no backend left).",
                              registry=self.registry)
        self.matched = Histogram(P + "matched_prefix_blocks", "Prompt blocks the chosen backend held.",
                                 buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=self.registry)
        self.healthy = Gauge(P + "backend_healthy", "1 while a backend answers its summary and is not refused.",
                             ["backend"], registry=self.registry)
        self.in_flight = Gauge(P + "backend_in_flight", "Requests the router is streaming from a backend.",
                               ["backend"], registry=self.registry)
        self.blocks = Gauge(P + "backend_advertised_blocks", "Prefix blocks a backend's last summary listed.",
                            ["backend"], registry=self.registry)
        self.pd = Counter(P + "pd_requests", "Requests with prefill and decode instances present: split, served "
                          "whole (not splittable after the prefill, or no prefill answer) or answered by the "
                          "prefill alone (every choice ended at its first token).", ["outcome"],
                          registry=self.registry)
        self.prefill_seconds = Histogram(P + "pd_prefill_seconds", "The prefill step of split requests.",
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=self.registry)


class Router:
    """The router's state: backends, the tokenizer-backed hasher, the HTTP client, counters."""

    def __init__(self, config: RouterConfig, hasher: PromptHasher):
        self.config = config
        self.hasher = hasher
        self.backends = [BackendState(url) for url in config.urls]
        self.identity: str | None = config.kv_identity
        self.block_size: int | None = None
        self.hash_bytes = 8
        self.turn = 0
        self.metrics = RouterMetrics()
        self.client: httpx.AsyncClient | None = None
        self._pollers: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        c = self.config
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._pollers = [asyncio.create_task(self._poll_forever(i)) for i in range(len(self.backends))]

    async def stop(self) -> None:
        for t in self._pollers:
            t.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()

    # ------------------------------------------------------------------ summaries
    async def _poll_forever(self, i: int) -> None:
        while True:
            await self.poll(i)
            await asyncio.sleep(self.config.poll_interval_s)

    async def poll(self, i: int) -> None:
        """Read backend i's summary (only what changed since the version held) and update its state."""
        b, c = self.backends[i], self.config
        headers = {"authorization": f"Bearer {c.backend_api_key}"} if c.backend_api_key else {}
        params = {"since": b.version} if b.version else {}
        try:
            r = await self.client.get(f"{b.url}/kv/summary", params=params, headers=headers,
                                      timeout=c.poll_timeout_s)
            if r.status_code != 200:
                raise RuntimeError(f"/kv/summary answered {r.status_code}: {r.text[:200]}")
            s = KVSummaryResponse.model_validate(r.json())
            if s.hashes is not None and (s.hash_bytes < 1 or len(s.hashes) > 64 * 1024 * 1024):
                raise RuntimeError("/kv/summary: malformed hash list")
            raw = base64.b64decode(s.hashes, validate=True) if s.hashes is not None else None
            if raw is not None and len(raw) % s.hash_bytes:
                raise RuntimeError("/kv/summary: the hash list is not a whole number of hashes")
        except (httpx.HTTPError, RuntimeError, ValueError, ValidationError) as e:
            if b.healthy:
                log.warning("backend %d (%s) is down: %s", i, b.url, e)
            b.healthy, b.version, b.error = False, None, str(e)[:300]
            self._gauges(i)
            return
        if self.identity is None:
            self.identity, self.block_size, self.hash_bytes = s.kv_identity, s.block_size, s.hash_bytes
            log.info("model identity %s (from backend %d, %s)", s.kv_identity, i, b.url)
        if s.kv_identity != self.identity:
            if b.refused is None:
                log.error("backend %d (%s) refused: its model identity %s is not %s", i, b.url, s.kv_identity,
                          self.identity)
            b.refused = f"model identity {s.kv_identity} differs from {self.identity}"
            b.healthy = False
            self._gauges(i)
            return
        if self.block_size is None:  # the identity came from --kv-identity
            self.block_size, self.hash_bytes = s.block_size, s.hash_bytes
        b.refused = None
        b.identity = s.kv_identity
        if raw is not None:
            n = s.hash_bytes
            b.hashes = frozenset(raw[k:k + n] for k in range(0, len(raw), n))
        b.version = s.version
        b.num_running, b.num_waiting, b.kv_usage = s.num_running, s.num_waiting, s.kv_usage
        b.role = s.role
        if not b.healthy:
            log.info("backend %d (%s) is up: %d prefix blocks", i, b.url, len(b.hashes))
        b.healthy, b.error = True, None
        self._gauges(i)

    def _gauges(self, i: int) -> None:
        b, label = self.backends[i], str(i)
        self.metrics.healthy.labels(label).set(1 if b.usable else 0)
        self.metrics.in_flight.labels(label).set(b.in_flight)
        self.metrics.blocks.labels(label).set(len(b.hashes))

    # ------------------------------------------------------------------ routing
    async def route(self, request: Request, path: str) -> Response:
        body = await read_body(request, self.config.max_body_bytes)
        hashes, session = await self._hashes(path, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS}
        if self._has_role("prefill") and (self._has_role("decode") or self._has_role("both")):
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if splittable(path, data):
                return await self._route_pd(path, data, hashes, session, headers)
        upstream, choice = await self._open(path, body, headers, hashes, session, self._whole_exclude())
        return self._relay(upstream, choice, hashes)

    def _has_role(self, role: str) -> bool:
        return any(b.usable and b.role == role for b in self.backends)

    def _role_exclude(self, *roles: str) -> frozenset[int]:
        return frozenset(i for i, b in enumerate(self.backends) if b.role not in roles)

    def _whole_exclude(self) -> frozenset[int]:
        """A request served whole goes to a `both` instance, else a decode one; to a prefill one only if alone."""
        for roles in (("both",), ("both", "decode")):
            if any(self._has_role(r) for r in roles):
                return self._role_exclude(*roles)
        return frozenset()

    async def _open(self, path: str, body: bytes, headers: dict, hashes: list[bytes], session: str | None,
                    exclude: frozenset[int]) -> tuple[httpx.Response, Choice]:
        """Send the request to the best backend not excluded; one that refuses the connection, or answers 503
        before any byte, is left out and the next best tried. Raises ApiError 503 when none is left."""
        tried: set[int] = set(exclude)
        while True:
            try:
                choice = choose(self.backends, hashes, session, self.config.routing, self.turn, frozenset(tried))
            except NoBackend:
                self.metrics.failed.inc()
                detail = "; ".join(f"{b.url}: {b.refused or b.error or 'down'}" for i, b in enumerate(self.backends)
                                   if i not in exclude)
                raise ApiError(503, f"no backend can take the request ({detail})", code="no_backend") from None
            self.turn += 1
            b = self.backends[choice.index]
            self._begin(choice.index, hashes)
            try:
                upstream = await self.client.send(
                    self.client.build_request("POST", b.url + path, content=body, headers=headers), stream=True)
            except httpx.HTTPError as e:
                self._end(choice.index, hashes)
                b.healthy, b.version, b.error = False, None, f"request failed: {e}"
                log.warning("backend %d (%s) failed a request before its first byte (%s); trying another",
                            choice.index, b.url, e)
                self.metrics.retries.labels(str(choice.index)).inc()
                tried.add(choice.index)
                continue
            if upstream.status_code == 503 and any(
                    b.usable and i not in tried and i != choice.index for i, b in enumerate(self.backends)):
                await upstream.aclose()  # draining, restarting or full: another backend may take it
                self._end(choice.index, hashes)
                self.metrics.retries.labels(str(choice.index)).inc()
                tried.add(choice.index)
                continue
            self.metrics.routed.labels(str(choice.index), choice.reason).inc()
            self.metrics.matched.observe(choice.matched_blocks)
            return upstream, choice

    async def _prefill(self, path: str, data: dict, hashes: list[bytes], session: str | None,
                       headers: dict) -> PrefillResult | Response | None:
        """The prefill step: its checked result, a client error to pass on, or None (no prefill instance
        answered usefully: the request is then served whole, recomputed by a decode instance)."""
        try:
            upstream, choice = await self._open(path, prefill_body(path, data), headers, hashes, session,
                                                self._role_exclude("prefill"))
        except ApiError:
            return None
        try:
            raw = await upstream.aread()
        except httpx.HTTPError as e:
            log.warning("prefill backend %d broke its answer: %s", choice.index, e)
            return None
        finally:
            await upstream.aclose()
            self._end(choice.index, hashes)
        if 400 <= upstream.status_code < 500:  # the request itself is wrong: the decode instance would say so too
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}
            return Response(raw, status_code=upstream.status_code, headers=out)
        if upstream.status_code != 200:
            return None
        try:
            return PrefillResult(json.loads(raw), data.get("n", 1))
        except ValueError as e:
            log.warning("prefill backend %d: %s", choice.index, e)
            return None

    async def _route_pd(self, path: str, data: dict, hashes: list[bytes], session: str | None,
                        headers: dict) -> Response:
        t0 = time.monotonic()
        result = await self._prefill(path, data, hashes, session, headers)
        if isinstance(result, Response):
            return result
        if result is not None and result.finished:  # every choice ended at its first token
            self.metrics.pd.labels("prefill_only").inc()
            body, media_type = prefill_only(result, path, data)
            return Response(body, media_type=media_type)
        if result is None or not result.continues:
            # no prefill answer (or some choices ended, some not): served whole; the decode instance recomputes
            self.metrics.pd.labels("whole").inc()
            upstream, choice = await self._open(path, json.dumps(data).encode(), headers, hashes, session,
                                                self._role_exclude("decode", "both"))
            return self._relay(upstream, choice, hashes)
        self.metrics.pd.labels("split").inc()
        self.metrics.prefill_seconds.observe(time.monotonic() - t0)
        body = decode_body(data, result.transfer)
        exclude = self._role_exclude("decode", "both")
        if not data.get("stream"):
            upstream, choice = await self._open(path, body, headers, hashes, session, exclude)
            return self._relay(upstream, choice, hashes)

        async def open_decode() -> _HttpUpstream:
            upstream, choice = await self._open(path, body, headers, hashes, session, exclude)
            return _HttpUpstream(upstream, lambda: self._end(choice.index, hashes))

        return StreamingResponse(split_stream(result, path, data, open_decode), media_type="text/event-stream")

    async def _hashes(self, path: str, body: bytes) -> tuple[list[bytes], str | None]:
        if self.block_size is None or self.config.routing.policy == "round_robin":
            return [], None
        try:
            data = json.loads(body)
        except ValueError:
            return [], None  # the backend answers the error
        if not isinstance(data, dict):
            return [], None
        return await asyncio.get_running_loop().run_in_executor(
            None, self.hasher.block_hashes, path, data, self.block_size, self.hash_bytes)

    def _begin(self, i: int, hashes: list[bytes]) -> None:
        self.backends[i].begin(hashes)
        self._gauges(i)

    def _end(self, i: int, hashes: list[bytes]) -> None:
        self.backends[i].end(hashes)
        self._gauges(i)

    def _relay(self, upstream: httpx.Response, choice: Choice, hashes: list[bytes]) -> Response:
        done = [False]

        async def finish() -> None:
            if not done[0]:
                done[0] = True
                await upstream.aclose()
                self._end(choice.index, hashes)

        async def stream():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError as e:  # the backend died mid-stream: the client sees the stream end
                log.warning("backend %d broke a stream: %s", choice.index, e)
            finally:
                await finish()

        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}
        headers[BACKEND_HEADER] = str(choice.index)
        return StreamingResponse(stream(), status_code=upstream.status_code, headers=headers,
                                 background=BackgroundTask(finish))

    async def forward_get(self, request: Request, path: str) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARD_REQUEST_HEADERS}
        for i, b in enumerate(self.backends):
            if not b.usable:
                continue
            try:
                r = await self.client.get(b.url + path, headers=headers, timeout=self.config.poll_timeout_s)
            except httpx.HTTPError:
                continue
            out = {k: v for k, v in r.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS}
            out[BACKEND_HEADER] = str(i)
            return Response(r.content, status_code=r.status_code, headers=out)
        raise ApiError(503, "no healthy backend", code="no_backend")

    def status(self) -> dict:
        return {"policy": self.config.routing.policy, "kv_identity": self.identity, "block_size": self.block_size,
                "backends": [{"url": b.url, "role": b.role, "healthy": b.healthy, "refused": b.refused, "error": b.error,
                              "advertised_blocks": len(b.hashes), "pending_blocks": len(b.pending),
                              "in_flight": b.in_flight, "num_running": b.num_running, "num_waiting": b.num_waiting,
                              "kv_usage": b.kv_usage} for b in self.backends]}


def build_router_app(config: RouterConfig, hasher: PromptHasher) -> FastAPI:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per summary poll
    router = Router(config, hasher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="kvserve router", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router

    @app.post(COMPLETIONS_PATH)
    async def completions(request: Request) -> Response:
        return await router.route(request, COMPLETIONS_PATH)

    @app.post(CHAT_PATH)
    async def chat(request: Request) -> Response:
        return await router.route(request, CHAT_PATH)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await router.forward_get(request, "/v1/models")

    @app.get("/health")
    async def health() -> Response:
        if any(b.usable for b in router.backends):
            return JSONResponse({"status": "ok", "healthy_backends": sum(b.usable for b in router.backends)})
        return error_response(503, "no healthy backend", code="no_backend")

    @app.get("/router/status")
    async def status() -> Response:
        return JSONResponse(router.status())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(router.metrics.registry),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    install_handlers(app)
    return app


async def wait_for_backends(router: Router, timeout: float) -> None:
    """Tests and the CLI: until every backend has answered once (or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(b.usable or b.refused for b in router.backends):
        await asyncio.sleep(0.05)
