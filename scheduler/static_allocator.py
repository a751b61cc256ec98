"""StaticSplitAllocator: a fixed KV region plus fixed adapter slots padded to the largest rank."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable

from pagedlora.scheduler.page_allocator import ADAPTER, KV, PageAllocator

# "unified": one PageAllocator free list; "static": StaticSplitAllocator
MEMORY_LAYOUTS = ("unified", "static")


class StaticSplitAllocator(PageAllocator):
    """The pool split up front: ``num_slots`` adapter slots of ``slot_pages`` pages each at the
    top, KV blocks in the pages below; neither kind ever uses the other's pages.

    This is how vLLM sizes its LoRA buffers: ``max_loras`` slots, each sized for
    ``max_lora_rank`` on every target module, allocated before serving; the KV cache gets what
    is left. An adapter takes one whole slot whatever its rank and modules (the padding is
    internal fragmentation), and at most ``num_slots`` adapters are resident. It exists to
    measure, on the same scheduler and adapter store, what unified paging saves (S-LoRA, Sheng
    et al. 2023, section 4: padding adapters to a maximum rank and reserving their memory apart
    from the KV cache wastes memory that unified paging gives to requests).

    Page ids: the KV region is ``[0, kv_pages)``; slot ``s`` is
    ``[kv_pages + s * slot_pages, kv_pages + (s + 1) * slot_pages)``.

    Args:
        num_pages: pages in the pool.
        slot_pages: pages of one adapter slot.
        num_slots: adapter slots (``max_loras``).
    Raises:
        ValueError: a size below 1, or slots that leave no page for KV blocks.
    """

    kinds_share_pages = False
    shares_adapter_tails = False  # a slot holds its adapter whole

    def __init__(self, num_pages: int, *, slot_pages: int, num_slots: int) -> None:
        super().__init__(num_pages)
        if slot_pages < 1 or num_slots < 1:
            raise ValueError(f"slot_pages and num_slots must be >= 1, got {slot_pages} and "
                             f"{num_slots}")
        self.slot_pages = slot_pages
        self.num_slots = num_slots
        self.kv_pages = num_pages - slot_pages * num_slots
        if self.kv_pages < 1:
            raise ValueError(f"{num_slots} adapter slots of {slot_pages} pages take "
                             f"{slot_pages * num_slots} pages; the pool has {num_pages}, "
                             f"leaving none for KV blocks")
        self._free = deque(range(self.kv_pages))  # the KV region's free list
        self._free_slots: deque[int] = deque(range(num_slots))

    @property
    def num_free(self) -> int:
        """Pages free now: the KV region's plus those of empty slots."""
        return len(self._free) + len(self._free_slots) * self.slot_pages

    def num_free_for(self, kind: str) -> int:
        """Free pages of ``kind``'s region (for adapters: pages of empty slots)."""
        return len(self._free) if kind == KV else len(self._free_slots) * self.slot_pages

    def capacity(self, kind: str) -> int:
        """Pages of ``kind``'s region."""
        return self.kv_pages if kind == KV else self.num_slots * self.slot_pages

    def fits(self, kv: int, adapter: int, *, keeping: Iterable[Hashable] = ()) -> bool:
        """As :meth:`PageAllocator.fits`, but each kind must fit its own region: reclaiming
        cached KV blocks frees nothing for adapters, nor reclaiming adapters for KV."""
        with self._lock:
            kept = self._kept(keeping)
            return (kv <= self.num_free_for(KV) + self.num_reclaimable(KV) - kept[KV]
                    and adapter <= self.num_free_for(ADAPTER) + self.num_reclaimable(ADAPTER)
                    - kept[ADAPTER])

    def could_ever_fit(self, kv: int, adapter: int) -> bool:
        """Whether each kind fits its region with every page free."""
        return kv <= self.capacity(KV) and adapter <= self.capacity(ADAPTER)

    def adapter_footprint(self, num_pages: int) -> int:
        """One whole slot, whatever the adapter packs into.

        Raises:
            ValueError: ``num_pages`` exceeds a slot.
        """
        if num_pages > self.slot_pages:
            raise ValueError(f"an adapter of {num_pages} pages does not fit an adapter slot "
                             f"of {self.slot_pages} pages")
        return self.slot_pages

    def allocate(self, n: int, kind: str) -> list[int]:
        """As :meth:`PageAllocator.allocate`; an adapter allocation is one whole slot.

        Raises:
            ValueError: an adapter allocation of other than ``slot_pages`` pages (ask
                :meth:`adapter_footprint`); the others of :meth:`PageAllocator.allocate`.
            OutOfPagesError: the KV region, or every slot, is full.
        """
        if kind == ADAPTER and n != self.slot_pages:
            raise ValueError(f"an adapter takes one whole slot of {self.slot_pages} pages, "
                             f"asked for {n}")
        return super().allocate(n, kind)

    def free(self, pages: Iterable[int]) -> None:
        """As :meth:`PageAllocator.free`; slot pages go back a whole slot at a time.

        Raises:
            ValueError: part of a slot; the others of :meth:`PageAllocator.free`. Nothing is
                freed then.
        """
        pages = list(pages)
        per_slot = Counter(self._slot_of(p) for p in pages if self.kv_pages <= p < self.num_pages)
        partial = sorted(s for s, n in per_slot.items() if n != self.slot_pages)
        if partial:
            raise ValueError(f"adapter slot(s) {partial} freed in part; a slot of "
                             f"{self.slot_pages} pages is freed whole")
        super().free(pages)

    def check_invariants(self) -> None:
        """:meth:`PageAllocator.check_invariants`, and: KV pages lie in the KV region, adapter
        pages in slots, and every slot is wholly used or wholly free.

        Raises:
            AssertionError: naming the first page or slot that breaks them.
        """
        super().check_invariants()
        for page in range(self.kv_pages):
            assert self._kind[page] != ADAPTER, f"adapter page {page} in the KV region"
        for slot in range(self.num_slots):
            kinds = {self._kind[p] for p in self._slot_range(slot)}
            assert kinds in ({None}, {ADAPTER}), f"slot {slot} holds {kinds}"

    def _slot_of(self, page: int) -> int:
        return (page - self.kv_pages) // self.slot_pages

    def _slot_range(self, slot: int) -> range:
        start = self.kv_pages + slot * self.slot_pages
        return range(start, start + self.slot_pages)

    def _take(self, n: int, kind: str) -> list[int]:
        if kind == KV:
            return super()._take(n, kind)
        return list(self._slot_range(self._free_slots.popleft()))

    def _give_back(self, pages: list[int]) -> None:
        super()._give_back([p for p in pages if p < self.kv_pages])
        for page in pages:
            if page >= self.kv_pages and (page - self.kv_pages) % self.slot_pages == 0:
                self._free_slots.append(self._slot_of(page))

    def _free_pages(self) -> list[int]:
        return [*self._free, *(p for s in self._free_slots for p in self._slot_range(s))]
