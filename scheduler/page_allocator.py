"""PageAllocator: hands out ids of the unified pool's equal-size pages (pure Python, no torch)."""

from __future__ import annotations

from collections import deque

KV = "kv"
ADAPTER = "adapter"
_KINDS = (KV, ADAPTER)


class OutOfPagesError(RuntimeError):
    """Raised by :meth:`PageAllocator.allocate` when fewer pages are free than asked for."""


class PageAllocator:
    """One free list over ``num_pages`` pages that serve KV blocks and adapter rows alike.

    Any free page serves any need, so the pool has no external fragmentation (S-LoRA, Sheng et
    al. 2023, section 4.1 "Unified Paging"). Pages are handed out in free-list order: at first
    ascending ids, later the oldest freed first (a deque, so both ends are O(1)).

    The allocator knows the kind of every used page ("kv" or "adapter") so that accounting is
    exact; it does not know what a page holds. The questions that depend on the memory layout
    (:meth:`num_free_for`, :meth:`capacity`, :meth:`fits`, :meth:`adapter_footprint`,
    :attr:`kinds_share_pages`) are answered here, so that a layout with separate regions
    (:class:`~pagedlora.scheduler.static_allocator.StaticSplitAllocator`) runs under the same
    scheduler and adapter store.
    """

    #: Whether freeing pages of one kind makes room for the other (here: always, one free list).
    kinds_share_pages = True

    def __init__(self, num_pages: int) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._kind: list[str | None] = [None] * num_pages
        self._used = {kind: 0 for kind in _KINDS}

    @property
    def num_free(self) -> int:
        """Pages free now (of any kind)."""
        return len(self._free)

    def num_free_for(self, kind: str) -> int:
        """Pages an allocation of ``kind`` could take now (all free pages here)."""
        return len(self._free)

    def capacity(self, kind: str) -> int:
        """Pages ``kind`` could hold if nothing else were allocated (the whole pool here)."""
        return self.num_pages

    def num_used(self, kind: str) -> int:
        """Pages used now by ``kind`` ("kv" or "adapter")."""
        return self._used[kind]

    def can_allocate(self, n: int, kind: str) -> bool:
        """Whether ``n`` pages of ``kind`` could be allocated now."""
        return n <= self.num_free_for(kind)

    def fits(self, kv: int, adapter: int, *, kv_spare: int = 0, adapter_spare: int = 0) -> bool:
        """Whether ``kv`` KV pages and ``adapter`` adapter pages could be had together now,
        counting ``kv_spare`` pages that evicting unheld cached KV blocks would free and
        ``adapter_spare`` pages that evicting unpinned adapters would free. With one free list
        the sum must fit; any freed page serves either kind."""
        return kv + adapter <= self.num_free + kv_spare + adapter_spare

    def could_ever_fit(self, kv: int, adapter: int) -> bool:
        """Whether ``kv`` KV pages and ``adapter`` adapter pages fit the pool with every page
        free (a request that cannot is failed at once)."""
        return self.fits(kv, adapter, kv_spare=self.num_used(KV),
                         adapter_spare=self.num_used(ADAPTER))

    def adapter_footprint(self, num_pages: int) -> int:
        """Pages an adapter whose rows pack into ``num_pages`` pages takes here: exactly those
        (rank-proportional, no padding to max_lora_rank)."""
        return num_pages

    def allocate(self, n: int, kind: str) -> list[int]:
        """Takes ``n`` pages for ``kind``.

        Returns:
            list of ``n`` distinct page ids.
        Raises:
            ValueError: unknown kind or negative n.
            OutOfPagesError: fewer than ``n`` pages free; nothing is taken then.
        """
        if kind not in _KINDS:
            raise ValueError(f"unknown page kind {kind!r}; expected one of {_KINDS}")
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free_for(kind):
            raise OutOfPagesError(f"asked for {n} {kind} pages, {self.num_free_for(kind)} free "
                                  f"of {self.capacity(kind)}")
        pages = self._take(n, kind)
        for page in pages:
            self._kind[page] = kind
        self._used[kind] += n
        return pages

    def free(self, pages: list[int]) -> None:
        """Returns ``pages`` to the free list.

        Raises:
            ValueError: a page id out of range or not in use (a double free); nothing is freed.
        """
        for page in pages:
            if not 0 <= page < self.num_pages or self._kind[page] is None:
                raise ValueError(f"page {page} is not allocated (double free or bad id)")
        if len(set(pages)) != len(pages):
            raise ValueError(f"pages freed twice in one call: {sorted(pages)}")
        for page in pages:
            self._used[self._kind[page]] -= 1
            self._kind[page] = None
        self._give_back(pages)

    def kind_of(self, page: int) -> str | None:
        """The kind of a used page, None for a free one."""
        return self._kind[page]

    def check_invariants(self) -> None:
        """Asserts the free list and the kinds agree (for tests and debugging).

        Raises:
            AssertionError: a page both free and used, a duplicate in the free list, or counts
                that do not add up.
        """
        free_list = self._free_pages()
        free = set(free_list)
        assert len(free) == len(free_list), "duplicate page in the free list"
        for page in range(self.num_pages):
            assert (page in free) == (self._kind[page] is None), f"page {page} free and used"
        for kind in _KINDS:
            assert self._used[kind] == sum(k == kind for k in self._kind), f"{kind} count"
        assert len(free) + sum(self._used.values()) == self.num_pages

    # -- the free list; a layout with regions overrides these -------------------------------

    def _take(self, n: int, kind: str) -> list[int]:
        return [self._free.popleft() for _ in range(n)]

    def _give_back(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def _free_pages(self) -> list[int]:
        """Every free page id (duplicates would be a bug)."""
        return list(self._free)
