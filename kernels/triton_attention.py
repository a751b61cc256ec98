"""KV write and paged attention over pool pages as Triton kernels.

Same signatures and semantics as the torch references in :mod:`pagedlora.kernels.paged_attention`.
On CPU tensors they need the Triton interpreter (see :mod:`.triton_launch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedlora.kernels.paged_attention import AttentionMetadata
from pagedlora.kernels.triton_launch import check_launchable, check_tensor, dot_dtype, pow2, tile


@triton.jit(do_not_specialize_on_alignment=["pages_ptr"])  # a layer's row of slot pages
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, pages_ptr, offsets_ptr,
                     stride_kt, stride_vt, stride_page, stride_kv, stride_slot, width,
                     BLOCK: tl.constexpr):
    # One program per token: its K and V (width = num_kv_heads * head_dim contiguous elements)
    # go to slot `offset` of page `page`.
    t = tl.program_id(0).to(tl.int64)
    page = tl.load(pages_ptr + t)
    dst = kv_ptr + page * stride_page + tl.load(offsets_ptr + t) * stride_slot
    for start in range(0, width, BLOCK):
        i = start + tl.arange(0, BLOCK)
        ok = i < width
        tl.store(dst + i, tl.load(k_ptr + t * stride_kt + i, mask=ok), mask=ok)
        tl.store(dst + stride_kv + i, tl.load(v_ptr + t * stride_vt + i, mask=ok), mask=ok)


def write_kv(kv_pages: torch.Tensor, slot_pages: torch.Tensor, slot_offsets: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Scatters new tokens' K and V into pool pages:
    ``kv_pages[page[t], 0, offset[t]] = k[t]`` and ``kv_pages[page[t], 1, offset[t]] = v[t]``.

    Args:
        kv_pages: ``[num_pages, 2, block_size, num_kv_heads, head_dim]`` contiguous view of the
            pool.
        slot_pages: ``[T]`` int64 page of each token (this layer's block page).
        slot_offsets: ``[T]`` int64 slot of each token inside its block.
        k, v: ``[T, num_kv_heads, head_dim]``, the pool's dtype; each token's heads contiguous
            (any token stride).
    Raises:
        ValueError: a shape, dtype, device or stride the kernel cannot take (named).
    """
    num_tokens, num_kv_heads, head_dim = k.shape
    device = kv_pages.device
    check_tensor("kv_pages", kv_pages, ndim=5, dtype=kv_pages.dtype, device=device,
                 contiguous=True)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=3, dtype=kv_pages.dtype, device=device)
        if t.shape != (num_tokens, *kv_pages.shape[3:]) or t.stride(1) != head_dim:
            raise ValueError(f"{name} must be [T, num_kv_heads={kv_pages.shape[3]}, head_dim="
                             f"{kv_pages.shape[4]}] with contiguous heads, got shape "
                             f"{tuple(t.shape)} strides {t.stride()}")
    for name, t in (("slot_pages", slot_pages), ("slot_offsets", slot_offsets)):
        check_tensor(name, t, ndim=1, dtype=torch.int64, device=device)
        if t.shape[0] != num_tokens:
            raise ValueError(f"{name} has {t.shape[0]} entries for {num_tokens} tokens")
    if num_tokens == 0:
        return
    check_launchable(_write_kv_kernel, device)
    width = num_kv_heads * head_dim
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_pages, slot_pages, slot_offsets, k.stride(0), v.stride(0),
        kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2), width,
        BLOCK=min(pow2(width), 1024))


# Not specialised on what varies between steps and layers: the split count and sizes, the
# block tables' row stride (the step's longest table) and pointer (a layer's slice).
@triton.jit(do_not_specialize=["kv_splits", "split_len", "split_rows", "stride_table",
                               "stride_lt"],
            do_not_specialize_on_alignment=["tables_ptr"])
def _paged_attention_kernel(
        q_ptr, kv_ptr, tables_ptr, q_start_ptr, q_lens_ptr, ctx_lens_ptr, out_start_ptr, out_ptr,
        lse_ptr, scale, group, block_size, head_dim, kv_splits, split_len, split_rows,
        stride_qt, stride_qh, stride_page, stride_kv, stride_slot, stride_kvh, stride_table,
        stride_ot, stride_oh, stride_lt,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT: tl.constexpr):
    # Program (b, kvh, tile x split): rows tile*BLOCK_M.. of sequence b's (new token, query
    # head of kv head kvh) pairs, token-major, so a decode's GQA heads share one K/V read.
    # Online softmax over key tiles of BLOCK_N positions, each key's page read from the block
    # table. With kv_splits > 1 (decodes only) the program covers keys [split * split_len,
    # + split_len) and writes its normalized output to rows split * split_rows.. of out, and
    # its log-sum-exp to lse, for the wrapper to combine.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    tile = tl.program_id(2) // kv_splits
    split = tl.program_id(2) % kv_splits
    q_len = tl.load(q_lens_ptr + b)
    if tile * BLOCK_M >= q_len * group:
        return
    ctx_len = tl.load(ctx_lens_ptr + b)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // group
    head = kvh * group + rows % group
    row_ok = tok < q_len
    q_pos = ctx_len - q_len + tok                             # [BLOCK_M] position of the token
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_rows = q_ptr + (tl.load(q_start_ptr + b) + tok) * stride_qt + head * stride_qh
    q = tl.load(q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # keys 0 .. the last valid token's position of this tile
    last_tok = tl.minimum(q_len - 1, (tile * BLOCK_M + BLOCK_M - 1) // group)
    kv_len = tl.minimum(ctx_len - q_len + last_tok + 1, (split + 1) * split_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(split * split_len, kv_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < kv_len
        page = tl.load(tables_ptr + b * stride_table + n // block_size, mask=n_ok, other=0)
        key_rows = page * stride_page + (n % block_size) * stride_slot + kvh * stride_kvh
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(kv_ptr + key_rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_ptr + stride_kv + key_rows[:, None] + d[None, :], mask=kv_mask,
                    other=0.0)
        s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision="ieee") * scale
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
        # finite: every row sees the split's first key (key 0 without splits; a decode sees
        # every key of its context)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision="ieee")
        m_i = m_new
    row = split * split_rows + tl.load(out_start_ptr + b) + tok
    has_keys = l_i > 0  # false only in a split past the sequence's context: acc is 0 there
    l_i = tl.where(has_keys, l_i, 1.0)
    tl.store(out_ptr + (row * stride_ot + head * stride_oh)[:, None] + d[None, :],
             (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if kv_splits > 1:
        tl.store(lse_ptr + row * stride_lt + head,
                 tl.where(has_keys, m_i + tl.log(l_i), float("-inf")), mask=row_ok)


_BLOCK_N = 64  # keys per tile


def _kv_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    """How many key ranges a decode group's programs split into (flash-decoding, Dao et al.
    2023): enough programs to occupy every SM, each range at least 4 key tiles long."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter has no SMs; 8 sends long-context tests down the GPU's path
        sms = 8
    return max(1, min(sms // num_programs, triton.cdiv(max_keys, 4 * _BLOCK_N)))


def paged_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of new tokens over their sequence's K/V read through block tables:
    ``out = softmax(scale * q K^T + mask) V`` with grouped-query heads (GQA); query i of
    sequence b sits at position ``ctx_lens[b] - q_lens[b] + i`` and sees keys up to it. One
    kernel covers decode (one new token), prefill, chunked prefill and cached prefixes.

    Flash-attention style online softmax (Dao et al. 2022) over key tiles gathered from pages
    (PagedAttention, Kwon et al. 2023); the query heads of one KV head are rows of one tile.
    A decode group with too few programs for the GPU also splits the keys into ranges whose
    partial outputs are combined by their log-sum-exp (flash-decoding).

    Args:
        q: ``[T, num_heads, head_dim]`` queries of the whole flattened batch, the pool's dtype;
            unit stride in head_dim.
        kv_pages: ``[num_pages, 2, block_size, num_kv_heads, head_dim]`` contiguous view of
            the pool (K then V in each page).
        block_tables: ``[B, max_blocks]`` int64 page of each block of each sequence (entries
            past a sequence's context are never read).
        meta: the group's metadata (its q_start, q_lens, ctx_lens and out_start are read).
        scale: softmax scale, usually ``head_dim ** -0.5``.
    Returns:
        ``[N, num_heads, head_dim]`` outputs of the new tokens, in ``meta.flat_index`` order.
    Raises:
        ValueError: a shape, dtype, device or stride the kernel cannot take (named).
    """
    device = kv_pages.device
    check_tensor("kv_pages", kv_pages, ndim=5, dtype=kv_pages.dtype, device=device,
                 contiguous=True)
    check_tensor("q", q, ndim=3, dtype=kv_pages.dtype, device=device)
    check_tensor("block_tables", block_tables, ndim=2, dtype=torch.int64, device=device)
    _, _, block_size, num_kv_heads, head_dim = kv_pages.shape
    num_heads = q.shape[1]
    if q.shape[2] != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q is {tuple(q.shape)}: head_dim must be {head_dim} and num_heads a "
                         f"multiple of num_kv_heads={num_kv_heads}")
    num_seqs = block_tables.shape[0]
    for name in ("q_start", "q_lens", "ctx_lens", "out_start"):
        check_tensor(f"meta.{name}", getattr(meta, name), ndim=1, dtype=torch.int64,
                     device=device)
        if getattr(meta, name).shape[0] != num_seqs:
            raise ValueError(f"meta.{name} has {getattr(meta, name).shape[0]} entries for "
                             f"{num_seqs} sequences in block_tables")
    check_launchable(_paged_attention_kernel, device)
    group = num_heads // num_kv_heads
    num_out = meta.flat_index.shape[0]
    rows = meta.token_index.shape[1] * group  # the longest sequence's (token, head) rows
    block_m = tile(rows)
    tiles = triton.cdiv(rows, block_m)
    max_keys = block_tables.shape[1] * block_size
    # Only decodes split: a prefill row may see no key of a later range.
    splits = 1 if meta.token_index.shape[1] > 1 else _kv_splits(
        num_seqs * num_kv_heads * tiles, max_keys, device)
    if splits == 1:
        out = torch.empty(num_out, num_heads, head_dim, dtype=q.dtype, device=device)
        lse = out  # not written
    else:
        out = torch.empty(splits * num_out, num_heads, head_dim, dtype=torch.float32,
                          device=device)
        lse = torch.empty(splits * num_out, num_heads, dtype=torch.float32, device=device)
    _paged_attention_kernel[(num_seqs, num_kv_heads, tiles * splits)](
        q, kv_pages, block_tables, meta.q_start, meta.q_lens, meta.ctx_lens, meta.out_start,
        out, lse, scale, group, block_size, head_dim, splits,
        _BLOCK_N * triton.cdiv(max_keys, _BLOCK_N * splits), num_out,
        q.stride(0), q.stride(1), kv_pages.stride(0), kv_pages.stride(1), kv_pages.stride(2),
        kv_pages.stride(3), block_tables.stride(0), out.stride(0), out.stride(1),
        lse.stride(0), BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_D=pow2(head_dim),
        DOT=dot_dtype(q.dtype, _paged_attention_kernel))
    if splits == 1:
        return out
    weights = lse.view(splits, num_out, num_heads).softmax(0)  # an empty range weighs 0
    return (out.view(splits, num_out, num_heads, head_dim) * weights[..., None]).sum(0).to(
        q.dtype)
