"""LoRA shrink/expand over adapter rows read from pool pages (torch reference, the CPU path),
and DoRA's output rescaling."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TokenRange = tuple[int, int, float]
"""``(start, end, weight)``: tokens ``[start, end)`` of a step use an adapter at ``weight`` (1
for a plain adapter; a request's weight for it in a scaled adapter or mix)."""


@dataclass(frozen=True)
class PagedRows:
    """Where the ``r`` rows of one ``[r, width]`` adapter matrix live in the pool.

    Attributes:
        pages: ``[r]`` int64 page id of each row, or ``[r, P]`` for rows stored in ``P``
            pieces (``row_packing.row_pieces``): the page of each piece.
        slots: the row's (or each piece's) slot inside its page, in the view of the stored
            width; same shape as ``pages``.
    """

    pages: torch.Tensor
    slots: torch.Tensor


@dataclass(frozen=True)
class LoraSegment:
    """Tokens ``[start, end)`` of a batch using the adapter whose rows are columns
    ``[col_start, col_end)`` of the batch's concatenated rank rows, with its scale (the
    adapter's scaling times the tokens' weight for it). Segments of different adapters may
    cover the same tokens: a token of a mix is in a segment of each of its adapters."""

    start: int
    end: int
    col_start: int
    col_end: int
    scale: float


@dataclass(frozen=True)
class StackedTokens:
    """Where the tokens of one rank class of a BGMV batch sit in its adapter-major layout.

    Attributes:
        index: ``[N]`` int64 (token, adapter) pairs' token (a token of a mix appears once per
            adapter).
        entry: ``[N]`` int64 their adapter among the stacked ones.
        position: ``[N]`` int64 their place among that adapter's tokens.
        width: the most tokens any one adapter has (1: one each, no zero-padded layout).
        weight: ``[N]`` the token's weight for that adapter (the batch's dtype), or None when
            every weight is 1.
        first: when adapter k's one token is ``first + k`` at weight 1 for every k, ``first``
            (the kernel slices instead of indexing), else None.
    """

    index: torch.Tensor
    entry: torch.Tensor
    position: torch.Tensor
    width: int
    weight: torch.Tensor | None = None
    first: int | None = None

    @classmethod
    def of(cls, ranges: Sequence[Sequence[TokenRange]], *, dtype: torch.dtype,
           device: torch.device) -> StackedTokens:
        """The layout of the stacked adapters' tokens (``ranges[k]``: adapter k's, in
        order; each adapter has at least one token)."""
        lo = ranges[0][0][0]
        first = lo if all(len(r) == 1 and r[0] == (lo + k, lo + k + 1, 1.0)
                          for k, r in enumerate(ranges)) else None
        index, entry, position, weight, width = [], [], [], [], 0
        for k, adapter_ranges in enumerate(ranges):
            n = 0
            for start, end, w in adapter_ranges:
                index.extend(range(start, end))
                weight.extend([w] * (end - start))
                position.extend(range(n, n + end - start))
                n += end - start
            entry.extend([k] * n)
            width = max(width, n)

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.long, device=device)
        weights = None if all(w == 1.0 for w in weight) else torch.tensor(
            weight, dtype=dtype, device=device)
        return cls(t(index), t(entry), t(position), width, weights, first)


@dataclass(frozen=True)
class DoraScales:
    """DoRA's output rescaling of one module in one step (Liu et al. 2024, "DoRA:
    Weight-Decomposed Low-Rank Adaptation", eq. 5, as PEFT computes it): for every token t of
    a DoRA adapter k, ``y[t] <- g_k * (y[t] - bias) + bias`` after the LoRA delta was added,
    ``g_k = m_k / ||W + scale_k * B_k A_k||`` per output feature (computed once per adapter).

    Attributes:
        ranges: ``(start, end, k)``: tokens ``[start, end)`` use DoRA adapter ``k``.
        rows: the page table of the ``n`` DoRA adapters' scale rows (``out_features`` wide,
            whole or in narrow pieces), adapter k's row k.
        gathered: ``[n, out_features]`` those rows read out of the pool (what the engine
            hands over, on either backend), or None (read them through ``rows``).
    """

    ranges: tuple[tuple[int, int, int], ...]
    rows: PagedRows
    gathered: torch.Tensor | None = None


@dataclass(frozen=True)
class SegmentTable:
    """A batch's segments as device tensors, for kernels that loop over them on the device
    (Triton), built once per step for every module sharing the segments (see
    ``LoraLayouts``); one group of segments whose token ranges are disjoint.

    Attributes:
        segments: the group's segments.
        table: ``[S, 4]`` int64 ``(start, end, col_start, col_end)`` per segment.
        scale: ``[S]`` float32 scale per segment.
        max_rank: the largest ``col_end - col_start``. max_len: the longest ``end - start``.
    """

    segments: tuple[LoraSegment, ...]
    table: torch.Tensor
    scale: torch.Tensor
    max_rank: int
    max_len: int


@dataclass(frozen=True)
class Stacked:
    """One rank class of a BGMV batch (``LoraBatch.stacked``): adapters whose ranks are within
    4x of the class's largest, stacked and zero-padded to it.

    Attributes:
        a: ``[S, r, in_features]`` lora_A rows, adapter k's in ``a[k, :r_k]``.
        b: ``[S, r, out_features]`` lora_B^T rows times the adapter's scale.
        tokens: where the class's tokens sit (:class:`StackedTokens`).
    """

    a: torch.Tensor
    b: torch.Tensor
    tokens: StackedTokens


@dataclass(frozen=True)
class LoraBatch:
    """The LoRA work of one module of one layer in one step.

    Attributes:
        a: ``R`` rows of lora_A (``[R, in_features]``), the batch's adapters one after another.
        b: ``R`` rows of lora_B transposed (``[R, out_features]``), in the same order.
        segments: token ranges and the rows each one uses; ranges of one adapter are disjoint,
            those of different adapters may overlap (tokens of a mix).
        token_scale: ``[T, R]`` scale of column r for token t: the segment's scale where one
            of token t's adapters owns row r, else 0 (tokens of the base model have an
            all-zero row); None where the kernels do not read it (Triton).
        gathered: ``(a [R, in_features], b [R, out_features])``, the rows already read out of
            the pool (the CPU path keeps them while the step's adapters repeat), or None: read
            them through the page tables.
        stacked: the BGMV form, for decode batches over many adapters (CPU path): one
            :class:`Stacked` per rank class of the batch's adapters (padding within a class
            is at most 4x an adapter's rank).
        dora: the DoRA rescaling of the module's output, when one of its adapters is DoRA
            (applied by :func:`dora_rescale`, after :func:`lora_shrink_expand`).
        tables: the segments as device tensors, in disjoint groups (Triton), or None: the
            kernel builds them.
    """

    a: PagedRows
    b: PagedRows
    segments: tuple[LoraSegment, ...]
    token_scale: torch.Tensor | None
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None
    stacked: tuple[Stacked, ...] | None = None
    dora: DoraScales | None = None
    tables: tuple[SegmentTable, ...] | None = None

    @staticmethod
    def segments_of(cols: Sequence[tuple[int, int, int, float]],
                    uses: Sequence[Sequence[TokenRange]]) -> tuple[LoraSegment, ...]:
        """The segments of a module whose adapters own ``cols`` (per such adapter ``(i,
        col_start, col_end, scale)``: it is the step's adapter ``i`` and owns rows
        ``[col_start, col_end)``), given the step's ``uses`` (per adapter, its tokens and
        their weights, :data:`TokenRange`)."""
        return tuple(LoraSegment(start, end, c0, c1, scale * w)
                     for i, c0, c1, scale in cols for start, end, w in uses[i])

    @staticmethod
    def token_scales(cols: Sequence[tuple[int, int, int, float]],
                     uses: Sequence[Sequence[TokenRange]], num_tokens: int, *,
                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[num_tokens, R]`` (``R = cols[-1][2]``): each adapter's scale times the tokens'
        weight over its tokens and its rows, 0 elsewhere (``cols`` and ``uses`` as for
        :meth:`segments_of`)."""
        scale = torch.zeros(num_tokens, cols[-1][2], dtype=dtype, device=device)
        for i, c0, c1, value in cols:
            for start, end, w in uses[i]:
                scale[start:end, c0:c1] = value * w
        return scale


@dataclass(frozen=True)
class FusedLora:
    """The LoRA work of modules that share one input and one fused base GEMM (q/k/v, gate/up)
    in a decode-sized step of the dense form: one shrink over every member module's adapter
    rows instead of one per module.

    Attributes:
        a: ``[R, in_features]`` the members' lora_A rows (each member's, as its
            ``LoraBatch.gathered``), member after member.
        token_scale: ``[T, R]`` the members' token scales side by side.
        b: ``[R, fused_out]`` the members' lora_B^T rows block-diagonally (member m's rows in
            its columns of the fused output, zeros elsewhere): one expand for all members;
            or None: one expand per member (``parts``).
        parts: per member ``(out_start, out_end, row_start, row_end, b [r_m, out_m])``: its
            columns of the fused output, its rows of ``a``, its lora_B^T rows.
    """

    a: torch.Tensor
    token_scale: torch.Tensor
    b: torch.Tensor | None
    parts: tuple[tuple[int, int, int, int, torch.Tensor], ...]


def lora_fused(y: torch.Tensor, x: torch.Tensor, work: FusedLora,
               raw: torch.Tensor | None = None) -> None:
    """LoRA of every member module of ``work``, in place: :func:`lora_shrink_expand`'s dense
    form with the members' shrinks in one GEMM (Punica's SGMV batches segments of one
    module; this also batches modules that read the same input), then one block-diagonal
    expand (``work.b``) or one per member. Every op on a decode step's few tokens costs
    about the same on a CPU whatever its size: q/k/v take 2 ops instead of 9 (block-diagonal)
    or 5, gate/up 2 instead of 6 or 4.

    Args:
        y: ``[T, fused_out]`` the fused projection's output (bias included), updated.
        x: ``[T, in_features]`` its input.
        work: the members' rows and token scales.
        raw: ``[T, R]`` ``x @ work.a^T`` already computed (by the base GEMM,
            :meth:`pagedlora.packed_linear.PackedLinear.ride`; scaled here in place), or None.
    Raises:
        ValueError: ``x``, ``y`` and the token scales disagree on the number of tokens.
    """
    if not x.shape[0] == y.shape[0] == work.token_scale.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, y {y.shape[0]}, token_scale "
                         f"{work.token_scale.shape[0]}")
    shrunk = (F.linear(x, work.a) if raw is None else raw).mul_(work.token_scale)
    if work.b is not None:
        y.addmm_(shrunk, work.b)
        return
    for out_start, out_end, row_start, row_end, b in work.parts:
        y[:, out_start:out_end].addmm_(shrunk[:, row_start:row_end], b)


def disjoint_groups(segments: Sequence[LoraSegment]) -> list[tuple[LoraSegment, ...]]:
    """``segments`` split into as few groups as a greedy pass over their starts finds, each
    group's token ranges disjoint: the kernels give a token one row of the shrink output, so
    the segments of a mix's adapters, which cover the same tokens, go to different launches
    (a step needs as many as the most adapters one token has; one without mixes)."""
    groups: list[list[LoraSegment]] = []
    ends: list[int] = []
    for seg in sorted(segments, key=lambda s: (s.start, s.end)):
        for g, end in enumerate(ends):
            if end <= seg.start:
                groups[g].append(seg)
                ends[g] = seg.end
                break
        else:
            groups.append([seg])
            ends.append(seg.end)
    return [tuple(g) for g in groups]


def gather_rows(rows_view: torch.Tensor, rows: PagedRows) -> torch.Tensor:
    """Reads rows through a page table, joining rows stored in pieces.

    Args:
        rows_view: ``[num_pages, rows_per_page, stored]`` view of the pool at the width the
            rows are stored in (``UnifiedPool.stored_rows``).
        rows: the page table of ``r`` rows: ``[r]`` for whole rows, ``[r, P]`` for rows in
            ``P`` pieces.
    Returns:
        ``[r, P * stored]`` tensor (``P = 1`` for whole rows), same dtype as the pool; rows
        wider than a page come back with their last piece's zero padding
        (``UnifiedPool.read_rows`` trims it).
    """
    out = rows_view[rows.pages, rows.slots]          # [r, stored] or [r, P, stored]
    return out if rows.pages.dim() == 1 else out.reshape(out.shape[0], -1)


# Batches of at most this many tokens take the dense form (one shrink over every adapter's
# rows); larger ones loop over segments, where the rows of other adapters would cost real work.
# Measured on this project's 2-core CPU, 4 adapters of ranks 4..32 on a 576x576 projection:
# dense 34 us vs 363 us for segments at 8 tokens, even around 32-128, segments 2x faster at 512.
DENSE_MAX_TOKENS = 64
# From this many adapters in such a batch, the model runner hands the kernel the BGMV form
# (``LoraBatch.stacked``): the dense shrink's work grows with the number of adapters. Measured
# on this project's CPU, 64 decode tokens of 64 adapters of ranks 4..16 on a 576x576
# projection: dense 1.2 ms, BGMV 0.54 ms.
BGMV_MIN_ADAPTERS = 8


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch,
                       a_view: torch.Tensor | None, b_view: torch.Tensor | None,
                       raw: torch.Tensor | None = None) -> None:
    """Multi-adapter LoRA, in place: ``y[t] += sum_s scale_s * (x[t] @ A_s^T) @ B_s^T`` over
    the segments s holding token t (one for a plain adapter, one per adapter of a mix, none
    for base tokens).

    Shrink to rank r, scale, expand to out_features, for a batch whose tokens use different
    adapters of different ranks (Punica, Chen et al. 2023, section 4, SGMV/BGMV; S-LoRA
    section 5.1): :func:`lora_expand` of :func:`lora_shrink`. The rows are read from pool
    pages once per call (unless ``batch.gathered`` already holds them). Decode-sized batches
    over few adapters run as one dense shrink against every adapter's rows with a per-token
    column scale (``x @ A^T * token_scale``: few large ops instead of many small ones, which is
    what a CPU rewards; a token of a mix has a weighted scale in each of its adapters'
    columns); over many adapters
    (``batch.stacked``) as two batched matmuls, each token against its own adapters' rows
    (BGMV), since the dense form's work grows with the number of adapters; larger batches
    loop over the segments so no token multiplies another adapter's rows.

    Args:
        y: ``[T, out_features]`` output of the base projection, updated in place.
        x: ``[T, in_features]`` input of the projection, same dtype as ``y``.
        batch: the step's rows, segments and token scales for this module.
        a_view: ``[num_pages, rows_per_page, in_features]`` pool view for lora_A rows.
        b_view: ``[num_pages, rows_per_page, out_features]`` pool view for lora_B^T rows.
        raw: for the dense form, ``[T, R]`` ``x @ A^T`` over all of the step's tokens and the
            batch's rows (:func:`dense_rows`) already computed, or None.
    Raises:
        ValueError: ``x``, ``y`` and ``batch.token_scale`` disagree on the number of tokens,
            or a batch without ``stacked`` has no token scales.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, y {y.shape[0]}")
    if batch.stacked is not None:
        _bgmv(y, x, batch)
        return
    if batch.token_scale is None:
        raise ValueError("the torch LoRA kernel reads batch.token_scale, which is None")
    if x.shape[0] != batch.token_scale.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens, token_scale "
                         f"{batch.token_scale.shape[0]}")
    lora_expand(y, lora_shrink(x, batch, a_view, raw), batch, b_view)


def dense_rows(batch: LoraBatch | None, num_tokens: int) -> torch.Tensor | None:
    """``[R, in_features]``: the lora_A rows that :func:`lora_shrink` multiplies all of a
    decode-sized step's tokens by (the dense form over read-out rows), which a caller may
    compute with the base GEMM and hand over as ``raw``; None for any other form."""
    if (batch is None or batch.gathered is None or num_tokens > DENSE_MAX_TOKENS
            or _form(num_tokens, batch) != "dense"):
        return None
    return batch.gathered[0]


def _form(num_tokens: int, batch: LoraBatch) -> str:
    """How the batch is computed: "bgmv" (``batch.stacked``), "dense" (one shrink over every
    adapter's rows, decode-sized batches) or "segments" (a loop over the segments)."""
    if batch.stacked is not None:
        return "bgmv"
    if num_tokens <= DENSE_MAX_TOKENS or len(batch.segments) == 1:
        return "dense"
    return "segments"


def _dense_span(batch: LoraBatch) -> tuple[int, int]:
    """``[lo, hi)``: the tokens the dense form covers (segments may overlap: a mix's)."""
    return min(s.start for s in batch.segments), max(s.end for s in batch.segments)


def _rows(batch: LoraBatch, a_view: torch.Tensor | None, b_view: torch.Tensor | None
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The batch's lora_A and lora_B^T rows: ``batch.gathered``, else read through the page
    tables from the views given."""
    if batch.gathered is not None:
        return batch.gathered  # [R, in], [R, out]
    return (None if a_view is None else gather_rows(a_view, batch.a),
            None if b_view is None else gather_rows(b_view, batch.b))


def lora_shrink(x: torch.Tensor, batch: LoraBatch, a_view: torch.Tensor | None,
                raw: torch.Tensor | None = None) -> torch.Tensor:
    """Shrink: ``x[t] @ A_t^T * scale_t`` for every token t of a segment, in the layout
    :func:`lora_expand` reads (a tensor-parallel rank all-reduces it in between, S-LoRA
    section 6: its rows of A see only its columns of ``x``).

    Args:
        x: ``[T, in_features]`` input of the projection, the pool's dtype.
        batch: the step's rows, segments and token scales for this module.
        a_view: ``[num_pages, rows_per_page, in_features]`` pool view for lora_A rows.
        raw: ``[T, R]`` ``x @ A^T`` already computed for the dense form (scaled here in
            place), or None.
    Returns:
        one contiguous tensor, the pool's dtype (a strided view of ``raw`` when given): ``[hi - lo,
        R]`` for the dense form (tokens ``lo..hi`` of the segments, all R rows of the batch;
        zero where a token's adapter does not own the column), for BGMV each rank class's
        ``[S, width, r]`` and for the segment loop every segment's ``[len, r]`` block,
        flattened one after another.
    """
    form = _form(x.shape[0], batch)
    if form == "bgmv":  # one contiguous tensor however many rank classes
        return torch.cat([_bgmv_shrink(x, part).reshape(-1) for part in batch.stacked])
    if form == "dense":
        lo, hi = _dense_span(batch)
        whole = (lo, hi) == (0, x.shape[0])  # no slicing: every op counts on the CPU
        if raw is not None:
            shrunk = raw if whole else raw[lo:hi]
        else:
            a, _ = _rows(batch, a_view, None)
            shrunk = F.linear(x if whole else x[lo:hi], a)
        return shrunk.mul_(batch.token_scale if whole else batch.token_scale[lo:hi])
    a, _ = _rows(batch, a_view, None)
    out = x.new_empty(sum((s.end - s.start) * (s.col_end - s.col_start)
                          for s in batch.segments))
    offset = 0
    for s in batch.segments:
        n, r = s.end - s.start, s.col_end - s.col_start
        block = out[offset:offset + n * r].view(n, r)
        torch.mm(x[s.start:s.end], a[s.col_start:s.col_end].t(), out=block).mul_(s.scale)
        offset += n * r
    return out


def lora_expand(y: torch.Tensor, shrunk: torch.Tensor, batch: LoraBatch,
                b_view: torch.Tensor) -> None:
    """Expand, in place: ``y[t] += shrunk_t @ B_t^T`` for every token t of a segment.

    Args:
        y: ``[T, out_features]`` (a column slice is fine) output of the base projection.
        shrunk: from :func:`lora_shrink` for the same batch and number of tokens.
        batch: the step's rows and segments for this module.
        b_view: ``[num_pages, rows_per_page, out_features]`` pool view for lora_B^T rows.
    """
    form = _form(y.shape[0], batch)
    if form == "bgmv":
        offset = 0
        for part in batch.stacked:
            shape = _bgmv_shape(part)
            n = shape[0] * shape[1] * shape[2]
            _bgmv_expand(y, shrunk[offset:offset + n].view(shape), part)
            offset += n
        return
    _, b = _rows(batch, None, b_view)
    if form == "dense":
        lo, hi = _dense_span(batch)
        (y if (lo, hi) == (0, y.shape[0]) else y[lo:hi]).addmm_(shrunk, b)
        return
    offset = 0
    for s in batch.segments:
        n, r = s.end - s.start, s.col_end - s.col_start
        y[s.start:s.end].addmm_(shrunk[offset:offset + n * r].view(n, r),
                                b[s.col_start:s.col_end])
        offset += n * r


def _bgmv(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    """``y[t] += w_(t,e) * (x[t] @ a[e]^T) @ b[e]`` for every token t and adapter e of each
    rank class of ``batch.stacked``: :func:`_bgmv_expand` of :func:`_bgmv_shrink`."""
    for part in batch.stacked:
        _bgmv_expand(y, _bgmv_shrink(x, part), part)


def _bgmv_shape(part: Stacked) -> tuple[int, int, int]:
    """``(S, width, r)`` of the rank class's shrink (width 1 unless an adapter has several
    tokens laid out zero-padded)."""
    tokens = part.tokens
    width = 1 if tokens.first is not None or tokens.width == 1 else tokens.width
    return part.a.shape[0], width, part.a.shape[1]


def _bgmv_shrink(x: torch.Tensor, part: Stacked) -> torch.Tensor:
    """``w_(t,e) * x[t] @ a[e]^T`` for every token t and adapter e of one rank class, as
    :func:`_bgmv_shape` ``[S, width, r]`` (the scale is in ``b``; ``w`` is the token's weight
    for the adapter, 1 but in a mix). Tokens are laid out adapter-major (``[S, width, in]``,
    zero-padded when an adapter has several, a mix's token once per adapter, its weight
    applied to its activation row) rather than copying weights per token: an activation row
    is ``in`` elements, an adapter's rows ``r * in``."""
    a, tokens = part.a, part.tokens
    if tokens.first is not None:  # one token each, in order: slices, no indexing
        lo = tokens.first
        return torch.bmm(x[lo:lo + a.shape[0]].unsqueeze(1), a.transpose(1, 2))  # [S, 1, r]
    rows = x[tokens.index]
    if tokens.weight is not None:
        rows = rows * tokens.weight[:, None]
    if tokens.width == 1:  # one token each: no zero-padded layout
        return torch.bmm(rows.unsqueeze(1), a.transpose(1, 2))
    laid = x.new_zeros(a.shape[0], tokens.width, x.shape[1])            # [S, width, in]
    laid[tokens.entry, tokens.position] = rows
    return torch.bmm(laid, a.transpose(1, 2))


def _bgmv_expand(y: torch.Tensor, shrunk: torch.Tensor, part: Stacked) -> None:
    """``y[t] += shrunk @ b[e]`` for the tokens of :func:`_bgmv_shrink`'s result, in place."""
    b, tokens = part.b, part.tokens
    out = torch.bmm(shrunk, b)                                          # [S, width, out]
    if tokens.first is not None:
        y[tokens.first:tokens.first + b.shape[0]] += out.squeeze(1)
    elif tokens.width == 1:
        y.index_add_(0, tokens.index, out.squeeze(1))
    else:
        y.index_put_((tokens.index,), out[tokens.entry, tokens.position], accumulate=True)


def dora_rescale(y: torch.Tensor, bias: torch.Tensor | None, dora: DoraScales,
                 b_view: torch.Tensor) -> None:
    """DoRA, in place: ``y[t] = g_k * (y[t] - bias) + bias`` for the tokens t of each DoRA
    adapter k (see :class:`DoraScales`); other tokens untouched. With ``y`` the base output
    plus the LoRA delta this is PEFT's ``DoraLinearLayer.forward`` added to the base result,
    ``(g - 1) * (base - bias) + g * scale * B A x``. Elementwise torch ops: the same on every
    device (no Triton kernel needed).

    Args:
        y: ``[T, out_features]`` the projection's output (bias and LoRA delta included).
        bias: ``[out_features]`` the projection's bias, or None.
        dora: the step's DoRA adapters of this module and their tokens.
        b_view: ``[num_pages, rows_per_page, stored]`` pool view of the scale rows at their
            stored width (read only when ``dora.gathered`` is None).
    """
    g = dora.gathered if dora.gathered is not None else gather_rows(b_view, dora.rows)
    for start, end, k in dora.ranges:
        part = y[start:end]
        if bias is not None:
            part.sub_(bias)
        part.mul_(g[k])
        if bias is not None:
            part.add_(bias)


def lora_embedding(y: torch.Tensor, ids: torch.Tensor, batch: LoraBatch) -> None:
    """Multi-adapter LoRA of an embedding, in place: ``y[t] += scale_t * A_t[:, ids[t]] @
    B_t^T`` for every token t of a segment, with ``A_t [r, vocab_size]`` (PEFT's
    ``lora_embedding_A``) and ``B_t^T [r, hidden]`` (``lora_embedding_B`` transposed) the
    adapter of t's segment: the shrink is a row lookup in ``A^T``, the expand a matmul by
    ``B^T`` (PEFT's ``Embedding`` layer: ``embedding(x, A^T) @ B^T * scaling``). One lookup and
    one GEMM per segment: there is no work to share across adapters.

    Args:
        y: ``[T, hidden]`` embeddings of the batch's tokens, updated in place.
        ids: ``[T]`` int64 the tokens.
        batch: the step's rows and segments for the embedding; ``batch.gathered`` must hold
            ``(A [R, vocab_size], B^T [R, hidden])``, the rows read out of the pool.
    Raises:
        ValueError: ``batch.gathered`` is None, or ``y`` and ``ids`` disagree on the tokens.
    """
    if batch.gathered is None:
        raise ValueError("lora_embedding reads rows already gathered out of the pool")
    if y.shape[0] != ids.shape[0]:
        raise ValueError(f"y has {y.shape[0]} tokens, ids {ids.shape[0]}")
    a, b = batch.gathered
    for s in batch.segments:
        if s.end > s.start:
            y[s.start:s.end].addmm_(a[s.col_start:s.col_end, ids[s.start:s.end]].t(),
                                    b[s.col_start:s.col_end], alpha=s.scale)
