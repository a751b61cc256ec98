"""pagedlora on Ray Serve: replicas of each base model's engine behind one OpenAI-compatible
endpoint, routed by adapter through Ray Serve's model multiplexing, scaled by its autoscaler
(``pagedlora serve --replicas N`` or ``--max-replicas``).

Needs the ``ray`` extra (``pip install -e ".[ray]"``). Modules: ``config`` (RayServeConfig),
``replica`` (EngineReplica: one Engine per replica), ``client`` (ReplicaClient: the ingress's
EngineLoop stand-in), ``ingress`` (the HTTP routes and the adapter registry), ``messages``
(what they send each other), ``router`` (the round-robin counterfactual), ``deploy``
(build_application, serve_forever).
"""

from pagedlora.ray_serve.config import RayServeConfig

__all__ = ["RayServeConfig", "build_application", "serve_forever"]


def __getattr__(name: str):
    if name in ("build_application", "serve_forever"):  # imports Ray Serve
        from pagedlora.ray_serve import deploy

        return getattr(deploy, name)
    raise AttributeError(name)
