"""SageMaker LMI's (DJL Serving's) adapter management API, next to vLLM's load/unload routes:

- ``GET /models/{model}/adapters`` (``limit``, ``next_page_token``): ``{"adapters": [...],
  "nextPageToken"?}``
- ``GET /models/{model}/adapters/{name}``: ``{"name", "src", "preload", "pin"}``
- ``POST /models/{model}/adapters`` (``name``, ``src``, ``preload``, ``pin``; in the query
  string as DJL takes them, or a JSON body): ``{"status": "Adapter <name> registered"}``
- ``DELETE /models/{model}/adapters/{name}``: ``{"status": "Adapter <name> unregistered"}``

and the same without ``/models/{model}`` when one base model is served. Errors are those of the
vLLM-style routes (they share ``ModelRegistry``): 404 for an unknown base model or adapter (or
one of another base model), 400 for an adapter that cannot be loaded or a name taken, 409 when
unloading an adapter that requests use. ``src`` is anything ``Engine.add_adapter`` takes: a
directory, an archive, an ``s3://`` URL, a cached model id.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pagedlora.server.protocol import ApiError, RegisterAdapterRequest
from pagedlora.server.registry import ServedAdapter
from pagedlora.server.state import ServerState

router = APIRouter()

MAX_PAGE = 100  # DJL's largest and default page of adapters


@router.get("/models/{model:path}/adapters")
async def list_adapters(request: Request, model: str) -> Response:
    """The adapters of base model ``model``, a page at a time."""
    return _list(request, model)


@router.get("/adapters")
async def list_adapters_of_the_only_model(request: Request) -> Response:
    return _list(request, None)


@router.get("/models/{model:path}/adapters/{name:path}")
async def describe_adapter(request: Request, model: str, name: str) -> Response:
    """One adapter of base model ``model``."""
    return JSONResponse(_describe(name, _adapter(request, model, name)))


@router.get("/adapters/{name:path}")
async def describe_adapter_of_the_only_model(request: Request, name: str) -> Response:
    return JSONResponse(_describe(name, _adapter(request, None, name)))


@router.post("/models/{model:path}/adapters")
async def register_adapter(request: Request, model: str) -> Response:
    """Loads adapter ``name`` from ``src`` into base model ``model``."""
    return await _register(request, model)


@router.post("/adapters")
async def register_adapter_of_the_only_model(request: Request) -> Response:
    return await _register(request, None)


@router.delete("/models/{model:path}/adapters/{name:path}")
async def unregister_adapter(request: Request, model: str, name: str) -> Response:
    """Unloads adapter ``name`` of base model ``model``."""
    return await _unregister(request, model, name)


@router.delete("/adapters/{name:path}")
async def unregister_adapter_of_the_only_model(request: Request, name: str) -> Response:
    return await _unregister(request, None, name)


def _list(request: Request, model: str | None) -> Response:
    registry = ServerState.of(request).registry
    base = registry.base(model, "/models/{model}/adapters")
    names = _names_of(registry, base)
    query = request.query_params
    limit = _int_param(query, "limit", MAX_PAGE)
    limit = limit if 0 <= limit <= MAX_PAGE else MAX_PAGE  # as DJL
    start = max(_int_param(query, "next_page_token", 0), 0)
    page = names[start:start + limit]
    body: dict = {"adapters": [_describe(n, registry.adapters[n]) for n in page]}
    if start + limit < len(names):
        body["nextPageToken"] = str(start + limit)
    return JSONResponse(body)


def _adapter(request: Request, model: str | None, name: str) -> ServedAdapter:
    """Adapter ``name`` of base model ``model`` (None: the only one).

    Raises:
        ApiError: 404 for an unknown base model, or an adapter it does not have.
    """
    registry = ServerState.of(request).registry
    base = registry.base(model, "/models/{model}/adapters")
    adapter = registry.adapters.get(name)
    if adapter is None or adapter.base != base:
        raise ApiError(404, f"adapter {name!r} of base model {base!r} does not exist; its "
                       f"adapters: {_names_of(registry, base)}", param="name")
    return adapter


def _names_of(registry, base: str) -> list[str]:
    return sorted(n for n, a in registry.adapters.items() if a.base == base)


async def _register(request: Request, model: str | None) -> Response:
    state = ServerState.of(request)
    base = state.registry.base(model, "/models/{model}/adapters")
    query: dict = dict(request.query_params)
    for key in ("preload", "pin"):
        if key in query:
            query[key] = _bool_param(query, key)
    body = await state.body(request, RegisterAdapterRequest, query)
    await state.load_adapter(body.name, body.src, base, body.preload)
    return JSONResponse({"status": f"Adapter {body.name} registered"})


async def _unregister(request: Request, model: str | None, name: str) -> Response:
    state = ServerState.of(request)
    _adapter(request, model, name)
    await state.unload_adapter(name)
    return JSONResponse({"status": f"Adapter {name} unregistered"})


def _describe(name: str, adapter: ServedAdapter) -> dict:
    return {"name": name, "src": str(adapter.source), "preload": adapter.preload, "pin": False}


def _int_param(query, key: str, default: int) -> int:
    value = query.get(key)
    if value is None:
        return default
    if not value.lstrip("-").isdigit():
        raise ApiError(400, f"{key} must be an integer, got {value!r}", param=key)
    return int(value)


def _bool_param(query, key: str) -> bool:
    value = query[key].lower()
    if value not in ("true", "false"):
        raise ApiError(400, f"{key} must be true or false, got {query[key]!r}", param=key)
    return value == "true"
