"""Deploy kvserve on a Ray cluster (`kvserve ray-serve`): the config, the Ray Serve application, and the foreground
loop that keeps it up until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import asdict, dataclass

from kvserve.config import require
from kvserve.router.config import RoutingPolicy

log = logging.getLogger("kvserve.rayserve")

APP_NAME = "kvserve"
ROUTER_CLASS = "kvserve.rayserve.request_router.KVRequestRouter"



@dataclass(frozen=True)
class RayServeConfig:
    """How many engine replicas of which role, on which cluster, and how Ray routes, checks and scales them."""

    replicas: int = 2  # role `both` replicas (0 with prefill/decode only)
    prefill: int = 0
    decode: int = 0
    cpus_per_replica: float = 1.0
    max_replicas: int | None = None  # autoscaling bound for the `both` deployment (replicas is then the minimum)
    target_ongoing_requests: float = 8.0  # autoscaling target per replica
    address: str | None = None  # a running cluster (`ray start --head` prints it); None: start a local one
    num_cpus: int | None = None  # CPUs of the local cluster this command starts; None: Ray's count
    host: str = "127.0.0.1"
    port: int = 8000
    routing: RoutingPolicy = RoutingPolicy()
    stats_period_s: float = 0.5  # how often each replica's prefix summary reaches the routers
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    max_ongoing_requests: int = 512  # per replica; kvserve's own queue limit (--max-queued-requests, 429) is below it
    model: str | None = None  # for the ingress's tokenizer (prompt hashing); the engines load it themselves

    def __post_init__(self) -> None:
        for name in ("replicas", "prefill", "decode"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 0, f"--{name} must be a non-negative integer, got {v!r}")
        require((self.prefill == 0) == (self.decode == 0), "--prefill and --decode go together (both >= 1)")
        require(self.replicas + self.decode >= 1, "give --replicas N, or --prefill N --decode N")
        require(self.cpus_per_replica > 0, f"--cpus-per-replica must be positive, got {self.cpus_per_replica!r}")
        if self.max_replicas is not None:
            require(self.prefill == 0, "--max-replicas (autoscaling) is for --replicas deployments only")
            require(self.max_replicas >= max(self.replicas, 1),
                     f"--max-replicas ({self.max_replicas}) must be >= --replicas ({self.replicas}) and >= 1")
        require(self.target_ongoing_requests > 0, "--target-ongoing-requests must be positive")
        require(self.num_cpus is None or self.num_cpus >= 1, "--num-cpus must be >= 1")
        require(self.address is None or self.num_cpus is None,
                 "--num-cpus sizes a local cluster; a cluster at --address has its own")
        for name in ("stats_period_s", "health_check_period_s", "health_check_timeout_s"):
            require(getattr(self, name) > 0, f"--{name[:-2].replace('_', '-')} must be positive")
        require(1 <= self.port <= 65535, f"--port must be in 1..65535, got {self.port!r}")


def build_application(config: RayServeConfig, engine_args, server_config, max_restarts: int, log_level: str):
    """The Ray Serve application: engine deployment(s) with the KV-aware request router, behind the ingress."""
    from dataclasses import replace

    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from kvserve.rayserve.deployments import EngineReplica, Ingress

    router = RequestRouterConfig(request_router_class=ROUTER_CLASS, request_router_kwargs=asdict(config.routing),
                                 request_routing_stats_period_s=config.stats_period_s,
                                 request_routing_stats_timeout_s=max(config.stats_period_s * 4, 5.0))

    def engine(name: str, role: str, replicas: int, autoscale: bool):
        options = dict(name=name, ray_actor_options={"num_cpus": config.cpus_per_replica},
                       max_ongoing_requests=config.max_ongoing_requests, request_router_config=router,
                       health_check_period_s=config.health_check_period_s,
                       health_check_timeout_s=config.health_check_timeout_s,
                       graceful_shutdown_timeout_s=server_config.shutdown_timeout + 5)
        if autoscale:
            options["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": config.max_replicas,
                                             "target_ongoing_requests": config.target_ongoing_requests}
        else:
            options["num_replicas"] = replicas
        return serve.deployment(EngineReplica).options(**options).bind(
            replace(engine_args, role=role), server_config, max_restarts, log_level)

    whole = engine("engine", "both", config.replicas, config.max_replicas is not None) if config.replicas else None
    prefill = engine("prefill", "prefill", config.prefill, False) if config.prefill else None
    decode = engine("decode", "decode", config.decode, False) if config.decode else None
    ingress = serve.deployment(Ingress).options(name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                                max_ongoing_requests=4 * config.max_ongoing_requests)
    return ingress.bind(whole, prefill, decode, config.model, server_config.max_body_bytes)


def connect(config: RayServeConfig) -> None:
    """Join the cluster at --address, or start a local one, and start Ray Serve's HTTP proxy there."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if config.address is not None:
            ray.init(address=config.address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})


def deploy(application) -> None:
    """Deploy (blocks until every replica is up); deploying changed settings onto a running app is Ray Serve's
    rolling update (new replicas start before old ones stop)."""
    from ray import serve

    serve.run(application, name=APP_NAME, route_prefix="/")


class _Stop(Exception):
    """SIGTERM/SIGINT: raised in the main thread, so it also interrupts a deployment still starting."""


def _stop(*_) -> None:
    raise _Stop


def run_forever(config: RayServeConfig, application) -> None:
    """`kvserve ray-serve`: deploy, then hold until SIGTERM/SIGINT (also while still deploying); a local cluster
    this started goes down with it, an app on a cluster at --address is deleted (the cluster stays)."""
    import ray
    from ray import serve

    try:
        connect(config)
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own
            signal.signal(sig, _stop)
        deploy(application)
        log.info("kvserve is serving on http://%s:%d through Ray Serve", config.host, config.port)
        threading.Event().wait()
    except _Stop:
        log.info("stopping the Ray Serve application")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the teardown short
        if ray.is_initialized():
            if config.address is not None:
                serve.delete(APP_NAME)
            else:
                serve.shutdown()
                ray.shutdown()
