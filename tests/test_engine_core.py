"""EngineCore stepped directly with a stub sampler; the Engine shared between threads; close()."""

from __future__ import annotations

import threading

import pytest
import torch
from support import assert_kv_released, engine_with, prompts, tokens, write_random_lora

from pagedlora import Engine, SamplingParams
from pagedlora.sampler import RequestSampling
from pagedlora.scheduler import Request, RequestStatus

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


class Scripted:
    """A stub sampler: each request samples the tokens of its script, in order."""

    def __init__(self, scripts: dict[int, list[int]]) -> None:
        self.scripts = scripts
        self.rows: list[list[int]] = []  # request ids sampled, per step
        self.forgotten: list[int] = []

    def sample(self, logits, rows):
        assert logits.dtype == torch.float32 and logits.shape[0] == len(rows)
        self.rows.append([r.request_id for r in rows])
        return [self.scripts[r.request_id].pop(0) for r in rows]

    def forget(self, request_ids):
        self.forgotten.extend(request_ids)


def request(rid: int, prompt: list[int], max_tokens: int, stop: frozenset = frozenset()):
    return Request(request_id=rid, prompt_token_ids=prompt, max_tokens=max_tokens,
                   adapter_key=None, arrival_time=0.0, stop_token_ids=stop,
                   sampling=RequestSampling(GREEDY, seed=rid))


def test_core_step_is_schedule_run_update_with_one_writer(tiny_llama_dir):
    """Two requests through EngineCore.step() alone: the scheduler appends what the (stub)
    sampler chose, a stop token finishes one with "stop", max_tokens the other with
    "length", each step reports exactly the requests it changed, and pages come back."""
    stub = Scripted({0: [11, 12, 99], 1: [21, 22, 23, 24]})
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, sampler=stub)
    core = engine.core
    a, b = request(0, prompts(1, seed=1)[0], 10, frozenset({99})), request(1, [5, 6, 7], 4)
    core.add_request(a)
    core.add_request(b)
    assert core.has_unfinished() and not core.scheduler.has_unfinished()  # queued only
    changed = []
    while core.has_unfinished():
        changed.append([r.request_id for r in core.step().requests])
    assert changed == [[0, 1], [0, 1], [0, 1], [1]]
    assert stub.rows == changed  # a token for every changed request, none for others
    assert (a.output_token_ids, a.finish_reason) == ([11, 12, 99], "stop")
    assert (b.output_token_ids, b.finish_reason) == ([21, 22, 23, 24], "length")
    assert a.status is b.status is RequestStatus.FINISHED
    assert a.first_token_time <= a.finished_time and b.first_token_time <= b.finished_time
    core.step()  # an empty step tells the runner which requests finished
    assert sorted(stub.forgotten) == [0, 1]
    assert core.stats().pool.kv == core.stats().kv.cached_pages  # nothing held
    steps = engine.stats(history=True)["steps"]
    assert [len(s["scheduled"]) for s in steps] == [2, 2, 2, 1]
    assert steps[0]["scheduled"] == ((0, 0, len(a.prompt_token_ids)), (1, 0, 3))


def test_an_abort_between_steps_finishes_at_the_next_step(tiny_llama_dir):
    stub = Scripted({0: [1] * 10})
    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8, sampler=stub)
    r = request(0, [5, 6, 7, 8], 10)
    engine.core.add_request(r)
    engine.core.step()
    engine.core.abort(0)
    assert r.status is RequestStatus.RUNNING  # queued: applied by the next step
    out = engine.core.step()
    assert out.requests == (r,) and r.finish_reason == "abort" and r.output_token_ids == [1]
    assert out.stats is None  # nothing else to run
    assert_kv_released(engine)


def test_threads_sharing_one_engine_each_get_their_own_outputs(tiny_llama_dir, tmp_path):
    """Four threads call generate (and one streams) on one engine at once, over mixed
    adapters: their requests join one running batch and each call gets exactly its own
    outputs, equal to those of single-threaded calls."""
    engine = engine_with(tiny_llama_dir, 300, max_num_seqs=16)
    for i in range(3):
        engine.add_adapter(f"t{i}", write_random_lora(tmp_path / f"t{i}", r=2 + 3 * i, seed=i,
                                                      target_modules=["q_proj", "down_proj"]))
    jobs = []
    for j in range(5):
        ps = prompts(4, seed=60 + j, hi=20)
        jobs.append((ps, [None if (j + k) % 4 == 3 else f"t{(j + k) % 3}" for k in range(4)]))
    want = [tokens(engine.generate(ps, adapters=names, sampling_params=GREEDY, progress=False))
            for ps, names in jobs]
    got: dict[int, list] = {}
    errors = []
    barrier = threading.Barrier(len(jobs))

    def call(j):
        ps, names = jobs[j]
        try:
            barrier.wait()
            if j == 4:
                outs = [d.output for d in engine.stream(ps, adapters=names,
                                                        sampling_params=GREEDY)
                        if d.finished]
                outs.sort(key=lambda o: o.request_id)
            else:
                outs = engine.generate(ps, adapters=names, sampling_params=GREEDY,
                                       progress=False)
            got[j] = tokens(outs)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=call, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [got[j] for j in range(len(jobs))] == want
    batched = max(s["batch_size"] for s in engine.stats(history=True)["steps"])
    assert batched > 4, "the threads' requests never shared a step"
    assert_kv_released(engine)


def test_close_stops_the_prefetcher_and_removes_the_private_spill_dir(tiny_llama_dir,
                                                                        tmp_path):
    with engine_with(tiny_llama_dir, 100, max_cpu_loras=0) as engine:
        engine.add_adapter("a", write_random_lora(tmp_path / "a", r=4, seed=1,
                                                  target_modules=["q_proj"]))
        engine.generate([[5, 6, 7]], adapters="a", sampling_params=GREEDY, progress=False)
        key = engine.adapters.key_of("a")
        spilled = engine.adapters.spill.file_of(key)
        assert spilled is not None and spilled.is_file()  # max_cpu_loras=0: spilled at once
        engine.adapters.start_prefetch([key])  # evicted from nowhere: tier "disk", fetched
        engine.adapters.evict_unpinned(engine.pool.num_pages)
        engine.adapters.start_prefetch([key])
        assert engine.adapters.wait_prefetched()
        running = prefetch_threads()
        assert running >= 1  # this engine's (others' may still run)
    assert not spilled.parent.exists()
    assert prefetch_threads() == running - 1
    engine.close()  # idempotent


def prefetch_threads() -> int:
    return sum(t.name == "pagedlora-prefetch" for t in threading.enumerate())


def test_unknown_adapter_is_its_own_error_and_still_a_value_error(tiny_llama_dir):
    from pagedlora.errors import UnknownAdapterError

    engine = Engine(tiny_llama_dir, pool_gb=0.02, block_size=8)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        engine.generate([[1, 2]], adapters="nope", progress=False)
    assert issubclass(UnknownAdapterError, ValueError)
    assert not engine.has_unfinished() and engine.outputs.num_live == 0
