"""Review: Engine.add_request / step() / generate / stream interplay."""

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
