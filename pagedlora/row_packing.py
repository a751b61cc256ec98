"""RowPlan: where an adapter's rank rows go in its pages (arithmetic only, no torch).

An adapter's weights are rows of a few widths (``in_features`` for lora_A, ``out_features``
for lora_B^T and a DoRA module's scale row, ``vocab_size`` for the vocabulary modules). Packed
per layer and width, every (layer, width) group leaves the tail of its last page unused:
for small ranks most of the adapter's pages (a rank-4 q,v adapter of SmolLM2 used 42% of its
90 pages). Packed across layers and modules instead, widest rows first, each narrower width
filling the gaps the wider ones left (at slots aligned to its own width, so that a row still
sits whole in one page at ``slot * width``, where kernels find it; a row stored in narrow
pieces, below, has each piece so), an adapter loses at most the tail of its last page plus
gaps narrower than its narrowest row: the same adapter takes 10 pages, 94% used. (First-fit
decreasing bin packing, with the bins' positions restricted to multiples of the item size.)

Two kinds of waste are left. Where a width does not divide the page and no narrower row fills
the rest, every page of that width keeps a slack (SmolLM2's 576-wide rows leave 384 of 6,144
elements): such rows are split into equal narrower pieces that divide the page
(:func:`row_pieces`, :func:`stored_groups`), which the torch kernels read out of the pool and
join, and the Triton kernels address in place, a page and slot per piece. And the tail of
the last page: a rank-1 adapter smaller than a page wastes most of its only page. So the rows
of a partly used last page (:attr:`RowPlan.tail`) may go instead to pages several adapters
share (:class:`~pagedlora.shared_pages.SharedPages`, which places them with :func:`fill_gaps`
at the same aligned slots).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

#: Most pieces a row that fits a page is split into (``row_pieces(narrow=True)``).
MAX_NARROW_PIECES = 16


def row_pieces(page_numel: int, width: int, *, narrow: bool = False) -> tuple[int, int]:
    """How a rank row of ``width`` elements is stored: ``(pieces, stored_width)``. A row that
    fits a page is one stored row of its own width; a wider one (a vocabulary-sized row) is
    split into ``ceil(width / page_numel)`` pieces of ``page_numel`` elements, each filling a
    page (the last one zero-padded).

    With ``narrow`` (what the engine packs, for every kernel backend), a row
    that fits a page but whose width leaves more than 1% of each page unused
    (``page_numel % width``) is split into the fewest equal pieces, at most
    :data:`MAX_NARROW_PIECES`, whose width leaves at most 1%: SmolLM2's 576-wide rows fill
    10 x 576 = 5,760 of a 6,144-element page, 3 pieces of 192 fill all of it. A row no such
    split helps stays whole."""
    if width > page_numel:
        return -(-width // page_numel), page_numel
    if narrow and 100 * (page_numel % width) > page_numel:
        for pieces in range(2, MAX_NARROW_PIECES + 1):
            if width % pieces == 0 and 100 * (page_numel % (width // pieces)) <= page_numel:
                return pieces, width // pieces
    return 1, width


@dataclass(frozen=True)
class RowGroup:
    """``count`` rows of ``width`` elements that stay together (one matrix of one module).

    Attributes:
        key: names the group (e.g. ``(layer, module, "a")``); unique within a plan.
        width: elements per row (may exceed a page: the row is then split, see
            :func:`pack_rows`).
        count: rows (the rank, or 1 for a DoRA scale row).
    """

    key: Hashable
    width: int
    count: int


@dataclass(frozen=True)
class RowPlan:
    """Where each group's rows go, in pages local to the adapter (``0 .. num_pages - 1``).

    Attributes:
        num_pages: pages the rows take.
        places: ``key -> (pages, slots)``: per row of the group, in order, its page and its slot
            in the page seen as rows of the group's width. A row wider than a page has
            ``pieces`` entries (its pieces' pages, slot 0 each, in the page-wide view).
        tail: ``width -> rows`` on the last page (``num_pages - 1``) when it is partly used
            and holds no piece of a split row, widest first; empty otherwise. Those rows fit
            one empty page packed by :func:`fill_gaps`, widest first.
    """

    num_pages: int
    places: dict[Hashable, tuple[list[int], list[int]]]
    tail: dict[int, int]


def stored_groups(groups: Sequence[RowGroup], page_numel: int, *, narrow: bool
                  ) -> list[RowGroup]:
    """``groups`` as :func:`pack_rows` packs them: a group whose rows :func:`row_pieces`
    splits into narrow pieces (``narrow``) becomes ``count * pieces`` rows of the stored width
    (a row's pieces consecutive); rows wider than a page stay as they are (``pack_rows``
    splits them)."""
    out = []
    for g in groups:
        pieces, stored = row_pieces(page_numel, g.width, narrow=narrow)
        out.append(g if g.width > page_numel or pieces == 1
                   else RowGroup(g.key, stored, g.count * pieces))
    return out


def pack_rows(groups: Sequence[RowGroup], page_numel: int) -> RowPlan:
    """Packs the groups' rows into pages of ``page_numel`` elements.

    Rows wider than a page go first, each split into page-wide pieces on pages of their own
    (the last piece's page keeps its tail free for narrower rows). Then each width, widest
    first: its rows fill the free gaps left so far (page by page, at slots aligned to the
    width), then fresh pages, whose tails become gaps for the narrower widths. Within a width
    the groups' rows are placed in the order given.

    The pages never exceed ``upper_bound_pages`` (each width packed on its own pages), which
    grows with every group's count: what sizes a static layout's slot.

    Raises:
        ValueError: a group of width or count below 1, or two groups with one key.
    """
    if len({g.key for g in groups}) != len(groups):
        raise ValueError("row groups must have distinct keys")
    for g in groups:
        if g.width < 1 or g.count < 1:
            raise ValueError(f"row group {g.key!r} has width {g.width} and count {g.count}")
    places: dict[Hashable, tuple[list[int], list[int]]] = {}
    gaps: list[tuple[int, int, int]] = []  # (page, start, end) free elements, in page order
    num_pages = 0
    for g in groups:
        if g.width <= page_numel:
            continue
        pieces = row_pieces(page_numel, g.width)[0]
        tail = g.width - (pieces - 1) * page_numel  # elements of the last piece
        pages = list(range(num_pages, num_pages + g.count * pieces))
        places[g.key] = (pages, [0] * len(pages))
        if tail < page_numel:
            gaps.extend((num_pages + (i + 1) * pieces - 1, tail, page_numel)
                        for i in range(g.count))
        num_pages += len(pages)
    split_pages = num_pages
    for width in sorted({g.width for g in groups if g.width <= page_numel}, reverse=True):
        members = [g for g in groups if g.width == width]
        pages, slots, gaps = fill_gaps(gaps, width, sum(g.count for g in members))
        rest = sum(g.count for g in members) - len(pages)
        per_page = page_numel // width
        for i in range(rest):
            pages.append(num_pages + i // per_page)
            slots.append(i % per_page)
        fresh = -(-rest // per_page)
        for p in range(fresh):
            used = per_page if p < fresh - 1 else rest - (fresh - 1) * per_page
            if used * width < page_numel:
                gaps.append((num_pages + p, used * width, page_numel))
        num_pages += fresh
        at = 0
        for g in members:
            places[g.key] = (pages[at:at + g.count], slots[at:at + g.count])
            at += g.count
    return RowPlan(num_pages, places, _tail(groups, places, num_pages, split_pages, page_numel))


def _tail(groups: Sequence[RowGroup], places: dict[Hashable, tuple[list[int], list[int]]],
          num_pages: int, split_pages: int, page_numel: int) -> dict[int, int]:
    """Rows per width on the last page, when it is partly used and not a split row's."""
    last = num_pages - 1
    if last < split_pages:
        return {}
    rows: dict[int, int] = {}
    for g in groups:
        rows[g.width] = rows.get(g.width, 0) + sum(p == last for p in places[g.key][0])
    if sum(w * n for w, n in rows.items()) == page_numel:
        return {}
    return {w: rows[w] for w in sorted(rows, reverse=True) if rows[w]}


def fill_gaps(gaps: list[tuple[int, int, int]], width: int, wanted: int
              ) -> tuple[list[int], list[int], list[tuple[int, int, int]]]:
    """Up to ``wanted`` rows of ``width`` placed in ``gaps`` (``(page, start, end)`` free
    elements) in order: ``(pages, slots, gaps left)``, each row at ``slot * width`` of its
    page; what a gap does not use (before its first aligned slot, after its last used one)
    stays a gap."""
    pages: list[int] = []
    slots: list[int] = []
    left: list[tuple[int, int, int]] = []
    for i, (page, start, end) in enumerate(gaps):
        if len(pages) == wanted:
            left.extend(gaps[i:])
            break
        first = -(-start // width)
        take = min(end // width - first, wanted - len(pages))
        if take <= 0:
            left.append((page, start, end))
            continue
        pages.extend([page] * take)
        slots.extend(range(first, first + take))
        if start < first * width:
            left.append((page, start, first * width))
        if (first + take) * width < end:
            left.append((page, (first + take) * width, end))
    return pages, slots, left


def upper_bound_pages(groups: Sequence[RowGroup], page_numel: int) -> int:
    """Pages of ``groups`` with each width on pages of its own (a wide row's pieces one page
    each): at least what :func:`pack_rows` takes, and never fewer for more or wider-ranked
    rows, so a slot of this size holds any adapter with fewer rows of each width."""
    total = sum(g.count * row_pieces(page_numel, g.width)[0] for g in groups
                if g.width > page_numel)
    for width in {g.width for g in groups if g.width <= page_numel}:
        rows = sum(g.count for g in groups if g.width == width)
        total += -(-rows // (page_numel // width))
    return total
