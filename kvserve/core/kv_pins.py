"""KV pinning for agents between turns (Continuum): a finished turn's cached blocks stay referenced, so eviction
cannot take them, until its TTL runs out, the session's next turn is admitted on them, or the pin is released.

Pins hold one reference per block (like a request would), so pinned blocks count as used KV and never sit in the
free list: new allocations evict other cached blocks (finished requests' KV) first. Pinned memory is capped per tenant
and in total (the oldest pin goes first), and pins give way to real demand: the scheduler releases them, oldest
first, before it would preempt a running request or leave a waiting one unadmitted for lack of blocks. A pin thus
ranks idle sessions' KV above other cached KV, never above work that needs the memory, except for an optional
reserve (`kv_pin_reserved_fraction` of the pool) that waiting requests cannot take: under sustained load the queue is
never empty, and pins that always give way to it would all be gone before any session's next turn arrives.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvserve.core.block_pool import Block
from kvserve.core.kv_cache_manager import KVCacheManager

PinKey = tuple[str, str, str]  # (tenant, cache_salt or "", session id): one client's session never meets another's


@dataclass
class Pin:
    blocks: list[Block]
    expires_at: float
    tenant: str


@dataclass
class PinStats:
    pinned: int = 0  # pins made (cumulative)
    taken_over: int = 0  # pins a session's next turn was admitted on
    expired: int = 0
    released: int = 0  # released by the client
    evicted: int = 0  # unpinned early: a cap, or room for a running request's growth


class PinTable:
    def __init__(self, kv: KVCacheManager, max_blocks: int, tenant_max_blocks: dict[str, int] | None = None):
        self.kv = kv
        self.max_blocks = max_blocks
        self.tenant_max_blocks = dict(tenant_max_blocks or {})
        self._pins: OrderedDict[PinKey, Pin] = OrderedDict()  # oldest first
        self._tenant_blocks: dict[str, int] = {}
        self.num_blocks = 0
        self.stats = PinStats()

    def __contains__(self, key: PinKey) -> bool:
        return key in self._pins

    def __len__(self) -> int:
        return len(self._pins)

    def tenant_blocks(self, tenant: str) -> int:
        return self._tenant_blocks.get(tenant, 0)

    def pin(self, key: PinKey, blocks: list[Block], expires_at: float) -> None:
        """Take a reference on `blocks` (a finished turn's cached full blocks) until `expires_at`; a newer pin of
        the same session replaces the older one; caps are then enforced, oldest pins first."""
        if key in self._pins:
            self._drop(key, "released")
        limit = min(self.max_blocks, self.tenant_max_blocks.get(key[0], self.max_blocks))
        if not blocks or len(blocks) > limit:
            return
        self.kv.pool.touch(blocks)
        self._pins[key] = Pin(list(blocks), expires_at, key[0])
        self._tenant_blocks[key[0]] = self._tenant_blocks.get(key[0], 0) + len(blocks)
        self.num_blocks += len(blocks)
        self.stats.pinned += 1
        cap = self.tenant_max_blocks.get(key[0])
        while cap is not None and self._tenant_blocks[key[0]] > cap:
            self._drop(next(k for k, p in self._pins.items() if p.tenant == key[0]), "evicted")
        while self.num_blocks > self.max_blocks:
            self._drop(next(iter(self._pins)), "evicted")

    def take_over(self, key: PinKey) -> None:
        """The session's next turn now holds whatever blocks it matched: the pin's own references go."""
        if key in self._pins:
            self._drop(key, "taken_over")

    def release(self, key: PinKey) -> int:
        """Client-requested early release; the tokens that were pinned (0 if there was no pin)."""
        if key not in self._pins:
            return 0
        n = len(self._pins[key].blocks) * self.kv.block_size
        self._drop(key, "released")
        return n

    def expire(self, now: float) -> None:
        for key in [k for k, p in self._pins.items() if p.expires_at <= now]:
            self._drop(key, "expired")

    def release_oldest(self, keep: PinKey | None = None, down_to: int = 0) -> bool:
        """Unpin the oldest pin but `keep` (to make room for a request); False if there is none, or if the pins hold
        no more than `down_to` blocks (the reserve that waiting requests cannot take)."""
        if self.num_blocks <= down_to:
            return False
        key = next((k for k in self._pins if k != keep), None)
        if key is None:
            return False
        self._drop(key, "evicted")
        return True

    def _drop(self, key: PinKey, why: str) -> None:
        pin = self._pins.pop(key)
        self.kv.pool.free_blocks(reversed(pin.blocks))  # tail first, like a request's blocks
        self._tenant_blocks[pin.tenant] -= len(pin.blocks)
        self.num_blocks -= len(pin.blocks)
        setattr(self.stats, why, getattr(self.stats, why) + 1)

    def block_refs(self) -> list[int]:
        """Block ids, once per pin holding them (check_invariants counts references)."""
        return [b.block_id for p in self._pins.values() for b in p.blocks]

    def check_invariants(self) -> None:
        assert self.num_blocks == sum(len(p.blocks) for p in self._pins.values())
        assert self.num_blocks <= self.max_blocks
        for p in self._pins.values():
            assert all(b.ref_cnt > 0 and b.block_hash is not None for b in p.blocks), "a pinned block was freed"
