"""AdapterStore: adapters by name, their host copies, and their pages in the unified pool."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedlora.kernels.lora import PagedRows
from pagedlora.lora_adapter import TARGET_MODULES, LoraAdapter, load_lora_adapter
from pagedlora.pool import UnifiedPool
from pagedlora.scheduler.page_allocator import ADAPTER


@dataclass(frozen=True)
class ResidentModule:
    """One module's LoRA in the pool: lora_A rows, lora_B^T rows, scale."""

    a: PagedRows
    b: PagedRows
    scale: float


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter's pages in the pool.

    Attributes:
        pages: every page it holds.
        used_elements: elements of those pages holding weights (the rest is internal
            fragmentation: the tail of each (layer, row width) group's last page).
        modules: ``(layer, module) -> ResidentModule``.
    """

    pages: list[int]
    used_elements: int
    modules: dict[tuple[int, str], ResidentModule]


class AdapterStore:
    """Owns the adapters: name -> content key, host weights, pool residency, pins and LRU.

    Packing (S-LoRA, section 4.1, unified paging): for each layer, the rank rows of every
    target module are grouped by row width (``in_features`` for lora_A, ``out_features`` for
    lora_B^T) and packed into pages of that width, so an adapter of rank r takes pages in
    proportion to r, with no padding to max_lora_rank.

    Args:
        pool: the unified pool (its allocator is shared with the scheduler).
        num_layers: decoder layers of the model.
        module_shapes: ``module -> (in_features, out_features)``.
        max_lora_rank: largest rank accepted.
    """

    def __init__(self, pool: UnifiedPool, *, num_layers: int,
                 module_shapes: dict[str, tuple[int, int]], max_lora_rank: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.module_shapes = module_shapes
        self.max_lora_rank = max_lora_rank
        self._names: dict[str, str] = {}
        self._host: dict[str, LoraAdapter] = {}
        # Resident adapters in LRU order (least recently acquired first).
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._pins: Counter[str] = Counter()
        for width in {w for shape in module_shapes.values() for w in shape}:
            pool.rows_per_page(width)  # fail early if a row cannot fit a page

    # -- registry ----------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> LoraAdapter:
        """Reads, validates and registers a PEFT adapter under ``name``.

        Re-adding a name points it at the new content; the old content's pages are freed
        once nothing pins them and no other name shares them.

        Raises:
            AdapterError, UnsupportedAdapterError: see :func:`load_lora_adapter`.
            ValueError: an empty name.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        adapter = load_lora_adapter(
            name, path, num_layers=self.num_layers, module_shapes=self.module_shapes,
            max_lora_rank=self.max_lora_rank, dtype=self.pool.tensor.dtype)
        old = self._names.get(name)
        self._names[name] = adapter.key
        self._host.setdefault(adapter.key, adapter)
        if old is not None and old != adapter.key:
            self._drop_if_unused(old)
        return adapter

    def key_of(self, name: str) -> str:
        """The content key of adapter ``name``.

        Raises:
            ValueError: no adapter of that name was added.
        """
        try:
            return self._names[name]
        except KeyError:
            raise ValueError(f"unknown adapter {name!r}; added adapters: "
                             f"{sorted(self._names)}") from None

    @property
    def names(self) -> list[str]:
        """Names of the added adapters, sorted."""
        return sorted(self._names)

    # -- residency (the scheduler's AdapterResidency interface) ------------------------------

    def pages_needed(self, key: str) -> int:
        """Pages that making ``key`` resident takes now: 0 when resident, else its packed size."""
        return 0 if key in self._resident else self.adapter_pages(key)

    def adapter_pages(self, key: str) -> int:
        """Pages ``key`` takes in the pool when resident (its packed size)."""
        resident = self._resident.get(key)
        if resident is not None:
            return len(resident.pages)
        return sum(n for *_, n in self._groups(self._host[key]))

    def acquire(self, key: str) -> bool:
        """Pins ``key`` in the pool, copying it host -> pool first if needed (evicting unpinned
        adapters, least recently used first); False, with nothing changed, when even evicting
        every unpinned adapter would not free enough pages."""
        if key not in self._resident:
            need = self.pages_needed(key)
            if need > self.pool.allocator.num_free + self.evictable_pages():
                return False
            self.evict_unpinned(need - self.pool.allocator.num_free)
            self._resident[key] = self._load(self._host[key])
        self._resident.move_to_end(key)
        self._pins[key] += 1
        return True

    def release(self, key: str) -> None:
        """Drops one pin; unpinned content that no name refers to any more is freed.

        Raises:
            ValueError: more releases than acquires.
        """
        if self._pins[key] <= 0:
            raise ValueError(f"adapter {key} released more often than acquired")
        self._pins[key] -= 1
        if not self._pins[key]:
            del self._pins[key]
            if key not in self._names.values():
                self._drop_if_unused(key)

    def evictable_pages(self) -> int:
        """Pages held by resident adapters that nothing pins."""
        return sum(len(r.pages) for k, r in self._resident.items() if not self._pins[k])

    def evict_unpinned(self, num_pages: int) -> int:
        """Evicts unpinned adapters, least recently used first, until ``num_pages`` pages are
        freed or none is left; returns the pages freed (whole adapters, so possibly more)."""
        freed = 0
        for key in [k for k in self._resident if not self._pins[k]]:
            if freed >= num_pages:
                break
            freed += self._evict(key)
        return freed

    # -- for the model runner and stats --------------------------------------------------------

    def resident(self, key: str) -> ResidentAdapter:
        """The pool placement of a pinned adapter."""
        return self._resident[key]

    @property
    def resident_keys(self) -> list[str]:
        """Content keys of the adapters in the pool, least recently used first."""
        return list(self._resident)

    def names_of(self, key: str) -> list[str]:
        """Names currently pointing at content ``key``."""
        return sorted(n for n, k in self._names.items() if k == key)

    # -- internals -----------------------------------------------------------------------------

    def _groups(self, adapter: LoraAdapter):
        """Yields ``(layer, width, rows, num_pages)``; rows are ``(module, "a"|"b", tensor)``
        in a fixed order (by module, then A before B^T)."""
        for layer in range(self.num_layers):
            by_width: dict[int, list] = {}
            for module in TARGET_MODULES:
                w = adapter.modules.get((layer, module))
                if w is None:
                    continue
                by_width.setdefault(w.a.shape[1], []).append((module, "a", w.a))
                by_width.setdefault(w.b_t.shape[1], []).append((module, "b", w.b_t))
            for width, rows in sorted(by_width.items()):
                num_rows = sum(t.shape[0] for *_, t in rows)
                rpp = self.pool.rows_per_page(width)
                yield layer, width, rows, -(-num_rows // rpp)

    def _load(self, adapter: LoraAdapter) -> ResidentAdapter:
        """Allocates pages and copies the adapter's rows into them (host -> pool)."""
        groups = list(self._groups(adapter))
        pages = self.pool.allocator.allocate(sum(g[-1] for g in groups), ADAPTER)
        device = self.pool.tensor.device
        placed: dict[tuple[int, str], dict[str, PagedRows]] = {}
        used, next_page = 0, 0
        for layer, width, rows, num_pages in groups:
            rpp = self.pool.rows_per_page(width)
            group_pages = torch.tensor(pages[next_page:next_page + num_pages], device=device)
            next_page += num_pages
            data = torch.cat([t for *_, t in rows]).to(device)  # [num_rows, width]
            padded = data.new_zeros(num_pages * rpp, width)
            padded[: data.shape[0]] = data
            self.pool.rows(width)[group_pages] = padded.view(num_pages, rpp, width)
            used += data.numel()
            row = 0
            for module, which, t in rows:
                idx = torch.arange(row, row + t.shape[0], device=device)
                placed.setdefault((layer, module), {})[which] = PagedRows(
                    pages=group_pages[idx // rpp], slots=idx % rpp)
                row += t.shape[0]
        modules = {lm: ResidentModule(a=p["a"], b=p["b"], scale=adapter.modules[lm].scale)
                   for lm, p in placed.items()}
        return ResidentAdapter(pages=pages, used_elements=used, modules=modules)

    def _evict(self, key: str) -> int:
        resident = self._resident.pop(key)
        self.pool.allocator.free(resident.pages)
        return len(resident.pages)

    def _drop_if_unused(self, key: str) -> None:
        """Forgets content no name refers to, once no request pins it."""
        if key in self._names.values() or self._pins[key]:
            return
        if key in self._resident:
            self._evict(key)
        self._host.pop(key, None)
