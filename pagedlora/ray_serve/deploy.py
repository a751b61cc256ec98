"""build_application: the Ray Serve application of a RayServeConfig (one EngineReplica
deployment per base model behind one Ingress), and ``serve_forever`` for the CLI."""

from __future__ import annotations

import logging
import signal
import threading

from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig

from pagedlora.ray_serve.config import RayServeConfig
from pagedlora.ray_serve.ingress import IngressDeployment
from pagedlora.ray_serve.replica import EngineReplica

log = logging.getLogger(__name__)

ROUND_ROBIN = "pagedlora.ray_serve.router:RoundRobinRouter"


def build_application(config: RayServeConfig) -> serve.Application:
    """The bound application: for each base model an ``EngineReplica`` deployment
    (``EngineReplica-<model>``) with ``config``'s replicas, resources, autoscaling and
    routing, and the ``Ingress`` deployment (one replica, no CPU reserved) serving the
    HTTP routes. Run it with ``serve.run(app, name=config.app_name, route_prefix="/")``."""
    server = config.server
    replicas = {}
    for name, path in server.models.items():
        options = {
            "name": f"EngineReplica-{name}",
            "ray_actor_options": {"num_cpus": config.cpus_per_replica,
                                  "num_gpus": config.gpus_per_replica},
            "max_ongoing_requests": config.ongoing_requests(name),
            "max_queued_requests": server.max_queue,
            "graceful_shutdown_timeout_s": server.shutdown_timeout_s,
        }
        if config.autoscaling:
            options["autoscaling_config"] = AutoscalingConfig(
                min_replicas=config.min_replicas, max_replicas=config.max_replicas,
                initial_replicas=config.min_replicas,
                target_ongoing_requests=config.target_ongoing_requests,
                upscale_delay_s=config.upscale_delay_s,
                downscale_delay_s=config.downscale_delay_s,
                metrics_interval_s=config.metrics_interval_s,
                look_back_period_s=config.look_back_period_s)
        else:
            options["num_replicas"] = config.num_replicas
        if config.routing == "round_robin":
            options["request_router_config"] = RequestRouterConfig(
                request_router_class=ROUND_ROBIN)
        deployment = serve.deployment(EngineReplica).options(**options)
        replicas[name] = deployment.bind(
            name, None if path is None else str(path), server.pool_gb_per_model,
            server.engine_options_for(name), server.max_queue,
            config.adapters_per_replica(name), max(1, round(config.cpus_per_replica)))
    ingress = IngressDeployment.options(num_replicas=1, ray_actor_options={"num_cpus": 0},
                                        max_ongoing_requests=10_000)
    return ingress.bind(config, replicas)


def serve_forever(config: RayServeConfig, address: str | None = None) -> None:
    """Connects to the Ray cluster at ``address`` (None: the one ``RAY_ADDRESS`` names, or
    a new local one), starts Ray Serve's HTTP proxy on ``config.server``'s host and port,
    runs the application, and blocks until SIGTERM or Ctrl-C; then deletes it (the
    replicas drain their requests first)."""
    import ray

    ray.init(address=address)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_application(config), name=config.app_name, route_prefix="/")
    log.info("serving on http://%s:%d", config.server.host, config.server.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(config.app_name)
    serve.shutdown()
