"""AdapterPacker: an adapter's rank rows packed into unified-pool pages, and back out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from pagedlora.kernels.lora import PagedRows
from pagedlora.lora_adapter import (
    LORA_MODULES,
    TARGET_MODULES,
    AdapterWeights,
    LoraAdapter,
    ModuleWeights,
)
from pagedlora.pool import UnifiedPool, row_pieces, rows_per_page


@dataclass(frozen=True)
class ResidentModule:
    """One module's LoRA in the pool: lora_A rows, lora_B^T rows, scale, and for DoRA the row
    of its output scale (``out_features`` wide, packed with the lora_B^T rows)."""

    a: PagedRows
    b: PagedRows
    scale: float
    dora: PagedRows | None = None


@dataclass(frozen=True)
class ResidentAdapter:
    """An adapter's pages in the pool (one placement: a reload is a new placement).

    Attributes:
        placement_id: unique per placement within an engine (what the model runner keys the
            rows it has read out of the pages by).
        pages: every page it holds.
        used_elements: elements of those pages holding weights (the rest is internal
            fragmentation: the tail of each (layer, row width) group's last page, and in the
            static layout the rest of its max-rank slot).
        modules: ``(layer, module) -> ResidentModule``.
    """

    placement_id: int
    pages: list[int]
    used_elements: int
    modules: dict[tuple[int, str], ResidentModule]


class AdapterPages(Protocol):
    """Where the adapter store's adapters go in the pool: :class:`AdapterPacker` in this
    process, or a tensor-parallel engine's workers
    (:class:`pagedlora.parallel.executor.ShardedAdapterPages`)."""

    def num_pages(self, adapter: LoraAdapter) -> int:
        """Pages ``adapter`` takes in the pool."""

    def fill(self, adapter: LoraAdapter, weights: AdapterWeights, pages: list[int],
             placement_id: int) -> ResidentAdapter:
        """Puts the adapter's rows into ``pages``; returns the placement."""

    def host_form(self, weights: AdapterWeights) -> AdapterWeights:
        """The form in which host memory holds ``weights`` (the host tier's one copy)."""


class AdapterPacker:
    """Packs adapters into pool pages (S-LoRA, section 4.1, unified paging).

    For each layer, the rank rows of every target module are grouped by row width
    (``in_features`` for lora_A, ``out_features`` for lora_B^T and a DoRA module's output
    scale, one row) and packed into pages of that width, so an adapter of rank r takes pages
    in proportion to r, with no padding to max_lora_rank, and a decoder projection's row never
    straddles two pages (kernels read those rows in place). The vocabulary modules
    (``embed_tokens``, ``lm_head``; "layer" ``VOCAB_LAYER``) have rows of ``vocab_size``
    elements (the embedding's lora_A, lm_head's lora_B^T), often wider than a page: such a row
    is split into page-wide pieces, one page each (the last one's tail unused), and read back
    out of the pool whole (:meth:`UnifiedPool.read_rows`). The allocator may charge more
    (``adapter_footprint``: a whole max-rank slot in the static layout); the rows then fill
    the first pages it hands out.

    Args:
        pool: the unified pool.
        module_shapes: ``module -> (in_features, out_features)``, decoder projections and
            (optionally) the vocabulary modules: the widths of lora_A and lora_B^T rows (under
            tensor parallelism a rank's, ``Shard.lora_widths``).
        scale_widths: ``module -> width`` of a DoRA module's output scale row where it is not
            ``out_features`` (a tensor-parallel rank's, ``Shard.dora_widths``).
    Raises:
        ValueError: a decoder projection's row width exceeds a page (raise block_size).
    """

    def __init__(self, pool: UnifiedPool, *, module_shapes: dict[str, tuple[int, int]],
                 scale_widths: dict[str, int] | None = None) -> None:
        self.pool = pool
        self.module_shapes = module_shapes
        self.scale_widths = scale_widths or {}
        for width in {w for m, shape in module_shapes.items() if m in TARGET_MODULES
                      for w in shape}:
            pool.rows_per_page(width)  # fail early if a row cannot fit a page

    def num_pages(self, adapter: LoraAdapter) -> int:
        """Pages ``adapter`` takes in the pool (its packed rows, as the allocator charges
        them)."""
        return self.pool.allocator.adapter_footprint(sum(n for *_, n in self._groups(adapter)))

    def fill(self, adapter: LoraAdapter, weights: AdapterWeights, pages: list[int],
             placement_id: int) -> ResidentAdapter:
        """Copies the adapter's rows into ``pages`` (allocated for it: :meth:`num_pages` of
        them), host -> pool.

        Args:
            weights: the rows to copy, of the widths this packer packs (under tensor
                parallelism a rank's shard, ``Shard.shard_lora``; strided views are fine).
        Raises:
            ValueError: ``pages`` has another length than :meth:`num_pages`.
        """
        groups = self._checked_groups(adapter, pages)
        device = self.pool.tensor.device
        next_page = 0
        for layer, width, rows, num_pages in groups:
            # a row of `width` is `pieces` stored rows of `stored` elements (1 unless split)
            pieces, stored = row_pieces(self.pool.page_numel, width)
            rpp = self.pool.rows_per_page(stored)
            group_pages = torch.tensor(pages[next_page:next_page + num_pages], device=device)
            next_page += num_pages
            tensors = [_row_tensor(weights[(layer, module)], which)
                       for module, which, _ in rows]
            data = torch.cat(tensors).to(device)  # [num_rows, width]
            if pieces > 1:  # [num_rows * pieces, stored]
                split = data.new_zeros(data.shape[0], pieces * stored)
                split[:, :width] = data
                data = split.view(-1, stored)
            padded = data.new_zeros(num_pages * rpp, stored)
            padded[: data.shape[0]] = data
            self.pool.rows(stored)[group_pages] = padded.view(num_pages, rpp, stored)
        return self._place(adapter, groups, pages, placement_id, device)

    def place(self, adapter: LoraAdapter, pages: list[int], placement_id: int
              ) -> ResidentAdapter:
        """Where :meth:`fill` puts the adapter's rows in ``pages``, copying nothing (the
        driver of a tensor-parallel engine, whose workers fill their pools; the page tables
        are on the CPU).

        Raises:
            ValueError: as :meth:`fill`.
        """
        groups = self._checked_groups(adapter, pages)
        return self._place(adapter, groups, pages, placement_id, torch.device("cpu"))

    def host_form(self, weights: AdapterWeights) -> AdapterWeights:
        """How host memory holds weights for this packer: as read."""
        return weights

    def _checked_groups(self, adapter: LoraAdapter, pages: list[int]) -> list:
        if len(pages) != self.num_pages(adapter):
            raise ValueError(f"adapter {adapter.name!r} takes {self.num_pages(adapter)} pages, "
                             f"given {len(pages)}")
        return list(self._groups(adapter))

    def _place(self, adapter: LoraAdapter, groups: list, pages: list[int], placement_id: int,
               device: torch.device) -> ResidentAdapter:
        placed: dict[tuple[int, str], dict[str, PagedRows]] = {}
        used, next_page = 0, 0
        for layer, width, rows, num_pages in groups:
            pieces, stored = row_pieces(self.pool.page_numel, width)
            rpp = self.pool.rows_per_page(stored)
            group_pages = torch.tensor(pages[next_page:next_page + num_pages], device=device)
            next_page += num_pages
            row = 0
            for module, which, rank in rows:
                idx = torch.arange(row, row + rank, device=device)
                if pieces > 1:  # [rank, pieces]: one page per piece, each in slot 0
                    idx = idx[:, None] * pieces + torch.arange(pieces, device=device)
                placed.setdefault((layer, module), {})[which] = PagedRows(
                    pages=group_pages[idx // rpp], slots=idx % rpp)
                row += rank
            used += row * width
        modules = {lm: ResidentModule(a=p["a"], b=p["b"], scale=adapter.modules[lm].scale,
                                      dora=p.get("m"))
                   for lm, p in placed.items()}
        return ResidentAdapter(placement_id=placement_id, pages=list(pages), used_elements=used,
                               modules=modules)

    def _groups(self, adapter: LoraAdapter) -> Iterator[tuple[int, int, list, int]]:
        ranks = {lm: spec.rank for lm, spec in adapter.modules.items()}
        dora = {lm for lm, spec in adapter.modules.items() if spec.dora}
        return _groups(ranks, self.module_shapes, self.pool.page_numel, dora,
                       self.scale_widths)


def _row_tensor(w: ModuleWeights, which: str) -> torch.Tensor:
    """The rows of kind ``which`` ("a", "b" or "m", DoRA's output scale as one row)."""
    return w.a if which == "a" else w.b_t if which == "b" else w.dora.unsqueeze(0)


def packed_pages(ranks: Mapping[tuple[int, str], int], module_shapes: dict[str, tuple[int, int]],
                 page_numel: int) -> int:
    """Pages that LoRA rows of ``ranks`` (``(layer, module) -> rank``) take when packed as
    :class:`AdapterPacker` packs them, before any padding the allocator adds; e.g. max_lora_rank
    on every module of every layer sizes a static layout's adapter slot (a DoRA adapter takes
    one more row per module). Rows wider than a page are split (see :class:`AdapterPacker`).
    """
    return sum(n for *_, n in _groups(ranks, module_shapes, page_numel))


def _groups(ranks: Mapping[tuple[int, str], int], module_shapes: dict[str, tuple[int, int]],
            page_numel: int, dora: frozenset | set = frozenset(),
            scale_widths: Mapping[str, int] | None = None
            ) -> Iterator[tuple[int, int, list, int]]:
    """Yields ``(layer, width, rows, num_pages)``; rows are ``(module, "a"|"b"|"m", rank)`` in
    a fixed order (by module, then A before B^T before a DoRA module's one scale row, for the
    ``(layer, module)`` in ``dora``, ``scale_widths[module]`` wide, else ``out_features``)."""
    for layer in sorted({layer for layer, _ in ranks}):
        by_width: dict[int, list] = {}
        for module in LORA_MODULES:
            rank = ranks.get((layer, module))
            if rank is None:
                continue
            in_f, out_f = module_shapes[module]
            by_width.setdefault(in_f, []).append((module, "a", rank))
            by_width.setdefault(out_f, []).append((module, "b", rank))
            if (layer, module) in dora:
                width = (scale_widths or {}).get(module, out_f)
                by_width.setdefault(width, []).append((module, "m", 1))
        for width, rows in sorted(by_width.items()):
            pieces, stored = row_pieces(page_numel, width)
            num_rows = sum(r for *_, r in rows) * pieces
            yield layer, width, rows, -(-num_rows // rows_per_page(page_numel, stored))
