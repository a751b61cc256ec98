"""Tensor parallelism's arithmetic without processes: how a Shard splits weights and adapters,
what it refuses, the LoRA kernels' shrink/expand halves, and adapter weights in shared memory.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from support import TINY
from transformers import LlamaConfig

from pagedlora.kernels.lora import (
    LoraBatch,
    PagedRows,
    Stacked,
    StackedTokens,
    lora_expand,
    lora_shrink,
    lora_shrink_expand,
)
from pagedlora.lora_adapter import ModuleWeights
from pagedlora.model_files import load_weights
from pagedlora.parallel.host_weights import SharedWeights, share
from pagedlora.parallel.shard import COLUMN_PARALLEL, Shard


def config(**overrides) -> SimpleNamespace:
    """The tiny model's shape numbers (what Shard.of reads), without transformers' checks of
    head_dim against hidden_size."""
    return SimpleNamespace(**{"head_dim": None, **TINY, **overrides})


@pytest.mark.parametrize("name, value, size", [
    ("num_attention_heads", 6, 4), ("intermediate_size", 90, 4), ("hidden_size", 66, 4)])
def test_a_dimension_that_does_not_split_evenly_is_refused_naming_both_numbers(name, value,
                                                                               size):
    overrides = {name: value}
    if name == "num_attention_heads":
        overrides["num_key_value_heads"] = 2
    if name == "hidden_size":
        overrides.update(num_key_value_heads=4, head_dim=16)
    with pytest.raises(ValueError, match=f"{name}={value} is not a multiple of "
                                         f"tensor_parallel_size={size}"):
        Shard.of(config(**overrides), 0, size)


def test_kv_heads_neither_a_multiple_nor_a_divisor_are_refused():
    with pytest.raises(ValueError, match="num_key_value_heads=3 is neither a multiple nor a "
                                         "divisor of tensor_parallel_size=2"):
        Shard.of(config(num_attention_heads=6, num_key_value_heads=3, head_dim=16), 0, 2)


def test_fewer_kv_heads_than_ranks_are_replicated_to_the_query_heads_that_use_them():
    # 8 query heads in 2 KV groups (heads 0-3 use KV head 0) over 4 ranks of 2 query heads
    shards = [Shard.of(config(num_attention_heads=8, num_key_value_heads=2, head_dim=8), r, 4)
              for r in range(4)]
    assert [s.q_heads for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(s.num_kv_heads == 1 for s in shards)


def test_vocab_rows_are_split_and_the_last_shard_padded():
    shards = [Shard.of(config(vocab_size=101), r, 2) for r in range(2)]
    assert [s.vocab for s in shards] == [(0, 51), (51, 101)]
    assert {s.vocab_per_rank for s in shards} == {51}


def test_the_shards_of_every_weight_put_back_together_are_the_weights(tiny_llama_dir):
    whole = load_file(tiny_llama_dir / "model.safetensors")
    cfg = LlamaConfig.from_pretrained(tiny_llama_dir)
    parts = [load_weights(tiny_llama_dir, Shard.of(cfg, r, 2)) for r in range(2)]
    for name, w in whole.items():
        ranges = [Shard.of(cfg, r, 2).weight_range(name) for r in range(2)]
        if ranges[0] is None:
            assert all(torch.equal(p[name], w) for p in parts), name
            continue
        dim = ranges[0][0]
        assert parts[0][name].shape[dim] == w.shape[dim] // 2, name
        assert torch.equal(torch.cat([p[name] for p in parts], dim=dim), w), name
    column = {n for n in whole if any(m in n for m in COLUMN_PARALLEL)}
    assert column and all(Shard.of(cfg, 0, 2).weight_range(n)[0] == 0 for n in column)


def test_lora_shards_hold_whole_a_for_column_and_split_a_and_b_for_row_modules():
    cfg = config()
    shards = [Shard.of(cfg, r, 2) for r in range(2)]
    assert shards[0].lora_widths == {"q_proj": (64, 32), "k_proj": (64, 16),
                                     "v_proj": (64, 16), "o_proj": (32, 32),
                                     "gate_proj": (64, 88), "up_proj": (64, 88),
                                     "down_proj": (88, 32), "embed_tokens": (24576, 64),
                                     "lm_head": (64, 24576)}
    # DoRA's scale row: a column-parallel module's output features, a row-parallel one's whole
    assert shards[0].dora_widths == {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 64,
                                     "gate_proj": 88, "up_proj": 88, "down_proj": 64}
    g = torch.Generator().manual_seed(0)
    for module, (in_f, out_f) in shards[0].module_shapes.items():
        a, b_t = torch.randn(3, in_f, generator=g), torch.randn(3, out_f, generator=g)
        x = torch.randn(5, in_f, generator=g)
        pieces = [s.shard_lora(module, a, b_t) for s in shards]
        if module in COLUMN_PARALLEL:  # each rank: x @ A^T @ its B^T columns
            assert all(p[0] is a for p in pieces)
            got = torch.cat([x @ pa.T @ pb for pa, pb in pieces], dim=1)
        else:  # x's columns of each rank, shrunk, summed (the all-reduce), expanded by column
            xs = x.chunk(2, dim=1)
            shrunk = sum(xi @ pa.T for xi, (pa, _) in zip(xs, pieces, strict=True))
            got = torch.cat([shrunk @ pb for _, pb in pieces], dim=1)
        torch.testing.assert_close(got, x @ a.T @ b_t, rtol=1e-5, atol=1e-5)
        scale = torch.randn(out_f, generator=g)
        parts = [s.shard_dora(module, scale) for s in shards]
        whole = torch.cat(parts) if module in COLUMN_PARALLEL else parts[0]
        assert torch.equal(whole, scale) and all(torch.equal(p, parts[0]) for p in parts
                                                 if module not in COLUMN_PARALLEL)


def test_vocabulary_lora_halves_split_by_token_id_and_the_last_rank_is_padded():
    """embed_tokens' lora_A [r, vocab] and lm_head's lora_B^T [r, vocab] by this rank's token
    ids, zero-padded to vocab_per_rank (101 over 2: 51 and 50 + 1); the other halves whole.
    The embedding's delta of each token comes from the one rank that holds its id."""
    shards = [Shard.of(config(vocab_size=101), r, 2) for r in range(2)]
    g = torch.Generator().manual_seed(3)
    a_e, b_e = torch.randn(3, 101, generator=g), torch.randn(3, 64, generator=g)
    ids = torch.tensor([0, 50, 51, 100])
    want = a_e[:, ids].T @ b_e
    got = torch.zeros(4, 64)
    for s in shards:
        pa, pb = s.shard_lora("embed_tokens", a_e, b_e)
        assert pa.shape == (3, 51) and pb is b_e
        lo, hi = s.vocab
        inside = (ids >= lo) & (ids < hi)
        local = (ids - lo).masked_fill(~inside, 0)
        got += (pa[:, local].T @ pb).masked_fill(~inside[:, None], 0)
    torch.testing.assert_close(got, want)
    a_h, b_h = torch.randn(3, 64, generator=g), torch.randn(3, 101, generator=g)
    heads = [s.shard_lora("lm_head", a_h, b_h) for s in shards]
    assert all(pa is a_h and pb.shape == (3, 51) for pa, pb in heads)
    assert torch.equal(heads[1][1][:, 50], torch.zeros(3))  # the padding
    assert torch.equal(torch.cat([pb for _, pb in heads], dim=1)[:, :101], b_h)


def _batch(form: str, g: torch.Generator) -> tuple[torch.Tensor, LoraBatch, int]:
    """A LoRA batch of 3 adapters (ranks 2, 5, 3) with base tokens between, in one form
    ("mix": the dense form with one adapter's tokens also another's, as a mix's are)."""
    in_f, out_f, ranks = 12, 7, (2, 5, 3)
    n = {"dense": 9, "mix": 9, "segments": 200, "bgmv": 3, "bgmv-classes": 6}[form]
    if form == "bgmv":  # one token per adapter
        starts, ends = [0, 1, 2], [1, 2, 3]
    elif form == "bgmv-classes":  # two tokens per adapter (the zero-padded layout)
        starts, ends = [0, 2, 4], [2, 4, 6]
    else:
        starts = [0, n // 3 + 1, 2 * (n // 3) + 1]
        ends = [s + n // 3 for s in starts]
        ends[-1] = min(ends[-1], n)
    a = torch.randn(sum(ranks), in_f, generator=g)
    b = torch.randn(sum(ranks), out_f, generator=g)
    cols, c = [], 0
    for i, r in enumerate(ranks):
        cols.append((i, c, c + r, 0.5 + i))
        c += r
    uses = [[(s, e, 1.0)] for s, e in zip(starts, ends, strict=True)]
    if form == "mix":  # the second adapter also on the first one's tokens, at weight -0.5
        uses[1].insert(0, (starts[0], ends[0], -0.5))
    scale = LoraBatch.token_scales(cols, uses, n, dtype=torch.float32, device=a.device)
    none = PagedRows(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    stacked = None
    if form.startswith("bgmv"):
        # rank classes: all three adapters in one, or (2, 3) and (5,) in two
        classes = [[0, 1, 2]] if form == "bgmv" else [[0, 2], [1]]
        parts = []
        for members in classes:
            r = max(ranks[k] for k in members)
            sa, sb = torch.zeros(len(members), r, in_f), torch.zeros(len(members), r, out_f)
            for j, k in enumerate(members):
                _, c0, c1, s = cols[k]
                sa[j, : c1 - c0], sb[j, : c1 - c0] = a[c0:c1], b[c0:c1] * s
            tokens = StackedTokens.of([uses[k] for k in members], dtype=torch.float32,
                                      device=a.device)
            parts.append(Stacked(sa, sb, tokens))
        stacked = tuple(parts)
    batch = LoraBatch(none, none, LoraBatch.segments_of(cols, uses), scale, (a, b), stacked)
    return torch.randn(n, in_f, generator=g), batch, out_f


@pytest.mark.parametrize("form", ["dense", "mix", "segments", "bgmv", "bgmv-classes"])
def test_shrink_then_expand_equals_the_fused_kernel_and_sums_over_split_inputs(form):
    """What a row-parallel module does: each rank shrinks its columns of x with its columns
    of A; the sum of the shrinks (the all-reduce) expanded equals the whole LoRA."""
    g = torch.Generator().manual_seed(1)
    x, batch, out_f = _batch(form, g)
    want = torch.randn(x.shape[0], out_f, generator=g)
    got = want.clone()
    lora_shrink_expand(want, x, batch, None, None)
    lora_expand(got, lora_shrink(x, batch, None), batch, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # split x and A by columns (the stacked form holds A too)
    half = x.shape[1] // 2
    parts = []
    for cols in (slice(0, half), slice(half, None)):
        a, b = batch.gathered
        stacked = None if batch.stacked is None else tuple(
            Stacked(p.a[:, :, cols], p.b, p.tokens) for p in batch.stacked)
        part = LoraBatch(batch.a, batch.b, batch.segments, batch.token_scale,
                         (a[:, cols], b), stacked)
        parts.append(lora_shrink(x[:, cols].contiguous(), part, None))
    got = torch.zeros_like(want)
    base = torch.zeros_like(want)
    lora_expand(got, parts[0] + parts[1], batch, None)
    lora_shrink_expand(base, x, batch, None, None)
    torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)


def test_shared_weights_are_one_buffer_that_round_trips():
    g = torch.Generator().manual_seed(2)
    weights = {(0, "q_proj"): ModuleWeights(torch.randn(3, 8, generator=g),
                                            torch.randn(3, 5, generator=g)),
               (1, "down_proj"): ModuleWeights(torch.randn(2, 4, generator=g),
                                               torch.randn(2, 9, generator=g),
                                               torch.rand(9, generator=g))}  # DoRA
    shared = share(weights)
    storages = {t.untyped_storage().data_ptr() for w in shared.values() for t in (w.a, w.b_t)}
    assert len(storages) == 1 and next(iter(shared.values())).a.is_shared()
    assert share(shared) is shared  # already shared: no copy
    back = SharedWeights.of(shared).weights()
    assert back.keys() == weights.keys()
    for key, w in weights.items():
        assert torch.equal(back[key].a, w.a) and torch.equal(back[key].b_t, w.b_t)
        assert (back[key].dora is None) == (w.dora is None)
    assert torch.equal(back[(1, "down_proj")].dora, weights[(1, "down_proj")].dora)


def test_a_step_sends_a_sequence_its_new_blocks_only_until_its_table_changes():
    from pagedlora.parallel.messages import SequenceUpdate
    from pagedlora.sampler import RequestSampling
    from pagedlora.sampling_params import SamplingParams
    from pagedlora.step_input import SequenceInput

    blocks = [[1, 2], [3, 4], [5, 6]]
    sampling = RequestSampling(SamplingParams(), 7)

    def seq(table):
        return SequenceInput(0, (9,), 20, tuple(table), None, True, sampling)

    first = SequenceUpdate.of(seq(blocks[:2]), None)
    assert (first.first_block, first.new_blocks, first.sampling) == (0, tuple(blocks[:2]),
                                                                     sampling)
    grown = SequenceUpdate.of(seq(blocks), tuple(blocks[:2]))
    assert (grown.first_block, grown.new_blocks, grown.sampling) == (2, ([5, 6],), None)
    same = SequenceUpdate.of(seq(blocks), tuple(blocks))
    assert (same.first_block, same.new_blocks) == (3, ())
    # preempted and readmitted: a new block object in the middle (even with equal pages)
    redone = [blocks[0], [3, 4], blocks[2]]
    again = SequenceUpdate.of(seq(redone), tuple(blocks))
    assert (again.first_block, again.new_blocks, again.sampling) == (0, tuple(redone), sampling)
    shorter = SequenceUpdate.of(seq(blocks[:1]), tuple(blocks))
    assert shorter.first_block == 0


def test_merged_lora_is_refused_under_tensor_parallelism_naming_both_options():
    from pagedlora import EngineConfig

    with pytest.raises(ValueError, match="merge_policy='auto' is not served with "
                                         "tensor_parallel_size=2"):
        EngineConfig(tensor_parallel_size=2, merge_policy="auto")
    assert EngineConfig(tensor_parallel_size=2).merge_policy == "never"
