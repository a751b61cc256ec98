"""PageAllocator: exact page ids, kinds, double frees (pure Python, no torch)."""

import pytest

from pagedlora.scheduler import (
    ADAPTER,
    KV,
    OutOfPagesError,
    PageAllocator,
    StaticSplitAllocator,
)


def test_allocates_ascending_then_oldest_freed_first():
    a = PageAllocator(6)
    assert a.allocate(2, KV) == [0, 1]
    assert a.allocate(3, ADAPTER) == [2, 3, 4]
    a.free([1, 3])
    assert a.allocate(3, KV) == [5, 1, 3]
    assert (a.num_free, a.num_used(KV), a.num_used(ADAPTER)) == (0, 4, 2)
    assert [a.kind_of(p) for p in range(6)] == [KV, KV, ADAPTER, KV, ADAPTER, KV]
    a.check_invariants()


def test_out_of_pages_takes_nothing():
    a = PageAllocator(3)
    a.allocate(2, KV)
    with pytest.raises(OutOfPagesError, match="asked for 2 adapter pages, 1 free of 3"):
        a.allocate(2, ADAPTER)
    assert a.num_free == 1 and a.can_allocate(1, KV) and not a.can_allocate(2, KV)
    a.check_invariants()


def test_double_free_and_bad_ids_are_refused_without_side_effects():
    a = PageAllocator(4)
    pages = a.allocate(2, KV)
    a.free(pages[:1])
    with pytest.raises(ValueError, match="page 0 is not allocated"):
        a.free([1, 0])
    assert a.kind_of(1) == KV  # the valid page in the refused call stays allocated
    with pytest.raises(ValueError, match="page 9"):
        a.free([9])
    with pytest.raises(ValueError, match="freed twice"):
        a.free([1, 1])
    a.check_invariants()


def test_unknown_kind_and_bad_sizes():
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator(0)
    a = PageAllocator(2)
    with pytest.raises(ValueError, match="unknown page kind"):
        a.allocate(1, "weights")
    with pytest.raises(ValueError, match="cannot allocate -1"):
        a.allocate(-1, KV)


# -- the static split (vLLM-style LoRA slots next to a fixed KV region) -------------------------


def test_static_split_keeps_kinds_in_their_regions_and_adapters_in_whole_slots():
    a = StaticSplitAllocator(10, slot_pages=3, num_slots=2)  # KV 0-3, slots 4-6 and 7-9
    assert (a.kv_pages, a.capacity(KV), a.capacity(ADAPTER)) == (4, 4, 6)
    assert a.adapter_footprint(1) == 3 and not a.kinds_share_pages
    assert a.allocate(2, KV) == [0, 1]
    assert a.allocate(3, ADAPTER) == [4, 5, 6]
    assert (a.num_free, a.num_free_for(KV), a.num_free_for(ADAPTER)) == (5, 2, 3)
    with pytest.raises(OutOfPagesError, match="asked for 3 kv pages, 2 free of 4"):
        a.allocate(3, KV)  # 5 pages are free, but only 2 of them may hold KV
    assert a.allocate(3, ADAPTER) == [7, 8, 9]
    with pytest.raises(OutOfPagesError, match="asked for 3 adapter pages, 0 free of 6"):
        a.allocate(3, ADAPTER)  # a third adapter: no slot left although KV pages are free
    assert a.fits(2, 0) and not a.fits(2, 3)
    a.offer("slot 0", [4, 5, 6], ADAPTER, on_reclaim=lambda: None)  # an unpinned adapter
    assert a.fits(2, 3) and not a.fits(2, 3, keeping=["slot 0"])
    assert not a.fits(3, 0)  # reclaiming an adapter frees nothing for KV
    assert a.could_ever_fit(4, 6) and not a.could_ever_fit(5, 0)
    assert a.withdraw("slot 0")
    a.free([4, 5, 6])
    assert a.allocate(2, KV) == [2, 3] and a.allocate(3, ADAPTER) == [4, 5, 6]
    assert [a.kind_of(p) for p in range(10)] == [KV] * 4 + [ADAPTER] * 6
    a.check_invariants()


def test_static_split_refuses_partial_slots_and_pools_without_kv_room():
    a = StaticSplitAllocator(8, slot_pages=3, num_slots=2)
    with pytest.raises(ValueError, match="one whole slot of 3 pages, asked for 2"):
        a.allocate(2, ADAPTER)
    with pytest.raises(ValueError, match="an adapter of 4 pages does not fit"):
        a.adapter_footprint(4)
    slot = a.allocate(3, ADAPTER)
    with pytest.raises(ValueError, match=r"slot\(s\) \[0\] freed in part"):
        a.free(slot[:2])
    assert a.num_used(ADAPTER) == 3  # nothing was freed
    a.check_invariants()
    with pytest.raises(ValueError, match="leaving none for KV"):
        StaticSplitAllocator(6, slot_pages=3, num_slots=2)


def test_unified_allocator_answers_the_layout_questions_for_one_free_list():
    a = PageAllocator(6)
    a.allocate(4, ADAPTER)
    assert a.num_free_for(KV) == a.num_free_for(ADAPTER) == 2 and a.kinds_share_pages
    assert a.adapter_footprint(5) == 5 and a.capacity(KV) == 6
    assert a.fits(1, 1) and not a.fits(2, 1)
    a.offer("adapter x", [0, 1, 2, 3], ADAPTER, on_reclaim=lambda: None)
    assert a.fits(2, 1) and a.available(KV) == 6 and not a.fits(2, 1, keeping=["adapter x"])
    assert a.could_ever_fit(3, 3) and not a.could_ever_fit(4, 3)


# -- reclaimable units: one notion of available = free + reclaimable ----------------------------


def test_allocation_reclaims_offered_units_kv_first_then_adapters_lru():
    a = PageAllocator(8)
    kv_old, kv_new = a.allocate(2, KV), a.allocate(2, KV)
    adapter = a.allocate(3, ADAPTER)
    gone = []
    a.offer("adapter", adapter, ADAPTER, on_reclaim=lambda: gone.append("adapter"))
    a.offer("kv new", kv_new, KV, on_reclaim=lambda: gone.append("kv new"))
    a.offer("kv old", kv_old, KV, on_reclaim=lambda: gone.append("kv old"))
    assert (a.num_free, a.available(KV), a.available(ADAPTER)) == (1, 8, 8)
    a.check_invariants()
    # 1 free + the cached block offered first ("kv new"): enough for 3
    assert a.allocate(3, ADAPTER) == [7, *kv_new] and gone == ["kv new"]
    # then the other cached block, then the adapter (whole), for 4 more
    assert sorted(a.allocate(4, KV)) == sorted([*kv_old, *adapter[:2]])
    assert gone == ["kv new", "kv old", "adapter"] and a.num_free == 1
    assert a.num_reclaimable(KV) == a.num_reclaimable(ADAPTER) == 0
    a.check_invariants()


def test_withdrawn_units_are_not_reclaimed_and_offered_pages_cannot_be_freed():
    a = PageAllocator(4)
    block = a.allocate(2, KV)
    a.offer(("kv", block[0]), block, KV, on_reclaim=lambda: pytest.fail("reclaimed"))
    with pytest.raises(ValueError, match="offered as reclaimable"):
        a.free(block)
    with pytest.raises(ValueError, match="offered already"):
        a.offer(("kv", block[0]), block, KV, on_reclaim=lambda: None)
    assert a.withdraw(("kv", block[0])) and not a.withdraw(("kv", block[0]))
    with pytest.raises(OutOfPagesError):
        a.allocate(3, ADAPTER)
    a.free(block)
    a.check_invariants()


def test_reclaim_takes_only_the_asked_kind():
    a = PageAllocator(6)
    kv, adapter = a.allocate(2, KV), a.allocate(2, ADAPTER)
    a.offer("kv", kv, KV, on_reclaim=lambda: None)
    a.offer("adapter", adapter, ADAPTER, on_reclaim=lambda: None)
    assert a.reclaim(1, ADAPTER) == 2 and a.is_offered("kv") and not a.is_offered("adapter")
    assert a.stats().reclaimable_kv == 2 and a.stats().free == 4
