"""AdapterPacker: an adapter's rank rows packed into unified-pool pages, and back out."""

from __future__ import annotations

from collections.abc import Mapping
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
from pagedlora.pool import UnifiedPool
from pagedlora.row_packing import (
    RowGroup,
    RowPlan,
    pack_rows,
    row_pieces,
    stored_groups,
    upper_bound_pages,
)
from pagedlora.shared_pages import TailSpots
from pagedlora.step_upload import to_device


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
        pages: the pages it holds alone.
        used_elements: elements holding its weights, in those pages and its spans (the rest
            of its own pages is internal fragmentation: gaps narrower than its narrowest row,
            see :func:`~pagedlora.row_packing.pack_rows`; in the static layout the rest of its
            max-rank slot).
        modules: ``(layer, module) -> ResidentModule``.
        spans: ``(page, start, end)``: the elements its tail rows hold in pages shared with
            other adapters (:class:`~pagedlora.shared_pages.SharedPages`); empty when its last
            page is its own.
    """

    placement_id: int
    pages: list[int]
    used_elements: int
    modules: dict[tuple[int, str], ResidentModule]
    spans: tuple[tuple[int, int, int], ...] = ()

    @property
    def shared_pages(self) -> frozenset[int]:
        """The shared pages its tail rows are in."""
        return frozenset(p for p, _, _ in self.spans)

    def overlaps(self, other: ResidentAdapter) -> bool:
        """Whether the two placements hold a common pool element (then one of them is stale:
        its pages were freed and given to the other)."""
        mine, theirs = set(self.pages), set(other.pages)
        if mine & (theirs | other.shared_pages) or theirs & self.shared_pages:
            return True
        return any(p == q and s < f and t < e for p, s, e in self.spans
                   for q, t, f in other.spans)


@dataclass(frozen=True)
class AdapterFootprint:
    """The pages an adapter takes: ``own_pages`` of its own, and ``tail`` rows
    (``width -> rows``, :attr:`~pagedlora.row_packing.RowPlan.tail`) for pages shared with
    other adapters (empty when its last page is its own, as in the static layout)."""

    own_pages: int
    tail: dict[int, int]

    @property
    def max_pages(self) -> int:
        """The most pages placing it can take: its own and, for a tail that finds no gap,
        one fresh shared page."""
        return self.own_pages + bool(self.tail)


class AdapterPages(Protocol):
    """Where the adapter store's adapters go in the pool: :class:`AdapterPacker` in this
    process, or a tensor-parallel engine's workers
    (:class:`pagedlora.parallel.executor.ShardedAdapterPages`)."""

    def footprint(self, adapter: LoraAdapter) -> AdapterFootprint:
        """Pages ``adapter`` takes in the pool: its own, and its tail rows."""

    def fill(self, adapter: LoraAdapter, weights: AdapterWeights, pages: list[int],
             placement_id: int, tail: TailSpots | None = None) -> ResidentAdapter:
        """Puts the adapter's rows into ``pages`` and ``tail``; returns the placement."""

    def host_form(self, weights: AdapterWeights) -> AdapterWeights:
        """The form in which host memory holds ``weights`` (the host tier's one copy)."""


class AdapterPacker:
    """Packs adapters into pool pages (S-LoRA, section 4.1, unified paging).

    An adapter's rank rows, of every layer and target module, are packed by
    :func:`~pagedlora.row_packing.pack_rows`: grouped by row width (``in_features`` for
    lora_A, ``out_features`` for lora_B^T and a DoRA module's output scale, one row) across
    layers and modules, widest first, each narrower width filling the gaps the wider ones
    left at slots aligned to its width. So an adapter of rank r takes pages in proportion to
    r with no padding to max_lora_rank, loses at most gaps narrower than its narrowest row
    (and its last page's tail, unless that goes to a shared page), and a decoder projection's
    row, or each of its narrow pieces, sits whole in one page at ``slot * width`` (the pieces
    of one row may be on different pages: each has its own page and slot). The vocabulary modules
    (``embed_tokens``, ``lm_head``; "layer" ``VOCAB_LAYER``) have rows of ``vocab_size``
    elements (the embedding's lora_A, lm_head's lora_B^T), often wider than a page: such a row
    is split into page-wide pieces, one page each (the last one's tail free for narrower
    rows), and read back out of the pool whole (:meth:`UnifiedPool.read_rows`); with
    ``narrow_pieces``, so are rows whose width leaves part of each page unused, stored as
    equal pieces that do not (:func:`~pagedlora.row_packing.row_pieces`). Where the allocator
    shares adapters' page tails (``shares_adapter_tails``, the unified layout), the rows of a
    partly used last page go to pages several adapters share
    (:class:`~pagedlora.shared_pages.SharedPages` places them; :meth:`fill` is told where). The
    static layout charges more (``adapter_footprint``: a whole max-rank slot); the rows then
    fill the first pages it hands out.

    Args:
        pool: the unified pool.
        module_shapes: ``module -> (in_features, out_features)``, decoder projections and
            (optionally) the vocabulary modules: the widths of lora_A and lora_B^T rows (under
            tensor parallelism a rank's, ``Shard.lora_widths``).
        scale_widths: ``module -> width`` of a DoRA module's output scale row where it is not
            ``out_features`` (a tensor-parallel rank's, ``Shard.dora_widths``).
        narrow_pieces: split rows whose width leaves more than 1% of a page unused into
            equal pieces that leave less (``row_pieces(narrow=True)``). Every kernel takes
            them: the torch ones read rows out of the pool (:meth:`UnifiedPool.read_rows`),
            the Triton ones address each piece in place; False (whole rows) is for layout
            comparisons.
    Raises:
        ValueError: a decoder projection's row width exceeds a page (raise block_size).
    """

    def __init__(self, pool: UnifiedPool, *, module_shapes: dict[str, tuple[int, int]],
                 scale_widths: dict[str, int] | None = None,
                 narrow_pieces: bool = True) -> None:
        self.pool = pool
        self.module_shapes = module_shapes
        self.scale_widths = scale_widths or {}
        self.narrow_pieces = narrow_pieces
        for width in {w for m, shape in module_shapes.items() if m in TARGET_MODULES
                      for w in shape}:
            pool.rows_per_page(width)  # fail early if a row cannot fit a page
        # adapters of one shape share their plan and its rows per width
        self._plans: dict[tuple, tuple[RowPlan, tuple[_WidthRows, ...]]] = {}

    def footprint(self, adapter: LoraAdapter) -> AdapterFootprint:
        """Pages ``adapter`` takes in the pool (its packed rows, as the allocator charges
        them): its own pages, and the rows of its last page when they go to shared pages.

        Raises:
            ValueError: it exceeds a static layout's slot.
        """
        return self._footprint(self._plan(adapter)[1])

    def fill(self, adapter: LoraAdapter, weights: AdapterWeights, pages: list[int],
             placement_id: int, tail: TailSpots | None = None) -> ResidentAdapter:
        """Copies the adapter's rows into ``pages`` (allocated for it:
        :meth:`footprint`'s ``own_pages``) and, for the rows of its last page, the shared
        spots ``tail``; host -> pool.

        Args:
            weights: the rows to copy, of the widths this packer packs (under tensor
                parallelism a rank's shard, ``Shard.shard_lora``; strided views are fine).
        Raises:
            ValueError: ``pages`` has another length than the footprint's own pages, or
                ``tail`` does not hold its tail rows (or is given for an adapter without).
        """
        return self._layout(adapter, pages, placement_id, self.pool.tensor.device, tail,
                            weights)

    def place(self, adapter: LoraAdapter, pages: list[int], placement_id: int,
              tail: TailSpots | None = None) -> ResidentAdapter:
        """Where :meth:`fill` puts the adapter's rows in ``pages`` and ``tail``, copying
        nothing (the driver of a tensor-parallel engine, whose workers fill their pools; the
        page tables are on the CPU).

        Raises:
            ValueError: as :meth:`fill`.
        """
        return self._layout(adapter, pages, placement_id, torch.device("cpu"), tail)

    def host_form(self, weights: AdapterWeights) -> AdapterWeights:
        """How host memory holds weights for this packer: as read."""
        return weights

    def _layout(self, adapter: LoraAdapter, pages: list[int], placement_id: int,
                device: torch.device, tail: TailSpots | None = None,
                weights: AdapterWeights | None = None) -> ResidentAdapter:
        """The placement of the adapter's rows in ``pages`` and ``tail`` by its plan, copying
        ``weights`` into the pool when given."""
        groups, plan, width_rows = self._plan(adapter)
        need = self._footprint(plan)
        if len(pages) != need.own_pages:
            raise ValueError(f"adapter {adapter.name!r} takes {need.own_pages} pages of its "
                             f"own, given {len(pages)}")
        given = {w: len(p) for w, (p, _) in tail.rows.items()} if tail is not None else {}
        if given != need.tail:
            raise ValueError(f"adapter {adapter.name!r} has tail rows {need.tail} for shared "
                             f"pages, given spots for {given}")
        own = torch.tensor(pages, dtype=torch.long)
        taken: dict[int, int] = {}  # per stored width, the tail spots handed out so far
        placed: dict[tuple[int, str], dict[str, PagedRows]] = {}
        for rows in width_rows:
            absolute = _absolute(rows, own, tail, taken)
            at_pages, at_slots = (to_device(t, device) for t in absolute)
            if weights is not None:
                data = to_device(torch.cat([_row_tensor(weights[g.key[:2]], g.key[2])
                                            for g in rows.members]), device)  # [rows, width]
                if rows.pieces > 1:  # [rows * pieces, stored], a wide row's last piece padded
                    split = data.new_zeros(data.shape[0], rows.pieces * rows.stored)
                    split[:, :rows.width] = data
                    data = split.view(-1, rows.stored)
                self.pool.rows(rows.stored)[at_pages, at_slots] = data
            at = 0
            for g in rows.members:
                n = g.count * rows.pieces
                placed_rows = PagedRows(at_pages[at:at + n], at_slots[at:at + n])
                if rows.pieces > 1:  # [rank, pieces]: a wide row's one page per piece, slot 0
                    placed_rows = PagedRows(placed_rows.pages.view(g.count, rows.pieces),
                                            placed_rows.slots.view(g.count, rows.pieces))
                placed.setdefault(g.key[:2], {})[g.key[2]] = placed_rows
                at += n
        modules = {lm: ResidentModule(a=p["a"], b=p["b"], scale=adapter.modules[lm].scale,
                                      dora=p.get("m"))
                   for lm, p in placed.items()}
        used = sum(g.count * g.width for g in groups)
        return ResidentAdapter(placement_id=placement_id, pages=list(pages), used_elements=used,
                               modules=modules,
                               spans=tuple(tail.spans) if tail is not None else ())

    def _footprint(self, plan: RowPlan) -> AdapterFootprint:
        """What ``plan`` takes, as the allocator charges it (see :meth:`footprint`)."""
        allocator = self.pool.allocator
        if plan.tail and allocator.shares_adapter_tails:
            return AdapterFootprint(plan.num_pages - 1, dict(plan.tail))
        return AdapterFootprint(allocator.adapter_footprint(plan.num_pages), {})

    def _pieces(self, width: int) -> tuple[int, int]:
        """``(pieces, stored width)`` of a row of ``width`` (:func:`row_pieces`)."""
        return row_pieces(self.pool.page_numel, width, narrow=self.narrow_pieces)

    def _plan(self, adapter: LoraAdapter
              ) -> tuple[list[RowGroup], RowPlan, tuple[_WidthRows, ...]]:
        """The adapter's row groups, where they go, and the plan's rows per width (widest
        first); a group of rows split into narrow pieces is packed as its pieces (``count *
        pieces`` rows of the stored width)."""
        ranks = {lm: spec.rank for lm, spec in adapter.modules.items()}
        dora = {lm for lm, spec in adapter.modules.items() if spec.dora}
        groups = _groups(ranks, self.module_shapes, dora, self.scale_widths)
        key = tuple((g.key, g.count) for g in groups)
        cached = self._plans.get(key)
        if cached is None:
            page_numel = self.pool.page_numel
            plan = pack_rows(stored_groups(groups, page_numel, narrow=self.narrow_pieces),
                             page_numel)
            cached = self._plans[key] = (plan, self._width_rows(groups, plan))
        return groups, *cached

    def _width_rows(self, groups: list[RowGroup], plan: RowPlan) -> tuple[_WidthRows, ...]:
        """``plan``'s rows per width, widest first: the rows of split wide rows go first, so
        the zero tails of their last pieces are written before the narrower rows that fill
        those gaps."""
        out = []
        for width in sorted({g.width for g in groups}, reverse=True):
            members = tuple(g for g in groups if g.width == width)
            pieces, stored = self._pieces(width)
            local = [p for g in members for p in plan.places[g.key][0]]
            slots = [s for g in members for s in plan.places[g.key][1]]
            out.append(_WidthRows(width, members, pieces, stored,
                                  torch.tensor(local, dtype=torch.long),
                                  torch.tensor(slots, dtype=torch.long)))
        return tuple(out)


@dataclass(frozen=True)
class _WidthRows:
    """A plan's rows of one width, in group order (a row split into pieces as its pieces).

    Attributes:
        width: elements of a row. members: the groups of that width.
        pieces, stored: each row is stored as ``pieces`` pieces of ``stored`` elements.
        local, slots: ``[sum(count * pieces)]`` int64 plan-local pages and slots.
    """

    width: int
    members: tuple[RowGroup, ...]
    pieces: int
    stored: int
    local: torch.Tensor
    slots: torch.Tensor


def _absolute(rows: _WidthRows, pages: torch.Tensor, tail: TailSpots | None,
              taken: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` int64 pool pages and slots of ``rows`` (plan-local pages and slots): local page
    ``i`` is ``pages[i]``; the rows on the page past them (the tail), in order, take the next
    spots of ``tail.rows[rows.stored]`` (``taken`` counts those already handed out per stored
    width: rows of several widths stored as one take them in turn)."""
    on_tail = rows.local >= pages.shape[0]
    n_tail = int(on_tail.sum())
    if n_tail == 0:
        return pages[rows.local], rows.slots.clone()
    start = taken.get(rows.stored, 0)
    taken[rows.stored] = start + n_tail
    spot_pages, spot_slots = tail.rows[rows.stored]
    at_pages, at_slots = torch.empty_like(rows.local), rows.slots.clone()
    at_pages[~on_tail] = pages[rows.local[~on_tail]]
    at_pages[on_tail] = torch.tensor(spot_pages[start:start + n_tail], dtype=torch.long)
    at_slots[on_tail] = torch.tensor(spot_slots[start:start + n_tail], dtype=torch.long)
    return at_pages, at_slots


def _row_tensor(w: ModuleWeights, which: str) -> torch.Tensor:
    """The rows of kind ``which`` ("a", "b" or "m", DoRA's output scale as one row)."""
    return w.a if which == "a" else w.b_t if which == "b" else w.dora.unsqueeze(0)


def packed_pages(ranks: Mapping[tuple[int, str], int], module_shapes: dict[str, tuple[int, int]],
                 page_numel: int) -> int:
    """Pages that hold any adapter whose rows of each width are no more than those of
    ``ranks`` (``(layer, module) -> rank``), e.g. max_lora_rank on every module of every layer
    for a static layout's adapter slot: :func:`~pagedlora.row_packing.upper_bound_pages`,
    each width packed on pages of its own (:class:`AdapterPacker` packs tighter; a DoRA
    adapter has one more row per module). Rows wider than a page are split (see
    :class:`AdapterPacker`).
    """
    return upper_bound_pages(_groups(ranks, module_shapes), page_numel)


def _groups(ranks: Mapping[tuple[int, str], int], module_shapes: dict[str, tuple[int, int]],
            dora: frozenset | set = frozenset(), scale_widths: Mapping[str, int] | None = None
            ) -> list[RowGroup]:
    """The adapter's row groups, keyed ``(layer, module, "a"|"b"|"m")``, in a fixed order (by
    layer, module, then A before B^T before a DoRA module's one scale row, for the
    ``(layer, module)`` in ``dora``, ``scale_widths[module]`` wide, else ``out_features``)."""
    order = {m: i for i, m in enumerate(LORA_MODULES)}
    groups = []
    for layer, module in sorted(ranks, key=lambda lm: (lm[0], order[lm[1]])):
        rank = ranks[(layer, module)]
        in_f, out_f = module_shapes[module]
        groups.append(RowGroup((layer, module, "a"), in_f, rank))
        groups.append(RowGroup((layer, module, "b"), out_f, rank))
        if (layer, module) in dora:
            width = (scale_widths or {}).get(module, out_f)
            groups.append(RowGroup((layer, module, "m"), width, 1))
    return groups
