"""Ingress: the Ray Serve deployment that owns the HTTP routes of ``pagedlora serve`` (the same
FastAPI app, built by ``create_app``) and the adapter registry, and forwards engine work to
the base models' EngineReplica deployments through :class:`ReplicaClient`.

The adapter registry lives here, in this deployment's one replica: startup adapters are
validated on one engine replica and recorded (name, source, content key); adapters loaded at
run time likewise, and with a state directory also kept in ``adapters.json`` as ``pagedlora
serve --state-dir`` keeps them, so a restarted ingress loads them again. Engine replicas need no
copy: every call carries its adapter's reference, so a new or restarted replica serves every
registered adapter from its first call for it.
"""

from __future__ import annotations

import logging
from functools import partial

from fastapi import APIRouter, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from pagedlora.errors import AdapterError
from pagedlora.ray_serve.client import ReplicaClient
from pagedlora.ray_serve.config import RayServeConfig
from pagedlora.server.adapter_state import AdapterEntry, AdapterState
from pagedlora.server.app import create_app
from pagedlora.server.metrics import ServerMetrics
from pagedlora.server.protocol import ApiError
from pagedlora.server.registry import ModelRegistry
from pagedlora.server.state import ServerState

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/replicas")
async def replicas(request: Request) -> dict:
    """Each base model's replicas as they last reported (at the end of a call each served):
    ``{"models": {model: {"replicas": {id: report}, "retries": n}}}``; a report holds the
    replica's pid, requests running and waiting, adapters registered, pool loads by tier and
    the tiers and counters of the adapters it served."""
    registry = ServerState.of(request).registry
    return {"models": {name: {"replicas": {rid: vars(r) for rid, r in c.reports.items()},
                              "retries": c.retries}
                       for name, c in registry.loops.items()}}


class Ingress:
    """The HTTP front of a :func:`~pagedlora.ray_serve.build_application` app.

    Args:
        config: the deployment's options.
        replicas: base model name -> its EngineReplica deployment's handle.
    """

    async def __init__(self, config: RayServeConfig, replicas: dict[str, DeploymentHandle]
                       ) -> None:
        server = config.server
        metrics = ServerMetrics()
        clients = {}
        for name, handle in replicas.items():
            info = await handle.describe.remote()
            clients[name] = ReplicaClient(name, handle, info, config.routing == "adapter",
                                          partial(metrics.observe_finished, name))
        registry = ModelRegistry(clients)
        for source in server.adapters:  # validated on one replica each
            for ref in await clients[source.model].register(source.path, source.name):
                registry.register(source.model, ref.name, ref.source)
        state = None
        if server.state_dir is not None:
            state = AdapterState(server.state_dir)
            await _replay(state, registry)
        log.info("ingress: base models %s, adapters %s", sorted(clients),
                 sorted(registry.adapters))
        self._app = create_app(ServerState(registry, metrics, server, state))
        self._app.include_router(router)

    def __serve_build_asgi_app__(self):
        return self._app


IngressDeployment = serve.deployment(serve.ingress()(Ingress), name="Ingress")


async def _replay(state: AdapterState, registry: ModelRegistry) -> None:
    """``adapter_state.replay`` through the replicas: the adapters a previous run loaded at
    run time, loaded again; one that cannot be is logged and dropped."""
    for e in state.read():
        try:
            await registry.load(e.name, e.src, e.model, e.preload)
        except (ApiError, AdapterError) as err:
            log.warning("state %s: adapter %r of %r from %s skipped: %s", state.path, e.name,
                        e.model, e.src, getattr(err, "message", err))
            continue
        state._record(AdapterEntry(e.model, e.name, e.src, e.preload))
    state._write()
