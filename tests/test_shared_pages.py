"""Pages several adapters share (their last rows): the allocator's accounting of shared pages,
SharedPages' layout under random churn, and engines whose adapters share pages computing what
HF + PEFT computes, through removal, reuse of the freed rows and eviction under pressure."""

from __future__ import annotations

import random

import pytest
from support import PeftOracle, assert_no_leaks, engine_with

from pagedlora import SamplingParams
from pagedlora.adapter_pages import ResidentAdapter
from pagedlora.scheduler import ADAPTER, KV, OutOfPagesError, PageAllocator
from pagedlora.shared_pages import SharedPages

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


# -- the allocator's accounting ------------------------------------------------------------------

def test_a_shared_page_is_reclaimable_only_while_every_tenant_is_offered():
    alloc = PageAllocator(4)
    (page,) = alloc.allocate(1, ADAPTER)
    own_a = alloc.allocate(1, ADAPTER)
    alloc.share(page, "a")
    alloc.share(page, "b")
    reclaimed = []
    alloc.offer("a", own_a, ADAPTER, on_reclaim=lambda: reclaimed.append("a"))
    assert alloc.num_reclaimable(ADAPTER) == 1  # a's own page; b still holds the shared one
    alloc.offer("b", (), ADAPTER, on_reclaim=lambda: reclaimed.append("b"))
    assert alloc.num_reclaimable(ADAPTER) == 2 and alloc.available(KV) == 4
    assert not alloc.fits(4, 0, keeping=["b"]) and alloc.fits(3, 0, keeping=["b"])
    assert alloc.offered_pages(["b"]) == 1 and alloc.offered_pages(["a", "b"]) == 2
    alloc.check_invariants()
    assert alloc.withdraw("b")
    assert alloc.num_reclaimable(ADAPTER) == 1
    alloc.offer("b", (), ADAPTER, on_reclaim=lambda: reclaimed.append("b"))
    # all four pages: the free two, a's own, then the shared one once b leaves it too
    assert sorted(alloc.allocate(4, KV)) == [0, 1, 2, 3]
    assert reclaimed == ["a", "b"] and not alloc.tenants_of(page)
    alloc.check_invariants()


def test_the_last_tenant_leaving_frees_the_page_and_misuse_is_refused():
    alloc = PageAllocator(3)
    (page,) = alloc.allocate(1, ADAPTER)
    with pytest.raises(ValueError, match="page 2 is not allocated"):
        alloc.share(2, "a")
    alloc.share(page, "a")
    alloc.share(page, "b")
    with pytest.raises(ValueError, match=r"pages \[0\] are shared"):
        alloc.free([page])
    alloc.offer("a", (), ADAPTER, on_reclaim=lambda: None)
    with pytest.raises(ValueError, match="'a' is offered; withdraw it"):
        alloc.unshare(page, "a")
    with pytest.raises(ValueError, match="'c' does not share page 0"):
        alloc.unshare(page, "c")
    assert alloc.withdraw("a")
    assert not alloc.unshare(page, "a") and alloc.num_used(ADAPTER) == 1
    assert alloc.unshare(page, "b") and alloc.num_free == 3
    alloc.check_invariants()


def test_reclaim_counts_the_shared_pages_it_frees():
    alloc = PageAllocator(6)
    shared = alloc.allocate(2, ADAPTER)
    for i, unit in enumerate("abc"):
        for page in shared[: 1 + (i > 0)]:
            alloc.share(page, unit)
        alloc.offer(unit, alloc.allocate(1, ADAPTER), ADAPTER, on_reclaim=lambda: None)
    assert alloc.num_reclaimable(ADAPTER) == 5 and alloc.num_free == 1
    assert alloc.reclaim(6, ADAPTER) == 5 and alloc.num_free == 6
    alloc.check_invariants()


# -- SharedPages under churn --------------------------------------------------------------------

WIDTHS = (64, 32, 176)  # the toy model's rows: hidden, KV width, intermediate


def test_random_tails_tile_the_shared_pages_and_give_every_page_back():
    """Random tails placed, released and reclaimed (the allocator's path, through forget): the
    rows and gaps of each shared page tile it with no overlap, the tenants are the holders, and
    with every tail gone no page is left."""
    rng = random.Random(7)
    alloc = PageAllocator(40)
    shared = SharedPages(alloc, 1024)
    live: dict[int, object] = {}
    offered: set[int] = set()
    for unit in range(400):
        tail = {w: rng.randint(1, 1024 // w) for w in rng.sample(WIDTHS, rng.randint(1, 3))}
        while sum(w * n for w, n in tail.items()) > 1024:  # a tail comes from one page
            tail = {w: max(1, n // 2) for w, n in tail.items()}
        action = rng.random()
        if live and action < 0.3:  # removed: leaves its pages
            gone = rng.choice(sorted(set(live) - offered) or [None])
            if gone is not None:
                shared.release(gone)
                del live[gone]
        elif live and action < 0.5:  # unpinned: reclaimable
            u = rng.choice(sorted(set(live) - offered) or [None])
            if u is not None:
                alloc.offer(u, (), ADAPTER, on_reclaim=lambda u=u: (
                    shared.forget(u), live.pop(u), offered.discard(u)))
                offered.add(u)
        try:
            spots = shared.place(unit, tail)
        except OutOfPagesError:
            continue
        live[unit] = spots
        assert {w: len(p) for w, (p, _) in spots.rows.items()} == tail
        shared.check_invariants()
        alloc.check_invariants()
    placed = sorted((p, s, e) for spots in live.values() for p, s, e in spots.spans)
    assert all(a[0] != b[0] or a[2] <= b[1] for a, b in zip(placed, placed[1:], strict=False))
    for u in list(live):
        if u in offered:
            assert alloc.withdraw(u)
        shared.release(u)
    assert shared.pages == [] and alloc.num_free == 40
    alloc.check_invariants()


def test_overlapping_placements_are_the_stale_ones():
    a = ResidentAdapter(1, [3, 4], 0, {}, spans=((9, 0, 128),))
    assert a.overlaps(ResidentAdapter(2, [4], 0, {}))
    assert a.overlaps(ResidentAdapter(2, [9], 0, {}))  # a's shared page became another's own
    assert a.overlaps(ResidentAdapter(2, [], 0, {}, spans=((9, 64, 96),)))
    assert not a.overlaps(ResidentAdapter(2, [5], 0, {}, spans=((9, 128, 192),)))


# -- engines whose adapters share pages ------------------------------------------------------

SMALL = {f"s{i}": dict(r=1 + i % 3, target_modules=[["q_proj", "v_proj"], ["o_proj"],
                                                    ["k_proj", "down_proj"]][i % 3], seed=40 + i)
         for i in range(6)}


@pytest.fixture(scope="module")
def small(tiny_llama_dir, tmp_path_factory):
    from support import save_adapters

    dirs = save_adapters(tiny_llama_dir, tmp_path_factory.mktemp("shared-tails"), SMALL)
    return dirs, PeftOracle(tiny_llama_dir, dirs)


def test_adapters_sharing_pages_compute_peft_through_removal_and_reuse(tiny_llama_dir, small):
    """Six small adapters (ranks 1-3, under a page each on the toy model) share pages; each
    computes PEFT's tokens. One is removed and another takes its freed rows: the tenants left
    still compute PEFT's tokens (their rows untouched), and the newcomer its own."""
    dirs, oracle = small
    prompt = [5, 9, 14, 3, 22]
    engine = engine_with(tiny_llama_dir, 200)
    for name in list(dirs)[:5]:
        engine.add_adapter(name, dirs[name])
    names = list(dirs)[:5]
    outs = engine.generate([prompt] * 5, adapters=names, sampling_params=GREEDY,
                           progress=False)
    assert [o.token_ids for o in outs] == [oracle.greedy(n, prompt, 8) for n in names]
    store, alloc = engine.adapters, engine.pool.allocator
    tenants = {p: alloc.tenants_of(p) for p in store.shared_pages}
    assert max(len(t) for t in tenants.values()) >= 3, tenants  # they share pages
    under_a_page = [n for n in names if not store.resident(store.key_of(n)).pages]
    assert len(under_a_page) >= 3, under_a_page  # no page of their own at all
    gone = store.resident(store.key_of("s1"))
    engine.remove_adapter("s1")
    engine.add_adapter("s5", dirs["s5"])
    outs = engine.generate([prompt] * 5, adapters=["s0", "s2", "s3", "s4", "s5"],
                           sampling_params=GREEDY, progress=False)
    assert [o.token_ids for o in outs] == [oracle.greedy(n, prompt, 8)
                                          for n in ("s0", "s2", "s3", "s4", "s5")]
    newcomer = store.resident(store.key_of("s5"))
    assert newcomer.shared_pages & gone.shared_pages  # it moved into the freed rows' page
    store.check_invariants()
    alloc.check_invariants()
    assert_no_leaks(engine)


def test_adapters_sharing_pages_under_eviction_compute_peft(tiny_llama_dir, small):
    """A pool too small for every adapter and the KV blocks at once: adapters whose rows share
    pages are evicted and reloaded (into whatever gaps are free then) while requests run, and
    every request gets PEFT's tokens; nothing leaks."""
    dirs, oracle = small
    engine = engine_with(tiny_llama_dir, 10, max_loras=2)
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    rng = random.Random(3)
    names = [rng.choice([*dirs, None]) for _ in range(14)]
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randint(3, 20))] for _ in names]
    outs = engine.generate(prompts, adapters=names, sampling_params=GREEDY, progress=False)
    assert [o.token_ids for o in outs] == [oracle.greedy(n, p, 8)
                                          for n, p in zip(names, prompts, strict=True)]
    stats = engine.stats()
    assert sum(a["evictions"] for a in stats["adapters"].values()) > 0
    engine.adapters.check_invariants()
    assert_no_leaks(engine)


# -- found in review: an unused fresh page leaked; reclaim evicted units freeing nothing --


def test_place_does_not_leak_the_fresh_page_when_reclaiming_opened_a_gap():
    """place() finds no gap, allocates a fresh page; that allocation reclaims unit x, whose
    rows in shared page 0 become a gap (forget runs inside allocate). The re-fit then puts
    z's rows into page 0, so the fresh page must go back (it leaked: allocated, not free, not
    reclaimable, freed by nobody)."""
    alloc = PageAllocator(3)
    shared = SharedPages(alloc, 1024)
    shared.place("y", {64: 8})  # fresh page 0, [0, 512)
    shared.place("x", {64: 8})  # page 0, [512, 1024)
    own_x = alloc.allocate(1, ADAPTER)  # page 1
    alloc.offer("x", own_x, ADAPTER, on_reclaim=lambda: shared.forget("x"))
    kv = alloc.allocate(1, KV)  # page 2: the pool is full
    shared.place("z", {64: 8})  # reclaims x for a fresh page, then fits in x's old rows
    assert all(alloc.tenants_of(p) for p in shared.pages), (
        f"shared pages {shared.pages} include one nobody holds: "
        f"{[p for p in shared.pages if not alloc.tenants_of(p)]}")
    shared.release("z")
    shared.release("y")
    alloc.free(kv)
    assert alloc.num_free == 3, f"{3 - alloc.num_free} page(s) leaked"


def test_store_pin_does_not_leak_a_page_into_the_shared_pages(tiny_llama_dir, make_adapter):
    """The same through the adapter store: y (rank 1 on q,v: 448 elements, no page of its
    own) pinned, x (rank 3: one page of its own, a 320-element tail beside y's) warm and
    unpinned, the rest of the pool KV. Pinning z (another 448-element tail) reclaims x for a
    fresh page and then fits z into x's old rows: with every adapter unpinned and evicted,
    every page is free again (the fresh page leaked)."""
    engine = engine_with(tiny_llama_dir, 12)
    store, alloc = engine.adapters, engine.pool.allocator
    qv = ["q_proj", "v_proj"]
    engine.add_adapter("y", make_adapter(tiny_llama_dir, "y", r=1, target_modules=qv, seed=1))
    engine.add_adapter("x", make_adapter(tiny_llama_dir, "x", r=3, target_modules=qv, seed=2),
                       preload=True)
    engine.add_adapter("z", make_adapter(tiny_llama_dir, "z", r=1, target_modules=qv, seed=3))
    ky, kx, kz = (store.key_of(n) for n in "yxz")
    assert store.pin(ky)
    store.warm([kx])
    assert store.tier(kx) == "pool" and alloc.is_offered(store.unit_of(kx))
    (page,) = store.shared_pages
    assert alloc.tenants_of(page) == {store.unit_of(ky), store.unit_of(kx)}
    kv = alloc.allocate(alloc.num_free, KV)
    assert store.pin(kz)
    store.check_invariants()  # also: every shared page holds someone's rows
    orphans = [p for p in store.shared_pages if not alloc.tenants_of(p)]
    store.unpin(kz)
    store.unpin(ky)
    alloc.free(kv)
    store.evict_unpinned(alloc.num_pages)
    assert not orphans and alloc.num_free == alloc.num_pages, (
        f"shared page(s) {orphans} held by no adapter; {alloc.num_pages - alloc.num_free} "
        f"page(s) never come back (shared pages now {store.shared_pages})")


def test_allocation_does_not_evict_an_adapter_that_frees_nothing():
    """x has no page of its own and shares page 0 with y, which is pinned (not offered):
    reclaiming x frees nothing. An allocation short of one page still evicts x (least
    recently offered) before w, whose page is what it gets: x must stay (it was evicted for no
    page at all, and a small adapter under a pinned neighbour was then evicted by every
    allocation that reclaims, to be copied in again)."""
    alloc = PageAllocator(3)
    (page,) = alloc.allocate(1, ADAPTER)
    alloc.share(page, "x")
    alloc.share(page, "y")
    evicted = []
    alloc.offer("x", (), ADAPTER, on_reclaim=lambda: evicted.append("x"))
    alloc.offer("w", alloc.allocate(1, ADAPTER), ADAPTER, on_reclaim=lambda: evicted.append("w"))
    alloc.allocate(1, KV)
    assert alloc.available(KV) == 1  # w's page; x's share is not counted, rightly
    alloc.allocate(1, KV)
    assert evicted == ["w"], f"evicted {evicted}: x freed no page"
