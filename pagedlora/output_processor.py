"""OutputProcessor: detokenizes, applies stop strings, makes StreamOutputs and routes them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pagedlora.detokenizer import Detokenizer
from pagedlora.input_processor import Adapter
from pagedlora.outputs import RequestOutput, StreamOutput
from pagedlora.scheduler import Request, TokenLogprobs

Sink = Callable[[StreamOutput], None]


@dataclass
class _Live:
    """What the output side keeps of a request until its last StreamOutput."""

    request: Request
    index: int  # position in the submitting call
    prompt: object
    adapter: Adapter
    detokenizer: Detokenizer
    sink: Sink
    num_streamed: int = 0  # output tokens already handed out
    started: bool = False  # its first StreamOutput was made


class OutputProcessor:
    """The one router from request id to sink, and the one place outputs are made.

    Each request registered with :meth:`add` (or failed at once with :meth:`reject`) has a
    sink: the inbox of the ``generate``/``stream`` call that submitted it, an ``on_output``
    callback, or the engine's queue for ``step()``. :meth:`process` turns what a step changed
    into one StreamOutput per request and hands each to its sink. Stop strings are found here
    (incrementally, by the request's :class:`Detokenizer`); a request that meets one is
    finished through the ``finish`` callback in the same step, so its pages are freed before
    the next.

    Thread safety: :meth:`add`, :meth:`reject`, :meth:`drop` and :meth:`is_live` may run in any
    thread; :meth:`process` runs in the thread that steps the engine (one at a time).

    Args:
        tokenizer: an HF tokenizer, or None (text stays empty).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._live: dict[int, _Live] = {}
        self._rejected: list[tuple[StreamOutput, Sink]] = []  # made at add time, not yet sent
        # re-entrant: a stream finalized (garbage-collected) while this thread holds it drops
        # its requests through drop()
        self._lock = threading.RLock()

    def add(self, request: Request, *, index: int, prompt: object, adapter: Adapter,
            stop: Sequence[str], sink: Sink) -> None:
        """Starts routing ``request``'s outputs to ``sink``."""
        with self._lock:
            self._live[request.request_id] = _Live(request, index, prompt, adapter,
                                                   Detokenizer(self.tokenizer, stop), sink)

    def reject(self, request_id: int, *, index: int, prompt: object, adapter: Adapter,
               error: str, sink: Sink) -> None:
        """Queues the one, finished, "error" output of a prompt that failed validation; it is
        handed to ``sink`` by the next :meth:`process` (after the submitting call has its
        request id)."""
        output = RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=[],
                               text="", token_ids=[], finish_reason="error", adapter=adapter,
                               error=error)
        with self._lock:
            self._rejected.append((StreamOutput(request_id, index, "", [], True, output), sink))

    @property
    def num_live(self) -> int:
        """Requests with outputs still to come (0 once everything submitted has finished)."""
        return len(self._live)

    def has_pending(self) -> bool:
        """Whether outputs of rejected prompts wait for the next :meth:`process`."""
        return bool(self._rejected)

    def is_live(self, request_id: int) -> bool:
        """Whether ``request_id`` has outputs still to come."""
        return request_id in self._live

    def drop(self, request_ids: Iterable[int]) -> None:
        """Stops routing these requests (their caller is gone); no output is made for them."""
        with self._lock:
            for rid in request_ids:
                self._live.pop(rid, None)

    def process(self, changed: Sequence[Request],
                finish: Callable[[Request, str], None]) -> list[StreamOutput]:
        """The StreamOutputs of the requests a step ``changed`` (a token, or finished), after
        those of prompts rejected since the last call; each is also handed to its sink.

        Args:
            changed: the step's requests, each once.
            finish: ends a request that met a stop string ("stop"), freeing its pages now.
        """
        with self._lock:
            ready, self._rejected = self._rejected, []
        outputs = []
        for d, sink in ready:
            sink(d)
            outputs.append(d)
        for request in changed:
            live = self._live.get(request.request_id)
            if live is None:
                continue  # dropped: its caller went away
            d = self._emit(live, finish)
            live.sink(d)
            outputs.append(d)
        return outputs

    def _emit(self, live: _Live, finish: Callable[[Request, str], None]) -> StreamOutput:
        r = live.request
        params = r.sampling.params
        new = r.output_token_ids[live.num_streamed:]
        new_logprobs = None if params.logprobs is None else (
            r.output_logprobs[live.num_streamed:])
        first, live.started = not live.started, True
        prompt_logprobs = None
        if first and params.prompt_logprobs is not None:
            prompt_logprobs = _prompt_logprobs(r)
        live.num_streamed = len(r.output_token_ids)
        for token in new:
            live.detokenizer.push(token)
        if not r.is_finished and live.detokenizer.stopped_at is not None:
            finish(r, "stop")
        finished = r.is_finished
        if finished:
            with self._lock:
                self._live.pop(r.request_id, None)
        return StreamOutput(request_id=r.request_id, index=live.index, new_token_ids=new,
                            new_text=live.detokenizer.new_text(finished=finished),
                            finished=finished, output=self._output(live) if finished else None,
                            new_logprobs=new_logprobs, prompt_logprobs=prompt_logprobs,
                            prompt_token_ids=r.prompt_token_ids if first else None)

    @staticmethod
    def _output(live: _Live) -> RequestOutput:
        r = live.request
        n_out = len(r.output_token_ids)
        ttft = None if r.first_token_time is None else r.first_token_time - r.arrival_time
        tpot = None
        if r.first_token_time is not None and r.finished_time is not None:
            tpot = (r.finished_time - r.first_token_time) / (n_out - 1) if n_out > 1 else 0.0
        queue = None if r.first_scheduled_time is None else r.first_scheduled_time - r.arrival_time
        # A stop string met by the token that also reached max_tokens still reads "stop"
        # (the text was cut), as in vLLM's output processor.
        reason = "stop" if live.detokenizer.stopped_at is not None else r.finish_reason
        params = r.sampling.params
        return RequestOutput(
            request_id=r.request_id, prompt=live.prompt, prompt_token_ids=r.prompt_token_ids,
            text=live.detokenizer.final_text, token_ids=list(r.output_token_ids),
            finish_reason=reason, adapter=live.adapter, error=r.error, queue_time=queue,
            ttft=ttft, tpot=tpot, num_preemptions=r.num_preemptions,
            num_cached_tokens=r.num_cached_tokens,
            logprobs=None if params.logprobs is None else list(r.output_logprobs),
            prompt_logprobs=None if params.prompt_logprobs is None else _prompt_logprobs(r))


def _prompt_logprobs(r: Request) -> list[TokenLogprobs | None]:
    """vLLM's layout: None for the first prompt token, then one entry per prompt token (fewer
    when the request ended before its prompt was computed)."""
    return [None, *r.prompt_logprobs]
