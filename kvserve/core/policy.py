"""Who goes next. FCFS today; priority and fair-share policies plug in here, not in Scheduler.schedule()."""

from __future__ import annotations

from collections import deque

from kvserve.core.request import Request


class FCFSPolicy:
    """Waiting requests in arrival order; preempted requests return to the front so they resume first."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self):
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

    def choose_victim(self, running: list[Request]) -> Request:
        """The newest running request is preempted first (it has the least sunk work)."""
        return running[-1]
