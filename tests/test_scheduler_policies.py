"""Scheduler policies, watermark, early abort and prefix caching, with a fake adapter store."""

from __future__ import annotations

from support import make_request as req
from support import make_scheduler as make
from support import run_step


class Clock:
    """A settable clock for the scheduler (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ids(out) -> list[int]:
    return [s.request.request_id for s in out.scheduled]


def finish_done(sched, out) -> None:
    """Finishes the requests of ``out`` that reached their max_tokens."""
    for s in out.scheduled:
        r = s.request
        if not r.is_finished and len(r.output_token_ids) >= r.max_tokens:
            sched.finish(r, "length")


# -- policies -----------------------------------------------------------------------------------

def test_fcfs_admits_in_arrival_order_whatever_the_adapter():
    sched, _, _ = make(max_num_seqs=1, sizes={"x": 1, "y": 1})
    for rid, key in [(0, "x"), (1, "y"), (2, "x")]:
        sched.add(req(rid, 2, key, max_tokens=1))
    order = []
    while sched.has_unfinished():
        out = sched.schedule()
        order += ids(out)
        run_step(sched, out)
        finish_done(sched, out)
    assert order == [0, 1, 2]


def test_cluster_prefers_running_then_resident_adapters():
    clock = Clock()
    sched, _, adapters = make(max_num_seqs=2, sizes={"x": 1, "y": 1, "z": 1}, clock=clock,
                              policy="cluster", policy_max_wait_s=100.0)
    sched.add(req(0, 2, "y", max_tokens=1))  # makes "y" resident, then finishes
    out = sched.schedule()
    run_step(sched, out)
    finish_done(sched, out)
    running = req(1, 2, "x", max_tokens=50)
    sched.add(running)
    run_step(sched, sched.schedule())
    # waiting, in arrival order: z (cold), y (resident), x (in the running batch), z, x
    for rid, key in [(2, "z"), (3, "y"), (4, "x"), (5, "z"), (6, "x")]:
        sched.add(req(rid, 2, key, max_tokens=1))
    assert [r.request_id for r in sched.policy.order(sched.waiting, sched._view(0.0, set()))] \
        == [4, 6, 3, 2, 5]
    out = sched.schedule()  # one free sequence slot
    assert ids(out) == [1, 4]
    assert list(adapters.resident) == ["y", "x"]  # "z" was not loaded


def test_cluster_starvation_bound_takes_the_oldest_first():
    clock = Clock()
    sched, _, _ = make(max_num_seqs=2, sizes={"x": 1, "z": 1}, clock=clock, policy="cluster",
                       policy_max_wait_s=5.0)
    runner = req(0, 2, "x", max_tokens=1000)
    sched.add(runner)
    run_step(sched, sched.schedule())
    cold = req(1, 2, "z", max_tokens=1)
    cold.arrival_time = 0.0
    sched.add(cold)
    admitted = []
    for step in range(12):  # a new "x" request arrives every second; each takes one step
        clock.now = float(step)
        warm = req(10 + step, 2, "x", max_tokens=1)
        warm.arrival_time = clock.now
        sched.add(warm)
        out = sched.schedule()
        admitted += [i for i in ids(out) if i != 0]
        run_step(sched, out)
        finish_done(sched, out)
    # "z" is passed over while it waits <= 5 s, then taken before the newer "x" requests
    assert admitted[:7] == [10, 11, 12, 13, 14, 15, 1]


def service_share(policy: str) -> float:
    """A 10:1 flood of "heavy" over "light" requests through 2 sequence slots; returns the
    light adapter's share of the tokens served until its last request finishes."""
    sched, _, _ = make(num_pages=200, max_num_seqs=2, budget=64, sizes={"heavy": 1, "light": 1},
                       policy=policy)
    rid = 0
    light = []
    for _ in range(5):
        for _ in range(10):
            sched.add(req(rid, 4, "heavy", max_tokens=4))
            rid += 1
        light.append(req(rid, 4, "light", max_tokens=4))
        sched.add(light[-1])
        rid += 1
    served = {"heavy": 0, "light": 0}
    while not all(r.is_finished for r in light):
        out = sched.schedule()
        for s in out.scheduled:
            served[s.request.adapter_key] += s.num_new_tokens
        run_step(sched, out)
        finish_done(sched, out)
    return served["light"] / (served["light"] + served["heavy"])


def test_fair_policy_keeps_a_light_adapter_served_under_a_flood():
    fair, fcfs = service_share("fair"), service_share("fcfs")
    # VTC gives each backlogged client about half of two slots; FCFS serves the flood first
    assert 0.4 <= fair <= 0.6, fair
    assert fcfs < 0.15, fcfs


def test_fair_policy_orders_by_virtual_counters():
    sched, _, _ = make(policy="fair", sizes={"a": 1, "b": 1})
    for rid, key in enumerate(["a", "a", "b", "b", None, "b"]):
        sched.add(req(rid, 3, key))  # each prompt costs 3 when admitted
    sched.policy.counters.update({"a": 10.0, "b": 0.0, None: 4.0})
    order = [r.request_id for r in sched.policy.order(sched.waiting, sched._view(0.0, set()))]
    # counters: b 0 -> 3 -> 6, base 4 -> 7, b 6 -> 9, a 10 -> 13
    assert order == [2, 3, 4, 5, 0, 1]


def test_fair_policy_lifts_a_returning_client_to_the_active_minimum():
    sched, _, _ = make(policy="fair", sizes={"a": 1, "b": 1})
    sched.policy.counters.update({"a": 50.0, "b": 2.0})
    sched.add(req(0, 3, "a"))  # "a" is the only active client: nothing to lift it to
    assert sched.policy.counters["a"] == 50.0
    sched.add(req(1, 3, "b"))  # "b" idled with a low counter: lifted to 50, no saved credit
    assert sched.policy.counters["b"] == 50.0


def test_fair_policy_gives_no_credit_to_a_newcomer_into_an_idle_system():
    sched, _, _ = make(policy="fair", max_num_seqs=1, sizes={"a": 1, "b": 1})
    alone = req(0, 3, "a", max_tokens=1)
    sched.add(alone)
    out = sched.schedule()
    run_step(sched, out)
    sched.finish(alone, "length")
    sched.policy.charge(alone, 600, 0)  # "a" was served a lot while alone; now all is idle
    flood = [req(1 + i, 3, "b") for i in range(20)]
    for r in flood:
        sched.add(r)
    late = req(21, 3, "a")
    sched.add(late)
    order = [r.request_id for r in sched.policy.order(sched.waiting, sched._view(0.0, set()))]
    assert order.index(21) <= 1, order  # not behind the whole flood


def test_fair_policy_preempts_the_most_served_adapter():
    # 8 pages = 4 blocks; "heavy" got more service, so its request goes although "light" is
    # the most recently admitted (which FCFS preempts)
    for policy, victim in [("fair", 0), ("fcfs", 1)]:
        sched, _, _ = make(num_pages=8, block_size=4, policy=policy,
                           sizes={"heavy": 0, "light": 0})
        heavy, light = req(0, 8, "heavy"), req(1, 8, "light")
        sched.add(heavy)
        sched.add(light)
        out = sched.schedule()
        assert ids(out) == [0, 1]
        sched.policy.charge(heavy, 100, 0)
        run_step(sched, out)
        out = sched.schedule()  # both need a third block; 4 blocks in the pool
        assert [r.request_id for r in out.preempted] == [victim] and ids(out) == [1 - victim]


# -- watermark ----------------------------------------------------------------------------------

def test_watermark_keeps_pages_free_for_running_requests():
    # 20 pages, watermark 0.2 -> 4 pages (2 blocks of 2 layers) stay free while others run
    for watermark, admitted in [(0.2, [0]), (0.0, [0, 1])]:
        sched, alloc, _ = make(num_pages=20, block_size=4, watermark=watermark)
        first, tight = req(0, 16), req(1, 20)  # 8 pages; then 10 of the 12 free, leaving 2
        sched.add(first)
        out = sched.schedule()
        run_step(sched, out)
        sched.add(tight)
        assert ids(sched.schedule()) == admitted, watermark
    alone = req(2, 36)  # the whole pool once it has its first output token
    sched, alloc, _ = make(num_pages=20, block_size=4, watermark=0.2)
    sched.add(alone)
    assert ids(sched.schedule()) == [2]  # alone, a request may use the watermark's pages


# -- early abort --------------------------------------------------------------------------------

def test_waiting_request_past_its_deadline_is_aborted():
    clock = Clock()
    sched, alloc, _ = make(max_num_seqs=1, budget=4, clock=clock)
    long = req(0, 40, max_tokens=1)  # 10 steps of prefill at 4 tokens per step
    sched.add(long)
    late = req(1, 8)
    late.deadline = 2.5  # needs 2 steps once admitted; at 1 s per step it cannot make it
    patient = req(2, 8)
    sched.add(late)
    sched.add(patient)
    out = sched.schedule()
    assert out.aborted == []  # no step time known yet
    run_step(sched, out)
    clock.now = 1.0
    out = sched.schedule()  # 1 s per step: 1 + 2 x 1 > 2.5
    assert out.aborted == [late] and late.finish_reason == "abort" and "deadline" in late.error
    assert sched.kv.blocks_of(late) == [] and sched.waiting == [patient]
    assert alloc.num_used("kv") == len(sched.kv.blocks_of(long)) * 2


# -- prefix caching -----------------------------------------------------------------------------

def cached_make(**kw):
    kw.setdefault("num_pages", 40)
    return make(block_size=4, enable_prefix_caching=True, **kw)


def run_to_end(sched, requests) -> None:
    while any(not r.is_finished for r in requests):
        out = sched.schedule()
        run_step(sched, out)
        finish_done(sched, out)
        sched.kv.check_invariants(sched.running)


def test_prefix_blocks_are_shared_by_reference_count():
    sched, alloc, _ = cached_make()
    a = req(0, 10, max_tokens=1)
    sched.add(a)
    run_to_end(sched, [a])
    assert alloc.num_used("kv") == 4 and sched.kv.evictable_pages == 4  # 2 full blocks cached
    b, c = req(1, 10, max_tokens=3), req(2, 9, max_tokens=3)  # same first 8 tokens
    sched.add(b)
    sched.add(c)
    out = sched.schedule()
    # both reuse the 2 cached blocks and compute only the rest
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(1, 2), (2, 1)]
    assert sched.kv.blocks_of(b)[:2] == sched.kv.blocks_of(c)[:2]
    assert b.num_cached_tokens == c.num_cached_tokens == 8
    sched.kv.check_invariants(sched.running)
    assert sched.kv.evictable_pages == 0
    run_to_end(sched, [b, c])
    assert sched.kv.hit_tokens == 16 and sched.kv.queried_tokens == 29


def test_a_whole_cached_prompt_still_computes_its_last_token():
    sched, _, _ = cached_make()
    a = req(0, 8, max_tokens=1)
    sched.add(a)
    run_to_end(sched, [a])
    b = req(1, 8, max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    # 8 tokens = 2 full cached blocks, but the logits of token 8 need one computed: the second
    # block is not reused (a step never writes into a shared block)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(1, 4)]


def test_different_adapters_never_share_kv():
    sched, _, _ = cached_make(sizes={"x": 1, "y": 1})
    a = req(0, 10, "x", max_tokens=1)
    sched.add(a)
    run_to_end(sched, [a])
    for rid, key in [(1, "y"), (2, None)]:
        r = req(rid, 10, key, max_tokens=1)
        sched.add(r)
        out = sched.schedule()
        assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(rid, 10)]
        run_to_end(sched, [r])
    same = req(3, 10, "x", max_tokens=1)
    sched.add(same)
    assert [s.num_new_tokens for s in sched.schedule().scheduled] == [2]


def test_cached_blocks_are_evicted_lru_when_pages_run_short():
    sched, alloc, _ = cached_make(num_pages=12)
    a, b = req(0, 9, max_tokens=1), req(1, 9, max_tokens=1)
    b.prompt_token_ids = [t + 100 for t in b.prompt_token_ids]
    for r in (a, b):
        sched.add(r)
        run_to_end(sched, [r])
    assert sched.kv.evictable_pages == 8 and alloc.num_free == 4  # a's and b's 2 blocks each
    big = req(2, 15, max_tokens=1)
    big.prompt_token_ids = [t + 200 for t in big.prompt_token_ids]
    sched.add(big)  # 4 blocks = 8 pages: the 4 free ones and a's 2 blocks, freed before b's
    out = sched.schedule()
    assert ids(out) == [2] and sched.kv.evictable_pages == 4
    again_b = req(3, 9, max_tokens=1)
    again_b.prompt_token_ids = list(b.prompt_token_ids)
    again_a = req(4, 9, max_tokens=1)
    assert len(sched.kv.match_prefix(again_b)) == 2 and sched.kv.match_prefix(again_a) == []


def test_preempted_request_recomputes_from_its_own_cached_blocks():
    sched, alloc, _ = cached_make(num_pages=8)
    a, b = req(0, 8), req(1, 8)
    b.prompt_token_ids = [t + 100 for t in b.prompt_token_ids]
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    out = sched.schedule()
    assert out.preempted == [b]
    run_step(sched, out)
    sched.finish(a, "stop")
    out = sched.schedule()
    # b's 2 full blocks were cached when it was preempted; a's growth evicted the tail one
    # (a sequence's tail goes first), so b reuses its first block and computes 5 tokens
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [(1, 5)]
    sched.kv.check_invariants(sched.running)
