"""EngineCore: one step = schedule, load adapters, run the model, record the results."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch

from pagedlora.adapter_pages import AdapterPacker, AdapterPages, packed_pages
from pagedlora.adapter_store import AdapterStore, AdapterStoreStats
from pagedlora.config import EngineConfig
from pagedlora.errors import EngineDeadError
from pagedlora.merge_policy import MergePolicy, MergeStats
from pagedlora.merged_weights import MergedStats, MergedWeights
from pagedlora.model import LlamaModel
from pagedlora.model_files import load_weights
from pagedlora.model_runner import ModelRunner
from pagedlora.parallel.base_files import BaseFiles, BaseWeights
from pagedlora.parallel.executor import (
    NeverMerged,
    ShardedAdapterPages,
    TensorParallelExecutor,
)
from pagedlora.parallel.shard import Shard
from pagedlora.pool import UnifiedPool
from pagedlora.sampler import Sampler
from pagedlora.scheduler import (
    KVStats,
    PoolStats,
    Request,
    RunnerOutput,
    Scheduler,
    SchedulerOutput,
    SchedulerStats,
)
from pagedlora.spill import SpillDir
from pagedlora.step_input import StepInput


class Runner(Protocol):
    """What the core needs of its model runner: :class:`ModelRunner` in this process, or
    :class:`TensorParallelExecutor` over worker processes.

    Attributes:
        model: the model when it runs in this process, else None.
        sampler: the sampler that runs in this process (None: the tensor-parallel rank 0's).
        vocab_size: columns of the logits.
        kernel_backend: "torch" or "triton".
        merged: the merged weights of ``merge_policy="auto"``
            (:class:`~pagedlora.merged_weights.MergedWeights`; none under TP).
    """

    model: LlamaModel | None
    sampler: Sampler | None
    vocab_size: int
    kernel_backend: str
    merged: MergedWeights | NeverMerged

    def run(self, step: StepInput) -> RunnerOutput:
        """Runs one step; raises EngineDeadError when it never can again."""

    def close(self) -> None:
        """Releases what the runner holds (worker processes)."""


@dataclass(frozen=True)
class StepStats:
    """One step's figures.

    Attributes:
        batch_size: requests scheduled.
        num_tokens: tokens computed.
        num_adapters: distinct adapters of the step.
        num_preempted: requests preempted for it.
        merged: whether it ran on one adapter's merged weights (``merge_policy="auto"``).
        pages_free: pages on the free list after it.
        seconds: wall time of the step.
        scheduled: per scheduled request ``(request_id, num_computed_tokens before the step,
            num_new_tokens)``, in the scheduler's order.
    """

    batch_size: int
    num_tokens: int
    num_adapters: int
    num_preempted: int
    merged: bool
    pages_free: int
    seconds: float
    scheduled: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class EngineStats:
    """The core's accounting at one moment, each part made by its owner.

    Attributes:
        pool: page counts (the allocator's).
        kv: the KV cache's (the KV block manager's).
        scheduler: request counts and counters (the scheduler's).
        adapters: tiers and counters per adapter (the adapter store's; its per-name figures
            empty from ``stats(per_adapter=False)``, as in :attr:`EngineCore.peak`).
        queued: requests added but not yet handed to the scheduler (they join at the next
            step; ``requests_waiting`` counts them).
        merge: the merge policy's counters.
        merged: the merged weights' (merges, their seconds and bytes).
        page_numel: elements per page.
        page_bytes: bytes per page.
        block_size: tokens per KV block.
        adapter_names: content key -> its registered names, for the adapters of the running,
            waiting and queued requests.
        queued_adapters: adapter content key -> queued requests that use it.
    """

    pool: PoolStats
    kv: KVStats
    scheduler: SchedulerStats
    adapters: AdapterStoreStats
    queued: int
    merge: MergeStats
    merged: MergedStats
    page_numel: int
    page_bytes: int
    block_size: int
    adapter_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    queued_adapters: dict[str, int] = field(default_factory=dict)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool's pages that a new request cannot have (0..1): KV blocks held
        by requests and adapters pinned by them; free pages, cached KV blocks nobody holds
        and unpinned adapters are available (vLLM's ``1 - free blocks / blocks``, where its
        free queue also holds cached blocks). 0 for an empty pool."""
        p = self.pool
        if not p.num_pages:
            return 0.0
        available = p.free + p.reclaimable_kv + p.reclaimable_adapter
        return 1 - available / p.num_pages

    @property
    def running_adapters(self) -> dict[str, int]:
        """Adapter name -> running requests, by name (names sharing one adapter's weights
        share its pages and are all listed)."""
        return self._by_name(self.scheduler.running_adapters)

    @property
    def waiting_adapters(self) -> dict[str, int]:
        """Adapter name -> waiting requests (in the scheduler or queued for it), as
        :attr:`running_adapters`."""
        return self._by_name(Counter(self.scheduler.waiting_adapters) + Counter(
            self.queued_adapters))

    def _by_name(self, by_key: dict[str, int]) -> dict[str, int]:
        return {name: n for key, n in sorted(by_key.items())
                for name in self.adapter_names.get(key, ())}

    @property
    def internal_fragmentation(self) -> float:
        """Fraction of the elements of used pages that hold nothing (tails of partial KV
        blocks, of packed adapter groups, static slots' padding); 0 when no page is used."""
        allocated = (self.pool.kv + self.pool.adapter) * self.page_numel
        if not allocated:
            return 0.0
        kv_elems = self.kv.filled_slots * self.page_numel // self.block_size
        return 1 - (kv_elems + self.adapters.used_elements) / allocated


    def as_dict(self) -> dict:
        """Plain values: ``pages_total``; ``pages_kv`` (held by requests or cached);
        ``pages_kv_cached`` (cached blocks no request holds: reusable, reclaimed first when
        pages run short); ``pages_adapter``; ``pages_free``; ``page_bytes`` (of each rank's
        pool under tensor parallelism);
        ``internal_fragmentation`` (fraction of the elements of used pages that hold
        nothing); ``adapters_resident`` (names); ``requests_running``; ``requests_waiting``;
        ``running_adapters`` and ``waiting_adapters`` (adapter name -> requests);
        ``kv_cache_usage`` (:attr:`kv_cache_usage`); ``admissions_refused`` and
        ``preemptions`` (for lack of pages, since the start);
        ``prefix_cache`` (``hit_tokens``, ``queried_tokens``: prompt tokens served from the
        cache and looked up, since the start); ``adapters`` (per name: ``tier``,
        ``requests``, ``tokens``, ``loads_from_disk``, ``loads_from_source``,
        ``loads_from_host``, ``evictions``, ``last_used``: see ``AdapterUsage``); ``merge``
        (``merged_steps``, ``merges``, ``reuses``, ``unmerges``, ``switches``: see
        ``MergeStats``; ``merge_seconds``: time spent merging, unmerging being free;
        ``merged_bytes``: device memory the merged copies hold, outside the pool)."""
        return {
            "pages_total": self.pool.num_pages, "pages_kv": self.pool.kv,
            "pages_kv_cached": self.kv.cached_pages, "pages_adapter": self.pool.adapter,
            "pages_free": self.pool.free, "page_bytes": self.page_bytes,
            "internal_fragmentation": self.internal_fragmentation,
            "adapters_resident": list(self.adapters.resident),
            "requests_running": self.scheduler.requests_running,
            "requests_waiting": self.scheduler.requests_waiting + self.queued,
            "running_adapters": self.running_adapters,
            "waiting_adapters": self.waiting_adapters,
            "kv_cache_usage": self.kv_cache_usage,
            "admissions_refused": self.scheduler.admissions_refused,
            "preemptions": self.scheduler.preemptions,
            "prefix_cache": {"hit_tokens": self.kv.hit_tokens,
                             "queried_tokens": self.kv.queried_tokens},
            "adapters": {name: asdict(u) for name, u in self.adapters.adapters.items()},
            "merge": {**asdict(self.merge), "switches": self.merge.switches,
                      "merge_seconds": self.merged.seconds, "merged_bytes": self.merged.bytes},
        }

    def pool_dict(self) -> dict:
        """The pool part of :meth:`as_dict` (what ``stats()["peak"]`` holds)."""
        return {k: v for k, v in self.as_dict().items() if k.startswith("pages")
                or k in ("internal_fragmentation", "adapters_resident", "requests_running",
                         "requests_waiting")}


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one step changed.

    Attributes:
        requests: the requests that got a token or finished in the step (aborted and failed
            ones first), each once.
        stats: the step's figures; None when it scheduled nothing.
    """

    requests: tuple[Request, ...]
    stats: StepStats | None


class EngineCore:
    """Runs the engine's steps; owns the scheduler, the adapter store and the model runner.

    One step is one sentence (vLLM's ``EngineCore.step``: schedule, execute, update)::

        out = scheduler.schedule()                     # tokens per request, pages reserved
        load = adapters.load(out)                      # reserved adapters into their pages
        out = scheduler.drop_failed(out, load.failed)  # adapters that could not be had
        adapters.start_prefetch(out.upcoming_adapters) # disk -> host while the step runs
        merged = merging.decide(out's adapter keys)    # one adapter only: merged weights?
        inputs = StepInput.build(out, load.placements, merged=merged)
        result = runner.run(inputs)                    # forward pass and sampling
        updated = scheduler.update(out, result)        # tokens, stops, times, freed pages
        adapters.warm(out.upcoming_adapters)           # host -> free pool pages

    Requests and aborts from any thread are queued (:meth:`add_request`, :meth:`abort`) and
    join the scheduler at the start of the next step; :meth:`step` and :meth:`finish` belong to
    one thread at a time (the engine serializes them).

    Args:
        scheduler, adapters, runner: the parts, wired to one pool.
        pool: the unified pool.
        clock: seconds, monotonic; the scheduler's clock.
        merging: decides which steps run on merged weights (default: none).
    """

    HISTORY = 1024  # steps kept for stats

    def __init__(self, scheduler: Scheduler, adapters: AdapterStore, runner: Runner,
                 pool: UnifiedPool, clock: Callable[[], float] = time.perf_counter,
                 merging: MergePolicy | None = None) -> None:
        self.model = runner.model
        self.scheduler = scheduler
        self.adapters = adapters
        self.runner = runner
        self.pool = pool
        self.clock = clock
        self.merging = merging or MergePolicy()
        self._lock = threading.Lock()  # guards the two queues below
        self._new: list[Request] = []
        self._aborts: list[int] = []
        self._unforgotten: list[int] = []  # finished ids not yet in a step that returned
        self._steps: deque[StepStats] = deque(maxlen=self.HISTORY)
        self._num_steps = 0
        self._peak: EngineStats | None = None
        self.dead: str | None = None  # why the engine cannot run any more (its runner died)

    @classmethod
    def build(cls, config: EngineConfig, model_dir: Path, hf_config, *, max_model_len: int,
              sampler: Sampler | None = None) -> EngineCore:
        """The model (in this process, or split over ``config.tensor_parallel_size`` worker
        processes), its pool (``config.pool_gb`` per device, ``config.memory_layout``), the
        adapter store, the scheduler and the runner, wired together.

        Raises:
            ValueError: a CUDA device without CUDA, an unsupported model, a model that cannot
                be split over ``tensor_parallel_size`` ranks (naming the numbers), or a pool
                too small for one KV block (next to the adapter slots, in the static layout).
            RuntimeError: a tensor-parallel worker that cannot start (naming its rank).
        """
        dtype, device = getattr(torch, config.dtype), torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r}, but this torch build "
                             f"({torch.__version__}) sees no CUDA device; use device='cpu'")
        LlamaModel.check_config(hf_config)
        tp = config.tensor_parallel_size
        shard = Shard.of(hf_config, 0, tp)  # rank 0's geometry is every rank's
        page_numel = UnifiedPool.page_numel_for(config.block_size, shard.num_kv_heads,
                                                shard.head_dim)
        every_module = dict.fromkeys(itertools.product(range(shard.num_layers),
                                                       shard.module_shapes),
                                     config.max_lora_rank)
        static_slot_pages = packed_pages(every_module, shard.lora_widths, page_numel)
        pool = UnifiedPool.for_config(
            config, num_layers=shard.num_layers, num_kv_heads=shard.num_kv_heads,
            head_dim=shard.head_dim, static_slot_pages=static_slot_pages,
            device=device if tp == 1 else None)
        packer = AdapterPacker(pool, module_shapes=shard.lora_widths,  # rows must fit pages
                               scale_widths=shard.dora_widths)
        base: BaseWeights
        if tp == 1:
            model = LlamaModel(hf_config, load_weights(model_dir), dtype=dtype, device=device,
                               max_model_len=max_model_len,
                               kernel_backend=config.kernel_backend,
                               lora_shrink_in_base_after=config.lora_shrink_in_base_after)
            runner: Runner = ModelRunner(model, pool, sampler or Sampler(device))
            pages: AdapterPages = packer
            base = model
        else:
            base = BaseFiles(model_dir, hf_config, dtype)  # what registration reads of the base
            runner = TensorParallelExecutor.start(
                config, model_dir, num_pages=pool.num_pages,
                static_slot_pages=static_slot_pages, max_model_len=max_model_len,
                vocab_size=shard.vocab_size, sampler=sampler)
            pages = ShardedAdapterPages(packer, runner)
        scheduler_config = config.scheduler_config(max_model_len)
        adapters = AdapterStore(
            pool, num_layers=shard.num_layers, module_shapes=shard.lora_module_shapes,
            base_vocab=base.base_vocab,
            max_lora_rank=config.max_lora_rank, max_cpu_loras=config.max_cpu_loras,
            host_cache_bytes=None if config.host_cache_gb is None
            else int(config.host_cache_gb * 2**30), spill=SpillDir(config.spill_dir),
            keep_free_pages=scheduler_config.watermark_pages(pool.allocator, shard.num_layers),
            base_weight=base.base_weight, pages=pages)
        scheduler = Scheduler(scheduler_config, pages_per_block=shard.num_layers,
                              allocator=pool.allocator, adapters=adapters)
        return cls(scheduler, adapters, runner, pool, scheduler.clock,
                   MergePolicy(config.merge_policy))

    # -- any thread ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues ``request`` for the scheduler (it joins at the next step); its adapter hold
        is taken now, so its weights outlive a removal or re-add of the name meanwhile.

        Raises:
            EngineDeadError: the engine cannot run any more (see :meth:`check_alive`).
        """
        self.check_alive()
        self.scheduler.take_hold(request)
        with self._lock:
            self._new.append(request)

    def check_alive(self) -> None:
        """Raises EngineDeadError once the runner has died (a tensor-parallel worker died,
        failed or hung: see :meth:`step`), naming why."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def abort(self, request_id: int) -> None:
        """Asks for ``request_id`` to finish with "abort" at the next step."""
        with self._lock:
            self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        """Whether any request is queued, waiting or running."""
        with self._lock:
            queued = bool(self._new)
        return queued or self.scheduler.has_unfinished()

    # -- the stepping thread ---------------------------------------------------------------------

    def step(self) -> EngineCoreOutput:
        """Runs one step (see the class docstring).

        When the runner dies (a tensor-parallel worker died, failed or did not answer within
        ``worker_timeout_s``: ``EngineDeadError``), every request, queued, waiting or running,
        finishes with "error" and the runner's message (naming the rank) in this step's
        output, their pages freed; later calls raise EngineDeadError.

        Raises:
            RuntimeError: requests wait but none could be scheduled and none finished (a bug:
                requests that can never fit are failed when added).
            EngineDeadError: the engine died at an earlier step.
        """
        self.check_alive()
        started = time.perf_counter()
        self._take_queued()
        out = self.scheduler.schedule()
        try:
            load = self.adapters.load(out)
            out = self.scheduler.drop_failed(out, load.failed)
            self.adapters.start_prefetch(out.upcoming_adapters)
            merged = self.merging.decide([s.request.adapter_key for s in out.scheduled],
                                         lambda key: self.runner.merged.can_merge(
                                             load.placements[key]))
            inputs = StepInput.build(out, load.placements, self._finished_since_run(out),
                                     merged=merged)
            result = self.runner.run(inputs)
            updated = self.scheduler.update(out, result)
            self.adapters.warm(out.upcoming_adapters)
        except EngineDeadError as e:
            return self._die(str(e))
        # Every request the scheduler finished since the last step that returned (a step that
        # raised midway loses none), then those that got a token.
        return self._output(out, inputs, [*self.scheduler.take_finished(), *updated], started)

    def finish(self, request: Request, reason: str) -> None:
        """Ends ``request`` now (a stop string; an abort whose caller is gone), freeing its
        pages before the next step."""
        self.scheduler.finish(request, reason)

    def abort_now(self, request_ids: set[int]) -> None:
        """Aborts these requests now, queued ones included (their caller is gone)."""
        with self._lock:
            queued = [r for r in self._new if r.request_id in request_ids]
            self._new = [r for r in self._new if r.request_id not in request_ids]
        for request in queued:
            self.scheduler.finish(request, "abort")  # drops the hold add_request took
        for rid in request_ids:
            self.scheduler.abort(rid)

    def stats(self, per_adapter: bool = True) -> EngineStats:
        """The accounting now, composed of each part's own; without ``per_adapter`` the
        adapter store's per-name figures (``adapters.adapters``) are left empty."""
        with self._lock:
            queued = len(self._new)
            queued_adapters = dict(Counter(k for r in self._new for k in r.adapter_keys))
        scheduler = self.scheduler.stats()
        keys = {*scheduler.running_adapters, *scheduler.waiting_adapters, *queued_adapters}
        return EngineStats(
            pool=self.pool.allocator.stats(), kv=self.scheduler.kv.stats(self.scheduler.running),
            scheduler=scheduler, adapters=self.adapters.stats(per_adapter), queued=queued,
            merge=replace(self.merging.stats), merged=self.runner.merged.stats,
            page_numel=self.pool.page_numel,
            page_bytes=self.pool.page_bytes,
            block_size=self.pool.block_size,
            adapter_names={k: tuple(self.adapters.names_of(k)) for k in keys},
            queued_adapters=queued_adapters)

    def summary(self, history: bool = False) -> dict:
        """The stats ``Engine.stats()`` returns, as plain values (between two steps).

        Returns:
            :meth:`EngineStats.as_dict` (``pages_total``, ``pages_kv``, ``pages_kv_cached``,
            ``pages_adapter``, ``pages_free``, ``page_bytes``, ``internal_fragmentation``,
            ``adapters_resident``, ``requests_running``, ``requests_waiting``,
            ``admissions_refused``, ``preemptions``, ``prefix_cache``, ``adapters``), and
            ``num_steps`` (since the start), ``last_step`` (a :class:`StepStats` as a dict;
            None before the first step), ``peak`` (:meth:`EngineStats.pool_dict` at the step
            since :meth:`reset_peak` with the fewest free pages) and ``steps``: with
            ``history``, the last :attr:`HISTORY` steps as dicts, oldest first; without, only
            the last one (an empty list before the first step).
        """
        steps = list(self._steps)
        out = {**self.stats().as_dict(), "num_steps": self._num_steps,
               "last_step": asdict(steps[-1]) if steps else None,
               "peak": {} if self._peak is None else self._peak.pool_dict()}
        out["steps"] = [asdict(s) for s in (steps if history else steps[-1:])]
        return out

    @property
    def steps(self) -> list[StepStats]:
        """The last :attr:`HISTORY` steps, oldest first."""
        return list(self._steps)

    @property
    def num_steps(self) -> int:
        """Steps run since the start."""
        return self._num_steps

    def drop_merged(self) -> None:
        """Frees the merged copies of ``merge_policy="auto"`` (between two steps) and forgets
        the credit adapters earned toward a merge; the next single-adapter steps earn it
        again."""
        self.runner.merged.release()
        self.merging.forget()

    def reset_peak(self) -> EngineStats:
        """Starts a new peak watch (see :attr:`peak`) at the stats of now."""
        self._peak = self.stats(per_adapter=False)
        return self._peak

    @property
    def peak(self) -> EngineStats | None:
        """The stats at the step since :meth:`reset_peak` with the fewest free pages, without
        the per-adapter figures (:meth:`stats` ``per_adapter=False``; ``pool_dict`` holds
        none)."""
        return self._peak

    def close(self) -> None:
        """Stops the adapter prefetcher, removes a private spill directory and stops the
        runner's worker processes, if any. Idempotent."""
        self.adapters.close()
        self.runner.close()

    # -- internals -------------------------------------------------------------------------------

    def _finished_since_run(self, out: SchedulerOutput) -> tuple[int, ...]:
        """Requests finished since the last step that returned, for the runner to drop (a
        step that raised passes them on to the next)."""
        self._unforgotten.extend(out.finished_request_ids)
        return tuple(self._unforgotten)

    def _take_queued(self) -> None:
        """Hands queued requests to the scheduler and applies queued aborts (the next
        ``schedule()`` reports what they finished)."""
        with self._lock:
            new, self._new = self._new, []
            aborts, self._aborts = self._aborts, []
        for request in new:
            self.scheduler.add(request)
        for rid in aborts:
            self.scheduler.abort(rid)

    def _die(self, error: str) -> EngineCoreOutput:
        """Fails every request with ``error`` (the runner is gone); the engine is dead."""
        self.dead = error
        self._take_queued()
        for r in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish(r, "error", error=f"request {r.request_id}: {error}")
        self._unforgotten = []
        return EngineCoreOutput(_unique(self.scheduler.take_finished()), None)

    def _output(self, out: SchedulerOutput, inputs: StepInput, changed: list[Request],
                started: float) -> EngineCoreOutput:
        self._unforgotten = []
        if not out.scheduled:
            if not changed and self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress: no request fits the pool")
            return EngineCoreOutput(tuple(changed), None)
        stats = StepStats(
            batch_size=len(out.scheduled), num_tokens=out.num_batched_tokens,
            num_adapters=len(out.adapter_keys), num_preempted=len(out.preempted),
            merged=inputs.merged is not None, pages_free=self.pool.allocator.num_free,
            seconds=time.perf_counter() - started,
            scheduled=tuple((s.request_id, s.start, len(s.token_ids)) for s in inputs.sequences))
        self._steps.append(stats)
        self._num_steps += 1
        if self._peak is not None and stats.pages_free < self._peak.pool.free:
            # a new low of free pages comes with most steps that grow a KV block: the pool's
            # figures only (the per-adapter ones cost ~15 ms a step with 1,000 adapters)
            self._peak = self.stats(per_adapter=False)
        return EngineCoreOutput(_unique(changed), stats)


def _unique(requests: list[Request]) -> tuple[Request, ...]:
    """``requests`` without repeats, in order."""
    seen: set[int] = set()
    return tuple(r for r in requests if not (r.request_id in seen or seen.add(r.request_id)))
