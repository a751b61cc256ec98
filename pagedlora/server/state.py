"""ServerState: what every route needs (names, metrics, limits) and the steps they share:
reading a bounded body, opening a generation with HTTP errors, watching for a client that
goes away, and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from pagedlora.engine import Adapter, Prompt
from pagedlora.errors import AdapterMixError, UnknownAdapterError
from pagedlora.outputs import RequestOutput, StreamOutput
from pagedlora.sampling_params import SamplingParams
from pagedlora.server.adapter_state import AdapterEntry, AdapterState
from pagedlora.server.config import ServerConfig
from pagedlora.server.engine_loop import (
    EngineLoop,
    Generation,
    LoopStopped,
    PromptRejected,
    QueueFull,
)
from pagedlora.server.metrics import ServerMetrics
from pagedlora.server.protocol import ApiError, parse_body
from pagedlora.server.registry import ModelRegistry

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # told to clients refused for a full queue
CLIENT_GONE = 499  # nginx's status for a client that closed the connection (nobody reads it)


@dataclass
class ServerState:
    """The app's shared state (``app.state.server``); ``adapter_state`` records run-time
    adapters when the server has a state directory."""

    registry: ModelRegistry
    metrics: ServerMetrics
    config: ServerConfig
    adapter_state: AdapterState | None = None

    @staticmethod
    def of(request: Request) -> ServerState:
        return request.app.state.server

    def health(self) -> Response:
        """``{"status": "healthy"}`` (200) while every engine loop runs, else 503 with the
        stopped or failed ones and why."""
        down = {name: "stopped" if loop.error is None else f"failed: {loop.error!r}"
                for name, loop in self.registry.loops.items() if not loop.alive}
        if down:
            return JSONResponse({"status": "unhealthy", "models": down}, status_code=503)
        return JSONResponse({"status": "healthy"})

    async def load_adapter(self, name: str, src: str, base: str | None,
                           preload: bool = False, replace: bool = False) -> str:
        """Loads an adapter at run time (:meth:`ModelRegistry.load`) and records it in the
        state directory, if any; returns its base model's name. A record that cannot be
        written is logged: the adapter serves, but a restart will not bring it back.

        Raises:
            ApiError: as ``ModelRegistry.load``.
        """
        base = await self.registry.load(name, src, base, preload, replace)
        if self.adapter_state is not None:
            try:
                self.adapter_state.loaded(AdapterEntry(base, name, str(src), preload))
            except OSError as e:
                log.error("adapter %r loaded, but not recorded in %s: %s", name,
                          self.adapter_state.path, e)
        return base

    async def unload_adapter(self, name: str) -> None:
        """Unloads an adapter (:meth:`ModelRegistry.unload`) and forgets its record.

        Raises:
            ApiError: as ``ModelRegistry.unload``.
        """
        await self.registry.unload(name)
        if self.adapter_state is not None:
            try:
                self.adapter_state.unloaded(name)
            except OSError as e:
                log.error("adapter %r unloaded, but its record in %s remains: %s", name,
                          self.adapter_state.path, e)

    async def body(self, request: Request, model: type[BaseModel], query: dict | None = None):
        """The request body, at most ``max_body_bytes``, validated as ``model`` (with fields
        from the query string ``query``, for DJL's management API).

        Raises:
            ApiError: 413 for a larger body; 400 as :func:`~pagedlora.server.protocol.parse_body`.
        """
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} "
                           f"bytes (--max-body-mb)")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes "
                               f"(--max-body-mb)")
        return parse_body(model, bytes(raw), query)

    async def open(self, loop: EngineLoop, prompts: Sequence[Prompt],
                   adapters: Sequence[Adapter], params: SamplingParams,
                   adapter_field: str = "model") -> Generation:
        """Queues the prompts on ``loop`` (one SamplingParams for all) and waits until the
        engine has them.

        Raises:
            ApiError: 503 with Retry-After for a full queue or a stopping loop; 400 for a
                prompt the engine refuses (empty, too long, more prompts than the queue
                holds...) and for a mix the engine refuses (a DoRA adapter scaled or mixed);
                404 for an adapter removed meanwhile (named by the body's ``adapter_field``).
        """
        try:
            return await loop.open(prompts, adapters, [params] * len(prompts))
        except QueueFull as e:
            raise ApiError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except LoopStopped as e:
            raise ApiError(503, str(e)) from None
        except PromptRejected as e:
            raise ApiError(400, str(e), param="prompt") from None
        except UnknownAdapterError as e:  # unloaded since resolve()
            raise ApiError(404, f"{adapter_field}: {e}", param=adapter_field) from None
        except AdapterMixError as e:
            raise ApiError(400, str(e), param="adapters") from None

    async def outputs(self, request: Request, gen: Generation) -> list[RequestOutput] | None:
        """Every request's RequestOutput, in prompt order; None if the client went away first
        (then its requests are aborted and their pages freed).

        Raises:
            ApiError: 500 naming the reason when a request failed in the engine (its adapter's
                weights became unreadable...), 503 when the engine loop stopped.
        """
        work = asyncio.ensure_future(gen.outputs())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            gen.cancel()
        try:
            outs = work.result()
        except asyncio.CancelledError:
            return None
        except LoopStopped as e:
            raise ApiError(503, str(e)) from None
        for o in outs:
            if o.finish_reason == "error":
                raise ApiError(500, f"request failed: {o.error}")
        return outs

    def stream(self, request: Request, gen: Generation,
               chunk: Callable[[StreamOutput], dict | None], first: dict | None = None,
               last: Callable[[Usage], dict] | None = None) -> StreamingResponse:
        """Server-sent events: ``first``, then ``chunk(d)`` for each StreamOutput (skipped
        when None), then ``last(usage)`` if given, then ``data: [DONE]``. A request that
        fails in the engine sends ``data: {"error": ...}`` instead (and logs why, as
        :func:`log_error`). Closing the connection aborts the requests still running."""

        def error_event(error: ApiError) -> str:
            log_error(request.method, request.url.path, error)
            return _event(error.body())

        async def events():
            usage = Usage()
            try:
                if first is not None:
                    yield _event(first)
                async for d in gen:
                    if d.finished and d.output.finish_reason == "error":
                        yield error_event(ApiError(500, f"request failed: {d.output.error}"))
                        break
                    if d.finished:
                        usage.add(d.output)
                    body = chunk(d)
                    if body is not None:
                        yield _event(body)
                else:
                    if last is not None:
                        yield _event(last(usage))
            except LoopStopped as e:
                yield error_event(ApiError(503, str(e)))
            finally:
                gen.cancel()  # the client went away, or a request failed: abort the rest
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


class Usage:
    """Token counts of finished requests, OpenAI's ``usage``."""

    def __init__(self, outputs: Sequence[RequestOutput] = ()) -> None:
        self.prompt_tokens = self.completion_tokens = 0
        for o in outputs:
            self.add(o)

    def add(self, out: RequestOutput) -> None:
        self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += len(out.token_ids)

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def log_error(method: str, path: str, error: ApiError) -> None:
    """One log line saying why a request got ``error``: method, path, status and the message
    sent to the client (which names fields, models, adapters and token counts, never the
    prompt's text), cut to one line of at most 500 characters. 4xx at WARNING, 5xx at ERROR."""
    message = " ".join(error.message.split())
    if len(message) > 500:
        message = message[:497] + "..."
    level = logging.ERROR if error.status >= 500 else logging.WARNING
    log.log(level, "%s %s -> %d: %s", method, path, error.status, message)


def client_gone() -> Response:
    """The response to a request whose client has gone (nobody reads it)."""
    return Response(status_code=CLIENT_GONE)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
