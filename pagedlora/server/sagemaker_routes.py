"""SageMaker LMI-style routes: ``POST /invocations`` and ``GET /ping``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pagedlora.server.prompts import PromptTokens
from pagedlora.server.protocol import ApiError, InvocationRequest
from pagedlora.server.state import ServerState, client_gone

router = APIRouter()

COMPONENT_HEADER = "X-Amzn-SageMaker-Inference-Component"


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    """``{"inputs", "adapters"?, "parameters"?, "model"?}`` -> ``{"generated_text"}`` for one
    input string, a list of those (input order) for a list.

    The base model is the one named by the ``X-Amzn-SageMaker-Inference-Component`` header or
    the ``model`` field; without either, the only one served, or the one all the named
    adapters belong to. Each adapter must belong to that base model (400 otherwise; 404 for an
    unknown one, naming the ``adapters`` field). Each input's tokens plus ``max_new_tokens`` must
    fit in ``max_model_len`` (400 naming both numbers otherwise).
    """
    state = ServerState.of(request)
    body = await state.body(request, InvocationRequest)
    inputs, adapters = body.prompts_and_adapters()
    registry = state.registry
    owners = {a: registry.adapter_base(a, "adapters") for a in dict.fromkeys(adapters)
              if a is not None}
    named = request.headers.get(COMPONENT_HEADER) or body.model
    if named is None and None not in adapters and len(set(owners.values())) == 1:
        named = next(iter(owners.values()))
    base = registry.base(named, f"the {COMPONENT_HEADER} header or a 'model' field")
    wrong = {a: b for a, b in owners.items() if b != base}
    if wrong:
        raise ApiError(400, f"adapters {wrong} (adapter: its base model) do not belong to base "
                       f"model {base!r}", param="adapters")
    loop = registry.loops[base]
    params = body.parameters.to_sampling_params()
    tokens = await PromptTokens.of(loop.engine, base, "inputs", inputs,
                                   not isinstance(body.inputs, str))
    tokens.check_room(params.max_tokens, "parameters.max_new_tokens")
    gen = await state.open(loop, tokens.ids, adapters, params, adapter_field="adapters")
    outs = await state.outputs(request, gen)
    if outs is None:
        return client_gone()
    texts = [{"generated_text": o.text} for o in outs]
    return JSONResponse(texts[0] if isinstance(body.inputs, str) else texts)


@router.get("/ping")
async def ping(request: Request) -> Response:
    """SageMaker's health check: 200 while every engine loop runs, else 503 naming them."""
    return ServerState.of(request).health()

