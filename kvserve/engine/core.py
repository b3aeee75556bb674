"""EngineCore: model, scheduler, runner and KV store behind the narrow engine API (kvserve.engine.protocol).

It takes tokenized requests and returns per-sequence token updates; detokenization, stop strings and everything
user-facing live in the front end (`LLMEngine` in-process, `AsyncLLM` over IPC), so a step here is only
schedule / execute / update.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field

import torch

from kvserve.config import (
    CacheConfig,
    ConfigError,
    KVEvictionConfig,
    SchedulerConfig,
    SpeculativeConfig,
    check_decode_steps,
    check_scheduling,
)
from kvserve.core.kv_cache_manager import KVCacheManager
from kvserve.core.request import BlendSpec, Request, RequestStatus
from kvserve.core.scheduler import Scheduler
from kvserve.core.step_trace import StepTrace
from kvserve.engine.protocol import (
    BlendStats,
    EngineCoreRequest,
    EngineInfo,
    EngineStats,
    EvictionStats,
    KVStoreStats,
    KVSummary,
    SUMMARY_HASH_BYTES,
    PrefixCacheStats,
    PinStats,
    SessionKey,
    SpeculativeStats,
    StepOutputs,
    TenantStats,
    TierStats,
    ape_value_error,
    check_kv_transfer,
    check_new_id,
    check_segments,
    group_id,
    sequence_ids,
    validate_request,
)
from kvserve.model.llama import LlamaModel
from kvserve.model.loader import load_model
from kvserve.model.quant import QUANTIZATIONS, format_identity, resolve_quantization
from kvserve.model.smoothquant import CALIBRATION_TEXT, smooth_for_w8a8
from kvserve.model.tokenizer import Tokenizer
from kvserve.spec.decoder import SpecDecoder, attended_kv
from kvserve.worker.kv_cache import KVCache, bytes_per_block, num_blocks_for_budget
from kvserve.worker.kv_swap import SwapBuffer
from kvserve.worker.kv_transfer import KVTransfer, NullKVTransfer
from kvserve.worker.drafter import ModelDrafter
from kvserve.worker.eviction import KVEvictor
from kvserve.worker.model_runner import ModelRunner

BLEND_SEGMENT_CONTEXTS = ("prefix", "none")
ROLES = ("both", "prefill", "decode")  # P/D disaggregation (docs/scaleout.md)
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
           "float": torch.float32, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None
    dtype: str = "bfloat16"
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_memory_gb: float = 2.0
    num_blocks: int | None = None
    max_model_len: int | None = None
    num_threads: int | None = None
    pad_shapes: bool = True
    native_kernels: bool = True  # JIT-built C++ attention and fused ops (fall back to PyTorch if they cannot build)
    # tiered KV store below the pool, e.g. "memory:4GB,disk:/var/kv:20GB,redis://127.0.0.1:6379" (kvserve.kvstore)
    kv_store: str | None = field(default=None, repr=False)  # may hold a Redis password
    kv_store_chunk_size: int = 256
    kv_store_load: str = "auto"  # auto: load or recompute by the store's cost model; always: load whatever is stored
    kv_store_key: str | None = field(default=None, repr=False)  # secret that authenticates stored entries (HMAC); None: integrity check only
    # matmul weights: auto keeps a checkpoint's own format where kvserve runs it natively (else none: dequantized to
    # dtype); q8_0 / w8a8 quantize at load (kvserve.model.quant)
    quantization: str = "auto"
    scheduling_policy: str = "fcfs"  # fcfs | priority | vtc (kvserve.core.policy)
    tenant_weights: tuple[tuple[str, float], ...] = ()  # vtc fair-share weights; unlisted tenants weigh 1
    max_queue_wait_s: float | None = None  # reject requests not scheduled within this many seconds
    kv_pin_max_fraction: float = 0.5  # KV pins for agent sessions may hold at most this share of the pool
    kv_pin_reserved_fraction: float = 0.0  # pins up to this share of the pool hold against waiting requests
    tenant_pin_max_tokens: tuple[tuple[str, int], ...] = ()  # per-tenant caps on pinned KV tokens
    pinned_sessions_first: bool = True  # a pinned session's next turn is admitted before new requests
    # preemption: auto = per victim, swap its KV to host memory or recompute it, by measured cost (core/swap.py)
    preemption_mode: str = "auto"
    swap_space_gb: float = 1.0  # host memory for swapped-out KV (allocated on the first swap)
    # speculative decoding (kvserve.spec); a dict (LLM(speculative_config={...})) is checked into the config
    speculative_config: SpeculativeConfig | None = None
    # KV eviction (docs/eviction.md): the policy and default per-request budget; a dict is checked into the config
    kv_eviction: KVEvictionConfig | None = None
    # CacheBlend (docs/kvreuse.md): reuse segments' KV wherever they appear in a prompt
    enable_segment_cache: bool = True
    blend_recompute_ratio: float = 0.15  # share of reused tokens recomputed (a request may override it)
    blend_check_layer: int = 1  # the layer whose KV deviation picks the tokens to recompute
    # what a cached segment's KV was computed after: "prefix" (a prompt's first segment, e.g. the system prompt;
    # APE's shared prefix) or "none" (alone from position 0, content-addressed wherever it sits)
    blend_segment_context: str = "prefix"
    # APE's parallel encoding (kv_reuse "parallel"): the default attention temperature over the middle segments and
    # scale of their attention weight, for the tokens after them (a request may override them)
    ape_temperature: float = 1.0
    ape_scale: float = 1.0
    # P/D disaggregation (docs/scaleout.md): a prefill instance publishes every prompt's KV to the store down to the
    # block; a decode instance continues prefills from it; both (the default) serves whole requests
    role: str = "both"
    kv_transfer_timeout_s: float = 5.0  # a decode instance waits this long for KV still being written, then computes
    kv_transfer_lossy: bool = False  # allow a lossy store codec (int8/int4) for P/D transfers: outputs then differ
    # greedy decode steps per engine step while every running request is a plain greedy decode and none waits:
    # fewer scheduler rounds and outputs per token for small batches; outputs come in runs of up to this many
    decode_steps: int = 1
    step_trace: str | None = None  # kvserve bench plan: append each busy step's features and cycle time here (JSONL)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not (isinstance(self.kv_transfer_timeout_s, (int, float)) and 0 <= self.kv_transfer_timeout_s < 3600):
            raise ConfigError("kv_transfer_timeout_s must be a number of seconds in [0, 3600)")
        if self.role != "both":
            if not self.kv_store:
                raise ConfigError(f"role {self.role} moves KV through the KV store: give --kv-store (e.g. a disk "
                                  "tier on /dev/shm shared by the instances on one host, or Redis)")
            from kvserve.kvstore.config import parse_kv_store

            lossy = [t.label for t in parse_kv_store(self.kv_store).tiers if t.codec in ("int8", "int4")]
            if lossy and not self.kv_transfer_lossy:
                raise ConfigError(f"role {self.role}: tier(s) {', '.join(lossy)} use a lossy codec, so decoded "
                                  "outputs would differ from colocated serving; use none or zstd, or allow it "
                                  "with --kv-transfer-lossy")
        if isinstance(self.speculative_config, dict):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        if isinstance(self.kv_eviction, dict):
            object.__setattr__(self, "kv_eviction", KVEvictionConfig.from_dict(self.kv_eviction))
        if self.kv_eviction is not None and self.speculative_config is not None \
                and self.speculative_config.drafts_with_model:
            raise ConfigError("kv_eviction works with text drafts (ngram, suffix); a model drafter's KV follows "
                              "positions, which eviction no longer matches")
        check_decode_steps(self.decode_steps)
        if self.decode_steps != 1 and self.speculative_config is not None:
            raise ConfigError("decode_steps > 1 and speculative decoding both give a step several tokens: pick one")
        if self.kv_eviction is not None and self.kv_eviction.margin > self.block_size:
            raise ConfigError(f"kv_eviction.lazy_margin_tokens must be at most the block size ({self.block_size}): "
                              "a request's KV stays within its budget plus one block")
        if isinstance(self.blend_recompute_ratio, bool) or not isinstance(self.blend_recompute_ratio, (int, float)) \
                or not 0.0 <= self.blend_recompute_ratio <= 1.0:
            raise ConfigError(f"blend_recompute_ratio must be in [0, 1], got {self.blend_recompute_ratio!r}")
        if type(self.blend_check_layer) is not int or self.blend_check_layer < 0:
            raise ConfigError(f"blend_check_layer must be a layer index >= 0, got {self.blend_check_layer!r}")
        if self.blend_segment_context not in BLEND_SEGMENT_CONTEXTS:
            raise ConfigError(f"blend_segment_context must be one of {', '.join(BLEND_SEGMENT_CONTEXTS)}, "
                              f"got {self.blend_segment_context!r}")
        for name in ("ape_temperature", "ape_scale"):
            if (msg := ape_value_error(name, getattr(self, name))) is not None:
                raise ConfigError(msg)
        if not 0 <= self.swap_space_gb < float("inf"):
            raise ConfigError("swap_space_gb must be a non-negative number of GiB")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        # msgspec decodes the weights (JSON to the engine-core process) as lists
        object.__setattr__(self, "tenant_weights", tuple(tuple(pair) for pair in self.tenant_weights))
        object.__setattr__(self, "tenant_pin_max_tokens", tuple(tuple(pair) for pair in self.tenant_pin_max_tokens))
        check_scheduling(self.scheduling_policy, self.tenant_weights, self.max_queue_wait_s, self.preemption_mode,
                         self.kv_pin_max_fraction, self.kv_pin_reserved_fraction)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        return _DTYPES[self.dtype]


class EngineCore:
    def __init__(self, args: EngineArgs, model: LlamaModel | None = None, tokenizer: Tokenizer | None = None,
                 model_name: str | None = None, tokenizer_source: tuple[str, str | None] | None = None,
                 chat_template: str | None = None):
        """`model`/`tokenizer` let several engines (tests, benchmarks) share one set of loaded weights."""
        self.args = args
        self.step_trace = StepTrace(args.step_trace) if args.step_trace else None
        dtype = args.torch_dtype()
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        if model is None or tokenizer is None:
            loaded = load_model(args.model)
            tokenizer_source, chat_template = loaded.tokenizer_source, loaded.chat_template
            tokenizer = Tokenizer(tokenizer_source, chat_template)
            quantization = resolve_quantization(args.quantization, loaded.weight_format, dtype == torch.float32)
            weights = loaded.weights
            if quantization == "w8a8":  # activation outliers moved into the weights first (model/smoothquant.py)
                weights = smooth_for_w8a8(loaded.config, weights, tokenizer.encode(CALIBRATION_TEXT), dtype)
            model = LlamaModel(loaded.config, weights, dtype, native_kernels=args.native_kernels,
                               quantization=quantization)
            del weights
            model_name = loaded.name
            del loaded
        if model.dtype != dtype:
            raise ConfigError(f"shared model has dtype {model.dtype}, engine asked for {dtype}")
        if args.quantization not in ("auto", model.quantization):
            raise ConfigError(f"shared model is quantized as {model.quantization}, engine asked for "
                              f"{args.quantization}")
        self.model = model
        self.tokenizer = tokenizer  # the in-process front end shares it; the core itself only needs EOS ids
        config = model.config
        max_len = min(args.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        cache_config = CacheConfig(args.block_size, args.num_blocks, args.kv_cache_memory_gb,
                                   args.enable_prefix_caching)
        budget = args.max_num_batched_tokens
        if not args.enable_chunked_prefill:
            budget = max(budget, max_len)  # every prompt must fit one step when it cannot be split
        num_blocks = args.num_blocks or num_blocks_for_budget(config, args.block_size, dtype,
                                                              args.kv_cache_memory_gb)
        block_bytes = bytes_per_block(config, args.block_size, dtype)
        num_swap_blocks = int(args.swap_space_gb * (1 << 30)) // block_bytes if args.preemption_mode != "recompute" \
            else 0
        scheduler_config = SchedulerConfig(budget, args.max_num_seqs, max_len, args.enable_chunked_prefill,
                                           args.scheduling_policy, args.tenant_weights, args.max_queue_wait_s,
                                           args.kv_pin_max_fraction, args.tenant_pin_max_tokens,
                                           args.pinned_sessions_first, args.preemption_mode, num_swap_blocks,
                                           block_bytes, kv_pin_reserved_fraction=args.kv_pin_reserved_fraction,
                                           kv_eviction_margin=args.kv_eviction.margin if args.kv_eviction else 0,
                                           kv_transfer_timeout_s=args.kv_transfer_timeout_s,
                                           decode_steps=args.decode_steps)
        self.kv_cache = KVCache(config, num_blocks, args.block_size, dtype)
        self.kv_manager = KVCacheManager(num_blocks, args.block_size, cache_config.enable_prefix_caching)
        name = model_name or "model"
        from kvserve.kvstore.store import model_fingerprint

        fingerprint = model_fingerprint(name, config, model.fingerprint_weights(), format_identity(model.quantization))
        self.kv_store = self._make_kv_store(args, fingerprint, model, dtype)
        self.scheduler = Scheduler(scheduler_config, self.kv_manager, connector=self.kv_store)
        transfer = NullKVTransfer() if self.kv_store is None else KVTransfer(self.kv_cache, self.kv_store)
        swap = SwapBuffer(self.kv_cache, num_swap_blocks) if num_swap_blocks else None
        drafter = self._make_drafter(args.speculative_config, args, tokenizer, dtype, num_blocks)
        evictor = None
        if args.kv_eviction:
            layer = args.kv_eviction.episode_layer
            if layer >= config.num_layers:
                raise ConfigError(f"kv_eviction.episode_layer must be below the model's {config.num_layers} layers")
            v_cache = self.kv_cache.layers[config.num_layers // 2 if layer < 0 else layer][1]
            evictor = KVEvictor(args.kv_eviction, config.num_kv_heads, args.block_size, v_cache)
        if args.blend_check_layer >= config.num_layers:
            raise ConfigError(f"blend_check_layer must be below the model's {config.num_layers} layers")
        self.runner = ModelRunner(self.model, self.kv_cache, transfer, pad_shapes=args.pad_shapes, swap=swap,
                                  drafter=drafter, evictor=evictor, blend_check_layer=args.blend_check_layer)
        self._eviction_seconds = 0.0
        eos = set(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.info = EngineInfo(
            model_name=name, model_path=args.model,
            tokenizer_source=tokenizer_source or ("", None), chat_template=chat_template,
            max_model_len=max_len, vocab_size=config.vocab_size, block_size=args.block_size,
            kv_capacity_tokens=num_blocks * args.block_size, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=budget, dtype=str(dtype).removeprefix("torch."),
            enable_prefix_caching=args.enable_prefix_caching, enable_chunked_prefill=args.enable_chunked_prefill,
            kv_store=self.kv_store is not None, native_kernels=model.uses_native_kernels,
            quantization=model.quantization, scheduling_policy=args.scheduling_policy,
            max_queue_wait_s=args.max_queue_wait_s, role=args.role,
            speculative_method=args.speculative_config.method if args.speculative_config else None,
            num_speculative_tokens=args.speculative_config.num_speculative_tokens if args.speculative_config else 0,
            kv_eviction_policy=args.kv_eviction.policy if args.kv_eviction else None,
            kv_budget_tokens=args.kv_eviction.budget_tokens if args.kv_eviction else 0,
            kv_min_budget_tokens=args.kv_eviction.min_budget if args.kv_eviction else 0,
            enable_segment_cache=args.enable_segment_cache and args.enable_prefix_caching,
            blend_recompute_ratio=float(args.blend_recompute_ratio), blend_segment_context=args.blend_segment_context,
            ape_temperature=float(args.ape_temperature), ape_scale=float(args.ape_scale),
            model_fingerprint=fingerprint)
        self._summary_epoch = uuid.uuid4().hex[:12]  # a restarted core's versions never match an old one's
        self._group_seqs: dict[str, list[str]] = {}
        self.spec = SpecDecoder(args.speculative_config) if args.speculative_config else None

    def _make_drafter(self, spec: SpeculativeConfig | None, args: EngineArgs, tokenizer: Tokenizer,
                      dtype: torch.dtype, num_blocks: int) -> ModelDrafter | None:
        """layer_skip: the target's first layers over its own KV; draft_model: a second model whose KV cache mirrors
        the pool's blocks (same block ids, its own layers)."""
        if spec is None or not spec.drafts_with_model:
            return None
        if spec.method == "layer_skip":
            n = spec.draft_layers
            if n >= self.model.config.num_layers:
                raise ConfigError(f"draft_layers must be below the model's {self.model.config.num_layers} layers, "
                                  f"got {n}")
            return ModelDrafter(self.model, self.kv_cache.layers[:n], ModelRunner(self.model, self.kv_cache,
                                                                                  pad_shapes=args.pad_shapes),
                                shares_target_kv=True)
        loaded = load_model(spec.model)
        draft_tok = Tokenizer(loaded.tokenizer_source, loaded.chat_template)
        if not draft_tok.same_vocabulary(tokenizer):
            raise ConfigError(f"draft model {spec.model} has another tokenizer than the target model: its "
                              "drafts' token ids would mean other text")
        quantization = resolve_quantization(spec.quantization, loaded.weight_format, dtype == torch.float32)
        model = LlamaModel(loaded.config, loaded.weights, dtype, native_kernels=args.native_kernels,
                           quantization=quantization)
        del loaded
        cache = KVCache(model.config, num_blocks, args.block_size, dtype)
        return ModelDrafter(model, cache.layers, ModelRunner(model, cache, pad_shapes=args.pad_shapes),
                            shares_target_kv=False)

    def _make_kv_store(self, args: EngineArgs, fingerprint: str, model: LlamaModel, dtype: torch.dtype):
        if not args.kv_store:
            return None
        from kvserve.kvstore import KVStore, parse_kv_store

        config = parse_kv_store(args.kv_store, chunk_size=args.kv_store_chunk_size, load_policy=args.kv_store_load,
                                key=args.kv_store_key)
        config.check_block_size(args.block_size)
        c = model.config
        return KVStore(config, fingerprint, dtype, c.num_layers, c.num_kv_heads, c.head_dim, args.block_size)

    def close(self) -> None:
        """Stop the KV store's threads (after its queued saves are written)."""
        if self.step_trace is not None:
            self.step_trace.close()
        if self.kv_store is not None:
            self.runner.apply_kv_ops(self.scheduler.take_kv_ops())
            self.kv_store.flush(timeout=30.0)
            self.kv_store.close()

    # ------------------------------------------------------------------ requests
    def add_request(self, request: EngineCoreRequest) -> None:
        """Raises ParamError (nothing is queued) if the request cannot run; n > 1 becomes n sequences."""
        rid, params = request.request_id, request.params
        check_new_id(rid, self._group_seqs)
        validate_request(self.info, request.prompt_token_ids, params, request.routing)
        blend = None
        if request.segments is not None:
            seg = request.segments
            check_segments(self.info, len(request.prompt_token_ids), seg, params, request.routing)
            ratio = self.info.blend_recompute_ratio if seg.blend_recompute_ratio is None else seg.blend_recompute_ratio
            ape = None
            if seg.kv_reuse == "parallel":  # APE: the cached segments stand as they are, read tempered
                ratio = 0.0
                ape = (float(self.info.ape_temperature if seg.ape_temperature is None else seg.ape_temperature),
                       float(self.info.ape_scale if seg.ape_scale is None else seg.ape_scale))
            ctx = seg.starts[0] if self.info.blend_segment_context == "prefix" and seg.starts else 0
            blend = BlendSpec(tuple(seg.starts), float(ratio), self.info.enable_segment_cache, seg.precompute, ctx,
                              ape)
        transfer = request.kv_transfer
        if transfer is not None:
            check_kv_transfer(self.info, len(request.prompt_token_ids), transfer, params, blend is not None)
        seq_ids = sequence_ids(rid, params.n)
        for sid in seq_ids:
            check_new_id(sid, self.scheduler.requests)
        arrival = request.arrival_time or time.monotonic()
        r = request.routing
        requests, first = [], None
        for i, sid in enumerate(seq_ids):
            sp = params
            if i > 0 and params.seed is not None:
                sp = params.replace(seed=params.seed + i)
            req = Request(sid, request.prompt_token_ids, sp, self.info.block_size, self.eos_token_ids,
                          r.cache_salt, arrival, r.priority, self.info.max_model_len, share_prompt_with=first,
                          tenant=r.tenant, session_id=r.session_id, kv_pin_seconds=r.kv_pin_seconds,
                          kv_budget=self.info.kv_budget(params), blend=blend)
            continues = transfer is not None and transfer.output_token_ids is not None
            req.publish_kv = (transfer is not None and transfer.publish) or (self.info.role == "prefill"
                                                                             and not continues)
            if continues:
                # continues a prefill instance's sequence: its sampled tokens are outputs (penalties, stops and
                # max_tokens count them) and a sampled sequence's seeded generator has made one draw for each
                for tok in transfer.output_token_ids[i]:
                    req.append_output_token(tok)
                req.sampler_draws = 0 if sp.greedy else len(transfer.output_token_ids[i])
                req.kv_transfer_tokens = transfer.num_published_tokens
            first = first or req
            requests.append(req)
        for req in requests:  # everything is validated above: nothing can fail half-way and leave state behind
            self.scheduler.add_request(req)
            if self.spec is not None:
                self.spec.add(req.request_id, params.num_speculative_tokens, r.tenant, r.cache_salt)
        self._group_seqs[rid] = seq_ids

    def finish_requests(self, ids: list[str], status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> None:
        """End requests (every sequence of a request id) or single sequences (`rid#i`, e.g. a stop string matched
        in the front end); their blocks are freed at once and their KV saved by the next step's KV operations."""
        for rid in ids:
            for sid in self._group_seqs.get(rid) or (rid,):
                if self.spec is not None:
                    req = self.scheduler.requests.get(sid)
                    self.spec.finish(sid, req.output_token_ids if req is not None else [])
                self.scheduler.finish_request(sid, status)
                self._forget_seq(sid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.scheduler.has_pending_kv_ops()

    # ------------------------------------------------------------------ step
    def step(self) -> StepOutputs:
        step_started = time.perf_counter()
        if self.step_trace is not None:
            self.step_trace.step_started(step_started)
        sched = self.scheduler.schedule()
        now = time.monotonic()
        first_scheduled = {}
        for sr in sched.scheduled:
            if sr.request.first_scheduled_time is None and not sr.request.segment_fill:
                sr.request.first_scheduled_time = now
                first_scheduled[sr.request_id] = now
        if sched.is_empty and self.scheduler.fetching and self.kv_store is not None:
            self.kv_store.wait_for_fetch(0.01)  # idle until a fetch lands, without spinning
        started = time.perf_counter()
        out = self.runner.execute(sched)
        elapsed = time.perf_counter() - started
        self._eviction_seconds += out.eviction_seconds
        if self.kv_store is not None and sched.scheduled:
            self.kv_store.observe_prefill(sched.num_batched_tokens, elapsed)
        prefill_tokens = sum(s.num_new_tokens for s in sched.scheduled if s.num_new_tokens > 1)
        if prefill_tokens * 2 >= sched.num_batched_tokens > 0:  # mostly prefill: what recomputing a victim costs
            self.scheduler.swap_cost.observe_prefill(sched.num_batched_tokens, elapsed)
        updates = self.scheduler.update(sched, out)
        if self.spec is not None:
            self._speculate(sched, out, updates, elapsed)
        for u in updates:
            if u.finish_reason is not None:
                self._forget_seq(u.request_id)
        if self.step_trace is not None:
            self.step_trace.step_done(sched, step_started, self.scheduler.has_unfinished_requests())
        return StepOutputs(updates, first_scheduled)

    def _speculate(self, sched, out, updates, elapsed: float) -> None:
        """Learn from this step (cost, acceptance), then propose the drafts the next schedule() will verify."""
        spec = self.spec
        spec.observe_draft(out.draft_iterations, out.draft_seconds)
        spec.observe_step(sched.num_batched_tokens, elapsed - out.draft_total_seconds,
                          sum(attended_kv(sr.kv_start, sr.num_new_tokens) for sr in sched.scheduled))
        by_id = {}
        for sr in sched.scheduled:
            by_id[sr.request_id] = sr.request
            if sr.spec_token_ids and sr.request_id in out.sampled:
                spec.observe_verification(sr.request_id, len(sr.spec_token_ids), len(out.sampled[sr.request_id]) - 1)
        for u in updates:
            if u.finish_reason is not None:
                req = by_id.get(u.request_id)
                spec.finish(u.request_id, req.output_token_ids if req is not None else [])
        decoding = [r for r in self.scheduler.running if r.num_tokens - r.num_computed_tokens == 1]
        chunks = self.scheduler.prefill_ahead_of_drafts()
        spec.propose(decoding, sum(n for _, n in chunks), sum(attended_kv(s, n) for s, n in chunks))

    def _forget_seq(self, seq_id: str) -> None:
        group = group_id(seq_id)
        live = self._group_seqs.get(group)
        if live is not None and all(s not in self.scheduler.requests for s in live):
            del self._group_seqs[group]

    def reset_prefix_cache(self) -> bool:
        """Drop the pool's prefix cache (the tiered store keeps its entries); False while requests hold blocks."""
        return self.kv_manager.reset_prefix_cache()

    def kv_summary(self, since: str | None = None) -> KVSummary:
        """What a KV-aware router scores this engine by: its advertised prefix hashes (truncated; None when unchanged
        since the version `since`) and its load."""
        epoch, _, number = (since or "").partition(":")
        version, hashes = self.kv_manager.prefix_summary(int(number) if epoch == self._summary_epoch
                                                         and number.isdigit() else None)
        sched, n = self.scheduler, SUMMARY_HASH_BYTES
        return KVSummary(f"{self._summary_epoch}:{version}",
                         None if hashes is None else b"".join(h[:n] for h in hashes),
                         sched.num_running, sched.num_waiting, self.kv_manager.num_used_blocks / self.kv_manager.num_blocks)

    def release_session(self, key: SessionKey) -> int:
        """Unpin a session's KV now (the client says it will not continue); the tokens that were pinned."""
        return self.scheduler.release_pin((key.tenant, key.cache_salt or "", key.session_id))

    def stats(self) -> EngineStats:
        kv, sched = self.kv_manager, self.scheduler
        sched.pins.expire(sched.clock())  # an idle engine does not step: report pins as of now
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            kv_blocks_total=kv.num_blocks, kv_blocks_used=kv.num_used_blocks,
            prefix_cache=PrefixCacheStats(kv.stats.queries, kv.stats.queried_tokens, kv.stats.hit_tokens,
                                          dict(kv.stats.misses)),
            num_preemptions=sched.num_preemptions, evictions=kv.num_evictions,
            prompt_tokens_computed=sched.num_computed_prompt_tokens, prompt_tokens_loaded=sched.num_loaded_tokens,
            kv_store=self._kv_store_stats(), tenants=self._tenant_stats(),
            kv_pins=PinStats(len(sched.pins), sched.pins.num_blocks, **dataclasses.asdict(sched.pins.stats)),
            preemptions_swapped=sched.num_swapped_preemptions, swap_blocks_used=sched.swap.num_used,
            swap_blocks_total=sched.swap.num_slots,
            speculative=SpeculativeStats(**dataclasses.asdict(self.spec.snapshot())) if self.spec else None,
            eviction=EvictionStats(self.args.kv_eviction.policy, sched.num_evicted_tokens,
                                   sum(r.num_kv_tokens for r in sched.running), self._eviction_seconds)
            if self.args.kv_eviction else None,
            blend=BlendStats(sched.num_segment_hits, sched.num_segment_misses, sched.num_blended_tokens,
                             sched.num_recomputed_tokens) if self.info.enable_segment_cache else None)

    def _tenant_stats(self) -> dict[str, TenantStats]:
        sched = self.scheduler
        load, vtc = sched.tenant_load(), sched.waiting.counters()
        return {t: TenantStats(load[t][0], load[t][1], c.prompt_tokens_computed, c.output_tokens, c.rejected,
                               vtc.get(t) if sched.config.scheduling_policy == "vtc" else None)
                for t, c in sched.tenants.items()}

    def _kv_store_stats(self) -> KVStoreStats | None:
        if self.kv_store is None:
            return None
        s = self.kv_store.stats()
        return KVStoreStats(tiers=[TierStats(**t) for t in s["tiers"]], counters=s["counters"],
                            rejected=s["rejected"], prefill_tokens_per_s=s["prefill_tokens_per_s"],
                            pending_saves=s["pending_saves"])
