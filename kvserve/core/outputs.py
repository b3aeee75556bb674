"""Data passed between the scheduler, the model runner and the engine, one step at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvserve.config import KeySpan
from kvserve.core.request import FinishReason

if TYPE_CHECKING:
    from kvserve.core.request import Request


# A draft token the worker's drafter (a model: layer_skip, draft_model) fills in at the start of the step that
# verifies it; text drafts (ngram, suffix) are real token ids from the start.
DRAFT_PENDING = -1


@dataclass
class ScheduledRequest:
    """`num_new_tokens` tokens of `request`, starting at position `start`, run this step over `block_ids`."""

    request: "Request"
    start: int
    num_new_tokens: int
    block_ids: list[int]
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    prompt_logprobs: bool  # return logprobs of the prompt positions covered by this chunk
    # speculative drafts run after the request's last token (the last len(spec_token_ids) of num_new_tokens);
    # the runner samples at each of their positions and the scheduler keeps the accepted ones
    spec_token_ids: list[int] = field(default_factory=list)
    # KV eviction: the KV slot (index into the block table's slots) the first new token goes to; equals `start`
    # until the request's first eviction. kv_budget > 0: the worker may evict down to it after this step
    kv_start: int = -1
    kv_budget: int = 0
    # CacheBlend: [start, end) prompt positions in this chunk whose KV was re-rotated from the segment cache; the
    # model recomputes all tokens up to its check layer and then only the blend_ratio share of these that deviate
    # most, plus every other token of the chunk (docs/kvreuse.md)
    blend_reused: list[tuple[int, int]] = field(default_factory=list)
    blend_ratio: float = 1.0
    # APE's parallel encoding (kv_reuse "parallel"): queries after the span attend to its keys tempered and scaled
    key_span: KeySpan | None = None
    # > 1: a greedy decode run that many times in one engine step (SchedulerConfig.decode_steps): num_new_tokens KV
    # slots, the first fed the request's last token, each next one the argmax after it; the runner returns all
    # decode_steps tokens, and the scheduler keeps them up to a stop as it keeps accepted drafts
    decode_steps: int = 1

    def __post_init__(self) -> None:
        if self.kv_start < 0:
            self.kv_start = self.start

    @property
    def num_real_tokens(self) -> int:
        """The request's own tokens this step, known when it was scheduled (drafts and later decode steps excluded)."""
        return self.num_new_tokens - len(self.spec_token_ids) - (self.decode_steps - 1)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids[self.start:self.start + self.num_real_tokens] + self.spec_token_ids


@dataclass
class KVLoad:
    """Copy tokens [src_offset, src_offset + num_tokens) of a fetched KV tensor into `block_ids` (whole blocks)."""

    request_id: str
    block_ids: list[int]
    fetched: object  # kvstore FetchedKV; the scheduler never looks inside
    src_offset: int
    num_tokens: int


@dataclass
class KVSave:
    """Full chunks of a request to copy out of the pool (before its blocks are reused) and store."""

    request_id: str
    chunks: list[tuple[bytes, list[int]]]  # (hash-chain value at the chunk's last block, the chunk's block ids)


@dataclass
class KVSwapOut:
    """Copy a preempted request's blocks to swap slots (block k -> slots[k]) before they are reused."""

    request_id: str
    block_ids: list[int]
    slots: list[int]


@dataclass
class KVSwapIn:
    """Copy a resuming request's swapped blocks back into the pool (slots[k] -> block_ids[k])."""

    request_id: str
    slots: list[int]
    block_ids: list[int]


@dataclass
class KVCompact:
    """After an eviction: copy slot src_slots[i] -> dst_slots[i] (every source read before any destination is
    written), packing the kept tokens' KV into the first num_kv_tokens slots of the request's block table. The
    worker's per-token eviction state moves along `moves` ((from, to) KV indices) and is cut at num_kv_tokens."""

    request_id: str
    src_slots: list[int]
    dst_slots: list[int]
    moves: list[tuple[int, int]]
    num_kv_tokens: int


@dataclass
class KVRerotate:
    """Copy a cached segment's KV into a request's own blocks (slot src_slots[i] -> dst_slots[i], every layer),
    rotating K by RoPE from the segment's positions to the request's: +delta positions. V is copied as is."""

    request_id: str
    src_slots: list[int]
    dst_slots: list[int]
    delta: int


KVOp = KVLoad | KVSave | KVSwapOut | KVSwapIn | KVCompact | KVRerotate


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)  # freed since the last step (runner drops their state)
    # worker-side KV operations, applied in this order by the runner before the forward pass: a save copies blocks
    # out before a later load (or this step's forward) may overwrite them (docs/architecture.md, rule 4)
    kv_ops: list[KVOp] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.kv_ops


# (token_id, logprob, rank) of the sampled token, then the top-k as (token_id, logprob) pairs
TokenLogprobs = tuple[int, float, int, list[tuple[int, float]]]


@dataclass
class ModelOutput:
    # request id -> tokens sampled this step: one, or for a request with drafts the accepted drafts plus the token
    # sampled after them (the correction or bonus token), with their logprobs when asked
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # request id -> (first prompt position covered, list of (token_id, logprob, rank, topk) for following positions)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # swap copies the worker ran for this step's operations: what the scheduler's swap-or-recompute model learns from
    kv_copy_bytes: int = 0
    kv_copy_seconds: float = 0.0
    # model drafting at the start of this step: one-token passes and their seconds (what the speculative back-off
    # learns a draft's cost from), and all drafting seconds (a draft model's catch-up on a prompt included)
    draft_iterations: int = 0
    draft_seconds: float = 0.0
    draft_total_seconds: float = 0.0
    # KV eviction: request id -> KV indices (below its KV length after this step) the policy evicted, ascending
    evicted: dict[str, list[int]] = field(default_factory=dict)
    eviction_seconds: float = 0.0  # scoring bookkeeping and selection in the worker this step
    # CacheBlend: request id -> reused tokens recomputed this step (those the check layer found deviating)
    blend_recomputed: dict[str, int] = field(default_factory=dict)


@dataclass
class RequestUpdate:
    """What one step changed for one request; the engine turns these into user-facing RequestOutputs."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    prompt_logprobs: tuple[int, list[TokenLogprobs]] | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None
    num_cached_tokens: int
    num_evicted_tokens: int = 0
    num_blended_tokens: int = 0  # prompt tokens whose KV came from the segment cache (in num_cached_tokens)
    num_recomputed_tokens: int = 0  # ... of which CacheBlend recomputed
