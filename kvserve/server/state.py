"""ServerState: what the routes share (engine front end, limits, admission, drain); one per app, no module globals."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

from kvserve.engine.async_llm import AsyncLLM
from kvserve.engine.protocol import EngineDeadError, EngineInfo
from kvserve.sampling import ParamError, SamplingParams
from kvserve.server.config import ServerConfig
from kvserve.server.errors import ApiError
from kvserve.server.inputs import EngineInput
from kvserve.server.metrics import ServerMetrics
from kvserve.server.tenants import DEFAULT as DEFAULT_TENANT
from kvserve.server.tenants import RequestScope, Tenant, TenantLimits


class _Endable(Protocol):
    """A running request the server can end (session.Session)."""

    def expire(self, reason: str) -> None: ...

log = logging.getLogger("kvserve.server")


class ServerState:
    def __init__(self, engine: AsyncLLM, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.api_key = config.api_key.encode("utf-8") if config.api_key else None
        self.in_flight = 0
        self.draining = False
        self.sessions: set[_Endable] = set()
        self.tok_pool = ThreadPoolExecutor(1, thread_name_prefix="kvserve-tok")  # one tokenizer user at a time
        self.loop: asyncio.AbstractEventLoop | None = None
        self.metrics: ServerMetrics | None = None
        self.limits = TenantLimits()

    async def start_engine(self) -> None:
        """Wait for the engine core to load the model; everything model-dependent is set from its EngineInfo."""
        await self.engine.start()
        info: EngineInfo = self.engine.info
        self.info = info
        self.model_name = self.config.served_model_name or info.model_name
        self.tokenizer = self.engine.tokenizer
        # a text longer than this cannot fit in the context whatever it tokenizes to (no token is longer)
        self.max_prompt_chars = info.max_model_len * self.tokenizer.max_token_chars
        self.capacity = info.max_num_seqs + self.config.max_queued_requests
        self.metrics = ServerMetrics(self.model_name, info)

    # ---------------------------------------------------------------- checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def authenticate(self, header: str | None) -> Tenant | None:
        """The tenant a request is served for, or None (401). Without a tenants file: the `default` tenant when the
        key matches --api-key (or none is set). With one: the tenant owning the key; --api-key, if also set, is
        the `default` tenant's. `header` is the raw Authorization value decoded as latin-1 (ASGI's
        byte-preserving decoding), so a key with non-ASCII characters is compared as the UTF-8 bytes sent."""
        tenants = self.config.tenants
        if self.api_key is None and tenants is None:
            return DEFAULT_TENANT
        scheme, _, token = (header or "").partition(" ")
        key = token.strip().encode("latin-1", "replace")
        # every comparison runs whatever the scheme, so timing does not tell the failures apart
        ok_default = self.api_key is not None and hmac.compare_digest(key, self.api_key)
        tenant = tenants.identify(key) if tenants is not None else None
        if scheme.lower() != "bearer":
            return None
        return tenant or (DEFAULT_TENANT if ok_default else None)

    def check_cache_salt(self, salt: str | None) -> None:
        if salt is None and self.config.require_cache_salt:
            raise ApiError(400, "this server requires a cache_salt on every generation request (it keeps each "
                                "tenant's prefix cache apart)", "cache_salt", "missing_required_parameter")

    def report_cached_tokens(self, salt: str | None) -> bool:
        """Cached-token counts tell a client whether someone else sent the same prefix: only with the operator's
        consent (--enable-prompt-tokens-details) or for a request that isolated itself with a cache_salt."""
        return self.config.enable_prompt_tokens_details or salt is not None

    async def tokenize(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.tok_pool, fn, *args)

    def validate_input(self, inp: EngineInput, params: SamplingParams, salt: str | None,
                       names: dict[str, str] | None = None, scope: RequestScope = RequestScope()) -> None:
        try:
            self.engine.validate(inp.ids, params, scope.routing(salt), inp.segments, inp.kv_transfer)
        except ParamError as e:
            raise ApiError.from_param_error(e, names) from None
        except EngineDeadError as e:
            raise ApiError.from_engine_dead(e) from None

    def check_text_length(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"this model's maximum context length is {self.info.max_model_len} tokens and the "
                                f"input has {chars} characters, more than that many tokens can hold", param,
                           "context_length_exceeded")

    # ---------------------------------------------------------------- admission
    def admit(self, cost: int, param: str, tenant: Tenant = DEFAULT_TENANT) -> None:
        """Take `cost` admission slots (sequences, or 1 for tokenizer work) or raise 503 / 400 / 429."""
        try:
            if self.draining:
                raise ApiError(503, "the server is shutting down", code="service_unavailable")
            if self.engine.state == "dead":
                raise ApiError(503, f"the engine is not running: {self.engine.error}", code="engine_dead")
            if cost > self.capacity:
                raise ApiError(400, f"this request needs {cost} sequences (prompts x n) but the server admits at "
                                    f"most {self.capacity} at a time", param, "invalid_value")
            if self.in_flight + cost > self.capacity:
                raise ApiError(429, f"the server is busy ({self.in_flight} sequences in flight, limit "
                                    f"{self.capacity}); retry later", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
        except ApiError as e:
            self.count_refusal(e, tenant)
            raise
        self.in_flight += cost
        self.metrics.in_flight.set(self.in_flight)

    def request_scope(self, tenant: Tenant, priority: int = 0, session_id: str | None = None,
                      kv_pin_seconds: float | None = None) -> RequestScope:
        """Tenant, priority (what the request asked for, no more urgent than the tenant's cap; the engine's
        validate_request refuses a priority under another policy) and KV pin of a generation request."""
        if self.info.scheduling_policy == "priority":
            priority = tenant.clamp_priority(priority)
        pin = kv_pin_seconds or 0.0
        if pin > self.config.max_kv_pin_seconds:
            raise ApiError(400, f"kv_pin_seconds is {pin:g} but this server pins KV for at most "
                                f"{self.config.max_kv_pin_seconds:g} seconds", "kv_pin_seconds", "invalid_value")
        return RequestScope(tenant, priority, session_id, pin)

    def count_refusal(self, e: ApiError, tenant: Tenant) -> None:
        """Every 429 and 503 the server answers instead of serving, by tenant and cause (its error code)."""
        if e.status in (429, 503):
            self.metrics.refused(tenant.name, e.status, e.code or "unknown")

    def queue_wait_error(self) -> ApiError:
        """A request the engine dropped after waiting --max-queue-wait-s without being scheduled."""
        wait = self.info.max_queue_wait_s or 1.0
        return ApiError(503, f"the request waited {wait:g} s in the engine's queue without being scheduled; the "
                             "server is overloaded, retry later", code="queue_wait_exceeded",
                        headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def release(self, cost: int) -> None:
        self.in_flight -= cost
        self.metrics.in_flight.set(self.in_flight)

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
