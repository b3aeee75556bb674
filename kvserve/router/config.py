"""The router's settings (`kvserve router ...`), validated once at start-up with messages that name the flag."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from kvserve.config import require

ROUTING_POLICIES = ("kv", "round_robin")



@dataclass(frozen=True)
class RoutingPolicy:
    """kv: score each backend by the request's prefix blocks it holds minus its load, SGLang/llm-d style, switching
    to the least-loaded backend while the load is out of balance; round_robin: the baseline. The same for
    `kvserve router` and for Ray Serve's request router (`kvserve ray-serve`)."""

    policy: str = "kv"
    prefix_weight: float = 1.0  # weight of the share of the prompt's full blocks a backend holds
    load_weight: float = 0.5  # weight of a backend's load relative to the busiest one's
    balance_abs_threshold: int = 8  # out of balance when the busiest backend has this many more requests ...
    balance_rel_threshold: float = 1.5  # ... and this many times as many as the idlest: route to the idlest

    def __post_init__(self) -> None:
        require(self.policy in ROUTING_POLICIES,
                 f"--policy must be one of {', '.join(ROUTING_POLICIES)}, got {self.policy!r}")
        for name in ("prefix_weight", "load_weight"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and 0 <= v < float("inf"), f"--{name.replace('_', '-')} must be "
                     f"a non-negative number, got {v!r}")
        require(isinstance(self.balance_abs_threshold, int) and self.balance_abs_threshold >= 0,
                 f"--balance-abs-threshold must be a non-negative integer, got {self.balance_abs_threshold!r}")
        require(self.balance_rel_threshold >= 1.0,
                 f"--balance-rel-threshold must be >= 1, got {self.balance_rel_threshold!r}")


@dataclass(frozen=True)
class RouterConfig:
    """`kvserve router`: the backends, how requests are spread over them, and how they are polled."""

    backends: tuple[str, ...]
    routing: RoutingPolicy = RoutingPolicy()
    poll_interval_s: float = 0.25  # how often each backend's /kv/summary is read (unchanged ones answer small)
    poll_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0  # longest wait for a backend's next bytes
    max_body_bytes: int = 8 * 1024 * 1024
    backend_api_key: str | None = None  # the key the router polls with; clients' own keys pass through
    kv_identity: str | None = None  # None: the first backend that answers sets it; others must match

    def __post_init__(self) -> None:
        require(len(self.backends) >= 1, "give at least one --backend URL")
        require(len(set(self.backends)) == len(self.backends), "a --backend URL is listed twice")
        for url in self.backends:
            parts = urlsplit(url)
            require(parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path in ("", "/"),
                     f"--backend {url!r}: expected http(s)://host:port (no path)")
        for name in ("poll_interval_s", "poll_timeout_s", "connect_timeout_s", "request_timeout_s"):
            v = getattr(self, name)
            require(0 < v < float("inf"), f"--{name[:-2].replace('_', '-')} must be a positive number of "
                     f"seconds, got {v!r}")
        require(self.max_body_bytes >= 1024, f"--max-body-bytes must be >= 1024, got {self.max_body_bytes!r}")

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(u.rstrip("/") for u in self.backends)
