"""LoraLayouts: each step's per-module LoRA batches, built from the step's adapter placements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pagedlora.adapter_pages import ResidentAdapter, ResidentModule
from pagedlora.kernels.lora import (
    BGMV_MIN_ADAPTERS,
    DENSE_MAX_TOKENS,
    DoraScales,
    LoraBatch,
    PagedRows,
    TokenRange,
)
from pagedlora.lora_adapter import VOCAB_MODULES
from pagedlora.pool import UnifiedPool

LayerModule = tuple[int, str]
Rows = tuple[torch.Tensor, torch.Tensor]  # (a [r, in_features], b [r, out_features])


@dataclass(frozen=True)
class ModuleRows:
    """The rows of one (layer, module) for a set of adapters, in segment order.

    Attributes:
        a: ``R`` lora_A rows (``[R, in_features]`` in the pool) of every adapter that targets
            the module, one adapter after another.
        b: the matching ``R`` lora_B^T rows (``[R, out_features]``).
        cols: per such adapter ``(i, col_start, col_end, scale)``: the set's adapter ``i``
            owns rows ``[col_start, col_end)``.
        pieces: per such adapter, its rows read out of the pool, or None (kernels that read
            pages in place).
        dora: the set's DoRA adapters among them, by index (empty when none).
        dora_rows: the page table of their scale rows, in ``dora`` order (None when none).
        dora_pieces: ``[len(dora), out_features]`` their scale rows read out of the pool, or
            None (no DoRA adapter, or kernels that read pages in place).
    """

    a: PagedRows
    b: PagedRows
    cols: tuple[tuple[int, int, int, float], ...]
    pieces: tuple[Rows, ...] | None
    dora: tuple[int, ...] = ()
    dora_rows: PagedRows | None = None
    dora_pieces: torch.Tensor | None = None

    @classmethod
    def build(cls, modules: Sequence[tuple[int, ResidentModule]],
              pieces: Sequence[Rows] | None,
              read_scale: Callable[[PagedRows], torch.Tensor] | None = None) -> ModuleRows:
        """From ``(adapter index, its module)`` pairs in order (and their read-out rows;
        ``read_scale`` reads a DoRA scale row out of the pool, None: not read)."""
        cols, start = [], 0
        for i, m in modules:
            rank = m.a.pages.shape[0]
            cols.append((i, start, start + rank, m.scale))
            start += rank
        scaled = [(i, m.dora) for i, m in modules if m.dora is not None]
        dora_rows = dora_pieces = None
        if scaled:
            dora_rows = PagedRows(torch.cat([r.pages for _, r in scaled]),
                                  torch.cat([r.slots for _, r in scaled]))
            if read_scale is not None:
                dora_pieces = read_scale(dora_rows)
        return cls(PagedRows(torch.cat([m.a.pages for _, m in modules]),
                             torch.cat([m.a.slots for _, m in modules])),
                   PagedRows(torch.cat([m.b.pages for _, m in modules]),
                             torch.cat([m.b.slots for _, m in modules])),
                   tuple(cols), None if pieces is None else tuple(pieces),
                   tuple(i for i, _ in scaled), dora_rows, dora_pieces)

    def dora_scales(self, uses: Sequence[Sequence[TokenRange]]) -> DoraScales | None:
        """The step's DoRA rescaling of this module (None without DoRA adapters).

        Raises:
            ValueError: a DoRA adapter's tokens at a weight other than 1 (DoRA is not scaled
                nor mixed; ``AdapterMix.resolve`` refuses it).
        """
        if not self.dora:
            return None
        ranges = []
        for k, i in enumerate(self.dora):
            for start, end, w in uses[i]:
                if w != 1.0:
                    raise ValueError(f"DoRA adapter {i} of the step has tokens at weight {w}")
                ranges.append((start, end, k))
        return DoraScales(tuple(ranges), self.dora_rows, self.dora_pieces)

    def concatenated(self) -> Rows:
        """``(a [R, in], b [R, out])`` in column order (the dense form)."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        return torch.cat([p[0] for p in self.pieces]), torch.cat([p[1] for p in self.pieces])

    def stacked(self) -> Rows:
        """``(a [S, r_max, in], b [S, r_max, out])`` per adapter, zero-padded to the largest
        rank, the scale folded into b (the BGMV form, see ``LoraBatch.stacked``)."""
        a0, b0 = self.pieces[0]
        r_max = max(c1 - c0 for _, c0, c1, _ in self.cols)
        a = a0.new_zeros(len(self.pieces), r_max, a0.shape[1])
        b = b0.new_zeros(len(self.pieces), r_max, b0.shape[1])
        for k, ((pa, pb), (_, c0, c1, scale)) in enumerate(zip(self.pieces, self.cols,
                                                               strict=True)):
            a[k, : c1 - c0] = pa
            torch.mul(pb, scale, out=b[k, : c1 - c0])
        return a, b


class LoraLayouts:
    """Builds a step's ``(layer, module) -> LoraBatch`` from the placements of its adapters
    (in segment order) and their token ranges, keeping what does not change while the same
    placements repeat, as they do over decode steps (a pinned adapter's pages do not move, and
    a reload is a new placement with a new ``placement_id``).

    For kernels that take rows already read out of the pages (the torch ones: on the CPU,
    reading rows through page tables costs an indexing op per module per layer, more than the
    LoRA GEMMs themselves at decode sizes), each adapter's rows are read once while it stays in
    the batch and laid out once per set of adapters, in the dense form or, for decode batches
    over :data:`BGMV_MIN_ADAPTERS` or more adapters, the BGMV form. The copies (the batch's
    adapters' weights, at most twice: the pieces and one layout per module) are dropped as soon
    as an adapter leaves the batch. Kernels that read pages in place (Triton) get page tables
    only, except for the vocabulary modules: their rows (``vocab_size`` wide, split across
    pages) are always read out once per placement and handed over in the dense form, for the
    torch ops the model runs on them (``embed_tokens`` over the step's tokens, ``lm_head``
    over its logits rows).

    Args:
        pool: the unified pool.
        module_shapes: ``module -> (in_features, out_features)``: the widths of the rows of
            lora_A and lora_B^T (a tensor-parallel rank's, ``Shard.lora_widths``).
        gather_rows: whether the kernels take read-out rows (``Kernels.reads_gathered_rows``).
        scale_widths: ``module -> width`` of a DoRA module's scale row where it is not
            ``out_features`` (``Shard.dora_widths``).
    """

    def __init__(self, pool: UnifiedPool, module_shapes: dict[str, tuple[int, int]],
                 gather_rows: bool, *, scale_widths: dict[str, int] | None = None) -> None:
        self.pool = pool
        self.module_shapes = module_shapes
        self.scale_widths = {m: scale_widths.get(m, out) if scale_widths else out
                             for m, (_, out) in module_shapes.items()}
        self.gather_rows = gather_rows
        self._set: tuple[int, ...] = ()  # placement ids of the current set, in segment order
        self._modules: dict[LayerModule, ModuleRows] = {}
        self._forms: dict[LayerModule, tuple[str, Rows]] = {}  # one layout per module
        self._pieces: dict[int, dict[LayerModule, Rows]] = {}  # placement id -> read-out rows

    def batches(self, placements: Sequence[ResidentAdapter],
                uses: Sequence[Sequence[TokenRange]], num_tokens: int, *,
                logit_uses: Sequence[Sequence[TokenRange]] = (), num_logits: int = 0
                ) -> dict[LayerModule, LoraBatch]:
        """One LoraBatch per (layer, module) that any of the adapters targets.

        Args:
            placements: the step's adapters (distinct), in a fixed order (the layouts are
                kept while the same placements repeat in the same order).
            uses: per adapter, same order, its tokens and their weights (a token of a mix is
                in the ranges of each of its adapters).
            num_tokens: tokens in the step.
            logit_uses: per adapter, same order, its rows of the step's logits and their
                weights (an lm_head LoRA applies there).
            num_logits: rows of the step's logits (0: no lm_head batch).
        """
        if not placements:
            return {}
        self._use(placements)
        bgmv = (self.gather_rows and num_tokens <= DENSE_MAX_TOKENS
                and len(placements) >= BGMV_MIN_ADAPTERS)
        device, dtype = self.pool.tensor.device, self.pool.tensor.dtype
        scales: dict[tuple, torch.Tensor] = {}  # (column layout, on logits) -> [T, R] scales
        batches = {}
        for layer_module, rows in self._modules.items():
            module = layer_module[1]
            on_logits = module == "lm_head"
            if on_logits and not num_logits:
                continue
            spans, n = (logit_uses, num_logits) if on_logits else (uses, num_tokens)
            if (rows.cols, on_logits) not in scales:
                scales[(rows.cols, on_logits)] = LoraBatch.token_scales(
                    rows.cols, spans, n, dtype=dtype, device=device)
            gathered = stacked = None
            if module in VOCAB_MODULES:
                gathered = self._form(layer_module, rows, "concatenated")
            elif bgmv:
                stacked = self._form(layer_module, rows, "stacked")
            elif self.gather_rows:
                gathered = self._form(layer_module, rows, "concatenated")
            batches[layer_module] = LoraBatch.build(rows.a, rows.b, rows.cols, spans,
                                                    scales[(rows.cols, on_logits)],
                                                    gathered=gathered, stacked=stacked,
                                                    dora=rows.dora_scales(spans))
        return batches

    def _use(self, placements: Sequence[ResidentAdapter]) -> None:
        """Makes ``placements`` the current set (a no-op while it repeats)."""
        ids = tuple(p.placement_id for p in placements)
        if ids == self._set:
            return
        self._pieces = {p.placement_id: self._pieces.get(p.placement_id, {})
                        for p in placements}
        parts: dict[LayerModule, list[tuple[int, ResidentModule]]] = {}
        for i, placement in enumerate(placements):
            for layer_module, m in placement.modules.items():
                parts.setdefault(layer_module, []).append((i, m))

        def read_scale(layer_module: LayerModule) -> Callable[[PagedRows], torch.Tensor]:
            return lambda rows: self.pool.read_rows(self.scale_widths[layer_module[1]], rows)
        self._modules = {
            lm: ModuleRows.build(ms, [self._read(placements[i], lm, m) for i, m in ms]
                                 if self.gather_rows or lm[1] in VOCAB_MODULES else None,
                                 read_scale(lm) if self.gather_rows else None)
            for lm, ms in parts.items()}
        self._forms = {}
        self._set = ids

    def _read(self, placement: ResidentAdapter, layer_module: LayerModule,
              m: ResidentModule) -> Rows:
        """One adapter's rows of one module, read out of the pool once per placement."""
        cached = self._pieces[placement.placement_id]
        if layer_module not in cached:
            in_f, out_f = self.module_shapes[layer_module[1]]
            cached[layer_module] = (self.pool.read_rows(in_f, m.a),
                                    self.pool.read_rows(out_f, m.b))
        return cached[layer_module]

    def _form(self, layer_module: LayerModule, rows: ModuleRows, kind: str) -> Rows:
        """The module's rows in layout ``kind`` ("concatenated" or "stacked"), kept until the
        set changes or the other layout is asked for."""
        form = self._forms.get(layer_module)
        if form is None or form[0] != kind:
            form = (kind, rows.concatenated() if kind == "concatenated" else rows.stacked())
            self._forms[layer_module] = form
        return form[1]
