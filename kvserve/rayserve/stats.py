"""What an engine replica reports to Ray Serve's request routers (`record_routing_stats`), as a checked record."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvserve.engine.protocol import SUMMARY_HASH_BYTES


@dataclass(frozen=True)
class ReplicaSummary:
    version: str  # changes whenever the advertised hashes change
    hashes: bytes  # SUMMARY_HASH_BYTES per advertised (exact, plain) block hash, concatenated
    num_running: int
    num_waiting: int
    kv_usage: float

    def to_stats(self) -> dict:
        return asdict(self)

    @classmethod
    def from_stats(cls, stats: dict | None) -> "ReplicaSummary | None":
        """None for a replica that has not reported yet (or reported something else)."""
        if not stats:
            return None
        try:
            s = cls(**stats)
        except TypeError:
            return None
        if not isinstance(s.hashes, bytes) or len(s.hashes) % SUMMARY_HASH_BYTES:
            return None
        return s

    def hash_set(self) -> frozenset[bytes]:
        n = SUMMARY_HASH_BYTES
        return frozenset(self.hashes[k:k + n] for k in range(0, len(self.hashes), n))
