"""Maps requests to KV blocks: longest cached prefix, slot allocation, caching of full blocks, freeing, hit/miss stats."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from kvserve.core.block_pool import Block, BlockPool
from kvserve.core.hashing import hash_block
from kvserve.core.hashing import BlockHash
from kvserve.core.outputs import KVCompact, KVRerotate
from kvserve.core.request import Request

MISS_CAUSES = ("no_match", "short_prompt", "evicted", "different_salt")
# Salts remembered per first block. Two distinct ones already answer "is it cached under a salt other than mine?"
# for any request, and a cap keeps a client that sends a new cache_salt each time from growing the set without bound.
SALTS_PER_FIRST_BLOCK = 2


@dataclass
class PrefixMatch:
    blocks: list[Block] = field(default_factory=list)
    miss_cause: str | None = None  # None when every block that could hit did

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # requests looked up
    queried_tokens: int = 0
    hit_tokens: int = 0
    misses: Counter = field(default_factory=Counter)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.req_blocks: dict[str, list[Block]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.stats = PrefixCacheStats()
        # content hash of a first block (no salt) -> hashes of the last few salts it was cached under, as an ordered
        # set; tells "different salt" from "no match". Bounded: BlockPool.EVICTED_MEMORY keys, SALTS_PER_FIRST_BLOCK
        # salts each, stored as hash() so a long salt string is not kept alive by a metric
        self._first_block_salts: OrderedDict[bytes, dict[int, None]] = OrderedDict()

    # ------------------------------------------------------------------ lookup
    def match_prefix(self, request: Request) -> PrefixMatch:
        """Longest run of cached full blocks; never the block holding the last token (its logits are needed)."""
        if not self.enable_prefix_caching:
            return PrefixMatch()
        max_blocks = (request.num_tokens - 1) // self.block_size
        if max_blocks == 0:
            return PrefixMatch(miss_cause="short_prompt")
        blocks: list[Block] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            blocks.append(block)
        if len(blocks) == max_blocks:
            return PrefixMatch(blocks)
        missed = request.block_hashes[len(blocks)]
        if self.pool.was_evicted(missed):
            cause = "evicted"
        elif not blocks and self._other_salt_cached(request):
            cause = "different_salt"
        else:
            cause = "no_match"
        return PrefixMatch(blocks, cause)

    def cached_run(self, hashes: list[BlockHash]) -> list[Block]:
        """The pool's blocks for the leading run of `hashes` it holds (a segment's own chain)."""
        blocks = []
        for h in hashes:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def hold(self, blocks) -> None:
        """Take a reference on cached blocks a request reads from without owning them (a segment being re-rotated),
        so an allocation meanwhile cannot reuse them."""
        self.pool.touch(blocks)

    def release(self, blocks) -> None:
        self.pool.free_blocks(blocks)

    def rerotate_op(self, request: Request, segment_blocks: list[Block], segment_start: int, first: int,
                    end: int, context_len: int = 0) -> KVRerotate:
        """Copy prompt positions [first, end) from a segment's cached blocks into the request's own slots, K
        re-rotated from where the segment was computed (after `context_len` tokens of context) to where it sits.
        `segment_blocks` start at the block holding the segment's first token (at offset context_len % block_size).
        Only into the request's private blocks (rule 2)."""
        bs = self.block_size
        own = self.req_blocks[request.request_id]
        src, dst = [], []
        for p in range(first, end):
            o = p - segment_start + context_len % bs
            b = own[p // bs]
            assert b.ref_cnt == 1 and b.block_hash is None, f"re-rotation into shared or cached {b}"
            src.append(segment_blocks[o // bs].block_id * bs + o % bs)
            dst.append(b.block_id * bs + p % bs)
        return KVRerotate(request.request_id, src, dst, segment_start - context_len)

    def record_lookup(self, request: Request, match: PrefixMatch) -> None:
        if not self.enable_prefix_caching:
            return
        self.stats.queries += 1
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += match.num_blocks * self.block_size
        if match.miss_cause is not None:
            self.stats.misses[match.miss_cause] += 1

    def _first_block_key(self, request: Request) -> bytes:
        return hash_block(None, request.token_ids[: self.block_size], None)

    def _other_salt_cached(self, request: Request) -> bool:
        salts = self._first_block_salts.get(self._first_block_key(request))
        return bool(salts) and any(s != hash(request.cache_salt) for s in salts)

    def _remember_salt(self, request: Request) -> None:
        key = self._first_block_key(request)
        salts = self._first_block_salts.setdefault(key, {})
        salts.pop(hash(request.cache_salt), None)
        salts[hash(request.cache_salt)] = None  # most recent last
        if len(salts) > SALTS_PER_FIRST_BLOCK:
            del salts[next(iter(salts))]
        self._first_block_salts.move_to_end(key)
        if len(self._first_block_salts) > BlockPool.EVICTED_MEMORY:
            self._first_block_salts.popitem(last=False)

    # ------------------------------------------------------------------ allocation
    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[Block] | None = None) -> list[Block] | None:
        """Give `request` room for `num_new_tokens` more tokens after its computed (and newly matched) ones.

        Returns the newly allocated blocks, or None (and changes nothing) if the pool cannot supply them.
        """
        new_computed_blocks = new_computed_blocks or []
        blocks = self.req_blocks.get(request.request_id, [])
        total_tokens = request.num_kv_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        need = self.num_blocks_needed(total_tokens) - len(blocks) - len(new_computed_blocks)
        revive = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(need, 0) + revive > self.pool.num_free_blocks:
            return None
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(need) if need > 0 else []
        self.req_blocks[request.request_id] = blocks + new_computed_blocks + new_blocks
        if new_computed_blocks:
            self._num_cached_blocks[request.request_id] = len(blocks) + len(new_computed_blocks)
        return new_blocks

    def num_free_slots_held(self, request: Request) -> int:
        """KV slots in the request's blocks past its KV tokens: what it can write without a new block."""
        return len(self.req_blocks.get(request.request_id, ())) * self.block_size - request.num_kv_tokens

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the request's blocks past its first `num_tokens` KV slots (slots of rejected speculative drafts).
        Such blocks hold no accepted token, so none was cached; freed tail first."""
        blocks = self.req_blocks.get(request.request_id)
        keep = self.num_blocks_needed(num_tokens)
        if blocks and len(blocks) > keep:
            extra = blocks[keep:]
            del blocks[keep:]
            assert all(b.block_hash is None for b in extra), "a trimmed block was cached"
            self.pool.free_blocks(reversed(extra))

    def compact(self, request: Request, evicted: list[int]) -> KVCompact | None:
        """Drop the KV of `evicted` (ascending KV indices below request.num_kv_tokens) and pack the rest into the
        first slots: each kept token past the new length moves into an evicted slot below it (attention does not care
        about the order of past keys), emptied tail blocks go back to the pool, and a block that would be written
        (a hole filled, or the partial last block that the next tokens extend) is copied first if it is shared or
        cached (architecture rule 2), so cached blocks keep their exact KV. Freed first, so the copies can reuse them:
        the worker reads every source before it writes any destination.

        Returns None, changing nothing, when copying the shared blocks would need more blocks than the pool has (an
        exhausted pool, blocks shared with other requests): the eviction waits for a later step."""
        bs = self.block_size
        old = list(self.req_blocks[request.request_id])
        length = request.num_kv_tokens
        gone = set(evicted)
        assert len(gone) == len(evicted) and all(0 <= e < length for e in evicted), "bad eviction indices"
        final = length - len(evicted)
        holes = [e for e in evicted if e < final]
        movers = [i for i in range(final, length) if i not in gone]
        source = dict(zip(holes, movers))  # destination KV index -> source KV index
        keep = self.num_blocks_needed(final)
        written = {h // bs for h in holes}
        if final % bs:
            written.add(final // bs)  # the next tokens land in it
        # a shared block's copy needs a block from the pool; a cached one of ours frees itself first
        copies = sum(1 for bi in written if old[bi].ref_cnt > 1)
        if copies > self.pool.num_free_blocks + sum(1 for b in old[keep:] if b.ref_cnt == 1):
            return None
        blocks = old[:keep]
        self.pool.free_blocks(reversed(old[keep:]))
        src_slots, dst_slots = [], []
        for bi in sorted(written):
            b = blocks[bi]
            offsets = range(min(bs, final - bi * bs))
            if b.ref_cnt > 1 or b.block_hash is not None:  # copy-on-write: a fresh block gets all kept slots
                self.pool.free_blocks([b])
                b = blocks[bi] = self.pool.get_new_blocks(1)[0]
                pairs = [(source.get(bi * bs + o, bi * bs + o), bi * bs + o) for o in offsets]
            else:
                pairs = [(source[i], i) for i in (bi * bs + o for o in offsets) if i in source]
            for src, dst in pairs:
                src_slots.append(old[src // bs].block_id * bs + src % bs)
                dst_slots.append(b.block_id * bs + dst % bs)
        self.req_blocks[request.request_id] = blocks
        request.num_evicted_tokens += len(evicted)
        return KVCompact(request.request_id, src_slots, dst_slots, list(zip(movers, holes)), final)

    def share_blocks(self, request: Request, blocks: list[Block]) -> None:
        """Start `request` on blocks already holding its prefix (n > 1 siblings sharing the prompt)."""
        assert request.request_id not in self.req_blocks
        self.pool.touch(blocks)
        self.req_blocks[request.request_id] = list(blocks)

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Make the request's full, computed blocks findable by later requests."""
        if not self.enable_prefix_caching or request.num_evicted_tokens:
            return  # after an eviction block i no longer holds positions [i * bs, (i + 1) * bs): rule 1
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        start = self._num_cached_blocks.get(request.request_id, 0)
        end = min(num_computed_tokens // self.block_size, len(request.block_hashes), len(blocks))
        plain = request.num_plain_hashes
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i], advertise=i < plain)
        if start == 0 and end > 0:
            self._remember_salt(request)
        if end > start:
            self._num_cached_blocks[request.request_id] = end

    def prefix_summary(self, since: int | None) -> tuple[int, list[BlockHash] | None]:
        """(version, the advertised block hashes), or (version, None) when nothing changed since version `since`:
        what a KV-aware router needs to score this pool (docs/scaleout.md)."""
        version = self.pool.summary_version
        if since == version:
            return version, None
        return version, list(self.pool.advertised)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so a shared prefix outlives its private suffix in the LRU."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_blocks(self, request_id: str) -> list[Block]:
        return self.req_blocks.get(request_id, [])

    # ------------------------------------------------------------------ checks
    # ---------------------------------------------------------------- pool facts for the engine (its stats, EngineInfo)
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free or only cached)."""
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def num_evictions(self) -> int:
        return self.pool.num_evictions

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block hash; False (nothing done) while requests hold blocks."""
        return self.pool.reset_prefix_cache()

    def check_invariants(self, extra_refs: list[int] = ()) -> None:
        """`extra_refs`: block ids referenced by holders other than requests (KV pins), once per reference."""
        self.pool.check_invariants()
        refs = Counter(b.block_id for blocks in self.req_blocks.values() for b in blocks)
        refs.update(extra_refs)
        for b in self.pool.blocks:
            assert b.ref_cnt == refs.get(b.block_id, 0), f"{b}: ref_cnt != {refs.get(b.block_id, 0)} table entries"
