"""Fused LoRA (kernels/lora.py ``lora_fused``): the modules of one fused base GEMM (q/k/v,
gate/up) shrunk in one GEMM in decode-sized steps, expanded through a block-diagonal lora_B^T
(16-bit weights) or per module (float32), against PEFT on the same weights.

Every sampled logits row is compared with PEFT's (teacher forcing, tests/support.py ``drive``)
within the derived tolerance of the dtype, over steps whose adapters leave some member modules
out (an adapter on q and k only: the block-diagonal rows must still span the whole fused
output), mixed with adapters on every projection and base-model requests; and with the
shrinks riding the base GEMMs (``lora_shrink_in_base_after``), across changes of the set.
"""

from __future__ import annotations

import pytest
import torch
from support import (
    OracleSampler,
    PeftReference,
    drive,
    logits_rtol,
    logits_within,
    model_config,
    random_prompt,
    save_adapters,
)

from pagedlora import Engine
from pagedlora.lora_adapter import TARGET_MODULES

ADAPTERS = {
    "qk": dict(r=4, target_modules=["q_proj", "k_proj"], seed=41),
    "all": dict(r=8, target_modules=list(TARGET_MODULES), seed=42, use_rslora=True),
    "gu": dict(r=16, target_modules=["gate_proj", "up_proj", "o_proj"], seed=43),
    "v": dict(r=2, target_modules=["v_proj", "down_proj"], seed=44),
}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    return save_adapters(tiny_llama_dir, tmp_path_factory.mktemp("fused"), ADAPTERS)


def _oracle_and_engine(tiny_llama_dir, adapter_dirs, dtype, **options):
    """PEFT's last logits row per (adapter, ids), and a torch-kernel engine with the
    adapters added (``options`` passed on)."""
    refs = PeftReference(tiny_llama_dir, adapter_dirs, dtype).models

    @torch.inference_mode()
    def oracle(name, ids):
        return refs[name](input_ids=torch.tensor([ids])).logits[0, -1].float()

    engine = Engine(tiny_llama_dir, pool_gb=0.05, dtype=str(dtype).removeprefix("torch."),
                    max_loras=4, max_lora_rank=16, kernel_backend="torch",
                    sampler=OracleSampler(), **options)
    for name, path in adapter_dirs.items():
        engine.add_adapter(name, path)
    return oracle, engine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_matches_peft(tiny_llama_dir, adapter_dirs, dtype):
    oracle, engine = _oracle_and_engine(tiny_llama_dir, adapter_dirs, dtype)
    layouts = engine.core.runner.lora
    fused = layouts.fused
    seen: list[dict] = []

    def spy(batches, num_tokens):
        out = fused(batches, num_tokens)
        seen.append({key: (len(work.parts), work.b is not None) for key, work in out.items()})
        return out
    layouts.fused = spy
    arrivals = {0: [("qk alone", random_prompt(7, 1), "qk")],
                3: [("all", random_prompt(5, 2), "all"), ("base", random_prompt(60, 3), None),
                    ("gu", random_prompt(4, 4), "gu"), ("v", random_prompt(6, 5), "v"),
                    ("qk again", random_prompt(11, 6), "qk")]}
    with engine:
        result = drive(engine, arrivals, oracle, max_tokens=6,
                       compare=logits_within(logits_rtol(model_config(engine), dtype)))
    assert result.num_compared == 6 * 6
    block_diagonal = dtype != torch.float32
    layers = model_config(engine).num_hidden_layers
    # decode steps of "qk" alone: q and k fused (v left out), nothing on gate/up
    alone = {(n, "qkv"): (2, block_diagonal) for n in range(layers)}
    assert alone in seen, seen
    # with every adapter: all three of q/k/v and both of gate/up in every layer
    together = {**{(n, "qkv"): (3, block_diagonal) for n in range(layers)},
                **{(n, "gate_up"): (2, block_diagonal) for n in range(layers)}}
    assert together in seen, seen
    assert {} in seen  # the prefill step of 87 tokens (past the dense form): per module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrinks_riding_the_base_gemms_match_peft(tiny_llama_dir, adapter_dirs, dtype):
    """``lora_shrink_in_base_after=2``: from the second step of a set of adapters, the fused
    and the o/down shrinks come out of the base GEMMs (rows packed below the base weights);
    when the set changes, the rows packed for the old set are not used, and every logits row
    stays within PEFT's tolerance throughout."""
    oracle, engine = _oracle_and_engine(tiny_llama_dir, adapter_dirs, dtype,
                                        lora_shrink_in_base_after=2)
    linear = engine.model.linear
    if not linear.enabled:
        pytest.skip("no oneDNN packing on this CPU")
    ride = linear.ride
    rode: list[int] = []

    def spy(x, weight, rows, bias=None):
        y, raw = ride(x, weight, rows, bias)
        rode[-1] += raw is not None
        return y, raw

    linear.ride = spy
    begin = linear.begin_step
    linear.begin_step = lambda: (rode.append(0), begin())[1]
    arrivals = {0: [("all", random_prompt(5, 2), "all"), ("gu", random_prompt(4, 4), "gu")],
                4: [("v", random_prompt(6, 5), "v"), ("qk", random_prompt(7, 1), "qk"),
                    ("base", random_prompt(9, 3), None)]}
    with engine:
        result = drive(engine, arrivals, oracle, max_tokens=8,
                       compare=logits_within(logits_rtol(model_config(engine), dtype)))
    assert result.num_compared == 5 * 8
    every = 4 * model_config(engine).num_hidden_layers  # q/k/v, o, gate/up, down per layer
    # steps 0-3: "all" and "gu" (step 0 asks, the rows are packed at step 1); step 4: three
    # arrivals, a new set, whose rows are asked for (the old set's are not used); step 8: "all"
    # and "gu" are done, and "v" and "qk" need q/k/v and down only
    assert rode == [0, every, every, every, 0, every, every, every, 0, every // 2,
                    every // 2, every // 2], rode
