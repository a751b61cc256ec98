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
