"""Review of the EngineCore redesign (issue 13): failing tests for the bugs found."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from support import (
    assert_kv_released,
    assert_no_leaks,
    engine_with,
    prompts,
    random_prompt,
    step_until_done,
    write_random_lora,
)

import pagedlora.output_processor
from pagedlora import SamplingParams
from pagedlora.detokenizer import Detokenizer
from pagedlora.host_cache import HostCache
from pagedlora.sampler import Sampler

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def lora(tmp_path, name, seed, r=4):
    return write_random_lora(tmp_path / name, r=r, seed=seed, target_modules=["q_proj", "o_proj"])


class FailingOnce(Sampler):
    """Raises from the ``fail_at``-th call of ``sample`` (1-based), once."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(torch.device("cpu"))
        self.calls, self.fail_at = 0, fail_at

    def sample(self, logits, rows):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure in the runner")
        return super().sample(logits, rows)


def test_remove_adapter_is_refused_while_a_just_added_request_waits(tiny_llama_dir, tmp_path):
    """remove_adapter raises while requests for the adapter wait (README, docstring); a
    request queued by add_request (or generate in another thread) but not yet stepped is
    waiting. Before the redesign Scheduler.add took the hold inside add_request; now the
    hold is taken at the next step's _take_queued, so the remove succeeds and the request
    then fails with "error"."""
    engine = engine_with(tiny_llama_dir, 100)
    engine.add_adapter("a", lora(tmp_path, "a", seed=1))
    rid = engine.add_request(prompts(1, seed=1)[0], "a", GREEDY)
    with pytest.raises(ValueError, match="in use"):
        engine.remove_adapter("a")
    seen = step_until_done(engine)
    assert seen[rid].finish_reason == "length", seen[rid].error
    assert_kv_released(engine)


def test_re_adding_a_name_right_after_add_request_keeps_the_old_weights(tiny_llama_dir,
                                                                       tmp_path):
    """add_adapter: "Re-adding a name with other weights makes a new adapter; requests
    already queued keep the old one." A request queued by add_request and not yet stepped
    loses its content (no hold yet) and fails with "error"."""
    engine = engine_with(tiny_llama_dir, 100)
    old, new = lora(tmp_path, "old", seed=2), lora(tmp_path, "new", seed=3, r=8)
    p = prompts(1, seed=2)[0]
    engine.add_adapter("x", old)
    want = engine.generate([p], adapters="x", sampling_params=GREEDY, progress=False)[0]
    rid = engine.add_request(p, "x", GREEDY)
    engine.add_adapter("x", new)
    seen = step_until_done(engine)
    assert seen[rid].finish_reason == "length", seen[rid].error
    assert seen[rid].token_ids == want.token_ids


def test_outputs_finished_in_a_step_that_raised_are_not_lost(tiny_llama_dir):
    """A request aborted between steps is finished by the next schedule() and reported in
    that step's output; when the runner then raises, EngineCore.step drops the output, so
    its caller never gets a finished output (a generate() in another thread would wait
    forever) while the scheduler has forgotten it."""
    engine = engine_with(tiny_llama_dir, 100, sampler=FailingOnce(fail_at=2))
    a = engine.add_request(prompts(1, seed=3)[0], None, GREEDY)
    b = engine.add_request(prompts(1, seed=4)[0], None, GREEDY)
    engine.step()  # both prefilled, first tokens sampled
    assert engine.abort(a)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()  # schedule() finishes a with "abort", then the runner raises
    seen = step_until_done(engine)
    assert b in seen and seen[b].finish_reason == "length"
    assert a in seen and seen[a].finish_reason == "abort"
    assert engine.outputs.num_live == 0


def test_stats_keeps_the_steps_key_the_readme_documented(tiny_llama_dir):
    """Issue 13: "the keys the README documents keep working". The README before the
    redesign documented engine.stats()["steps"][-1]; stats() now has no "steps" unless
    history=True (README and callers were changed instead)."""
    engine = engine_with(tiny_llama_dir, 100)
    engine.generate(prompts(1, seed=5), sampling_params=GREEDY, progress=False)
    last = engine.stats()["steps"][-1]
    assert {"batch_size", "num_tokens", "num_adapters", "num_preempted", "pages_free",
            "seconds"} <= set(last)


def test_a_request_finished_in_a_step_whose_warm_raised_is_not_lost(tiny_llama_dir,
                                                                    monkeypatch):
    """Same cause on the other side of update(): a request that reached max_tokens in
    Scheduler.update has its pages freed and is forgotten by the scheduler; when
    AdapterStore.warm (after update) raises, its last output is never made."""
    engine = engine_with(tiny_llama_dir, 100)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rid = engine.add_request(prompts(1, seed=6)[0], None, one)
    warm = engine.adapters.warm
    calls = []

    def failing_warm(keys):
        calls.append(keys)
        if len(calls) == 1:
            raise RuntimeError("injected failure while warming")
        return warm(keys)

    monkeypatch.setattr(engine.adapters, "warm", failing_warm)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    seen = step_until_done(engine)
    assert rid in seen and seen[rid].finish_reason == "length"
    assert engine.outputs.num_live == 0


class Collecting(Sampler):
    """Runs the cyclic garbage collector inside the step once armed, as any allocation in
    the step may."""

    armed = False

    def sample(self, logits, rows):
        if self.armed:
            self.armed = False
            gc.collect()
        return super().sample(logits, rows)


@pytest.fixture
def manual_gc():
    """No automatic collection during the test, so the abandoned stream is finalized exactly
    where the test runs the collector."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def abandon_in_a_cycle(it) -> None:
    """Drops the last reference to a started stream inside a reference cycle, so only the
    cyclic collector finalizes it (Engine.stream: "Closing the iterator early (close(),
    break, garbage collection) aborts the requests")."""
    holder = {"it": it}
    holder["self"] = holder


def test_a_stream_collected_during_a_step_does_not_break_the_step(tiny_llama_dir, manual_gc):
    """The stream's finalizer runs Engine._abort_now in the stepping thread; StepTurn.held()
    is re-entrant, so core.abort_now finishes the stream's requests between schedule() and
    update(): update() then meets a scheduled request without blocks and dies with the
    IndexError in KVBlockManager.cache_full_blocks that issue 13 set out to remove."""
    sampler = Collecting(torch.device("cpu"))
    engine = engine_with(tiny_llama_dir, 100, sampler=sampler, max_num_batched_tokens=32)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    it = engine.stream([random_prompt(5, 1), random_prompt(200, 2)], sampling_params=sp)
    next(it)  # the short prompt's first token; the long one is prefilled in chunks
    abandon_in_a_cycle(it)
    del it
    other = engine.add_request(prompts(1, seed=7)[0], None, sp)
    sampler.armed = True
    engine.step()  # the collector runs inside it and finalizes the stream
    seen = step_until_done(engine)
    assert seen[other].finish_reason == "length"
    assert_no_leaks(engine)


def test_a_stream_finalized_while_a_request_is_added_does_not_deadlock(tiny_llama_dir,
                                                                      monkeypatch):
    """OutputProcessor.add builds the Detokenizer while holding its (non-re-entrant) lock;
    an allocation there may run the cyclic collector, and its finalization of an abandoned
    stream (what ``close()`` runs: Engine._abort_now) calls OutputProcessor.drop, which takes
    the same lock: the adding thread hangs forever, and every later step with it. The
    finalizer is run here by ``it.close()`` (a collector stuck in it would stop garbage
    collection for the rest of the process)."""
    engine = engine_with(tiny_llama_dir, 100)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    it = engine.stream(prompts(1, seed=8), sampling_params=sp)
    next(it)

    class FinalizingDetokenizer(Detokenizer):
        def __init__(self, *args, **kwargs):
            it.close()  # the collector finalizing the abandoned stream at this allocation
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pagedlora.output_processor, "Detokenizer", FinalizingDetokenizer)
    added = []
    worker = threading.Thread(target=lambda: added.append(
        engine.add_request(prompts(1, seed=9)[0], None, sp)), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "add_request deadlocked on OutputProcessor._lock"
    monkeypatch.undo()
    seen = step_until_done(engine)
    assert seen[added[0]].finish_reason == "length"


def test_a_request_just_added_counts_as_waiting(tiny_llama_dir):
    """Same cause as the two adapter tests above: a request sits in EngineCore's private
    queue until the next step, invisible to stats()["requests_waiting"] (README: requests
    queued), which read 1 here before the redesign."""
    engine = engine_with(tiny_llama_dir, 100)
    engine.add_request(prompts(1, seed=10)[0], None, GREEDY)
    assert engine.has_unfinished()
    assert engine.stats()["requests_waiting"] == 1


class Holding(Sampler):
    """Once armed, tells ``entered`` and waits for ``release`` inside the step (the stepping
    thread holds the turn meanwhile)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.armed, self.entered, self.release = False, threading.Event(), threading.Event()

    def sample(self, logits, rows):
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(30)
        return super().sample(logits, rows)


def test_a_stream_finalized_under_the_store_lock_does_not_deadlock_the_step(tiny_llama_dir,
                                                                            tmp_path,
                                                                            monkeypatch):
    """Lock-order inversion: a stream finalized by the collector in a thread that holds the
    AdapterStore lock (add_adapter(preload=True) putting weights into host memory) waits in
    Engine._abort_now for the turn, while the stepping thread, holding the turn, waits for
    the store lock (Scheduler.finish -> AdapterStore.unpin): both hang for good. The
    finalizer is run by ``it.close()``, as in the test above."""
    sampler = Holding()
    engine = engine_with(tiny_llama_dir, 100, sampler=sampler)
    engine.add_adapter("a", lora(tmp_path, "a", seed=11))
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    it = engine.stream(prompts(1, seed=11), sampling_params=sp)
    next(it)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rid = engine.add_request(prompts(1, seed=12)[0], "a", one)  # finishes in this step
    sampler.armed = True
    stepped = []
    stepper = threading.Thread(target=lambda: stepped.extend(engine.step()), daemon=True)
    stepper.start()
    assert sampler.entered.wait(30)
    put = HostCache.put

    def finalizing_put(self, adapter, weights):
        it.close()  # the collector finalizing the abandoned stream at an allocation here
        return put(self, adapter, weights)

    monkeypatch.setattr(HostCache, "put", finalizing_put)
    adder = threading.Thread(target=engine.add_adapter, daemon=True,
                             args=("p", lora(tmp_path, "p", seed=12)), kwargs={"preload": True})
    adder.start()
    adder.join(1)  # now in the finalizer, waiting for the turn
    sampler.release.set()
    stepper.join(5)
    adder.join(5)
    assert not stepper.is_alive() and not adder.is_alive(), "step and add_adapter deadlocked"
    monkeypatch.undo()
    seen = step_until_done(engine, {d.request_id: d.output for d in stepped if d.finished})
    assert seen[rid].finish_reason == "length"
