"""Kernels: the ops a model runs (KV write, paged attention, LoRA), chosen once per model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the kernels themselves, not by naming them
    import torch

KERNEL_BACKENDS = ("auto", "torch", "triton")  # the names select_kernels knows


@dataclass(frozen=True)
class Kernels:
    """One implementation of each op, all with the torch references' signatures.

    Attributes:
        backend: "torch" or "triton".
        reads_gathered_rows: whether the LoRA kernel is best handed the adapter rows already
            read out of the pool (``LoraBatch.gathered``/``stacked``; the torch kernels, where
            an indexing op per module costs more than the GEMMs) rather than page tables only
            (Triton reads rows in place).
        write_kv: as :func:`pagedlora.kernels.paged_attention.write_kv`.
        paged_attention: as :func:`pagedlora.kernels.paged_attention.paged_attention`.
        lora_shrink_expand: as :func:`pagedlora.kernels.lora.lora_shrink_expand`.
        lora_shrink, lora_expand: its two halves, as :func:`pagedlora.kernels.lora.lora_shrink`
            and :func:`pagedlora.kernels.lora.lora_expand` (Triton: their grouped forms, for
            a mix's overlapping segments) (a tensor-parallel row-parallel module all-reduces
            the shrink's output in between).
    """

    backend: str
    reads_gathered_rows: bool
    write_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    lora_shrink_expand: Callable[..., None]
    lora_shrink: Callable[..., torch.Tensor]
    lora_expand: Callable[..., None]


def select_kernels(backend: str, device: torch.device) -> Kernels:
    """The kernels for ``backend`` on ``device``.

    "auto" is Triton on CUDA and torch elsewhere; "triton" on the CPU runs the Triton kernels
    through the interpreter (slow; for tests). Triton is imported only for "triton".

    Raises:
        ValueError: an unknown backend, or "triton" on the CPU without the interpreter enabled
            (``TRITON_INTERPRET=1`` before triton is imported; the message says so).
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        from pagedlora.kernels import lora, paged_attention
        return Kernels("torch", True, paged_attention.write_kv, paged_attention.paged_attention,
                       lora.lora_shrink_expand, lora.lora_shrink, lora.lora_expand)
    from pagedlora.kernels import triton_attention, triton_lora
    from pagedlora.kernels.triton_launch import check_device

    check_device(device)  # fail at construction, not in the first step
    return Kernels("triton", False, triton_attention.write_kv, triton_attention.paged_attention,
                   triton_lora.lora_shrink_expand, triton_lora.lora_shrink_grouped,
                   triton_lora.lora_expand_grouped)
