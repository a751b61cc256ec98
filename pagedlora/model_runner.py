"""ModelRunner: turns a SchedulerOutput into tensors, runs the model, returns sampled logits."""

from __future__ import annotations

import torch

from pagedlora.adapter_store import AdapterStore, ResidentAdapter
from pagedlora.kernels.lora import (
    BGMV_MIN_ADAPTERS,
    DENSE_MAX_TOKENS,
    LoraBatch,
    LoraSegment,
    PagedRows,
    StackedTokens,
    gather_rows,
)
from pagedlora.kernels.paged_attention import attention_metadata
from pagedlora.model import AttentionGroup, ForwardBatch, LlamaModel
from pagedlora.pool import UnifiedPool
from pagedlora.scheduler import Request, ScheduledRequest, SchedulerOutput


class ModelRunner:
    """Builds the flattened batch of a step (no padding) and runs the forward pass.

    Sequences are ordered by adapter so that each adapter's tokens form one contiguous segment
    (the SGMV layout, Punica section 4); decodes (one new token) and prefills are attended in
    two groups so a long prompt does not pad every decode.
    """

    def __init__(self, model: LlamaModel, pool: UnifiedPool, adapters: AdapterStore) -> None:
        self.model = model
        self.pool = pool
        self.adapters = adapters
        # (placements, rows) of the last step's adapters; see _concatenated_rows
        self._rows_cache: tuple[tuple[ResidentAdapter, ...], dict] = ((), {})
        # The torch (CPU) kernels take rows already gathered out of the pages: id(placement)
        # -> (placement, {(layer, module): (a, b)}) for the adapters of the last step only.
        self._gather = model.kernels.backend == "torch"
        self._gathered: dict[int, tuple[ResidentAdapter, dict]] = {}

    def run(self, out: SchedulerOutput) -> tuple[list[Request], torch.Tensor]:
        """Runs one step.

        Returns:
            ``(requests, logits)``: the requests that produce a token this step (their known
            tokens all computed) and their ``[S, vocab_size]`` float32 logits, row i for
            ``requests[i]``.
        """
        order = sorted(out.scheduled, key=lambda s: s.request.adapter_key or "")
        batch, sampled = self._build(order)
        logits = self.model.forward(batch, self.pool)
        return sampled, logits

    def _build(self, order: list[ScheduledRequest]) -> tuple[ForwardBatch, list[Request]]:
        device = self.pool.tensor.device
        bs = self.pool.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_pages: list[list[int]] = []
        sample_index: list[int] = []
        sampled: list[Request] = []
        seqs = {True: [], False: []}  # is_decode -> [(q_start, q_len, ctx_len, blocks)]
        segments: list[tuple[int, int, str]] = []
        for s in order:
            r, n = s.request, s.num_new_tokens
            start, first = len(input_ids), r.num_computed_tokens
            input_ids.extend(r.all_token_ids[first:first + n])
            pos = range(first, first + n)
            positions.extend(pos)
            slot_pages.extend(r.blocks[p // bs] for p in pos)
            seqs[n == 1].append((start, n, first + n, r.blocks))
            if first + n == r.num_tokens:
                sample_index.append(start + n - 1)
                sampled.append(r)
            key = r.adapter_key
            if key is not None:
                if segments and segments[-1][2] == key:
                    segments[-1] = (segments[-1][0], start + n, key)
                else:
                    segments.append((start, start + n, key))

        def t(x) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        groups = []
        for members in seqs.values():
            if not members:
                continue
            width = max(len(m[3]) for m in members)
            tables = [m[3] + [m[3][0]] * (width - len(m[3])) for m in members]
            groups.append(AttentionGroup(
                block_tables=t(tables).permute(2, 0, 1).contiguous(),  # [L, B, max_blocks]
                meta=attention_metadata(t([m[0] for m in members]), t([m[1] for m in members]),
                                        t([m[2] for m in members]), width * bs)))
        batch = ForwardBatch(
            input_ids=t(input_ids), positions=t(positions),
            slot_pages=t(slot_pages).t().contiguous(), slot_offsets=t(positions) % bs,
            groups=groups, sample_index=t(sample_index),
            lora=self._lora(segments, len(input_ids)))
        return batch, sampled

    def _lora(self, segments: list[tuple[int, int, str]], num_tokens: int
              ) -> dict[tuple[int, str], LoraBatch]:
        """One LoraBatch per (layer, module) that any adapter of the step targets."""
        if not segments:
            return {}
        residents = tuple(self.adapters.resident(key) for *_, key in segments)
        rows = self._concatenated_rows(residents)
        device = self.pool.tensor.device
        bgmv = (self._gather and num_tokens <= DENSE_MAX_TOKENS
                and len(segments) >= BGMV_MIN_ADAPTERS)
        scales: dict[tuple, torch.Tensor] = {}  # column layout -> [T, R] token scales
        entries: dict[tuple, StackedTokens | None] = {}  # segments of a module -> token layout
        lora = {}
        for layer_module, r in rows.items():
            cols = r["cols"]
            layout = tuple(cols)
            token_scale = scales.get(layout)
            if token_scale is None:
                token_scale = torch.zeros(num_tokens, cols[-1][2], device=device,
                                          dtype=self.pool.tensor.dtype)
                for i, c0, c1, scale in cols:
                    token_scale[segments[i][0]:segments[i][1], c0:c1] = scale
                scales[layout] = token_scale
            gathered = stacked = None
            if bgmv:
                which = tuple(i for i, *_ in cols)
                if which not in entries:
                    entries[which] = self._token_entries(segments, which, device)
                stacked = (*self._form(r, "stacked"), entries[which])
            elif self._gather:
                gathered = self._form(r, "concatenated")
            lora[layer_module] = LoraBatch(
                a=r["a"], b=r["b"], token_scale=token_scale, gathered=gathered, stacked=stacked,
                segments=tuple(LoraSegment(segments[i][0], segments[i][1], c0, c1, scale)
                               for i, c0, c1, scale in cols))
        return lora

    @staticmethod
    def _token_entries(segments: list[tuple[int, int, str]], which: tuple[int, ...],
                       device: torch.device) -> StackedTokens | None:
        """Where the tokens of segments ``which`` (the adapters that target one module, in
        stacked order) go in the BGMV layout; None when segment ``which[k]`` is exactly token
        ``segments[which[0]].start + k``."""
        lo = segments[which[0]][0]
        if all(segments[i][:2] == (lo + k, lo + k + 1) for k, i in enumerate(which)):
            return None
        index, entry, position, width = [], [], [], 0
        for k, i in enumerate(which):
            n = segments[i][1] - segments[i][0]
            index.extend(range(segments[i][0], segments[i][1]))
            entry.extend([k] * n)
            position.extend(range(n))
            width = max(width, n)

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.long, device=device)
        return StackedTokens(t(index), t(entry), t(position), width)

    def _concatenated_rows(self, residents: tuple[ResidentAdapter, ...]) -> dict:
        """``(layer, module) -> {"a", "b": PagedRows, "cols": [(segment, col_start, col_end,
        scale)], "pieces": per adapter (a, b) rows}`` for the step's adapters in segment order
        ("pieces" only for the torch kernels; Triton reads pages in place). Kept while the same
        placements repeat (decode steps): a pinned adapter's pages do not move, and a reload is
        a new placement object.

        On the CPU, reading rows through page tables costs an indexing op per module per
        layer, more than the LoRA GEMMs themselves at decode sizes; so each adapter's rows
        are read once while it stays in the batch, and :meth:`_form` lays them out for the
        kernels once per set of adapters. The copies (the batch's adapters' weights, at most
        twice: the pieces and one layout) are dropped as soon as an adapter leaves the batch."""
        cached_for, cached = self._rows_cache
        if len(cached_for) == len(residents) and all(
                x is y for x, y in zip(cached_for, residents, strict=True)):
            return cached
        parts: dict[tuple[int, str], list] = {}
        for i, resident in enumerate(residents):
            for layer_module, m in resident.modules.items():
                parts.setdefault(layer_module, []).append((i, m))
        if self._gather:
            self._gathered = {id(r): self._gathered.get(id(r), (r, {})) for r in residents}
        rows = {}
        for layer_module, ms in parts.items():
            cols, start = [], 0
            for i, m in ms:
                r = m.a.pages.shape[0]
                cols.append((i, start, start + r, m.scale))
                start += r
            rows[layer_module] = {
                "a": PagedRows(torch.cat([m.a.pages for _, m in ms]),
                               torch.cat([m.a.slots for _, m in ms])),
                "b": PagedRows(torch.cat([m.b.pages for _, m in ms]),
                               torch.cat([m.b.slots for _, m in ms])),
                "cols": cols,
                "pieces": [self._adapter_rows(residents[i], layer_module, m) for i, m in ms]
                if self._gather else None}
        self._rows_cache = (residents, rows)
        return rows

    @staticmethod
    def _form(r: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's rows laid out for the torch kernels, kept in ``r`` (one layout at a
        time): "concatenated", ``(a [R, in], b [R, out])`` in column order; or "stacked",
        ``(a [S, r_max, in], b [S, r_max, out])`` per adapter, zero-padded to the largest
        rank, the scale folded into b (see LoraBatch)."""
        if r.get("form") == kind:
            return r["rows"]
        pieces, cols = r["pieces"], r["cols"]
        if kind == "concatenated":
            rows = pieces[0] if len(pieces) == 1 else (
                torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))
        else:
            a0, b0 = pieces[0]
            r_max = max(c1 - c0 for _, c0, c1, _ in cols)
            a = a0.new_zeros(len(pieces), r_max, a0.shape[1])
            b = b0.new_zeros(len(pieces), r_max, b0.shape[1])
            for k, ((pa, pb), (_, c0, c1, scale)) in enumerate(zip(pieces, cols, strict=True)):
                a[k, : c1 - c0] = pa
                torch.mul(pb, scale, out=b[k, : c1 - c0])
            rows = (a, b)
        r["form"], r["rows"] = kind, rows
        return rows

    def _adapter_rows(self, resident: ResidentAdapter, layer_module: tuple[int, str],
                      m) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [r, in], b [r, out])`` of one adapter's module, read out of the pool once while
        its placement lasts (see :meth:`_concatenated_rows`)."""
        per_module = self._gathered[id(resident)][1]
        got = per_module.get(layer_module)
        if got is None:
            in_f, out_f = self.model.module_shapes[layer_module[1]]
            got = (gather_rows(self.pool.rows(in_f), m.a), gather_rows(self.pool.rows(out_f), m.b))
            per_module[layer_module] = got
        return got
