"""The logits tolerance (support.logits_rtol), checked on the machine the tests run on.

Two sides of the argument in support.py: HF's own float32 logits, computed in other equivalent
ways (fp64, eager attention, another summation order, q/k/v fused, 2 threads), stay within half
the tolerance (one implementation's allowance), and references with a small real bug (RMSNorm
eps x10, a LoRA scale x1.001) exceed the whole tolerance, so the comparisons with HF and PEFT
would see such a bug in our code.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from support import FP32_UNITS, logits_rtol, random_prompt, row_error, save_random_adapter
from transformers import AutoModelForCausalLM

# Prompts of 1 to 40 tokens; every position of each is a logits row to compare.
PROMPTS = [random_prompt(n, seed=900 + n) for n in (1, 7, 19, 40)]


def load(model_dir, dtype=torch.float32, **kwargs):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs).eval()


@torch.inference_mode()
def all_logits(model) -> list[torch.Tensor]:
    """``[len(prompt), vocab]`` float64 logits of every position of every prompt."""
    return [model(input_ids=torch.tensor([p])).logits[0].double() for p in PROMPTS]


def worst_row_error(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(row_error(o_row, r_row) for o, r in zip(ours, ref, strict=True)
               for o_row, r_row in zip(o, r, strict=True))


def summed_in_chunks(model, parts: int = 3):
    """Every Linear sums its input features in ``parts`` chunks: another summation order."""
    def forward(self, x):
        bounds = [round(i * x.shape[-1] / parts) for i in range(parts + 1)]
        y = sum(F.linear(x[..., a:b], self.weight[:, a:b])
                for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        return y if self.bias is None else y + self.bias

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.forward = types.MethodType(forward, m)
    return model


def fused(model):
    """q/k/v and gate/up each computed as one GEMM and sliced, as pagedlora does."""
    def slicer(parent, names):
        weight = torch.cat([getattr(parent, n).weight for n in names])
        sizes = [getattr(parent, n).weight.shape[0] for n in names]
        memo = {}
        for i, n in enumerate(names):
            def forward(self, x, i=i):
                if memo.get("x") is not x:
                    memo["x"], memo["y"] = x, F.linear(x, weight).split(sizes, dim=-1)
                return memo["y"][i]
            module = getattr(parent, n)
            module.forward = types.MethodType(forward, module)

    for layer in model.model.layers:
        assert layer.self_attn.q_proj.bias is None  # the Llama models below
        slicer(layer.self_attn, ["q_proj", "k_proj", "v_proj"])
        slicer(layer.mlp, ["gate_proj", "up_proj"])
    return model


def spreads(model_dir) -> dict[str, float]:
    """HF float32 (SDPA, 1 thread) against equivalent computations, worst row, relative."""
    base = load(model_dir)
    ref = all_logits(base)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two_threads = all_logits(base)
    finally:
        torch.set_num_threads(before)
    return {
        "float64": worst_row_error(ref, all_logits(load(model_dir, torch.float64))),
        "eager attention": worst_row_error(ref, all_logits(
            load(model_dir, attn_implementation="eager"))),
        "sums in 3 chunks": worst_row_error(ref, all_logits(summed_in_chunks(load(model_dir)))),
        "fused q/k/v, gate/up": worst_row_error(ref, all_logits(fused(load(model_dir)))),
        "2 threads": worst_row_error(ref, two_threads),
    }


def check_spread_within_half(model_dir):
    rtol = logits_rtol(load(model_dir).config)
    measured = spreads(model_dir)
    print({k: f"{v / rtol * FP32_UNITS:.2f} units" for k, v in measured.items()})
    for name, err in measured.items():
        assert err <= rtol / 2, (f"HF float32 vs {name}: {err:.3g} of the logits' scale, above "
                                 f"one implementation's allowance {rtol / 2:.3g}")


def test_hf_spread_within_half_the_tolerance_tiny(tiny_llama_dir):
    check_spread_within_half(tiny_llama_dir)


@pytest.mark.slow
def test_hf_spread_within_half_the_tolerance_smollm2(default_model_dir):
    check_spread_within_half(default_model_dir)


def test_rmsnorm_eps_x10_exceeds_the_tolerance(tiny_llama_dir):
    model = load(tiny_llama_dir)
    wrong = load(tiny_llama_dir, rms_norm_eps=model.config.rms_norm_eps * 10)
    err = worst_row_error(all_logits(wrong), all_logits(model))
    assert err > 3 * logits_rtol(model.config), err


def test_lora_scale_x1001_exceeds_the_tolerance(tiny_llama_dir, tmp_path):
    """PEFT with every LoRA scaling x1.001 against PEFT as saved: a 0.1% scale error, on a
    random adapter of the kind test_lora_vs_peft serves, is beyond the tolerance."""
    from peft import PeftModel

    d = save_random_adapter(tiny_llama_dir, tmp_path / "a", r=4, target_modules=["q_proj",
                            "v_proj", "down_proj"], seed=5)
    model = PeftModel.from_pretrained(load(tiny_llama_dir), d).eval()
    right = all_logits(model)
    for m in model.modules():
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            m.scaling = {k: v * 1.001 for k, v in m.scaling.items()}
    err = worst_row_error(all_logits(model), right)
    assert err > 3 * logits_rtol(model.config), err
