"""Scheduler with a fake adapter store: admission, chunked prefill, preemption (no torch)."""

from __future__ import annotations

from pagedlora.config import EngineConfig
from pagedlora.errors import AdapterUnavailableError
from pagedlora.scheduler import ADAPTER, PageAllocator, Request, RequestStatus, Scheduler


class FakeAdapters:
    """Adapter residency backed by the real allocator: each adapter takes a fixed page count."""

    def __init__(self, allocator: PageAllocator, sizes: dict[str, int]) -> None:
        self.allocator, self.sizes = allocator, sizes
        self.resident: dict[str, list[int]] = {}
        self.pins: dict[str, int] = {}
        self.evicted: list[str] = []
        self.holds: dict[str, int] = {}

    def pages_needed(self, key):
        return 0 if key in self.resident else self.sizes[key]

    def adapter_pages(self, key):
        return self.sizes[key]

    def evictable_pages(self):
        return sum(len(p) for k, p in self.resident.items() if not self.pins.get(k))

    def acquire(self, key):
        if key not in self.resident:
            if self.sizes[key] > self.allocator.num_free + self.evictable_pages():
                return False
            self.evict_unpinned(self.sizes[key] - self.allocator.num_free)
            self.resident[key] = self.allocator.allocate(self.sizes[key], ADAPTER)
        self.pins[key] = self.pins.get(key, 0) + 1
        return True

    def release(self, key):
        self.pins[key] -= 1

    def hold(self, key):
        self.holds[key] = self.holds.get(key, 0) + 1
        return True

    def unhold(self, key):
        self.holds[key] -= 1

    def evict_unpinned(self, num_pages):
        freed = 0
        for key in [k for k in self.resident if not self.pins.get(k)]:
            if freed >= num_pages:
                break
            pages = self.resident.pop(key)
            self.allocator.free(pages)
            self.evicted.append(key)
            freed += len(pages)
        return freed


def make(num_pages=40, block_size=4, layers=2, max_num_seqs=8, budget=64, max_loras=2,
         sizes=None, clock=None, **options):
    alloc = PageAllocator(num_pages)
    adapters = FakeAdapters(alloc, sizes or {})
    options = {"watermark": 0.0, "enable_prefix_caching": False, **options}
    config = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=budget, max_loras=max_loras, **options)
    sched = Scheduler(config, pages_per_block=layers, allocator=alloc, adapters=adapters,
                      clock=clock or (lambda: 0.0))
    return sched, alloc, adapters


def req(rid, n_prompt, adapter=None, max_tokens=100):
    return Request(request_id=rid, prompt_token_ids=list(range(n_prompt)), max_tokens=max_tokens,
                   adapter_key=adapter, arrival_time=float(rid))


def run_step(sched, out, new_token=7):
    """Plays the model: every request whose known tokens are all computed gets one more."""
    sched.update(out)
    for s in out.scheduled:
        if s.request.num_computed_tokens == s.request.num_tokens:
            s.request.output_token_ids.append(new_token)


def test_fcfs_admission_allocates_kv_pages_per_layer():
    sched, alloc, _ = make()
    a, b = req(0, 5), req(1, 3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(0, 5), (1, 3)]
    # 5 tokens -> 2 blocks of 4, each block one page per layer (2 layers)
    assert a.blocks == [[0, 1], [2, 3]] and b.blocks == [[4, 5]]
    run_step(sched, out)
    out = sched.schedule()  # decodes: a has 6 tokens (fits its 2 blocks), b has 4 (fits 1)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1), (1, 1)]
    assert alloc.num_used("kv") == 6
    sched.finish(a, "stop")
    assert alloc.num_used("kv") == 2 and a.status is RequestStatus.FINISHED
    alloc.check_invariants()


def test_chunked_prefill_splits_long_prompt_within_budget():
    sched, _, _ = make(budget=6)
    long, short = req(0, 14), req(1, 2)
    sched.add(long)
    sched.add(short)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append([(s.request.request_id, s.num_new_tokens) for s in out.scheduled])
        run_step(sched, out)
    assert chunks == [[(0, 6)], [(0, 6)], [(0, 2), (1, 2)]]
    assert long.output_token_ids == [7]  # sampled only once its whole prompt was computed


def test_max_loras_passes_over_a_new_adapter_and_admits_it_later():
    sched, _, _ = make(max_loras=1, sizes={"x": 2, "y": 2})
    reqs = [req(rid, 2, key, max_tokens=1) for rid, key in enumerate(["x", "y", "x", None])]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    # "y" would be a second adapter in the step: it waits, the requests behind it do not
    assert [s.request.request_id for s in out.scheduled] == [0, 2, 3]
    assert out.adapter_keys == {"x"}
    run_step(sched, out)
    for r in (reqs[0], reqs[2]):
        sched.finish(r, "length")
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [3, 1]
    assert out.adapter_keys == {"y"}


def test_admission_needs_adapter_and_kv_pages_together():
    # 12 pages; "big" takes 7 and a 5-token prompt 2 blocks * 2 layers = 4 pages
    sched, alloc, adapters = make(num_pages=12, sizes={"big": 7})
    sched.add(req(0, 8))  # takes 4 pages, leaving 8
    sched.add(req(1, 5, "big"))  # 7 + 4 > 8: waits, nothing is loaded for it
    sched.add(req(2, 1))  # FCFS: waits behind the head
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [0]
    assert adapters.resident == {} and alloc.num_free == 8
    sched.finish(out.scheduled[0].request, "stop")
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [1]  # 1 page left: 2 waits
    assert alloc.num_used("adapter") == 7 and alloc.num_used("kv") == 4


def test_an_adapter_that_cannot_be_loaded_fails_its_request_alone():
    sched, alloc, adapters = make(sizes={"gone": 2, "x": 2}, enable_prefix_caching=True)

    def acquire(key, ok=adapters.acquire):
        if key == "gone":
            raise AdapterUnavailableError("adapter 'gone' cannot be loaded: source missing")
        return ok(key)

    adapters.acquire = acquire
    a, b, c = req(0, 5, "gone"), req(1, 3, "x"), req(2, 4)
    for r in (a, b, c):
        sched.add(r)
    out = sched.schedule()
    assert out.failed == [a] and a.finish_reason == "error"
    assert a.error == "adapter 'gone' cannot be loaded: source missing"
    assert [s.request for s in out.scheduled] == [b, c] and sched.waiting == []
    assert a.blocks == [] and alloc.num_used("kv") == 2 + 2  # one block (2 layers) for b, c
    sched.kv.check_invariants(sched.running)


def test_preemption_frees_newest_and_recomputes_it():
    # 8 pages = 4 blocks of (2 layers); two requests of 8 tokens fill them
    sched, alloc, _ = make(num_pages=8, block_size=4)
    a, b = req(0, 8), req(1, 8)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    run_step(sched, out)  # both computed 8 tokens and got a 9th: each needs a new block now
    out = sched.schedule()
    assert out.preempted == [b]
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(0, 1)]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.blocks == []
    assert b.num_preemptions == 1 and list(sched.waiting) == [b]
    run_step(sched, out)
    sched.finish(a, "stop")
    out = sched.schedule()  # b comes back and recomputes its prompt and its output so far
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(1, 9)]
    alloc.check_invariants()


def test_unpinned_adapters_are_evicted_before_preempting():
    sched, alloc, adapters = make(num_pages=10, block_size=4, sizes={"x": 4})
    a = req(0, 4, "x")
    sched.add(a)
    out = sched.schedule()
    run_step(sched, out)
    sched.finish(a, "stop")  # "x" stays resident, unpinned
    assert list(adapters.resident) == ["x"]
    sched.add(req(1, 16))  # needs 4 blocks = 8 pages; 6 free + 4 evictable
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == [1]
    assert adapters.evicted == ["x"] and alloc.num_used("adapter") == 0


def test_request_that_can_never_fit_fails_at_once():
    sched, _, _ = make(num_pages=4, block_size=4)
    r = req(0, 9)  # 10 tokens with its first output -> 3 blocks * 2 layers = 6 > 4 pages
    sched.add(r)
    assert r.finish_reason == "error" and r.error == (
        "the prompt (9 tokens) and its adapter need 6 pages, more than the pool of 4 pages can "
        "hold")
    assert not sched.has_unfinished()


def test_request_that_outgrows_the_pool_next_to_its_adapter_fails_alone():
    sched, alloc, adapters = make(num_pages=10, block_size=4, sizes={"x": 6})
    r = req(0, 3, "x")  # 4 tokens + 6 adapter pages fit; from 9 tokens on (6 KV pages) not
    sched.add(r)
    for _ in range(6):
        out = sched.schedule()
        run_step(sched, out)
    assert r.num_tokens == 9 and r.num_computed_tokens == 8 and not r.is_finished
    out = sched.schedule()
    assert out.failed == [r] and r.finish_reason == "error"
    assert r.error == ("the 6 KV pages of 9 tokens next to its adapter's 6 pages do not fit "
                       "even alone in the pool of 10 pages")
    assert alloc.num_used("kv") == 0 and not adapters.pins["x"]
    other = req(1, 5)
    sched.add(other)
    assert [s.request.request_id for s in sched.schedule().scheduled] == [1]
