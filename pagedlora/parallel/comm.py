"""TPComm: the collectives one rank's forward pass runs over its tensor-parallel group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed: a peer closed its connection (it died) or did not join within the
    group's timeout (it hung). A symptom on this rank of a fault on another."""


class TPComm:
    """All-reduce and gather over a ``torch.distributed`` process group (gloo on the CPU,
    NCCL on CUDA) made with a timeout: a peer that dies or hangs makes a collective raise
    :class:`CollectiveError` after at most that long instead of blocking forever.

    Args:
        rank, size: this rank among ``size``.
        group: the process group of the collectives (made with the timeout they wait at
            most); None: the default group.
    """

    def __init__(self, rank: int, size: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank = rank
        self.size = size
        self.group = group

    def all_reduce(self, t: torch.Tensor) -> None:
        """``t = sum over ranks of t``, in place (``t`` contiguous).

        Raises:
            CollectiveError: a peer died or did not join in time.
        """
        try:
            dist.all_reduce(t, group=self.group)
        except RuntimeError as e:
            raise CollectiveError(f"rank {self.rank}: all-reduce of {tuple(t.shape)} failed: "
                                  f"{e}") from e

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """The vocab-parallel LM head's logits put together on rank 0.

        Args:
            logits: ``[S, vocab_per_rank]`` this rank's columns (contiguous).
            vocab_size: columns of the whole vocabulary (the last rank's padding is cut).
        Returns:
            ``[S, vocab_size]`` on rank 0, None on the others.
        Raises:
            CollectiveError: a peer died or did not join in time.
        """
        parts = [torch.empty_like(logits) for _ in range(self.size)] if self.rank == 0 \
            else None
        try:
            dist.gather(logits, parts, dst=0, group=self.group)
        except RuntimeError as e:
            raise CollectiveError(f"rank {self.rank}: gather of the logits failed: {e}") from e
        return None if parts is None else torch.cat(parts, dim=-1)[:, :vocab_size]
