"""Request: one prompt's tokens and its progress, as the scheduler sees it (pure Python)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagedlora.scheduler.outputs import TokenLogprobs

AdapterTerms = tuple[tuple[str, float], ...]
"""A weighted combination of adapters, as the scheduler sees it: ``(content key, weight)``
pairs with distinct keys, sorted by key (``pagedlora.AdapterMix`` resolved by the engine's input
processor). The delta it adds is the sum of ``weight x scaling x B A`` over its adapters."""


class RequestStatus(enum.Enum):
    """Where a request is: queued (or preempted), in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request as the scheduler sees it.

    The fields up to ``needs_prompt_logprobs`` are fixed when the request is made (by the
    engine's input processor, or a test); every field after them is written by the
    :class:`Scheduler` alone (its KV blocks live in the scheduler's ``KVBlockManager``, keyed
    by ``request_id``).

    Attributes:
        request_id: unique within an engine.
        prompt_token_ids: the prompt, in tokens.
        max_tokens: most output tokens.
        adapter_key: content hash of the adapter's weights (used at weight 1), or None for
            the base model or a mix.
        arrival_time: seconds on the scheduler's clock when the request was made.
        deadline: seconds (same clock) by which the first token is due, or None; a waiting
            request that can no longer make it is aborted (S-LoRA, section 5.2).
        stop_token_ids: tokens that finish the request with "stop" when sampled (EOS, unless
            ignored, and the request's own stop token ids).
        sampling: what the model runner's sampler needs (opaque to the scheduler).
        adapter_mix: a scaled adapter or a weighted mix of adapters (:data:`AdapterTerms`),
            with ``adapter_key`` None; empty for a plain adapter or the base model.
        needs_prompt_logprobs: whether the request asked for the log-probabilities of its
            prompt tokens: every position that predicts one must be computed, so the prefix
            cache serves it only positions whose entries it already has (after a preemption).
        output_token_ids: tokens generated so far.
        output_logprobs: the :class:`TokenLogprobs` of each output token, when the request
            asked for them (``SamplingParams.logprobs``); else empty.
        prompt_logprobs: the :class:`TokenLogprobs` of prompt tokens 1, 2, ... computed so far
            (with ``needs_prompt_logprobs``; the first prompt token has none).
        num_computed_tokens: tokens whose K/V are in the pool; the scheduler schedules
            ``num_tokens - num_computed_tokens`` more (the vLLM v1 view: no separate prefill and
            decode phases, every request catches up with its known tokens).
        status, finish_reason ("stop", "length", "abort" or "error"), error (the reason of an
            "error" or a deadline "abort").
        num_preemptions: times its KV pages were freed for recomputation.
        first_scheduled_time, first_token_time, finished_time: seconds, scheduler's clock.
        num_cached_tokens: prompt tokens whose K/V came from the prefix cache at admission.
        holds_adapter: whether the adapter store counted this request as a holder of its
            adapters' content (so that exactly the holds taken are dropped); None before
            :meth:`Scheduler.take_hold` or :meth:`Scheduler.add` asked.

    Raises:
        ValueError: both ``adapter_key`` and ``adapter_mix``, or a mix whose keys are not
            distinct and sorted.
    """

    request_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    adapter_key: str | None
    arrival_time: float
    deadline: float | None = None
    stop_token_ids: frozenset[int] = frozenset()
    sampling: object = None
    adapter_mix: AdapterTerms = ()
    needs_prompt_logprobs: bool = False
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
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

    def __post_init__(self) -> None:
        if self.adapter_mix:
            keys = [k for k, _ in self.adapter_mix]
            if self.adapter_key is not None:
                raise ValueError(f"request {self.request_id}: adapter_key and adapter_mix "
                                 f"both given")
            if keys != sorted(set(keys)):
                raise ValueError(f"request {self.request_id}: adapter_mix keys {keys} are not "
                                 f"distinct and sorted")

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        """Content keys of every adapter the request uses (pinned, held and counted against
        ``max_loras`` each); empty for the base model."""
        if self.adapter_mix:
            return tuple(k for k, _ in self.adapter_mix)
        return () if self.adapter_key is None else (self.adapter_key,)

    @property
    def lora_key(self) -> str | None:
        """The identity of the weights that compute the request's K/V: ``adapter_key``, or for
        a mix its keys and weights (``repr`` of floats is exact), None for the base model. The
        prefix cache and the policies' per-adapter accounting are keyed by it, so two mixes or
        two scales never share KV."""
        if self.adapter_mix:
            return "mix" + repr(self.adapter_mix)
        return self.adapter_key

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
