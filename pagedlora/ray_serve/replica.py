"""EngineReplica: one base model's Engine in a Ray Serve replica, driven by the same
EngineLoop thread as ``pagedlora serve``, serving the ingress's calls.

A call (:class:`~pagedlora.ray_serve.messages.Work`) names its adapter by an
:class:`~pagedlora.ray_serve.messages.AdapterRef`, so a replica needs no registry of its own:
one started by the autoscaler, or restarted by Ray after a crash, registers each adapter on its
first call for it. With adapter routing the ingress sets Ray Serve's multiplexed model id to
the adapter's name, and registration goes through ``@serve.multiplexed``, so the replica
reports the adapters it holds to Ray's router (as Ray Serve LLM does for LoRA), least recently
used first out beyond ``max_num_models_per_replica``. An adapter out of that set stays
registered in the engine (its weights move down the engine's own tiers, pool -> host -> disk),
so a later call only costs a tier load, not a fresh read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

import torch
from ray import serve

from pagedlora.engine import Engine
from pagedlora.errors import AdapterError, UnknownAdapterError, UnsupportedAdapterError
from pagedlora.ray_serve.messages import (
    Accepted,
    AdapterRef,
    Done,
    ModelInfo,
    Refused,
    ReplicaReport,
    Work,
)
from pagedlora.server.engine_loop import EngineLoop, LoopStopped, PromptRejected, QueueFull

log = logging.getLogger(__name__)

_LOADS = ("loads_from_source", "loads_from_disk", "loads_from_host")


class EngineReplica:
    """The engine of base model ``model`` (see the module docstring).

    Args:
        model: the base model's served name.
        path: as ``Engine``'s ``model`` (a directory, ``.gguf``, ``s3://`` URL, cached id;
            None: the embedded default).
        pool_gb: GiB of unified pool.
        engine_options: the other EngineConfig fields.
        max_queue: most requests waiting for their first token (``EngineLoop``).
        max_adapters: ``max_num_models_per_replica`` (-1: no limit).
        threads: torch intra-op threads (the replica's share of cores).

    Raises:
        as ``Engine`` (Ray Serve then reports the deployment unhealthy).
    """

    def __init__(self, model: str, path: str | None, pool_gb: float, engine_options: dict,
                 max_queue: int, max_adapters: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = model
        self.engine = Engine(path, pool_gb=pool_gb, **engine_options)
        self.loop = EngineLoop(model, self.engine, max_queue, on_finished=lambda out: None)
        self.loop.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._registered: dict[str, str] = {}  # adapter name -> content key, as registered
        self._lock = asyncio.Lock()  # one registration at a time
        self._wanted: dict[str, AdapterRef] = {}  # what the multiplexed loader registers

        async def load(name: str) -> str:  # a function: Ray keeps its LRU cache on it
            await self._register_ref(self._wanted[name])
            return name

        self._advertise = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)

    # -- calls from the ingress ----------------------------------------------------------------

    def describe(self) -> ModelInfo:
        """The base model's tokenizer, vocabulary size, max_model_len and engine options."""
        return ModelInfo(self.engine.tokenizer, self.engine.processor.vocab_size,
                         self.engine.max_model_len, self.engine.config)

    async def register(self, path: str, name: str | None, preload: bool = False
                       ) -> list[AdapterRef] | Refused:
        """Registers the adapter at ``path`` as ``name``, or with ``name`` None every adapter
        of the folder ``path`` under its folder's name (``Engine.add_adapters_from_dir``):
        the ingress's validation of an adapter before it serves it anywhere.

        Returns:
            their references, or Refused("invalid_adapter") with the engine's reason.
        """
        try:
            async with self._lock:
                if name is None:
                    added = await asyncio.to_thread(self.engine.add_adapters_from_dir, path,
                                                    preload)
                else:
                    added = [await asyncio.to_thread(self.engine.add_adapter, name, path,
                                                     preload)]
                refs = [AdapterRef(a.name, str(path if name is not None else a.path), a.key,
                                   preload) for a in added]
                self._registered.update({r.name: r.key for r in refs})
        except (AdapterError, UnsupportedAdapterError, OSError) as e:
            return Refused.of(AdapterError(str(e)))
        return refs

    async def generate(self, work: Work) -> AsyncIterator[object]:
        """Serves one call (a streaming method): Accepted, then lists of StreamOutputs (one
        per engine step), then Done with this replica's report; or one Refused. If the caller
        goes away (Ray cancels this generator), its requests are aborted."""
        ref = work.adapter
        if ref is not None:
            refused = await self._ensure(ref)
            if refused is not None:
                yield refused
                return
        names = [None if ref is None else ref.name] * len(work.prompts)
        try:
            gen = await self.loop.open(work.prompts, names, work.params)
        except (QueueFull, PromptRejected, UnknownAdapterError, LoopStopped) as e:
            yield Refused.of(e)
            return
        yield Accepted(self.replica)
        try:
            while gen.remaining:
                yield await gen.next_batch()
        except LoopStopped as e:
            yield Refused.of(e)
            return
        finally:
            gen.cancel()
        yield Done(await self._report(ref))

    async def stats(self) -> ReplicaReport:
        """This replica's report now (no adapter's details)."""
        return await self._report(None)

    def check_health(self) -> None:
        """Ray Serve's health check: raises (and Ray restarts the replica) once the engine
        loop has stopped or failed."""
        if not self.loop.alive:
            raise RuntimeError(f"the engine loop of {self.model!r} is not running: "
                               f"{self.loop.error!r}")

    def __del__(self) -> None:
        """Ray Serve stops a replica (scale-down, redeploy) only after its ongoing calls end,
        within the graceful shutdown timeout; then the loop stops."""
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()
            self.engine.close()

    # -- internals -----------------------------------------------------------------------------

    async def _ensure(self, ref: AdapterRef) -> Refused | None:
        """Registers ``ref`` unless the engine has its name with its content already; with a
        multiplexed id, through ``@serve.multiplexed`` (which reports it to the router)."""
        try:
            if serve.get_multiplexed_model_id():
                self._wanted[ref.name] = ref
                await self._advertise(ref.name)
            await self._register_ref(ref)  # no-op unless the name's content changed
        except (AdapterError, UnsupportedAdapterError, OSError) as e:
            return Refused.of(AdapterError(f"adapter {ref.name!r} cannot be loaded on replica "
                                           f"{self.replica}: {e}"))
        return None

    async def _register_ref(self, ref: AdapterRef) -> None:
        if self._registered.get(ref.name) == ref.key:
            return
        async with self._lock:
            if self._registered.get(ref.name) == ref.key:
                return
            added = await asyncio.to_thread(self.engine.add_adapter, ref.name, ref.source,
                                            ref.preload)
            if added.key != ref.key:  # its source was rewritten since the ingress read it
                raise AdapterError(f"adapter {ref.name!r}: {ref.source} now holds other "
                                   f"weights (content key {added.key}, loaded as {ref.key})")
            self._registered[ref.name] = ref.key
            log.info("replica %s: adapter %r registered from %s", self.replica, ref.name,
                     ref.source)

    async def _report(self, ref: AdapterRef | None) -> ReplicaReport:
        stats = await asyncio.wrap_future(self.loop.call(Engine.stats))  # between two steps
        usage = stats["adapters"]
        return ReplicaReport(
            replica=self.replica, model=self.model, pid=os.getpid(),
            requests_running=stats["requests_running"],
            requests_waiting=stats["requests_waiting"], adapters_registered=len(usage),
            loads={k.removeprefix("loads_"): sum(u[k] for u in usage.values()) for k in _LOADS},
            adapters={} if ref is None or ref.name not in usage else {ref.name: usage[ref.name]})
