"""Property test: random arrivals, lengths, adapters and cancellations keep every page
accounted for, under every policy, with prefix caching on."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import make_scheduler as make
from support import run_step

from pagedlora.scheduler import Request

ADAPTERS = [None, "x", "y", "z"]

request_st = st.tuples(
    st.integers(1, 40),                    # prompt length
    st.integers(1, 12),                    # max_tokens
    st.sampled_from(ADAPTERS),
    st.integers(0, 2),                     # prompt family: shared prefixes within a family
)
event_st = st.one_of(
    st.tuples(st.just("add"), request_st),
    st.tuples(st.just("cancel"), st.integers(0, 1000)),
    st.tuples(st.just("step"), st.none()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(event_st, min_size=1, max_size=80),
       policy=st.sampled_from(["fcfs", "cluster", "fair"]),
       num_pages=st.integers(16, 60), budget=st.integers(4, 48))
def test_pages_stay_accounted_for(events, policy, num_pages, budget):
    sched, alloc, adapters = make(num_pages=num_pages, block_size=4, budget=budget, max_loras=2,
                                  max_num_seqs=4, sizes={"x": 2, "y": 3, "z": 5},
                                  policy=policy, enable_prefix_caching=True, watermark=0.05)
    requests: list[Request] = []

    def check():
        sched.kv.check_invariants(sched.running)
        pins = {k: n for k, n in adapters.pins.items() if n}
        want: dict = {}
        for r in sched.running:
            if r.adapter_key is not None:
                want[r.adapter_key] = want.get(r.adapter_key, 0) + 1
        assert pins == want, (pins, want)
        holds = {k: n for k, n in adapters.holds.items() if n}
        for r in sched.waiting:
            if r.adapter_key is not None:
                want[r.adapter_key] = want.get(r.adapter_key, 0) + 1
        assert holds == want, (holds, want)
        for r in sched.waiting:
            assert sched.kv.blocks_of(r) == [] and r.num_computed_tokens == 0

    def step():
        out = sched.schedule()
        assert out.num_batched_tokens <= budget and len(sched.running) <= 4
        assert len(out.adapter_keys) <= 2
        run_step(sched, out)
        for s in out.scheduled:
            r = s.request
            if not r.is_finished and len(r.output_token_ids) >= r.max_tokens:
                sched.finish(r, "length")
        check()

    for kind, arg in events:
        if kind == "add":
            length, max_tokens, key, family = arg
            r = Request(request_id=len(requests), max_tokens=max_tokens, adapter_key=key,
                        prompt_token_ids=[family * 1000 + i for i in range(length)],
                        arrival_time=float(len(requests)))
            sched.add(r)
            requests.append(r)
        elif kind == "cancel" and requests:
            sched.finish(requests[arg % len(requests)], "abort")
        else:
            step()
        check()
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        step()
    assert not sched.has_unfinished(), "requests never finished"
    assert all(r.is_finished for r in requests)
    # every KV page is free or an unheld cached block; dropping the cache frees them all
    assert alloc.num_used("kv") == sched.kv.evictable_pages
    sched.kv.reset()
    assert alloc.num_used("kv") == 0
    assert not any(adapters.pins.values()) and not any(adapters.holds.values())
    alloc.check_invariants()
