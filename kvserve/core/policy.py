"""Who goes next: the waiting queue's order and the choice of a preemption victim, one class per policy.

The scheduler decides how much runs (token budget, blocks, sequences); a policy only orders the waiting requests
and picks which running request gives its blocks back. `fcfs` is arrival order; `priority` is vLLM's request
priority (lower first, ties by arrival); `vtc` is the Virtual Token Counter (Sheng et al., OSDI'24), a
per-tenant fair share of served tokens.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Iterator

from kvserve.config import SCHEDULING_POLICIES
from kvserve.core.request import Request
# VTC's token weights: an output token costs twice a prompt token (the paper's w_p = 1, w_q = 2; decode is the
# memory-bound, per-token-expensive phase)
VTC_PROMPT_WEIGHT = 1.0
VTC_OUTPUT_WEIGHT = 2.0


class SchedulingPolicy:
    """The waiting queue. `add` is a new arrival; `add_front` is a request coming back (preempted, prefix fetched,
    an n > 1 sibling released) that should resume before new arrivals where the policy allows."""

    name = "base"

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Request]:
        raise NotImplementedError

    def add(self, request: Request) -> None:
        raise NotImplementedError

    def add_front(self, request: Request) -> None:
        raise NotImplementedError

    def peek(self) -> Request:
        raise NotImplementedError

    def pop(self) -> Request:
        raise NotImplementedError

    def remove(self, request: Request) -> bool:
        raise NotImplementedError

    def choose_victim(self, running: list[Request]) -> Request:
        """The newest running request is preempted first (it has the least sunk work)."""
        return running[-1]

    def charge(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        """Service given to `request`: prompt tokens computed (not cached, not loaded) and output tokens accepted."""

    def counters(self) -> dict[str, float]:
        """Per-tenant virtual counters (VTC); empty for policies without them."""
        return {}


class FCFSPolicy(SchedulingPolicy):
    """Waiting requests in arrival order; returning requests go to the front so they resume first."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_front(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> bool:
        try:
            self._queue.remove(request)
            return True
        except ValueError:
            return False


class PriorityPolicy(SchedulingPolicy):
    """vLLM's priority scheduling: lowest `priority` value first, ties by arrival time. A returning request keeps
    its key, so it resumes ahead of everything of its priority that arrived after it. The victim is the running
    request with the largest (priority, arrival time): the least important, newest one."""

    name = "priority"

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap))

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority, request.arrival_time, next(self._seq), request))

    add_front = add  # the key decides; a preempted request is older than later arrivals of its priority

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> bool:
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False

    def choose_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda r: (r.priority, r.arrival_time))


class VTCPolicy(SchedulingPolicy):
    """Virtual Token Counter fair share. Each tenant has a counter of the service it received, in weighted tokens
    divided by its weight; the next request admitted is the oldest of the backlogged tenant with the smallest
    counter. A tenant whose queue was empty is lifted to the smallest counter of the backlogged tenants (or, with
    none, to the counter of the last tenant served), so idling never banks credit. Backlogged tenants' service then
    differs by at most about 2x the largest single request's cost (the paper's bound; tests/core/test_policy.py).

    Charges: prompt tokens once, when admitted, only those that will be computed (prefix-cache and KV-store hits
    cost nothing; recomputation after preemption is the engine's choice, not the tenant's); output tokens as they
    are accepted."""

    name = "vtc"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self._queues: dict[str, deque[Request]] = {}
        self._counter: dict[str, float] = {}
        self._last_served = 0.0
        self._size = 0
        self._peeked: str | None = None

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Request]:
        return (r for q in self._queues.values() for r in q)

    def _queue(self, tenant: str) -> deque[Request]:
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = deque()
            self._counter.setdefault(tenant, 0.0)
        return q

    def add(self, request: Request) -> None:
        q = self._queue(request.tenant)
        if not q:
            backlogged = [self._counter[t] for t, other in self._queues.items() if other and t != request.tenant]
            floor = min(backlogged) if backlogged else self._last_served
            self._counter[request.tenant] = max(self._counter[request.tenant], floor)
        self._peeked = None
        q.append(request)
        self._size += 1

    def add_front(self, request: Request) -> None:
        self._queue(request.tenant).appendleft(request)
        self._peeked = None
        self._size += 1

    def _next_tenant(self) -> str:
        best, best_key = None, None
        for t, q in self._queues.items():
            if q:
                key = (self._counter[t], q[0].arrival_time)
                if best_key is None or key < best_key:
                    best, best_key = t, key
        if best is None:
            raise IndexError("peek from an empty queue")
        return best

    def peek(self) -> Request:
        # pop() must take this same request even if it is charged in between (the scheduler admits, then pops)
        self._peeked = self._next_tenant()
        return self._queues[self._peeked][0]

    def pop(self) -> Request:
        tenant = self._peeked if self._peeked is not None and self._queues[self._peeked] else self._next_tenant()
        self._peeked = None
        self._size -= 1
        self._last_served = self._counter[tenant]
        return self._queues[tenant].popleft()

    def remove(self, request: Request) -> bool:
        q = self._queues.get(request.tenant)
        if q is None:
            return False
        try:
            q.remove(request)
        except ValueError:
            return False
        self._peeked = None
        self._size -= 1
        return True

    def choose_victim(self, running: list[Request]) -> Request:
        """The newest request of the running tenant that received the most service."""
        top = max(self._counter.get(r.tenant, 0.0) for r in running)
        return [r for r in running if self._counter.get(r.tenant, 0.0) == top][-1]

    def charge(self, request: Request, prompt_tokens: int, output_tokens: int) -> None:
        cost = VTC_PROMPT_WEIGHT * prompt_tokens + VTC_OUTPUT_WEIGHT * output_tokens
        if cost:
            t = request.tenant
            self._counter[t] = self._counter.get(t, 0.0) + cost / self.weight(t)

    def counters(self) -> dict[str, float]:
        return dict(self._counter)


def make_policy(name: str, tenant_weights: dict[str, float] | None = None) -> SchedulingPolicy:
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy()
    if name == "vtc":
        return VTCPolicy(tenant_weights)
    raise ValueError(f"scheduling policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {name!r}")
