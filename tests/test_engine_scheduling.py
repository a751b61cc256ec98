"""The engine with the scheduler's features on the tiny random Llama: preemption, prefix
caching, policies, early abort, cancellation and streaming."""

from __future__ import annotations

import threading

import pytest
import torch
from support import assert_kv_released, prompts, step_until_done, tokens

from pagedlora import Engine, SamplingParams
from pagedlora.sampler import Sampler

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

PAGE_BYTES = 2 * 8 * 2 * 16 * 4  # K and V x block 8 x 2 kv heads x head_dim 16 x fp32


def small_engine(model_dir, num_pages, **options):
    return Engine(model_dir, pool_gb=num_pages * PAGE_BYTES / 2**30, block_size=8, **options)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, pool_gb=0.02, max_model_len=128, block_size=8)


@pytest.mark.parametrize("caching", [False, True])
def test_preemption_gives_the_same_greedy_tokens(tiny_llama_dir, caching):
    ps = prompts(8, seed=10, lo=20, hi=40)
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, enable_prefix_caching=False
                  ).generate(ps, sampling_params=sp, progress=False)
    # 2 layers x 8 tokens per block: 40 pages = 20 blocks, far less than 8 x 64 tokens need
    small = small_engine(tiny_llama_dir, 40, enable_prefix_caching=caching)
    got = small.generate(ps, sampling_params=sp, progress=False)
    assert small.stats()["pages_total"] == 40
    assert sum(o.num_preemptions for o in got) > 0
    assert tokens(got) == tokens(want)
    assert_kv_released(small)


def test_prefix_caching_reuses_blocks_and_keeps_tokens(tiny_llama_dir):
    shared = prompts(1, seed=20, lo=40, hi=40)[0]  # 5 blocks of 8
    tails = prompts(6, seed=21, lo=1, hi=12)
    ps = [shared + t for t in tails]
    off = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, enable_prefix_caching=False)
    on = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    want = off.generate(ps, sampling_params=GREEDY, progress=False)
    first = on.generate(ps[:1], sampling_params=GREEDY, progress=False)
    rest = on.generate(ps[1:], sampling_params=GREEDY, progress=False)
    assert tokens(first + rest) == tokens(want)
    assert first[0].num_cached_tokens == 0
    assert [o.num_cached_tokens for o in rest] == [40] * 5
    assert all(o.num_cached_tokens == 0 for o in want)
    stats = on.stats()["prefix_cache"]
    assert stats["hit_tokens"] == 200
    assert stats["queried_tokens"] == sum(len(p) for p in ps)
    assert_kv_released(on)


def test_adapters_with_the_same_prompt_never_share_kv(tiny_llama_dir, make_adapter):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    paths = {name: make_adapter(tiny_llama_dir, name, r=4, seed=i,
                                target_modules=["q_proj", "v_proj"])
             for i, name in enumerate(["x", "y"])}
    for name, path in paths.items():
        engine.add_adapter(name, path)
    p = prompts(1, seed=22, lo=30, hi=30)[0]
    outs = [engine.generate([p], adapters=a, sampling_params=GREEDY, progress=False)[0]
            for a in ["x", "y", None, "x"]]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 24]
    fresh = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, enable_prefix_caching=False)
    for name, path in paths.items():
        fresh.add_adapter(name, path)
    want = [fresh.generate([p], adapters=a, sampling_params=GREEDY, progress=False)[0]
            for a in ["x", "y", None]]
    assert tokens(outs[:3]) == tokens(want) and outs[3].token_ids == outs[0].token_ids
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # the adapters do change tokens


def test_a_name_re_added_with_new_weights_gets_fresh_kv(tiny_llama_dir, make_adapter):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    old = make_adapter(tiny_llama_dir, "old", r=4, seed=1, target_modules=["k_proj", "v_proj"])
    new = make_adapter(tiny_llama_dir, "new", r=8, seed=2, target_modules=["v_proj"])
    p = prompts(1, seed=23, lo=30, hi=30)[0]
    engine.add_adapter("a", old)
    engine.generate([p], adapters="a", sampling_params=GREEDY, progress=False)
    engine.add_adapter("a", new)
    got = engine.generate([p], adapters="a", sampling_params=GREEDY, progress=False)[0]
    assert got.num_cached_tokens == 0
    fresh = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, enable_prefix_caching=False)
    fresh.add_adapter("a", new)
    want = fresh.generate([p], adapters="a", sampling_params=GREEDY, progress=False)[0]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("policy", ["cluster", "fair"])
def test_policies_do_not_change_greedy_tokens(tiny_llama_dir, make_adapter, policy):
    ps = prompts(12, seed=24)
    names = [None, "x", "y", "x"] * 3
    outs = {}
    for pol in ["fcfs", policy]:
        engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, policy=pol, max_num_seqs=3,
                        max_loras=1)
        for i, name in enumerate(["x", "y"]):
            engine.add_adapter(name, make_adapter(tiny_llama_dir, f"{pol}-{name}", r=4, seed=i,
                                                  target_modules=["q_proj", "o_proj"]))
        outs[pol] = engine.generate(ps, adapters=names, sampling_params=GREEDY, progress=False)
        steps = engine.stats(history=True)["steps"]
        assert max(s["num_adapters"] for s in steps) == 1  # max_loras
        assert max(s["batch_size"] for s in steps) <= 3
    assert tokens(outs[policy]) == tokens(outs["fcfs"])


def test_a_request_that_cannot_meet_its_deadline_is_aborted(engine):
    ps = prompts(3, seed=25)
    sp = [GREEDY, SamplingParams(max_tokens=4, temperature=0, deadline_s=1e-9),
          SamplingParams(max_tokens=4, temperature=0, deadline_s=3600.0)]
    outs = engine.generate(ps, sampling_params=sp, progress=False)
    assert [o.finish_reason for o in outs] == ["length", "abort", "length"]
    assert outs[1].token_ids == [] and "deadline" in outs[1].error
    assert_kv_released(engine)


def test_stream_yields_tokens_and_text_as_they_come(engine):
    ps = prompts(3, seed=26)
    want = engine.generate(ps, sampling_params=GREEDY, progress=False)
    pieces = {i: ([], "") for i in range(3)}
    finished = []
    for d in engine.stream(ps, sampling_params=GREEDY):
        ids, text = pieces[d.index]
        pieces[d.index] = (ids + d.new_token_ids, text + d.new_text)
        if d.finished:
            finished.append(d.index)
            assert d.output.token_ids == pieces[d.index][0]
            assert d.output.text == pieces[d.index][1]
        else:
            assert len(d.new_token_ids) == 1 and d.output is None
    assert sorted(finished) == [0, 1, 2]
    assert [pieces[i][0] for i in range(3)] == tokens(want)
    assert [pieces[i][1] for i in range(3)] == [o.text for o in want]
    assert_kv_released(engine)


def test_stream_holds_back_a_possible_stop_string(engine):
    p = prompts(1, seed=27)[0]
    text = engine.generate([p], sampling_params=GREEDY, progress=False)[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    want = engine.generate([p], sampling_params=sp, progress=False)[0]
    streamed = "".join(d.new_text for d in engine.stream([p], sampling_params=sp))
    assert want.finish_reason == "stop" and stop not in want.text
    assert streamed == want.text == text[:text.find(stop)]


def test_closing_a_stream_aborts_its_requests(engine):
    it = engine.stream(prompts(4, seed=28), sampling_params=GREEDY)
    first = next(it)
    assert not first.finished
    assert engine.stats()["requests_running"] == 4
    it.close()
    assert engine.stats()["requests_running"] == engine.stats()["requests_waiting"] == 0
    assert engine.outputs.num_live == 0
    assert_kv_released(engine)


def test_abort_finishes_one_request_and_the_others_go_on(engine):
    ps = prompts(3, seed=29)
    want = engine.generate(ps, sampling_params=GREEDY, progress=False)
    outs = {}
    for d in engine.stream(ps, sampling_params=GREEDY):
        if d.index == 1 and not d.finished and len(d.new_token_ids) and not outs:
            assert engine.abort(d.request_id)
            outs["aborted_at"] = d.request_id
        if d.finished:
            outs[d.index] = d.output
    assert outs[1].finish_reason == "abort" and len(outs[1].token_ids) < 12
    assert outs[1].token_ids == want[1].token_ids[:len(outs[1].token_ids)]
    assert tokens([outs[0], outs[2]]) == tokens([want[0], want[2]])
    assert not engine.abort(outs[1].request_id)  # finished: nothing to abort
    assert not engine.abort(10**9)
    assert_kv_released(engine)


def test_adapters_of_waiting_requests_are_prefetched_while_others_run(tiny_llama_dir,
                                                                      make_adapter):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, max_num_seqs=1)
    path = make_adapter(tiny_llama_dir, "x", r=8, seed=3, target_modules=["q_proj", "down_proj"])
    engine.add_adapter("x", path)
    key = engine.adapters.key_of("x")
    ps = prompts(2, seed=30)
    assert engine.adapters.tier(key) in ("disk", "source")
    it = engine.stream(ps, adapters=[None, "x"], sampling_params=GREEDY)
    next(it)  # the base request's first step; "x" waits (one sequence at a time)
    assert engine.adapters.wait_prefetched() and engine.adapters.num_prefetched == 1
    if engine.adapters.tier(key) == "host":  # read on the prefetch thread after the step
        next(it)  # the step after: free pages take it into the pool, unpinned
    assert engine.adapters.tier(key) == "pool"
    assert engine.stats()["requests_waiting"] == 1  # ... before its request is admitted
    outs = {d.index: d.output for d in it if d.finished}
    fresh = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    fresh.add_adapter("x", path)
    want = fresh.generate(ps, adapters=[None, "x"], sampling_params=GREEDY, progress=False)
    assert [outs[0].token_ids, outs[1].token_ids] == tokens(want)
    stats = engine.stats()["adapters"]["x"]
    assert stats["loads_from_source"] + stats["loads_from_disk"] == 1


class Watching(Sampler):
    """A sampler that tells when request ``target`` has sampled two tokens."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.target, self.counts, self.started = None, {}, threading.Event()

    def sample(self, logits, rows):
        for row in rows:
            self.counts[row.request_id] = self.counts.get(row.request_id, 0) + 1
            if row.request_id == self.target and self.counts[row.request_id] == 2:
                self.started.set()
        return super().sample(logits, rows)


def test_abort_from_another_thread_while_generate_runs(tiny_llama_dir):
    watching = Watching()
    engine = Engine(tiny_llama_dir, pool_gb=0.02, max_model_len=128, block_size=8,
                    sampler=watching)
    sp = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    first = engine.processor.next_id() + 1  # ids are handed out in order
    watching.target = first + 1  # the second prompt's request id

    def abort_when_started():
        assert watching.started.wait(60)
        assert engine.abort(watching.target)

    thread = threading.Thread(target=abort_when_started)
    thread.start()
    outs = engine.generate(prompts(3, seed=31), sampling_params=sp, progress=False)
    thread.join()
    assert [o.request_id for o in outs] == [first, first + 1, first + 2]
    assert [o.finish_reason for o in outs] == ["length", "abort", "length"]
    assert 2 <= len(outs[1].token_ids) < 60
    assert_kv_released(engine)


def test_re_adding_a_name_keeps_the_old_weights_for_requests_already_queued(tiny_llama_dir,
                                                                          make_adapter):
    old = make_adapter(tiny_llama_dir, "old", r=4, seed=5, target_modules=["q_proj", "v_proj"])
    new = make_adapter(tiny_llama_dir, "new", r=8, seed=6, target_modules=["o_proj"])
    ps = prompts(2, seed=32)
    want = {}
    for label, path in [("old", old), ("new", new)]:
        ref = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
        ref.add_adapter("x", path)
        want[label] = ref.generate(ps[1], adapters="x", sampling_params=GREEDY,
                                   progress=False)[0].token_ids
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, max_num_seqs=1,
                    max_cpu_loras=0)  # no host copy: the old weights come from their source
    engine.add_adapter("x", old)
    it = engine.stream(ps, adapters=[None, "x"], sampling_params=GREEDY)
    next(it)  # the base request runs; the "x" request waits with the old content's key
    engine.add_adapter("x", new)
    outs = {d.index: d.output for d in it if d.finished}
    assert outs[1].finish_reason == "length", outs[1].error
    assert outs[1].token_ids == want["old"]
    now = engine.generate(ps[1], adapters="x", sampling_params=GREEDY, progress=False)[0]
    assert now.token_ids == want["new"] and want["new"] != want["old"]
    assert engine.adapters.num_contents == 1  # the old content went with its last request


def test_an_interrupt_while_loading_an_adapter_leaves_no_page_behind(tiny_llama_dir,
                                                                     make_adapter, monkeypatch):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, max_cpu_loras=0)
    engine.add_adapter("x", make_adapter(tiny_llama_dir, "x", r=4, seed=7,
                                         target_modules=["q_proj"]))
    p = prompts(1, seed=33, lo=30, hi=30)[0]
    engine.generate([p], adapters="x", sampling_params=GREEDY, progress=False)  # caches KV
    engine.adapters.evict_unpinned(engine.pool.num_pages)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.adapters, "_read_tiers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([p], adapters="x", sampling_params=GREEDY, progress=False)
    assert_kv_released(engine)
    assert engine.stats()["requests_waiting"] == 0 and engine.outputs.num_live == 0
    monkeypatch.undo()
    again = engine.generate([p], adapters="x", sampling_params=GREEDY, progress=False)[0]
    assert again.finish_reason == "length" and again.num_cached_tokens == 24


def collect(items):
    """``index -> (token ids, text, final output)`` from StreamOutputs."""
    got = {}
    for d in items:
        ids, text, _ = got.get(d.index, ([], "", None))
        got[d.index] = (ids + d.new_token_ids, text + d.new_text, d.output)
    return got


def test_interleaved_streams_and_generate_each_get_their_own_outputs(engine):
    ps = prompts(5, seed=34)
    want = engine.generate(ps, sampling_params=GREEDY, progress=False)
    s1 = engine.stream(ps[:2], sampling_params=GREEDY)
    s2 = engine.stream(ps[2:4], sampling_params=GREEDY)
    seen1, seen2 = [next(s1)], [next(s2)]
    seen1.append(next(s1))
    middle = engine.generate(ps[4:], sampling_params=GREEDY, progress=False)  # steps s1, s2
    seen2 += list(s2)  # finishes s2's requests, and s1's along the way
    seen1 += list(s1)  # s1 finds its outputs waiting: no hang, nothing lost
    for seen, first in [(seen1, 0), (seen2, 2)]:
        got = collect(seen)
        for i, (ids, text, out) in got.items():
            assert ids == out.token_ids == want[first + i].token_ids
            assert text == out.text
        assert sorted(got) == [0, 1]
    assert middle[0].token_ids == want[4].token_ids
    assert_kv_released(engine)


def test_holds_stay_balanced_when_a_name_is_removed_and_re_added_mid_submit(tiny_llama_dir,
                                                                            make_adapter):
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    path = make_adapter(tiny_llama_dir, "a", r=4, seed=8, target_modules=["q_proj"])
    engine.add_adapter("a", path)
    key = engine.adapters.key_of("a")
    p1, p2 = prompts(2, seed=35)
    first = engine.processor.process(p1, key, GREEDY, request_id=engine.processor.next_id())
    engine.remove_adapter("a")  # another thread, after the key lookup, before queueing
    engine.enqueue(first, prompt=p1, adapter="a")
    failed = engine.step()  # it joins the scheduler: no hold taken, so it fails alone
    assert not first.holds_adapter and [d.output.finish_reason for d in failed] == ["error"]
    engine.add_adapter("a", path)  # the same content again
    second = engine.processor.process(p2, key, GREEDY, request_id=engine.processor.next_id())
    engine.enqueue(second, prompt=p2, adapter="a")
    engine.step()
    with pytest.raises(ValueError, match="in use by 1 waiting or running request"):
        engine.remove_adapter("a")
    assert engine.abort(second.request_id)
    step_until_done(engine)
    engine.remove_adapter("a")
    assert engine.outputs.num_live == 0
