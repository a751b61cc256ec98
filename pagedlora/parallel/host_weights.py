"""Adapter weights in shared memory: the host tier's one copy per machine, which every
tensor-parallel worker maps and slices its shard from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pagedlora.lora_adapter import AdapterWeights, ModuleWeights


def share(weights: AdapterWeights) -> AdapterWeights:
    """``weights`` as views of one shared-memory buffer (a no-op when they already are).

    torch's ``file_descriptor`` sharing (its default on Linux) makes the buffer from a
    shared-memory file that is unlinked at once: sending it to a worker passes a file
    descriptor, not the bytes, and nothing is left in ``/dev/shm`` however the processes end.
    The spill tier writes such views as they are (disjoint views of one storage).

    Args:
        weights: ``(layer, module) -> ModuleWeights``, one dtype.
    Returns:
        the same modules, each ``a [r, in]``, ``b_t [r, out]`` (and a DoRA module's ``dora
        [out]``) a contiguous view of the one buffer (a copy of ``weights``).
    """
    if _buffer(weights) is not None:
        return weights
    first = next(iter(weights.values())).a
    flat = torch.empty(sum(t.numel() for w in weights.values() for t in _tensors(w)),
                       dtype=first.dtype).share_memory_()
    out, offset = {}, 0
    for key, w in weights.items():
        parts = []
        for t in _tensors(w):
            view = flat[offset:offset + t.numel()].view(t.shape)
            view.copy_(t)
            parts.append(view)
            offset += t.numel()
        out[key] = ModuleWeights(*parts)
    return out


def _tensors(w: ModuleWeights) -> tuple[torch.Tensor, ...]:
    """``(a, b_t)``, and a DoRA module's output scale."""
    return (w.a, w.b_t) if w.dora is None else (w.a, w.b_t, w.dora)


@dataclass(frozen=True)
class SharedWeights:
    """One adapter's weights as a worker receives them: the shared buffer (pickled through
    ``torch.multiprocessing``'s reductions, so its file descriptor crosses the pipe, never its
    bytes) and where each module's rows lie in it. The worker reads only its shard's columns
    out of the mapping (``Shard.shard_lora``).

    Attributes:
        buffer: ``[numel]`` 1-D, in shared memory.
        layout: per module ``(layer, module, parts)``, ``parts`` the ``(offset, shape)`` of
            ``a [r, in]``, ``b_t [r, out]`` and a DoRA module's ``dora [out]``, offsets in
            elements.
    """

    buffer: torch.Tensor
    layout: tuple[tuple[int, str, tuple[tuple[int, tuple[int, ...]], ...]], ...]

    @classmethod
    def of(cls, weights: AdapterWeights) -> SharedWeights:
        """From weights in shared memory (:func:`share`'s form), without copying; others are
        copied into one buffer first."""
        buffer = _buffer(weights)
        if buffer is None:
            weights = share(weights)
            buffer = _buffer(weights)
        layout = tuple((layer, module, tuple((t.storage_offset(), tuple(t.shape))
                                             for t in _tensors(w)))
                       for (layer, module), w in weights.items())
        return cls(buffer, layout)

    def weights(self) -> AdapterWeights:
        """The modules as views of :attr:`buffer`."""
        def view(offset: int, shape: tuple[int, ...]) -> torch.Tensor:
            return self.buffer[offset:offset + math.prod(shape)].view(shape)
        return {(layer, module): ModuleWeights(*(view(o, shape) for o, shape in parts))
                for layer, module, parts in self.layout}


def _buffer(weights: AdapterWeights) -> torch.Tensor | None:
    """The one shared storage that every tensor of ``weights`` is a contiguous view of, as a
    1-D tensor; None when there is none."""
    tensors = [t for w in weights.values() for t in _tensors(w)]
    storage = tensors[0].untyped_storage()
    if not storage.is_shared() or not all(
            t.is_contiguous() and t.untyped_storage().data_ptr() == storage.data_ptr()
            for t in tensors):
        return None
    return torch.empty(0, dtype=tensors[0].dtype).set_(storage)
