"""LoraLayouts: each step's per-module LoRA batches, built from the step's adapter placements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from pagedlora.adapter_pages import ResidentAdapter, ResidentModule
from pagedlora.kernels.lora import (
    BGMV_MIN_ADAPTERS,
    DENSE_MAX_TOKENS,
    DoraScales,
    FusedLora,
    LoraBatch,
    LoraSegment,
    PagedRows,
    SegmentTable,
    Stacked,
    StackedTokens,
    TokenRange,
    disjoint_groups,
)
from pagedlora.lora_adapter import VOCAB_MODULES
from pagedlora.pool import UnifiedPool
from pagedlora.step_upload import to_device

LayerModule = tuple[int, str]
Rows = tuple[torch.Tensor, torch.Tensor]  # (a [r, in_features], b [r, out_features])


@dataclass(frozen=True)
class _Part:
    """What the modules of one column layout share in a step: segments, token scales (the
    dense form), the BGMV token layout per rank class (the stacked form)."""

    segments: tuple[LoraSegment, ...]
    token_scale: torch.Tensor | None
    tokens: tuple[StackedTokens, ...] | None


@dataclass(frozen=True)
class ModuleRows:
    """The rows of one (layer, module) for a set of adapters, in segment order.

    Attributes:
        a: ``R`` lora_A rows (``[R, in_features]`` in the pool) of every adapter that targets
            the module, one adapter after another.
        b: the matching ``R`` lora_B^T rows (``[R, out_features]``).
        cols: per such adapter ``(i, col_start, col_end, scale)``: the set's adapter ``i``
            owns rows ``[col_start, col_end)``.
        pieces: per such adapter, its rows read out of the pool (joined where stored in
            pieces), or None (kernels that read pages in place).
        dora: the set's DoRA adapters among them, by index (empty when none).
        dora_rows: the page table of their scale rows, in ``dora`` order (None when none).
        dora_pieces: ``[len(dora), out_features]`` their scale rows read out of the pool
            (for every kernel backend), or None (no DoRA adapter).
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
              read_scale: Callable[[PagedRows], torch.Tensor]) -> ModuleRows:
        """From ``(adapter index, its module)`` pairs in order (and their read-out rows;
        ``read_scale`` reads DoRA scale rows out of the pool)."""
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

    def rank_classes(self) -> list[tuple[int, ...]]:
        """The places in ``cols`` of the adapters of each rank class, in ``cols`` order within
        a class: from the largest rank down, an adapter joins the current class while its rank
        is at least a quarter of the class's largest, so each class pads an adapter to at most
        4x its rank (the batch's largest rank padded a rank-4 adapter beside a rank-128 one
        32x). Each class costs its own batched matmuls, about as many ops as the padding they
        save on a CPU at decode sizes (ranks 4-16 of "many" stay one class: measured as op
        counts, docs/benchmarks.md)."""
        rank = [c1 - c0 for _, c0, c1, _ in self.cols]
        classes: list[list[int]] = []
        top = 0
        for k in sorted(range(len(rank)), key=lambda k: -rank[k]):
            if not classes or 4 * rank[k] < top:
                classes.append([])
                top = rank[k]
            classes[-1].append(k)
        return [tuple(sorted(c)) for c in classes]

    def stacked(self) -> tuple[tuple[tuple[int, ...], torch.Tensor, torch.Tensor], ...]:
        """The BGMV form: per rank class (:meth:`rank_classes`), ``(entries, a [S, r, in],
        b [S, r, out])`` for its adapters (``entries``: their places in ``cols``), zero-padded
        to the class's largest rank, the scale folded into b (see ``LoraBatch.stacked``)."""
        out = []
        for entries in self.rank_classes():
            a = pad_sequence([self.pieces[k][0] for k in entries], batch_first=True)
            b = pad_sequence([self.pieces[k][1] for k in entries], batch_first=True)
            scale = torch.tensor([self.cols[k][3] for k in entries], dtype=b.dtype)
            out.append((tuple(entries), a, b.mul_(scale.to(b.device)[:, None, None])))
        return tuple(out)


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
    only (rows whole or in narrow pieces), except for the vocabulary modules: their rows
    (``vocab_size`` wide, split across pages) are always read out once per placement and
    handed over in the dense form, for the torch ops the model runs on them (``embed_tokens``
    over the step's tokens, ``lm_head`` over its logits rows); and DoRA scale rows, one per
    adapter and module, read out once per set of adapters for the elementwise rescale.

    Args:
        pool: the unified pool.
        module_shapes: ``module -> (in_features, out_features)``: the widths of the rows of
            lora_A and lora_B^T (a tensor-parallel rank's, ``Shard.lora_widths``).
        gather_rows: whether the kernels take read-out rows (``Kernels.reads_gathered_rows``).
        scale_widths: ``module -> width`` of a DoRA module's scale row where it is not
            ``out_features`` (``Shard.dora_widths``).
        fused_rows: ``module -> (fused weight, first output column, end column)`` of the
            modules the model runs as one fused GEMM (``LlamaModel.fused_rows``), for
            :meth:`fused`; None: none.
        block_diagonal: whether :meth:`fused` expands through one block-diagonal lora_B^T
            (16-bit weights, where each small GEMM call costs more than its bytes) rather than
            one expand per module (float32, where the zeros' bytes cost more than the calls).
    """

    def __init__(self, pool: UnifiedPool, module_shapes: dict[str, tuple[int, int]],
                 gather_rows: bool, *, scale_widths: dict[str, int] | None = None,
                 fused_rows: dict[str, tuple[str, int, int]] | None = None,
                 block_diagonal: bool = False) -> None:
        self.pool = pool
        self.fused_rows = fused_rows or {}
        self.block_diagonal = block_diagonal
        # (layer, fused weight) -> (the members' row tensors it was built from, its rows)
        self._fused_weights_of: dict[tuple[int, str], tuple[tuple[int, ...], tuple]] = {}
        self._fused_for: dict | None = None  # the batches the last fused() answered for
        self._fused: dict[tuple[int, str], FusedLora] = {}
        self.module_shapes = module_shapes
        self.scale_widths = {m: scale_widths.get(m, out) if scale_widths else out
                             for m, (_, out) in module_shapes.items()}
        self.gather_rows = gather_rows
        self._set: tuple[int, ...] = ()  # placement ids of the current set, in segment order
        self._modules: dict[LayerModule, ModuleRows] = {}
        self._forms: dict[LayerModule, tuple[str, Rows]] = {}  # one layout per module
        self._pieces: dict[int, dict[LayerModule, Rows]] = {}  # placement id -> read-out rows
        self._layout: dict[LayerModule, int] = {}  # module -> its column layout in the set
        self._step_key: tuple | None = None  # the last step's tokens per adapter, and
        self._step: dict[LayerModule, LoraBatch] = {}  # its batches

    def batches(self, placements: Sequence[ResidentAdapter],
                uses: Sequence[Sequence[TokenRange]], num_tokens: int, *,
                logit_uses: Sequence[Sequence[TokenRange]] = (), num_logits: int = 0
                ) -> dict[LayerModule, LoraBatch]:
        """One LoraBatch per (layer, module) that any of the adapters targets.

        What depends on the step's tokens (segments, token scales, BGMV token layouts,
        device segment tables) is built once per distinct column layout (the modules whose
        adapters and ranks agree, e.g. every layer's q_proj) and shared by those modules;
        while the step repeats the last one's tokens per adapter (decode steps of the same
        sequences), the last step's batches are returned as they are.

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
        step = (tuple(map(tuple, uses)), num_tokens, tuple(map(tuple, logit_uses)), num_logits)
        if step == self._step_key:
            return self._step
        bgmv = (self.gather_rows and num_tokens <= DENSE_MAX_TOKENS
                and len(placements) >= BGMV_MIN_ADAPTERS)
        parts: dict[tuple, _Part] = {}
        work = []
        for layer_module, rows in self._modules.items():
            module = layer_module[1]
            on_logits = module == "lm_head"
            if on_logits and not num_logits:
                continue
            spans, n = (logit_uses, num_logits) if on_logits else (uses, num_tokens)
            form = ("concatenated" if module in VOCAB_MODULES or (self.gather_rows and not bgmv)
                    else "stacked" if bgmv else None)
            key = (self._layout[layer_module], on_logits, form)
            if key not in parts:
                parts[key] = self._part(rows, spans, n, form)
            work.append((layer_module, rows, spans, form, parts[key]))
        tables = self._tables([p for k, p in parts.items() if k[2] is None])
        batches = {}
        for layer_module, rows, spans, form, part in work:
            gathered = stacked = None
            if form == "concatenated":
                gathered = self._form(layer_module, rows, form)
            elif form == "stacked":
                stacked = tuple(Stacked(a, b, tokens) for (_, a, b), tokens in zip(
                    self._form(layer_module, rows, form), part.tokens, strict=True))
            batches[layer_module] = LoraBatch(
                rows.a, rows.b, part.segments, part.token_scale, gathered, stacked,
                rows.dora_scales(spans), tables.get(id(part)))
        self._step_key, self._step = step, batches
        return batches

    def fused(self, batches: dict[LayerModule, LoraBatch], num_tokens: int
              ) -> dict[tuple[int, str], FusedLora]:
        """``(layer, fused weight) -> FusedLora`` of the step's ``batches`` (from
        :meth:`batches`) where two or more modules of one fused GEMM (q/k/v, gate/up) have
        LoRA work in the dense form (steps of at most :data:`DENSE_MAX_TOKENS` tokens, decodes
        or short prefills, over fewer than :data:`BGMV_MIN_ADAPTERS` adapters, torch
        kernels), none of them DoRA (else none of
        the weight's modules is fused); the model runs those modules through
        :func:`~pagedlora.kernels.lora.lora_fused` and no other LoRA of them. The concatenated
        and block-diagonal rows are kept while the members' rows stay the same.
        """
        if batches is self._fused_for:
            return self._fused
        out: dict[tuple[int, str], FusedLora] = {}
        if self.gather_rows and self.fused_rows and num_tokens <= DENSE_MAX_TOKENS:
            members: dict[tuple[int, str], list[tuple[str, LoraBatch]]] = {}
            for (layer, module), b in batches.items():
                if module in self.fused_rows:
                    members.setdefault((layer, self.fused_rows[module][0]), []).append(
                        (module, b))
            scales: dict[tuple[int, ...], torch.Tensor] = {}
            for key, group in members.items():
                if len(group) < 2 or not all(
                        b.gathered is not None and b.stacked is None
                        and b.token_scale is not None and b.dora is None for _, b in group):
                    continue  # every member in the dense form, or none fused
                group.sort(key=lambda m: self.fused_rows[m[0]][1])
                a, b, parts = self._fused_weights(key, group)
                ts_key = tuple(id(m.token_scale) for _, m in group)
                if ts_key not in scales:
                    scales[ts_key] = torch.cat([m.token_scale for _, m in group], dim=1)
                out[key] = FusedLora(a, scales[ts_key], b, parts)
        self._fused_for, self._fused = batches, out
        return out

    def _fused_weights(self, key: tuple[int, str], group: list[tuple[str, LoraBatch]]
                       ) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
        """``(a, block-diagonal b or None, parts)`` of :class:`FusedLora` for ``group``'s
        member modules (in output-column order), built once while their rows stay."""
        ids = tuple(id(m.gathered[0]) for _, m in group)
        cached = self._fused_weights_of.get(key)
        if cached is not None and cached[0] == ids:
            return cached[1]
        parts, r0 = [], 0
        for module, m in group:
            _, o0, o1 = self.fused_rows[module]
            r = m.gathered[0].shape[0]
            parts.append((o0, o1, r0, r0 + r, m.gathered[1]))
            r0 += r
        a = torch.cat([m.gathered[0] for _, m in group])
        b = None
        if self.block_diagonal:
            first = group[0][1].gathered[1]
            width = max(end for name, _, end in self.fused_rows.values() if name == key[1])
            b = first.new_zeros(r0, width)
            for o0, o1, lo, hi, rows in parts:
                b[lo:hi, o0:o1] = rows
        built = (a, b, tuple(parts))
        self._fused_weights_of[key] = (ids, built)
        return built

    def _part(self, rows: ModuleRows, spans: Sequence[Sequence[TokenRange]], n: int,
              form: str | None) -> _Part:
        """What the modules of ``rows``' column layout share in this step."""
        segments = LoraBatch.segments_of(rows.cols, spans)
        device, dtype = self.pool.tensor.device, self.pool.tensor.dtype
        token_scale = tokens = None
        if form == "concatenated":
            token_scale = LoraBatch.token_scales(rows.cols, spans, n, dtype=dtype,
                                                 device=device)
        elif form == "stacked":
            tokens = tuple(StackedTokens.of([spans[rows.cols[k][0]] for k in entries],
                                            dtype=dtype, device=device)
                           for entries in rows.rank_classes())
        return _Part(segments, token_scale, tokens)

    def _tables(self, parts: Sequence[_Part]) -> dict[int, tuple[SegmentTable, ...]]:
        """The device segment tables of ``parts`` (by ``id``), in disjoint groups, from one
        host buffer copied to the device once (pinned and without blocking on CUDA)."""
        groups = [(id(p), g) for p in parts for g in disjoint_groups(p.segments) if g]
        if not groups:
            return {}
        flat = [(s.start, s.end, s.col_start, s.col_end) for _, g in groups for s in g]
        table = torch.tensor(flat, dtype=torch.int64)
        scale = torch.tensor([s.scale for _, g in groups for s in g], dtype=torch.float32)
        device = self.pool.tensor.device
        table, scale = to_device(table, device), to_device(scale, device)
        out: dict[int, list[SegmentTable]] = {}
        at = 0
        for part_id, g in groups:
            out.setdefault(part_id, []).append(SegmentTable(
                g, table[at:at + len(g)], scale[at:at + len(g)],
                max(s.col_end - s.col_start for s in g), max(s.end - s.start for s in g)))
            at += len(g)
        return {k: tuple(v) for k, v in out.items()}

    def _use(self, placements: Sequence[ResidentAdapter]) -> None:
        """Makes ``placements`` the current set (a no-op while it repeats)."""
        ids = tuple(p.placement_id for p in placements)
        if ids == self._set:
            return
        self._pieces = {p.placement_id: self._pieces[p.placement_id]
                        for p in placements if p.placement_id in self._pieces}
        parts: dict[LayerModule, list[tuple[int, ResidentModule]]] = {}
        for i, placement in enumerate(placements):
            for layer_module, m in placement.modules.items():
                parts.setdefault(layer_module, []).append((i, m))

        def read_scale(layer_module: LayerModule) -> Callable[[PagedRows], torch.Tensor]:
            return lambda rows: self.pool.read_rows(self.scale_widths[layer_module[1]], rows)
        self._modules = {
            lm: ModuleRows.build(ms, [self._read(placements[i])[lm] for i, _ in ms]
                                 if self._reads_out(lm[1]) else None, read_scale(lm))
            for lm, ms in parts.items()}
        self._forms = {}
        self._fused_weights_of = {}
        layouts: dict[tuple, int] = {}
        self._layout = {lm: layouts.setdefault(rows.cols, len(layouts))
                        for lm, rows in self._modules.items()}
        self._step_key = None
        self._set = ids

    def _reads_out(self, module: str) -> bool:
        """Whether ``module``'s rows are read out of the pool: every module's for kernels
        that take read-out rows, else the vocabulary modules' (torch ops run on them)."""
        return self.gather_rows or module in VOCAB_MODULES

    def _read(self, placement: ResidentAdapter) -> dict[LayerModule, Rows]:
        """The rows of the placement's modules that are read out (:meth:`_reads_out`), by
        module, read once per placement: one gather per row width (a few per adapter rather
        than two per module: a rank-8 q,v SmolLM2 adapter reads 120 matrices; see
        docs/benchmarks.md), each module's rows contiguous views of their width's gather."""
        cached = self._pieces.get(placement.placement_id)
        if cached is not None:
            return cached
        widths: dict[int, list[tuple[LayerModule, int, PagedRows]]] = {}
        for lm, m in placement.modules.items():
            if self._reads_out(lm[1]):
                in_f, out_f = self.module_shapes[lm[1]]
                widths.setdefault(in_f, []).append((lm, 0, m.a))
                widths.setdefault(out_f, []).append((lm, 1, m.b))
        read: dict[LayerModule, list[torch.Tensor]] = {}
        for width, members in widths.items():  # a width's rows share one table shape
            rows = self.pool.read_rows(width, PagedRows(
                torch.cat([r.pages for _, _, r in members]),
                torch.cat([r.slots for _, _, r in members])))
            counts = [r.pages.shape[0] for _, _, r in members]
            for (lm, side, _), part in zip(members, rows.split(counts), strict=True):
                read.setdefault(lm, [None, None])[side] = part
        cached = self._pieces[placement.placement_id] = {lm: (a, b) for lm, (a, b) in
                                                         read.items()}
        return cached

    def _form(self, layer_module: LayerModule, rows: ModuleRows, kind: str):
        """The module's rows in layout ``kind`` ("concatenated" or "stacked"), kept until the
        set changes or the other layout is asked for."""
        form = self._forms.get(layer_module)
        if form is None or form[0] != kind:
            form = (kind, rows.concatenated() if kind == "concatenated" else rows.stacked())
            self._forms[layer_module] = form
        return form[1]
