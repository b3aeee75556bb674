"""Prometheus metrics in vLLM's naming style (prefix `kvserve:`), one CollectorRegistry per app.

Request-level observations (TTFT, inter-token gaps, e2e, queue wait, token counters, finish reasons) are made on the
event loop from the RequestOutputs each request already receives. Engine-level state (running/waiting, KV blocks,
prefix-cache hits and misses by cause, preemptions) is the engine core's typed EngineStats, read at scrape
time (one utility call to the engine core), so an idle server reports its true idle values.
"""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from kvserve.core.kv_cache_manager import MISS_CAUSES
from kvserve.engine.protocol import EngineInfo, EngineStats, EvictionStats, KVStoreStats, SpeculativeStats, TenantStats
from kvserve.outputs import RequestOutput

P = "kvserve:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")
ABORT_REASONS = ("client_disconnect", "client_stalled", "timeout", "shutdown", "error")


class _EngineStatsCollector(Collector):
    """Exposes the latest EngineStats snapshot; counters come straight from the engine's cumulative totals."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.snapshot: EngineStats | None = None
        self.state = "ready"
        self.restarts = 0

    def collect(self) -> Iterable:
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("engine_ready", "1 while the engine core is up and serving, else 0 (loading, restarting, dead).",
                    1.0 if self.state == "ready" else 0.0)
        yield counter("engine_restarts", "Engine-core processes restarted after one died.", self.restarts)
        s = self.snapshot
        if s is None:
            return
        total, used = s.kv_blocks_total, s.kv_blocks_used
        yield gauge("num_requests_running", "Sequences in the engine's running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting (or preempted) in the engine.", s.num_waiting)
        yield gauge("kv_cache_blocks_used", "KV blocks referenced by live sequences.", used)
        yield gauge("kv_cache_blocks_total", "KV blocks in the pool.", total)
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", used / total if total else 0.0)
        pc = s.prefix_cache
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", pc.queried_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", pc.hit_tokens)
        yield counter("prefix_cache_lookups", "Requests looked up in the prefix cache.", pc.queries)
        misses = CounterMetricFamily(P + "prefix_cache_misses", "Prefix-cache lookups that missed, by cause.",
                                     labels=labels + ["cause"])
        for cause in sorted(set(MISS_CAUSES) | set(pc.misses)):
            misses.add_metric([self.model_name, cause], pc.misses.get(cause, 0))
        yield misses
        yield counter("num_preemptions", "Sequences preempted (KV dropped, recomputed later).", s.num_preemptions)
        yield counter("num_preemptions_swapped", "Preempted sequences whose KV was copied to the swap space "
                      "(the rest of num_preemptions were recomputed).", s.preemptions_swapped)
        yield gauge("swap_blocks_used", "Blocks of the swap space holding preempted sequences' KV.", s.swap_blocks_used)
        yield gauge("swap_blocks_total", "Blocks of the swap space.", s.swap_blocks_total)
        yield counter("kv_cache_evictions", "Cached KV blocks evicted to make room.", s.evictions)
        yield counter("prompt_tokens_computed", "Prompt tokens run through the model (not cached, not loaded).",
                      s.prompt_tokens_computed)
        yield counter("prompt_tokens_loaded", "Prompt tokens whose KV was loaded from the tiered KV store.",
                      s.prompt_tokens_loaded)
        yield counter("ipc_frames_dropped", "Malformed or oversized frames the engine-core process refused.",
                      s.ipc_frames_dropped)
        if s.kv_store is not None:
            yield from _kv_store_metrics(s.kv_store, self.model_name)
        if s.speculative is not None:
            yield from _spec_metrics(s.speculative, self.model_name)
        if s.eviction is not None:
            yield from _eviction_metrics(s.eviction, self.model_name)
        if s.blend is not None:
            b = s.blend
            yield counter("segment_cache_hits", "Reusable prompt segments found in the segment cache (CacheBlend).",
                          b.segment_hits)
            yield counter("segment_cache_misses", "Reusable prompt segments not in the segment cache.",
                          b.segment_misses)
            yield counter("blend_reused_tokens", "Prompt tokens whose KV was reused from the segment cache.",
                          b.blended_tokens)
            yield counter("blend_recomputed_tokens", "Reused prompt tokens recomputed by CacheBlend's selection.",
                          b.recomputed_tokens)
        if s.tenants:
            yield from _tenant_metrics(s.tenants, self.model_name)
        if s.kv_pins is not None:
            pins = s.kv_pins
            yield gauge("kv_pinned_sessions", "Agent sessions whose KV is pinned for their next turn.", pins.num_pins)
            yield gauge("kv_cache_blocks_pinned", "KV blocks held by pinned sessions (counted in blocks_used).",
                        pins.blocks_pinned)
            events = CounterMetricFamily(P + "kv_pin_events", "KV pins made and how they ended: taken_over (the "
                                         "next turn used them), expired, released (by the client), evicted (a cap, "
                                         "or room for a running request).", labels=labels + ["event"])
            for event in ("pinned", "taken_over", "expired", "released", "evicted"):
                events.add_metric([self.model_name, event], getattr(pins, event))
            yield events


def _spec_metrics(spec: SpeculativeStats, model_name: str) -> Iterable:
    """Speculative decoding: drafted and accepted tokens and the acceptance-length histogram, by method."""
    labels, values = ["model_name", "method"], [model_name, spec.method]
    for name, doc, value in (
            ("spec_decode_num_drafts", "Verifications of a request's draft tokens.", spec.num_drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens verified.", spec.num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
            ("spec_decode_num_backed_off_tokens", "Draft tokens proposed but not verified: the step-cost rule "
             "judged them not worth their compute.", spec.num_backed_off)):
        c = CounterMetricFamily(P + name, doc, labels=labels)
        c.add_metric(values, value)
        yield c
    h = HistogramMetricFamily(P + "spec_decode_acceptance_length", "Draft tokens accepted per verification.",
                              labels=labels)
    cumulative, buckets = 0, []
    for a, n in enumerate(spec.acceptance_lengths):
        cumulative += n
        buckets.append((str(a), cumulative))
    buckets.append(("+Inf", cumulative))
    total = sum(a * n for a, n in enumerate(spec.acceptance_lengths))
    h.add_metric(values, buckets, total)
    yield h
    if spec.method == "suffix":
        g = GaugeMetricFamily(P + "spec_decode_suffix_cached_requests", "Finished outputs kept in the suffix trees.",
                              labels=labels)
        g.add_metric(values, spec.suffix_cached_requests)
        yield g


def _eviction_metrics(ev: EvictionStats, model_name: str) -> Iterable:
    """KV eviction under the engine's policy: tokens evicted, KV tokens held, the worker's scoring time."""
    labels, values = ["model_name", "policy"], [model_name, ev.policy]
    for family, name, doc, value in (
            (CounterMetricFamily, "kv_evicted_tokens", "Tokens whose KV running requests dropped (KV eviction).",
             ev.evicted_tokens),
            (GaugeMetricFamily, "kv_tokens_held", "KV tokens held by running requests.", ev.kv_tokens_held),
            (CounterMetricFamily, "kv_eviction_score_seconds", "Worker seconds spent on attention-score bookkeeping "
             "and eviction choices.", ev.score_seconds)):
        m = family(P + name, doc, labels=labels)
        m.add_metric(values, value)
        yield m


def _tenant_metrics(tenants: dict[str, TenantStats], model_name: str) -> Iterable:
    """Per-tenant queue, batch share and service (the engine's counters; the fair-share policy's counter)."""
    labels = ["model_name", "tenant"]
    per_tenant = {
        "num_waiting": (GaugeMetricFamily, "tenant_requests_waiting", "The tenant's sequences waiting in the engine."),
        "num_running": (GaugeMetricFamily, "tenant_requests_running", "The tenant's sequences in the running batch."),
        "prompt_tokens_computed": (CounterMetricFamily, "tenant_prompt_tokens_computed",
                                   "Prompt tokens run through the model for the tenant (cache hits excluded)."),
        "output_tokens": (CounterMetricFamily, "tenant_generation_tokens", "Tokens generated for the tenant."),
        "rejected": (CounterMetricFamily, "tenant_queue_wait_rejections",
                     "The tenant's requests dropped unscheduled by the queue-wait deadline."),
    }
    for key, (family_cls, name, doc) in per_tenant.items():
        family = family_cls(P + name, doc, labels=labels)
        for tenant, t in sorted(tenants.items()):
            family.add_metric([model_name, tenant], float(getattr(t, key)))
        yield family
    vtc = GaugeMetricFamily(P + "tenant_vtc_counter", "The fair-share (vtc) policy's virtual token counter: weighted "
                            "service received divided by the tenant's weight.", labels=labels)
    for tenant, t in sorted(tenants.items()):
        if t.vtc_counter is not None:
            vtc.add_metric([model_name, tenant], t.vtc_counter)
    yield vtc


def _kv_store_metrics(store: KVStoreStats, model_name: str) -> Iterable:
    """Per-tier traffic, health and load latency of the tiered KV store (kvserve.kvstore)."""
    from kvserve.kvstore.tiers import LOAD_LATENCY_BUCKETS

    labels = ["model_name", "tier", "codec"]
    per_tier = {
        "hits": ("counter", "Chunks loaded from the tier."),
        "misses": ("counter", "Chunk lookups the tier could not answer."),
        "bytes_in": ("counter", "Bytes written to the tier."),
        "bytes_out": ("counter", "Bytes read from the tier."),
        "errors": ("counter", "I/O or connection failures of the tier (it is retried with backoff)."),
        "rejected": ("counter", "Entries that failed verification (corrupt, truncated, foreign model, wrong salt)."),
        "evictions": ("counter", "Entries evicted from the tier by its LRU cap."),
        "used_bytes": ("gauge", "Bytes held by the tier."),
        "capacity_bytes": ("gauge", "The tier's cap in bytes."),
        "healthy": ("gauge", "0 from a tier error until a retry (after the backoff) succeeds, else 1."),
    }
    for key, (kind, doc) in per_tier.items():
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(P + "kv_store_" + key, doc,
                                                                                   labels=labels)
        for t in store.tiers:
            family.add_metric([model_name, t.tier, t.codec], float(getattr(t, key)))
        yield family
    hist = HistogramMetricFamily(P + "kv_store_load_seconds", "Fetch + verify + decode time of one chunk.",
                                 labels=labels)
    for t in store.tiers:
        cumulative, buckets = 0, []
        for bound, n in zip(list(LOAD_LATENCY_BUCKETS) + [float("inf")], t.load_seconds_buckets):
            cumulative += n
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        hist.add_metric([model_name, t.tier, t.codec], buckets, t.load_seconds_sum)
    yield hist
    c = store.counters
    events = CounterMetricFamily(P + "kv_store_events", "KV store events: fetches, chunks loaded and saved, "
                                 "load/recompute decisions, dropped saves, errors.", labels=["model_name", "event"])
    for name in ("fetches", "loaded_chunks", "chunks_saved", "decisions_load", "decisions_recompute",
                 "saves_dropped", "save_errors", "fetch_errors"):
        events.add_metric([model_name, name], c.get(name, 0))
    yield events
    rejected = CounterMetricFamily(P + "kv_store_rejected_entries", "Entries dropped at load, by reason.",
                                   labels=["model_name", "reason"])
    for reason in sorted({"corrupt", "truncated", "foreign_model", "identity", "version"} | set(store.rejected)):
        rejected.add_metric([model_name, reason], store.rejected.get(reason, 0))
    yield rejected


class ServerMetrics:
    def __init__(self, model_name: str, info: EngineInfo | None = None):
        """`info`: the engine's configuration, exported once as `kvserve:model_config_info` (labels, value 1), as
        vLLM exports its cache_config_info: which dtype, weight format and KV capacity a dashboard is looking at."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.engine = _EngineStatsCollector(model_name)
        self.registry.register(self.engine)
        r, m = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(P + name, doc, m, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Gap between consecutive generated tokens.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the end of the request.", LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduling (queue wait).", LATENCY_BUCKETS)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of requests that started.", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(P + "generation_tokens", "Generated tokens.", m, registry=r).labels(model_name)
        self._success = Counter(P + "request_success", "Finished sequences by finish reason.", m + ["finished_reason"],
                                registry=r)
        self._aborted = Counter(P + "request_aborted", "Requests the server ended early, by reason.", m + ["reason"],
                                registry=r)
        self._refused = Counter(P + "requests_refused", "Requests answered 429 or 503 instead of served, by tenant, "
                                "status code and cause (queue_full, tenant_concurrency_limit, tenant_token_rate_limit, "
                                "queue_wait_exceeded, service_unavailable, engine_dead).",
                                m + ["tenant", "status_code", "cause"], registry=r)
        self._http = Counter(P + "http_requests", "HTTP responses by endpoint and status code.",
                             m + ["endpoint", "status_code"], registry=r)
        self.in_flight = Gauge(P + "num_requests_in_flight", "Sequences admitted by the server and not yet finished.",
                               m, registry=r).labels(model_name)
        if info is not None:
            labels = {"dtype": info.dtype, "quantization": info.quantization, "block_size": str(info.block_size),
                      "max_model_len": str(info.max_model_len), "kv_capacity_tokens": str(info.kv_capacity_tokens),
                      "max_num_seqs": str(info.max_num_seqs), "native_kernels": str(info.native_kernels).lower()}
            Gauge(P + "model_config_info", "The engine's configuration (value 1, the configuration in labels).",
                  m + list(labels), registry=r).labels(model_name, *labels.values()).set(1)
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)
        for reason in ABORT_REASONS:
            self._aborted.labels(model_name, reason)

    def success(self, finish_reason: str, count: int = 1) -> None:
        self._success.labels(self.model_name, finish_reason).inc(count)

    def aborted(self, reason: str) -> None:
        self._aborted.labels(self.model_name, reason).inc()

    def refused(self, tenant: str, status: int, cause: str) -> None:
        self._refused.labels(self.model_name, tenant, str(status), cause).inc()

    def http_response(self, endpoint: str, status: int) -> None:
        self._http.labels(self.model_name, endpoint, str(status)).inc()

    def set_engine_stats(self, stats: EngineStats) -> None:
        self.engine.snapshot = stats

    def engine_state(self, state: str, restarts: int) -> None:
        self.engine.state, self.engine.restarts = state, restarts

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, n: int = 1) -> "RequestTracker":
        return RequestTracker(self, n)


class RequestTracker:
    """Turns one engine request's stream of outputs into observations, each exactly once, even if it is cut short."""

    def __init__(self, metrics: ServerMetrics, n: int):
        self.m, self.n = metrics, n
        self.arrival = time.monotonic()
        self.started = False
        self.gaps_seen = 0  # 0: no first token yet; then 1 + inter-token gaps already observed
        self.last: RequestOutput | None = None
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        self.last = out
        met = out.metrics
        if met is not None:
            self.arrival = met.arrival_time
            if not self.started and met.first_scheduled_time is not None:
                self.started = True
                self.m.queue.observe(max(met.first_scheduled_time - met.arrival_time, 0.0))
                self.m.prompt_tokens.inc(len(out.prompt_token_ids))
            if met.first_token_time is not None and self.gaps_seen == 0:
                self.m.ttft.observe(max(met.first_token_time - met.arrival_time, 0.0))
                self.gaps_seen = 1
            if self.gaps_seen:
                gaps = met.token_gaps[self.gaps_seen - 1:]
                for g in gaps:
                    self.m.itl.observe(g)
                self.gaps_seen += len(gaps)
        new = sum(len(o.delta_token_ids) for o in out.outputs)
        if new:
            self.m.generation_tokens.inc(new)
        if out.finished and not self.done:
            for o in out.outputs:
                self.m.success(o.finish_reason or "abort")
            self._end(met.finished_time if met is not None else None)

    def close(self) -> None:
        """The request ended without a final output (disconnect, error): its sequences count as aborted."""
        if not self.done:
            self.m.success("abort", self.n)
            self._end(None)

    def _end(self, finished_time: float | None) -> None:
        self.done = True
        end = finished_time if finished_time is not None else time.monotonic()
        self.m.e2e.observe(max(end - self.arrival, 0.0))
