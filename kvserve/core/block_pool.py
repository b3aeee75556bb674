"""Fixed-size KV blocks, their reference counts, an intrusive LRU free list and the prefix-cache index."""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from kvserve.core.hashing import BlockHash


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: Block | None = None
        self.next_free: Block | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list threaded through the blocks themselves: O(1) popleft, append and removal from the middle.

    The head is the least recently freed block, so it is the first to be reused (and its cached content evicted).
    """

    def __init__(self, blocks: Iterable[Block]):
        self._head = Block(-1)
        self._tail = Block(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for b in blocks:
            self.append(b)

    def popleft(self) -> Block:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        if block.prev_free is None or block.next_free is None:
            raise ValueError(f"{block} is not in the free list")
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: Block) -> None:
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        out, b = [], self._head.next_free
        while b is not self._tail:
            out.append(b.block_id)
            b = b.next_free
        return out


class BlockPool:
    """Owns every block. Cached blocks with ref_cnt 0 sit in the free list but stay findable by hash until reused."""

    EVICTED_MEMORY = 65536  # how many evicted hashes we remember, to attribute later misses to eviction

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, Block] = {}
        self.recently_evicted: OrderedDict[BlockHash, None] = OrderedDict()
        self.num_evictions = 0
        # the cached hashes a router may be told about (rule 1: plain, exact KV only), and a counter bumped whenever
        # that set changes, so a summary is sent again only after a change
        self.advertised: dict[BlockHash, None] = {}
        self.summary_version = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> Block | None:
        return self.cached.get(block_hash)

    def was_evicted(self, block_hash: BlockHash) -> bool:
        return block_hash in self.recently_evicted

    # ------------------------------------------------------------------ mutations
    def get_new_blocks(self, n: int) -> list[Block]:
        if n > self.num_free_blocks:
            raise ValueError(f"cannot allocate {n} blocks, {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found in the cache (reviving them from the free list if unreferenced)."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[Block]) -> None:
        """Drop one reference each; blocks reaching zero join the free list tail in the given order."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: Block, block_hash: BlockHash, advertise: bool = True) -> None:
        """Register a full block under its prefix hash. A hash already cached elsewhere keeps its first block.
        `advertise`: the hash is a plain chain's (exact KV), so prefix summaries may list it."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block
        self.recently_evicted.pop(block_hash, None)
        if advertise:
            self.advertised[block_hash] = None
            self.summary_version += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (benchmarks, tests, operators). Refused while any block is referenced."""
        if self.num_used_blocks:
            return False
        for b in self.blocks:
            b.block_hash = None
        self.cached.clear()
        if self.advertised:
            self.advertised.clear()
            self.summary_version += 1
        return True

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        h = block.block_hash
        if self.cached.get(h) is block:
            del self.cached[h]
            self.num_evictions += 1
            if h in self.advertised:
                del self.advertised[h]
                self.summary_version += 1
            self.recently_evicted[h] = None
            if len(self.recently_evicted) > self.EVICTED_MEMORY:
                self.recently_evicted.popitem(last=False)
        block.block_hash = None

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        free_ids = self.free_queue.block_ids()
        assert len(free_ids) == self.free_queue.num_free_blocks, "free count out of sync with the list"
        assert len(set(free_ids)) == len(free_ids), "a block appears twice in the free list"
        free_set = set(free_ids)
        for b in self.blocks:
            if b.block_id in free_set:
                assert b.ref_cnt == 0, f"{b} is free but referenced"
            else:
                assert b.ref_cnt > 0, f"{b} is neither free nor referenced"
        for h, b in self.cached.items():
            assert b.block_hash == h, f"cache index points at {b} under another hash"
        for h in self.advertised:
            assert h in self.cached, "an advertised hash is not cached"
        for b in self.blocks:
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b, f"{b} has a hash but is not findable"
