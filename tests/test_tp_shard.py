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
                                     "down_proj": (88, 32)}
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


def _batch(form: str, g: torch.Generator) -> tuple[torch.Tensor, LoraBatch, int]:
    """A LoRA batch of 3 adapters (ranks 2, 5, 3) with base tokens between, in one form."""
    in_f, out_f, ranks = 12, 7, (2, 5, 3)
    n = {"dense": 9, "segments": 200, "bgmv": 3}[form]
    starts = [0, n // 3 + 1, 2 * (n // 3) + 1] if form != "bgmv" else [0, 1, 2]
    ends = [s + (n // 3 if form != "bgmv" else 1) for s in starts]
    ends[-1] = min(ends[-1], n)
    a = torch.randn(sum(ranks), in_f, generator=g)
    b = torch.randn(sum(ranks), out_f, generator=g)
    cols, c = [], 0
    for i, r in enumerate(ranks):
        cols.append((i, c, c + r, 0.5 + i))
        c += r
    ranges = list(zip(starts, ends, strict=True))
    scale = LoraBatch.token_scales(cols, ranges, n, dtype=torch.float32, device=a.device)
    none = PagedRows(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    stacked = None
    if form == "bgmv":
        sa, sb = torch.zeros(3, 5, in_f), torch.zeros(3, 5, out_f)
        for k, (_, c0, c1, s) in enumerate(cols):
            sa[k, : c1 - c0], sb[k, : c1 - c0] = a[c0:c1], b[c0:c1] * s
        stacked = (sa, sb)
    batch = LoraBatch.build(none, none, cols, ranges, scale, gathered=(a, b), stacked=stacked)
    return torch.randn(n, in_f, generator=g), batch, out_f


@pytest.mark.parametrize("form", ["dense", "segments", "bgmv"])
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
        stacked = None if batch.stacked is None else (batch.stacked[0][:, :, cols],
                                                      batch.stacked[1], batch.stacked[2])
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
                                               torch.randn(2, 9, generator=g))}
    shared = share(weights)
    storages = {t.untyped_storage().data_ptr() for w in shared.values() for t in (w.a, w.b_t)}
    assert len(storages) == 1 and next(iter(shared.values())).a.is_shared()
    assert share(shared) is shared  # already shared: no copy
    back = SharedWeights.of(shared).weights()
    assert back.keys() == weights.keys()
    for key, w in weights.items():
        assert torch.equal(back[key].a, w.a) and torch.equal(back[key].b_t, w.b_t)


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
