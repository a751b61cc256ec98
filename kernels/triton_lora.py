"""Multi-adapter LoRA shrink and expand over adapter rows in pool pages, as Triton kernels.

Segmented gather matrix-vector products (SGMV, Punica, Chen et al. 2023, section 4) over the
heterogeneous-rank rows of S-LoRA's unified pool (Sheng et al. 2023, section 5.1): each
segment of consecutive tokens shares one adapter, whose rank rows are read in place through
its page table, whole or in narrow pieces (a page and a slot per piece). Same semantics as
:func:`pagedlora.kernels.lora.lora_shrink_expand`; on CPU tensors the kernels need the Triton
interpreter (see :mod:`.triton_launch`).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from pagedlora.kernels.lora import LoraBatch, PagedRows, SegmentTable, disjoint_groups
from pagedlora.kernels.triton_launch import check_launchable, check_tensor, dot_dtype, tile


@triton.jit
def _piece_offsets(pages_ptr, slots_ptr, row, col, mask, stride_page, stride_slot,
                   piece_width, PIECES: tl.constexpr):
    # Element offsets of columns col of rows row (broadcast against each other, e.g. [1, R]
    # and [K, 1]), each row stored in PIECES pieces of piece_width elements: piece p of row i
    # at page pages[i, p], slot slots[i, p] (row_packing.row_pieces(narrow=True)).
    piece = col // piece_width
    entry = row * PIECES + piece
    return (tl.load(pages_ptr + entry, mask=mask, other=0) * stride_page
            + tl.load(slots_ptr + entry, mask=mask, other=0) * stride_slot
            + (col - piece * piece_width))


# Ints and pointers that vary from step to step are not specialised on (Triton otherwise
# compiles a variant per value equal to 1 or divisible by 16, and per pointer alignment: the
# segment tables are slices of one step buffer, tmp's row stride is the step's largest rank).
@triton.jit(do_not_specialize=["split_k", "stride_tmp"],
            do_not_specialize_on_alignment=["pages_ptr", "slots_ptr", "seg_ptr", "scale_ptr"])
def _shrink_kernel(x_ptr, a_ptr, pages_ptr, slots_ptr, seg_ptr, scale_ptr, tmp_ptr,
                   in_features, piece_width, split_k, stride_xt, stride_page, stride_slot,
                   stride_tmp, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   PIECES: tl.constexpr, DOT: tl.constexpr):
    # Program (segment, token tile, rank tile x k split): tmp[tokens, ranks] (+)= scale *
    # x[tokens, k range] @ A[ranks, k range]^T, A's rows gathered from their pages (each
    # row whole, or in PIECES pieces of piece_width elements with a page and slot each).
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_r = tl.program_id(2) // split_k
    pid_k = tl.program_id(2) % split_k
    start = tl.load(seg_ptr + 4 * seg)
    end = tl.load(seg_ptr + 4 * seg + 1)
    col = tl.load(seg_ptr + 4 * seg + 2)
    rank = tl.load(seg_ptr + 4 * seg + 3) - col
    if start + pid_m * BLOCK_M >= end or pid_r * BLOCK_R >= rank:
        return
    tok = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = tok < end
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rank
    if PIECES == 1:
        rows = (tl.load(pages_ptr + col + r, mask=r_ok, other=0) * stride_page
                + tl.load(slots_ptr + col + r, mask=r_ok, other=0) * stride_slot)  # [BLOCK_R]
    acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k0 in range(pid_k * BLOCK_K, in_features, BLOCK_K * split_k):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < in_features
        x = tl.load(x_ptr + tok[:, None] * stride_xt + k[None, :],
                    mask=tok_ok[:, None] & k_ok[None, :], other=0.0)          # [M, K]
        mask = r_ok[None, :] & k_ok[:, None]
        if PIECES == 1:
            at = rows[None, :] + k[:, None]                                   # [K, R]
        else:
            at = _piece_offsets(pages_ptr, slots_ptr, (col + r)[None, :], k[:, None], mask,
                                stride_page, stride_slot, piece_width, PIECES)
        a = tl.load(a_ptr + at, mask=mask, other=0.0)                          # [K, R]
        acc += tl.dot(x.to(DOT), a.to(DOT), input_precision="ieee")
    acc *= tl.load(scale_ptr + seg)
    out = tmp_ptr + tok[:, None] * stride_tmp + r[None, :]
    if split_k == 1:  # a uniform branch (split_k is not specialised on)
        tl.store(out, acc, mask=tok_ok[:, None] & r_ok[None, :])
    else:  # partial sums in any order: float32 results vary in the last bits between runs
        tl.atomic_add(out, acc, mask=tok_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["stride_tmp"],
            do_not_specialize_on_alignment=["pages_ptr", "slots_ptr", "seg_ptr"])
def _expand_kernel(tmp_ptr, b_ptr, pages_ptr, slots_ptr, seg_ptr, y_ptr,
                   out_features, piece_width, stride_tmp, stride_page, stride_slot, stride_yt,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   PIECES: tl.constexpr, DOT: tl.constexpr):
    # Program (segment, token tile, column tile): y[tokens, cols] += tmp[tokens, :rank] @
    # B^T[:rank, cols], B^T's rows gathered from their pages (whole or in PIECES pieces, as
    # in the shrink); one rounding to y's dtype.
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(seg_ptr + 4 * seg)
    end = tl.load(seg_ptr + 4 * seg + 1)
    col = tl.load(seg_ptr + 4 * seg + 2)
    rank = tl.load(seg_ptr + 4 * seg + 3) - col
    if start + pid_m * BLOCK_M >= end:
        return
    tok = start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_ok = tok < end
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        t = tl.load(tmp_ptr + tok[:, None] * stride_tmp + r[None, :],
                    mask=tok_ok[:, None] & r_ok[None, :], other=0.0)          # [M, R]
        mask = r_ok[:, None] & n_ok[None, :]
        if PIECES == 1:
            at = (tl.load(pages_ptr + col + r, mask=r_ok, other=0) * stride_page
                  + tl.load(slots_ptr + col + r, mask=r_ok, other=0) * stride_slot)[:, None] \
                + n[None, :]                                                  # [R, N]
        else:
            at = _piece_offsets(pages_ptr, slots_ptr, (col + r)[:, None], n[None, :], mask,
                                stride_page, stride_slot, piece_width, PIECES)
        b = tl.load(b_ptr + at, mask=mask, other=0.0)                          # [R, N]
        acc += tl.dot(t.to(DOT), b.to(DOT), input_precision="ieee")
    out = y_ptr + tok[:, None] * stride_yt + n[None, :]
    mask = tok_ok[:, None] & n_ok[None, :]
    y = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def segment_tensors(batch: LoraBatch, num_tokens: int, device: torch.device) -> SegmentTable:
    """The segments of ``batch`` as device tensors (one blocking copy; the model runner's
    batches carry theirs, built once per step, in ``batch.tables``).

    Raises:
        ValueError: a segment outside the batch's tokens or rows (named by index).
    """
    num_rows = batch.a.pages.shape[0]
    for i, s in enumerate(batch.segments):
        if not (0 <= s.start <= s.end <= num_tokens and 0 <= s.col_start <= s.col_end
                <= num_rows):
            raise ValueError(f"segment {i} {s} exceeds the {num_tokens} tokens or the "
                             f"{num_rows} rows of the batch")
    table = torch.tensor([(s.start, s.end, s.col_start, s.col_end) for s in batch.segments],
                         dtype=torch.int64, device=device)
    scales = torch.tensor([s.scale for s in batch.segments], dtype=torch.float32, device=device)
    return SegmentTable(batch.segments, table, scales,
                        max(s.col_end - s.col_start for s in batch.segments),
                        max(s.end - s.start for s in batch.segments))


def _check_rows(name: str, rows: PagedRows, view: torch.Tensor, num_rows: int,
                width: int) -> int:
    """Checks a batch's page tables against ``view``, the pool as rows of the stored width,
    and the ``width`` of the matrix's rows; returns the pieces per row (1: whole rows).

    Raises:
        ValueError: naming what disagrees.
    """
    check_tensor(f"{name}_view", view, ndim=3, dtype=view.dtype, device=view.device)
    pieces = 1 if rows.pages.dim() == 1 else rows.pages.shape[1]
    for part in ("pages", "slots"):
        t = getattr(rows, part)
        check_tensor(f"batch.{name}.{part}", t, ndim=rows.pages.dim(), dtype=torch.int64,
                     device=view.device, contiguous=True)
        if t.shape[0] != num_rows or t.shape[1:] != rows.pages.shape[1:]:
            raise ValueError(f"batch.{name}.{part} is {tuple(t.shape)}, batch.{name}.pages "
                             f"{tuple(rows.pages.shape)}, batch.a {num_rows} rows")
    if view.shape[2] * pieces != width:
        raise ValueError(f"{name}_view's rows are {view.shape[2]} wide: {pieces} piece(s) of "
                         f"them do not make the {width}-wide rows of {name}")
    return pieces


def lora_shrink(x: torch.Tensor, batch: LoraBatch, a_view: torch.Tensor,
                segment_table: SegmentTable | None = None) -> torch.Tensor:
    """Shrink: ``tmp[t, j] = scale_s * x[t] @ A_s[j]`` for token t of segment s, ``j < r_s``.

    Args:
        x: ``[T, in_features]`` input of the projection, the pool's dtype, unit last stride.
        batch: the step's rows and segments for this module (token_scale is not read).
        a_view: ``[num_pages, rows_per_page, width]`` pool view for lora_A rows: ``width`` is
            ``in_features`` for whole rows (``batch.a.pages`` ``[r]``), ``in_features / P``
            for rows in ``P`` narrow pieces (``[r, P]``, see
            :func:`pagedlora.pool.UnifiedPool.stored_rows`).
        segment_table: the segments as tensors, if already built (see :func:`segment_tensors`).
    Returns:
        ``[T, max_rank]`` float32 (max_rank: the largest segment rank); row t's first r_s
        columns are set for tokens in segments, the rest is undefined. When the reduction is
        split (few programs over a long ``in_features``, as in decode) partial sums are added
        atomically in no fixed order: equal to a sequential sum within float32 rounding,
        not bitwise reproducible between runs.
    Raises:
        ValueError: a shape, dtype, device or stride the kernel cannot take (named).
    """
    device = a_view.device
    check_tensor("x", x, ndim=2, dtype=a_view.dtype, device=device)
    num_tokens, in_features = x.shape
    pieces = _check_rows("a", batch.a, a_view, batch.a.pages.shape[0], in_features)
    check_launchable(_shrink_kernel, device)
    seg = segment_table or segment_tensors(batch, num_tokens, device)
    table, scales, max_rank, max_len = seg.table, seg.scale, seg.max_rank, seg.max_len
    block_m, block_r, block_k = tile(max_len), tile(max_rank), 128
    programs = len(seg.segments) * triton.cdiv(max_len, block_m) * triton.cdiv(max_rank,
                                                                                  block_r)
    # Few programs over a long reduction (decode, small ranks) leave most of a GPU idle:
    # split the reduction over in_features and add the partial sums atomically. Their order
    # is not fixed, so tmp (float32) may differ in its last bits from run to run and with the
    # batch's shape: not bitwise deterministic (documented in the docstring; the tests
    # compare with tolerances, and greedy tokens against PEFT).
    split_k = max(1, min(triton.cdiv(in_features, block_k) // 2, 64 // programs))
    tmp = (torch.zeros if split_k > 1 else torch.empty)(num_tokens, max_rank,
                                                         dtype=torch.float32, device=device)
    grid = (len(seg.segments), triton.cdiv(max_len, block_m),
            triton.cdiv(max_rank, block_r) * split_k)
    _shrink_kernel[grid](
        x, a_view, batch.a.pages, batch.a.slots, table, scales, tmp, in_features,
        a_view.shape[2], split_k, x.stride(0), a_view.stride(0), a_view.stride(1), tmp.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, PIECES=pieces,
        DOT=dot_dtype(x.dtype, _shrink_kernel))
    return tmp


def lora_expand(y: torch.Tensor, tmp: torch.Tensor, batch: LoraBatch, b_view: torch.Tensor,
                segment_table: SegmentTable | None = None) -> None:
    """Expand, in place: ``y[t] += tmp[t, :r_s] @ B_s^T`` for token t of segment s (tmp rounded
    to y's dtype first when compiled, as an unfused shrink then expand would).

    Args:
        y: ``[T, out_features]`` output of the base projection, the pool's dtype, updated.
        tmp: ``[T, max_rank]`` float32 from :func:`lora_shrink`.
        batch: the step's rows and segments for this module.
        b_view: ``[num_pages, rows_per_page, width]`` pool view for lora_B^T rows, whole or
            in pieces as ``a_view`` in :func:`lora_shrink`.
        segment_table: the segments as tensors, if already built (see :func:`segment_tensors`).
    Raises:
        ValueError: a shape, dtype, device or stride the kernel cannot take (named).
    """
    device = b_view.device
    check_tensor("y", y, ndim=2, dtype=b_view.dtype, device=device)
    check_tensor("tmp", tmp, ndim=2, dtype=torch.float32, device=device)
    num_tokens, out_features = y.shape
    pieces = _check_rows("b", batch.b, b_view, batch.a.pages.shape[0], out_features)
    if tmp.shape[0] != num_tokens:
        raise ValueError(f"y is {tuple(y.shape)}, tmp {tuple(tmp.shape)}")
    check_launchable(_expand_kernel, device)
    seg = segment_table or segment_tensors(batch, num_tokens, device)
    block_m, block_n = tile(seg.max_len), 128
    grid = (len(seg.segments), triton.cdiv(seg.max_len, block_m), triton.cdiv(out_features,
                                                                             block_n))
    _expand_kernel[grid](
        tmp, b_view, batch.b.pages, batch.b.slots, seg.table, y, out_features,
        b_view.shape[2], tmp.stride(0), b_view.stride(0), b_view.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=tile(tmp.shape[1]), PIECES=pieces,
        DOT=dot_dtype(y.dtype, _expand_kernel))


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch,
                       a_view: torch.Tensor, b_view: torch.Tensor) -> None:
    """Multi-adapter LoRA, in place: ``y[t] += sum_s scale_s * (x[t] @ A_s^T) @ B_s^T`` over
    the segments s holding token t (one for a plain adapter, one per adapter of a mix, none
    for base tokens).

    :func:`lora_shrink` then :func:`lora_expand` (SGMV, Punica section 4; rank-heterogeneous
    rows from the unified pool, S-LoRA section 5.1); rows are read in place from their pages.
    Segments that overlap (a mix's tokens) run in successive launches over disjoint groups
    (:func:`disjoint_groups`), each adding its adapters' deltas to ``y``.

    Args:
        y: ``[T, out_features]`` output of the base projection, updated in place.
        x: ``[T, in_features]`` input of the projection, same dtype as ``y``.
        batch: the step's rows and segments for this module.
        a_view, b_view: pool views for lora_A and lora_B^T rows, as in :func:`lora_shrink`
            and :func:`lora_expand` (rows whole or in narrow pieces).
    Raises:
        ValueError: ``x``, ``y`` and ``batch.token_scale`` disagree on the number of tokens;
            a shape, dtype, device or stride the kernels cannot take (named).
    """
    if x.shape[0] != y.shape[0] or (batch.token_scale is not None
                                    and batch.token_scale.shape[0] != x.shape[0]):
        raise ValueError(f"x has {x.shape[0]} tokens, y {y.shape[0]}, token_scale "
                         f"{None if batch.token_scale is None else batch.token_scale.shape[0]}")
    if not batch.segments or x.shape[0] == 0:
        return
    tables = batch.tables
    if tables is None:  # built here, one blocking copy per group
        groups = disjoint_groups(batch.segments)
        tables = [segment_tensors(batch if len(groups) == 1 else
                                  dataclasses.replace(batch, segments=g), x.shape[0], y.device)
                  for g in groups]
    for table in tables:
        part = batch if table.segments is batch.segments else dataclasses.replace(
            batch, segments=table.segments)
        lora_expand(y, lora_shrink(x, part, a_view, table), part, b_view, table)


def lora_shrink_grouped(x: torch.Tensor, batch: LoraBatch, a_view: torch.Tensor
                        ) -> torch.Tensor:
    """:func:`lora_shrink` of each of the batch's disjoint groups (:func:`disjoint_groups`;
    one without mixes), stacked for one collective: a tensor-parallel rank all-reduces the
    result before :func:`lora_expand_grouped` (S-LoRA section 6).

    Args:
        x, batch, a_view: as :func:`lora_shrink`.
    Returns:
        ``[G, T, max_rank]`` float32, group g's shrink in ``[g]`` (zero past its ranks).
    Raises:
        ValueError: as :func:`lora_shrink`.
    """
    groups = disjoint_groups(batch.segments)
    max_rank = max(s.col_end - s.col_start for s in batch.segments)
    out = torch.zeros(len(groups), x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    for g, segments in enumerate(groups):
        part = batch if len(groups) == 1 else dataclasses.replace(batch, segments=segments)
        tmp = lora_shrink(x, part, a_view)
        out[g, :, :tmp.shape[1]] = tmp
    return out


def lora_expand_grouped(y: torch.Tensor, shrunk: torch.Tensor, batch: LoraBatch,
                        b_view: torch.Tensor) -> None:
    """:func:`lora_expand` of each group of :func:`lora_shrink_grouped`'s result, in place.

    Raises:
        ValueError: as :func:`lora_expand`.
    """
    groups = disjoint_groups(batch.segments)
    for g, segments in enumerate(groups):
        part = batch if len(groups) == 1 else dataclasses.replace(batch, segments=segments)
        lora_expand(y, shrunk[g], part, b_view)
