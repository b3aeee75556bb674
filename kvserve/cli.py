"""`kvserve serve` (OpenAI-compatible HTTP server), `kvserve generate` (offline one-shot demo) and
`kvserve tenants hash-key`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import uvicorn

from kvserve.config import QUANTIZATIONS, SCHEDULING_POLICIES, ConfigError, KVEvictionConfig, SpeculativeConfig

log = logging.getLogger("kvserve.cli")


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="GGUF file, HF model directory or hub id; none: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 | float32 | float16")
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATIONS,
                        help="matmul weights: auto runs a GGUF file's own Q8_0/Q4_0/Q4_1/Q4_K blocks as stored "
                             "(in float32: none); none: dequantized to --dtype; q8_0: int8 blocks of 32 (half the "
                             "bytes per decoded token); w8a8: int8 weights and activations in groups of 64 "
                             "over SmoothQuant-smoothed weights (q8_0's batch speed, less error); q4_0 / q4_1 / "
                             "q4_k: 4-bit blocks")
    parser.add_argument("--speculative-config", default=None, metavar="JSON",
                        help='speculative decoding, vLLM\'s keys, e.g. \'{"method": "ngram", '
                             '"num_speculative_tokens": 5}\'; methods ngram, suffix, layer_skip (+ draft_layers), '
                             'draft_model (+ model) (docs/speculative.md)')
    parser.add_argument("--kv-eviction", default=None, metavar="JSON",
                        help='bounded KV per request, e.g. \'{"policy": "snapkv", "budget_tokens": 1024}\'; '
                             'policies streaming, snapkv, h2o, lazy; requests may set kv_budget_tokens '
                             '(docs/eviction.md)')
    parser.add_argument("--enable-segment-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="CacheBlend: reuse the KV of prompt segments (prompt_segments, kv_reuse) wherever they "
                             "appear, with selective recompute (docs/kvreuse.md)")
    parser.add_argument("--blend-recompute-ratio", type=float, default=0.15,
                        help="share of reused segment tokens recomputed (0: naive reuse, 1: exact); requests may "
                             "set blend_recompute_ratio")
    parser.add_argument("--blend-check-layer", type=int, default=1,
                        help="the layer whose KV deviation picks the reused tokens to recompute")
    parser.add_argument("--blend-segment-context", choices=("prefix", "none"), default="prefix",
                        help="what a cached segment's KV is computed after: the prompt's first segment (the system "
                             "prompt; default) or nothing (reusable under any first segment, lower quality)")
    parser.add_argument("--ape-temperature", type=float, default=1.0,
                        help='kv_reuse "parallel" (APE): attention temperature of later tokens over the segments '
                             "(below 1 sharpens); requests may set ape_temperature")
    parser.add_argument("--ape-scale", type=float, default=1.0,
                        help='kv_reuse "parallel" (APE): scale of the segments\' total attention weight; requests '
                             "may set ape_scale")
    parser.add_argument("--decode-steps", type=int, default=1,
                        help="greedy decode steps per engine step while every running request is a plain greedy "
                             "decode and none waits: one native call per run at up to 8 sequences, no scheduler "
                             "round between tokens (streamed tokens then arrive in runs of up to this many)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=2.0, help="KV cache budget in GiB")
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV blocks in the pool (overrides --kv-cache-memory-gb; benchmarks size pools exactly)")
    parser.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + output tokens")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads; none: torch's choice")
    parser.add_argument("--kv-store", default=None, metavar="TIERS",
                        help="tiered KV store below the pool, e.g. memory:4GB,disk:/var/kv:20GB:int4,"
                             "redis://127.0.0.1:6379?codec=int8 (codecs: none, zstd, int8, int4)")
    parser.add_argument("--kv-store-chunk-size", type=int, default=256, help="tokens per stored KV chunk")
    parser.add_argument("--kv-store-load", choices=("auto", "always"), default="auto",
                        help="auto: load a stored chunk only when its measured load time beats recomputing it; "
                             "always: load every stored chunk")
    parser.add_argument("--role", choices=("both", "prefill", "decode"), default="both",
                        help="P/D disaggregation (docs/scaleout.md): prefill publishes every prompt's KV through "
                             "--kv-store down to the block; decode continues prefills from it; both serves whole "
                             "requests. kvserve router pairs them")
    parser.add_argument("--kv-transfer-timeout", type=float, default=5.0, metavar="SECONDS",
                        help="decode role: how long a request waits for prompt KV the prefill instance is still "
                             "writing before it computes the prompt itself")
    parser.add_argument("--kv-transfer-lossy", action="store_true",
                        help="allow int8/int4 store codecs for P/D transfers (outputs then differ from colocated)")
    parser.add_argument("--kv-store-key-file", default=None, metavar="PATH",
                        help="authenticate stored KV entries (HMAC) with the key on this file's first line, and "
                             "reject entries without it; none: $KVSERVE_KV_STORE_KEY if set")


def _server_flags(serve: argparse.ArgumentParser) -> None:
    """`kvserve serve`'s HTTP and scheduling flags (also `kvserve ray-serve`'s: each replica runs the same server)."""
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None,
                      help="require `Authorization: Bearer KEY`; none: $KVSERVE_API_KEY if set")
    keys.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    serve.add_argument("--served-model-name", default=None, help="model id clients must send; none: the model's name")
    serve.add_argument("--max-num-seqs", type=int, default=128, help="sequences in one running batch")
    serve.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget of one engine step")
    serve.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                       help="reuse KV blocks of shared prompt prefixes")
    serve.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                       help="split long prompts over steps so running decodes never stall (Sarathi-Serve); off: "
                            "a prompt runs whole in one step, the step budget grows to the context length")
    serve.add_argument("--max-queued-requests", type=int, default=256,
                       help="sequences allowed to wait beyond --max-num-seqs before new requests get 429")
    serve.add_argument("--request-timeout", type=float, default=600.0,
                       help="seconds a request may take before it ends with 408 (0: no limit)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger request bodies get 413")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="after SIGTERM, streams still running this long end with an error event")
    serve.add_argument("--stream-write-timeout", type=float, default=30.0,
                       help="a streaming client that reads nothing for this long is cut off (slot and KV freed)")
    serve.add_argument("--enable-prompt-tokens-details", action="store_true",
                       help="report usage.prompt_tokens_details.cached_tokens to every client (it tells a client "
                            "whether others sent the same prefix); without it, only requests with a cache_salt get it")
    serve.add_argument("--require-cache-salt", action="store_true",
                       help="refuse generation requests without a cache_salt (per-tenant prefix caches)")
    serve.add_argument("--max-connections", type=int, default=1024,
                       help="open HTTP connections beyond this get 503 (uvicorn limit_concurrency)")
    serve.add_argument("--timeout-keep-alive", type=float, default=5.0,
                       help="seconds an idle keep-alive connection is kept open")
    serve.add_argument("--timeout-request-headers", type=float, default=10.0,
                       help="a connection whose request headers are not complete this long after it opened (or "
                            "after its previous response) is closed (slowloris)")
    serve.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                       help="who runs next: fcfs (arrival order), priority (the request field `priority`, lower "
                            "first), vtc (fair share of served tokens per tenant, by weight); docs/scheduling.md")
    serve.add_argument("--tenants", default=None, metavar="FILE",
                       help="TOML file of tenants (API key hashes, weight, limits, priority cap); the API key picks "
                            "the tenant. Without it every request is tenant `default`")
    serve.add_argument("--max-queue-wait-s", type=float, default=None, metavar="SECONDS",
                       help="a request not scheduled within this many seconds gets 503 with Retry-After instead of "
                            "waiting on (default: no deadline)")
    serve.add_argument("--max-kv-pin-seconds", type=float, default=300.0, metavar="SECONDS",
                       help="longest kv_pin_seconds a request may ask for (agent sessions' KV kept between turns)")
    serve.add_argument("--kv-pin-max-fraction", type=float, default=0.5,
                       help="share of the KV pool that pinned sessions may hold (the oldest pin goes first)")
    serve.add_argument("--kv-pin-reserved-fraction", type=float, default=0.0,
                       help="share of the KV pool whose pins hold against waiting requests (pins above it give way "
                            "to them; every pin gives way to a running request's growth)")
    serve.add_argument("--preemption-mode", choices=("auto", "swap", "recompute"), default="auto",
                       help="when the KV pool runs out, a preempted sequence's KV is swapped to host memory or "
                            "dropped and recomputed: auto picks per sequence by measured copy vs prefill speed")
    serve.add_argument("--swap-space-gb", type=float, default=1.0,
                       help="host memory for swapped-out KV (allocated on the first swap)")
    serve.add_argument("--step-trace", default=None, metavar="PATH",
                       help="append each busy engine step's cost features and cycle time to this JSONL file (what "
                            "`kvserve bench plan measure --served` fits its step-cost model to)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log each request")


def _routing_flags(parser: argparse.ArgumentParser) -> None:
    """How a request's backend or replica is chosen (kvserve.router.policy): `kvserve router` and `ray-serve`."""
    parser.add_argument("--policy", choices=("kv", "round_robin"), default="kv",
                        help="kv: the backend holding most of the prompt's prefix, weighed against load")
    parser.add_argument("--prefix-weight", type=float, default=1.0)
    parser.add_argument("--load-weight", type=float, default=0.5)
    parser.add_argument("--balance-abs-threshold", type=int, default=8,
                        help="route to the idlest backend while the busiest has this many more requests ...")
    parser.add_argument("--balance-rel-threshold", type=float, default=1.5, help="... and this many times as many")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="KV-cache-centric LLM serving on CPUs")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_flags(serve)
    _server_flags(serve)
    serve.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                       help="run the engine core in its own process (off: in a thread of the API server)")
    serve.add_argument("--max-engine-restarts", type=int, default=3,
                       help="times a dead engine-core process is started again before the server reports it dead")
    serve.set_defaults(func=serve_command)

    ray = sub.add_parser("ray-serve", help="the same engine and server as Ray Serve deployments, KV-aware routing as "
                                           "Ray Serve's request router (docs/scaleout.md)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_flags(ray)
    _server_flags(ray)
    _routing_flags(ray)
    ray.add_argument("--replicas", type=int, default=2, help="engine replicas serving whole requests")
    ray.add_argument("--prefill", type=int, default=0, help="prefill-role replicas (with --decode and --kv-store)")
    ray.add_argument("--decode", type=int, default=0, help="decode-role replicas")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each engine replica reserves")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale the --replicas deployment between --replicas and this many (Ray Serve)")
    ray.add_argument("--target-ongoing-requests", type=float, default=8.0,
                     help="autoscaling: requests per replica Ray Serve aims for")
    ray.add_argument("--address", default=None,
                     help="a running Ray cluster (ray start --head prints it); none: start a local one")
    ray.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster started; none: all")
    ray.add_argument("--routing-stats-period", type=float, default=0.5,
                     help="seconds between each replica's prefix-cache summary reaching the router")
    ray.add_argument("--health-check-period", type=float, default=5.0, help="Ray's replica health checks")
    ray.add_argument("--max-engine-restarts", type=int, default=3,
                     help="times a replica restarts its dead engine core before Ray replaces the replica")
    ray.set_defaults(func=ray_serve_command)

    rt = sub.add_parser("router", help="a KV-aware router in front of several kvserve instances (docs/scaleout.md)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rt.add_argument("--backend", action="append", required=True, metavar="URL",
                    help="a kvserve instance, http://host:port (repeat the flag for each)")
    rt.add_argument("--host", default="127.0.0.1")
    rt.add_argument("--port", type=int, default=8080)
    rt.add_argument("--model", default=None,
                    help="the backends' model (GGUF file or HF directory) whose tokenizer hashes the prompts; "
                         "none: the embedded default")
    _routing_flags(rt)
    rt.add_argument("--poll-interval", type=float, default=0.25, help="seconds between /kv/summary reads")
    rt.add_argument("--backend-api-key-file", default=None,
                    help="the key the router reads /kv/summary with (clients' own keys pass through)")
    rt.add_argument("--kv-identity", default=None,
                    help="the model identity every backend must report; none: the first backend to answer sets it")
    rt.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    rt.set_defaults(func=router_command)

    tenants = sub.add_parser("tenants", help="tenants-file helpers")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    hk = tsub.add_parser("hash-key", help="print the sha256 form of an API key for a tenants file (the key is read "
                                          "from stdin, so it stays out of shell history and `ps`)")
    hk.set_defaults(func=hash_key_command)

    gen = sub.add_parser("generate", help="generate once from a prompt, offline (no server)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _engine_flags(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.set_defaults(func=generate_command)

    bench = sub.add_parser("bench", add_help=False,
                           help="benchmarks: serve (load generator), compare, offline, roofline, workloads")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=bench_command)
    return parser


def bench_command(args: argparse.Namespace) -> int:
    from kvserve.bench.commands import main as bench_main

    return bench_main(args.bench_args)


def _server_config(args: argparse.Namespace):
    """Every HTTP-side flag, validated at once (ConfigError) before the model loads."""
    from kvserve.server.config import ServerConfig, read_api_key_file
    from kvserve.server.tenants import load_tenants

    api_key = args.api_key
    if args.api_key_file:
        api_key = read_api_key_file(args.api_key_file)
    elif api_key is None:
        api_key = os.environ.get("KVSERVE_API_KEY") or None
    return ServerConfig(host=args.host, port=args.port, api_key=api_key, served_model_name=args.served_model_name,
                        max_queued_requests=args.max_queued_requests,
                        request_timeout=args.request_timeout if args.request_timeout > 0 else None,
                        max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                        write_timeout=args.stream_write_timeout,
                        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                        require_cache_salt=args.require_cache_salt, max_connections=args.max_connections,
                        keep_alive_timeout=args.timeout_keep_alive, header_timeout=args.timeout_request_headers,
                        tenants=load_tenants(args.tenants) if args.tenants else None,
                        max_kv_pin_seconds=args.max_kv_pin_seconds)


def hash_key_command(args: argparse.Namespace) -> int:
    from kvserve.server.tenants import hash_key

    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        raise ConfigError("no key given on stdin")
    print(hash_key(key))
    return 0


def _json_config(text: str | None, flag: str, cls):
    """A --flag JSON object checked into its frozen config class; None when the flag is absent."""
    if text is None:
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}") from None
    return cls.from_dict(d)


def _engine_args(args: argparse.Namespace, **extra):
    from kvserve.engine.llm_engine import EngineArgs
    from kvserve.kvstore.config import read_key

    return EngineArgs(model=args.model, dtype=args.dtype, quantization=args.quantization,
                      kv_cache_memory_gb=args.kv_cache_memory_gb, num_blocks=args.num_kv_blocks,
                      max_model_len=args.max_model_len, num_threads=args.num_threads, kv_store=args.kv_store,
                      kv_store_chunk_size=args.kv_store_chunk_size, kv_store_load=args.kv_store_load,
                      kv_store_key=read_key(args.kv_store_key_file),
                      speculative_config=_json_config(args.speculative_config, "--speculative-config",
                                                      SpeculativeConfig),
                      kv_eviction=_json_config(args.kv_eviction, "--kv-eviction", KVEvictionConfig),
                      role=args.role, kv_transfer_timeout_s=args.kv_transfer_timeout,
                      kv_transfer_lossy=args.kv_transfer_lossy, decode_steps=args.decode_steps, **_blend_args(args),
                      **extra)


def _blend_args(args: argparse.Namespace) -> dict:
    return {"enable_segment_cache": args.enable_segment_cache, "blend_recompute_ratio": args.blend_recompute_ratio,
            "blend_check_layer": args.blend_check_layer, "blend_segment_context": args.blend_segment_context,
            "ape_temperature": args.ape_temperature, "ape_scale": args.ape_scale}


def _routing_policy(args: argparse.Namespace):
    from kvserve.router.config import RoutingPolicy

    return RoutingPolicy(policy=args.policy, prefix_weight=args.prefix_weight, load_weight=args.load_weight,
                         balance_abs_threshold=args.balance_abs_threshold,
                         balance_rel_threshold=args.balance_rel_threshold)


def router_command(args: argparse.Namespace) -> int:
    from kvserve.model.loader import tokenizer_source
    from kvserve.model.tokenizer import Tokenizer
    from kvserve.router.app import build_router_app
    from kvserve.router.config import RouterConfig
    from kvserve.router.prompt import PromptHasher
    from kvserve.server.config import read_api_key_file

    key = read_api_key_file(args.backend_api_key_file) if args.backend_api_key_file else \
        os.environ.get("KVSERVE_BACKEND_API_KEY") or None
    config = RouterConfig(tuple(args.backend), routing=_routing_policy(args), poll_interval_s=args.poll_interval,
                          backend_api_key=key, kv_identity=args.kv_identity)
    source, template = tokenizer_source(args.model)
    app = build_router_app(config, PromptHasher(Tokenizer(source, template)))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def _served(args: argparse.Namespace):
    """(ServerConfig, EngineArgs) of a served instance, every flag checked before seconds go into the model."""
    config = _server_config(args)
    engine_args = _serve_engine_args(args, config)
    engine_args.torch_dtype()
    if args.kv_store:
        from kvserve.kvstore import parse_kv_store

        parse_kv_store(args.kv_store, chunk_size=args.kv_store_chunk_size, load_policy=args.kv_store_load)
    if args.max_engine_restarts < 0:
        raise ConfigError("--max-engine-restarts must be >= 0")
    if not config.is_loopback and config.api_key is None and config.tenants is None:
        log.warning("listening on %s without an API key: anyone who can reach it can use it", config.host)
    return config, engine_args


def _serve_engine_args(args: argparse.Namespace, config):
    """The engine of a served instance: the engine flags plus the server's scheduling flags."""
    return _engine_args(args, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        enable_prefix_caching=args.enable_prefix_caching,
                        enable_chunked_prefill=args.enable_chunked_prefill,
                        scheduling_policy=args.scheduling_policy, max_queue_wait_s=args.max_queue_wait_s,
                        tenant_weights=config.tenants.weights() if config.tenants else (),
                        tenant_pin_max_tokens=config.tenants.pin_caps() if config.tenants else (),
                        kv_pin_max_fraction=args.kv_pin_max_fraction,
                        kv_pin_reserved_fraction=args.kv_pin_reserved_fraction,
                        preemption_mode=args.preemption_mode, swap_space_gb=args.swap_space_gb,
                        step_trace=args.step_trace)


def ray_serve_command(args: argparse.Namespace) -> int:
    try:
        from kvserve.rayserve.launch import RayServeConfig, build_application, run_forever
    except ImportError as e:
        raise ConfigError(f"kvserve ray-serve needs Ray Serve: pip install 'ray[serve]' ({e})") from None

    config, engine_args = _served(args)
    ray_config = RayServeConfig(replicas=args.replicas, prefill=args.prefill, decode=args.decode,
                                cpus_per_replica=args.cpus_per_replica, max_replicas=args.max_replicas,
                                target_ongoing_requests=args.target_ongoing_requests, address=args.address,
                                num_cpus=args.num_cpus, host=config.host, port=config.port,
                                routing=_routing_policy(args), stats_period_s=args.routing_stats_period,
                                health_check_period_s=args.health_check_period, model=args.model)
    run_forever(ray_config, build_application(ray_config, engine_args, config, args.max_engine_restarts,
                                              args.log_level))
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from kvserve.engine.async_llm import AsyncLLM, InprocCoreClient
    from kvserve.engine.core import EngineCore
    from kvserve.engine.core_proc import MPCoreClient
    from kvserve.server.app import build_app
    from kvserve.server.http import protocol_with_header_timeout

    config, engine_args = _served(args)
    if args.engine_process:
        client = MPCoreClient(engine_args, max_restarts=args.max_engine_restarts, log_level=args.log_level)
    else:
        client = InprocCoreClient(lambda: EngineCore(engine_args))
    app = build_app(AsyncLLM(client), config)
    state = app.state.kvserve
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                               access_log=args.access_log, lifespan="on",
                               http=protocol_with_header_timeout(config.header_timeout),
                               limit_concurrency=config.max_connections,
                               timeout_keep_alive=config.keep_alive_timeout,
                               timeout_graceful_shutdown=int(config.shutdown_timeout) + 5)
    DrainingServer(uv_config, state.request_drain).run()
    return 0


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT, new requests get 503 and running streams get shutdown_timeout to finish."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self._on_exit()
        super().handle_exit(sig, frame)


def generate_command(args: argparse.Namespace) -> int:
    from kvserve.engine.llm_engine import LLM
    from kvserve.kvstore.config import read_key
    from kvserve.sampling import SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, quantization=args.quantization,
              kv_cache_memory_gb=args.kv_cache_memory_gb,
              max_model_len=args.max_model_len, num_threads=args.num_threads, kv_store=args.kv_store,
              kv_store_chunk_size=args.kv_store_chunk_size, kv_store_load=args.kv_store_load,
              kv_store_key=read_key(args.kv_store_key_file),
              speculative_config=_json_config(args.speculative_config, "--speculative-config", SpeculativeConfig),
              kv_eviction=_json_config(args.kv_eviction, "--kv-eviction", KVEvictionConfig),
              decode_steps=args.decode_steps, **_blend_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    started = time.monotonic()
    if args.raw or not llm.engine.tokenizer.has_chat_template:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    else:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    elapsed = time.monotonic() - started
    llm.engine.close()  # writes this prompt's KV to the store, if one is configured
    completion = out.outputs[0]
    print(completion.text)
    n = len(completion.token_ids)
    print(f"[{n} tokens in {elapsed:.2f}s, {n / elapsed if elapsed else 0:.1f} tok/s, "
          f"finish_reason={completion.finish_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from kvserve.sampling import ParamError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the rest, --help included, belongs to kvserve.bench
        return bench_command(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(getattr(args, "log_level", "info")).upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.func(args)
    except (ConfigError, ParamError) as e:
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # ModelNotFoundError carries the install hint
        print(f"kvserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
