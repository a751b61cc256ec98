"""ReplicaClient: the ingress's stand-in for an EngineLoop, sending each submission to the
replicas of one base model through a Ray Serve handle, so that the routes of ``pagedlora
serve`` (and their errors) serve Ray Serve replicas unchanged.

A submission is split by adapter (one replica call per distinct adapter, with that adapter as
Ray Serve's multiplexed model id when routing by adapter); the calls' StreamOutputs are merged
back in prompt order. Errors map as in ``pagedlora serve``: a full queue (the replica's, or Ray's
``max_queued_requests``) is QueueFull (503 with Retry-After), a refused prompt PromptRejected
(400), an adapter that cannot be loaded AdapterError.

A replica that dies: a call that has produced no token yet is sent again once, to whichever
replica Ray's router picks (the client has seen nothing of it); one that has produced tokens
ends with LoopStopped naming the replica (a 503, or an error event in a stream), its other
calls are cancelled, and nothing is silently lost. Other submissions are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from pagedlora.errors import AdapterMixError, UnknownAdapterError
from pagedlora.outputs import RequestOutput, StreamOutput
from pagedlora.ray_serve.messages import (
    Accepted,
    AdapterRef,
    Done,
    ModelInfo,
    Refused,
    ReplicaReport,
    Work,
)
from pagedlora.sampling_params import SamplingParams
from pagedlora.server.engine_loop import LoopStopped, QueueFull

log = logging.getLogger(__name__)

REPLICA_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)


class ReplicaClient:
    """The replicas of base model ``name`` behind ``handle`` (an ``EngineReplica``
    deployment), with EngineLoop's interface for :class:`~pagedlora.server.registry.ModelRegistry`
    and the routes.

    Args:
        name: the base model's served name.
        handle: the deployment's handle.
        info: the model's tokenizer, max_model_len, engine config (``engine`` below).
        by_adapter: route by adapter (Ray Serve's multiplexed model id) or not.
        on_finished: called with every finished request's RequestOutput (as EngineLoop's),
            e.g. to count it; must not raise.
    """

    alive = True  # Ray Serve restarts replicas; the ingress itself never stops serving
    error = None
    num_waiting = 0  # each replica's engine has its own queue

    def __init__(self, name: str, handle: DeploymentHandle, info: ModelInfo,
                 by_adapter: bool, on_finished: Callable[[RequestOutput], None]) -> None:
        self.name = name
        self.on_finished = on_finished
        self.engine = info  # what the routes read of an engine: tokenizer, max_model_len
        self._handle = handle
        self._by_adapter = by_adapter
        self.adapters: dict[str, AdapterRef] = {}  # by name: what every call carries
        self._in_flight: Counter[str] = Counter()  # adapter name -> unfinished calls
        self.reports: dict[str, ReplicaReport] = {}  # replica id -> its latest report
        self.retries = 0  # calls sent again after their replica died

    # -- EngineLoop's interface ----------------------------------------------------------------

    def start(self) -> None:
        """Nothing to start: Ray Serve runs the replicas."""

    def stop(self, timeout_s: float = 30.0) -> int:
        """Nothing to stop here: Ray Serve drains and stops the replicas."""
        return 0

    def abort_all(self) -> None:
        """Ray Serve's own shutdown drains the replicas."""

    def call(self, fn):
        """Not available: each replica's engine runs elsewhere (its stats come back with its
        calls, :attr:`reports`).

        Raises:
            LoopStopped: always (``/metrics`` then leaves out the engine gauges).
        """
        raise LoopStopped(f"model {self.name!r} is served by Ray Serve replicas; their stats "
                          f"are at /replicas")

    async def add_adapter(self, name: str, path: str, preload: bool = False) -> None:
        """Validates the adapter on one replica (which registers it) and records it; every
        replica registers it on its first call for it.

        Raises:
            AdapterError: the replica's reason it cannot be served.
        """
        (ref,) = await self.register(path, name, preload)
        self.adapters[name] = ref

    async def register(self, path: str, name: str | None, preload: bool = False
                       ) -> list[AdapterRef]:
        """Registers one adapter, or a folder of them (``name`` None), on one replica, and
        records them.

        Raises:
            AdapterError: as :meth:`add_adapter`.
        """
        refs = await self._handle.register.remote(str(path), name, preload)
        if isinstance(refs, Refused):
            raise refs.error()
        self.adapters.update({r.name: r for r in refs})
        return refs

    async def remove_adapter(self, name: str) -> None:
        """Forgets the adapter: no call carries it any more (replicas keep it registered,
        cold, and a replica given the name again with other weights registers those).

        Raises:
            ValueError: calls for it are unfinished (HTTP 409).
        """
        if self._in_flight[name]:
            raise ValueError(f"adapter {name!r} has {self._in_flight[name]} unfinished "
                             f"request(s); unload it when they are done")
        self.adapters.pop(name, None)

    async def open(self, prompts: Sequence, adapters: Sequence[str | None],
                   params: Sequence[SamplingParams]) -> RemoteGeneration:
        """Sends the prompts to the replicas (one call per distinct adapter) and waits until
        every call is accepted; all or none.

        Raises:
            QueueFull, PromptRejected, UnknownAdapterError, AdapterError, LoopStopped: as
                ``EngineLoop.open`` (the accepted calls are then cancelled).
            AdapterMixError: an ``AdapterMix`` (replicas are routed by one adapter name; a
                mix is served by ``pagedlora serve`` without Ray).
        """
        mixed = [a for a in adapters if a is not None and not isinstance(a, str)]
        if mixed:
            raise AdapterMixError(f"{mixed[0]!r}: adapter mixes are not served through Ray "
                                  f"Serve replicas (they are routed by one adapter name); "
                                  f"serve them with 'pagedlora serve'")
        groups: dict[str | None, list[int]] = {}
        for i, a in enumerate(adapters):
            groups.setdefault(a, []).append(i)
        calls = []
        for adapter, indices in groups.items():
            if adapter is not None and adapter not in self.adapters:
                raise UnknownAdapterError(f"adapter {adapter!r} is not loaded")
            ref = None if adapter is None else self.adapters[adapter]
            work = Work([prompts[i] for i in indices], ref, [params[i] for i in indices])
            calls.append(_Call(self, work, indices))
        started = await asyncio.gather(*(c.start() for c in calls), return_exceptions=True)
        failed = [e for e in started if isinstance(e, BaseException)]
        if failed:
            for c in calls:
                c.cancel()
            raise failed[0]
        return RemoteGeneration(calls, len(prompts))

    # -- internals -----------------------------------------------------------------------------

    def _send(self, work: Work):
        """One streaming call to a replica, routed by ``work``'s adapter when routing by
        adapter."""
        options = {"stream": True}
        if self._by_adapter and work.adapter is not None:
            options["multiplexed_model_id"] = work.adapter.name
        return self._handle.options(**options).generate.remote(work)

    def _report(self, report: ReplicaReport) -> None:
        old = self.reports.get(report.replica)
        adapters = {**(old.adapters if old is not None else {}), **report.adapters}
        self.reports[report.replica] = replace(report, adapters=adapters)


class _Call:
    """One replica call of a submission: its prompts' positions ``indices`` in the
    submission, and the retry-once rule of the module docstring."""

    def __init__(self, client: ReplicaClient, work: Work, indices: list[int]) -> None:
        self.client = client
        self.work = work
        self.indices = indices
        self.replica: str | None = None
        self._stream = None
        self._sent_again = False
        self._streamed = False  # a token has reached the ingress
        self._adapter = None if work.adapter is None else work.adapter.name
        if self._adapter is not None:
            client._in_flight[self._adapter] += 1
        self._counted = self._adapter is not None

    async def start(self) -> None:
        """Sends the call and waits for Accepted (sending it again once if the replica
        dies first).

        Raises:
            as ``ReplicaClient.open``.
        """
        while True:
            self._stream = self.client._send(self.work)
            try:
                first = await self._stream.__anext__()
            except BackPressureError as e:
                self._release()
                raise QueueFull(f"model {self.client.name!r}: every replica is busy and "
                                f"Ray Serve's queue is full ({e}); retry later") from None
            except REPLICA_DIED as e:
                if self._again(e):
                    continue
                raise LoopStopped(self._died(e)) from None
            except BaseException:
                self._release()
                raise
            if isinstance(first, Refused):
                self._release()
                raise first.error()
            assert isinstance(first, Accepted), first
            self.replica = first.replica
            return

    async def pump(self, inbox: asyncio.Queue) -> None:
        """Puts the call's StreamOutputs (indices of the submission) into ``inbox``, then
        None; or a LoopStopped."""
        try:
            while True:
                try:
                    msg = await self._stream.__anext__()
                except StopAsyncIteration:
                    break
                except REPLICA_DIED as e:
                    if not self._streamed and self._again(e):
                        await self.start()
                        continue
                    raise LoopStopped(self._died(e)) from None
                if isinstance(msg, Done):
                    self.client._report(msg.report)
                elif isinstance(msg, Refused):
                    raise msg.error()
                else:
                    for d in msg:
                        self._streamed = self._streamed or bool(d.new_token_ids)
                        if d.finished:
                            self.client.on_finished(d.output)
                        inbox.put_nowait(replace(d, index=self.indices[d.index]))
            inbox.put_nowait(None)
        except Exception as e:  # noqa: BLE001 - the submission's reader gets it
            inbox.put_nowait(e)
        finally:
            self._release()

    def cancel(self) -> None:
        """Cancels the call (its replica aborts its requests)."""
        if self._stream is not None:
            self._stream.cancel()
        self._release()

    def _again(self, error: BaseException) -> bool:
        """Whether to send the call again after its replica died (once)."""
        if self._sent_again:
            return False
        self._sent_again = True
        self.client.retries += 1
        log.warning("model %r: replica %s died before answering (%s); sending the call again",
                    self.client.name, self.replica, type(error).__name__)
        return True

    def _died(self, error: BaseException) -> str:
        if self.replica is not None:
            self.client.reports.pop(self.replica, None)
        return (f"replica {self.replica or '(unknown)'} of model {self.client.name!r} died "
                f"while serving the request: {type(error).__name__}")

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.client._in_flight[self._adapter] -= 1


class RemoteGeneration:
    """The StreamOutputs of one submission's calls, merged (``index`` = the prompt's position
    in the submission), with :class:`~pagedlora.server.engine_loop.Generation`'s interface."""

    def __init__(self, calls: list[_Call], num_prompts: int) -> None:
        self._calls = calls
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.ensure_future(c.pump(self._inbox)) for c in calls]
        self._open = len(calls)
        self.remaining = num_prompts

    def __aiter__(self) -> RemoteGeneration:
        return self

    async def __anext__(self) -> StreamOutput:
        while self.remaining:
            item = await self._inbox.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                self.cancel()
                raise item
            self.remaining -= item.finished
            return item
        raise StopAsyncIteration

    async def outputs(self):
        """Waits for every request; their RequestOutputs in prompt order."""
        done = {}
        async for d in self:
            if d.finished:
                done[d.index] = d.output
        return [done[i] for i in range(len(done))]

    def cancel(self) -> None:
        """Cancels the calls still running (no-op when every request has finished: the
        calls then only deliver their replicas' reports)."""
        if not self.remaining:
            return
        self.remaining = 0
        for task, call in zip(self._tasks, self._calls, strict=True):
            if not task.done():
                task.cancel()
                call.cancel()
