"""SageMaker LMI-style routes: ``POST /invocations`` and ``GET /ping``, with LMI's request and
response schema (``inputs``, ``adapters``, ``parameters``, ``details``) and SageMaker's headers."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from pagedlora.detokenizer import Detokenizer
from pagedlora.outputs import RequestOutput
from pagedlora.server.logprobs import TokenTexts, lmi_token
from pagedlora.server.prompts import PromptTokens
from pagedlora.server.protocol import ApiError, InvocationParameters, InvocationRequest
from pagedlora.server.registry import ModelRegistry
from pagedlora.server.state import ServerState, client_gone

log = logging.getLogger(__name__)

router = APIRouter()

COMPONENT_HEADER = "X-Amzn-SageMaker-Inference-Component"
ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
# keys of the custom attributes that name the adapter: LMI 0.27-0.30 read "adapter", later
# versions the adapter-identifier property (which a custom attribute may also set)
_ADAPTER_ATTRIBUTES = ("adapter", ADAPTER_HEADER.lower())


@router.post("/invocations")
async def invocations(request: Request) -> Response:
    """LMI's ``{"inputs", "adapters"?, "parameters"?}`` (and ``"model"?``) ->
    ``{"generated_text", "details"?}`` for one input string, a list of those (input order)
    for a list.

    The adapter: the body's ``adapters`` (``""`` or null: the base model; a ``{name: weight}``
    object: a weighted mix of adapters, pagedlora's extension), or for every input the one
    named by the ``X-Amzn-SageMaker-Adapter-Identifier`` header, an ``adapter=NAME``
    pair of the ``X-Amzn-SageMaker-Custom-Attributes`` header (``key=value`` pairs split by
    ``;``, as LMI reads them) or the ``?adapter=`` query parameter; places that disagree are a
    400. The base model: the one the ``X-Amzn-SageMaker-Inference-Component`` header or the
    ``model`` field names; the only one served (the header then names this container's
    component); or the one all the named adapters belong to. Each adapter must belong to that
    base model (400 otherwise; 404 for an unknown one). An unknown adapter is a 404 naming
    the ``adapters`` field. Each input's tokens plus ``max_new_tokens`` must fit in
    ``max_model_len`` (400 naming both numbers otherwise).
    """
    state = ServerState.of(request)
    body = await state.body(request, InvocationRequest)
    inputs, adapters = body.prompts_and_adapters()
    adapters = _header_adapters(request, body, adapters)
    registry = state.registry
    names = [n for a in adapters if a is not None for n in ([a] if isinstance(a, str) else a)]
    owners = {a: registry.adapter_base(a, "adapters") for a in dict.fromkeys(names)}
    base = _base_model(request, body, registry, owners, adapters)
    wrong = {a: b for a, b in owners.items() if b != base}
    if wrong:
        raise ApiError(400, f"adapters {wrong} (adapter: its base model) do not belong to base "
                       f"model {base!r}", param="adapters")
    params = body.parameters
    loop = registry.loops[base]
    params.check_logprobs(loop.engine.config.max_logprobs)
    adapters = [registry.mix(a, base) if isinstance(a, dict) else a for a in adapters]
    sampling = params.to_sampling_params()
    tokens = await PromptTokens.of(loop.engine, base, "inputs", inputs,
                                   not isinstance(body.inputs, str))
    tokens.check_room(sampling.max_tokens, "parameters.max_new_tokens")
    gen = await state.open(loop, tokens.ids, adapters, sampling, adapter_field="adapters")
    outs = await state.outputs(request, gen)
    if outs is None:
        return client_gone()
    results = [lmi_result(o, prompt, params, loop.engine.tokenizer)
               for o, prompt in zip(outs, inputs, strict=True)]
    return JSONResponse(results[0] if isinstance(body.inputs, str) else results)


@router.get("/ping")
async def ping(request: Request) -> Response:
    """SageMaker's health check: 200 while every engine loop runs, else 503 naming them."""
    return ServerState.of(request).health()


def custom_attributes(header: str) -> dict[str, str]:
    """SageMaker's custom attributes ``"k1=v1; k2=v2"`` as LMI splits them: pairs at ``;``,
    key and value at the first ``=``, both stripped; keys lower-cased; a part without ``=`` is
    ignored."""
    pairs = {}
    for part in header.split(";"):
        key, found, value = part.partition("=")
        if found:
            pairs[key.strip().lower()] = value.strip()
    return pairs


def lmi_result(out: RequestOutput, prompt: str, params: InvocationParameters,
               tokenizer) -> dict:
    """LMI's result object for one input: ``generated_text`` (after the input with
    ``return_full_text``) and, with ``details``, ``details``: ``finish_reason`` ("length",
    "eos_token", "stop_sequence" or "abort"), ``generated_tokens``, ``inputs`` and ``tokens``
    (``id``, ``text``, ``log_prob``: the token's log-probability under the adapter, and
    ``special_token`` for special tokens); with ``top_n_tokens``, ``top_tokens`` (per token,
    the most likely ones, each ``{"id", "text", "log_prob"}``); with
    ``decoder_input_details``, ``prefill`` (the input tokens, the first one's ``log_prob``
    null)."""
    text = prompt + out.text if params.return_full_text else out.text
    result: dict = {"generated_text": text}
    if params.details:
        special = set(getattr(tokenizer, "all_special_ids", ()))
        logprobs = out.logprobs or [None] * len(out.token_ids)
        details = {"finish_reason": _finish_reason(out, params, tokenizer),
                   "generated_tokens": len(out.token_ids), "inputs": prompt,
                   "tokens": [lmi_token(t, None if e is None else e.logprob, text, special)
                              for t, e, text in zip(out.token_ids, logprobs,
                                                    _texts(out.token_ids, tokenizer),
                                                    strict=True)]}
        if params.top_n_tokens:
            texts = TokenTexts(tokenizer)
            details["top_tokens"] = [[lmi_token(t, lp, texts(t), special) for t, lp in e.top]
                                     for e in out.logprobs]
        if params.decoder_input_details and out.prompt_logprobs is not None:
            ids = out.prompt_token_ids
            details["prefill"] = [
                lmi_token(t, None if e is None else e.logprob, text, special)
                for t, e, text in zip(ids, out.prompt_logprobs, _texts(ids, tokenizer),
                                      strict=True)]
        result["details"] = details
    return result


def _header_adapters(request: Request, body: InvocationRequest,
                     adapters: list[str | None]) -> list[str | None]:
    """``adapters``, or the adapter a header or the query string names for every input.

    Raises:
        ApiError: 400 when the places that name an adapter disagree.
    """
    named = {}
    if ADAPTER_HEADER in request.headers:
        named[f"the {ADAPTER_HEADER} header"] = request.headers[ADAPTER_HEADER]
    attributes = custom_attributes(request.headers.get(CUSTOM_ATTRIBUTES_HEADER, ""))
    for key in _ADAPTER_ATTRIBUTES:
        if key in attributes:
            named[f"{CUSTOM_ATTRIBUTES_HEADER} {key}="] = attributes[key]
    if "adapter" in request.query_params:
        named["the adapter query parameter"] = request.query_params["adapter"]
    if not named:
        return adapters
    if any(isinstance(a, dict) for a in adapters):
        raise ApiError(400, f"the body's adapters hold a mix, and {sorted(named)} name an "
                       f"adapter too", param="adapters")
    values = {v or None for v in named.values()}
    if body.adapters is not None:
        named["the body's adapters"] = body.adapters
        values |= set(adapters)
    if len(values) > 1:
        raise ApiError(400, f"the adapter is named differently in {named}", param="adapters")
    return [values.pop()] * len(adapters)


def _base_model(request: Request, body: InvocationRequest, registry: ModelRegistry,
                owners: dict[str, str], adapters: list[str | None]) -> str:
    component = request.headers.get(COMPONENT_HEADER)
    if component is not None and component not in registry.loops and len(registry.loops) == 1:
        log.debug("%s %r: the only base model serves it", COMPONENT_HEADER, component)
        component = None  # SageMaker's name of the component this container serves
    named = component or body.model
    if named is None and None not in adapters and len(set(owners.values())) == 1:
        named = next(iter(owners.values()))
    return registry.base(named, f"the {COMPONENT_HEADER} header or a 'model' field")


def _finish_reason(out: RequestOutput, params: InvocationParameters, tokenizer) -> str:
    if out.finish_reason != "stop":
        return out.finish_reason  # "length", "abort"
    last = out.token_ids[-1] if out.token_ids else None
    eos = getattr(tokenizer, "eos_token_id", None)
    by_sequence = last in params.stop_token_ids or (bool(params.stop_strings) and last != eos)
    return "stop_sequence" if by_sequence else "eos_token"


def _texts(token_ids: list[int], tokenizer) -> list[str]:
    """Each token's text, decoded incrementally, so that they add up to the decoded text (a
    token that ends inside a UTF-8 character has text "" and the next one carries the
    character)."""
    detok = Detokenizer(tokenizer)
    texts = []
    for token in token_ids:
        before = len(detok.text)
        detok.push(token)
        texts.append(detok.text[before:])
    return texts
