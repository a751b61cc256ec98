"""SchedulerConfig: the options the scheduler reads, validated (pure Python, no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from pagedlora.scheduler.page_allocator import KV, PageAllocator
from pagedlora.scheduler.policy import POLICIES


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler needs of the engine's options (``EngineConfig.scheduler_config()``
    builds it; tests build it directly).

    Attributes:
        block_size: tokens per KV block.
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: most tokens (prefill + decode) in one step.
        max_model_len: most tokens (prompt + output) of one request; a request reaching it
            finishes with "length".
        max_loras: most distinct adapters in one step (the base model does not count).
        policy: "fcfs", "cluster" or "fair" (see :mod:`pagedlora.scheduler.policy`).
        policy_max_wait_s: "cluster"'s starvation bound, seconds.
        watermark: fraction of the KV capacity kept free when admitting while others run.
        enable_prefix_caching: reuse full KV blocks across requests.

    Raises:
        ValueError: naming the offending field.
    """

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    max_loras: int = 8
    policy: str = "fcfs"
    policy_max_wait_s: float = 5.0
    watermark: float = 0.01
    enable_prefix_caching: bool = True

    def watermark_pages(self, allocator: PageAllocator, pages_per_block: int) -> int:
        """Pages the watermark keeps free: ``watermark`` of the KV capacity, in whole
        blocks."""
        return int(self.watermark * allocator.capacity(KV)) // pages_per_block * pages_per_block

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "max_loras"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not self.policy_max_wait_s > 0:
            raise ValueError(f"policy_max_wait_s must be > 0, got {self.policy_max_wait_s!r}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, "
                             f"got {self.enable_prefix_caching!r}")
