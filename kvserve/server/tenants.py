"""Tenants: who a request is served for (from its API key, never from a body field), each tenant's fair-share
weight, priority cap and admission limits (concurrent sequences, tokens per minute) with Retry-After computed from
the tenant's own budget. Loaded once from `--tenants FILE` (TOML) and validated at start-up."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
import tomllib
from collections import deque
from dataclasses import dataclass, field

from kvserve.config import ConfigError
from kvserve.core.request import DEFAULT_TENANT
from kvserve.engine.protocol import MAX_TENANT_CHARS, RequestRouting
from kvserve.server.errors import ApiError

TENANT_FIELDS = ("api_keys", "weight", "max_concurrent_requests", "max_tokens_per_minute", "priority_cap",
                 "max_pinned_tokens")
RATE_WINDOW_S = 60.0
# tokens reserved against a token-rate limit for a request without max_tokens, corrected when it finishes
DEFAULT_OUTPUT_ESTIMATE = 256
_HEX64 = re.compile(r"[0-9a-f]{64}")
TENANT_SCOPE_KEY = "kvserve_tenant"  # the ASGI scope's state entry the auth middleware fills


def hash_key(key: str) -> str:
    """The form a tenants file stores an API key in (`kvserve tenants hash-key` prints it)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    key_hashes: tuple[str, ...] = ()
    weight: float = 1.0  # VTC fair share: service is split between backlogged tenants in proportion to weight
    max_concurrent_requests: int | None = None  # sequences in flight (prompts x n), like --max-queued-requests
    max_tokens_per_minute: int | None = None  # prompt + output tokens over a sliding 60 s window
    priority_cap: int | None = None  # the most urgent priority this tenant may ask for (lower = more urgent)
    max_pinned_tokens: int | None = None  # KV its idle agent sessions may keep pinned (oldest pin goes first)

    def clamp_priority(self, priority: int) -> int:
        return priority if self.priority_cap is None else max(priority, self.priority_cap)


DEFAULT = Tenant(DEFAULT_TENANT)


@dataclass(frozen=True)
class RequestScope:
    """Whose a request is and how it is scheduled: the tenant (from the API key), the priority it runs at (after
    the tenant's cap), and an agent session whose KV stays pinned between turns."""

    tenant: Tenant = DEFAULT
    priority: int = 0
    session_id: str | None = None
    kv_pin_seconds: float = 0.0

    def routing(self, cache_salt: str | None) -> RequestRouting:
        return RequestRouting(cache_salt, self.priority, self.tenant.name, self.session_id, self.kv_pin_seconds)


def request_tenant(request) -> Tenant:
    """The tenant the auth middleware found for this request's API key (never from the body)."""
    return request.scope["state"][TENANT_SCOPE_KEY]


@dataclass(frozen=True)
class TenantsConfig:
    tenants: tuple[Tenant, ...]

    def identify(self, key: bytes) -> Tenant | None:
        """The tenant owning `key` (the raw bearer token); every stored hash is compared, in constant time."""
        digest = hashlib.sha256(key).hexdigest().encode()
        found = None
        for t in self.tenants:
            for h in t.key_hashes:
                if hmac.compare_digest(digest, h.encode()):
                    found = t
        return found

    def weights(self) -> tuple[tuple[str, float], ...]:
        return tuple((t.name, t.weight) for t in self.tenants)

    def pin_caps(self) -> tuple[tuple[str, int], ...]:
        return tuple((t.name, t.max_pinned_tokens) for t in self.tenants if t.max_pinned_tokens is not None)

    def get(self, name: str) -> Tenant:
        return next((t for t in self.tenants if t.name == name), DEFAULT)


def load_tenants(path: str) -> TenantsConfig:
    """Parse and validate a tenants file; every problem is reported with the tenant and field it is in."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read tenants file {path!r}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"tenants file {path!r} is not valid TOML: {e}") from e
    errors: list[str] = []
    extra = sorted(set(data) - {"tenants"})
    if extra:
        errors.append(f"unknown top-level key(s) {', '.join(extra)} (tenants go in [tenants.<name>] tables)")
    table = data.get("tenants")
    if not isinstance(table, dict) or not table:
        errors.append("no tenants: define at least one [tenants.<name>] table")
        table = {}
    tenants, seen_hashes = [], {}
    for name, spec in table.items():
        where = f"tenant {name!r}"
        if not name or len(name) > MAX_TENANT_CHARS or not name.isprintable():
            errors.append(f"{where}: a name must be 1-{MAX_TENANT_CHARS} printable characters")
        if not isinstance(spec, dict):
            errors.append(f"{where}: must be a table of {', '.join(TENANT_FIELDS)}")
            continue
        unknown = sorted(set(spec) - set(TENANT_FIELDS))
        if unknown:
            errors.append(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(TENANT_FIELDS)})")
        keys = spec.get("api_keys")
        if not isinstance(keys, list) or not keys:
            errors.append(f"{where}: api_keys must be a non-empty list of sha256 hex digests")
            keys = []
        for k in keys:
            if not isinstance(k, str) or not _HEX64.fullmatch(k):
                errors.append(f"{where}: api_keys holds {str(k)[:8]!r}..., not a sha256 hex digest (64 lowercase "
                              "hex characters; `kvserve tenants hash-key` prints one; never store raw keys)")
            elif k in seen_hashes:
                errors.append(f"{where}: an api_keys entry is also a key of tenant {seen_hashes[k]!r}")
            else:
                seen_hashes[k] = name
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            errors.append(f"{where}: weight must be a positive number, got {weight!r}")
        for fld in ("max_concurrent_requests", "max_tokens_per_minute"):
            v = spec.get(fld)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                errors.append(f"{where}: {fld} must be a positive integer, got {v!r}")
        pinned = spec.get("max_pinned_tokens")
        if pinned is not None and (isinstance(pinned, bool) or not isinstance(pinned, int) or pinned < 0):
            errors.append(f"{where}: max_pinned_tokens must be a non-negative integer, got {pinned!r}")
        cap = spec.get("priority_cap")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int)):
            errors.append(f"{where}: priority_cap must be an integer, got {cap!r}")
        if not errors:
            tenants.append(Tenant(name, tuple(keys), float(weight), spec.get("max_concurrent_requests"),
                                  spec.get("max_tokens_per_minute"), cap, pinned))
    if errors:
        raise ConfigError(f"tenants file {path!r}: " + "; ".join(errors))
    return TenantsConfig(tuple(tenants))


@dataclass
class _Usage:
    """One tenant's live admission state."""

    in_flight: dict[int, float] = field(default_factory=dict)  # ticket -> start time (monotonic)
    sequences: int = 0
    window: deque = field(default_factory=deque)  # [time, tokens] per request, oldest first
    mean_duration: float | None = None  # EWMA of finished requests' seconds, for concurrency Retry-After


@dataclass
class Ticket:
    """A request's hold on its tenant's limits, given back by TenantLimits.release."""

    tenant: Tenant
    cost: int
    id: int
    window_entry: list | None = None


class TenantLimits:
    """Per-tenant concurrent-sequence and token-rate limits; a refusal is a 429 whose Retry-After is when this
    tenant's own budget frees up (its oldest request's expected end, or its window's oldest tokens expiring)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[str, _Usage] = {}
        self._ids = 0

    def _u(self, tenant: Tenant) -> _Usage:
        return self._usage.setdefault(tenant.name, _Usage())

    def in_flight(self, tenant: Tenant) -> int:
        return self._u(tenant).sequences

    def acquire(self, tenant: Tenant, cost: int) -> Ticket:
        """Take `cost` concurrent sequences or raise 429 (tenant_concurrency_limit)."""
        u, limit = self._u(tenant), tenant.max_concurrent_requests
        if limit is not None:
            if cost > limit:
                raise ApiError(400, f"this request needs {cost} sequences (prompts x n) but tenant "
                                    f"{tenant.name!r} may run at most {limit} at a time", "n", "invalid_value")
            if u.sequences + cost > limit:
                raise ApiError(429, f"tenant {tenant.name!r} has {u.sequences} sequences in flight (limit {limit}); "
                                    "retry later", code="tenant_concurrency_limit",
                               headers={"Retry-After": str(self._concurrency_retry(u))})
        self._ids += 1
        u.in_flight[self._ids] = self.clock()
        u.sequences += cost
        return Ticket(tenant, cost, self._ids)

    def _concurrency_retry(self, u: _Usage) -> int:
        """Seconds until the tenant's oldest running request is expected to end (by its mean duration)."""
        if u.mean_duration is None or not u.in_flight:
            return 1
        oldest = min(u.in_flight.values())
        return max(1, math.ceil(oldest + u.mean_duration - self.clock()))

    def reserve_tokens(self, ticket: Ticket, tokens: int) -> None:
        """Count `tokens` (prompt + expected output) against the token rate or raise 429 (tenant_token_rate_limit)
        with Retry-After = when enough of the window's tokens expire."""
        tenant, u, limit = ticket.tenant, self._u(ticket.tenant), ticket.tenant.max_tokens_per_minute
        if limit is None:
            return
        now = self.clock()
        while u.window and u.window[0][0] <= now - RATE_WINDOW_S:
            u.window.popleft()
        if tokens > limit:
            raise ApiError(400, f"this request needs about {tokens} tokens but tenant {tenant.name!r} may use at "
                                f"most {limit} per minute; lower max_tokens or shorten the prompt", "max_tokens",
                           "tokens_per_minute_exceeded")
        used = sum(e[1] for e in u.window)
        if used + tokens > limit:
            freed, wait = 0, RATE_WINDOW_S
            for t, n in u.window:
                freed += n
                if used - freed + tokens <= limit:
                    wait = t + RATE_WINDOW_S - now
                    break
            raise ApiError(429, f"tenant {tenant.name!r} used {used} of its {limit} tokens per minute; this request "
                                f"needs about {tokens}", code="tenant_token_rate_limit",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        ticket.window_entry = [now, tokens]
        u.window.append(ticket.window_entry)

    def release(self, ticket: Ticket, tokens_used: int | None) -> None:
        """Give the sequences back; the reservation becomes the tokens actually used (if known)."""
        u = self._u(ticket.tenant)
        start = u.in_flight.pop(ticket.id, None)
        if start is None:
            return
        u.sequences -= ticket.cost
        duration = self.clock() - start
        u.mean_duration = duration if u.mean_duration is None else 0.8 * u.mean_duration + 0.2 * duration
        if ticket.window_entry is not None and tokens_used is not None:
            ticket.window_entry[1] = tokens_used
