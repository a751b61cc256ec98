"""AdapterStore: adapters by name, and their content in three tiers: pool pages, host memory, disk.

Tiers, fastest first (S-LoRA, section 4: adapters live in host memory and are fetched into the
device pool when a batch needs them; vLLM's and SageMaker LMI's ``max_cpu_loras`` bounds the
host tier, the rest is "evicted to disk"):

- pool: the adapter's rows in unified-pool pages. Pinned while a running or admitted request
  uses it; otherwise evicted least recently used first when the scheduler needs pages.
- host: its weights in host memory, bounded by ``max_cpu_loras`` adapters and
  ``host_cache_bytes``; least recently used leave first. A pool-resident adapter need not stay
  on host (the budget counts only what host memory holds).
- disk: a safetensors copy in the spill directory, written when it leaves host memory.
- source: its PEFT directory, read at registration (to validate and hash) and again only when
  no other tier has it. Never modified.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pagedlora.adapter_pages import AdapterPacker, ResidentAdapter, ResidentModule
from pagedlora.errors import AdapterError, AdapterUnavailableError
from pagedlora.host_cache import HostCache
from pagedlora.lora_adapter import AdapterWeights, LoraAdapter, read_lora_adapter
from pagedlora.pool import UnifiedPool
from pagedlora.scheduler import ADAPTER, ScheduledRequest
from pagedlora.spill import SpillDir

log = logging.getLogger(__name__)

__all__ = ["AdapterStats", "AdapterStore", "ResidentAdapter", "ResidentModule"]


@dataclass
class AdapterStats:
    """Counters of one content key (names sharing the content share them).

    Attributes:
        requests: requests scheduled with it (counted at their first step).
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


@dataclass
class _Content:
    """A registered content key: its description (from the first name added with it), the
    pages it takes in the pool, and its counters."""

    adapter: LoraAdapter
    num_pages: int
    stats: AdapterStats = field(default_factory=AdapterStats)


class AdapterStore:
    """Owns the adapters: name -> content key, the three tiers, pins, LRU orders and counters.

    Pages are packed by :class:`AdapterPacker` (rank-proportional, S-LoRA section 4.1; in the
    static layout each adapter takes one max-rank slot).

    Thread safety: one re-entrant lock guards the registry and every tier, so ``add``/``remove``
    (and ``prefetch``) may run in other threads while the engine steps. Reading and hashing a
    source happens outside the lock; a name appears, with all its state, in one locked step.

    Args:
        pool: the unified pool (its allocator is shared with the scheduler).
        num_layers: decoder layers of the model.
        module_shapes: ``module -> (in_features, out_features)``.
        max_lora_rank: largest rank accepted.
        max_cpu_loras: most adapters in host memory; None for no limit.
        host_cache_bytes: most bytes of adapter weights in host memory; None for no limit.
        spill: the disk tier.
    """

    def __init__(self, pool: UnifiedPool, *, num_layers: int,
                 module_shapes: dict[str, tuple[int, int]], max_lora_rank: int,
                 max_cpu_loras: int | None = None, host_cache_bytes: int | None = None,
                 spill: SpillDir | None = None) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.module_shapes = module_shapes
        self.packer = AdapterPacker(pool, module_shapes=module_shapes)
        self.max_lora_rank = max_lora_rank
        self.spill = spill or SpillDir(None)
        self._host = HostCache(self.spill, max_adapters=max_cpu_loras,
                               max_bytes=host_cache_bytes)
        self._lock = threading.RLock()
        self._names: dict[str, tuple[str, Path]] = {}  # name -> (content key, source path)
        self._contents: dict[str, _Content] = {}
        # Pool placements, least recently used first.
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._pins: Counter[str] = Counter()
        # Requests queued or running per content key (hold/unhold): content with holders is
        # kept even when no name points at it any more, so a queued request keeps its weights.
        self._holds: Counter[str] = Counter()

    # -- registry ----------------------------------------------------------------------------

    def add(self, name: str, path: str | Path, *, preload: bool = False) -> LoraAdapter:
        """Reads, validates, hashes and registers a PEFT adapter under ``name``.

        The weights are read once (to validate and hash them) and then dropped, unless
        ``preload`` keeps them in host memory (within its budget). Re-adding a name points it
        at the new content; the old content's pages, host copy and spill file are freed once
        nothing pins them and no other name shares them.

        Raises:
            AdapterError, UnsupportedAdapterError: see :func:`read_lora_adapter`.
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
            read.append((adapter, weights if preload else None))  # hold no weights otherwise
        with self._lock:
            for adapter, weights in read:
                old = self._names.get(adapter.name)
                self._names[adapter.name] = (adapter.key, adapter.path)
                if adapter.key not in self._contents:
                    self._contents[adapter.key] = _Content(adapter, self.packer.num_pages(adapter))
                if preload and adapter.key not in self._host:
                    self._host_put(adapter, weights)
                if old is not None and old[0] != adapter.key:
                    self._drop_if_unused(old[0])
        return [adapter for adapter, _ in read]

    def remove(self, name: str) -> None:
        """Forgets ``name``; its content's pages, host copy and spill file are freed once no
        request holds it and no other name shares it.

        Raises:
            ValueError: no adapter of that name, or requests for it are waiting or running and
                no other name has the same content (checked and removed under one lock).
        """
        with self._lock:
            key = self.key_of(name)
            users = self._holds[key]
            if users and self.names_of(key) == [name]:
                raise ValueError(f"adapter {name!r} is in use by {users} waiting or running "
                                 f"request(s); remove it once they finish")
            del self._names[name]
            self._drop_if_unused(key)

    def hold(self, key: str) -> bool:
        """Notes one more queued or running request for content ``key`` (from
        ``Scheduler.add``); while any is held, the content outlives its names.

        Returns:
            False, noting nothing, when ``key`` is no longer registered (removed after the
            request looked it up): its request then fails at admission, alone.
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
            ValueError: no adapter of that name was added.
        """
        with self._lock:
            try:
                return self._names[name][0]
            except KeyError:
                known = sorted(self._names)
                shown = known if len(known) <= 20 else [*known[:20], f"... {len(known)} in all"]
                raise ValueError(f"unknown adapter {name!r}; added adapters: {shown}") from None

    @property
    def names(self) -> list[str]:
        """Names of the added adapters, sorted."""
        with self._lock:
            return sorted(self._names)

    def names_of(self, key: str) -> list[str]:
        """Names currently pointing at content ``key``."""
        with self._lock:
            return sorted(n for n, (k, _) in self._names.items() if k == key)

    # -- residency (the scheduler's AdapterResidency interface) ------------------------------

    def pages_needed(self, key: str) -> int:
        """Pages that making ``key`` resident takes now: 0 when resident, else its packed size
        (0 also for a key no longer registered: :meth:`acquire` then reports it)."""
        with self._lock:
            content = self._contents.get(key)
            return 0 if key in self._resident or content is None else content.num_pages

    def adapter_pages(self, key: str) -> int:
        """Pages ``key`` takes in the pool when resident, whether or not it is now (0 for a
        key no longer registered)."""
        with self._lock:
            content = self._contents.get(key)
            return 0 if content is None else content.num_pages

    def acquire(self, key: str) -> bool:
        """Pins ``key`` in the pool, loading it first if needed: weights from host memory, else
        from the spill file, else from the source (hash-checked); then, if pages are short,
        unpinned adapters are evicted, least recently used first, and the rows copied in.

        Returns:
            False, with nothing changed, when even evicting every unpinned adapter would not
            free enough pages.
        Raises:
            AdapterUnavailableError: the weights cannot be had (removed, spill and source both
                unreadable, or the source changed since registration); nothing changed.
        """
        with self._lock:
            if key not in self._resident:
                content = self._contents.get(key)
                if content is None:
                    raise AdapterUnavailableError(
                        f"adapter with content key {key} is no longer registered (removed or "
                        f"re-added with other weights while the request waited)")
                free = self.pool.allocator.num_free_for(ADAPTER)
                if content.num_pages > free + self.evictable_pages():
                    return False
                weights = self._host_weights(key)
                self.evict_unpinned(content.num_pages - free)
                self._resident[key] = self.packer.load(content.adapter, weights)
                content.stats.loads_from_host += 1
            self._resident.move_to_end(key)
            self._pins[key] += 1
            return True

    def release(self, key: str) -> None:
        """Drops one pin; unpinned content that no name refers to any more is freed.

        Raises:
            ValueError: more releases than acquires.
        """
        with self._lock:
            if self._pins[key] <= 0:
                raise ValueError(f"adapter {key} released more often than acquired")
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
                self._drop_if_unused(key)

    def evictable_pages(self) -> int:
        """Pages held by resident adapters that nothing pins."""
        with self._lock:
            return sum(len(r.pages) for k, r in self._resident.items() if not self._pins[k])

    def evict_unpinned(self, num_pages: int) -> int:
        """Evicts unpinned adapters, least recently used first, until ``num_pages`` pages are
        freed or none is left; returns the pages freed (whole adapters, so possibly more)."""
        with self._lock:
            freed = 0
            for key in [k for k in self._resident if not self._pins[k]]:
                if freed >= num_pages:
                    break
                freed += self._evict(key)
                self._contents[key].stats.evictions += 1
            return freed

    # -- host tier -----------------------------------------------------------------------------

    def prefetch(self, key: str) -> None:
        """Brings ``key``'s weights into host memory (from its spill file or source) without
        touching the pool; a no-op when they are in host memory or the pool already, or the key
        is unknown. Meant for a background thread: the read runs outside the lock. Errors are
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

    # -- for the engine, the model runner and stats ----------------------------------------------

    def record_use(self, scheduled: Iterable[ScheduledRequest]) -> None:
        """Counts a step's requests and tokens per adapter (called by ``Engine.step`` before
        the step runs, while ``num_computed_tokens`` is still the count before it)."""
        now = time.time()
        with self._lock:
            for s in scheduled:
                r = s.request
                content = self._contents.get(r.adapter_key) if r.adapter_key else None
                if content is None:
                    continue
                content.stats.tokens += s.num_new_tokens
                # Its first step: nothing computed yet beyond a prefix-cache hit.
                content.stats.requests += (r.num_computed_tokens == r.num_cached_tokens
                                           and not r.num_preemptions)
                content.stats.last_used = now

    def tier(self, key: str) -> str:
        """Fastest tier holding ``key``: "pool", "host", "disk" (spill file) or "source"."""
        with self._lock:
            if key in self._resident:
                return "pool"
            if key in self._host:
                return "host"
            return "disk" if self.spill.has(key) else "source"

    def stats(self) -> dict[str, dict]:
        """``name -> {"tier", "requests", "tokens", "loads_from_disk", "loads_from_source",
        "loads_from_host", "evictions", "last_used"}`` (see :class:`AdapterStats`)."""
        with self._lock:
            return {name: {"tier": self.tier(key), **vars(self._contents[key].stats)}
                    for name, (key, _) in sorted(self._names.items())}

    def resident(self, key: str) -> ResidentAdapter:
        """The pool placement of a pinned adapter."""
        with self._lock:
            return self._resident[key]

    @property
    def resident_keys(self) -> list[str]:
        """Content keys of the adapters in the pool, least recently used first."""
        with self._lock:
            return list(self._resident)

    # -- internals -----------------------------------------------------------------------------

    def _read_source(self, name: str, path: Path) -> tuple[LoraAdapter, AdapterWeights]:
        return read_lora_adapter(
            name, path, num_layers=self.num_layers, module_shapes=self.module_shapes,
            max_lora_rank=self.max_lora_rank, dtype=self.pool.tensor.dtype)

    def _sources(self, key: str) -> list[tuple[str, Path]]:
        """``(name, path)`` of every name registered with content ``key``, else the source it
        was first registered from (content kept for queued requests after its name moved)."""
        sources = [(n, p) for n, (k, p) in sorted(self._names.items()) if k == key]
        if not sources and key in self._contents:
            first = self._contents[key].adapter
            sources = [(first.name, first.path)]
        return sources

    def _read_tiers(self, adapter: LoraAdapter, sources: list[tuple[str, Path]]
                    ) -> tuple[AdapterWeights, bool]:
        """Weights from the spill file, else from a source whose content still hashes to
        ``adapter.key``. Returns ``(weights, from_spill)``.

        Raises:
            AdapterUnavailableError: no tier could provide them; the message gives each reason.
        """
        weights = self.spill.read(adapter)
        if weights is not None:
            return weights, True
        reasons = []
        for name, path in sources:
            try:
                found, weights = self._read_source(name, path)
            except Exception as e:  # noqa: BLE001 - whatever the source holds, it fails alone
                reasons.append(str(e) if isinstance(e, AdapterError)
                               else f"adapter {name!r}: {type(e).__name__}: {e}")
                continue
            if found.key == adapter.key:
                return weights, False
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

    def _host_weights(self, key: str) -> AdapterWeights:
        """``key``'s weights, read into host memory first if they are not there."""
        weights = self._host.get(key)
        if weights is not None:
            return weights
        content = self._contents[key]
        weights, from_spill = self._read_tiers(content.adapter, self._sources(key))
        self._count_read(content, from_spill)
        self._host_put(content.adapter, weights)
        return weights

    def _host_put(self, adapter: LoraAdapter, weights: AdapterWeights) -> None:
        for pushed in self._host.put(adapter, weights):
            self._contents[pushed.key].stats.evictions += 1

    def _evict(self, key: str) -> int:
        resident = self._resident.pop(key)
        self.pool.allocator.free(resident.pages)
        return len(resident.pages)

    def _drop_if_unused(self, key: str) -> None:
        """Forgets content no name refers to, once no request holds or pins it: its pages,
        host copy, spill file and counters."""
        if self._pins[key] or self._holds[key] or any(k == key for k, _ in self._names.values()):
            return
        if key in self._resident:
            self._evict(key)
        self._host.discard(key)
        self.spill.delete(key)
        self._contents.pop(key, None)
