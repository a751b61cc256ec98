"""TPComm: the collectives one rank's forward pass runs over its tensor-parallel group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class TPComm:
    """All-reduce and gather over the default ``torch.distributed`` process group (gloo on
    the CPU, NCCL on CUDA), which the worker initializes with its timeout: a peer that dies
    or hangs makes a collective raise after at most that long instead of blocking forever.

    Args:
        rank, size: this rank among ``size``.
    """

    def __init__(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size

    def all_reduce(self, t: torch.Tensor) -> None:
        """``t = sum over ranks of t``, in place (``t`` contiguous)."""
        dist.all_reduce(t)

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """The vocab-parallel LM head's logits put together on rank 0.

        Args:
            logits: ``[S, vocab_per_rank]`` this rank's columns (contiguous).
            vocab_size: columns of the whole vocabulary (the last rank's padding is cut).
        Returns:
            ``[S, vocab_size]`` on rank 0, None on the others.
        """
        if self.rank != 0:
            dist.gather(logits, dst=0)
            return None
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :vocab_size]
