"""Frozen configuration dataclasses, validated once at the edge with clear messages."""

from __future__ import annotations

import math
from dataclasses import dataclass


class ConfigError(ValueError):
    pass


def require(cond: bool, msg: str) -> None:
    """The one config check: raise ConfigError(msg) unless cond."""
    if not cond:
        raise ConfigError(msg)


def _from_json_object(cls, d, name: str, keys: tuple[str, ...], required: str, choices: tuple[str, ...]):
    """A frozen config from a JSON object (a CLI flag or a dict in Python): unknown keys and a missing required one
    are errors naming them."""
    require(isinstance(d, dict), f"{name} must be a JSON object")
    unknown = sorted(set(d) - set(keys))
    require(not unknown, f"{name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(keys)}")
    require(required in d, f"{name} needs a {required}: " + " | ".join(choices))
    return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder (filled by the loader)."""

    architecture: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # tuple of (key, value) pairs, hashable form of the HF dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        require(self.num_heads % self.num_kv_heads == 0,
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        require(self.head_dim % 2 == 0, "head_dim must be even for rotary embeddings")
        require(self.num_layers > 0 and self.hidden_size > 0 and self.vocab_size > 0, "model sizes must be positive")

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # explicit pool size; otherwise derived from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        require(isinstance(self.block_size, int) and self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 f"block_size must be a power of two in [1, 256], got {self.block_size!r}")
        require(self.num_blocks is None or self.num_blocks >= 2, "num_blocks must be at least 2")
        require(self.kv_cache_memory_gb > 0, "kv_cache_memory_gb must be positive")


SCHEDULING_POLICIES = ("fcfs", "priority", "vtc")  # kvserve.core.policy
PREEMPTION_MODES = ("auto", "swap", "recompute")  # kvserve.core.swap
QUANTIZATIONS = ("auto", "none", "q8_0", "w8a8", "q4_0", "q4_1", "q4_k")  # kvserve.model.quant


def check_scheduling(policy: str, tenant_weights: tuple, max_queue_wait_s: float | None,
                     preemption_mode: str = "recompute", kv_pin_max_fraction: float = 0.5,
                     kv_pin_reserved_fraction: float = 0.0) -> None:
    """The scheduling options' rules (EngineArgs checks them before the model loads, SchedulerConfig again)."""
    require(0 <= kv_pin_max_fraction <= 1, "kv_pin_max_fraction must be in [0, 1]")
    require(0 <= kv_pin_reserved_fraction <= kv_pin_max_fraction,
             "kv_pin_reserved_fraction must be in [0, kv_pin_max_fraction]")
    require(preemption_mode in PREEMPTION_MODES,
             f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {preemption_mode!r}")
    require(policy in SCHEDULING_POLICIES,
             f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {policy!r}")
    require(all(isinstance(t, str) and isinstance(w, (int, float)) and not isinstance(w, bool)
                 and 0 < w < float("inf") for t, w in tenant_weights),
             "tenant weights must be (tenant name, positive number) pairs")
    require(max_queue_wait_s is None or (isinstance(max_queue_wait_s, (int, float))
                                          and 0 < max_queue_wait_s < float("inf")),
             "max_queue_wait_s must be a positive number of seconds")


MAX_DECODE_STEPS = 64


def check_decode_steps(steps) -> None:
    require(type(steps) is int and 1 <= steps <= MAX_DECODE_STEPS,
            f"decode_steps must be an integer in [1, {MAX_DECODE_STEPS}], got {steps!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"  # fcfs | priority | vtc (kvserve.core.policy)
    tenant_weights: tuple[tuple[str, float], ...] = ()  # vtc: (tenant, weight) pairs; unlisted tenants weigh 1
    max_queue_wait_s: float | None = None  # a request never scheduled within this many seconds is rejected
    kv_pin_max_fraction: float = 0.5  # at most this share of the KV pool is pinned for idle agent sessions
    tenant_pin_max_tokens: tuple[tuple[str, int], ...] = ()  # per-tenant caps on pinned tokens
    pinned_sessions_first: bool = True  # a pinned session's next turn is admitted ahead of new requests (Continuum)
    preemption_mode: str = "recompute"  # auto (swap or recompute per victim, by measured cost) | swap | recompute
    num_swap_blocks: int = 0  # blocks of the swap space (host memory beside the pool)
    kv_bytes_per_block: int = 0  # what one block's copy moves (the swap cost model's unit)
    # pins up to this share of the pool hold against waiting requests (never against running ones' growth)
    kv_pin_reserved_fraction: float = 0.0
    kv_eviction_margin: int = 0  # KV eviction: tokens past its budget a decoding request may hold (lazy's batch)
    kv_transfer_timeout_s: float = 5.0  # P/D decode: how long a transfer waits for KV the prefill is still writing
    # greedy decode steps per engine step while every running request is a plain greedy decode and none waits
    # (the model runner feeds each step's argmax to the next: kvserve.worker.model_runner); 1: one step each
    decode_steps: int = 1

    def __post_init__(self) -> None:
        check_scheduling(self.scheduling_policy, self.tenant_weights, self.max_queue_wait_s, self.preemption_mode,
                         self.kv_pin_max_fraction, self.kv_pin_reserved_fraction)
        require(self.num_swap_blocks >= 0, "num_swap_blocks must be >= 0")
        require(self.kv_transfer_timeout_s >= 0, "kv_transfer_timeout_s must be >= 0")
        require(all(isinstance(n, int) and n >= 0 for _, n in self.tenant_pin_max_tokens),
                 "tenant pin caps must be non-negative token counts")
        require(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        require(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        require(self.max_model_len >= 2, "max_model_len must be >= 2")
        check_decode_steps(self.decode_steps)
        require(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
                 "with chunked prefill off, max_num_batched_tokens must be >= max_model_len "
                 f"({self.max_num_batched_tokens} < {self.max_model_len})")


SPEC_METHODS = ("ngram", "suffix", "layer_skip", "draft_model")  # kvserve.spec
MAX_SPEC_TOKENS = 64
_SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
              "suffix_decoding_max_tree_depth", "suffix_decoding_max_cached_requests",
              "suffix_decoding_max_spec_factor", "suffix_decoding_min_token_prob", "draft_layers", "model",
              "quantization", "adaptive")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (kvserve.spec), with vLLM's key names. `num_speculative_tokens` is the most drafts a
    request verifies per step; adaptive drafting (on by default) picks fewer per request and per step."""

    method: str
    num_speculative_tokens: int | None = None  # None: 5, or suffix_decoding_max_tree_depth for suffix
    prompt_lookup_min: int = 2  # ngram: shortest suffix of the text looked up earlier in it
    prompt_lookup_max: int = 5  # ngram: longest (tried first)
    suffix_decoding_max_tree_depth: int = 24  # suffix: longest path kept in the suffix trees
    suffix_decoding_max_cached_requests: int = 10000  # suffix: finished outputs kept (oldest dropped first)
    suffix_decoding_max_spec_factor: float = 1.0  # suffix: at most this x the matched length is drafted
    suffix_decoding_min_token_prob: float = 0.1  # suffix: a path stops where its estimated probability drops below
    draft_layers: int | None = None  # layer_skip: the first N layers draft
    model: str | None = None  # draft_model: a model with the target's tokenizer (GGUF file or HF directory)
    quantization: str = "auto"  # draft_model: its weights' format (as --quantization)
    adaptive: bool = True  # per-request draft length from acceptance, global back-off from measured step cost

    @classmethod
    def from_dict(cls, d: dict) -> "SpeculativeConfig":
        """From JSON (`--speculative-config`) or LLM(speculative_config={...}): unknown keys are an error."""
        return _from_json_object(cls, d, "speculative_config", _SPEC_KEYS, "method", SPEC_METHODS)

    def __post_init__(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        require(self.method in SPEC_METHODS,
                 f"speculative_config.method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        n = self.draft_layers
        if self.method == "layer_skip":
            require(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                     "layer_skip needs draft_layers: the number of first layers that draft (an integer >= 1)")
        else:
            require(n is None, "draft_layers is a layer_skip key")
        if self.method == "draft_model":
            require(isinstance(self.model, str) and bool(self.model),
                     "draft_model needs model: a GGUF file or HF directory with the target's tokenizer")
        else:
            require(self.model is None, "model is a draft_model key")
        require(self.quantization in QUANTIZATIONS,
                 f"speculative_config.quantization must be one of {', '.join(QUANTIZATIONS)}")
        k = self.num_speculative_tokens
        require(k is None or (is_int(k) and 1 <= k <= MAX_SPEC_TOKENS),
                 f"num_speculative_tokens must be an integer in [1, {MAX_SPEC_TOKENS}], got {k!r}")
        require(is_int(self.prompt_lookup_min) and is_int(self.prompt_lookup_max)
                 and 1 <= self.prompt_lookup_min <= self.prompt_lookup_max <= 64,
                 "prompt_lookup_min/max must be integers with 1 <= min <= max <= 64")
        require(is_int(self.suffix_decoding_max_tree_depth) and 2 <= self.suffix_decoding_max_tree_depth <= 256,
                 "suffix_decoding_max_tree_depth must be an integer in [2, 256]")
        require(is_int(self.suffix_decoding_max_cached_requests) and self.suffix_decoding_max_cached_requests >= 0,
                 "suffix_decoding_max_cached_requests must be a non-negative integer")
        f = self.suffix_decoding_max_spec_factor
        require(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < float("inf"),
                 "suffix_decoding_max_spec_factor must be a positive number")
        p = self.suffix_decoding_min_token_prob
        require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1,
                 "suffix_decoding_min_token_prob must be in [0, 1]")
        require(isinstance(self.adaptive, bool), "adaptive must be true or false")
        if k is None:
            object.__setattr__(self, "num_speculative_tokens",
                               min(self.suffix_decoding_max_tree_depth, MAX_SPEC_TOKENS)
                               if self.method == "suffix" else 5)

    @property
    def drafts_with_model(self) -> bool:
        """layer_skip / draft_model: drafts come from a forward pass in the worker, not from text."""
        return self.method in ("layer_skip", "draft_model")


EVICTION_POLICIES = ("streaming", "snapkv", "h2o", "lazy", "episodic")  # kvserve.worker.eviction
_EVICTION_KEYS = ("policy", "budget_tokens", "sink_tokens", "window_tokens", "observation_window", "pooling_kernel",
                  "lazy_margin_tokens", "lazy_recurrence_weight", "episodes", "episode_segment_tokens",
                  "episode_layer")


@dataclass(frozen=True)
class KVEvictionConfig:
    """Bounded KV per request (docs/eviction.md): once its prompt is computed, a request keeps at most
    `budget_tokens` tokens' KV (sinks and recent window included), plus one block while it grows (`lazy`: plus its
    margin). `policy` says which tokens stay."""

    policy: str
    budget_tokens: int = 1024  # the default per-request budget (a request may override it; 0 turns eviction off)
    sink_tokens: int = 4  # the first tokens are always kept (StreamingLLM's attention sinks)
    window_tokens: int = 32  # the most recent tokens are always kept
    # snapkv / h2o / lazy: the last prompt tokens whose queries score the prompt's keys (SnapKV's observation window)
    observation_window: int = 32
    pooling_kernel: int = 7  # snapkv: scores are averaged over this many neighbouring tokens (1: no pooling)
    lazy_margin_tokens: int = 16  # lazy: evict in one batch once the KV exceeds the budget by this many (<= a block)
    # lazy: how much a token's recurrence (how regularly attention comes back to it) counts against its mass
    lazy_recurrence_weight: float = 1.0
    # episodic: the prompt (a conversation) is cut into segments of this many tokens, embedded with the model's own
    # hidden states (the V projection of layer `episode_layer`; -1: the middle one) and clustered into `episodes`;
    # the episode closest to the question (the observation window) is kept first
    episodes: int = 4
    episode_segment_tokens: int = 128
    episode_layer: int = -1

    @classmethod
    def from_dict(cls, d: dict) -> "KVEvictionConfig":
        """From JSON (`--kv-eviction`) or LLM(kv_eviction={...}): unknown keys are an error."""
        return _from_json_object(cls, d, "kv_eviction", _EVICTION_KEYS, "policy", EVICTION_POLICIES)

    def __post_init__(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        require(self.policy in EVICTION_POLICIES,
                 f"kv_eviction.policy must be one of {', '.join(EVICTION_POLICIES)}, got {self.policy!r}")
        for name in ("sink_tokens", "window_tokens", "lazy_margin_tokens"):
            v = getattr(self, name)
            require(is_int(v) and v >= 0, f"kv_eviction.{name} must be a non-negative integer, got {v!r}")
        require(is_int(self.observation_window) and self.observation_window >= 1,
                 f"kv_eviction.observation_window must be a positive integer, got {self.observation_window!r}")
        require(is_int(self.pooling_kernel) and self.pooling_kernel >= 1 and self.pooling_kernel % 2 == 1,
                 f"kv_eviction.pooling_kernel must be a positive odd integer, got {self.pooling_kernel!r}")
        require(is_int(self.episodes) and self.episodes >= 1,
                 f"kv_eviction.episodes must be a positive integer, got {self.episodes!r}")
        require(is_int(self.episode_segment_tokens) and self.episode_segment_tokens >= 1,
                 f"kv_eviction.episode_segment_tokens must be a positive integer, got {self.episode_segment_tokens!r}")
        require(is_int(self.episode_layer) and self.episode_layer >= -1,
                 f"kv_eviction.episode_layer must be a layer index or -1 (the middle layer), got {self.episode_layer!r}")
        w = self.lazy_recurrence_weight
        require(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf"),
                 f"kv_eviction.lazy_recurrence_weight must be a non-negative number, got {w!r}")
        self.check_budget(self.budget_tokens, "kv_eviction.budget_tokens")

    @property
    def min_budget(self) -> int:
        """A budget must hold the sinks, the window and at least one token chosen by the policy."""
        return self.sink_tokens + self.window_tokens + 1

    def check_budget(self, budget, name: str) -> None:
        require(isinstance(budget, int) and not isinstance(budget, bool) and budget >= self.min_budget,
                 f"{name} must be an integer >= {self.min_budget} (sink_tokens + window_tokens + 1), got {budget!r}")

    @property
    def margin(self) -> int:
        """Tokens past the budget a decoding request may hold before the next eviction (lazy evicts in batches)."""
        return self.lazy_margin_tokens if self.policy == "lazy" else 0

    @property
    def needs_scores(self) -> bool:
        """Whether the attention kernels accumulate per-key attention mass for this policy."""
        return self.policy != "streaming"

    @property
    def scores_decode(self) -> bool:
        """Whether decode queries keep adding to the scores (h2o, lazy) or only the prompt's window does (snapkv)."""
        return self.policy in ("h2o", "lazy")


@dataclass(frozen=True)
class KeySpan:
    """APE (docs/kvreuse.md): a query at KV index >= hi scores the keys in [lo, hi), the parallel segments, as
    logit * inv_temperature + log_scale: their softmax temperature, and their total weight times the scale."""

    lo: int
    hi: int
    inv_temperature: float
    log_scale: float

    @classmethod
    def ape(cls, lo: int, hi: int, temperature: float, scale: float) -> "KeySpan":
        return cls(lo, hi, 1.0 / temperature, math.log(scale))
