"""AdapterStore: adapters by name, and their content in three tiers: pool pages, host memory, disk.

Tiers, fastest first (S-LoRA, section 4: adapters live in host memory and are fetched into the
device pool when a batch needs them; vLLM's and SageMaker LMI's ``max_cpu_loras`` bounds the
host tier, the rest is "evicted to disk"):

- pool: the adapter's rows in unified-pool pages. Pinned while a running or admitted request
  uses it; otherwise offered to the page allocator as reclaimable, which frees the least
  recently unpinned first when an allocation finds the free list short.
- host: its weights in host memory, bounded by ``max_cpu_loras`` adapters and
  ``host_cache_bytes``; least recently used leave first. A pool-resident adapter need not stay
  on host (the budget counts only what host memory holds).
- disk: a safetensors copy in the spill directory, written when it leaves host memory.
- source: its PEFT directory, read at registration (to validate and hash) and again only when
  no other tier has it. Never modified.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pagedlora.adapter_pages import (
    AdapterFootprint,
    AdapterPacker,
    AdapterPages,
    ResidentAdapter,
    ResidentModule,
)
from pagedlora.errors import AdapterError, AdapterUnavailableError, UnknownAdapterError
from pagedlora.host_cache import HostCache
from pagedlora.lora_adapter import (
    AdapterWeights,
    BaseVocab,
    BaseWeight,
    LoraAdapter,
    read_lora_adapter,
)
from pagedlora.pool import UnifiedPool
from pagedlora.prefetcher import Prefetcher
from pagedlora.scheduler import ADAPTER, SchedulerOutput
from pagedlora.shared_pages import SharedPages
from pagedlora.spill import SpillDir

log = logging.getLogger(__name__)

__all__ = ["AdapterLoad", "AdapterStats", "AdapterStore", "AdapterStoreStats", "AdapterUsage",
           "ResidentAdapter", "ResidentModule"]


@dataclass
class AdapterStats:
    """Counters of one content key (names sharing the content share them).

    Attributes:
        requests: requests scheduled with it (counted at their first step; a mix's requests
            count for each of its adapters).
        tokens: tokens computed with it (prompt, output, and recomputation after preemption).
        loads_from_disk: weights read from the spill directory into host memory.
        loads_from_source: weights re-read from the source directory after registration.
        loads_from_host: copies into the pool (host -> pool).
        evictions: times it left the pool or host memory.
        last_used: ``time.time()`` of its last scheduled step, None before.
    """

    requests: int = 0
    tokens: int = 0
    loads_from_disk: int = 0
    loads_from_source: int = 0
    loads_from_host: int = 0
    evictions: int = 0
    last_used: float | None = None


@dataclass(frozen=True)
class AdapterUsage:
    """One adapter name's tier and counters at one moment (names sharing content share the
    counters); the fields of :class:`AdapterStats`, and ``tier``: "pool", "host", "disk" or
    "source", the fastest tier holding it."""

    tier: str
    requests: int
    tokens: int
    loads_from_disk: int
    loads_from_source: int
    loads_from_host: int
    evictions: int
    last_used: float | None


@dataclass(frozen=True)
class AdapterStoreStats:
    """The store's accounting (see :meth:`AdapterStore.stats`).

    Attributes:
        adapters: per registered name, sorted by name (empty from ``stats(per_name=False)``).
        resident: names of the adapters in the pool, sorted.
        used_elements: pool elements holding adapter weights (the rest of the adapters' pages
            is internal fragmentation: gaps between packed rows, free room in the shared tail
            pages, or a static slot's padding).
    """

    adapters: dict[str, AdapterUsage]
    resident: list[str]
    used_elements: int


@dataclass(frozen=True)
class AdapterLoad:
    """What :meth:`AdapterStore.load` made of one step's adapters.

    Attributes:
        placements: adapter key -> its rows in the pool, for every adapter of the step that
            is resident now (the model runner reads them through these page tables).
        failed: adapter key -> why its weights could not be had (its requests fail alone;
            ``Scheduler.drop_failed``).
    """

    placements: dict[str, ResidentAdapter]
    failed: dict[str, str]


@dataclass
class _Content:
    """A registered content key: its description (from the first name added with it), the
    pages it takes in the pool, and its counters."""

    adapter: LoraAdapter
    footprint: AdapterFootprint
    stats: AdapterStats = field(default_factory=AdapterStats)


class AdapterStore:
    """Owns the adapters: name -> content key, the three tiers, pins, and counters.

    Pages are packed by :class:`AdapterPacker` (rank-proportional, S-LoRA section 4.1; in the
    static layout each adapter takes one max-rank slot). Page accounting belongs to the
    allocator: the scheduler's :meth:`pin` reserves a missing adapter's pages (no I/O), the
    engine core's :meth:`load` then fills them before the step runs; an unpinned resident
    adapter is offered to the allocator as reclaimable (unit ``("adapter", key)``). The rows
    of an adapter's partly used last page go to pages adapters share (:class:`SharedPages`,
    placed when its pages are reserved), so a small adapter does not waste most of a page.

    Thread safety: one re-entrant lock guards the registry and every tier, so ``add``/``remove``
    (and ``prefetch``) may run in other threads while the engine steps. Reading and hashing a
    source happens outside the lock; a name appears, with all its state, in one locked step.
    The pool is written by the engine's thread only (:meth:`load`, :meth:`warm`).

    Args:
        pool: the unified pool (its allocator is shared with the scheduler).
        num_layers: decoder layers of the model.
        module_shapes: ``module -> (in_features, out_features)``.
        max_lora_rank: largest rank accepted.
        max_cpu_loras: most adapters in host memory; None for no limit.
        host_cache_bytes: most bytes of adapter weights in host memory; None for no limit.
        spill: the disk tier.
        keep_free_pages: pages :meth:`warm` leaves free (the scheduler's watermark), so warming
            never takes what running requests may grow into.
        pages: where adapters go in the pool; None: an :class:`AdapterPacker` writing into
            ``pool`` (a tensor-parallel engine passes its workers').
        base_vocab: the model's vocabulary weights, for adapters on embed_tokens/lm_head
            (see :func:`read_lora_adapter`); None refuses those.
        base_weight: the model's projection weights (``LlamaModel.base_weight``), from which
            DoRA adapters' weight norms are computed when they are read; None refuses DoRA.
    """

    def __init__(self, pool: UnifiedPool, *, num_layers: int,
                 module_shapes: dict[str, tuple[int, int]], max_lora_rank: int,
                 max_cpu_loras: int | None = None, host_cache_bytes: int | None = None,
                 spill: SpillDir | None = None, keep_free_pages: int = 0,
                 base_vocab: BaseVocab | None = None,
                 base_weight: BaseWeight | None = None,
                 pages: AdapterPages | None = None) -> None:
        self.pool = pool
        self.allocator = pool.allocator
        self.num_layers = num_layers
        self.module_shapes = module_shapes
        self.base_vocab = base_vocab
        self.packer = pages or AdapterPacker(pool, module_shapes=module_shapes)
        self.max_lora_rank = max_lora_rank
        self.keep_free_pages = keep_free_pages
        self.base_weight = base_weight
        self.spill = spill or SpillDir(None)
        self._host = HostCache(self.spill, max_adapters=max_cpu_loras,
                               max_bytes=host_cache_bytes)
        self._prefetcher = Prefetcher(self.prefetch)
        self._lock = threading.RLock()
        self._names: dict[str, tuple[str, Path]] = {}  # name -> (content key, source path)
        self._names_by_key: dict[str, set[str]] = {}  # content key -> its names (_names inverted)
        self._contents: dict[str, _Content] = {}
        # Pool placements, least recently pinned first.
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._reserved: dict[str, list[int]] = {}  # pinned, pages allocated, not filled yet
        self._pins: Counter[str] = Counter()
        # Requests queued or running per content key (hold/unhold): content with holders is
        # kept even when no name points at it any more, so a queued request keeps its weights.
        self._holds: Counter[str] = Counter()
        self._placement_ids = itertools.count()
        self._shared = SharedPages(self.allocator, pool.page_numel)

    # -- registry ----------------------------------------------------------------------------

    def add(self, name: str, path: str | Path, *, preload: bool = False) -> LoraAdapter:
        """Reads, validates, hashes and registers a PEFT adapter under ``name``.

        The weights are read once (to validate and hash them) and then dropped, unless
        ``preload`` keeps them in host memory (within its budget). Re-adding a name points it
        at the new content; the old content's pages, host copy and spill file are freed once
        nothing pins them and no other name shares them.

        Raises:
            AdapterError, UnsupportedAdapterError: see :func:`read_lora_adapter`; also an
                adapter larger than a slot of the static layout (a DoRA adapter of
                ``max_lora_rank`` on every projection).
            ValueError: an empty name.
        """
        return self.add_many([(name, path)], preload=preload)[0]

    def add_many(self, items: Iterable[tuple[str, str | Path]], *,
                 preload: bool = False) -> list[LoraAdapter]:
        """Registers several adapters, all or none: each is read and validated first (outside
        the lock), then all names appear together.

        Raises:
            as :meth:`add`, for the first adapter that fails; nothing is registered then.
        Note: with ``preload`` every adapter's weights are held until all are read; the host
            budget applies once they are registered.
        """
        read = []
        for name, path in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
            adapter, weights = self._read_source(name, Path(path))
            try:
                footprint = self.packer.footprint(adapter)
            except ValueError as e:  # a static layout's slot holds the decoder projections
                raise AdapterError(f"adapter {name!r} cannot be placed in the pool: {e} "
                                   f"(memory_layout='static' sizes a slot for max_lora_rank "
                                   f"on every decoder projection of plain LoRA; a DoRA module "
                                   f"takes one more row)") from e
            # hold no weights unless preloading
            read.append((adapter, self.packer.host_form(weights) if preload else None,
                         footprint))
        with self._lock:
            for adapter, weights, footprint in read:
                old = self._names.get(adapter.name)
                self._set_name(adapter.name, adapter.key, adapter.path)
                if adapter.key not in self._contents:
                    self._contents[adapter.key] = _Content(adapter, footprint)
                if preload and adapter.key not in self._host:
                    self._host_put(adapter, weights)
                if old is not None and old[0] != adapter.key:
                    self._drop_if_unused(old[0])
        return [adapter for adapter, *_ in read]

    def remove(self, name: str) -> None:
        """Forgets ``name``; its content's pages, host copy and spill file are freed once no
        request holds it and no other name shares it.

        Raises:
            UnknownAdapterError: no adapter of that name.
            ValueError: requests for it are waiting or running and no other name has the same
                content (checked and removed under one lock).
        """
        with self._lock:
            key = self.key_of(name)
            users = self._holds[key]
            if users and self.names_of(key) == [name]:
                raise ValueError(f"adapter {name!r} is in use by {users} waiting or running "
                                 f"request(s); remove it once they finish")
            self._del_name(name)
            self._drop_if_unused(key)

    def hold(self, key: str) -> bool:
        """Notes one more queued or running request for content ``key`` (from
        ``Scheduler.add``); while any is held, the content outlives its names.

        Returns:
            False, noting nothing, when ``key`` is no longer registered (removed after the
            request looked it up): its request then fails, alone.
        """
        with self._lock:
            if key not in self._contents:
                return False
            self._holds[key] += 1
            return True

    def unhold(self, key: str) -> None:
        """Drops one :meth:`hold` (the request finished); content no name refers to any more
        is freed once nothing holds or pins it."""
        with self._lock:
            if self._holds[key] > 0:
                self._holds[key] -= 1
            if not self._holds[key]:
                self._holds.pop(key, None)
                self._drop_if_unused(key)

    def key_of(self, name: str) -> str:
        """The content key of adapter ``name``.

        Raises:
            UnknownAdapterError: no adapter of that name was added.
        """
        with self._lock:
            try:
                return self._names[name][0]
            except KeyError:
                known = sorted(self._names)
                shown = known if len(known) <= 20 else [*known[:20], f"... {len(known)} in all"]
                raise UnknownAdapterError(f"unknown adapter {name!r}; added adapters: "
                                          f"{shown}") from None

    def is_dora(self, key: str) -> bool:
        """Whether content ``key`` is a DoRA adapter (False for a key no longer registered)."""
        with self._lock:
            content = self._contents.get(key)
            return content is not None and content.adapter.is_dora

    @property
    def names(self) -> list[str]:
        """Names of the added adapters, sorted."""
        with self._lock:
            return sorted(self._names)

    def names_of(self, key: str) -> list[str]:
        """Names currently pointing at content ``key``."""
        with self._lock:
            return sorted(self._names_by_key.get(key, ()))

    # -- residency: the scheduler's AdapterResidency interface (accounting, no I/O) ----------

    def footprint(self, key: str) -> int:
        """The most pages making ``key`` resident takes, whether or not it is now (its own,
        and one for a tail that finds no room in the shared pages; 0 for a key no longer
        registered)."""
        with self._lock:
            content = self._contents.get(key)
            return 0 if content is None else content.footprint.max_pages

    def is_resident(self, key: str) -> bool:
        """Whether ``key`` holds pool pages: loaded, or reserved for this step's load."""
        with self._lock:
            return key in self._resident or key in self._reserved

    @staticmethod
    def unit_of(key: str) -> Hashable:
        """``key``'s id among the allocator's reclaimable units."""
        return (ADAPTER, key)

    def pin(self, key: str) -> bool:
        """Pins ``key`` in the pool. A resident one is taken back from the reclaimable units;
        a missing one gets its pages reserved (the allocator reclaims cached KV blocks, then
        unpinned adapters, as needed) for :meth:`load` to fill.

        Returns:
            False, with nothing changed, when the pages cannot be had.
        """
        with self._lock:
            content = self._contents[key]  # held by the pinning request, so registered
            if key in self._resident:
                if not self._pins[key] and not self.allocator.withdraw(self.unit_of(key)):
                    raise RuntimeError(f"adapter {key} was reclaimed while resident and "
                                       f"unpinned, but the store still lists it")
                self._resident.move_to_end(key)
            elif key not in self._reserved:
                if not self.allocator.can_allocate(content.footprint.max_pages, ADAPTER):
                    return False
                self._reserve(key)
            self._pins[key] += 1
            return True

    def unpin(self, key: str) -> None:
        """Drops one pin. Unpinned, a resident adapter becomes reclaimable, a reservation that
        was never filled is freed, and content no name refers to any more is dropped.

        Raises:
            ValueError: more unpins than pins.
        """
        with self._lock:
            if self._pins[key] <= 0:
                raise ValueError(f"adapter {key} unpinned more often than pinned")
            self._pins[key] -= 1
            if self._pins[key]:
                return
            del self._pins[key]
            if key in self._resident:
                self._offer(key)
            elif key in self._reserved:
                self._unreserve(key)
            self._drop_if_unused(key)

    def evict_unpinned(self, num_pages: int) -> int:
        """Reclaims unpinned resident adapters, least recently unpinned first, until
        ``num_pages`` pages are freed or none is left; returns the pages freed."""
        return self.allocator.reclaim(num_pages, ADAPTER)

    # -- the step: load, prefetch, warm ------------------------------------------------------

    def load(self, out: SchedulerOutput) -> AdapterLoad:
        """Makes the step's adapters resident: weights into the pages the scheduler reserved
        (from host memory, else the spill file, else the source, hash-checked; reads run
        outside the lock), and counts the step's requests and tokens per adapter.

        Returns:
            the placements of the step's adapters, and those that failed (with the reason).
        """
        placements: dict[str, ResidentAdapter] = {}
        failed: dict[str, str] = {}
        for key in sorted(out.adapter_keys):
            with self._lock:
                resident = self._resident.get(key)
            if resident is None:
                try:
                    resident = self._fill(key, self._fetch(key))
                except AdapterUnavailableError as e:
                    failed[key] = str(e)
                    continue
            placements[key] = resident
        self._record_use(out, failed)
        return AdapterLoad(placements, failed)

    def start_prefetch(self, keys: Iterable[str]) -> None:
        """Asks the background prefetcher to bring the adapters of ``keys`` that are only on
        disk or at their source into host memory while the step runs (S-LoRA, Sheng et al.
        2023, section 5.1: prefetch adapter weights for the next batch)."""
        self._prefetcher.ask(k for k in keys if self.tier(k) in ("disk", "source"))

    def warm(self, keys: Iterable[str]) -> None:
        """Copies those of ``keys`` already in host memory into free pool pages, unpinned
        (reclaimable), so their first requests need not wait for the copy. Only pages free
        beyond ``keep_free_pages`` are used (in the static layout: free slots), and nothing is
        reclaimed for it."""
        for key in keys:
            with self._lock:
                content = self._contents.get(key)
                if content is None or key in self._resident or key in self._reserved \
                        or key not in self._host:
                    continue
                spare = self.allocator.num_free_for(ADAPTER) - (
                    self.keep_free_pages if self.allocator.kinds_share_pages else 0)
                if content.footprint.max_pages > spare:
                    continue
                self._reserve(key)
                try:
                    self._fill(key, self._host.get(key))
                except BaseException:  # nothing pins it: its pages go back at once
                    self._unreserve(key)
                    raise
                self._offer(key)

    def prefetch(self, key: str) -> None:
        """Brings ``key``'s weights into host memory (from its spill file or source) without
        touching the pool; a no-op when they are in host memory or the pool already, or the key
        is unknown. The prefetcher's thread runs it; the read runs outside the lock. Errors are
        logged, never raised; only host copies (LRU) make room, nothing in the pool."""
        with self._lock:
            content = self._contents.get(key)
            if content is None or key in self._host or key in self._resident:
                return
            sources = self._sources(key)
        try:
            weights, from_spill = self._read_tiers(content.adapter, sources)
        except AdapterError as e:
            log.warning("prefetch of adapter %s failed: %s", key, e)
            return
        with self._lock:
            if self._contents.get(key) is content and key not in self._host:
                self._count_read(content, from_spill)
                self._host_put(content.adapter, weights)

    def wait_prefetched(self, timeout_s: float = 10.0) -> bool:
        """Waits until the prefetcher has nothing pending (for tests); False on timeout."""
        return self._prefetcher.wait_idle(timeout_s)

    @property
    def num_prefetched(self) -> int:
        """Keys the prefetcher has fetched (successfully or not) since the start."""
        return self._prefetcher.num_fetched

    def close(self) -> None:
        """Stops the prefetcher and removes a private spill directory. Idempotent."""
        self._prefetcher.close()
        self.spill.close()

    # -- tiers and stats -------------------------------------------------------------------

    @property
    def host_keys(self) -> list[str]:
        """Content keys held in host memory, least recently used first."""
        with self._lock:
            return self._host.keys

    @property
    def host_bytes(self) -> int:
        """Bytes of adapter weights held in host memory."""
        with self._lock:
            return self._host.num_bytes

    def tier(self, key: str) -> str:
        """Fastest tier holding ``key``: "pool", "host", "disk" (spill file) or "source"."""
        with self._lock:
            if key in self._resident:
                return "pool"
            if key in self._host:
                return "host"
            return "disk" if self.spill.has(key) else "source"

    def stats(self, per_name: bool = True) -> AdapterStoreStats:
        """Per-name tiers and counters (left empty without ``per_name``: with thousands of
        names they cost ~15 ms), the resident names, and the pool elements in use."""
        with self._lock:
            adapters = {name: AdapterUsage(tier=self.tier(key),
                                           **asdict(self._contents[key].stats))
                        for name, (key, _) in sorted(self._names.items())} if per_name else {}
            resident = sorted(n for k in self._resident for n in self.names_of(k))
            used = sum(r.used_elements for r in self._resident.values())
            return AdapterStoreStats(adapters, resident, used)

    @property
    def shared_pages(self) -> list[int]:
        """The pages holding several adapters' tail rows, ascending."""
        with self._lock:
            return self._shared.pages

    def pages_in_use(self) -> list[int]:
        """Every page the adapters hold: the own pages of the resident adapters and of the
        reservations not filled yet, then the shared pages (each once; together they are the
        allocator's adapter pages)."""
        with self._lock:
            return [*(p for r in self._resident.values() for p in r.pages),
                    *(p for pages in self._reserved.values() for p in pages),
                    *self._shared.pages]

    def check_invariants(self) -> None:
        """Asserts that the shared pages' rows and gaps tile them, that their tenants are
        the adapters with rows in them, and that the names by content key invert the names
        (for tests).

        Raises:
            AssertionError: naming what broke.
        """
        with self._lock:
            self._shared.check_invariants()
            held = {self.unit_of(k) for k in [*self._resident, *self._reserved]}
            for page in self._shared.pages:
                stray = set(self.allocator.tenants_of(page)) - held
                assert not stray, f"shared page {page} held by {stray}, neither resident nor " \
                                  f"reserved"
            inverted = {(n, k) for k, names in self._names_by_key.items() for n in names}
            assert inverted == {(n, k) for n, (k, _) in self._names.items()}, \
                "the names by content key do not invert the names"

    def resident(self, key: str) -> ResidentAdapter:
        """The pool placement of a resident adapter."""
        with self._lock:
            return self._resident[key]

    @property
    def num_contents(self) -> int:
        """Distinct adapter contents registered, those kept only for queued requests
        included."""
        with self._lock:
            return len(self._contents)

    @property
    def pins(self) -> dict[str, int]:
        """Pins per content key now (a copy): one per running request of that adapter."""
        with self._lock:
            return {k: n for k, n in self._pins.items() if n}

    @property
    def resident_keys(self) -> list[str]:
        """Content keys of the adapters in the pool, least recently pinned first."""
        with self._lock:
            return list(self._resident)

    # -- internals -----------------------------------------------------------------------------

    def _offer(self, key: str) -> None:
        self.allocator.offer(self.unit_of(key), self._resident[key].pages, ADAPTER,
                             on_reclaim=lambda: self._reclaimed(key))

    def _reclaimed(self, key: str) -> None:
        """The allocator reclaimed ``key``'s pages (it was unpinned), and its shared ones."""
        with self._lock:
            self._shared.forget(self.unit_of(key))
            if self._resident.pop(key, None) is not None and key in self._contents:
                self._contents[key].stats.evictions += 1

    def _reserve(self, key: str) -> None:
        """Allocates ``key``'s own pages and places its tail rows in the shared pages (the
        caller has checked that ``footprint.max_pages`` can be had).

        Raises:
            OutOfPagesError: they cannot be had after all; nothing is held then.
        """
        footprint = self._contents[key].footprint
        pages = self.allocator.allocate(footprint.own_pages, ADAPTER)
        if footprint.tail:
            try:
                self._shared.place(self.unit_of(key), footprint.tail)
            except BaseException:  # OutOfPagesError, or a bug: the own pages go back
                self.allocator.free(pages)
                raise
        self._reserved[key] = pages

    def _unreserve(self, key: str) -> None:
        """Frees a reservation that was never filled."""
        self._give_back(key, self._reserved.pop(key))

    def _give_back(self, key: str, pages: list[int]) -> None:
        """Frees ``key``'s own ``pages`` and its rows in the shared pages (which go back to
        the pool with their last tenant)."""
        self.allocator.free(pages)
        self._shared.release(self.unit_of(key))

    def _fetch(self, key: str) -> AdapterWeights:
        """``key``'s weights: its host copy, else read from the spill file or its source
        (outside the lock) and put in host memory (which may push it out again at once).

        Raises:
            AdapterUnavailableError: no tier can provide them.
        """
        with self._lock:
            weights = self._host.get(key)
            content = self._contents[key]  # pinned, so registered
            sources = self._sources(key)
        if weights is not None:
            return weights
        weights, from_spill = self._read_tiers(content.adapter, sources)
        with self._lock:
            self._count_read(content, from_spill)
            self._host_put(content.adapter, weights)
        return weights

    def _fill(self, key: str, weights: AdapterWeights) -> ResidentAdapter:
        """Copies ``weights`` into ``key``'s reserved pages; the placement becomes resident."""
        with self._lock:
            content = self._contents[key]
            pages = self._reserved.pop(key)
            try:
                resident = self.packer.fill(content.adapter, weights, pages,
                                            next(self._placement_ids),
                                            self._shared.spots(self.unit_of(key)))
            except BaseException:  # a failed copy (device OOM, Ctrl-C) keeps the reservation
                self._reserved[key] = pages
                raise
            self._resident[key] = resident
            content.stats.loads_from_host += 1
            return resident

    def _record_use(self, out: SchedulerOutput, failed: dict[str, str]) -> None:
        now = time.time()
        with self._lock:
            for s in out.scheduled:
                for key in s.request.adapter_keys:
                    content = self._contents.get(key)
                    if content is None or key in failed:
                        continue
                    content.stats.tokens += s.num_new_tokens
                    content.stats.requests += s.first_step
                    content.stats.last_used = now

    def _read_source(self, name: str, path: Path) -> tuple[LoraAdapter, AdapterWeights]:
        return read_lora_adapter(
            name, path, num_layers=self.num_layers, module_shapes=self.module_shapes,
            max_lora_rank=self.max_lora_rank, dtype=self.pool.dtype,
            base_vocab=self.base_vocab, base_weight=self.base_weight)

    def _sources(self, key: str) -> list[tuple[str, Path]]:
        """``(name, path)`` of every name registered with content ``key``, else the source it
        was first registered from (content kept for queued requests after its name moved)."""
        sources = [(n, self._names[n][1]) for n in self.names_of(key)]
        if not sources and key in self._contents:
            first = self._contents[key].adapter
            sources = [(first.name, first.path)]
        return sources

    def _read_tiers(self, adapter: LoraAdapter, sources: list[tuple[str, Path]]
                    ) -> tuple[AdapterWeights, bool]:
        """Weights from the spill file, else from a source whose content still hashes to
        ``adapter.key``, in the pages' host form (``AdapterPages.host_form``: shared memory
        under tensor parallelism). Returns ``(weights, from_spill)``.

        Raises:
            AdapterUnavailableError: no tier could provide them; the message gives each reason.
        """
        weights = self.spill.read(adapter)
        if weights is not None:
            return self.packer.host_form(weights), True
        reasons = []
        for name, path in sources:
            try:
                found, weights = self._read_source(name, path)
            except Exception as e:  # noqa: BLE001 - whatever the source holds, it fails alone
                reasons.append(str(e) if isinstance(e, AdapterError)
                               else f"adapter {name!r}: {type(e).__name__}: {e}")
                continue
            if found.key == adapter.key:
                return self.packer.host_form(weights), False
            reasons.append(f"adapter {name!r}: the content of {path} changed since it was "
                           f"registered (hash {found.key}, registered {adapter.key}); add it "
                           f"again to serve the new weights")
        names = ", ".join(repr(n) for n, _ in sources) or f"with content key {adapter.key}"
        raise AdapterUnavailableError(f"adapter {names} cannot be loaded: no intact spill file, "
                                      f"and its source is unusable: {'; '.join(reasons)}")

    def _count_read(self, content: _Content, from_spill: bool) -> None:
        if from_spill:
            content.stats.loads_from_disk += 1
        else:
            content.stats.loads_from_source += 1

    def _host_put(self, adapter: LoraAdapter, weights: AdapterWeights) -> None:
        """Holds ``weights`` (in the pages' host form, see :meth:`_read_tiers`) in host
        memory, which may push it out again at once."""
        for pushed in self._host.put(adapter, weights):
            self._contents[pushed.key].stats.evictions += 1

    def _set_name(self, name: str, key: str, path: Path) -> None:
        """Points ``name`` at content ``key`` read from ``path`` (in both maps)."""
        if name in self._names:
            self._del_name(name)
        self._names[name] = (key, path)
        self._names_by_key.setdefault(key, set()).add(name)

    def _del_name(self, name: str) -> None:
        """Forgets ``name`` (in both maps)."""
        key, _ = self._names.pop(name)
        names = self._names_by_key[key]
        names.discard(name)
        if not names:
            del self._names_by_key[key]

    def _drop_if_unused(self, key: str) -> None:
        """Forgets content no name refers to, once no request holds or pins it: its pages,
        host copy, spill file and counters."""
        if self._pins[key] or self._holds[key] or self._names_by_key.get(key):
            return
        if key in self._resident and self.allocator.withdraw(self.unit_of(key)):
            self._give_back(key, self._resident.pop(key).pages)
        self._host.discard(key)
        self.spill.delete(key)
        self._contents.pop(key, None)
