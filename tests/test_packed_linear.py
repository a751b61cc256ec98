"""PackedLinear: bfloat16 projections through prepacked oneDNN weights give F.linear's results
bit for bit, float32 ones within float32 rounding of them, and only for the very tensors
packed (a merged copy of a layer is not)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedlora import Engine
from pagedlora.packed_linear import PackedLinear

CPU = torch.device("cpu")
ENABLED = PackedLinear(torch.bfloat16, CPU).enabled
needs_bf16 = pytest.mark.skipif(not ENABLED, reason="this CPU's oneDNN has no bfloat16 GEMMs")


@needs_bf16
@pytest.mark.parametrize("rows", [1, 5, 32, 97])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_is_f_linear_bit_for_bit(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 48, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 48, generator=g).to(torch.bfloat16)
    linear = PackedLinear(torch.bfloat16, CPU)
    linear.pack(w)
    got = linear(x, w, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    assert torch.equal(got, F.linear(x, w, bias))
    assert torch.equal(linear(x[:, :].t().contiguous().t(), w, bias), got)  # strided x
    if with_bias:  # a strided bias (oneDNN reads it densely)
        strided = torch.randn(192, generator=g).to(torch.bfloat16)[::2]
        assert torch.equal(linear(x, w, strided), F.linear(x, w, strided))


@pytest.mark.skipif(not PackedLinear(torch.float32, CPU).enabled, reason="no oneDNN")
@pytest.mark.parametrize("rows", [1, 5, 32, 97])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_float32_is_f_linear_within_rounding(rows, with_bias):
    """float32: oneDNN's GEMM, not MKL's, so another summation order; float64 is the
    reference both are held to."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 300, generator=g)
    bias = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(rows, 300, generator=g)
    linear = PackedLinear(torch.float32, CPU)
    linear.pack(w)
    assert w in linear
    got = linear(x, w, bias)
    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    # |error| of a float32 dot product of 300 unit-scale terms: a few 1e-5 at most
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(F.linear(x, w, bias).double(), want, rtol=0, atol=1e-4)
    assert torch.equal(linear(x[:, :].t().contiguous().t(), w, bias), got)  # strided x
    if with_bias:  # a strided bias (oneDNN reads it densely)
        strided = torch.randn(192, generator=g)[::2]
        torch.testing.assert_close(linear(x, w, strided).double(),
                                   F.linear(x.double(), w.double(), strided.double()),
                                   rtol=0, atol=1e-4)


@needs_bf16
def test_only_the_packed_tensor_uses_its_copy():
    """A merged copy of a layer's weight has the base weight's shape and dtype; it must run
    with its own numbers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    merged = w.clone().add_(1.0)
    x = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    linear = PackedLinear(torch.bfloat16, CPU)
    linear.pack(w)
    assert torch.equal(linear(x, merged), F.linear(x, merged))
    assert not torch.equal(linear(x, merged), linear(x, w))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_packs_its_projections(tiny_llama_dir, dtype):
    model = Engine(tiny_llama_dir, pool_gb=0.02, dtype=dtype).model
    packed = model.linear._packed
    if not PackedLinear(getattr(torch, dtype), CPU).enabled:
        assert packed == {}
        return
    weights = [w[n] for w in model.layers for n in ("qkv", "o", "gate_up", "down")]
    assert {id(t) for t in [*weights, model.lm_head]} == set(packed)


RIDE_DTYPES = [d for d in (torch.float32, torch.bfloat16) if PackedLinear(d, CPU).enabled]


@pytest.mark.skipif(not RIDE_DTYPES, reason="no oneDNN packing on this CPU")
@pytest.mark.parametrize("dtype", RIDE_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_rows_ride_the_packed_gemm(dtype, with_bias):
    """``ride``: rows asked for ``ride_after`` steps in a row are packed below the weight,
    and the GEMM then gives ``x @ rows^T`` beside the projection; other rows, or none, get
    the projection alone, right whatever rows the packed copy carries."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(96, 40, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype) if with_bias else None
    rows = torch.randn(12, 40, generator=g).to(dtype)
    other = torch.randn(5, 40, generator=g).to(dtype)
    x = torch.randn(9, 40, generator=g).to(dtype)
    # y ~ N(0, 40) (40 products of unit-scale terms): float32 accumulation errs ~1e-5; bf16
    # output rounding is at most half an ulp, 0.0625 for |y| < 32 (5 sigma)
    atol = 1e-4 if dtype == torch.float32 else 0.1

    def want(weight, b=None):
        return F.linear(x.double(), weight.double(), None if b is None else b.double())

    linear = PackedLinear(dtype, CPU, ride_after=2)
    linear.pack(w)
    for step in range(4):
        linear.begin_step()
        y, raw = linear.ride(x, w, rows, bias)
        torch.testing.assert_close(y.double(), want(w, bias), rtol=0, atol=atol)
        assert (raw is None) == (step == 0), step  # asked twice in a row: packed, rides
        if raw is not None:
            assert raw.shape == (9, 12) and raw.dtype == dtype
            torch.testing.assert_close(raw.double(), want(rows), rtol=0, atol=atol)
    # plain calls (a prefill step) see the projection only, and ask nothing
    torch.testing.assert_close(linear(x, w, bias).double(), want(w, bias), rtol=0, atol=atol)
    assert linear.ride(x, w, other, bias)[1] is None  # other rows: not packed at once
    y, raw = linear.ride(x, w, rows, bias)  # the packed ones still ride
    assert raw is not None
    for _ in range(2):  # two steps without LoRA on the weight: packed alone again
        linear.begin_step()
        y, raw = linear.ride(x, w, None, bias)
        assert raw is None
        torch.testing.assert_close(y.double(), want(w, bias), rtol=0, atol=atol)
    assert linear._packed[id(w)].num_rows == 0
    assert linear.ride(x, w, rows, bias)[1] is None  # the count started again


@pytest.mark.skipif(not RIDE_DTYPES, reason="no oneDNN packing on this CPU")
def test_rows_are_packed_for_a_set_that_repeats_only():
    """Two sets alternating step by step are never packed (their asks are not in a row, and
    steps that ride restart the count); a new set every step drops the packed rows after
    ``ride_after`` steps and is not packed itself; packed rows whose set is freed are
    dropped after as many steps."""
    dtype = RIDE_DTYPES[0]
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 24, generator=g).to(dtype)
    x = torch.randn(4, 24, generator=g).to(dtype)
    sets = [torch.randn(6, 24, generator=g).to(dtype) for _ in range(2)]
    linear = PackedLinear(dtype, CPU, ride_after=3)
    linear.pack(w)

    def step(rows):
        linear.begin_step()
        return linear.ride(x, w, rows)[1] is not None

    assert [step(sets[0]) for _ in range(3)] == [False, False, True]
    packed = linear._packed[id(w)]
    assert [step(sets[i % 2]) for i in range(1, 21)] == [False, True] * 10
    assert linear._packed[id(w)] is packed  # never packed again
    churn = [step(torch.randn(6, 24, generator=g).to(dtype)) for _ in range(10)]
    assert churn == [False] * 10
    assert linear._packed[id(w)].num_rows == 0  # dropped at the third step, then left alone
    kept = torch.randn(5, 24, generator=g).to(dtype)
    assert [step(kept) for _ in range(3)] == [False, False, True]
    del kept  # its set is gone: the weak reference is of nothing
    assert [step(None) for _ in range(3)] == [False] * 3
    assert linear._packed[id(w)].num_rows == 0
    # a set that comes while stale rows are dropped keeps its count: packed at its third ask
    assert [step(sets[0]) for _ in range(3)] == [False, False, True]
    assert step(sets[1]) is False
    assert [step(sets[0]) for _ in range(4)] == [True] * 4  # not stale yet: still packed
    newer = torch.randn(6, 24, generator=g).to(dtype)
    assert step(sets[1]) is False  # sets[0] stale after 3 steps without it...
    assert [step(newer) for _ in range(3)] == [False, False, True]  # ...and newer packed


@pytest.mark.skipif(not RIDE_DTYPES, reason="no oneDNN packing on this CPU")
def test_repacks_are_spread_over_steps():
    dtype = RIDE_DTYPES[0]
    g = torch.Generator().manual_seed(8)
    weights = [torch.randn(32, 16, generator=g).to(dtype) for _ in range(3)]
    rows = [torch.randn(4, 16, generator=g).to(dtype) for _ in range(3)]
    x = torch.randn(3, 16, generator=g).to(dtype)
    linear = PackedLinear(dtype, CPU, ride_after=1, repacks_per_step=2)
    off = PackedLinear(dtype, CPU)  # ride_after=0: never
    for w in weights:
        linear.pack(w)
        off.pack(w)
    rode = []
    for _ in range(2):
        linear.begin_step()
        rode.append([linear.ride(x, w, r)[1] is not None for w, r in
                     zip(weights, rows, strict=True)])
    assert rode == [[True, True, False], [True, True, True]]
    assert off.ride(x, weights[0], rows[0])[1] is None
    never_packed = PackedLinear(dtype, CPU, ride_after=1)  # F.linear, no shrink
    assert never_packed.ride(x, weights[0], rows[0])[1] is None
