"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from pagedlora.outputs import StreamOutput
from pagedlora.server.prompts import PromptTokens
from pagedlora.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from pagedlora.server.state import ServerState, Usage, client_gone

router = APIRouter()

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """Base models, and adapters with ``parent`` = their base model."""
    return {"object": "list", "data": ServerState.of(request).registry.models()}


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI's text completions; one choice per prompt, ``stream`` as server-sent events.
    Each prompt's tokens plus ``max_tokens`` (default 16) must fit in ``max_model_len`` (400
    naming both numbers otherwise)."""
    state = ServerState.of(request)
    body = await state.body(request, CompletionRequest)
    loop, adapter = state.registry.resolve(body.model)
    prompts = body.prompts()
    params = body.to_sampling_params(COMPLETION_MAX_TOKENS)
    tokens = await PromptTokens.of(loop.engine, body.model, "prompt", prompts, body.listed)
    tokens.check_room(params.max_tokens, body.max_tokens_field)
    gen = await state.open(loop, tokens.ids, [adapter] * len(prompts), params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": body.model}

    def choice(index: int, text: str, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    if body.stream:
        def chunk(d: StreamOutput) -> dict | None:
            if not (d.new_text or d.finished):
                return None
            reason = d.output.finish_reason if d.finished else None
            return {**head, "choices": [choice(d.index, d.new_text, reason)]}

        return state.stream(request, gen, chunk,
                            last=_usage_chunk(head) if body.include_usage else None)
    outs = await state.outputs(request, gen)
    if outs is None:
        return client_gone()
    return JSONResponse({**head, "choices": [choice(i, o.text, o.finish_reason)
                                             for i, o in enumerate(outs)],
                         "usage": Usage(outs).body()})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions: ``messages`` rendered with the base model's chat template
    (400 naming the model when it has none); ``max_tokens`` defaults to the room left in
    ``max_model_len``, and more than that is a 400 naming both numbers."""
    state = ServerState.of(request)
    body = await state.body(request, ChatCompletionRequest)
    loop, adapter = state.registry.resolve(body.model)
    tokenizer = loop.engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise ApiError(400, f"model {body.model!r} (base model {loop.name!r}) has no chat "
                       f"template; use /v1/completions with a prompt string", param="model")
    messages = [m.as_dict() for m in body.messages]
    tokens = await PromptTokens.of(loop.engine, body.model, "messages", [messages], False)
    params = body.to_sampling_params(tokens.room)
    tokens.check_room(params.max_tokens, body.max_tokens_field)
    gen = await state.open(loop, tokens.ids, [adapter], params)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": body.model}
    if body.stream:
        def chunk(d: StreamOutput) -> dict | None:
            if not (d.new_text or d.finished):
                return None
            delta = {"content": d.new_text} if d.new_text else {}
            reason = d.output.finish_reason if d.finished else None
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": reason}]}

        first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]}
        return state.stream(request, gen, chunk, first=first,
                            last=_usage_chunk(head) if body.include_usage else None)
    outs = await state.outputs(request, gen)
    if outs is None:
        return client_gone()
    out = outs[0]
    return JSONResponse({**head, "object": "chat.completion",
                         "choices": [{"index": 0, "logprobs": None,
                                      "message": {"role": "assistant", "content": out.text},
                                      "finish_reason": out.finish_reason}],
                         "usage": Usage(outs).body()})


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    """vLLM's body ``{"lora_name", "lora_path", "model"?}``; 400 with the validation message
    when the adapter cannot be served."""
    state = ServerState.of(request)
    body = await state.body(request, LoadAdapterRequest)
    base = await state.load_adapter(body.lora_name, body.lora_path, body.model,
                                    replace=body.load_inplace)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully "
                             f"to base model '{base}'.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    """``{"lora_name"}``; 404 for an unknown adapter, 409 while requests use it."""
    state = ServerState.of(request)
    body = await state.body(request, UnloadAdapterRequest)
    await state.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _usage_chunk(head: dict):
    def last(usage: Usage) -> dict:
        return {**head, "choices": [], "usage": usage.body()}
    return last
