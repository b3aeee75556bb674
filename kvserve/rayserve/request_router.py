"""KV-aware routing as Ray Serve's custom request router: kvserve.router.policy, fed by Ray's own replica stats.

Each engine replica reports its prefix-cache summary (block hashes, load) through Ray Serve's `record_routing_stats`;
the ingress hashes each prompt as the engine would and passes the hashes with the call (kwargs `block_hashes`,
`session_id`, `avoid`); this router scores the candidate replicas with the same policy, weights and balance
thresholds as `kvserve router`, counting the requests it has sent and not yet seen finish.
"""

from __future__ import annotations

import logging
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvserve.rayserve.stats import ReplicaSummary
from kvserve.router.config import RoutingPolicy
from kvserve.router.policy import BackendState, choose

log = logging.getLogger("kvserve.rayserve")

HASHES_KWARG = "block_hashes"
SESSION_KWARG = "session_id"
AVOID_KWARG = "avoid"  # replica ids that answered 503 to this request (tried last)


class KVRequestRouter(RequestRouter):
    def initialize_state(self, **policy) -> None:
        """`policy`: RoutingPolicy's fields (policy, prefix_weight, load_weight, balance_*_threshold)."""
        self._config = RoutingPolicy(**policy)
        self._states: dict[str, BackendState] = {}  # by replica unique id
        self._versions: dict[str, str] = {}
        self._routed: dict[str, tuple[str, list[bytes]]] = {}  # internal request id -> (replica, hashes)
        self._turn = 0

    def _state(self, replica: RunningReplica) -> BackendState:
        rid = replica.replica_id.unique_id
        state = self._states.get(rid)
        if state is None:
            state = self._states[rid] = BackendState(url=rid, healthy=True)
        summary = ReplicaSummary.from_stats(replica.routing_stats)
        if summary is not None:
            if self._versions.get(rid) != summary.version:
                state.hashes = summary.hash_set()
                self._versions[rid] = summary.version
            state.num_running, state.num_waiting, state.kv_usage = (summary.num_running, summary.num_waiting,
                                                                     summary.kv_usage)
        return state

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        hashes = kwargs.get(HASHES_KWARG) or []
        avoid = set(kwargs.get(AVOID_KWARG) or ())
        states = [self._state(r) for r in candidate_replicas]
        exclude = frozenset(i for i, r in enumerate(candidate_replicas) if r.replica_id.unique_id in avoid)
        if len(exclude) == len(candidate_replicas):
            exclude = frozenset()
        choice = choose(states, hashes, kwargs.get(SESSION_KWARG), self._config, self._turn, exclude)
        self._turn += 1
        first = candidate_replicas[choice.index]
        if pending_request is not None:
            # counted from now on: Ray calls on_request_routed only in its strict max_ongoing_requests mode, and
            # the next request may be chosen before this one is sent
            self._record(pending_request.metadata.internal_request_id, first.replica_id.unique_id, hashes)
        # the rest, idlest first, in case the chosen one rejects the request (Ray's max_ongoing_requests)
        rest = sorted((r for i, r in enumerate(candidate_replicas) if i != choice.index),
                      key=lambda r: self._states[r.replica_id.unique_id].load)
        return [[first], rest] if rest else [[first]]

    def _record(self, request_id: str, rid: str, hashes: list[bytes]) -> None:
        self._forget(request_id)
        state = self._states.get(rid)
        if state is not None:
            state.begin(hashes)
            self._routed[request_id] = (rid, hashes)

    def _forget(self, request_id: str) -> None:
        routed = self._routed.pop(request_id, None)
        if routed is not None and routed[0] in self._states:
            self._states[routed[0]].end(routed[1])

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Strict mode: where the request really went (another rank than the first, if the first refused)."""
        self._record(pending_request.metadata.internal_request_id, replica_id.unique_id,
                     pending_request.kwargs.get(HASHES_KWARG) or [])

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._forget(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._states.pop(replica_id.unique_id, None)
        self._versions.pop(replica_id.unique_id, None)
