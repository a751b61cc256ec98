"""RayServeConfig: how ``pagedlora serve --replicas`` deploys engines on Ray Serve, one
validated dataclass next to the server's own :class:`~pagedlora.server.config.ServerConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from pagedlora.server.config import ServerConfig

ROUTINGS = ("adapter", "round_robin")


@dataclass(frozen=True)
class RayServeConfig:
    """Options of :func:`pagedlora.ray_serve.build_application`.

    Attributes:
        server: what is served (models, adapters, HTTP limits, engine options, state
            directory), as for ``pagedlora serve``; ``pool_gb`` is each replica's pool (split
            between its base models as usual; each base model has its own deployment).
        num_replicas: replicas of each base model's deployment when not autoscaling.
        min_replicas, max_replicas: with ``max_replicas`` set, Ray Serve's autoscaler keeps
            between these many replicas (``autoscaling_config``), adding one when the ongoing
            requests per replica stay above ``target_ongoing_requests`` for
            ``upscale_delay_s`` seconds and removing one when they stay below it for
            ``downscale_delay_s`` seconds (a replica removed first finishes its requests,
            within ``server.shutdown_timeout_s``).
        target_ongoing_requests: the autoscaler's target of ongoing requests per replica.
        upscale_delay_s, downscale_delay_s: seconds, see above.
        metrics_interval_s, look_back_period_s: how often (seconds) replicas report their
            ongoing requests to the autoscaler, and over how many seconds it averages them.
        cpus_per_replica, gpus_per_replica: each replica's ``ray_actor_options`` (its share of
            the node's cores or devices; torch uses ``cpus_per_replica`` threads).
        max_ongoing_requests: HTTP requests one replica serves at once; beyond it Ray's router
            deems it overloaded and sends elsewhere (or queues). None: the engine's
            ``max_num_seqs`` (a replica whose batch is full is overloaded).
        max_adapters_per_replica: Ray Serve's ``max_num_models_per_replica``: how many
            adapters a replica advertises to the router as its own (the least recently used
            beyond it stop drawing their requests, and stay registered on disk tiers). None:
            the replica's pool and host budgets, ``max_loras + max_cpu_loras``, or no limit
            when ``max_cpu_loras`` is unset (host memory unbounded).
        routing: "adapter" (Ray Serve's model multiplexing: a request goes to a replica that
            holds its adapter unless all those are overloaded, else to the replica with the
            fewest adapters, which loads it; base-model requests go to the less busy of two
            random replicas) or "round_robin" (adapter-blind, each request to the next replica
            in turn: the counterfactual for benchmarks).
        app_name: the Ray Serve application's name.

    Raises:
        ValueError: naming the offending option.
    """

    server: ServerConfig
    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_ongoing_requests: int | None = None
    max_adapters_per_replica: int | None = None
    routing: str = "adapter"
    app_name: str = "pagedlora"

    def __post_init__(self) -> None:
        for name in ("num_replicas", "min_replicas"):
            _positive_int(name, getattr(self, name))
        if self.max_replicas is not None:
            _positive_int("max_replicas", self.max_replicas)
            if self.max_replicas < self.min_replicas:
                raise ValueError(f"max_replicas ({self.max_replicas}) must be >= "
                                 f"min_replicas ({self.min_replicas})")
        for name in ("target_ongoing_requests", "cpus_per_replica", "metrics_interval_s",
                     "look_back_period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("upscale_delay_s", "downscale_delay_s", "gpus_per_replica"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_ongoing_requests", "max_adapters_per_replica"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")

    @property
    def autoscaling(self) -> bool:
        """Whether Ray Serve's autoscaler sizes the deployments."""
        return self.max_replicas is not None

    def adapters_per_replica(self, model: str) -> int:
        """``max_num_models_per_replica`` of base model ``model``'s replicas (-1: no limit)."""
        if self.max_adapters_per_replica is not None:
            return self.max_adapters_per_replica
        engine = self.server.engine_config(model)
        if engine.max_cpu_loras is None:
            return -1
        return engine.max_loras + engine.max_cpu_loras

    def ongoing_requests(self, model: str) -> int:
        """``max_ongoing_requests`` of base model ``model``'s replicas."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.server.engine_config(model).max_num_seqs


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
