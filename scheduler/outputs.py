"""RunnerOutput: what the model runner hands back to the scheduler after a step (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunnerOutput:
    """The sampled tokens of one step, plain Python so that it crosses process boundaries
    (a tensor-parallel worker) as cheaply as it crosses function calls.

    Attributes:
        request_ids: the requests that produced a token this step (their known tokens all
            computed), in the runner's order.
        token_ids: the token sampled for each, same order.

    Per-token extras (log-probabilities) belong here as further per-request fields.
    """

    request_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
