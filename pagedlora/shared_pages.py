"""SharedPages: pool pages that hold the last rows of several adapters (their page tails).

Packed across layers and modules (:func:`~pagedlora.row_packing.pack_rows`), an adapter
wastes only the unused tail of its last page; for small adapters that tail is most of what
they take (a rank-1 q,v adapter of the toy model fills 448 of a page's 1,024 elements, one of
SmolLM2 loses 6% of its 10 pages). The rows of that last page (:attr:`RowPlan.tail`) go instead
to pages that several adapters share, into the free gaps earlier tails left, at slots aligned
to each row's width (a row or piece still sits whole in one page, at ``slot * width``), and
to a fresh page only when no gap holds them. A shared page goes back to the pool when its last
tenant leaves; the allocator counts it reclaimable while every tenant is
(:meth:`~pagedlora.scheduler.page_allocator.PageAllocator.share`). This is the slab idea
(Bonwick 1994) applied to S-LoRA's unified pages (Sheng et al. 2023, section 4.1), whose own
pages are one row wide and so never need it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from pagedlora.row_packing import fill_gaps
from pagedlora.scheduler import ADAPTER, PageAllocator


@dataclass(frozen=True)
class TailSpots:
    """Where an adapter's tail rows sit in shared pages.

    Attributes:
        rows: ``width -> (pages, slots)``: per tail row of that width, in the order of the
            plan's rows on its last page, the shared page and the slot (``slot * width``
            elements into the page).
    """

    rows: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        """``(page, start, end)``: the elements each row holds."""
        return [(page, slot * width, (slot + 1) * width)
                for width, (pages, slots) in self.rows.items()
                for page, slot in zip(pages, slots, strict=True)]

    @property
    def pages(self) -> frozenset[int]:
        """The shared pages the rows are in."""
        return frozenset(p for pages, _ in self.rows.values() for p in pages)


class SharedPages:
    """The free gaps of the shared pages, and which adapter holds which rows in them.

    The adapter store is the one caller (under its lock, placements from the engine's thread
    only). The allocator owns the page accounting (tenants, reclaimable, freed); this class
    owns the layout inside the pages.

    Args:
        allocator: the pool's allocator (fresh pages are allocated as ``"adapter"`` pages).
        page_numel: elements in a page.
    """

    def __init__(self, allocator: PageAllocator, page_numel: int) -> None:
        self.allocator = allocator
        self.page_numel = page_numel
        self._gaps: dict[int, list[tuple[int, int]]] = {}  # shared page -> free (start, end)
        self._spots: dict[Hashable, TailSpots] = {}

    @property
    def pages(self) -> list[int]:
        """The shared pages now, ascending."""
        return sorted(self._gaps)

    def spots(self, unit: Hashable) -> TailSpots | None:
        """Where ``unit``'s tail rows are (None when it has none)."""
        return self._spots.get(unit)

    def place(self, unit: Hashable, tail: Mapping[int, int]) -> TailSpots:
        """Finds room for ``unit``'s tail rows (``width -> rows``, as :attr:`RowPlan.tail`):
        gaps of the shared pages first (in page order, widest rows first), else one fresh page
        (the allocator may reclaim for it, as for any allocation); ``unit`` becomes a tenant of
        each page used.

        Raises:
            ValueError: ``unit`` holds rows already, or a width exceeds a page.
            OutOfPagesError: no gap holds the rows and no page can be had; nothing changes.
        """
        if unit in self._spots:
            raise ValueError(f"{unit!r} holds shared rows already")
        if any(w > self.page_numel for w in tail):
            raise ValueError(f"tail rows of widths {sorted(tail)} exceed a page of "
                             f"{self.page_numel} elements")
        fit = self._fit(tail)
        if fit is None:
            page = self.allocator.allocate(1, ADAPTER)[0]  # may reclaim: forget() runs first
            self._gaps[page] = [(0, self.page_numel)]
            fit = self._fit(tail)
            if fit is None or page not in fit[0].pages:
                # unused: reclaiming for it opened a gap that holds the rows, or (never: the
                # rows came from one page packed the same way) they do not fit it
                del self._gaps[page]
                self.allocator.free([page])
                if fit is None:
                    raise AssertionError(f"tail {dict(tail)} does not fit an empty page")
                del fit[1][page]
        spots, gaps = fit
        self._gaps = gaps
        for page in spots.pages:
            self.allocator.share(page, unit)
        self._spots[unit] = spots
        return spots

    def release(self, unit: Hashable) -> None:
        """``unit``'s rows leave their pages (it was removed, or its reservation dropped);
        pages left without a tenant go back to the pool. A no-op for a unit without rows.

        Raises:
            ValueError: ``unit`` is offered as reclaimable (withdraw it first).
        """
        spots = self._spots.get(unit)
        if spots is None:
            return
        for page in spots.pages:
            if self.allocator.unshare(page, unit):
                self._gaps.pop(page)
        del self._spots[unit]
        self._give_back(spots)

    def forget(self, unit: Hashable) -> None:
        """``unit``'s rows are gone: the allocator reclaimed it (and freed the pages it was
        the last tenant of). A no-op for a unit without rows."""
        spots = self._spots.pop(unit, None)
        if spots is None:
            return
        for page in spots.pages:
            if not self.allocator.tenants_of(page):
                self._gaps.pop(page, None)
        self._give_back(spots)

    def check_invariants(self) -> None:
        """Asserts that the rows and gaps of every shared page tile it exactly, and that its
        tenants are the units with rows in it (for tests).

        Raises:
            AssertionError: naming the page.
        """
        held: dict[int, list[tuple[int, int]]] = {p: list(g) for p, g in self._gaps.items()}
        tenants: dict[int, set[Hashable]] = {p: set() for p in self._gaps}
        for unit, spots in self._spots.items():
            for page, start, end in spots.spans:
                assert page in held, f"{unit!r} holds rows in page {page}, not a shared page"
                held[page].append((start, end))
                tenants[page].add(unit)
        for page, pieces in held.items():
            assert tenants[page], f"shared page {page} holds no rows (a leak)"
            pieces.sort()
            assert pieces and pieces[0][0] == 0 and pieces[-1][1] <= self.page_numel, (
                f"shared page {page}: {pieces[:3]}...")
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:], strict=False)), (
                f"shared page {page}: rows and gaps overlap or leave a hole")
            assert tenants[page] == set(self.allocator.tenants_of(page)), (
                f"shared page {page}: rows of {tenants[page]}, tenants "
                f"{set(self.allocator.tenants_of(page))}")

    # -- internals ----------------------------------------------------------------------------

    def _fit(self, tail: Mapping[int, int]
             ) -> tuple[TailSpots, dict[int, list[tuple[int, int]]]] | None:
        """The rows placed in the gaps, widest first, and the gaps left; None if they do not
        all fit (nothing is changed either way)."""
        gaps = [(p, s, e) for p in sorted(self._gaps) for s, e in self._gaps[p]]
        rows = {}
        for width in sorted(tail, reverse=True):
            pages, slots, gaps = fill_gaps(gaps, width, tail[width])
            if len(pages) < tail[width]:
                return None
            rows[width] = (tuple(pages), tuple(slots))
        left: dict[int, list[tuple[int, int]]] = {p: [] for p in self._gaps}
        for page, start, end in gaps:
            left[page].append((start, end))
        for pieces in left.values():
            pieces.sort()
        return TailSpots(rows), left

    def _give_back(self, spots: TailSpots) -> None:
        """The spans of ``spots`` become gaps again (merged with their neighbours) in the
        pages still shared."""
        for page, start, end in spots.spans:
            gaps = self._gaps.get(page)
            if gaps is None:
                continue
            gaps.append((start, end))
            gaps.sort()
            merged = [gaps[0]]
            for s, e in gaps[1:]:
                if s == merged[-1][1]:
                    merged[-1] = (merged[-1][0], e)
                else:
                    merged.append((s, e))
            self._gaps[page] = merged
