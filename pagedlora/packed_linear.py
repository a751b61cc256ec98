"""PackedLinear: the base model's projections with their weights prepacked once for oneDNN."""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


class PackedLinear:
    """``F.linear`` over weights reordered once into oneDNN's blocked layout, where that pays:
    bfloat16 and (on x86-64) float32 on a CPU with oneDNN (bfloat16 needs its bfloat16
    kernels: AVX-512 BF16 or AMX).

    ``F.linear`` on bfloat16 CPU tensors already runs oneDNN's GEMM, but reorders the weight
    into the kernel's layout on every call; the packed copy skips that, with the same results
    bit for bit (the same kernel on the same numbers). Measured on this project's CPU (2-core
    AMD EPYC with AVX-512 BF16, one thread, CPU time): 0.64 against 0.84 ms for SmolLM2's fused
    gate/up at 32 tokens, 4.6 against 7.3 ms for its LM head at one token, 17.8 against 19.1 ms
    for gate/up at 1,000 (a prefill). In float32 ``F.linear`` runs MKL's GEMM instead, and
    oneDNN's over packed weights is much faster at every batch size (2 threads, one GEMM in a
    loop, median of runs): SmolLM2's gate/up 1.15 -> 0.61 ms at 32 tokens, 0.52 -> 0.21 at 8,
    42.1 -> 29.4 at 1,500; its LM head 37.0 -> 12.7 ms at 32 tokens, 12.4 -> 6.1 at one. Its
    float32 results are not F.linear's bit for bit (another summation order; for unit-scale
    inputs of down_proj's width, 1,536, up to ~2.2e-4 apart, and oneDNN's error against
    float64 about 3x MKL's: 1.7e-4 against 5.5e-5). This was measured on x86-64 only (AVX-512
    and AVX2), so float32 packing is on there only: elsewhere oneDNN may lack fast float32
    kernels (aarch64 without ACL). MKL's own packed GEMM (``mkl._mkl_linear``) was not faster
    than ``F.linear`` here (2.10 against 2.04 ms). The technique is what inductor's weight
    freezing does for CPU linears (``torch.compile`` with ``freezing=True``), without
    compiling anything.

    A packed copy belongs to one weight tensor, found by identity: any other tensor (a
    tensor-parallel shard made later) runs ``F.linear``; the owner of a weight whose values
    change (a merged adapter's copy of a layer's weights) packs it again after writing it and
    :meth:`forget` s it before dropping it. The copy costs the weight's memory again (SmolLM2
    in float32: about 530 MB).

    Args:
        dtype, device: of the model's weights; packing is on only for bfloat16 (on a CPU whose
            oneDNN has bfloat16 kernels) and for float32 (on an x86-64 CPU), with oneDNN.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.enabled = (device.type == "cpu" and torch.backends.mkldnn.is_available()
                        and (dtype == torch.float32 and _X86_64 or dtype == torch.bfloat16
                             and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        self._packed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pack(self, weight: torch.Tensor, batch_hint: int = 32) -> None:
        """Prepacks ``weight`` (``[out_features, in_features]``, contiguous) for the GEMMs of
        later calls (``batch_hint``: the usual number of rows of ``x``; any number works).
        A no-op when packing is off."""
        if self.enabled:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
            self._packed[id(weight)] = (weight, packed)

    def __contains__(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (this very tensor) has a packed copy."""
        return self._packed_of(weight) is not None

    def _packed_of(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``weight``'s packed copy, or None (another tensor may reuse a freed one's id)."""
        entry = self._packed.get(id(weight))
        return entry[1] if entry is not None and entry[0] is weight else None

    def forget(self, weight: torch.Tensor) -> None:
        """Drops ``weight``'s packed copy, if it has one (before the weight is freed or its
        values change: a packed copy is of the values it was packed from)."""
        if weight in self:
            del self._packed[id(weight)]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)``: ``[..., in_features]`` -> ``[..., out_features]``,
        through ``weight``'s packed copy when it has one."""
        packed = self._packed_of(weight)
        if packed is None:
            return F.linear(x, weight, bias)
        # oneDNN reads the bias densely: a strided one would be misread
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), packed, None if bias is None else bias.contiguous(), "none", [], "")
