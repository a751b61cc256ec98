"""Engine.add_request / step() / generate / stream interplay."""

from __future__ import annotations

from support import random_prompt

from pagedlora import Engine, SamplingParams

SP = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def test_add_request_outputs_survive_a_generate_call(tiny_llama_dir):
    """add_request's docstring: its StreamOutputs are returned by the following step() calls.
    A generate() (or stream()) call in between steps the engine itself and throws away what
    step() returns, so a request queued with add_request (no on_output) that finishes during
    it is never reported to anyone."""
    engine = Engine(tiny_llama_dir, pool_gb=0.02)
    rid = engine.add_request(random_prompt(5, 1), None, SP)
    engine.generate([random_prompt(4, 2)], sampling_params=SamplingParams(max_tokens=6,
                                                                          temperature=0,
                                                                          ignore_eos=True),
                    progress=False)
    seen = [d for _ in range(3) for d in engine.step()]
    assert any(d.request_id == rid and d.finished for d in seen), (
        "request finished inside generate(); its outputs were dropped")


def test_failed_add_request_output_survives_a_generate_call(tiny_llama_dir):
    """Same for a prompt that add_request fails at once (kept in _ready for the next step():
    the step inside generate() takes it and drops it)."""
    engine = Engine(tiny_llama_dir, pool_gb=0.02)
    rid = engine.add_request([], None, SP)  # empty prompt: fails at once
    engine.generate([random_prompt(4, 2)], sampling_params=SP, progress=False)
    seen = [d for _ in range(2) for d in engine.step()]
    assert any(d.request_id == rid and d.output.finish_reason == "error" for d in seen)


def test_throughput_online_driver_returns_when_a_request_fails_at_add(tiny_llama_dir):
    """benchmarks/throughput.py's online driver steps only while the scheduler has requests;
    a request failed at add time (here: longer than max_model_len) sits in the engine's
    ready list that only step() hands out, so the driver spins forever once nothing else
    runs (the offline path raises "requests failed" for the same job)."""
    import sys
    import threading
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from throughput import _drive_online

    engine = Engine(tiny_llama_dir, pool_gb=0.02, max_model_len=32)

    class Job:
        prompts = [random_prompt(40, 2)]  # longer than max_model_len
        arrivals = [0.0]

    outs = []

    def run():
        outs.extend(_drive_online(engine, Job, [None], [SP], time.perf_counter())[0])
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the online driver never returns"
    assert [o.finish_reason for o in outs] == ["error"]


def test_large_engine_seed_does_not_break_every_request(tiny_llama_dir):
    """EngineConfig accepts any int seed, but a request's generator is seeded with
    seed * 1_000_003 + request_id, which overflows torch's 64-bit seed from seed ~1.8e13 on:
    every generate raises "Overflow when unpacking long long" (the HTTP loop reports that
    ValueError as an unknown adapter, 404)."""
    engine = Engine(tiny_llama_dir, pool_gb=0.02, seed=2 * 10**13)
    out = engine.generate([[5, 6, 7]], sampling_params=SP, progress=False)[0]
    assert out.finish_reason == "length"
