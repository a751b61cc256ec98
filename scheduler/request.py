"""Request: one prompt's tokens, its KV blocks and its progress (pure Python, no torch)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    """Where a request is: queued (or preempted), in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A request as the scheduler sees it.

    Attributes:
        request_id: unique within an engine.
        prompt_token_ids: the prompt, in tokens.
        max_tokens: most output tokens.
        adapter_key: content hash of the adapter's weights, or None for the base model.
        arrival_time: seconds (``time.perf_counter``) when the request was queued.
        output_token_ids: tokens generated so far.
        num_computed_tokens: tokens whose K/V are in the pool; the scheduler schedules
            ``num_tokens - num_computed_tokens`` more (the vLLM v1 view: no separate prefill and
            decode phases, every request catches up with its known tokens).
        blocks: KV blocks in order; each block is one page id per layer (owned by the
            scheduler's KVBlockManager; a block may be shared with other requests).
        deadline: seconds (``time.perf_counter``) by which the first token is due, or None;
            a waiting request that can no longer make it is aborted (S-LoRA, section 5.2).
        num_cached_tokens: prompt tokens whose K/V came from the prefix cache.
        block_keys: prefix-cache keys of the full blocks of known tokens (KVBlockManager).
        num_cached_blocks: leading blocks already registered in the prefix cache.
        holds_adapter: whether the adapter store counted this request as a holder of its
            adapter's content (so that exactly the holds taken are dropped).
    """

    request_id: int
    prompt_token_ids: list[int]
    max_tokens: int
    adapter_key: str | None
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    blocks: list[list[int]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    deadline: float | None = None
    num_cached_tokens: int = 0
    block_keys: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    holds_adapter: bool = False

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

    def fail(self, message: str) -> None:
        """Finishes the request with finish_reason "error" and ``message``."""
        self.status = RequestStatus.FINISHED
        self.finish_reason = "error"
        self.error = message
        self.finished_time = time.perf_counter()
