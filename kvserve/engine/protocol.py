"""The narrow engine API: what a front end (server, CLI, offline LLM, benchmarks) may know of and send to an engine core.

Everything here is a msgspec Struct, so the same objects are passed in-process and encoded (msgpack, never pickle)
between the API server and the engine-core process. `validate_request` is the one place where a request is checked
against the engine (context length, KV capacity, token ids, duplicate ids, cache salt); SamplingParams checks itself.
"""

from __future__ import annotations

import msgspec

from kvserve.core.outputs import RequestUpdate
from kvserve.core.request import DEFAULT_TENANT
from kvserve.sampling import ParamError, SamplingParams

MAX_CACHE_SALT_CHARS = 256
MAX_TENANT_CHARS = 64
MAX_SESSION_ID_CHARS = 256


class EngineDeadError(RuntimeError):
    """The engine core died (or could not start) while this request was running; it was not retried."""


class EngineInfo(msgspec.Struct, frozen=True):
    """Facts about a running engine core, fixed for its lifetime."""

    model_name: str
    model_path: str | None
    tokenizer_source: tuple[str, str | None]  # (directory, gguf file name or None): the front end loads it from here
    chat_template: str | None
    max_model_len: int
    vocab_size: int
    block_size: int
    kv_capacity_tokens: int  # pool blocks x block size: no sequence can grow past this
    max_num_seqs: int
    max_num_batched_tokens: int
    dtype: str
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    kv_store: bool
    native_kernels: bool
    quantization: str = "none"  # the matmul weights' format: none (dtype), q8_0, w8a8
    scheduling_policy: str = "fcfs"
    max_queue_wait_s: float | None = None  # requests not scheduled within this are rejected (503 when served)
    speculative_method: str | None = None  # kvserve.spec; None: no speculative decoding
    num_speculative_tokens: int = 0  # the most drafts a request may verify per step (its override's upper bound)
    kv_eviction_policy: str | None = None  # docs/eviction.md; None: no request evicts
    kv_budget_tokens: int = 0  # the default per-request KV budget (0: off)
    kv_min_budget_tokens: int = 0  # the smallest budget a request may ask for (sinks + window + 1)
    enable_segment_cache: bool = True  # CacheBlend (docs/kvreuse.md): segments' KV is reused across prompts
    blend_recompute_ratio: float = 0.15  # the default share of reused tokens recomputed
    blend_segment_context: str = "prefix"  # a cached segment's KV follows the first segment ("prefix") or none
    ape_temperature: float = 1.0  # kv_reuse "parallel": the default attention temperature over the segments
    ape_scale: float = 1.0  # and the default scale of their attention weight
    model_fingerprint: str = ""  # name@digest of the architecture, weights and their quantization (kvstore)
    role: str = "both"  # P/D disaggregation: prefill | decode | both (docs/scaleout.md)

    @property
    def kv_identity(self) -> str:
        """Everything two engines must share for a prefix-block hash to mean the same KV in both (rule 5)."""
        return f"{self.model_fingerprint}|{self.dtype}|block_size={self.block_size}"

    def kv_budget(self, params: SamplingParams) -> int:
        """The KV budget a request runs with (0: no eviction)."""
        return self.kv_budget_tokens if params.kv_budget_tokens is None else params.kv_budget_tokens


SUMMARY_HASH_BYTES = 8  # a prefix summary lists each block hash's first bytes: collisions only misroute


class KVSummary(msgspec.Struct, frozen=True):
    """An engine's advertised prefix-cache content and load, for a KV-aware router (docs/scaleout.md)."""

    version: str  # opaque; pass it back as `since` to get hashes=None while nothing changed
    hashes: bytes | None  # SUMMARY_HASH_BYTES per cached plain block hash, concatenated; None: unchanged
    num_running: int
    num_waiting: int
    kv_usage: float  # share of the pool's blocks referenced by live sequences


class RequestRouting(msgspec.Struct, frozen=True):
    """Whose a request is and how it is scheduled and cached; the defaults are a plain request."""

    cache_salt: str | None = None  # prefix-cache isolation: only requests with the same salt share blocks
    priority: int = 0  # lower runs first under the priority policy
    tenant: str = DEFAULT_TENANT  # who is served (the server sets it from the API key, never from the body)
    session_id: str | None = None  # an agent's conversation (scoped by tenant and cache_salt), for KV pinning
    kv_pin_seconds: float = 0.0  # keep this turn's KV pinned this long for the session's next turn


PLAIN = RequestRouting()

KV_REUSE_MODES = ("blend", "parallel")
APE_MAX = 10.0  # APE's attention temperature and scale: numbers in (0, APE_MAX]


def ape_value_error(name: str, value) -> str | None:
    """The one rule for an APE temperature or scale (engine default or request): a message, or None if valid."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= APE_MAX:
        return f"{name} must be a number in (0, {APE_MAX:g}], got {value!r}"
    return None


class PromptSegments(msgspec.Struct, frozen=True):
    """The prompt's token ids are the concatenation of segments (docs/kvreuse.md): where segments 2, 3, ... start,
    and how their KV may be reused."""

    starts: list[int]  # prompt positions of the first token of every segment after the first, ascending
    blend_recompute_ratio: float | None = None  # None: the engine's default
    kv_reuse: str = "blend"  # or "parallel": APE, no recompute, the later tokens attend to the segments tempered
    precompute: bool = False  # only compute each segment alone into the segment cache (no output)
    ape_temperature: float | None = None  # kv_reuse "parallel" only; None: the engine's default
    ape_scale: float | None = None


def check_segments(info: EngineInfo, num_tokens: int, segments: PromptSegments, params: SamplingParams,
                   routing: RequestRouting = PLAIN) -> None:
    """Raises ParamError: the one check of a segmented prompt against the engine."""
    starts = segments.starts
    if any(type(p) is not int for p in starts) or any(not 0 < p < num_tokens for p in starts) \
            or any(b <= a for a, b in zip(starts, starts[1:])):
        raise ParamError("prompt_segments must be non-empty segments (every segment at least one token)",
                         "prompt_segments")
    r = segments.blend_recompute_ratio
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0):
        raise ParamError("blend_recompute_ratio must be a number in [0, 1]", "blend_recompute_ratio")
    if segments.kv_reuse not in KV_REUSE_MODES:
        raise ParamError(f"kv_reuse must be one of {', '.join(KV_REUSE_MODES)}", "kv_reuse")
    if segments.kv_reuse == "parallel" and r is not None:
        raise ParamError('blend_recompute_ratio applies to kv_reuse "blend" only (parallel recomputes nothing)',
                         "blend_recompute_ratio")
    for name in ("ape_temperature", "ape_scale"):
        value = getattr(segments, name)
        if value is None:
            continue
        if segments.kv_reuse != "parallel":
            raise ParamError(f'{name} applies to kv_reuse "parallel" only', name)
        if (msg := ape_value_error(name, value)) is not None:
            raise ParamError(msg, name)
    if params.prompt_logprobs is not None:
        raise ParamError("prompt_logprobs cannot be combined with prompt_segments: blended KV is approximate, so "
                         "the prompt's logprobs would be too", "prompt_logprobs")
    if info.kv_budget(params):
        raise ParamError("prompt_segments cannot be combined with KV eviction (set kv_budget_tokens to 0)",
                         "kv_budget_tokens")


class KVTransferParams(msgspec.Struct, frozen=True):
    """Prefill/decode disaggregation (docs/scaleout.md). On a prefill instance, `publish`: the prompt's KV goes to
    the KV store down to the block as soon as it is computed. On a decode instance, `output_token_ids`: the tokens
    each sequence already sampled on the prefill instance (they continue from there, seeded draws included), and
    `num_published_tokens`: the prompt tokens the prefill instance published, waited for (bounded) and loaded."""

    publish: bool = False
    output_token_ids: list[list[int]] | None = None  # one list per sequence (n), each non-empty
    num_published_tokens: int = 0


def check_kv_transfer(info: EngineInfo, num_tokens: int, transfer: KVTransferParams, params: SamplingParams,
                      segmented: bool = False) -> None:
    """Raises ParamError: the one check of a P/D transfer against the engine."""
    if segmented:
        raise ParamError("kv_transfer_params cannot be combined with prompt_segments", "kv_transfer_params")
    if not info.kv_store:
        raise ParamError("kv_transfer_params needs a KV store on this engine (start it with --kv-store)",
                         "kv_transfer_params")
    if params.prompt_logprobs is not None or params.max_tokens == 0:
        raise ParamError("kv_transfer_params cannot be combined with prompt_logprobs or max_tokens=0",
                         "kv_transfer_params")
    if info.kv_budget(params):
        raise ParamError("kv_transfer_params cannot be combined with KV eviction", "kv_transfer_params")
    n = transfer.num_published_tokens
    if type(n) is not int or not 0 <= n <= num_tokens:
        raise ParamError("num_published_tokens must be an integer in [0, prompt tokens]", "kv_transfer_params")
    outs = transfer.output_token_ids
    if outs is None:
        return
    if transfer.publish:
        raise ParamError("a request either publishes its prompt's KV (prefill) or continues sampled tokens "
                         "(decode), not both", "kv_transfer_params")
    if len(outs) != params.n or any(not o for o in outs):
        raise ParamError(f"output_token_ids must hold one non-empty list per sequence ({params.n})",
                         "kv_transfer_params")
    if any(type(t) is not int or not 0 <= t < info.vocab_size for o in outs for t in o):
        raise ParamError(f"output token ids must be integers in [0, {info.vocab_size})", "kv_transfer_params")
    longest = max(len(o) for o in outs)
    if params.max_tokens is not None and longest >= params.max_tokens:
        raise ParamError("output_token_ids already reach max_tokens: nothing is left to decode",
                         "kv_transfer_params")
    if num_tokens + longest + 1 > min(info.max_model_len, info.kv_capacity_tokens):
        raise ParamError("the prompt and output_token_ids leave no room to decode", "kv_transfer_params",
                         "context_length_exceeded")


class EngineCoreRequest(msgspec.Struct, frozen=True):
    """A tokenized, validated request; the core expands n > 1 into sequences `{request_id}#{i}`."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0  # time.monotonic() of the front end (CLOCK_MONOTONIC is machine-wide on Linux)
    routing: RequestRouting = PLAIN
    segments: PromptSegments | None = None  # the prompt as segments (CacheBlend); None: a plain prompt
    kv_transfer: KVTransferParams | None = None  # P/D disaggregation: publish the prompt's KV, or continue a prefill


class StepOutputs(msgspec.Struct, frozen=True):
    """What one engine step changed, per sequence, plus when sequences were first scheduled (queue-time metric)."""

    updates: list[RequestUpdate]
    first_scheduled: dict[str, float] = {}  # sequence id -> time.monotonic() of its first scheduling


class PrefixCacheStats(msgspec.Struct, frozen=True):
    queries: int  # requests looked up
    queried_tokens: int
    hit_tokens: int
    misses: dict[str, int]  # by cause


class TierStats(msgspec.Struct, frozen=True):
    tier: str  # label (secrets redacted)
    kind: str
    codec: str
    healthy: bool
    accepts_writes: bool
    capacity_bytes: int
    used_bytes: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    errors: int
    rejected: int
    evictions: int
    writes: int
    load_seconds_buckets: list[int]
    load_seconds_sum: float
    load_seconds_count: int


class KVStoreStats(msgspec.Struct, frozen=True):
    tiers: list[TierStats]
    counters: dict[str, float]  # event counts, and seconds spent encoding (encode_seconds_<codec>)
    rejected: dict[str, int]  # entries dropped at load, by reason
    prefill_tokens_per_s: float | None
    pending_saves: int


class SessionKey(msgspec.Struct, frozen=True):
    """Names a pinned session: only its own tenant (and cache_salt) can release it."""

    tenant: str
    cache_salt: str | None
    session_id: str


class PinStats(msgspec.Struct, frozen=True):
    num_pins: int  # sessions whose KV is pinned now
    blocks_pinned: int  # KV blocks they hold (counted in kv_blocks_used)
    pinned: int  # cumulative: pins made
    taken_over: int  # ... used by the session's next turn
    expired: int
    released: int  # ... released by the client
    evicted: int  # ... unpinned early (a cap, or room for a running request)


class TenantStats(msgspec.Struct, frozen=True):
    num_waiting: int  # sequences queued (waiting, preempted, fetching their prefix)
    num_running: int
    prompt_tokens_computed: int  # cumulative: prompt tokens run through the model for this tenant
    output_tokens: int  # cumulative
    rejected: int  # cumulative: requests dropped by the queue-wait deadline
    vtc_counter: float | None  # the fair-share policy's virtual counter; None under other policies


class SpeculativeStats(msgspec.Struct, frozen=True):
    """Speculative decoding counters (cumulative) of the engine's one method."""

    method: str
    num_drafts: int  # verifications with at least one draft token
    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_lengths: list[int]  # [a]: verifications that accepted exactly a draft tokens
    num_backed_off: int  # drafted tokens the step-cost rule did not verify
    suffix_cached_requests: int = 0
    suffix_tree_nodes: int = 0
    step_cost_s: dict[int, float] = {}  # the back-off's learned seconds per forward pass, by token-count bucket


class EvictionStats(msgspec.Struct, frozen=True):
    """KV eviction (docs/eviction.md) under the engine's one policy."""

    policy: str
    evicted_tokens: int  # cumulative: tokens whose KV running requests dropped
    kv_tokens_held: int  # now: KV tokens held by running requests (evicting or not)
    score_seconds: float  # cumulative: worker time on attention-score bookkeeping and selection


class BlendStats(msgspec.Struct, frozen=True):
    """CacheBlend's segment cache (docs/kvreuse.md), cumulative."""

    segment_hits: int  # segment-cache lookups (at a request's arrival and at its admission) that found the segment
    segment_misses: int  # ... that did not: computed alone first (arrival) or in place (evicted before admission)
    blended_tokens: int  # prompt tokens whose KV came re-rotated from the segment cache
    recomputed_tokens: int  # ... of which the check layer picked for recompute


class EngineStats(msgspec.Struct, frozen=True):
    """A snapshot of the engine core's counters and gauges (cumulative counters never go down)."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache: PrefixCacheStats
    num_preemptions: int
    evictions: int
    prompt_tokens_computed: int
    prompt_tokens_loaded: int
    kv_store: KVStoreStats | None = None
    ipc_frames_dropped: int = 0  # malformed or oversized frames the engine-core process refused
    engine_restarts: int = 0  # engine-core processes started again after one died
    tenants: dict[str, TenantStats] = {}
    kv_pins: PinStats | None = None
    preemptions_swapped: int = 0  # of num_preemptions: KV copied to the swap space (the rest recomputed)
    swap_blocks_used: int = 0
    swap_blocks_total: int = 0
    speculative: SpeculativeStats | None = None
    eviction: EvictionStats | None = None
    blend: BlendStats | None = None  # None: the segment cache is off


def validate_request(info: EngineInfo, prompt_token_ids: list[int], params: SamplingParams,
                     routing: RequestRouting = PLAIN) -> None:
    """Raises ParamError (with `param` and `code`) if this request can never run on this engine."""
    cache_salt, tenant, priority = routing.cache_salt, routing.tenant, routing.priority
    session_id, kv_pin_seconds = routing.session_id, routing.kv_pin_seconds
    ids, vocab, max_len = prompt_token_ids, info.vocab_size, info.max_model_len
    if not ids:
        raise ParamError("the prompt is empty", "prompt")
    if any(type(t) is not int or t < 0 or t >= vocab for t in ids):
        raise ParamError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
    if len(ids) >= max_len:
        raise ParamError(f"this model's maximum context length is {max_len} tokens, but the prompt has "
                         f"{len(ids)} tokens", "prompt", "context_length_exceeded")
    if params.max_tokens is not None and len(ids) + params.max_tokens > max_len:
        raise ParamError(f"this model's maximum context length is {max_len} tokens; the prompt has {len(ids)} "
                         f"tokens and max_tokens is {params.max_tokens} ({len(ids) + params.max_tokens} in total)",
                         "max_tokens", "context_length_exceeded")
    if len(ids) + 1 > info.kv_capacity_tokens:
        raise ParamError(f"the prompt has {len(ids)} tokens but the KV cache holds at most "
                         f"{info.kv_capacity_tokens - 1}; raise kv_cache_memory_gb", "prompt",
                         "context_length_exceeded")
    k = params.num_speculative_tokens
    if k and k > info.num_speculative_tokens:
        raise ParamError(f"num_speculative_tokens must be at most {info.num_speculative_tokens} on this engine"
                         if info.num_speculative_tokens else
                         "speculative decoding is not enabled on this engine (num_speculative_tokens must be 0)",
                         "num_speculative_tokens")
    b = params.kv_budget_tokens
    if b:
        if info.kv_eviction_policy is None:
            raise ParamError("KV eviction is not enabled on this engine (start it with a kv_eviction policy); "
                             "kv_budget_tokens must be 0 or absent", "kv_budget_tokens")
        if b < info.kv_min_budget_tokens:
            raise ParamError(f"kv_budget_tokens must be 0 (no eviction) or at least {info.kv_min_budget_tokens} "
                             "(the policy's sink and window tokens + 1)", "kv_budget_tokens")
    if params.max_tokens == 0 and params.n > 1:
        raise ParamError("max_tokens=0 (scoring) needs n=1", "n")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt
                                   or len(cache_salt) > MAX_CACHE_SALT_CHARS or not cache_salt.isprintable()):
        # printable: namespaced chains (segments, blended KV) use keys no salt can spell (core/hashing.py)
        raise ParamError(f"cache_salt must be a non-empty printable string of at most {MAX_CACHE_SALT_CHARS} "
                         "characters", "cache_salt")
    if not isinstance(tenant, str) or not tenant or len(tenant) > MAX_TENANT_CHARS or not tenant.isprintable():
        raise ParamError(f"tenant must be a non-empty printable string of at most {MAX_TENANT_CHARS} characters",
                         "tenant")
    if session_id is not None and (not isinstance(session_id, str) or not session_id
                                   or len(session_id) > MAX_SESSION_ID_CHARS or not session_id.isprintable()):
        raise ParamError(f"session_id must be a non-empty printable string of at most {MAX_SESSION_ID_CHARS} "
                         "characters", "session_id")
    if kv_pin_seconds:
        if not isinstance(kv_pin_seconds, (int, float)) or not 0 < kv_pin_seconds < float("inf"):
            raise ParamError("kv_pin_seconds must be a non-negative number of seconds", "kv_pin_seconds")
        if session_id is None:
            raise ParamError("kv_pin_seconds needs a session_id (the next turn that will use the KV)",
                             "kv_pin_seconds")
        if params.n != 1:
            raise ParamError("kv_pin_seconds needs n=1 (one conversation continues)", "kv_pin_seconds")
        if not info.enable_prefix_caching:
            raise ParamError("kv_pin_seconds needs prefix caching (the next turn finds the pinned KV through it)",
                             "kv_pin_seconds")
    if type(priority) is not int:
        raise ParamError("priority must be an integer", "priority")
    if priority != 0 and info.scheduling_policy != "priority":
        raise ParamError(f"priority is only used by the priority scheduling policy (this engine runs "
                         f"{info.scheduling_policy})", "priority")


def sequence_ids(request_id: str, n: int) -> list[str]:
    """The core's id for each of a request's n sequences (the front end maps updates back by them)."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


def group_id(seq_id: str) -> str:
    return seq_id.rpartition("#")[0] if "#" in seq_id else seq_id


def check_new_id(request_id: str, live: object) -> None:
    """Duplicate ids would cross two clients' streams; `live` is any container of the ids in flight."""
    if request_id in live:
        raise ParamError(f"duplicate request id {request_id!r}", "request_id", "duplicate_request_id")
