"""SamplingParams: the single place where per-request generation parameters are validated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvserve.config import MAX_SPEC_TOKENS

MAX_N = 16
MAX_LOGPROBS = 20


class ParamError(ValueError):
    """A request parameter is invalid; `param` names it and `code` classifies it (OpenAI-style 400 bodies)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # speculative decoding: at most this many drafts per step (0: off; None: the engine's num_speculative_tokens)
    num_speculative_tokens: int | None = None
    # KV eviction: keep at most this many tokens' KV once the prompt is computed (None: the engine's default
    # budget; 0: no eviction). The engine checks it against its policy's minimum
    kv_budget_tokens: int | None = None

    def __post_init__(self) -> None:
        # Normalise list-valued fields so the dataclass stays hashable and immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        def check(cond: bool, msg: str, param: str) -> None:
            if not cond:
                raise ParamError(msg, param)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")

        check(is_int(self.n) and 1 <= self.n <= MAX_N, f"n must be an integer in [1, {MAX_N}], got {self.n!r}", "n")
        check(is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
              f"temperature must be in [0, 100], got {self.temperature!r}", "temperature")
        check(is_num(self.top_p) and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        check(is_int(self.top_k) and self.top_k >= 0, f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}",
              "top_k")
        check(is_num(self.min_p) and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        check(is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
              f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}", "repetition_penalty")
        check(is_num(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}", "presence_penalty")
        check(is_num(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}", "frequency_penalty")
        check(self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**64),
              f"seed must be an integer, got {self.seed!r}", "seed")
        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 0),
              f"max_tokens must be a non-negative integer, got {self.max_tokens!r}", "max_tokens")
        check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens must be a non-negative integer",
              "min_tokens")
        check(len(self.stop) <= 16 and all(isinstance(s, str) and 0 < len(s) <= 256 for s in self.stop),
              "stop must be at most 16 non-empty strings of at most 256 characters", "stop")
        check(len(self.stop_token_ids) <= 64 and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids must be at most 64 non-negative integers", "stop_token_ids")
        k = self.num_speculative_tokens
        check(k is None or (is_int(k) and 0 <= k <= MAX_SPEC_TOKENS),
              f"num_speculative_tokens must be an integer in [0, {MAX_SPEC_TOKENS}], got {k!r}",
              "num_speculative_tokens")
        b = self.kv_budget_tokens
        check(b is None or (is_int(b) and b >= 0), f"kv_budget_tokens must be a non-negative integer, got {b!r}",
              "kv_budget_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            check(v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS),
                  f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {v!r}", name)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def argmax_only(self) -> bool:
        """The next token is the logits' argmax and nothing else is asked of them (no penalty, no logprobs): what
        several decode steps in one engine step compute (min_tokens, which masks EOS, is the caller's check)."""
        return self.greedy and not self.needs_penalties and self.logprobs is None

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

