"""The pure parts of `kvserve ray-serve`, without a cluster: the in-process ASGI call an engine replica makes, the
routing stats it reports, and Ray Serve's KV-aware request router choosing among fake replicas to the exact one."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, StreamingResponse

from kvserve.engine.protocol import SUMMARY_HASH_BYTES
from kvserve.rayserve.asgi import ResponseHead, call_app
from kvserve.rayserve.stats import ReplicaSummary
from kvserve.router.config import RoutingPolicy


def _app(events: list):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        body = await request.json()
        return JSONResponse({"got": body, "auth": request.headers.get("authorization")}, status_code=201)

    @app.post("/stream")
    async def stream(request: Request):
        async def gen():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n".encode()
                    await asyncio.sleep(0.001)
            finally:
                events.append("stream closed")

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def test_call_app_gives_the_head_then_the_body():
    async def run():
        items = [x async for x in call_app(_app([]), "POST", "/echo", [("Authorization", "Bearer k")],
                                           b'{"a": 1}', replica="r1")]
        return items

    items = asyncio.run(run())
    head = items[0]
    assert isinstance(head, ResponseHead) and head.status == 201 and head.replica == "r1"
    assert dict(head.headers)["content-type"] == "application/json"
    assert b"".join(items[1:]) == b'{"got":{"a":1},"auth":"Bearer k"}'


def test_closing_early_is_a_disconnect_and_frees_the_stream():
    events: list = []

    async def run():
        gen = call_app(_app(events), "POST", "/stream", [], b"")
        head = await gen.__anext__()
        first = await gen.__anext__()
        await gen.aclose()  # the client went away after one chunk
        await asyncio.sleep(0.05)
        return head, first

    head, first = asyncio.run(run())
    assert head.status == 200 and first == b"data: 0\n\n"
    assert events == ["stream closed"]


def test_replica_summary_round_trips_and_rejects_malformed_stats():
    h = [bytes([i]) * SUMMARY_HASH_BYTES for i in range(3)]
    s = ReplicaSummary("v7", b"".join(h), 2, 1, 0.25)
    assert ReplicaSummary.from_stats(s.to_stats()) == s
    assert s.hash_set() == frozenset(h)
    assert ReplicaSummary.from_stats({}) is None  # not reported yet
    assert ReplicaSummary.from_stats({**s.to_stats(), "hashes": b"abc"}) is None  # not whole hashes
    assert ReplicaSummary.from_stats({"version": "x"}) is None


def _replica(uid: str, hashes: list[bytes], running: int = 0):
    stats = ReplicaSummary(f"v-{uid}", b"".join(hashes), running, 0, 0.0).to_stats()
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid), routing_stats=stats)


def _pending(hashes, session=None, avoid=(), rid="req"):
    return SimpleNamespace(kwargs={"block_hashes": hashes, "session_id": session, "avoid": list(avoid)},
                           metadata=SimpleNamespace(internal_request_id=rid))


def test_request_router_ranks_the_prefix_holder_first_and_counts_in_flight_requests():
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from kvserve.rayserve.request_router import KVRequestRouter

    H = [bytes([i]) * SUMMARY_HASH_BYTES for i in range(1, 9)]

    async def run():
        router = KVRequestRouter(DeploymentID(name="engine", app_name="kvserve"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state(**asdict(RoutingPolicy(balance_abs_threshold=4)))
        a, b, c = _replica("a", []), _replica("b", H[:6]), _replica("c", H[:2])

        def order(ranks):
            return [r.replica_id.unique_id for rank in ranks for r in rank]

        assert order(await router.choose_replicas([a, b, c], _pending(H, rid="r1"))) == ["b", "a", "c"]
        # r1 counts against b (load) and for b: its prompt's blocks are on the way, so b now matches all 8
        assert order(await router.choose_replicas([a, b, c], _pending(H, rid="r2")))[0] == "b"
        # a fresh prompt goes to the idlest; b (two in flight) is ranked last
        assert order(await router.choose_replicas([a, b, c], _pending([b"q" * SUMMARY_HASH_BYTES], rid="r3"))) \
            == ["a", "c", "b"]
        router.on_request_completed(b.replica_id, "r1")
        router.on_request_completed(b.replica_id, "r2")
        router.on_request_completed(a.replica_id, "r3")
        assert [router._states[x].in_flight for x in "abc"] == [0, 0, 0]
        assert not router._states["b"].pending
        # a replica that answered 503 to this request is avoided while another can take it
        assert order(await router.choose_replicas([a, b, c], _pending(H, avoid=["b"], rid="r4")))[0] == "c"
        router.on_request_completed(c.replica_id, "r4")
        # sticky sessions when no replica holds anything of the prompt
        picks = {order(await router.choose_replicas([a, b, c], _pending([b"n" * SUMMARY_HASH_BYTES],
                                                                        session="conv-1", rid=f"s{i}")))[0]
                 for i in range(4)}
        assert len(picks) == 1

    asyncio.run(run())


@pytest.mark.parametrize("kw, message", [
    ({"replicas": 0}, "give --replicas N, or --prefill N --decode N"),
    ({"prefill": 1}, "--prefill and --decode go together"),
    ({"replicas": -1}, "--replicas must be a non-negative integer"),
    ({"max_replicas": 1, "replicas": 2}, "--max-replicas (1) must be >= --replicas (2)"),
    ({"max_replicas": 4, "prefill": 1, "decode": 1}, "--max-replicas (autoscaling) is for --replicas deployments"),
    ({"address": "10.0.0.1:6379", "num_cpus": 2}, "--num-cpus sizes a local cluster"),
    ({"cpus_per_replica": 0}, "--cpus-per-replica must be positive"),
    ({"port": 0}, "--port must be in 1..65535"),
])
def test_ray_serve_config_fails_clearly(kw, message):
    from kvserve.config import ConfigError
    from kvserve.rayserve.launch import RayServeConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RayServeConfig(**kw)


def test_application_wires_the_router_health_checks_and_autoscaling_bounds():
    """The deployments as Ray Serve will run them, read back from the application (no cluster needed)."""
    from kvserve.engine.core import EngineArgs
    from kvserve.rayserve.launch import ROUTER_CLASS, RayServeConfig, build_application
    from kvserve.server.config import ServerConfig

    config = RayServeConfig(replicas=2, max_replicas=5, target_ongoing_requests=6, cpus_per_replica=2,
                            routing=RoutingPolicy(load_weight=0.25), stats_period_s=0.3, health_check_period_s=2)
    app = build_application(config, EngineArgs(num_threads=2), ServerConfig(), max_restarts=1, log_level="info")
    ingress = app._bound_deployment
    assert ingress.name == "ingress" and ingress.ray_actor_options["num_cpus"] == 0
    engine_app = ingress.init_args[0]
    assert ingress.init_args[1] is None and ingress.init_args[2] is None  # no prefill/decode deployments
    engine = engine_app._bound_deployment
    cfg = engine._deployment_config
    assert engine.name == "engine" and engine.ray_actor_options["num_cpus"] == 2
    assert (cfg.autoscaling_config.min_replicas, cfg.autoscaling_config.max_replicas,
            cfg.autoscaling_config.target_ongoing_requests) == (2, 5, 6)
    assert cfg.health_check_period_s == 2
    router = cfg.request_router_config
    assert router.request_router_class == ROUTER_CLASS and router.request_routing_stats_period_s == 0.3
    assert router.request_router_kwargs == asdict(RoutingPolicy(load_weight=0.25))
    assert engine.init_args[0].role == "both" and engine.init_args[0].num_threads == 2

    pd = build_application(RayServeConfig(replicas=0, prefill=1, decode=2), EngineArgs(kv_store="memory:1GB"),
                           ServerConfig(), max_restarts=1, log_level="info")._bound_deployment
    assert pd.init_args[0] is None
    prefill, decode = (a._bound_deployment for a in pd.init_args[1:3])
    assert (prefill.name, prefill.init_args[0].role, prefill._deployment_config.num_replicas) == ("prefill", "prefill", 1)
    assert (decode.name, decode.init_args[0].role, decode._deployment_config.num_replicas) == ("decode", "decode", 2)
