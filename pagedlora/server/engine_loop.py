"""EngineLoop: the one thread that steps an Engine for the HTTP server.

HTTP handlers run in asyncio; the engine is not thread-safe and its ``step()`` blocks for a
forward pass. So each base model gets one thread that owns its engine: handlers post commands
(start a submission, cancel one, run a function between steps) to a thread-safe queue, and the
thread hands each StreamOutput back to the handler's asyncio loop with
``call_soon_threadsafe``. Requests from many HTTP clients thus join one running batch
(continuous batching across HTTP requests). The thread sleeps on the command queue while the
engine has nothing unfinished.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial

from pagedlora.engine import Engine, Prompt
from pagedlora.outputs import RequestOutput, StreamOutput
from pagedlora.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests would wait for their first token on this base model than ``max_queue``
    allows; the client should retry later (HTTP 503 with Retry-After)."""


class PromptRejected(ValueError):
    """The engine failed a prompt at once (empty, longer than ``max_model_len``, token ids
    outside the vocabulary, too large for the pool: the message is the engine's reason), or
    a request holds more prompts than ``max_queue`` (it could never be accepted)."""


class LoopStopped(RuntimeError):
    """The engine loop is not running: the server is shutting down, or a step raised (the
    message says which)."""


class _Accepted:
    """Delivered first when a submission is queued in the engine (its prompts are valid)."""


_ACCEPTED = _Accepted()
_STOP = object()  # the command that ends the loop


@dataclass(eq=False)
class _Submission:
    """One HTTP request's prompts, from the handler to the loop thread."""

    prompts: list[Prompt]
    adapters: list[str | None]
    params: list[SamplingParams]
    # called in the loop thread with _ACCEPTED, each StreamOutput, or an exception
    deliver: Callable[[object], None]
    request_ids: list[int] = field(default_factory=list)  # in prompt order
    starting: bool = False  # the loop thread is adding its requests to the engine
    cancelled: bool = False  # set by any thread; read by the loop thread


class EngineLoop:
    """Drives one :class:`~pagedlora.Engine` from a background thread for asyncio callers.

    Args:
        name: the base model's served name (thread name, log lines, errors).
        engine: the engine; after :meth:`start` only the loop thread touches it (except
            ``add_adapter``/``remove_adapter``, which the engine allows from any thread).
        max_queue: most requests that may wait for their first token at once (queued here or
            in the engine's scheduler); beyond it :meth:`open` raises :class:`QueueFull`.
        on_finished: called in the loop thread with every finished request's RequestOutput
            (also those whose client went away), e.g. to count them; must not raise.
    """

    def __init__(self, name: str, engine: Engine, max_queue: int,
                 on_finished: Callable[[RequestOutput], None]) -> None:
        self.name = name
        self.engine = engine
        self.max_queue = max_queue
        self._on_finished = on_finished
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"engine-loop-{name}",
                                        daemon=True)
        self._lock = threading.Lock()  # guards _waiting and _closed
        self._waiting = 0  # accepted requests without a first output yet
        self._closed = False  # no more submissions (stopping, stopped or failed)
        self._aborted_at_stop = 0
        self.error: BaseException | None = None  # what a step raised; the loop then stopped
        # loop thread only: the submission of every unfinished request, and the requests
        # that have not produced an output yet
        self._live: dict[int, _Submission] = {}
        self._unstarted: set[int] = set()

    # -- any thread ----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests accepted that have not produced their first output (the queue length)."""
        return self._waiting

    @property
    def alive(self) -> bool:
        """Whether the thread runs and accepts requests."""
        return self._thread.is_alive() and not self._closed

    def start(self) -> None:
        """Starts the thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stops accepting requests, aborts the unfinished ones (their pages are freed by the
        engine's next step), and joins the thread. Blocking: call it off the event loop.

        Returns:
            how many requests were aborted.
        """
        with self._lock:  # posted under the lock: nothing submitted after _STOP
            self._closed = True
            alive = self._thread.is_alive()
            if alive:
                self._commands.put(_STOP)
        if alive:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("engine loop %r did not stop within %.0f s", self.name, timeout_s)
        return self._aborted_at_stop

    def abort_all(self) -> None:
        """Stops accepting requests and aborts every unfinished one: each ends with
        finish_reason "abort" (its client gets a complete response) and the engine frees its
        pages at the next step. The thread keeps running until :meth:`stop`."""
        with self._lock:
            self._closed = True
        self._commands.put(("abort_all",))

    def submit(self, prompts: Sequence[Prompt], adapters: Sequence[str | None],
               params: Sequence[SamplingParams], deliver: Callable[[object], None]
               ) -> _Submission:
        """Queues a submission for the loop thread. ``deliver`` is then called in that thread
        with ``_ACCEPTED`` (or an exception: :class:`PromptRejected`, the engine's ValueError
        for an unknown adapter, :class:`LoopStopped`), then with each StreamOutput.

        Raises:
            QueueFull: the requests would exceed ``max_queue``.
            PromptRejected: more prompts than ``max_queue`` (they could never be accepted).
            LoopStopped: the loop is stopping or has failed.
        """
        n = len(prompts)
        if n > self.max_queue:
            raise PromptRejected(f"{n} prompts in one request; model {self.name!r} queues at "
                                 f"most {self.max_queue} (--max-queue)")
        with self._lock:
            if self._closed:
                raise LoopStopped(self._stopped_reason())
            if self._waiting + n > self.max_queue:
                raise QueueFull(f"model {self.name!r} has {self._waiting} requests waiting "
                                f"(at most {self.max_queue}); retry later")
            self._waiting += n
            sub = _Submission(list(prompts), list(adapters), list(params), deliver)
            # under the lock, so that it is queued before stop()'s _STOP or refused
            self._commands.put(("start", sub))
        return sub

    def cancel(self, sub: _Submission) -> None:
        """Aborts the submission's unfinished requests (a client that went away); the engine
        frees their pages at its next step."""
        sub.cancelled = True
        self._commands.put(("cancel", sub))

    def call(self, fn: Callable[[Engine], object]) -> Future:
        """Runs ``fn(engine)`` in the loop thread between two steps (e.g. ``Engine.stats``,
        which must not race a step).

        Raises:
            LoopStopped: the loop is stopping or has failed.
        """
        fut: Future = Future()
        with self._lock:  # as submit: queued before _STOP, or refused
            if self._closed:
                raise LoopStopped(self._stopped_reason())
            self._commands.put(("call", fn, fut))
        return fut

    async def open(self, prompts: Sequence[Prompt], adapters: Sequence[str | None],
                   params: Sequence[SamplingParams]) -> Generation:
        """Submits the prompts and waits until the engine has queued them; the returned
        :class:`Generation` yields their StreamOutputs in the calling asyncio loop.

        Raises:
            QueueFull, LoopStopped: as :meth:`submit`.
            PromptRejected: as :meth:`submit`, or a prompt the engine failed at once (the
                others are aborted).
            ValueError: an adapter the engine does not know (removed meanwhile).
        """
        aio = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        sub = self.submit(prompts, adapters, params,
                          lambda item: aio.call_soon_threadsafe(inbox.put_nowait, item))
        try:
            first = await inbox.get()
        except BaseException:  # the handler was cancelled: its client went away
            self.cancel(sub)
            raise
        if isinstance(first, BaseException):
            raise first
        return Generation(self, sub, inbox)

    def _stopped_reason(self) -> str:
        if self.error is not None:
            return f"the engine loop of model {self.name!r} failed: {self.error!r}"
        return f"model {self.name!r} is shutting down"

    def _release(self, n: int) -> None:
        with self._lock:
            self._waiting -= n

    # -- loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.scheduler.has_unfinished()
                cmds = self._next_commands(block=not busy)
                for i, cmd in enumerate(cmds):
                    if cmd is _STOP:
                        self._finish(cmds[i + 1:])
                        return
                    self._execute(cmd)
                if self.engine.scheduler.has_unfinished():
                    self.engine.step()
        except BaseException as e:  # noqa: BLE001 - fail every caller instead of hanging them
            log.exception("engine loop %r failed", self.name)
            self.error = e
            with self._lock:
                self._closed = True
            self._fail_all(LoopStopped(self._stopped_reason()))

    def _next_commands(self, block: bool) -> list:
        """Every queued command; waits for one when ``block``."""
        cmds = []
        try:
            cmds.append(self._commands.get(block=block))
            while True:
                cmds.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _execute(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "start":
            self._start(cmd[1])
        elif kind == "cancel":
            for rid in cmd[1].request_ids:
                self.engine.abort(rid)  # False (a no-op) for finished requests
        elif kind == "abort_all":
            self._abort_live()
        else:
            fn, fut = cmd[1], cmd[2]
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except Exception as e:  # noqa: BLE001 - the caller gets it
                    fut.set_exception(e)

    def _start(self, sub: _Submission) -> None:
        n = len(sub.prompts)
        if sub.cancelled:
            self._release(n)
            return
        early: list[StreamOutput] = []  # outputs made within add_request: failed prompts
        error = None
        sub.starting = True
        try:
            for i, (prompt, adapter, params) in enumerate(zip(sub.prompts, sub.adapters,
                                                              sub.params, strict=True)):
                sub.request_ids.append(self.engine.add_request(
                    prompt, adapter, params, on_output=partial(self._route, sub, i, early)))
        except (ValueError, TypeError) as e:  # an unknown adapter (removed meanwhile)
            error = e
        finally:
            sub.starting = False
        ids = sub.request_ids
        self._release(n - len(ids))  # prompts never added
        self._unstarted.update(ids)
        self._live.update(dict.fromkeys(ids, sub))
        for d in early:
            self._account(d)
        if error is None and not early:
            self._deliver(sub, _ACCEPTED)
            return
        for rid in ids:  # the whole HTTP request fails: the rest of it is aborted
            self.engine.abort(rid)
        sub.cancelled = True
        self._deliver(sub, error or PromptRejected(early[0].output.error))

    def _route(self, sub: _Submission, index: int, early: list[StreamOutput],
               d: StreamOutput) -> None:
        """The engine's callback for the ``index``-th prompt of ``sub``: accounts for ``d``
        and hands it to the handler with that index, or keeps it in ``early`` while
        ``add_request`` runs (its request id is not known yet)."""
        if sub.starting:
            early.append(d)
            return
        self._account(d)
        if not sub.cancelled:
            self._deliver(sub, replace(d, index=index))

    def _account(self, d: StreamOutput) -> None:
        if d.request_id in self._unstarted:
            self._unstarted.discard(d.request_id)
            self._release(1)
        if d.finished:
            self._live.pop(d.request_id, None)
            self._on_finished(d.output)

    def _deliver(self, sub: _Submission, item: object) -> None:
        try:
            sub.deliver(item)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening
            sub.cancelled = True

    def _abort_live(self) -> int:
        for rid in self._live:
            self.engine.abort(rid)
        return len(self._live)

    def _finish(self, behind: list) -> None:
        """At stop: aborts every unfinished request and steps until the engine frees them;
        the commands fetched ``behind`` _STOP, and any still queued, get LoopStopped."""
        self._aborted_at_stop = self._abort_live()
        while self.engine.scheduler.has_unfinished():
            self.engine.step()
        self._reject_queued(LoopStopped(self._stopped_reason()), behind)
        log.info("engine loop %r stopped; %d unfinished request(s) aborted", self.name,
                 self._aborted_at_stop)

    def _fail_all(self, error: LoopStopped) -> None:
        """After a failed step: every caller gets ``error``, nobody waits forever."""
        for sub in {id(s): s for s in self._live.values()}.values():
            self._deliver(sub, error)
        self._live.clear()
        self._reject_queued(error)

    def _reject_queued(self, error: LoopStopped, fetched: list = ()) -> None:
        """Answers ``fetched`` commands and those still queued (posted while the loop was
        closing) with ``error``."""
        for cmd in [*fetched, *self._next_commands(block=False)]:
            if cmd is not _STOP and cmd[0] == "start":
                self._deliver(cmd[1], error)
            elif cmd is not _STOP and cmd[0] == "call":
                cmd[2].set_exception(error)


class Generation:
    """The StreamOutputs of one accepted submission, read in the asyncio loop that opened it
    (``async for d in generation``). Cancel it if its client goes away."""

    def __init__(self, loop: EngineLoop, sub: _Submission, inbox: asyncio.Queue) -> None:
        self._loop = loop
        self._sub = sub
        self._inbox = inbox
        self.remaining = len(sub.prompts)  # requests not finished yet

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> StreamOutput:
        if not self.remaining:
            raise StopAsyncIteration
        item = await self._inbox.get()
        if isinstance(item, BaseException):  # LoopStopped
            self.remaining = 0
            raise item
        self.remaining -= item.finished
        return item

    async def outputs(self) -> list[RequestOutput]:
        """Waits for every request; their RequestOutputs in prompt order."""
        done: dict[int, RequestOutput] = {}
        async for d in self:
            if d.finished:
                done[d.index] = d.output
        return [done[i] for i in range(len(done))]

    def cancel(self) -> None:
        """Aborts the requests still unfinished (no-op when none are)."""
        if self.remaining:
            self.remaining = 0
            self._loop.cancel(self._sub)
