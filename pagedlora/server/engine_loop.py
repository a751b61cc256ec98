"""EngineLoop: the one thread that steps an Engine for the HTTP server.

HTTP handlers run in asyncio, and the engine's ``step()`` blocks for a forward pass. So each
base model gets one thread that steps its engine: handlers post typed commands (start a
submission, cancel one, abort all, run a function between steps, stop) to a thread-safe queue,
and the thread hands each StreamOutput back to the handler's asyncio loop with
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
from dataclasses import dataclass, field
from functools import partial

from pagedlora.engine import Adapter, Engine, Prompt
from pagedlora.errors import AdapterMixError, InvalidPromptError, UnknownAdapterError
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

    def __repr__(self) -> str:
        return "ACCEPTED"


ACCEPTED = _Accepted()


@dataclass(eq=False)
class Submission:
    """One HTTP request's prompts, from the handler to the loop thread."""

    prompts: list[Prompt]
    adapters: list[Adapter]
    params: list[SamplingParams]
    # called in the loop thread with ACCEPTED, each StreamOutput, or an exception
    deliver: Callable[[object], None]
    request_ids: list[int] = field(default_factory=list)  # in prompt order
    cancelled: bool = False  # set by any thread; read by the loop thread


@dataclass(frozen=True)
class Start:
    """Queue the submission's prompts in the engine, all or none."""

    sub: Submission


@dataclass(frozen=True)
class Cancel:
    """Abort the submission's unfinished requests (its client went away)."""

    sub: Submission


@dataclass(frozen=True)
class AbortAll:
    """Abort every unfinished request (shutdown)."""


@dataclass(frozen=True)
class Call:
    """Run ``fn(engine)`` between two steps, its result or exception into ``future``."""

    fn: Callable[[Engine], object]
    future: Future


@dataclass(frozen=True)
class Stop:
    """End the loop: abort what runs, answer what is queued behind, return."""


Command = Start | Cancel | AbortAll | Call | Stop


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
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"engine-loop-{name}",
                                        daemon=True)
        self._lock = threading.Lock()  # guards _waiting and _closed
        self._waiting = 0  # accepted requests without a first output yet
        self._closed = False  # no more submissions (stopping, stopped or failed)
        self._aborted_at_stop = 0
        self.error: BaseException | None = None  # what a step raised; the loop then stopped
        # loop thread only: the submission of every unfinished request, and the requests
        # that have not produced an output yet
        self._live: dict[int, Submission] = {}
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
        with self._lock:  # posted under the lock: nothing submitted after Stop
            self._closed = True
            alive = self._thread.is_alive()
            if alive:
                self._commands.put(Stop())
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
        self._commands.put(AbortAll())

    def submit(self, prompts: Sequence[Prompt], adapters: Sequence[Adapter],
               params: Sequence[SamplingParams], deliver: Callable[[object], None]
               ) -> Submission:
        """Queues a submission for the loop thread. ``deliver`` is then called in that thread
        with ``ACCEPTED`` (or an exception: :class:`PromptRejected`, the engine's
        ``UnknownAdapterError`` or ``AdapterMixError``, :class:`LoopStopped`), then with each
        StreamOutput.

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
            sub = Submission(list(prompts), list(adapters), list(params), deliver)
            # under the lock, so that it is queued before stop()'s Stop or refused
            self._commands.put(Start(sub))
        return sub

    def cancel(self, sub: Submission) -> None:
        """Aborts the submission's unfinished requests (a client that went away); the engine
        frees their pages at its next step."""
        sub.cancelled = True
        self._commands.put(Cancel(sub))

    def call(self, fn: Callable[[Engine], object]) -> Future:
        """Runs ``fn(engine)`` in the loop thread between two steps (e.g. ``Engine.stats``,
        which must not race a step).

        Raises:
            LoopStopped: the loop is stopping or has failed.
        """
        fut: Future = Future()
        with self._lock:  # as submit: queued before Stop, or refused
            if self._closed:
                raise LoopStopped(self._stopped_reason())
            self._commands.put(Call(fn, fut))
        return fut

    async def add_adapter(self, name: str, path: str, preload: bool = False) -> None:
        """``Engine.add_adapter`` in a worker thread (fetching, reading and validating the
        weights), while the loop keeps stepping.

        Raises:
            AdapterError, UnsupportedAdapterError, OSError: as ``Engine.add_adapter``.
        """
        await asyncio.to_thread(self.engine.add_adapter, name, path, preload)

    async def remove_adapter(self, name: str) -> None:
        """``Engine.remove_adapter`` in a worker thread.

        Raises:
            ValueError: as ``Engine.remove_adapter`` (requests for it wait or run).
        """
        await asyncio.to_thread(self.engine.remove_adapter, name)

    async def open(self, prompts: Sequence[Prompt], adapters: Sequence[Adapter],
                   params: Sequence[SamplingParams]) -> Generation:
        """Submits the prompts and waits until the engine has queued them; the returned
        :class:`Generation` yields their StreamOutputs in the calling asyncio loop.

        Raises:
            QueueFull, LoopStopped: as :meth:`submit`.
            PromptRejected: as :meth:`submit`, or a prompt the engine failed at once (the
                others are aborted).
            UnknownAdapterError: an adapter the engine does not know (removed meanwhile).
            AdapterMixError: a mix the engine refuses (a DoRA adapter scaled or mixed).
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
                cmds = self._next_commands(block=not self.engine.has_unfinished())
                for i, cmd in enumerate(cmds):
                    if isinstance(cmd, Stop):
                        self._finish(cmds[i + 1:])
                        return
                    self._execute(cmd)
                if self.engine.has_unfinished():
                    self.engine.step()
                    # a dead tensor-parallel worker failed the requests with "error": stop, so
                    # that /health says so and new requests get 503 instead of an error each
                    self.engine.core.check_alive()
        except BaseException as e:  # noqa: BLE001 - fail every caller instead of hanging them
            log.exception("engine loop %r failed", self.name)
            self.error = e
            with self._lock:
                self._closed = True
            self._fail_all(LoopStopped(self._stopped_reason()))

    def _next_commands(self, block: bool) -> list[Command]:
        """Every queued command; waits for one when ``block``."""
        cmds = []
        try:
            cmds.append(self._commands.get(block=block))
            while True:
                cmds.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _execute(self, cmd: Command) -> None:
        if isinstance(cmd, Start):
            self._start(cmd.sub)
        elif isinstance(cmd, Cancel):
            for rid in cmd.sub.request_ids:
                self.engine.abort(rid)  # False (a no-op) for finished requests
        elif isinstance(cmd, AbortAll):
            self._abort_live()
        elif cmd.future.set_running_or_notify_cancel():
            try:
                cmd.future.set_result(cmd.fn(self.engine))
            except Exception as e:  # noqa: BLE001 - the caller gets it
                cmd.future.set_exception(e)

    def _start(self, sub: Submission) -> None:
        """Queues the submission's prompts, all or none (the engine outputs nothing before
        ``add_requests`` returns, so the ids are known when outputs come)."""
        n = len(sub.prompts)
        if sub.cancelled:
            self._release(n)
            return
        try:
            ids = self.engine.add_requests(sub.prompts, sub.adapters, sub.params,
                                           on_output=partial(self._route, sub))
        except InvalidPromptError as e:
            self._release(n)
            self._deliver(sub, PromptRejected(str(e)))
            return
        except (UnknownAdapterError, AdapterMixError) as e:  # removed since resolved; DoRA
            self._release(n)
            self._deliver(sub, e)
            return
        except (ValueError, TypeError) as e:  # a body the route let through: its client's
            self._release(n)
            self._deliver(sub, PromptRejected(str(e)))
            return
        sub.request_ids = ids
        self._unstarted.update(ids)
        self._live.update(dict.fromkeys(ids, sub))
        self._deliver(sub, ACCEPTED)

    def _route(self, sub: Submission, d: StreamOutput) -> None:
        """The engine's sink for ``sub``'s requests (``d.index`` is the prompt's position)."""
        self._account(d)
        if not sub.cancelled:
            self._deliver(sub, d)

    def _account(self, d: StreamOutput) -> None:
        if d.request_id in self._unstarted:
            self._unstarted.discard(d.request_id)
            self._release(1)
        if d.finished:
            self._live.pop(d.request_id, None)
            self._on_finished(d.output)

    def _deliver(self, sub: Submission, item: object) -> None:
        try:
            sub.deliver(item)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening
            if not sub.cancelled:
                sub.cancelled = True
                for rid in sub.request_ids:  # so they do not run on to max_tokens
                    self.engine.abort(rid)

    def _abort_live(self) -> int:
        for rid in self._live:
            self.engine.abort(rid)
        return len(self._live)

    def _finish(self, behind: list[Command]) -> None:
        """At stop: aborts every unfinished request and steps until the engine frees them;
        the commands fetched ``behind`` Stop, and any still queued, get LoopStopped."""
        self._aborted_at_stop = self._abort_live()
        while self.engine.has_unfinished():
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

    def _reject_queued(self, error: LoopStopped, fetched: Sequence[Command] = ()) -> None:
        """Answers ``fetched`` commands and those still queued (posted while the loop was
        closing) with ``error``."""
        for cmd in [*fetched, *self._next_commands(block=False)]:
            if isinstance(cmd, Start):
                self._deliver(cmd.sub, error)
            elif isinstance(cmd, Call):
                cmd.future.set_exception(error)


class Generation:
    """The StreamOutputs of one accepted submission, read in the asyncio loop that opened it
    (``async for d in generation``). Cancel it if its client goes away."""

    def __init__(self, loop: EngineLoop, sub: Submission, inbox: asyncio.Queue) -> None:
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

    async def next_batch(self) -> list[StreamOutput]:
        """Waits for the next StreamOutput and returns it with every one already delivered
        behind it (one message per step rather than per token, for callers that forward
        them: a Ray Serve replica).

        Raises:
            StopAsyncIteration: every request has finished.
            LoopStopped: as iteration.
        """
        batch = [await self.__anext__()]
        while self.remaining and not self._inbox.empty():
            batch.append(await self.__anext__())
        return batch

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
