"""PageAllocator: the unified pool's page ids and their accounting (pure Python, no torch)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

KV = "kv"
ADAPTER = "adapter"
_KINDS = (KV, ADAPTER)
# Reclaimable pages are taken in this order of their kind, least recently offered first
# within a kind: a cached KV block costs at most one block of recomputation for the next
# request with that prefix, an unpinned adapter a copy from host memory (or a disk read).
RECLAIM_ORDER = (KV, ADAPTER)


class OutOfPagesError(RuntimeError):
    """Raised by :meth:`PageAllocator.allocate` when fewer pages are available than asked."""


@dataclass(frozen=True)
class PoolStats:
    """Page counts of the pool now (see :meth:`PageAllocator.stats`).

    Attributes:
        num_pages: pages in the pool.
        kv: pages used by KV blocks (held by requests, or cached and reclaimable).
        adapter: pages used by adapters (pinned, or resident and reclaimable).
        free: pages on the free list.
        reclaimable_kv: pages of cached KV blocks no request holds.
        reclaimable_adapter: pages of resident adapters nothing pins.
    """

    num_pages: int
    kv: int
    adapter: int
    free: int
    reclaimable_kv: int
    reclaimable_adapter: int


@dataclass(frozen=True)
class _Offer:
    kind: str
    pages: tuple[int, ...]
    on_reclaim: Callable[[], None]


class PageAllocator:
    """One free list over ``num_pages`` pages that serve KV blocks and adapter rows alike,
    and the one place that knows how many pages each kind can have.

    Any free page serves any need, so the pool has no external fragmentation (S-LoRA, Sheng et
    al. 2023, section 4.1 "Unified Paging"). Pages are handed out in free-list order: at first
    ascending ids, later the oldest freed first (a deque, so both ends are O(1)).

    Besides used and free, a used page may be *reclaimable*: its owner (the KV block manager
    for a cached block nobody holds, the adapter store for an adapter nothing pins) offers the
    unit with :meth:`offer` and may take it back with :meth:`withdraw`. An allocation that
    finds the free list short reclaims offered units in :data:`RECLAIM_ORDER`, least recently
    offered first, telling each owner through its ``on_reclaim`` callback. So "how many pages
    can I get?" has one answer for every caller, :meth:`available` (free + reclaimable), as in
    vLLM's block pool, whose free queue holds the eviction candidates in eviction order.

    The questions that depend on the memory layout (:meth:`num_free_for`, :meth:`capacity`,
    :meth:`fits`, :meth:`adapter_footprint`, :attr:`kinds_share_pages`) are answered here,
    so that a layout with separate regions
    (:class:`~pagedlora.scheduler.static_allocator.StaticSplitAllocator`) runs under the same
    scheduler and adapter store.

    A used page may also be *shared*: several units hold parts of it (the adapter store packs
    small adapters' last rows into common pages, :class:`~pagedlora.shared_pages.SharedPages`).
    Its owner names the tenants with :meth:`share` and :meth:`unshare`; the page is freed when
    its last tenant leaves, and it is reclaimable while every tenant is offered: reclaiming the
    last of them frees it, and :meth:`available` counts it. A unit with no page of its own whose
    shared pages have a tenant still in use would free nothing, so reclaiming passes it over.

    Thread safety: one lock guards the lists, held only inside these methods (never while an
    owner's callback runs), so an owner may offer, withdraw or free from another thread (the
    adapter store does when an adapter is removed) while the engine's thread allocates.
    Allocation itself belongs to the engine's thread.
    """

    #: Whether freeing pages of one kind makes room for the other (here: always, one free list).
    kinds_share_pages = True
    #: Whether adapters' partly used last pages go to pages several adapters share (here: yes;
    #: see :meth:`share`).
    shares_adapter_tails = True

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._kind: list[str | None] = [None] * num_pages
        self._used = {kind: 0 for kind in _KINDS}
        # Offered units per kind, least recently offered first (an ordered dict, to withdraw
        # from the middle in O(1)).
        self._offers: dict[str, OrderedDict[Hashable, _Offer]] = {k: OrderedDict() for k in _KINDS}
        self._offered_pages = {kind: 0 for kind in _KINDS}
        self._offered: set[int] = set()  # every offered page
        # Shared pages: their tenants, each unit's shared pages, and how many tenants are
        # offered (a page all of whose tenants are offered counts in _offered_pages).
        self._tenants: dict[int, set[Hashable]] = {}
        self._shares: dict[Hashable, set[int]] = {}
        self._idle: dict[int, int] = {}
        self._lock = threading.Lock()

    # -- how many pages ---------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages on the free list now (of any kind)."""
        return len(self._free)

    def num_free_for(self, kind: str) -> int:
        """Free pages an allocation of ``kind`` could take now (all free pages here)."""
        return len(self._free)

    def capacity(self, kind: str) -> int:
        """Pages ``kind`` could hold if nothing else were allocated (the whole pool here)."""
        return self.num_pages

    def num_used(self, kind: str) -> int:
        """Pages used now by ``kind`` ("kv" or "adapter"), reclaimable ones included."""
        return self._used[kind]

    def num_reclaimable(self, kind: str) -> int:
        """Pages of ``kind`` whose owners offered them (see :meth:`offer`), shared pages all of
        whose tenants are offered included."""
        return self._offered_pages[kind]

    def available(self, kind: str) -> int:
        """Pages an allocation of ``kind`` could have now: free ones plus those reclaimable
        units would free."""
        return self.num_free_for(kind) + sum(
            self._offered_pages[k] for k in _KINDS if self._serves(k, kind))

    def can_allocate(self, n: int, kind: str) -> bool:
        """Whether ``n`` pages of ``kind`` could be allocated now (reclaiming as needed)."""
        return n <= self.available(kind)

    def fits(self, kv: int, adapter: int, *, keeping: Iterable[Hashable] = ()) -> bool:
        """Whether ``kv`` KV pages and ``adapter`` adapter pages could be had together now,
        when the offered units ``keeping`` are withdrawn first (a request's prefix-cache hits,
        its resident adapter). With one free list the sum must fit."""
        with self._lock:
            kept = self._kept(keeping)
            return kv + adapter <= self.num_free + sum(
                self._offered_pages[k] - kept[k] for k in _KINDS)

    def could_ever_fit(self, kv: int, adapter: int) -> bool:
        """Whether ``kv`` KV pages and ``adapter`` adapter pages fit the pool with every page
        free (a request that cannot is failed at once)."""
        return kv + adapter <= self.num_pages

    def adapter_footprint(self, num_pages: int) -> int:
        """Pages an adapter whose rows pack into ``num_pages`` pages takes here: exactly those
        (rank-proportional, no padding to max_lora_rank)."""
        return num_pages

    def stats(self) -> PoolStats:
        """The page counts now."""
        return PoolStats(self.num_pages, self._used[KV], self._used[ADAPTER], self.num_free,
                         self._offered_pages[KV], self._offered_pages[ADAPTER])

    # -- allocation -------------------------------------------------------------------------

    def allocate(self, n: int, kind: str) -> list[int]:
        """Takes ``n`` pages for ``kind``, reclaiming offered units (see the class docstring)
        when the free list is short; their owners' ``on_reclaim`` run before this returns.

        Returns:
            list of ``n`` distinct page ids.
        Raises:
            ValueError: unknown kind or negative n.
            OutOfPagesError: fewer than ``n`` pages available; nothing is taken then.
        """
        if kind not in _KINDS:
            raise ValueError(f"unknown page kind {kind!r}; expected one of {_KINDS}")
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        with self._lock:
            if n > self.available(kind):
                raise OutOfPagesError(f"asked for {n} {kind} pages, {self.available(kind)} "
                                      f"free of {self.capacity(kind)} (reclaimable included)")
            reclaimed = self._reclaim_locked(n, kind)
            pages = self._take(n, kind)
            for page in pages:
                self._kind[page] = kind
            self._used[kind] += n
        for offer in reclaimed:
            offer.on_reclaim()
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Returns ``pages`` to the free list.

        Raises:
            ValueError: a page id out of range, not in use (a double free), or offered (its
                owner must withdraw it first); nothing is freed then.
        """
        pages = list(pages)
        with self._lock:
            self._check_owned(pages)
            self._release_locked(pages)

    def reclaim(self, num_pages: int, kind: str) -> int:
        """Reclaims offered units of ``kind``, least recently offered first, until at least
        ``num_pages`` pages are freed or none is left (e.g. dropping the prefix cache, or
        evicting unpinned adapters on purpose).

        Returns:
            the pages freed (whole units, so possibly more than asked).
        """
        reclaimed = []
        with self._lock:
            offers, freed = self._offers[kind], 0
            while freed < num_pages:
                unit = self._next_useful_locked(offers)
                if unit is None:
                    break
                offer, released = self._pop_offer_locked(offers, unit)
                reclaimed.append(offer)
                freed += released
        for offer in reclaimed:
            offer.on_reclaim()
        return freed

    # -- reclaimable units --------------------------------------------------------------------

    def offer(self, unit: Hashable, pages: Iterable[int], kind: str,
              on_reclaim: Callable[[], None]) -> None:
        """Makes the used ``pages`` of ``unit`` reclaimable: an allocation may free them,
        calling ``on_reclaim()`` (outside the lock, before that allocation returns) so the
        owner forgets the unit. ``unit`` is any hashable id, unique across owners.

        Raises:
            ValueError: ``unit`` is already offered, or a page is not used by ``kind``.
        """
        pages = tuple(pages)
        with self._lock:
            if any(unit in offers for offers in self._offers.values()):
                raise ValueError(f"unit {unit!r} is offered already")
            wrong = [p for p in pages if not 0 <= p < self.num_pages or self._kind[p] != kind]
            if wrong:
                raise ValueError(f"pages {wrong[:5]} of unit {unit!r} are not used by {kind}")
            self._offers[kind][unit] = _Offer(kind, pages, on_reclaim)
            self._offered_pages[kind] += len(pages)
            self._offered.update(pages)
            for page in self._shares.get(unit, ()):
                self._idle[page] += 1
                if self._is_idle(page):
                    self._offered_pages[self._kind[page]] += 1

    def withdraw(self, unit: Hashable) -> bool:
        """Takes ``unit`` back from the reclaimable units (its owner uses it again).

        Returns:
            False when ``unit`` is not offered: never offered, withdrawn already, or reclaimed
            (then its ``on_reclaim`` has run or is about to, in the allocating thread).
        """
        with self._lock:
            for offers in self._offers.values():
                offer = offers.pop(unit, None)
                if offer is not None:
                    self._offered_pages[offer.kind] -= len(offer.pages)
                    self._offered.difference_update(offer.pages)
                    for page in self._shares.get(unit, ()):
                        if self._is_idle(page):
                            self._offered_pages[self._kind[page]] -= 1
                        self._idle[page] -= 1
                    return True
            return False

    def is_offered(self, unit: Hashable) -> bool:
        """Whether ``unit`` is reclaimable now."""
        return self._is_offered_locked(unit)

    def offered_pages(self, units: Iterable[Hashable]) -> int:
        """Pages of those of ``units`` that are reclaimable now."""
        with self._lock:
            return sum(self._kept(units).values())

    # -- shared pages ---------------------------------------------------------------------------

    def share(self, page: int, unit: Hashable) -> None:
        """Makes ``unit`` a tenant of the used ``page``: it holds part of it (a no-op if it
        does already). ``unit`` is then offered and withdrawn with its shared pages, and a
        shared page is reclaimable while every tenant is offered.

        Raises:
            ValueError: ``page`` is free or offered as part of a unit, or ``unit`` is offered
                now (take it back with :meth:`withdraw` first).
        """
        with self._lock:
            if not 0 <= page < self.num_pages or self._kind[page] is None:
                raise ValueError(f"page {page} is not allocated; allocate it before sharing")
            if page in self._offered:
                raise ValueError(f"page {page} is offered as part of a unit; it cannot be "
                                 f"shared")
            if self._is_offered_locked(unit):
                raise ValueError(f"unit {unit!r} is offered; withdraw it before it shares "
                                 f"page {page}")
            tenants = self._tenants.setdefault(page, set())
            if unit in tenants:
                return
            if self._is_idle(page):
                self._offered_pages[self._kind[page]] -= 1
            tenants.add(unit)
            self._idle.setdefault(page, 0)
            self._shares.setdefault(unit, set()).add(page)

    def unshare(self, page: int, unit: Hashable) -> bool:
        """``unit`` leaves ``page``; the page is freed when it was the last tenant.

        Returns:
            whether ``page`` was freed.
        Raises:
            ValueError: ``unit`` is not a tenant of ``page``, or is offered now.
        """
        with self._lock:
            tenants = self._tenants.get(page, set())
            if unit not in tenants:
                raise ValueError(f"unit {unit!r} does not share page {page}")
            if self._is_offered_locked(unit):
                raise ValueError(f"unit {unit!r} is offered; withdraw it before it leaves "
                                 f"page {page}")
            tenants.discard(unit)
            shares = self._shares[unit]
            shares.discard(page)
            if not shares:
                del self._shares[unit]
            if not tenants:
                del self._tenants[page], self._idle[page]
                self._release_locked([page])
                return True
            if self._is_idle(page):
                self._offered_pages[self._kind[page]] += 1
            return False

    def tenants_of(self, page: int) -> frozenset[Hashable]:
        """The units sharing ``page`` (empty for a page nobody shares)."""
        with self._lock:
            return frozenset(self._tenants.get(page, ()))

    # -- checks -------------------------------------------------------------------------------

    def kind_of(self, page: int) -> str | None:
        """The kind of a used page, None for a free one."""
        return self._kind[page]

    def check_invariants(self) -> None:
        """Asserts the free list, the kinds and the offers agree (for tests and debugging).

        Raises:
            AssertionError: a page both free and used, a duplicate in the free list, counts
                that do not add up, or an offered page that is free, of another kind or in two
                units.
        """
        free_list = self._free_pages()
        free = set(free_list)
        assert len(free) == len(free_list), "duplicate page in the free list"
        for page in range(self.num_pages):
            assert (page in free) == (self._kind[page] is None), f"page {page} free and used"
        for kind in _KINDS:
            assert self._used[kind] == sum(k == kind for k in self._kind), f"{kind} count"
        assert len(free) + sum(self._used.values()) == self.num_pages
        offered: set[int] = set()
        for kind, offers in self._offers.items():
            pages = [p for offer in offers.values() for p in offer.pages]
            assert all(self._kind[p] == kind for p in pages), f"offered {kind} page not {kind}"
            assert not offered & set(pages) and len(set(pages)) == len(pages), "page offered twice"
            offered.update(pages)
            idle = sum(self._kind[p] == kind and self._is_idle(p) for p in self._tenants)
            assert len(pages) + idle == self._offered_pages[kind], f"offered {kind} count"
        assert offered == self._offered, "offered pages disagree with the offers"
        for page, tenants in self._tenants.items():
            assert tenants and self._kind[page] is not None, f"shared page {page} free or empty"
            assert page not in self._offered, f"shared page {page} offered as a unit's own"
            assert all(page in self._shares.get(u, ()) for u in tenants), f"page {page} tenants"
            assert self._idle[page] == sum(self._is_offered_locked(u) for u in tenants), (
                f"shared page {page}: offered tenants miscounted")
        assert all(u in self._tenants[p] for u, ps in self._shares.items() for p in ps), (
            "a unit's shared pages disagree with their tenants")
        assert set(self._idle) == set(self._tenants), "idle counts of pages nobody shares"

    # -- internals ----------------------------------------------------------------------------

    def _serves(self, offered_kind: str, kind: str) -> bool:
        """Whether reclaiming pages of ``offered_kind`` makes room for ``kind``."""
        return self.kinds_share_pages or offered_kind == kind

    def _kept(self, units: Iterable[Hashable]) -> dict[str, int]:
        """Reclaimable pages per kind that withdrawing ``units`` would take back: their own,
        and the shared pages now reclaimable that one of them holds."""
        kept = dict.fromkeys(_KINDS, 0)
        idle: set[int] = set()
        for unit in units:
            for kind, offers in self._offers.items():
                offer = offers.get(unit)
                if offer is not None:
                    kept[kind] += len(offer.pages)
                    idle.update(p for p in self._shares.get(unit, ()) if self._is_idle(p))
        for page in idle:
            kept[self._kind[page]] += 1
        return kept

    def _is_offered_locked(self, unit: Hashable) -> bool:
        return any(unit in offers for offers in self._offers.values())

    def _is_idle(self, page: int) -> bool:
        """Whether shared ``page`` has tenants and all of them are offered."""
        tenants = self._tenants.get(page)
        return bool(tenants) and self._idle[page] == len(tenants)

    def _check_owned(self, pages: list[int]) -> None:
        for page in pages:
            if not 0 <= page < self.num_pages or self._kind[page] is None:
                raise ValueError(f"page {page} is not allocated (double free or bad id)")
        if len(set(pages)) != len(pages):
            raise ValueError(f"pages freed twice in one call: {sorted(pages)}")
        shared = sorted(p for p in pages if p in self._tenants)
        if shared:
            raise ValueError(f"pages {shared[:5]} are shared; their tenants leave them with "
                             f"unshare, which frees them")
        offered = self._offered.intersection(pages)
        if offered:
            raise ValueError(f"pages {sorted(offered)[:5]} are offered as reclaimable; "
                             f"withdraw their unit before freeing them")

    def _release_locked(self, pages: list[int]) -> None:
        for page in pages:
            self._used[self._kind[page]] -= 1
            self._kind[page] = None
        self._give_back(pages)

    def _reclaim_locked(self, n: int, kind: str) -> list[_Offer]:
        """Pops offered units (in reclaim order) and frees their pages until ``n`` pages are
        free for ``kind``; returns them, for their callbacks to run outside the lock."""
        reclaimed = []
        for offered_kind in RECLAIM_ORDER:
            if not self._serves(offered_kind, kind):
                continue
            offers = self._offers[offered_kind]
            while self.num_free_for(kind) < n:
                unit = self._next_useful_locked(offers)
                if unit is None:
                    break
                reclaimed.append(self._pop_offer_locked(offers, unit)[0])
        return reclaimed

    def _next_useful_locked(self, offers: OrderedDict[Hashable, _Offer]) -> Hashable | None:
        """The least recently offered unit of ``offers`` whose reclaim helps: one with pages
        of its own, or a tenant of a shared page all of whose tenants are offered (reclaiming
        them all frees it). A unit with neither (its rows in a page a pinned unit shares)
        would free nothing, so it stays; None when no unit helps."""
        for unit, offer in offers.items():
            if offer.pages or any(self._is_idle(p) for p in self._shares.get(unit, ())):
                return unit
        return None

    def _pop_offer_locked(self, offers: OrderedDict[Hashable, _Offer], unit: Hashable
                          ) -> tuple[_Offer, int]:
        """Takes ``unit`` out of ``offers``, frees its pages and leaves its shared pages
        (freeing those it was the last tenant of); returns its offer and the pages freed."""
        offer = offers.pop(unit)
        self._offered_pages[offer.kind] -= len(offer.pages)
        self._offered.difference_update(offer.pages)
        released = list(offer.pages)
        for page in self._shares.pop(unit, ()):
            tenants = self._tenants[page]
            tenants.discard(unit)
            self._idle[page] -= 1
            if not tenants:  # it was idle, so counted reclaimable
                self._offered_pages[self._kind[page]] -= 1
                del self._tenants[page], self._idle[page]
                released.append(page)
        self._release_locked(released)
        return offer, len(released)

    # -- the free list; a layout with regions overrides these -------------------------------

    def _take(self, n: int, kind: str) -> list[int]:
        return [self._free.popleft() for _ in range(n)]

    def _give_back(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def _free_pages(self) -> list[int]:
        """Every free page id (duplicates would be a bug)."""
        return list(self._free)
