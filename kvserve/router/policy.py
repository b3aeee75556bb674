"""Which backend serves a request: pure Python, no I/O, tested to the exact choice (tests/router/test_policy.py).

A backend's score is prefix_weight x (the share of the request's full prompt blocks it holds, a leading run of the
hash chain) - load_weight x (its load / the busiest backend's load). While the load is out of balance (the busiest
backend has balance_abs_threshold more requests than the idlest and balance_rel_threshold times as many), the idlest
backend is chosen instead, so a hot shared system prompt cannot pile every request on one backend. With no prefix
held anywhere, a request with a session_id sticks to one backend by the session's hash, others go to the idlest.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from kvserve.router.config import RoutingPolicy


@dataclass
class BackendState:
    """What the router knows of one backend: from its last /kv/summary, plus the requests it has sent there."""

    url: str
    healthy: bool = False
    refused: str | None = None  # why it is never used (another model identity)
    identity: str | None = None
    version: str | None = None  # the summary version held (sent back as `since`)
    hashes: frozenset[bytes] = frozenset()  # its advertised block hashes (truncated)
    pending: Counter = field(default_factory=Counter)  # hashes of requests routed here and not yet finished
    in_flight: int = 0  # requests the router is streaming from it now
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    error: str | None = None  # the last poll's or request's failure
    role: str = "both"  # P/D disaggregation: prefill | decode | both (from its summary)

    @property
    def usable(self) -> bool:
        return self.healthy and self.refused is None

    @property
    def load(self) -> int:
        """Requests on it: the router's own live count, or the backend's if other clients add more."""
        return max(self.in_flight, self.num_running + self.num_waiting)

    def begin(self, hashes: list[bytes]) -> None:
        """A request with these prompt hashes was sent here."""
        self.in_flight += 1
        self.pending.update(hashes)

    def end(self, hashes: list[bytes]) -> None:
        """... and has finished (its blocks are in the summary from now on, if they stayed cached)."""
        self.in_flight = max(self.in_flight - 1, 0)
        self.pending.subtract(hashes)
        for h in hashes:
            if self.pending[h] <= 0:
                del self.pending[h]

    def matched_blocks(self, hashes: list[bytes]) -> int:
        """How many leading blocks of the request's chain it holds (or will, once the requests sent there run)."""
        n = 0
        for h in hashes:
            if h not in self.hashes and not self.pending[h]:
                break
            n += 1
        return n


@dataclass(frozen=True)
class Choice:
    index: int
    reason: str  # prefix | balance | session | load | round_robin
    matched_blocks: int


class NoBackend(Exception):
    """Every backend is down, refused, or already tried for this request."""


def session_slot(session_id: str, n: int) -> int:
    return int.from_bytes(hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()[:8], "little") % n


def choose(backends: list[BackendState], hashes: list[bytes], session_id: str | None, config: RoutingPolicy,
           turn: int, exclude: frozenset[int] = frozenset()) -> Choice:
    """The backend for a request whose prompt has the (truncated) block `hashes`; `turn` counts requests routed
    (round robin's position); `exclude`: backends that already failed this request."""
    cands = [i for i, b in enumerate(backends) if b.usable and i not in exclude]
    if not cands:
        raise NoBackend("no healthy backend")
    matched = {i: backends[i].matched_blocks(hashes) for i in cands}
    if config.policy == "round_robin":
        i = cands[turn % len(cands)]
        return Choice(i, "round_robin", matched[i])
    load = {i: backends[i].load for i in cands}
    lo, hi = min(load.values()), max(load.values())
    if hi - lo > config.balance_abs_threshold and hi > config.balance_rel_threshold * lo:
        i = min(cands, key=lambda i: (load[i], -matched[i], i))
        return Choice(i, "balance", matched[i])
    if not hashes or max(matched.values()) == 0:
        if session_id is not None:
            i = cands[session_slot(session_id, len(cands))]
            return Choice(i, "session", 0)
        i = min(cands, key=lambda i: (load[i], i))
        return Choice(i, "load", 0)
    busiest = max(hi, 1)

    def score(i: int) -> tuple[float, int, int]:
        s = config.prefix_weight * matched[i] / len(hashes) - config.load_weight * load[i] / busiest
        return (s, -load[i], -i)

    i = max(cands, key=score)
    return Choice(i, "prefix", matched[i])
