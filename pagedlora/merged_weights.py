"""MergedWeights: one adapter folded into copies of the base model's fused projection weights."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedlora.adapter_pages import ResidentAdapter
from pagedlora.model import LlamaModel
from pagedlora.pool import UnifiedPool


@dataclass(frozen=True)
class MergedStats:
    """What merging has cost since the start.

    Attributes:
        merges: adapters folded in.
        seconds: wall time spent merging (reading the adapter's rows out of the pool, copying
            the base weights, adding the deltas), seconds. Unmerging costs nothing: the base
            weights are never changed, a step reads them again.
        bytes: device memory the merged copies hold now, bytes (on a CPU with oneDNN, in
            bfloat16 and float32, their prepacked copies hold about as much again, not counted
            here).
        key: the adapter (content key) they hold, None before the first merge.
    """

    merges: int
    seconds: float
    bytes: int
    key: str | None


class MergedWeights:
    """Merged LoRA: for each fused weight of the model (``qkv``, ``o``, ``gate_up``, ``down``
    per layer) that an adapter targets, a copy of it with ``W + scale * B A`` added to the rows
    of each targeted module (``B A``: lora_B ``[out, r]`` times lora_A ``[r, in]``); a step run
    on these copies computes the adapter's output with the base model's GEMMs alone.

    The base weights are never written: a merged copy is made from them and read instead of
    them, so leaving merged mode is free and no drift accumulates over switches (unlike merging
    in place and unmerging by subtracting ``scale * B A`` again, as PEFT's ``unmerge`` and
    dLoRA's engine do). The rows are PEFT's merged weight, ``W + (B @ A) * scaling``
    (``merge_and_unload``), computed in one ``addmm`` in float32 and rounded once to the
    model's dtype (PEFT rounds the delta to a half dtype before adding it). A DoRA module's
    rows are PEFT's merged DoRA weight, ``g * (W + scaling * B A)`` with ``g = m / ||W +
    scaling * B A||`` per output row (Liu et al. 2024, DoRA, eq. 5; PEFT's ``merge`` of a
    ``use_dora`` layer): ``g`` is the output scale kept in the adapter's pool rows (computed at
    registration from the base weight), the bias untouched, as the unmerged path applies it
    (:func:`~pagedlora.kernels.lora.dora_rescale`).

    Memory: one copy of each fused weight the adapter touches, on the model's device, outside
    the unified pool. A GEMM reads a weight as one strided ``[out, in]`` matrix, which pages
    handed out one by one by the pool's allocator are not; and the copy is all or nothing,
    not reclaimable page by page like KV blocks or adapter rows. For SmolLM2-135M in float32
    (30 layers) the copies per layer are 2.1 MiB for ``qkv`` (any of q/k/v targeted), 1.3 MiB
    for ``o``, 6.8 MiB for ``gate_up`` (gate or up), 3.4 MiB for ``down``: 405 MiB for an adapter
    on all seven projections (the size of the model's projection weights), 63 MiB for one on
    q/v only. They are kept until another adapter is merged (so the same adapter re-enters
    merged mode without recomputing them), reusing the buffers of the fused weights both
    adapters touch. :attr:`stats` reports their bytes. On a CPU with oneDNN (bfloat16: with its
    bfloat16 kernels; and float32) each copy is also prepacked, as the base weights are
    (:class:`~pagedlora.packed_linear.PackedLinear`: faster GEMMs), which costs its bytes
    again.

    Args:
        model: the model whose ``layers`` are copied.
        pool: the unified pool the adapters' rows are read from.
    """

    def __init__(self, model: LlamaModel, pool: UnifiedPool) -> None:
        self.model = model
        self.pool = pool
        self._key: str | None = None
        self._copies: dict[tuple[int, str], torch.Tensor] = {}  # (layer, fused name) -> copy
        self._layers: list[dict[str, torch.Tensor]] | None = None
        self._merges = 0
        self._seconds = 0.0

    @property
    def stats(self) -> MergedStats:
        """Merges, their time, the copies' bytes and whose they are."""
        return MergedStats(self._merges, self._seconds,
                           sum(c.nbytes for c in self._copies.values()), self._key)

    def can_merge(self, adapter: ResidentAdapter) -> bool:
        """Whether every module of ``adapter`` is a decoder projection (LoRA on
        ``embed_tokens`` or ``lm_head`` is not merged: with tied embeddings one matrix serves
        both, and a merged copy of it would cost the vocabulary's size)."""
        return all(module in self.model.fused_rows for _, module in adapter.modules)

    def layers_for(self, key: str, adapter: ResidentAdapter) -> list[dict[str, torch.Tensor]]:
        """The per-layer weights of ``model.layers`` with ``adapter`` merged in (made now
        unless they are already ``key``'s), for ``ForwardBatch.layers``.

        Args:
            key: the adapter's content key (its identity: equal keys, equal weights).
            adapter: its placement in the pool (the rows are read from there).
        """
        if key != self._key:
            started = time.perf_counter()
            self._key = None  # a merge that raises midway leaves no copy that claims a key
            self._merge(adapter)
            self._key = key
            self._merges += 1
            self._seconds += time.perf_counter() - started
        return self._layers

    def release(self) -> None:
        """Drops the merged copies (their memory is freed); the next merge makes new ones."""
        for copy in self._copies.values():
            self.model.linear.forget(copy)
        self._key, self._copies, self._layers = None, {}, None

    @torch.inference_mode()
    def _merge(self, adapter: ResidentAdapter) -> None:
        m = self.model
        touched: dict[tuple[int, str], list[tuple]]  # (start, end, a, b, scale, g)
        touched = {}
        for (layer, module), rows in adapter.modules.items():
            name, start, end = m.fused_rows[module]
            in_f, out_f = m.module_shapes[module]
            a = self.pool.read_rows(in_f, rows.a)       # [r, in]
            b = self.pool.read_rows(out_f, rows.b).t()  # [out, r]
            g = None if rows.dora is None else self.pool.read_rows(out_f, rows.dora)[0]
            touched.setdefault((layer, name), []).append((start, end, a, b, rows.scale, g))
        old, self._copies = self._copies, {}
        self._layers = [dict(w) for w in m.layers]
        try:
            for (layer, name), deltas in touched.items():
                base = m.layers[layer][name]
                copy = old.pop((layer, name), None)
                if copy is None:
                    copy = torch.empty_like(base)
                m.linear.forget(copy)  # its values change; packed again once written
                done = 0
                for start, end, a, b, scale, g in sorted(deltas, key=lambda d: d[0]):
                    copy[done:start] = base[done:start]
                    _fold(copy[start:end], base[start:end], a, b, scale, g)
                    done = end
                copy[done:] = base[done:]
                m.linear.pack(copy)  # its new values (on a oneDNN CPU: as the base's own)
                self._copies[(layer, name)] = copy
                self._layers[layer][name] = copy
        finally:  # also when a merge raises: none of them is kept
            for copy in old.values():  # not reused: freed with their packed copies
                m.linear.forget(copy)


def _fold(out: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
          scale: float, g: torch.Tensor | None = None) -> None:
    """``out = base + scale * (b @ a)``, times ``g`` per row for DoRA, computed in float32 and
    rounded once to ``out``'s dtype.

    Args:
        out, base: ``[out_features, in_features]`` rows of a merged copy and of the base weight.
        a: ``[r, in_features]`` lora_A. b: ``[out_features, r]`` lora_B.
        g: ``[out_features]`` DoRA's output scale ``m / ||W + scale * B A||``, or None.
    """
    if out.dtype == torch.float32:
        torch.addmm(base, b, a, alpha=scale, out=out)
        if g is not None:
            out.mul_(g.unsqueeze(1))
        return
    merged = torch.addmm(base.float(), b.float(), a.float(), alpha=scale)
    if g is not None:
        merged.mul_(g.float().unsqueeze(1))
    out.copy_(merged)
