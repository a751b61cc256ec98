"""HTTP server units that need no model (engine loop shutdown, body validation)."""

from __future__ import annotations

import json
import threading

import pytest

from pagedlora import SamplingParams
from pagedlora.server.engine_loop import EngineLoop, LoopStopped, Stop
from pagedlora.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    InvocationRequest,
    parse_body,
)


class _IdleEngine:
    """Just enough engine for a loop with nothing to run."""

    @staticmethod
    def has_unfinished() -> bool:
        return False


def test_submission_behind_stop_in_the_same_batch_is_answered():
    """A submission that passed the closed check while stop() ran lands behind Stop in the
    command queue; when the loop thread picks both up in one batch (it was busy stepping),
    _run returns at Stop and the submission is dropped: its handler's open() never gets an
    answer and waits forever. Simulated: Stop queued (stop's put), then submit (its put)."""
    loop = EngineLoop("m", _IdleEngine(), max_queue=4, on_finished=lambda out: None)
    got = []
    answered = threading.Event()

    def deliver(item):
        got.append(item)
        answered.set()

    loop._commands.put(Stop())  # stop() got in between submit's check and its put
    loop.submit(["hi"], [None], [SamplingParams()], deliver)
    fut = loop.call(lambda engine: 1)  # a /metrics call racing the same way
    loop._thread.start()
    loop._thread.join(5)
    assert not loop._thread.is_alive()
    assert answered.wait(1), "the submission was never answered (its client hangs)"
    assert isinstance(got[0], LoopStopped)
    with pytest.raises(LoopStopped):
        fut.result(timeout=1)


def test_max_completion_tokens_zero_is_refused_not_replaced():
    """max_tokens=0 is a 400; max_completion_tokens=0 silently becomes the default (the whole
    room left in max_model_len), against the module's promise of no silent defaults."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ApiError):
        parse_body(ChatCompletionRequest, json.dumps({**body, "max_tokens": 0}).encode()
                   ).to_sampling_params(100)
    req = parse_body(ChatCompletionRequest,
                     json.dumps({**body, "max_completion_tokens": 0}).encode())
    with pytest.raises(ApiError):
        sp = req.to_sampling_params(100)
        raise AssertionError(f"accepted as max_tokens={sp.max_tokens}")


@pytest.mark.parametrize("model, body, hint", [
    (InvocationRequest, {"inputs": "x", "parameters": {"max_tokens": 8}},
     "parameters.max_tokens: unsupported field; did you mean 'max_new_tokens'?"),
    (InvocationRequest, {"inputs": "x", "parameters": {"stop_seqences": ["."]}},
     "did you mean 'stop_sequences'?"),  # LMI's name is supported; a misspelling is not
    (InvocationRequest, {"inputs": "x", "adapter": "a"}, "did you mean 'adapters'?"),
    (InvocationRequest, {"prompt": "x"}, "prompt: unsupported field; did you mean 'inputs'?"),
    (CompletionRequest, {"model": "m", "prompt": "x", "max_new_tokens": 8},
     "did you mean 'max_tokens'?"),
    (ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x",
                                                         "contnet": 1}]},
     "messages.0.contnet: unsupported field; did you mean 'content'?"),
    (CompletionRequest, {"model": "m", "prompt": "x", "frobnicate": 1},
     "frobnicate: unsupported field"),  # nothing close: no suggestion
])
def test_unsupported_fields_suggest_the_supported_one(model, body, hint):
    with pytest.raises(ApiError) as e:
        parse_body(model, json.dumps(body).encode())
    assert hint in e.value.message
    if "did you mean" not in hint:
        assert "did you mean" not in e.value.message
