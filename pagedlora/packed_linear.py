"""PackedLinear: the base model's projections with their weights prepacked once for oneDNN."""

from __future__ import annotations

import platform
import weakref
from dataclasses import dataclass

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

    A packed copy may also carry rows below the weight's (:meth:`ride`): the step's lora_A
    rows of the modules that read the GEMM's input, so that the LoRA shrink comes out of the
    base GEMM as extra output columns instead of a GEMM of its own.

    Args:
        dtype, device: of the model's weights; packing is on only for bfloat16 (on a CPU whose
            oneDNN has bfloat16 kernels) and for float32 (on an x86-64 CPU), with oneDNN.
        ride_after: steps in a row (:meth:`ride` calls between :meth:`begin_step` calls) that a
            weight must be asked for the same rows before :meth:`ride` packs them below it (0:
            never).
        repacks_per_step: most weights packed again in one step (between two
            :meth:`begin_step` calls), so that packing a new set's rows into every layer is
            spread over steps instead of stalling one.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, *, ride_after: int = 0,
                 repacks_per_step: int = 16) -> None:
        self.enabled = (device.type == "cpu" and torch.backends.mkldnn.is_available()
                        and (dtype == torch.float32 and _X86_64 or dtype == torch.bfloat16
                             and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
        self.ride_after = ride_after
        self.repacks_per_step = repacks_per_step
        self._repacks_left = repacks_per_step
        self._packed: dict[int, _Packed] = {}  # id(weight) -> its packed copy
        # id(weight) -> (the rows asked for at the last step that did not ride, how many
        # steps in a row they were asked, steps in a row that did not ride)
        self._asked: dict[int, tuple[weakref.ref | None, int, int]] = {}

    def pack(self, weight: torch.Tensor, batch_hint: int = 32) -> None:
        """Prepacks ``weight`` (``[out_features, in_features]``, contiguous) for the GEMMs of
        later calls (``batch_hint``: the usual number of rows of ``x``; any number works).
        A no-op when packing is off."""
        if self.enabled:
            self._packed[id(weight)] = _Packed.of(weight, None, batch_hint)
            self._asked.pop(id(weight), None)

    def __contains__(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` (this very tensor) has a packed copy."""
        return self._entry(weight) is not None

    def _entry(self, weight: torch.Tensor) -> _Packed | None:
        """``weight``'s packed copy, or None (another tensor may reuse a freed one's id)."""
        entry = self._packed.get(id(weight))
        return entry if entry is not None and entry.weight is weight else None

    def forget(self, weight: torch.Tensor) -> None:
        """Drops ``weight``'s packed copy, if it has one (before the weight is freed or its
        values change: a packed copy is of the values it was packed from)."""
        if weight in self:
            del self._packed[id(weight)]
            self._asked.pop(id(weight), None)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, weight, bias)``: ``[..., in_features]`` -> ``[..., out_features]``,
        through ``weight``'s packed copy when it has one (then a view of the GEMM's output,
        strided when rows ride below the weight, :meth:`ride`)."""
        entry = self._entry(weight)
        if entry is None:
            return F.linear(x, weight, bias)
        return entry.gemm(x, bias)[..., :weight.shape[0]]

    def begin_step(self) -> None:
        """Starts a step: :meth:`ride` may pack ``repacks_per_step`` weights again."""
        self._repacks_left = self.repacks_per_step

    def ride(self, x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor | None,
             bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.linear(x, weight, bias)`` and, when ``weight``'s packed copy carries ``rows``
        below it, ``x @ rows^T`` out of the same GEMM: one step's call per weight.

        The LoRA shrink of the modules reading ``x`` (their lora_A rows, ``rows``) is small
        (ranks of 4-128 against 576-3,072 output features) and its weights are cold in the
        cache after the base GEMMs of a step stream past them: as a GEMM of its own it cost
        about as much as 10-30% of the base GEMM. Packed below the base weight, its rows are
        read in the same stream (measured on this project's CPU: docs/benchmarks.md, issue
        19, stop 27). Packing costs a reorder of the whole weight (float32 SmolLM2: ~3 ms for
        gate/up), so rows are packed only once the same ``rows`` tensor (by identity: a set
        of adapters' rows, kept while the set repeats) has been asked for ``ride_after``
        steps in a row, at most ``repacks_per_step`` weights a step. The weight is packed
        alone again after ``ride_after`` steps in a row that did not ride (other rows each
        step, none, or the packed rows freed: their set is gone), so that an old set's rows
        are not computed on for long. The rows are held weakly: a set's rows are freed when
        its adapters leave the batch.

        Args:
            x: ``[T, in_features]``.
            weight: ``[out_features, in_features]``, packed (:meth:`pack`), else this is
                ``F.linear`` and no shrink.
            rows: ``[R, in_features]`` lora_A rows the caller would multiply ``x`` by next,
                or None (none this step).
            bias: ``[out_features]`` or None.
        Returns:
            ``([T, out_features], [T, R] or None)``: the projection (a strided view of the
            GEMM's output when rows ride along) and ``x @ rows^T`` (another) when ``rows``
            rode along, else None (the caller runs its shrink).
        """
        entry = self._entry(weight)
        if entry is None or not self.ride_after:
            return self(x, weight, bias), None
        if not _is(entry.rows, rows):
            asked, count, misses = self._asked.get(id(weight), (None, 0, 0))
            count = count + 1 if count and _is(asked, rows) else 1
            self._asked[id(weight)] = (_ref(rows), count, misses + 1)
            repack = count >= self.ride_after or (misses + 1 >= self.ride_after
                                                   and entry.num_rows > 0)
            if not repack or self._repacks_left <= 0:
                return self(x, weight, bias), None
            self._repacks_left -= 1
            # the old copy is freed first: the allocator can hand its memory to the new one
            # (fresh pages cost more than the reorder itself: docs/benchmarks.md, stop 27)
            hint = self._packed.pop(id(weight)).batch_hint
            del entry
            if count < self.ride_after:  # stale rows: the weight alone; the count runs on
                self._packed[id(weight)] = _Packed.of(weight, None, hint)
                self._asked[id(weight)] = (_ref(rows), count, 0)
                return self(x, weight, bias), None
            entry = self._packed[id(weight)] = _Packed.of(weight, rows, hint)
        self._asked.pop(id(weight), None)  # a step that rides (or plain, as packed)
        if rows is None:
            return self(x, weight, bias), None
        out = entry.gemm(x, bias)
        n = weight.shape[0]
        return out[..., :n], out[..., n:]


def _ref(rows: torch.Tensor | None) -> weakref.ref | None:
    return None if rows is None else weakref.ref(rows)


def _is(ref: weakref.ref | None, rows: torch.Tensor | None) -> bool:
    """Whether ``ref`` (from :func:`_ref`) is of ``rows`` (None of None; a freed tensor's
    reference is of nothing)."""
    return rows is None if ref is None else rows is not None and ref() is rows


@dataclass
class _Packed:
    """One weight's packed copy, with ``num_rows`` rows packed below it (a weak reference to
    them in ``rows``; None when none are)."""

    weight: torch.Tensor
    packed: torch.Tensor
    batch_hint: int
    rows: weakref.ref | None
    num_rows: int
    padded_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (bias, with the zeros)

    @classmethod
    def of(cls, weight: torch.Tensor, rows: torch.Tensor | None, batch_hint: int) -> _Packed:
        full = weight if rows is None else torch.cat([weight, rows])
        return cls(weight, torch.ops.mkldnn._reorder_linear_weight(full, batch_hint), batch_hint,
                   _ref(rows), 0 if rows is None else rows.shape[0])

    def gemm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The packed GEMM, the rows below the weight's included (``[..., out + R]``)."""
        if bias is not None and self.num_rows:  # zeros in the rows' columns
            if self.padded_bias is None or self.padded_bias[0] is not bias:
                self.padded_bias = (bias, torch.cat([bias, bias.new_zeros(self.num_rows)]))
            bias = self.padded_bias[1]
        # oneDNN reads the bias densely: a strided one would be misread
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, None if bias is None else bias.contiguous(), "none",
            [], "")
