"""Scheduler with a fake adapter store: admission, chunked prefill, preemption (pure Python)."""

from __future__ import annotations

from support import make_request as req
from support import make_scheduler as make
from support import run_step

from pagedlora.scheduler import RequestStatus


def test_fcfs_admission_allocates_kv_pages_per_layer():
    sched, alloc, _ = make()
    a, b = req(0, 5), req(1, 3)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(0, 5), (1, 3)]
    # 5 tokens -> 2 blocks of 4, each block one page per layer (2 layers)
    assert sched.kv.blocks_of(a) == [[0, 1], [2, 3]] and sched.kv.blocks_of(b) == [[4, 5]]
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
    reqs = [req(rid, 2, key, max_tokens=1) for rid, key in enumerate(["x", "y", "x"])]
    reqs.append(req(3, 2, None))  # still decoding in the second step
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
    """Scheduling reserves pages only; the store's load fails "gone" (its source is missing)
    and ``drop_failed`` takes that request out of the step before anything runs."""
    sched, alloc, adapters = make(sizes={"gone": 2, "x": 2}, enable_prefix_caching=True)
    a, b, c = req(0, 5, "gone"), req(1, 3, "x"), req(2, 4)
    for r in (a, b, c):
        sched.add(r)
    out = sched.drop_failed(sched.schedule(),
                            {"gone": "adapter 'gone' cannot be loaded: source missing"})
    assert out.failed == [a] and a.finish_reason == "error"
    assert a.error == "adapter 'gone' cannot be loaded: source missing"
    assert [s.request for s in out.scheduled] == [b, c] and sched.waiting == []
    assert sched.kv.blocks_of(a) == []
    assert alloc.num_used("kv") == 2 + 2  # one block (2 layers) for b, c
    assert out.adapter_keys == {"x"} and not adapters.pins["gone"]
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
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert sched.kv.blocks_of(b) == []
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


def test_prompt_logprobs_read_the_cache_only_where_they_have_entries():
    """A request asking prompt logprobs is not served cached blocks whose positions it has no
    entries for; one that has them (as after a preemption) is served those blocks only; the
    runner's entries are appended by update, next to the sampled token's."""
    from pagedlora.scheduler import RunnerOutput, TokenLogprobs

    sched, _, _ = make(enable_prefix_caching=True)
    warm = req(0, 13)  # 3 full blocks of 4 join the cache
    sched.add(warm)
    run_step(sched, sched.schedule())
    fresh, resumed = req(1, 13), req(2, 13)
    fresh.needs_prompt_logprobs = resumed.needs_prompt_logprobs = True
    entry = TokenLogprobs(token_id=1, logprob=-0.5, rank=1)
    resumed.prompt_logprobs = [entry] * 9  # positions 0..8 scored: 2 whole blocks' worth
    sched.add(fresh)
    sched.add(resumed)
    out = sched.schedule()
    assert {s.request.request_id: s.request.num_computed_tokens for s in out.scheduled} == \
        {0: 13, 1: 0, 2: 8}
    sample = TokenLogprobs(token_id=7, logprob=-1.0, rank=2, top=((3, -0.2),))
    sched.update(out, RunnerOutput((0, 1, 2), (7, 7, 7), (None, sample, None),
                                   ((1, (entry,) * 12), (2, (entry,) * 3))))
    assert fresh.output_logprobs == [sample] and warm.output_logprobs == []
    assert len(fresh.prompt_logprobs) == 12 and len(resumed.prompt_logprobs) == 12
