"""The torch kernels over pool pages against plain math on contiguous tensors."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pytest
import torch

from pagedlora.kernels.lora import (
    DoraScales,
    LoraBatch,
    LoraSegment,
    PagedRows,
    Stacked,
    StackedTokens,
    dora_rescale,
    lora_shrink_expand,
)
from pagedlora.kernels.paged_attention import attention_metadata, paged_attention, write_kv


def scatter_rows(view: torch.Tensor, rows: torch.Tensor, free: list[int]) -> PagedRows:
    """Writes ``rows`` into random free (page, slot)s of ``view``; returns their page table."""
    rpp = view.shape[1]
    places = free[: rows.shape[0]]
    del free[: rows.shape[0]]
    pages = torch.tensor([p // rpp for p in places])
    slots = torch.tensor([p % rpp for p in places])
    view[pages, slots] = rows
    return PagedRows(pages, slots)


@pytest.mark.parametrize("gathered", [False, True])  # rows read through pages, or given
@pytest.mark.parametrize("num_tokens", [7, 33, 133])  # both the dense and the segmented form
def test_lora_shrink_expand_matches_per_token_math(num_tokens, gathered):
    g = torch.Generator().manual_seed(num_tokens)
    in_f, out_f, ranks = 97, 45, [1, 3, 16, 8]
    pool = torch.zeros(64, 4 * in_f)  # pages of 4 rows of width in_f
    a_view = pool.view(64, 4, in_f)
    b_view = pool[:, : (4 * in_f // out_f) * out_f].view(64, 4 * in_f // out_f, out_f)
    free_a = torch.randperm(64 * 4, generator=g)[:100].tolist()
    # B rows live in other pages than A rows: take pages 40.. for them
    free_b = [40 * b_view.shape[1] + i for i in torch.randperm(24 * b_view.shape[1],
                                                                generator=g).tolist()]
    free_a = [p for p in free_a if p // 4 < 40]
    weights = [(torch.randn(r, in_f, generator=g), torch.randn(r, out_f, generator=g),
                0.5 + i) for i, r in enumerate(ranks)]
    a_rows = [scatter_rows(a_view, a, free_a) for a, _, _ in weights]
    b_rows = [scatter_rows(b_view, b, free_b) for _, b, _ in weights]
    # tokens: a base segment, then adapters 0..3 (zipf-like sizes), then more base tokens
    cuts = [0, num_tokens // 7, num_tokens // 2, num_tokens * 3 // 5, num_tokens * 2 // 3,
            num_tokens * 5 // 6]
    segs, cols, col = [], [], 0
    for i, r in enumerate(ranks):
        cols.append((col, col + r))
        segs.append(LoraSegment(cuts[i + 1], cuts[i + 2], col, col + r, weights[i][2]))
        col += r
    token_scale = torch.zeros(num_tokens, col)
    for s in segs:
        token_scale[s.start:s.end, s.col_start:s.col_end] = s.scale
    batch = LoraBatch(a=PagedRows(torch.cat([r.pages for r in a_rows]),
                                  torch.cat([r.slots for r in a_rows])),
                      b=PagedRows(torch.cat([r.pages for r in b_rows]),
                                  torch.cat([r.slots for r in b_rows])),
                      segments=tuple(segs), token_scale=token_scale)
    if gathered:  # what the model runner hands the CPU kernels; the pages are then not read
        batch = dataclasses.replace(batch, gathered=(
            torch.cat([a for a, _, _ in weights]), torch.cat([b for _, b, _ in weights])))
        a_view, b_view = torch.full_like(a_view, math.nan), torch.full_like(b_view, math.nan)
    x = torch.randn(num_tokens, in_f, generator=g)
    y0 = torch.randn(num_tokens, out_f, generator=g)
    y = y0.clone()
    lora_shrink_expand(y, x, batch, a_view, b_view)
    want = y0.clone()
    for s, (a, b, scale) in zip(segs, weights, strict=True):
        for t in range(s.start, s.end):
            want[t] += scale * (x[t] @ a.t()) @ b
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[: cuts[1]], y0[: cuts[1]]) and torch.equal(y[cuts[5]:], y0[cuts[5]:])


def test_rows_in_narrow_pieces_are_joined_when_read_through_their_page_tables():
    """Rows stored in pieces (``[r, P]`` tables over the view of the piece width) read
    through the page tables, as the kernels do when no rows are handed over: a 60-wide
    lora_A in 3 pieces of 20, a 40-wide lora_B^T and DoRA scale row in 2 pieces of 20."""
    g = torch.Generator().manual_seed(3)
    pool = torch.zeros(12, 100)
    view = pool[:, :100].view(12, 5, 20)            # slots of 20 elements, 5 a page
    spots = torch.randperm(60, generator=g).tolist()

    def store(rows: torch.Tensor, pieces: int) -> PagedRows:
        table = scatter_rows(view, rows.reshape(-1, 20), spots)
        return PagedRows(table.pages.view(-1, pieces), table.slots.view(-1, pieces))
    a, b, scale = (torch.randn(4, 60, generator=g), torch.randn(4, 40, generator=g),
                   torch.rand(1, 40, generator=g) + 0.5)
    batch = LoraBatch(store(a, 3), store(b, 2), (LoraSegment(1, 5, 0, 4, 0.5),),
                      token_scale=torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5])[:, None].expand(5, 4))
    x, y0 = torch.randn(5, 60, generator=g), torch.randn(5, 40, generator=g)
    y = y0.clone()
    lora_shrink_expand(y, x, batch, view, view)
    want = y0.clone()
    want[1:5] += 0.5 * (x[1:5] @ a.t()) @ b
    # the same float32 products as the per-token test above, summed in another order by the
    # BLAS: its tolerance, not torch's default (a last-bit difference per 60-term sum)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    dora = DoraScales(((2, 4, 0),), store(scale, 2))
    dora_rescale(y, None, dora, view)
    want[2:4] *= scale[0]
    torch.testing.assert_close(y, want)


def test_lora_shrink_expand_refuses_mismatched_tokens():
    zero = torch.zeros(1, dtype=torch.long)
    batch = LoraBatch(a=PagedRows(zero, zero), b=PagedRows(zero, zero),
                      segments=(LoraSegment(0, 2, 0, 1, 1.0),), token_scale=torch.ones(2, 1))
    view = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="x has 3 tokens, y 2"):
        lora_shrink_expand(torch.zeros(2, 4), torch.zeros(3, 4), batch, view, view)


# (context already in pages, new tokens) per sequence: decode, prefill, chunked prefill, odd
# lengths in one group; a group of decodes only (bfloat16 takes its own path there)
MIXED_GROUP = [(9, 1), (0, 7), (5, 6), (12, 1), (0, 1)]
DECODE_GROUP = [(9, 1), (0, 1), (12, 1), (30, 1), (3, 1)]


@pytest.mark.parametrize("whole_batch", [False, True])
@pytest.mark.parametrize("shapes", [MIXED_GROUP, DECODE_GROUP], ids=["mixed", "decode"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_paged_attention_matches_contiguous_causal_attention(dtype, atol, shapes, whole_batch):
    """``whole_batch``: the group is the batch's every token in order (the model runner's
    single group), whose decodes read the queries in place; the queries are a column slice
    of q/k/v's output, as in the model."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs, num_pages = 6, 2, 16, 4, 40
    cache = torch.zeros(num_pages, 2, bs, kv_heads, d, dtype=dtype)
    free = torch.randperm(num_pages, generator=g).tolist()
    seqs, q_parts = [], []
    for ctx, new in shapes:
        n = ctx + new
        k = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        v = torch.randn(n, kv_heads, d, generator=g).to(dtype)
        q = torch.randn(new, heads, d, generator=g).to(dtype)
        blocks = [free.pop() for _ in range(math.ceil(n / bs))]
        pages = torch.tensor([blocks[p // bs] for p in range(n)])
        offsets = torch.arange(n) % bs
        write_kv(cache, pages, offsets, k, v)
        seqs.append((ctx, new, k, v, q, blocks))
        q_parts.append(q)
    width = max(len(s[5]) for s in seqs)
    tables = torch.tensor([s[5] + [0] * (width - len(s[5])) for s in seqs])
    q_all = torch.cat(q_parts)
    q_all = torch.cat([q_all, torch.randn_like(q_all)[:, :2]], dim=1)[:, :heads]  # strided
    starts = torch.tensor([0] + [s[1] for s in seqs]).cumsum(0)[:-1]
    meta = attention_metadata(starts, torch.tensor([s[1] for s in seqs]),
                              torch.tensor([s[0] + s[1] for s in seqs]), width * bs,
                              whole_batch=whole_batch)
    got = torch.full_like(q_all, float("nan"))
    got[meta.flat_index] = paged_attention(q_all, cache, tables, meta, d ** -0.5)
    for (ctx, new, k, v, q, _), start in zip(seqs, starts.tolist(), strict=True):
        kk = k.float().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
        vv = v.float().repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * d ** -0.5
        causal = torch.arange(ctx + new)[None, :] <= (ctx + torch.arange(new))[:, None]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        want = torch.einsum("hqk,khd->qhd", probs, vv)
        torch.testing.assert_close(got[start:start + new].float(), want, atol=atol, rtol=atol)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("skip", [None, 4])
@pytest.mark.parametrize("tokens_per_adapter", [[1] * 9, [1, 3, 1, 1, 2, 1, 1, 4, 1]])
def test_bgmv_form_matches_per_token_math(tokens_per_adapter, skip, weighted):
    """The stacked (BGMV) form that the model runner builds for decode batches over many
    adapters: one token each (no scatter), and several tokens for some adapters, with base
    tokens before them, (``skip``) one adapter's tokens left out (it lacks the module), and
    (``weighted``) tokens at weights other than 1 (a mix's)."""
    from pagedlora.lora_layouts import ModuleRows

    g = torch.Generator().manual_seed(len(tokens_per_adapter) + sum(tokens_per_adapter))
    in_f, out_f = 37, 29
    ranks = [1 + (5 * i) % 16 for i in range(len(tokens_per_adapter))]
    scales = [0.25 * (i + 1) for i in range(len(ranks))]
    base = 3  # base-model tokens first, as the runner orders them
    segments, start = [], base
    for i, n in enumerate(tokens_per_adapter):
        segments.append((start, start + n, f"k{i}"))
        start += n
    num_tokens = start
    which = tuple(i for i in range(len(ranks)) if i != skip)
    a_rows = [torch.randn(ranks[i], in_f, generator=g) for i in which]
    b_rows = [torch.randn(ranks[i], out_f, generator=g) for i in which]
    cols, c = [], 0
    for i in which:
        cols.append((i, c, c + ranks[i], scales[i]))
        c += ranks[i]
    zero = torch.zeros(1, dtype=torch.long)
    rows = ModuleRows(PagedRows(zero, zero), PagedRows(zero, zero), tuple(cols),
                      tuple(zip(a_rows, b_rows, strict=True)))
    weights = [0.5 + 0.25 * i if weighted else 1.0 for i in range(len(ranks))]
    uses = [[(*s[:2], weights[i])] for i, s in enumerate(segments)]
    classes = rows.stacked()
    # ranks 1..16: classes 16..4 (each >= a quarter of the largest), 3..1
    assert sorted(len(e) for e, _, _ in classes) == sorted(
        Counter(ranks[i] >= 4 for i in which).values())
    for entries, a, _ in classes:
        assert list(entries) == sorted(entries)
        assert all(a.shape[1] <= 4 * (cols[k][2] - cols[k][1]) for k in entries)
    stacked = tuple(Stacked(a, b, StackedTokens.of([uses[cols[k][0]] for k in entries],
                                                   dtype=torch.float32,
                                                   device=torch.device("cpu")))
                    for entries, a, b in classes)
    batch = LoraBatch(rows.a, rows.b, LoraBatch.segments_of(rows.cols, uses), None,
                      stacked=stacked)
    x = torch.randn(num_tokens, in_f, generator=g)
    y0 = torch.randn(num_tokens, out_f, generator=g)
    qkv = torch.zeros(num_tokens, 2 * out_f)
    y = qkv[:, :out_f]  # strided rows, like q in the fused q/k/v output
    y.copy_(y0)
    lora_shrink_expand(y, x, batch, None, None)
    want = y0.clone()
    for k, i in enumerate(which):
        for t in range(segments[i][0], segments[i][1]):
            want[t] += weights[i] * scales[i] * (x[t] @ a_rows[k].t()) @ b_rows[k]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(y[:base], y0[:base])
    if skip is not None:
        lo, hi = segments[skip][:2]
        assert torch.equal(y[lo:hi], y0[lo:hi])
