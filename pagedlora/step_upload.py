"""StepUpload: a step's index tensors moved to the device in one non-blocking copy; and
:func:`to_device` for the other host-to-device copies (adapter loads, segment tables)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device`` without the host waiting for the copy: on CUDA
    through pinned memory with ``non_blocking=True`` (the copy is ordered on the current
    stream before any kernel that reads the result; torch's pinned-memory allocator keeps the
    staging buffer until the copy is done); elsewhere ``host.to(device)`` (on the CPU, ``host``
    itself)."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class StepUpload:
    """Moves the int64 index tensors of a step (token ids, positions, slot mapping, block
    tables, attention metadata) from the host to the device in one transfer.

    Built one by one with ``torch.tensor(..., device="cuda")``, each of a step's ~15 index
    tensors would be its own blocking host-to-device copy from pageable memory, and the GPU
    would wait for the host between them. As vLLM's GPU model runner does with its persistent
    pinned input buffers, the host tensors are packed into one persistent pinned host buffer
    and copied with one ``non_blocking`` copy into a persistent device buffer of the same size;
    the tensors the model reads are views of it. Both buffers grow (at least doubling) when a
    step needs more and are otherwise reused. Before the host buffer is overwritten, the last
    step's copy is waited for (a CUDA event): a step never races its predecessor's transfer.
    Kernels of the last step that still read the device buffer are ordered before the new
    copy by the stream. On the CPU the host tensors are the device's: nothing is copied.

    Args:
        device: where the model runs.
        staged: pack and copy even on the CPU (what a CUDA device does, without pinning: for
            tests); None: only where ``device`` is not the CPU.

    Attributes:
        transfers: copies issued so far (one per step where staged, else zero).
        capacity: elements each buffer holds (0 before the first staged step).
    """

    def __init__(self, device: torch.device, *, staged: bool | None = None) -> None:
        self.device = torch.device(device)
        self.staged = self.device.type != "cpu" if staged is None else staged
        self.transfers = 0
        self.capacity = 0
        self._host: torch.Tensor | None = None
        self._device: torch.Tensor | None = None
        self._copied = None  # torch.cuda.Event of the last copy (CUDA only)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The device tensors of ``tensors``, same shapes and values.

        Args:
            tensors: host (CPU) int64 tensors of any shapes.
        Returns:
            where staged, views of the device buffer (valid until the next call); else
            ``tensors`` themselves.
        Raises:
            ValueError: a tensor that is not int64 or not on the CPU (named by position).
        """
        for i, t in enumerate(tensors):
            if t.dtype != torch.int64 or t.device.type != "cpu":
                raise ValueError(f"tensor {i} is {t.dtype} on {t.device}; the step upload "
                                 f"takes int64 host tensors")
        if not self.staged:
            return list(tensors)
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        self._reserve(total)
        if self._copied is not None:
            self._copied.synchronize()
        views, at = [], 0
        for t, n in zip(tensors, sizes, strict=True):
            self._host[at:at + n].copy_(t.reshape(-1))
            views.append((at, n, t.shape))
            at += n
        self._device[:total].copy_(self._host[:total], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.transfers += 1
        return [self._device[a:a + n].view(shape) for a, n, shape in views]

    def _reserve(self, total: int) -> None:
        """Grows both buffers to hold ``total`` elements (at least doubling)."""
        if total <= self.capacity:
            return
        if self._copied is not None:
            self._copied.synchronize()
        self.capacity = max(total, 2 * self.capacity, 1024)
        pin = self.device.type == "cuda"
        self._host = torch.empty(self.capacity, dtype=torch.int64, pin_memory=pin)
        self._device = torch.empty(self.capacity, dtype=torch.int64, device=self.device)
