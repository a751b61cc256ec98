"""KV write and paged attention over pool pages (torch reference, the CPU path)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def write_kv(kv_pages: torch.Tensor, slot_pages: torch.Tensor, slot_offsets: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Scatters new tokens' K and V into pool pages:
    ``kv_pages[page[t], 0, offset[t]] = k[t]`` and ``kv_pages[page[t], 1, offset[t]] = v[t]``.

    Args:
        kv_pages: ``[num_pages, 2, block_size, num_kv_heads, head_dim]`` view of the pool.
        slot_pages: ``[T]`` int64 page of each token (this layer's block page).
        slot_offsets: ``[T]`` int64 slot of each token inside its block.
        k, v: ``[T, num_kv_heads, head_dim]``, the pool's dtype.
    """
    kv_pages[:, 0][slot_pages, slot_offsets] = k
    kv_pages[:, 1][slot_pages, slot_offsets] = v


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors of one group of sequences, built once per step and read by every layer.

    Attributes:
        token_index: ``[B, Q]`` int64 index in the flattened batch of sequence b's i-th new
            token (0 for padding, Q = the longest new-token count).
        valid: ``[B, Q]`` bool, False for padding.
        flat_index: ``[N]`` int64, ``token_index[valid]``: where the outputs go.
        padded_index: ``[N]`` int64, where those tokens are in the padded ``[B * Q]`` layout
            (``valid.flatten().nonzero()``).
        q_start, q_lens, ctx_lens: ``[B]`` int64, as given to :func:`attention_metadata`.
        out_start: ``[B]`` int64 row of sequence b's first new token among the N outputs.
        num_keys: key positions per sequence in the gathered blocks (max_blocks * block_size).
        q_pos: ``[B, Q]`` int64 position of each query in its sequence (0 for padding).
        whole_batch: whether the group's new tokens are all of the batch's, in order
            (``flat_index`` is ``arange(N)``: the queries are ``q`` as it is).
    """

    token_index: torch.Tensor
    valid: torch.Tensor
    flat_index: torch.Tensor
    q_start: torch.Tensor
    q_lens: torch.Tensor
    ctx_lens: torch.Tensor
    out_start: torch.Tensor
    num_keys: int
    q_pos: torch.Tensor
    padded_index: torch.Tensor
    whole_batch: bool = False

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """``[B, 1, Q, S]`` bool, key position s visible to query (b, i): causal, and only the
        sequence's own context (S = ``num_keys``). Built on first use: the Triton kernel and
        the decode path never read it."""
        key_pos = torch.arange(self.num_keys, device=self.q_pos.device)
        return (key_pos[None, None, :] <= self.q_pos[:, :, None])[:, None]

    @property
    def is_decode(self) -> bool:
        """Whether every sequence has one new token (Q = 1)."""
        return self.token_index.shape[1] == 1


def attention_metadata(q_start: torch.Tensor, q_lens: torch.Tensor, ctx_lens: torch.Tensor,
                       num_keys: int, *, max_q_len: int | None = None,
                       flat_index: torch.Tensor | None = None,
                       padded_index: torch.Tensor | None = None,
                       whole_batch: bool = False) -> AttentionMetadata:
    """Builds the padding and the causal positions of a group.

    For sequence b with ``n = q_lens[b]`` new tokens and ``c = ctx_lens[b]`` tokens in the cache
    (the new ones included), query i sits at position ``c - n + i`` and sees keys
    ``0 .. c - n + i``. Covers decode (n = 1), prefill, chunked prefill and cached prefixes.

    Args:
        q_start: ``[B]`` int64 index in the flattened batch of each sequence's first new token.
        q_lens: ``[B]`` int64 new tokens per sequence (>= 1).
        ctx_lens: ``[B]`` int64 tokens per sequence in the cache, new ones included.
        num_keys: key positions per sequence in the gathered blocks (max_blocks * block_size).
        max_q_len: ``max(q_lens)``; flat_index: ``[N]`` int64, the new tokens' indices in the
            flattened batch, sequence after sequence (``token_index[valid]``); padded_index:
            ``[N]`` int64, their places in the padded ``[B * Q]`` layout. A caller that knows
            them from host data passes them all: computed here, each is a device-to-host
            synchronisation on a GPU (reading ``q_lens`` back; indexing with a mask).
        whole_batch: the group's new tokens are all of the batch's, in order
            (:attr:`AttentionMetadata.whole_batch`).
    """
    ar = torch.arange(int(q_lens.max()) if max_q_len is None else max_q_len,
                      device=q_lens.device)
    valid = ar[None, :] < q_lens[:, None]                                # [B, Q]
    token_index = torch.where(valid, q_start[:, None] + ar[None, :], 0)
    q_pos = torch.where(valid, (ctx_lens - q_lens)[:, None] + ar[None, :], 0)
    if flat_index is None:
        flat_index = token_index[valid]
    if padded_index is None:
        padded_index = valid.flatten().nonzero().flatten()
    return AttentionMetadata(token_index=token_index, valid=valid, flat_index=flat_index,
                             q_start=q_start, q_lens=q_lens, ctx_lens=ctx_lens,
                             out_start=q_lens.cumsum(0) - q_lens, num_keys=num_keys,
                             q_pos=q_pos, padded_index=padded_index, whole_batch=whole_batch)


def paged_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of new tokens over their sequence's K/V read through block tables:
    ``out = softmax(scale * q K^T + mask) V`` with grouped-query heads (GQA); the mask and
    positions are those of :func:`attention_metadata`.

    Args:
        q: ``[T, num_heads, head_dim]`` queries of the whole flattened batch.
        kv_pages: ``[num_pages, 2, block_size, num_kv_heads, head_dim]`` contiguous view of
            the pool (K then V in each page).
        block_tables: ``[B, max_blocks]`` int64 page of each block of each sequence (padding
            entries may name any page; they are masked).
        meta: the group's metadata (``max_blocks * block_size`` keys).
        scale: softmax scale, usually ``head_dim ** -0.5``.
    Returns:
        ``[N, num_heads, head_dim]`` outputs of the new tokens, in ``meta.flat_index`` order.
    """
    num_seqs, max_blocks = block_tables.shape
    _, _, block_size, num_kv_heads, head_dim = kv_pages.shape
    # One index_select per half along the page dimension: its output is already the
    # contiguous [B, S, KVH, D] that attention reads. Measured on this project's CPU (32
    # sequences of 5 blocks, SmolLM2 heads): 0.46 ms a layer, against 1.18 ms for gathering
    # whole pages at once and then copying the strided K and V halves out of them.
    index = block_tables.flatten()
    num_keys = max_blocks * block_size
    keys = kv_pages[:, 0].index_select(0, index)                     # [B * W, bs, KVH, D]
    values = kv_pages[:, 1].index_select(0, index)
    # a decode group of the whole batch reads q as it is (no gather of the queries)
    in_place = meta.is_decode and meta.whole_batch
    if meta.is_decode and q.dtype != torch.float32:
        laid = (num_seqs, num_keys, num_kv_heads * head_dim)
        return _decode_by_bmm(q if in_place else q[meta.flat_index], keys.view(laid),
                              values.view(laid), meta, scale)
    shape = (num_seqs, num_keys, num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        (q[:, None] if in_place else q[meta.token_index]).transpose(1, 2),
        keys.view(shape).transpose(1, 2), values.view(shape).transpose(1, 2),
        attn_mask=meta.mask, scale=scale, enable_gqa=True)               # [B, H, Q, D]
    out = out.transpose(1, 2).reshape(-1, out.shape[1], head_dim)        # [B * Q, H, D]
    # one query per sequence: the padded layout is the outputs' order already
    return out if meta.is_decode else out[meta.padded_index]             # [N, H, D]


def _decode_by_bmm(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query per sequence over its gathered keys and values, as two batched GEMMs on the
    gathered tensors as they are (no transposed copies of K or V), the softmax in float32.

    The queries are laid out block-diagonally, ``[B, KVH * D, H]`` with query head h's
    vector in the rows of its own KV head and zeros elsewhere, so that one GEMM against the
    keys as gathered (``[B, S, KVH * D]``) gives every head's scores ``[B, H, S]`` with no
    diagonal to extract; the second GEMM pairs every head with every KV head's values (KVH
    times the arithmetic, which is tiny at decode) and keeps each head's own block. For
    bfloat16 and float16 on the CPU: SDPA's CPU kernel with a mask took 3.6 ms a layer for 32
    decodes of SmolLM2's heads (20-100 tokens of context; one thread, CPU time); two GEMMs per
    KV head group with the transposed copies they need 0.98 ms; both GEMMs over all pairs of
    heads with the scores' diagonal extracted 0.72 ms; this layout 0.18-0.46 against that one's
    0.22-0.60 ms at 32-112 keys (2 threads, 32 sequences, one process). In float32 SDPA is the
    fastest (0.19-0.31 against this layout's 0.23-0.37 ms) and stays; so do prefill groups in
    every dtype (5.2 against 5.7 ms in bfloat16, 32 prompts of 10-40 tokens).

    Args:
        q: ``[B, H, D]`` each sequence's query.
        keys, values: ``[B, S, KVH * D]`` (views of ``[B, S, KVH, D]``).
        meta: the group's (one new token per sequence; ``meta.mask`` hides other positions).
    Returns:
        ``[B, H, D]``.
    """
    num_seqs, num_heads, head_dim = q.shape
    num_keys = values.shape[1]
    num_kv_heads = values.shape[2] // head_dim
    group = num_heads // num_kv_heads
    laid = q.new_zeros(num_seqs, num_kv_heads, head_dim, num_kv_heads, group)
    laid.diagonal(dim1=1, dim2=3).copy_(
        q.view(num_seqs, num_kv_heads, group, head_dim).permute(0, 3, 2, 1))
    scores = torch.bmm(laid.view(num_seqs, num_kv_heads * head_dim, num_heads).transpose(1, 2),
                       keys.transpose(1, 2)).float()                     # [B, H, S]
    scores.mul_(scale).masked_fill_(~meta.mask.view(num_seqs, 1, num_keys), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = torch.bmm(probs, values).view(num_seqs, num_kv_heads, group, num_kv_heads, head_dim)
    return out.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(num_seqs, num_heads,
                                                                     head_dim)
