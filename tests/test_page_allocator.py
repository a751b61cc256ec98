"""PageAllocator: exact page ids, kinds, double frees (pure Python, no torch)."""

import pytest

from pagedlora.scheduler.page_allocator import ADAPTER, KV, OutOfPagesError, PageAllocator


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
    assert a.num_free == 1 and a.can_allocate(1) and not a.can_allocate(2)
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
