"""The FastAPI app: engines and adapters loaded from a ServerConfig, routes, errors as JSON,
/health and /metrics, and the engine loops' lifespan."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from functools import partial

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from pagedlora import __version__
from pagedlora.engine import Engine
from pagedlora.server import lmi_routes, openai_routes, sagemaker_routes
from pagedlora.server.adapter_state import AdapterState, replay
from pagedlora.server.config import ServerConfig
from pagedlora.server.engine_loop import EngineLoop, LoopStopped
from pagedlora.server.metrics import ServerMetrics
from pagedlora.server.protocol import ApiError
from pagedlora.server.registry import ModelRegistry
from pagedlora.server.state import ServerState, log_error

log = logging.getLogger(__name__)

BACKSTOP_S = 10.0  # after the grace period, how long aborted requests get to end before
# uvicorn cancels their tasks (cutting the connections)


def build_app(config: ServerConfig) -> FastAPI:
    """Loads every base model (one Engine each, with its share of the pool), registers the
    startup adapters, and with ``config.state_dir`` loads again the adapters a previous run
    loaded at run time; then returns the app. Slow: it reads the models. The engine loops
    start and stop with the app's lifespan (uvicorn runs it).

    Raises:
        FileNotFoundError, SourceError, ValueError, AdapterError...: as ``Engine`` and
            ``add_adapter``; a name clash between adapters of different base models is a
            ValueError. (A recorded run-time adapter that fails to load is logged and dropped.)
    """
    metrics = ServerMetrics()
    loops = {}
    for name, path in config.models.items():
        log.info("loading base model %r from %s", name, path or "the embedded default model")
        engine = Engine(path, pool_gb=config.pool_gb_per_model,
                        **config.engine_options_for(name))
        loops[name] = EngineLoop(name, engine, config.max_queue,
                                 on_finished=partial(metrics.observe_finished, name))
    registry = ModelRegistry(loops)
    for source in config.adapters:
        engine = loops[source.model].engine
        added = (engine.add_adapters_from_dir(source.path) if source.name is None
                 else [engine.add_adapter(source.name, source.path)])
        for adapter in added:
            registry.register(source.model, adapter.name, adapter.path)
    state = None
    if config.state_dir is not None:
        state = AdapterState(config.state_dir)
        replay(state, registry)
    log.info("serving base models %s, adapters %s", sorted(loops), sorted(registry.adapters))
    return create_app(ServerState(registry, metrics, config, state))


def create_app(state: ServerState) -> FastAPI:
    """The app around already built engines (``state.registry.loops``, not started)."""
    loops = state.registry.loops

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for loop in loops.values():
            loop.start()
        try:
            yield
        finally:  # after uvicorn's graceful shutdown: abort what still runs, free its pages
            timeout = state.config.shutdown_timeout_s + 30
            await asyncio.gather(*(asyncio.to_thread(loop.stop, timeout)
                                   for loop in loops.values()))
            for loop in loops.values():  # tensor-parallel workers, private spill directories
                loop.engine.close()

    app = FastAPI(title="pagedlora", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.include_router(openai_routes.router)
    app.include_router(sagemaker_routes.router)
    app.include_router(lmi_routes.router)

    @app.get("/health")
    async def health() -> Response:
        """200 while every engine loop runs, else 503 naming the stopped ones."""
        return state.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: requests, tokens, TTFT/TPOT histograms per model and
        adapter, HTTP errors, pool pages by kind, adapters per tier, queue length; and vLLM's
        series that Kubernetes' inference gateways route by (see ``VllmGauges``)."""
        for name, loop in loops.items():
            try:
                stats = await asyncio.wrap_future(loop.call(Engine.stats))
            except LoopStopped:
                continue  # /health reports it
            state.metrics.observe_engine(name, stats, loop.num_waiting,
                                         loop.engine.config.max_loras)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def error_response(request: Request, error: ApiError) -> Response:
        route = request.scope.get("route")
        state.metrics.observe_error(getattr(route, "path", "unmatched"), error.status)
        log_error(request.method, request.url.path, error)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return error_response(request, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:  # 404, 405 routes
        detail = f"{request.method} {request.url.path}: {e.detail}"
        return error_response(request, ApiError(e.status_code, detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(request, ApiError(500, f"internal error: {e!r}"))

    return app


def run(app: FastAPI, log_level: str = "info") -> None:
    """Serves ``app`` (from :func:`build_app`) with uvicorn until SIGTERM or Ctrl-C.

    Shutdown: uvicorn stops accepting connections and lets running requests finish; those
    still running after ``shutdown_timeout_s`` are aborted in their engines, so their clients
    get complete responses with finish_reason "abort" (not cut connections); then the engine
    loops stop.
    """
    state: ServerState = app.state.server
    config = state.config
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                        timeout_graceful_shutdown=config.shutdown_timeout_s + BACKSTOP_S)
    _GracefulServer(uv, list(state.registry.loops.values()), config.shutdown_timeout_s).run()


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, aborting the engines' requests ``grace_s`` into its shutdown."""

    def __init__(self, config: uvicorn.Config, loops: list[EngineLoop], grace_s: float
                 ) -> None:
        super().__init__(config)
        self._loops = loops
        self._grace_s = grace_s

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self._grace_s, self._abort_all)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _abort_all(self) -> None:
        log.info("shutdown: aborting the requests still running after %.1f s", self._grace_s)
        for loop in self._loops:
            loop.abort_all()
