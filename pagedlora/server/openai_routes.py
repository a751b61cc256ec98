"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, and vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter.

Extension: a completion or chat body may carry ``"adapters": {name: weight, ...}``, a scaled
adapter or weighted mix of adapters (:class:`~pagedlora.AdapterMix`) of the base model that
``model`` names (the openai client sends it with ``extra_body={"adapters": {...}}``)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from pagedlora.adapter_mix import AdapterMix
from pagedlora.outputs import StreamOutput
from pagedlora.server.engine_loop import EngineLoop
from pagedlora.server.logprobs import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    vllm_prompt_logprobs,
)
from pagedlora.server.prompts import PromptTokens
from pagedlora.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from pagedlora.server.registry import ModelRegistry
from pagedlora.server.state import ServerState, Usage, client_gone

router = APIRouter()

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@router.get("/v1/models")
async def models(request: Request) -> dict:
    """Base models, and adapters with ``parent`` = their base model."""
    return {"object": "list", "data": ServerState.of(request).registry.models()}


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI's text completions; one choice per prompt, ``stream`` as server-sent events
    (logprobs per chunk, for that chunk's tokens; with ``echo``, the prompt and its entries
    in each choice's first chunk). Each prompt's tokens plus ``max_tokens`` (default 16) must
    fit in ``max_model_len`` (400 naming both numbers otherwise)."""
    state = ServerState.of(request)
    body = await state.body(request, CompletionRequest)
    loop, adapter = _resolve(state.registry, body)
    body.check_logprobs(loop.engine.config.max_logprobs)
    prompts = body.prompts()
    params = body.to_sampling_params(COMPLETION_MAX_TOKENS)
    tokens = await PromptTokens.of(loop.engine, body.model, "prompt", prompts, body.listed)
    tokens.check_room(params.max_tokens, body.max_tokens_field)
    gen = await state.open(loop, tokens.ids, [adapter] * len(prompts), params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": body.model}
    tokenizer = loop.engine.tokenizer
    texts = TokenTexts(tokenizer)
    offsets: dict[int, int] = {}  # choice -> text offset of its next token

    def choice(index: int, text: str, token_ids: list[int], entries, prompt_ids, prompt_entries,
               finish_reason: str | None) -> dict:
        """``prompt_ids`` (and their entries) are given once per choice: with ``echo``, its
        text and entries come first."""
        if body.echo and prompt_ids is not None:
            p = prompts[index]
            text = (p if isinstance(p, str) else _decode(tokenizer, prompt_ids)) + text
            token_ids = [*prompt_ids, *token_ids]
            if body.logprobs is not None:
                entries = [*prompt_entries, *entries]
        out = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        if body.logprobs is not None:
            out["logprobs"], offsets[index] = completion_logprobs(
                token_ids, entries, texts, body.logprobs, offsets.get(index, 0))
        if body.prompt_logprobs is not None and prompt_entries is not None:
            out["prompt_logprobs"] = vllm_prompt_logprobs(prompt_entries, texts)
        return out

    if body.stream:
        def chunk(d: StreamOutput) -> dict | None:
            first = d.prompt_token_ids is not None
            if not (d.new_text or d.finished or (first and body.echo)
                    or (d.new_token_ids and body.logprobs is not None)):
                return None
            reason = d.output.finish_reason if d.finished else None
            return {**head, "choices": [choice(d.index, d.new_text, d.new_token_ids,
                                               d.new_logprobs, d.prompt_token_ids,
                                               d.prompt_logprobs, reason)]}

        return state.stream(request, gen, chunk,
                            last=_usage_chunk(head) if body.include_usage else None)
    outs = await state.outputs(request, gen)
    if outs is None:
        return client_gone()
    return JSONResponse({**head, "choices": [
        choice(i, o.text, o.token_ids, o.logprobs, o.prompt_token_ids, o.prompt_logprobs,
               o.finish_reason) for i, o in enumerate(outs)], "usage": Usage(outs).body()})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI's chat completions: ``messages`` rendered with the base model's chat template
    (400 naming the model when it has none); ``max_tokens`` defaults to the room left in
    ``max_model_len``, and more than that is a 400 naming both numbers; ``logprobs`` and
    ``top_logprobs`` per token, in each stream chunk for its tokens; vLLM's
    ``prompt_logprobs`` at the top level."""
    state = ServerState.of(request)
    body = await state.body(request, ChatCompletionRequest)
    loop, adapter = _resolve(state.registry, body)
    body.check_logprobs(loop.engine.config.max_logprobs)
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
    texts = TokenTexts(tokenizer)

    def logprobs(entries) -> dict | None:
        return chat_logprobs(entries, texts, body.top_logprobs or 0) if body.logprobs else None

    if body.stream:
        def chunk(d: StreamOutput) -> dict | None:
            if not (d.new_text or d.finished or (d.new_token_ids and body.logprobs)):
                return None
            delta = {"content": d.new_text} if d.new_text else {}
            reason = d.output.finish_reason if d.finished else None
            out = {**head, "choices": [{"index": 0, "delta": delta,
                                        "logprobs": logprobs(d.new_logprobs),
                                        "finish_reason": reason}]}
            if d.prompt_logprobs is not None:
                out["prompt_logprobs"] = vllm_prompt_logprobs(d.prompt_logprobs, texts)
            return out

        first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}]}
        return state.stream(request, gen, chunk, first=first,
                            last=_usage_chunk(head) if body.include_usage else None)
    outs = await state.outputs(request, gen)
    if outs is None:
        return client_gone()
    out = outs[0]
    response = {**head, "object": "chat.completion",
                "choices": [{"index": 0, "logprobs": logprobs(out.logprobs),
                             "message": {"role": "assistant", "content": out.text},
                             "finish_reason": out.finish_reason}],
                "usage": Usage(outs).body()}
    if out.prompt_logprobs is not None:
        response["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs, texts)
    return JSONResponse(response)


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


def _resolve(registry: ModelRegistry, body: CompletionRequest | ChatCompletionRequest
             ) -> tuple[EngineLoop, str | AdapterMix | None]:
    """The engine loop and adapter of ``body``: ``model``'s, or with the ``adapters``
    extension the mix of adapters of base model ``model``.

    Raises:
        ApiError: 404 for an unknown model or adapter; 400 when ``model`` names an adapter
            next to ``adapters``, or for a mix that cannot be served (see
            :meth:`ModelRegistry.mix`).
    """
    loop, adapter = registry.resolve(body.model)
    if body.adapters is None:
        return loop, adapter
    if adapter is not None:
        raise ApiError(400, f"with 'adapters', 'model' names the base model; {body.model!r} "
                       f"is an adapter of {loop.name!r}", param="model")
    return loop, registry.mix(body.adapters, loop.name)


def _decode(tokenizer, token_ids: list[int]) -> str:
    """A token-id prompt's text, for ``echo`` (special tokens kept: they were sent)."""
    return "" if tokenizer is None else tokenizer.decode(token_ids)


def _usage_chunk(head: dict):
    def last(usage: Usage) -> dict:
        return {**head, "choices": [], "usage": usage.body()}
    return last
