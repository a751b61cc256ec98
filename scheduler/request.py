"""Request: one prompt's tokens and its progress, as the scheduler sees it (pure Python)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    """Where a request is: queued (or preempted), in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request as the scheduler sees it.

    The fields up to ``sampling`` are fixed when the request is made (by the engine's input
    processor, or a test); every field after them is written by the :class:`Scheduler` alone
    (its KV blocks live in the scheduler's ``KVBlockManager``, keyed by ``request_id``).

    Attributes:
        request_id: unique within an engine.
        prompt_token_ids: the prompt, in tokens.
        max_tokens: most output tokens.
        adapter_key: content hash of the adapter's weights, or None for the base model.
        arrival_time: seconds on the scheduler's clock when the request was made.
        deadline: seconds (same clock) by which the first token is due, or None; a waiting
            request that can no longer make it is aborted (S-LoRA, section 5.2).
        stop_token_ids: tokens that finish the request with "stop" when sampled (EOS, unless
            ignored, and the request's own stop token ids).
        sampling: what the model runner's sampler needs (opaque to the scheduler).
        output_token_ids: tokens generated so far.
        num_computed_tokens: tokens whose K/V are in the pool; the scheduler schedules
            ``num_tokens - num_computed_tokens`` more (the vLLM v1 view: no separate prefill and
            decode phases, every request catches up with its known tokens).
        status, finish_reason ("stop", "length", "abort" or "error"), error (the reason of an
            "error" or a deadline "abort").
        num_preemptions: times its KV pages were freed for recomputation.
        first_scheduled_time, first_token_time, finished_time: seconds, scheduler's clock.
        num_cached_tokens: prompt tokens whose K/V came from the prefix cache at admission.
        holds_adapter: whether the adapter store counted this request as a holder of its
            adapter's content (so that exactly the holds taken are dropped); None before
            :meth:`Scheduler.take_hold` or :meth:`Scheduler.add` asked.
    """

    request_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    adapter_key: str | None
    arrival_time: float
    deadline: float | None = None
    stop_token_ids: frozenset[int] = frozenset()
    sampling: object = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    holds_adapter: bool | None = None

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens known so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        """Whether the request has a finish reason."""
        return self.status is RequestStatus.FINISHED
