"""Continuous batching with stall-free chunked prefill (Sarathi-Serve) over a token budget.

There is no prefill or decode phase: every request has `num_computed_tokens` and `num_tokens`, and each step gives
running decodes their token first, then unfinished prefills a chunk, then admits waiting requests with what is left;
speculative drafts verify last, with what is left after that.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from kvserve.config import SchedulerConfig
from kvserve.core.hashing import hash_block_chain, segment_key
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.kv_pins import PinKey, PinTable
from kvserve.core.outputs import (
    KVLoad,
    KVOp,
    KVSave,
    KVSwapIn,
    KVSwapOut,
    ModelOutput,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
)
from kvserve.core.policy import SchedulingPolicy, make_policy
from kvserve.core.request import Request, RequestStatus
from kvserve.core.swap import SwapCostModel, SwappedKV, SwapSpace

log = logging.getLogger("kvserve.scheduler")

QUEUE_WAIT = "queue_wait"  # stop_reason of a request rejected by the queue-wait deadline


@dataclass
class TenantCounters:
    """Service a tenant received (cumulative): what the per-tenant metrics and fairness benchmarks read."""

    prompt_tokens_computed: int = 0
    output_tokens: int = 0
    rejected: int = 0


class RequestTooLongError(ValueError):
    def __init__(self, num_tokens: int, max_model_len: int):
        super().__init__(f"prompt has {num_tokens} tokens, more than the model's context of {max_model_len} tokens")
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class KVConnector(Protocol):
    """What the scheduler needs from a tiered KV store (kvserve.kvstore.KVStore); every call returns at once."""

    chunk_size: int

    def start_fetch(self, request_id: str, chunks: list[tuple[bytes, int]], start_token: int,
                    wait_s: float = 0.0, force: bool = False) -> None: ...  # chunks: (hash, tokens), consecutive

    def poll_finished(self) -> dict[str, object]: ...  # request id -> fetched KV (.start, .end) or None

    def cancel(self, request_id: str) -> None: ...

    def is_known(self, chunk_hash: bytes) -> bool: ...


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, policy: SchedulingPolicy | None = None,
                 connector: KVConnector | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.kv = kv_manager
        self.block_size = kv_manager.block_size
        self.waiting = policy or make_policy(config.scheduling_policy, dict(config.tenant_weights))
        self.clock = clock  # arrival times are on this clock (the queue-wait deadline compares against it)
        self.tenants: dict[str, TenantCounters] = {}
        bs = kv_manager.block_size
        self.pins = PinTable(kv_manager, int(config.kv_pin_max_fraction * kv_manager.num_blocks),
                             {t: n // bs for t, n in config.tenant_pin_max_tokens})
        self._pins_reserved = int(config.kv_pin_reserved_fraction * kv_manager.num_blocks)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # n > 1: siblings wait here until the first sequence has computed the prompt, then share its blocks
        self._held_siblings: dict[str, list[Request]] = {}
        self._finished_ids: list[str] = []
        self._ended_in_schedule: list[Request] = []  # out of blocks or rejected; reported by the next update()
        self.num_preemptions = 0
        self.step_count = 0
        # tiered KV store: requests whose prefix is being fetched wait here, holding no blocks and no budget
        self.connector = connector
        self.fetching: dict[str, Request] = {}
        # worker-side KV operations (loads into, saves out of the pool, swaps) in the order they were decided
        self._kv_ops: list[KVOp] = []
        # swap-or-recompute preemption (core/swap.py)
        self.swap = SwapSpace(config.num_swap_blocks if config.preemption_mode != "recompute" else 0)
        self.swap_cost = SwapCostModel(max(config.kv_bytes_per_block, 1))
        self._blocked_on_blocks = False  # why the last _admit returned None
        self.num_swapped_preemptions = 0
        self.num_recomputed_preemptions = 0
        self.num_computed_prompt_tokens = 0  # prompt tokens run through the model (not cached, not loaded)
        self.num_evicted_tokens = 0  # KV eviction: tokens evicted from running requests' KV
        self.num_eviction_deferrals = 0  # evictions put off a step: the pool had no block for a shared block's copy
        self.num_loaded_tokens = 0
        # CacheBlend's segment cache: the internal requests computing a segment alone, by its chain's last hash
        self._fills: dict[bytes, Request] = {}
        # segment-cache lookups, at a request's arrival (a miss is computed alone first) and at its admission (a miss
        # is computed in place: the segment was evicted meanwhile)
        self.num_segment_hits = 0
        self.num_segment_misses = 0
        self.num_blended_tokens = 0
        self.num_recomputed_tokens = 0

    # ------------------------------------------------------------------ intake
    def add_request(self, request: Request) -> None:
        if request.num_tokens >= self.config.max_model_len:
            raise RequestTooLongError(request.num_tokens, self.config.max_model_len)
        capacity = self.kv.pool.num_blocks * self.block_size
        if request.num_tokens + 1 > capacity:
            raise RequestTooLongError(request.num_tokens, capacity - 1)
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self.requests[request.request_id] = request
        self.tenants.setdefault(request.tenant, TenantCounters())
        if request.blend is not None and request.blend.use_segment_cache and self.kv.enable_prefix_caching:
            self._plan_segment_fills(request)  # queued ahead of it
        parent = request.share_prompt_with
        if parent is not None and parent.request_id in self.requests and not self._prompt_done(parent):
            self._held_siblings.setdefault(parent.request_id, []).append(request)
        elif self.config.pinned_sessions_first and request.pin_key in self.pins:
            self.waiting.add_front(request)  # Continuum: a session's next turn before new work, while its KV waits
        else:
            self.waiting.add(request)

    # ------------------------------------------------------------------ CacheBlend's segment cache
    def _plan_segment_fills(self, req: Request) -> None:
        """Each reusable segment not in the pool is computed alone first, as its own request under the segment key,
        so that this request and the next ones reuse it (KVShare: schedule for reuse). One fill per segment at a
        time, shared by every request waiting for it; a fill may itself load the segment from a KV tier."""
        ctx = req.blend.context_len
        key = req.cache_salt if ctx else segment_key(req.cache_salt)
        for j, (s, e) in enumerate(req.blend.reusable(req.num_prompt_tokens)):
            tokens = req.prompt_token_ids[:ctx] + req.prompt_token_ids[s:e]
            chain = hash_block_chain(tokens, self.block_size, key)
            if len(chain) * self.block_size <= ctx:
                chain = []  # no whole block holds a token of the segment: nothing to reuse
            req.segment_chains.append(chain)
            if not chain:
                continue
            if len(self.kv.cached_run(chain)) == len(chain):
                self.num_segment_hits += 1
                continue
            self.num_segment_misses += 1
            fill = self._fills.get(chain[-1])
            if fill is None:
                sp = req.sampling_params.replace(n=1, max_tokens=0, min_tokens=0, logprobs=None,
                                                 prompt_logprobs=None, num_speculative_tokens=0,
                                                 kv_budget_tokens=0)
                fill = Request(f"{req.request_id}\x00segment{j}", tokens, sp, self.block_size, (), req.cache_salt,
                               req.arrival_time, req.priority, tenant=req.tenant, segment_fill=True,
                               fill_in_context=ctx > 0)
                if fill.request_id in self.requests:
                    continue
                fill.segment_chains = [chain]
                self._fills[chain[-1]] = fill
                self.requests[fill.request_id] = fill
                self.waiting.add(fill)
            req.segment_fills.append(fill.request_id)

    def _segment_reuse(self, req: Request, start: int) -> list[tuple[int, int, int, list]]:
        """(first, end, segment start, cached blocks) of each run of prompt positions from `start` on whose KV the
        pool holds in a segment's own chain (its leading cached blocks; in prefix mode from the block holding its
        first token, at offset context_len % block_size there: the context's own blocks come before it)."""
        out = []
        skip, offset = divmod(req.blend.context_len, self.block_size)
        for (s, e), chain in zip(req.blend.reusable(req.num_prompt_tokens), req.segment_chains):
            if e <= start or not chain:
                continue
            blocks = self.kv.cached_run(chain)[skip:]
            lo, hi = max(s, start), min(s + len(blocks) * self.block_size - offset, e)
            if hi > lo:
                out.append((lo, hi, s, blocks))
        return out

    def _finish_now(self, req: Request, status: RequestStatus) -> None:
        self.running.remove(req)
        req.status = status
        self._release(req)
        self._ended_in_schedule.append(req)

    def _reject_stale(self) -> None:
        """Requests never scheduled within the queue-wait deadline end as rejected (the server answers 503):
        a bounded wait instead of a queue that grows without end."""
        deadline = self.clock() - self.config.max_queue_wait_s
        stale = [r for r in self.waiting
                 if r.arrival_time < deadline and r.num_preemptions == 0 and r.status == RequestStatus.WAITING]
        for req in stale:
            self.waiting.remove(req)
            req.status = RequestStatus.FINISHED_REJECTED
            req.stop_reason = QUEUE_WAIT
            self.tenants[req.tenant].rejected += 1
            self._release(req)
            self._ended_in_schedule.append(req)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request from outside the step (abort, stop string); frees its blocks at once."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.FETCHING:
            del self.fetching[request_id]
            self.connector.cancel(request_id)
        elif not self.waiting.remove(req):
            for held in self._held_siblings.values():
                if req in held:
                    held.remove(req)
        req.status = status
        self._release(req)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.fetching) + sum(len(v) for v in self._held_siblings.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def tenant_load(self) -> dict[str, tuple[int, int]]:
        """Tenant -> (sequences waiting, sequences running), for every tenant seen."""
        load = {t: [0, 0] for t in self.tenants}
        for r in self.running:
            load[r.tenant][1] += 1
        for r in self.requests.values():
            if r.status != RequestStatus.RUNNING and not r.is_finished:
                load[r.tenant][0] += 1
        return {t: (w, r) for t, (w, r) in load.items()}

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        self.step_count += 1
        self.swap.begin_step()
        if self.connector is not None and self.fetching:
            self._collect_fetches()
        if self.config.max_queue_wait_s is not None and len(self.waiting):
            self._reject_stale()
        if len(self.pins):
            self.pins.expire(self.clock())
        budget = self.config.max_num_batched_tokens
        num_new: dict[str, int] = {}
        preempted: list[Request] = []

        # 1) running requests: decodes first (a long prefill never delays them), then unfinished prefills.
        order = [r for r in self.running if not r.in_prefill] + [r for r in self.running if r.in_prefill]
        spec: dict[str, list[int]] = {}
        pending_drafts: list[tuple[Request, list[int]]] = []
        for req in order:
            if req.status != RequestStatus.RUNNING or budget <= 0:
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.config.enable_chunked_prefill and n < req.num_tokens - req.num_computed_tokens:
                continue
            if req.spec_token_ids:
                drafts, req.spec_token_ids = req.spec_token_ids, []
                if n == 1:  # drafts verify only after the last token; they get their budget in step 3
                    pending_drafts.append((req, drafts))
            while self.kv.allocate_slots(req, n) is None:
                if self.pins.release_oldest():
                    continue  # idle sessions' pins go before any running request is preempted
                if self.running == [req]:
                    # alone and still out of blocks: the pool cannot hold this sequence; end it, never spin
                    self._finish_now(req, RequestStatus.FINISHED_LENGTH)
                    break
                victim = self.waiting.choose_victim(self.running)
                budget += num_new.pop(victim.request_id, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                num_new[req.request_id] = n
                budget -= n

        # 2) waiting requests, in policy order, while tokens, sequences and blocks last.
        # only when something may be admitted: the step loop never pays for it with a full batch or an empty queue
        admitting = len(self.waiting) and len(self.running) < self.config.max_num_seqs and not preempted
        in_flight = self._blocks_in_flight() if self.kv.enable_prefix_caching and admitting else None
        deferred: list[Request] = []
        while len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            req = self.waiting.peek()
            if self.connector is not None and not req.kv_store_checked and self._start_fetch(req):
                self.waiting.pop()
                continue
            if in_flight and self._prefix_in_flight(req, in_flight):
                deferred.append(self.waiting.pop())
                continue
            if req.segment_fills and any(f in self.requests for f in req.segment_fills):
                deferred.append(self.waiting.pop())  # its segments are being computed alone: reuse them then
                continue
            if req.blend is not None and req.blend.precompute:
                self.waiting.pop()  # its segments are in the cache now: nothing more to do
                req.num_cached_tokens = sum(max(len(self.kv.cached_run(c)) * self.block_size - req.blend.context_len, 0)
                                            for c in req.segment_chains)
                req.status = RequestStatus.FINISHED_LENGTH
                self._release(req)
                self._ended_in_schedule.append(req)
                continue
            n = self._admit(req, budget)
            if n is None:
                if self._blocked_on_blocks and self.pins.release_oldest(keep=req.pin_key,
                                                                        down_to=self._pins_reserved):
                    continue  # idle sessions' pins above the reserve give way to a request that needs the memory
                break
            self.waiting.pop()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            num_new[req.request_id] = n
            budget -= n
            if in_flight is not None:
                self._add_in_flight(req, req.num_computed_tokens, in_flight)
        for req in reversed(deferred):  # back in their places, ahead of everything they were ahead of
            self.waiting.add_front(req)

        # 3) speculative drafts: only with the tokens and free blocks that prefills and admissions left over, so a
        # draft never delays a prompt (nor preempts anything); a request whose drafts do not all fit verifies fewer.
        for req, drafts in pending_drafts:
            if budget <= 0:
                break
            if num_new.get(req.request_id) != 1:
                continue  # preempted (or ended) after its decode was scheduled: nothing scheduled for it now
            drafts = drafts[:min(budget, req.max_tokens - req.num_output_tokens - 1)]
            if drafts and self.kv.allocate_slots(req, 1 + len(drafts)) is None:
                drafts = drafts[:self.kv.num_free_slots_held(req) - 1]  # what its own blocks still hold
            if drafts:
                spec[req.request_id] = drafts
                num_new[req.request_id] = 1 + len(drafts)
                budget -= len(drafts)

        # 4) several greedy decode steps in this one engine step, when nothing else is asked of it
        steps = self._decode_steps(num_new, preempted) if self.config.decode_steps > 1 and not spec else 1
        if steps > 1:
            num_new = dict.fromkeys(num_new, steps)

        scheduled = []
        for req in self.running:
            n = num_new.get(req.request_id)
            if n is None:
                continue
            start = req.num_computed_tokens
            drafts = spec.get(req.request_id, [])
            reused = [(max(lo, start), min(hi, start + n)) for lo, hi in req.blend_reused
                      if lo < start + n and hi > start]
            scheduled.append(ScheduledRequest(
                request=req, start=start, num_new_tokens=n, block_ids=self.kv.get_block_ids(req.request_id),
                sample=start + n - len(drafts) - (steps - 1) == req.num_tokens,
                prompt_logprobs=req.sampling_params.prompt_logprobs is not None and start < req.num_prompt_tokens,
                spec_token_ids=drafts, kv_start=req.num_kv_tokens, kv_budget=req.kv_budget,
                blend_reused=reused, blend_ratio=req.blend.ratio if reused else 1.0,
                key_span=req.blend.key_span() if req.blend is not None else None, decode_steps=steps,
            ))
        for sr in scheduled:
            if sr.start < sr.request.num_prompt_tokens:
                self.num_computed_prompt_tokens += min(sr.num_new_tokens, sr.request.num_prompt_tokens - sr.start)
        finished, self._finished_ids = self._finished_ids, []
        ops, self._kv_ops = self._kv_ops, []
        return SchedulerOutput(scheduled, [r.request_id for r in preempted], finished, ops)

    def _decode_steps(self, num_new: dict[str, int], preempted: list[Request]) -> int:
        """How many greedy decode steps every running request takes this engine step (1: the usual one). Several
        only while each is a plain greedy decode (argmax_only, past min_tokens, no KV budget, no blend) and nothing
        waits, so no prompt is held back by them; as many as every request's max_tokens and its blocks allow, and
        the step's token budget (each step's tokens count against it, as separate steps' would)."""
        if preempted or len(self.waiting) or self.fetching or not self.running or len(num_new) != len(self.running):
            return 1
        steps = min(self.config.decode_steps, self.config.max_num_batched_tokens // len(self.running))
        for req in self.running:
            sp = req.sampling_params
            if num_new.get(req.request_id) != 1 or req.in_prefill or not sp.argmax_only \
                    or req.num_output_tokens < sp.min_tokens or req.kv_budget or req.blend is not None:
                return 1
            steps = min(steps, req.max_tokens - req.num_output_tokens)
        if steps < 2:
            return 1
        for req in self.running:
            if self.kv.allocate_slots(req, steps) is None:  # no preemption for this: fewer steps, down to its blocks
                steps = min(steps, self.kv.num_free_slots_held(req))
        if steps < 2:  # blocks taken for more steps go back now (update trims them after a shorter run)
            for req in self.running:
                self.kv.trim(req, req.num_kv_tokens + 1)
            return 1
        return steps

    def prefill_ahead_of_drafts(self) -> list[tuple[int, int]]:
        """(KV start, tokens) of the prompt chunks the next schedule() runs before any draft (step 3 gives drafts what
        these leave): running prefills, then waiting prompts while seats last, within the token budget after one
        token per decode. An estimate for the drafter's step-cost rule: waiting prompts' cache hits are not looked up."""
        decoding = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        budget = self.config.max_num_batched_tokens - decoding
        seats = self.config.max_num_seqs - len(self.running)
        chunks = []
        prefilling = (r for r in self.running if r.num_tokens - r.num_computed_tokens > 1)
        for r in itertools.chain(prefilling, itertools.islice(self.waiting, max(seats, 0))):
            if budget <= 0:
                break
            n = min(r.num_tokens - r.num_computed_tokens, budget)
            chunks.append((r.num_kv_tokens, n))
            budget -= n
        return chunks

    # ------------------------------------------------------------------ shared prefixes being computed
    def _add_in_flight(self, req: Request, start_token: int, in_flight: set) -> None:
        """The prompt's full blocks from `start_token` on: allocated to `req`, not computed (hence not cached) yet."""
        for h in req.block_hashes[start_token // self.block_size:req.num_prompt_tokens // self.block_size]:
            in_flight.add(h)

    def _blocks_in_flight(self) -> set:
        in_flight: set = set()
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                self._add_in_flight(r, r.num_computed_tokens, in_flight)
        return in_flight

    def _prefix_in_flight(self, req: Request, in_flight: set) -> bool:
        """True if the first block `req` would compute is being computed by a running request: wait for it to be
        cached (a step or two) instead of computing the same prefix twice in parallel. Batches grouped by shared
        prefix (BatchLLM) admit a group's requests together, so without this each would prefill the prefix."""
        if req.sampling_params.prompt_logprobs is not None or req.share_prompt_with is not None:
            return False
        first = self.kv.match_prefix(req).num_blocks
        max_blocks = (req.num_tokens - 1) // self.block_size
        return first < max_blocks and req.block_hashes[first] in in_flight

    def _admit(self, req: Request, budget: int) -> int | None:
        """Match the prefix, allocate the first chunk; returns its size or None if the request cannot start now."""
        parent = req.share_prompt_with
        shared, match = [], None
        if parent is not None and not parent.is_finished and self._prompt_done(parent):
            # Only the prompt's full blocks, the tokens both sequences have: past them the parent's blocks hold its
            # own output, not a sibling's resuming after preemption. Prompt done means these blocks hold computed
            # prompt KV (a preempted parent has no blocks and 0 computed tokens until it recomputes or matches it).
            n_shared = min(req.num_tokens - 1, req.num_prompt_tokens) // self.block_size
            shared = self.kv.get_blocks(parent.request_id)[:n_shared]
        if shared and req.num_output_tokens:
            # resuming: the prefix cache (hashes cover every token) may still hold its own blocks past the prompt
            match = self.kv.match_prefix(req)
            if match.num_blocks > len(shared):
                shared = []
        swapped: SwappedKV | None = req.swapped
        if shared:
            computed, match = shared, None
        elif req.sampling_params.prompt_logprobs is not None or (swapped is not None and swapped.num_evicted):
            # prompt logprobs need every prompt position computed; an evicting request's KV is its swapped copy
            computed, match = [], None
        else:
            match = match if match is not None else self.kv.match_prefix(req)
            computed = match.blocks
        num_computed = len(computed) * self.block_size
        n_load = self._loadable(req, num_computed) if not shared else 0
        n_swap = max(swapped.num_tokens - num_computed, 0) if swapped is not None and not shared else 0
        n_evicted = swapped.num_evicted if n_swap else 0
        n = req.num_tokens - num_computed - n_load - n_swap - n_evicted
        self._blocked_on_blocks = False
        if not self.config.enable_chunked_prefill and n > budget:
            return None
        n = min(n, budget)
        self._blocked_on_blocks = True  # a None from here on means the pool could not supply the blocks
        start = num_computed + n_load + n_swap + n_evicted
        reuse = self._segment_reuse(req, start) if req.blend is not None and not shared else []
        if req.kv_budget and not shared:
            # an evicting request peaks at its whole prompt plus a block before it evicts: start it only when that
            # fits beside what the evicting requests already prefilling still need, so none is preempted for it
            peak = self.kv.num_blocks_needed(req.num_tokens - n_evicted + 1) - len(computed)
            if peak + self._eviction_reserve() > self.kv.num_free_blocks:
                return None
        if shared:
            self.kv.share_blocks(req, shared)
            req.num_computed_tokens = num_computed
            if self.kv.allocate_slots(req, n) is None:
                self.kv.free(req)
                req.num_computed_tokens = 0
                return None
        else:
            # reused segments' KV is written into the request's blocks now: they are allocated for the whole prompt,
            # with the segment blocks held meanwhile, so this allocation cannot take them
            touched = [b for _, _, _, blocks in reuse for b in blocks]
            self.kv.hold(touched)
            extra = req.num_tokens - start - n if reuse else 0
            if self.kv.allocate_slots(req, n_load + n_swap + n + extra, computed) is None:
                self.kv.release(touched)
                return None
            rerotates = [self.kv.rerotate_op(req, blocks, s, lo, hi, req.blend.context_len)
                         for lo, hi, s, blocks in reuse]
            self.kv.release(reversed(touched))  # to the LRU tail: recently used
            req.num_computed_tokens = num_computed + n_load + n_swap + n_evicted
            req.num_evicted_tokens = n_evicted
            if match is not None:
                self.kv.record_lookup(req, match)
        if n_swap:  # the blocks past what the prefix cache still had come back from the swap space
            first, end = num_computed // self.block_size, -(-swapped.num_tokens // self.block_size)
            self._kv_ops.append(KVSwapIn(req.request_id, swapped.slots[first:end],
                                         self.kv.get_block_ids(req.request_id)[first:end]))
        if swapped is not None:
            self.swap.free_later(swapped.slots)
            req.swapped = None
        if n_load:
            fetched = req.fetched_kv
            first = num_computed // self.block_size
            block_ids = self.kv.get_block_ids(req.request_id)[first:first + n_load // self.block_size]
            self._kv_ops.append(KVLoad(req.request_id, block_ids, fetched, num_computed - fetched.start, n_load))
            req.num_loaded_tokens += n_load
            self.num_loaded_tokens += n_load
        req.fetched_kv = None  # used or outdated: either way, free its memory
        if reuse:  # after the loads and swap-ins: a swapped-in partial block would overwrite the slots after it
            self._kv_ops.extend(rerotates)
        if req.blend is not None:
            req.blend_reused = [(lo, hi) for lo, hi, _, _ in reuse]
            blended = sum(hi - lo for lo, hi, _, _ in reuse)
            req.num_blended_tokens += blended
            self.num_blended_tokens += blended
            if req.num_cached_tokens < 0:  # the lookup at use (the first was at arrival)
                wanted = sum(1 for (s, _), c in zip(req.blend.reusable(req.num_prompt_tokens), req.segment_chains)
                             if c and s + len(c) * self.block_size - req.blend.context_len > start)
                self.num_segment_hits += len(reuse)
                self.num_segment_misses += wanted - len(reuse)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_computed + n_load + req.num_blended_tokens
        if req.pin_key is not None:
            self.pins.take_over(req.pin_key)  # it holds the blocks it matched now
        if not req.prompt_charged:
            req.prompt_charged = True
            to_compute = max(req.num_prompt_tokens - req.num_computed_tokens, 0)
            self.waiting.charge(req, to_compute, 0)
            self.tenants[req.tenant].prompt_tokens_computed += to_compute
        return n

    def _eviction_reserve(self) -> int:
        """Blocks the running evicting requests still in prefill need to reach their peak."""
        return sum(max(self.kv.num_blocks_needed(r.num_tokens - r.num_evicted_tokens + 1)
                       - len(self.kv.get_blocks(r.request_id)), 0)
                   for r in self.running if r.kv_budget and r.in_prefill)

    # ------------------------------------------------------------------ tiered KV store
    def _chunk_hash(self, req: Request, k: int) -> bytes:
        """A stored chunk's key: the hash-chain value at the chunk's last block (covers every earlier token)."""
        return req.block_hashes[(k + 1) * (self.connector.chunk_size // self.block_size) - 1]

    def _chunks(self, req: Request, start_token: int) -> list[tuple[bytes, int]]:
        """(hash-chain value, tokens) of each full prompt chunk from `start_token` on that could save compute (a
        chunk must start before the last block boundary below the final token, whose logits are needed). A P/D
        transfer (req.kv_transfer_tokens) asks for its published prompt down to the block: full chunks, then the
        tail of full blocks after the last one (published as an entry of its own)."""
        c, bs = self.connector.chunk_size, self.block_size
        usable_end = (req.num_tokens - 1) // bs * bs
        out = []
        k = start_token // c
        while k * c < usable_end and (k + 1) * c <= req.num_tokens:
            out.append((self._chunk_hash(req, k), c))
            k += 1
        if req.kv_transfer_tokens:
            end = min(req.kv_transfer_tokens, usable_end)
            out = [(h, n) for j, (h, n) in enumerate(out) if start_token // c * c + (j + 1) * c <= end]
            tail_start = end // c * c
            if end > tail_start >= start_token // c * c:
                out.append((req.block_hashes[end // bs - 1], end - tail_start))
        return out

    def _start_fetch(self, req: Request) -> bool:
        """Send `req` to the store if chunks past its pooled prefix could exist there; True if it now waits."""
        req.kv_store_checked = True
        if req.sampling_params.prompt_logprobs is not None or req.share_prompt_with is not None:
            return False
        pooled = self.kv.match_prefix(req).num_blocks * self.block_size
        if (req.num_tokens - 1) // self.block_size * self.block_size <= pooled:
            return False  # the pool already has everything a load could give
        start = pooled // self.connector.chunk_size * self.connector.chunk_size
        chunks = self._chunks(req, start)
        if not chunks:
            return False
        req.status = RequestStatus.FETCHING
        self.fetching[req.request_id] = req
        if req.kv_transfer_tokens:  # the prefill instance may still be writing it; loaded whatever it costs
            self.connector.start_fetch(req.request_id, chunks, start, self.config.kv_transfer_timeout_s, True)
        else:
            self.connector.start_fetch(req.request_id, chunks, start)
        return True

    def _collect_fetches(self) -> None:
        done = self.connector.poll_finished()
        # back to the head of the queue, oldest first: they were at the head when their fetch started
        for rid in sorted(done, key=lambda r: self.fetching[r].arrival_time if r in self.fetching else 0.0,
                          reverse=True):
            req = self.fetching.pop(rid, None)
            if req is None:
                continue  # aborted meanwhile
            req.fetched_kv = done[rid]
            req.status = RequestStatus.WAITING
            self.waiting.add_front(req)

    def _loadable(self, req: Request, num_computed: int) -> int:
        """Tokens after the pooled prefix that the fetched KV covers, in whole blocks, never the last token."""
        f = req.fetched_kv
        if f is None:
            return 0
        end = min(f.end, (req.num_tokens - 1) // self.block_size * self.block_size)
        if not f.start <= num_computed < end:
            return 0  # the pool lost blocks before the fetched range since the lookup: recompute instead
        return end - num_computed

    def _queue_saves(self, req: Request) -> None:
        if req.num_evicted_tokens:
            return  # its blocks no longer hold the chunks their hashes name (rule 1); the prompt's went when done
        c, bs = self.connector.chunk_size, self.block_size
        per = c // bs
        block_ids = self.kv.get_block_ids(req.request_id)
        chunks = []
        for k in range(min(req.num_computed_tokens, len(block_ids) * bs) // c):
            h = self._chunk_hash(req, k)
            if not self.connector.is_known(h):
                chunks.append((h, block_ids[k * per:(k + 1) * per]))
        if req.publish_kv and self._prompt_done(req):
            # P/D prefill: the prompt's full blocks past its last full chunk too, so the decode instance loads the
            # whole prompt down to the block (an entry keyed by the chain value at its last block)
            end = req.num_prompt_tokens // bs
            tail = end // per * per
            if end > tail and not self.connector.is_known(req.block_hashes[end - 1]):
                chunks.append((req.block_hashes[end - 1], block_ids[tail:end]))
        if chunks:
            self._kv_ops.append(KVSave(req.request_id, chunks))

    # ------------------------------------------------------------------ KV pins (agents between turns)
    def _pin(self, req: Request) -> None:
        """Keep the finished turn's cached prefix (its leading run of full, hashed blocks) for the next turn."""
        blocks = []
        for b in self.kv.get_blocks(req.request_id):
            if b.block_hash is None:
                break
            blocks.append(b)
        self.pins.pin(req.pin_key, blocks, self.clock() + req.kv_pin_seconds)

    def release_pin(self, key: PinKey) -> int:
        """A client ended its session early: the tokens that were pinned (0 if none)."""
        return self.pins.release(key)

    def has_pending_kv_ops(self) -> bool:
        """Saves queued by a finish or abort outside a step still need a step (or take_kv_ops) to run."""
        return bool(self._kv_ops)

    def take_kv_ops(self) -> list[KVOp]:
        """The KV operations not yet handed out in a SchedulerOutput (for a final flush when the engine closes)."""
        ops, self._kv_ops = self._kv_ops, []
        return ops

    def _preempt(self, req: Request) -> None:
        """Free the victim's blocks; its KV is either copied to the swap space (copied back on resume) or dropped
        (it stays in the prefix cache until evicted; recomputed on resume), chosen per victim; it resumes first
        when blocks free up."""
        self.running.remove(req)
        block_ids = self.kv.get_block_ids(req.request_id)[:-(-req.num_kv_tokens // self.block_size)]
        mode = self.config.preemption_mode
        if mode != "recompute" and block_ids and req.sampling_params.prompt_logprobs is None:
            decision = self.swap_cost.decide(req.num_computed_tokens, len(block_ids))
            slots = self.swap.allocate(len(block_ids)) if mode == "swap" or decision.mode == "swap" else None
            if slots is not None:
                self._kv_ops.append(KVSwapOut(req.request_id, block_ids, slots))
                req.swapped = SwappedKV(slots, req.num_kv_tokens, req.num_evicted_tokens)
                self.num_swapped_preemptions += 1
            else:
                self.num_recomputed_preemptions += 1
            log.info("preempt %s (%d tokens, %d blocks): %s (estimated swap %.1f ms, recompute %.1f ms%s)",
                     req.request_id, req.num_computed_tokens, len(block_ids),
                     "swap" if slots is not None else "recompute", 1e3 * decision.swap_seconds,
                     1e3 * decision.recompute_seconds,
                     ", swap space full" if slots is None and decision.mode == "swap" else "")
        else:
            self.num_recomputed_preemptions += 1
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        # recomputed after an eviction, it prefills everything again and evicts anew: the kept set (and so the output)
        # may differ from an uninterrupted run; swapped, it resumes from its own KV (docs/eviction.md)
        req.num_evicted_tokens = 0
        req.blend_reused = []  # re-admitted, it reuses what the segment cache holds then
        req.kv_bounded = req.swapped is not None  # swapped: it comes back with its bounded KV
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(req)

    # ------------------------------------------------------------------ update
    def update(self, sched: SchedulerOutput, out: ModelOutput) -> list[RequestUpdate]:
        self.swap_cost.observe_copy(out.kv_copy_bytes, out.kv_copy_seconds)
        updates = [self._update_of(r, [], [], None) for r in self._ended_in_schedule if not r.segment_fill]
        self._ended_in_schedule = []
        for sr in sched.scheduled:
            req = sr.request
            if req.is_finished or req.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            prompt_was_done = self._prompt_done(req)
            sampled = out.sampled.get(req.request_id, []) if sr.sample else []
            recomputed = out.blend_recomputed.get(req.request_id, 0)
            req.num_recomputed_tokens += recomputed
            self.num_recomputed_tokens += recomputed
            # drafts and later decode steps count as computed only once kept (below)
            req.num_computed_tokens += sr.num_real_tokens
            self.kv.cache_blocks(req, req.num_computed_tokens)
            if self.connector is not None and not prompt_was_done and self._prompt_done(req):
                # the prompt's KV is final: store it now, while the answer decodes, so another instance can load
                # it for the next turn (the chunks holding output tokens follow when the request is freed)
                self._queue_saves(req)
            new_tokens, new_lps = [], []
            if sr.sample and req.max_tokens == 0:
                req.status = RequestStatus.FINISHED_LENGTH  # scoring only: prompt logprobs, no new token
            elif sr.sample:
                lps = out.logprobs.get(req.request_id)
                for i, tok in enumerate(sampled):  # a stop id or max_tokens inside accepted drafts ends it there
                    req.append_output_token(tok)
                    new_tokens.append(tok)
                    if lps is not None:
                        new_lps.append(lps[i])
                    if req.check_stop():
                        break
                self.waiting.charge(req, 0, len(new_tokens))
                self.tenants[req.tenant].output_tokens += len(new_tokens)
                if sr.spec_token_ids or sr.decode_steps > 1:
                    # The accepted drafts' KV is kept (as is every decode step's, its input accepted as a draft
                    # is): every appended token but the last (sampled after them, its KV not computed) - fewer
                    # if a stop came first. Rejected drafts are rolled back: their slots lie past the computed
                    # tokens (rewritten when those positions are computed), blocks past the sequence go back to
                    # the pool, and no block holding one was cached (the hashes cover appended tokens only).
                    # Blocks the accepted drafts filled are cached now.
                    req.num_computed_tokens = req.num_tokens - 1
                    self.kv.cache_blocks(req, req.num_computed_tokens)
                    if not req.is_finished:
                        self.kv.trim(req, req.num_tokens - req.num_evicted_tokens)
            req.kv_bounded = req.kv_bounded or sr.sample
            evicted = out.evicted.get(req.request_id)
            if evicted and not req.is_finished:
                # the policy's choice, made by the worker from attention scores; the KV that stays is packed into
                # fewer blocks before the next forward pass, and nothing of this request is cached from now on
                op = self.kv.compact(req, evicted)
                req.eviction_deferred = op is None
                if op is None:
                    self.num_eviction_deferrals += 1  # no block to copy a shared one into: the next step retries
                else:
                    self._kv_ops.append(op)
                    self.num_evicted_tokens += len(evicted)
            if self._prompt_done(req):
                self._release_siblings(req)
            plp = out.prompt_logprobs.get(req.request_id)
            if (new_tokens or plp or req.is_finished) and not req.segment_fill:  # segment requests are internal
                updates.append(self._update_of(req, new_tokens, new_lps, plp))
            if req.is_finished:
                self.running.remove(req)
                self._release(req)
        return updates

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _update_of(req: Request, new_tokens, new_lps, plp) -> RequestUpdate:
        return RequestUpdate(req.request_id, new_tokens, new_lps, plp, req.finish_reason, req.stop_reason,
                             max(req.num_cached_tokens, 0), req.num_evicted_tokens, req.num_blended_tokens,
                             req.num_recomputed_tokens)

    @staticmethod
    def _prompt_done(req: Request) -> bool:
        return req.num_computed_tokens >= req.num_prompt_tokens

    def _release_siblings(self, req: Request) -> None:
        for sib in reversed(self._held_siblings.pop(req.request_id, [])):
            self.waiting.add_front(sib)

    def _release(self, req: Request) -> None:
        if req.swapped is not None:
            self.swap.free_later(req.swapped.slots)
            req.swapped = None
        if self.connector is not None and req.request_id in self.kv.req_blocks:
            self._queue_saves(req)
        if req.pin_key is not None and req.kv_pin_seconds > 0 and req.status in (
                RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            self._pin(req)
        self.kv.free(req)
        self._release_siblings(req)
        if req.segment_fill and self._fills.get(req.segment_chains[0][-1]) is req:
            del self._fills[req.segment_chains[0][-1]]
        self.requests.pop(req.request_id, None)
        self._finished_ids.append(req.request_id)

    def check_invariants(self) -> None:
        self.kv.check_invariants(self.pins.block_refs())
        self.pins.check_invariants()
        self.swap.check_invariants([s for r in self.requests.values() if r.swapped is not None
                                    for s in r.swapped.slots])
        live = set(self.requests)
        assert set(self.kv.req_blocks) <= live, "blocks held by a request that is gone"
        for req in self.running:
            assert req.status == RequestStatus.RUNNING
            assert len(self.kv.get_blocks(req.request_id)) * self.block_size >= req.num_kv_tokens
            if req.kv_budget and req.kv_bounded and not req.eviction_deferred:
                # once the prompt is computed: the budget, plus the margin a lazy policy lets it grow by
                assert req.num_kv_tokens <= req.kv_budget + self.config.kv_eviction_margin, \
                    f"{req}: {req.num_kv_tokens} KV tokens over its budget of {req.kv_budget}"
            if req.num_evicted_tokens:
                assert len(self.kv.get_blocks(req.request_id)) <= self.kv.num_blocks_needed(req.num_kv_tokens + 1), \
                    f"{req}: holds blocks past its KV"
                for b in self.kv.get_blocks(req.request_id)[req.num_kv_tokens // self.block_size:]:
                    assert b.block_hash is None and b.ref_cnt == 1, f"{req}: its next tokens would write a shared block"

            if req.blend is not None:  # rule 1: every hashed block of a blended request carries its chain's hash
                for i, b in enumerate(self.kv.get_blocks(req.request_id)[:len(req.block_hashes)]):
                    assert b.block_hash is None or b.block_hash == req.block_hashes[i], \
                        f"{req}: block {i} holds another chain's hash"
        for req in self.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert req.request_id not in self.kv.req_blocks, "a waiting request holds blocks"
        for req in self.fetching.values():
            assert req.status == RequestStatus.FETCHING
            assert req.request_id not in self.kv.req_blocks, "a fetching request holds blocks"
        assert len(self.running) <= self.config.max_num_seqs
