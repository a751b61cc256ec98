"""KV write and paged attention over pool pages (torch reference, the CPU path)."""

from __future__ import annotations

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


def paged_attention(q: torch.Tensor, kv_pages: torch.Tensor, block_tables: torch.Tensor,
                    q_start: torch.Tensor, q_lens: torch.Tensor, ctx_lens: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of new tokens over their sequence's K/V read through block tables.

    For sequence b with ``n = q_lens[b]`` new tokens and ``c = ctx_lens[b]`` tokens in the cache
    (the new ones included), query i sits at position ``c - n + i`` and attends to keys
    ``0 .. c - n + i``: ``out = softmax(scale * q K^T + causal mask) V``, with grouped-query
    heads (GQA). Covers decode (n = 1), prefill, chunked prefill and cached prefixes alike.

    Args:
        q: ``[T, num_heads, head_dim]`` queries of the whole flattened batch.
        kv_pages: ``[num_pages, 2, block_size, num_kv_heads, head_dim]`` contiguous view of
            the pool (K then V in each page).
        block_tables: ``[B, max_blocks]`` int64 page of each block of each sequence (padding
            entries may name any page; they are masked).
        q_start: ``[B]`` int64 index in ``q`` of each sequence's first new token.
        q_lens: ``[B]`` int64 new tokens per sequence (>= 1).
        ctx_lens: ``[B]`` int64 tokens per sequence in the cache, new ones included.
        scale: softmax scale, usually ``head_dim ** -0.5``.
    Returns:
        ``(token_index, out)``: ``[N]`` int64 indices into ``q`` of the new tokens and
        ``[N, num_heads, head_dim]`` their attention outputs, ``N = q_lens.sum()``.
    """
    num_seqs, max_blocks = block_tables.shape
    _, _, block_size, num_kv_heads, head_dim = kv_pages.shape
    max_q = int(q_lens.max())
    ar = torch.arange(max_q, device=q.device)
    valid = ar[None, :] < q_lens[:, None]                                # [B, Q]
    token_index = torch.where(valid, q_start[:, None] + ar[None, :], 0)  # [B, Q]
    q_pos = torch.where(valid, (ctx_lens - q_lens)[:, None] + ar[None, :], 0)
    # Whole pages (K and V) in one row gather of the contiguous pool: much cheaper on the CPU
    # than advanced indexing into the strided K and V halves separately.
    pages = kv_pages.flatten(1).index_select(0, block_tables.flatten())
    pages = pages.view(num_seqs, max_blocks, 2, block_size, num_kv_heads, head_dim)
    keys = pages[:, :, 0].flatten(1, 2)                                 # [B, S, KVH, D]
    values = pages[:, :, 1].flatten(1, 2)
    key_pos = torch.arange(max_blocks * block_size, device=q.device)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]                   # [B, Q, S]
    out = F.scaled_dot_product_attention(
        q[token_index].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=True)           # [B, H, Q, D]
    out = out.transpose(1, 2)[valid]                                     # [N, H, D]
    return token_index[valid], out
