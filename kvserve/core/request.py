"""Request state as the scheduler sees it: token ids, how many have KV computed, block hashes, status."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from dataclasses import dataclass

from kvserve.config import KeySpan
from kvserve.core.hashing import BlockHash, blend_key, hash_block_chain, segment_key

if TYPE_CHECKING:
    from kvserve.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FETCHING = "fetching"  # waiting for its prefix KV from the tiered store; never holds blocks
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_REJECTED = "finished_rejected"  # never scheduled: dropped by the engine (queue-wait deadline)

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                        RequestStatus.FINISHED_REJECTED)


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    REJECTED = "rejected"  # the engine gave up on it before it ran (stop_reason says why); the server answers 503


_STATUS_TO_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_REJECTED: FinishReason.REJECTED,
}

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class BlendSpec:
    """A prompt given as segments (docs/kvreuse.md): segment 0 is a plain prefix, the middle segments may reuse KV
    from the segment cache, the last one (the question) is always computed. `context_len` 0: each segment's KV is
    computed alone, from position 0 (CacheBlend's original setting). context_len = segment_starts[0] (prefix mode):
    each is computed after segment 0 (the system prompt), as the exact prompt [segment 0, segment] under the plain
    prefix-cache key, so segment 1, which follows segment 0 in the prompt too, is a plain prefix-cache hit and only
    segments 2 .. k-2 are blended."""

    segment_starts: tuple[int, ...]  # prompt position where each segment after the first starts, ascending
    ratio: float  # CacheBlend's share of reused tokens recomputed (per chunk): 0 naive reuse, 1 exact
    use_segment_cache: bool = True  # False: segments are only hashed apart (no reuse, no fills)
    precompute: bool = False  # only fill the segment cache with every segment (LLM.precompute_segments); no output
    context_len: int = 0  # prompt tokens (segment 0 or none) each segment's cached KV was computed after
    # APE's parallel encoding (kv_reuse "parallel", ratio 0): (attention temperature, scale) with which the tokens
    # after the middle segments attend to them; None: CacheBlend
    ape: tuple[float, float] | None = None

    def key_span(self) -> KeySpan | None:
        """The middle segments as APE's parallel contexts: from the end of segment 0 to the last segment's start."""
        if self.ape is None or len(self.segment_starts) < 2:
            return None
        return KeySpan.ape(self.segment_starts[0], self.segment_starts[-1], *self.ape)

    def approximate_from(self, num_prompt_tokens: int) -> int | None:
        """The first prompt position whose KV may differ from the plain prefill's (rule 1 hashes its block and all
        later ones in a blend namespace): the first reused segment's start; in APE mode at the latest the last
        segment's, whose tokens attend tempered. None: all exact."""
        reusable = self.reusable(num_prompt_tokens)
        first = reusable[0][0] if reusable else None
        span = self.key_span()
        if span is not None and (first is None or span.hi < first):
            first = span.hi
        return first

    def reusable(self, num_prompt_tokens: int) -> list[tuple[int, int]]:
        """[start, end) of the segments whose KV may come from the segment cache: not the first (the context, or a
        plain prefix), not the one right after the context (a plain prefix-cache hit), not the last (the question);
        when precomputing, every one but the context."""
        starts = list(self.segment_starts) if self.context_len else [0, *self.segment_starts]
        if not self.precompute:
            starts = starts[1:]
        if not starts:
            return []
        runs = list(zip(starts, starts[1:] + [num_prompt_tokens]))
        return runs if self.precompute else runs[:-1]


class Request:
    """One sequence. For n > 1 the engine creates n Requests; siblings share the first one's prompt blocks."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: "SamplingParams",
                 block_size: int, eos_token_ids: tuple[int, ...] = (), cache_salt: str | None = None,
                 arrival_time: float | None = None, priority: int = 0, max_model_len: int | None = None,
                 share_prompt_with: "Request | None" = None, tenant: str = DEFAULT_TENANT,
                 session_id: str | None = None, kv_pin_seconds: float = 0.0, kv_budget: int = 0,
                 blend: BlendSpec | None = None, segment_fill: bool = False, fill_in_context: bool = False):
        """`blend`: the prompt is segments and may reuse their KV from the segment cache. `segment_fill`: this is an
        internal request computing one segment for the segment cache (core/scheduler.py): alone under the segment
        key, or (`fill_in_context`) after its context, an exact prompt under the plain key."""
        if not prompt_token_ids:
            raise ValueError("prompt must contain at least one token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.tenant = tenant
        # agents: a finished turn's KV stays pinned this long for the session's next turn (core/kv_pins.py)
        self.pin_key = (tenant, cache_salt or "", session_id) if session_id is not None else None
        self.kv_pin_seconds = kv_pin_seconds
        self.swapped = None  # core.swap.SwappedKV while preempted with its KV in the swap space
        self.prompt_charged = False  # the policy was charged for this prompt's computed tokens (once, at admission)
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prompt tokens served from the prefix cache at first scheduling
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.share_prompt_with = share_prompt_with
        self.first_scheduled_time: float | None = None
        # speculative decoding: drafts to verify after the last token (kvserve.spec). Never part of token_ids or
        # block_hashes; the scheduler takes them into one step's ScheduledRequest and clears them
        self.spec_token_ids: list[int] = []
        # KV eviction (docs/eviction.md): once the prompt is computed, keep at most kv_budget tokens' KV (0: all).
        # Evicted tokens leave the KV: positions stay the tokens' own, while the KV of the kept ones is packed into
        # the first num_kv_tokens slots of the block table, in no particular order (RoPE is applied at write time)
        self.kv_budget = kv_budget
        self.num_evicted_tokens = 0
        self.kv_bounded = False  # its KV is within the budget from now on: its prefill ended in a sampling step
        self.eviction_deferred = False  # its last eviction waits for a block (KVCacheManager.compact)
        # tiered KV store: looked up once; what came back waits here (opaque to the scheduler) until admission
        self.kv_store_checked = False
        self.fetched_kv = None
        self.num_loaded_tokens = 0
        # P/D disaggregation (docs/scaleout.md): a prefill instance publishes the prompt's KV to the store down to
        # the block; a decode instance's request waits (bounded) for that many published prompt tokens and loads them
        self.publish_kv = False
        self.kv_transfer_tokens = 0
        self.sampler_draws = 0  # random draws its seeded generator made elsewhere (the prefill instance's)
        max_tokens = sampling_params.max_tokens
        limit = (max_model_len - self.num_prompt_tokens) if max_model_len is not None else None
        if max_tokens is None:
            max_tokens = limit if limit is not None else 2**31
        elif limit is not None:
            max_tokens = min(max_tokens, limit)
        self.max_tokens = max(max_tokens, 0)
        # CacheBlend (docs/kvreuse.md): the prompt ranges whose KV came re-rotated from the segment cache, and
        # counts of reused tokens and of those recomputed (selected by KV deviation)
        self.blend = blend
        self.segment_fill = segment_fill
        self.blend_reused: list[tuple[int, int]] = []
        self.num_blended_tokens = 0
        self.num_recomputed_tokens = 0
        self.segment_fills: list[str] = []  # ids of the segment requests this one waits for
        self.segment_chains: list[list[BlockHash]] = []  # per reusable segment: its own chain (segment key)
        # the hash chain: plain (salt), a segment's own namespace, or plain up to the block holding the first reusable
        # segment's first token and a blend namespace from there on (rule 1: approximate KV never under a plain key)
        self._hash_key = segment_key(cache_salt) if segment_fill and not fill_in_context else cache_salt
        first = blend.approximate_from(self.num_prompt_tokens) if blend is not None else None
        self._hash_switch = None if first is None else (first // block_size, blend_key(cache_salt, blend.ape))
        self.block_hashes: list[BlockHash] = hash_block_chain(self.token_ids, block_size, self._hash_key,
                                                              switch=self._hash_switch)

    # ------------------------------------------------------------------ views
    @property
    def num_plain_hashes(self) -> int:
        """How many of block_hashes are plain-chain hashes (exact KV, rule 1); the rest are namespaced."""
        if self._hash_key != self.cache_salt:
            return 0  # a segment computed alone, in its own namespace
        return self._hash_switch[0] if self._hash_switch is not None else len(self.block_hashes)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens whose KV the request still holds (all of them until its first eviction)."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return _STATUS_TO_REASON.get(self.status)

    @property
    def in_prefill(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1

    # ------------------------------------------------------------------ updates
    def append_output_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            self.block_hashes = hash_block_chain(self.token_ids, self.block_size, self._hash_key, self.block_hashes,
                                                 self._hash_switch)

    def check_stop(self) -> bool:
        """Sets a finished status if the last token ends the request. Stop strings are checked by the engine."""
        n_out = self.num_output_tokens
        if n_out == 0:
            return False
        last = self.token_ids[-1]
        sp = self.sampling_params
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in sp.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if n_out >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens})")
