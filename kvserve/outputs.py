"""User-facing results, shaped like vLLM's so existing code ports unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PositionLogprobs = dict[int, Logprob]  # token id -> Logprob (the chosen token first, then the top-k)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    # what this step added, for streaming
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # seconds between consecutive output tokens (sequence 0)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    num_evicted_tokens: int = 0  # KV eviction: tokens whose KV its sequences dropped (docs/eviction.md)
    # CacheBlend (docs/kvreuse.md): prompt tokens whose KV came from the segment cache (counted in num_cached_tokens)
    # and how many of those were recomputed
    num_blended_tokens: int = 0
    num_recomputed_tokens: int = 0
