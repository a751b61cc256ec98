"""Helpers shared by the tests: random models and adapters, and a step-by-step engine driver.

Importable as ``support`` (pyproject sets ``pythonpath = ["tests"]`` for pytest).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedlora import Engine, SamplingParams

VOCAB = 49152
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


# The tiny model's projections: module -> (parent, in_features, out_features).
TINY_MODULES = {"q_proj": ("self_attn", 64, 64), "k_proj": ("self_attn", 64, 32),
                "v_proj": ("self_attn", 64, 32), "o_proj": ("self_attn", 64, 64),
                "gate_proj": ("mlp", 64, 176), "up_proj": ("mlp", 64, 176),
                "down_proj": ("mlp", 176, 64)}
PEFT_PREFIX = "base_model.model.model.layers"


def write_peft_dir(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    """A PEFT LoRA directory written by hand: ``adapter_config.json`` (LORA, bias none, and
    ``config``) and ``adapter_model.safetensors`` holding ``tensors``."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "bias": "none", "task_type": "CAUSAL_LM", **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, path / "adapter_model.safetensors")
    return path


def write_random_lora(path: Path, *, r: int, target_modules: list[str], seed: int,
                      num_layers: int = 2) -> Path:
    """A random rank-``r`` LoRA of the tiny model, written directly as safetensors (a
    thousand take about a second, unlike PEFT's ``save_pretrained``); ``lora_alpha = 2r``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(num_layers):
        for module in target_modules:
            parent, in_f, out_f = TINY_MODULES[module]
            key = f"{PEFT_PREFIX}.{layer}.{parent}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) / r**0.5
    return write_peft_dir(path, tensors, r=r, lora_alpha=2 * r, target_modules=target_modules)


@torch.inference_mode()
def peft_greedy(base, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of HF ``base`` with the PEFT adapter in ``adapter_dir`` (None: the
    base alone). The adapter is injected and then unloaded again, so one base model serves
    any number of adapters."""
    from peft import PeftModel

    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
    try:
        out = model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                             max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                             pad_token_id=0)
    finally:
        if adapter_dir is not None:
            model.unload()
    return out[0, len(prompt):].tolist()


def random_prompt(length: int, seed: int) -> list[int]:
    """Token ids in [3, VOCAB): no bos/eos/pad of the tiny model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def save_random_llama(out: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Saves a random LlamaForCausalLM (float32) with the default model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def save_random_adapter(model_dir: Path, out: Path, *, r: int, target_modules: list[str],
                        seed: int, **lora_kwargs) -> Path:
    """Saves a PEFT LoRA adapter with random A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=lora_kwargs.pop("lora_alpha", 2 * r),
                        target_modules=target_modules, init_lora_weights=False,
                        task_type="CAUSAL_LM", **lora_kwargs)
    get_peft_model(base, config).save_pretrained(out)
    return out


@dataclass
class Drive:
    """What :func:`drive` saw: requests by tag, and per step ``(tag, adapter, new, computed)``."""

    requests: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    num_compared: int = 0
    max_err: float = 0.0

    def mixed_steps(self) -> list:
        """Steps holding a decode (one new token after a prefill) and a prefill together."""
        return [s for s in self.steps if any(n == 1 and c > 0 for _, _, n, c in s)
                and any(n > 1 for _, _, n, _ in s)]

    def chunked(self, tag) -> list[int]:
        """New-token counts of the steps that computed ``tag``'s prompt."""
        plen = len(self.requests[tag].prompt_token_ids)
        return [n for s in self.steps for t, _, n, c in s if t == tag and c < plen]


# -- how close two correct implementations' logits can be --------------------------------------
#
# Two correct fp32 forward passes (ours, HF's) differ only by rounding, and rounding depends on the
# order of every sum: GEMM blocking, fused or separate q/k/v, the attention kernel, the CPU's
# vector width. A dot product of n terms summed in float32 (unit roundoff u = 2**-24) is off by
# about u * sqrt(n) of its magnitude, with high probability (Higham and Mary 2019, "A new approach
# to probabilistic rounding error analysis"; sqrt(n) rather than the worst case n because the
# errors' signs are random). The longest sum in a layer is down_proj's (d_ff terms); the L layers'
# errors enter the residual stream independently and add in quadrature. So one implementation's
# logits row is off from the exact one by about
#     kappa * u * sqrt(L * d_ff) * max|logit|                    (one "unit" below)
# where kappa is how much the network amplifies a perturbation. Measured on a 2-core AMD EPYC
# (AVX-512, no AMX), worst logits row (tests/test_tolerance.py prints these), tiny random Llama
# (2 layers, d_ff 176, weights drawn with std 0.2: a large kappa) / SmolLM2-135M (30 layers,
# d_ff 1536): HF float32 against HF float64 2.5 / 0.31 units; against HF float32 computed
# another way: every Linear summing its inputs in 3 chunks 5.5 / 0.18, eager instead of SDPA
# attention 0.8 / 0.21, 2 threads instead of 1 0.6 / 0.16, q/k/v and gate/up fused 0.4 / 0.07.
# Ours against float64 1.4 / 0.39 (0.48 with 2 threads), against HF float32 3.0 / 0.71;
# ATEN_CPU_CAPABILITY=avx2 or MKL and oneDNN held to AVX2 moved ours by under 0.05 units.
# The allowance is 16 units per implementation (6x the worst seen against float64, 3x the worst
# difference between two HF formulations), so two correct implementations are within 32 units.
# tests/test_tolerance.py checks that HF's own spread stays within half of that on the machine
# the tests run on, and that references with a small real bug (RMSNorm eps x10, a LoRA scale
# x1.001) exceed the whole of it many times over (about 140x and 90x).
# bfloat16 keeps float32 accumulators (GEMMs, softmax and RMSNorm run in float32) but rounds
# each of the 7 projection outputs per layer to 8 significant bits (u = 2**-8), so one unit is
# u * sqrt(7 * L) * max|logit|. HF bf16 against HF fp32 measured 1.6 units (tiny) and 0.73
# (SmolLM2), ours 1.7 and 0.73; ours against HF bf16 0.8 and 0.4. Two correct bf16
# implementations are allowed 4 units apart.
FP32_UNITS = 32
BF16_UNITS = 4


def logits_rtol(config, dtype: torch.dtype = torch.float32) -> float:
    """How far two correct implementations' logits rows may differ, as a fraction of the row's
    largest |logit|, for a model with ``config`` (an HF config) run in ``dtype``; the argument
    and its measurements are in the comment above."""
    layers = config.num_hidden_layers
    if dtype == torch.float32:
        return FP32_UNITS * 2.0**-24 * math.sqrt(layers * config.intermediate_size)
    if dtype == torch.bfloat16:
        return BF16_UNITS * 2.0**-8 * math.sqrt(7 * layers)
    raise ValueError(f"no tolerance derived for {dtype}")


def row_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| over a logits row, as a fraction of the row's largest |ref| (NaN for a
    NaN anywhere, which fails every comparison)."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def logits_within(rtol: float) -> Callable:
    """A :func:`drive` comparison: every logits row within ``rtol`` of the row's scale."""
    def compare(ours, ref, where):
        err = row_error(ours, ref)
        assert err <= rtol, (f"{where}max |ours - reference| = {err:.3g} x max|reference| "
                             f"({ref.abs().max().item():.3g}) > {rtol:.3g}")
        return err
    return compare


def drive(engine: Engine, arrivals: dict[int, list], oracle: Callable, *, max_tokens: int,
          compare: Callable | None = None) -> Drive:
    """Runs the engine one step at a time through its internals (scheduler, model runner),
    comparing every sampled logits row with ``oracle``'s for the same tokens, then appending the
    oracle's greedy token so both sides always see identical sequences.

    Args:
        arrivals: ``step -> [(tag, token_ids, adapter_name)]``: requests added before that step.
        oracle: ``(adapter_name, token_ids) -> [vocab]`` reference logits of the last position.
        max_tokens: output tokens per request.
        compare: ``(ours, ref, where) -> error``, asserting closeness; default
            :func:`logits_within` the model's float32 :func:`logits_rtol`.
    """
    compare = compare or logits_within(logits_rtol(engine.model.config))
    result = Drive()
    tags, adapter_of = {}, {}
    step = 0
    while step <= max(arrivals) or engine.scheduler.has_unfinished():
        for tag, ids, name in arrivals.get(step, []):
            key = None if name is None else engine.adapters.key_of(name)
            r = engine._new_request(ids, key, SamplingParams(max_tokens=max_tokens,
                                                             temperature=0))
            engine.scheduler.add(r)
            assert not r.is_finished, r.error
            result.requests[tag] = r
            tags[r.request_id], adapter_of[r.request_id] = tag, name
        out = engine.scheduler.schedule()
        assert not out.preempted and not out.failed
        assert out.scheduled or not engine.scheduler.has_unfinished(), "no progress"
        result.steps.append([(tags[s.request.request_id], adapter_of[s.request.request_id],
                              s.num_new_tokens, s.request.num_computed_tokens)
                             for s in out.scheduled])
        if out.scheduled:
            reqs, logits = engine.runner.run(out)
            engine.scheduler.update(out)
            assert logits.shape == (len(reqs), engine.model.embed.shape[0])
            assert logits.dtype == torch.float32
            for row, r in zip(logits, reqs, strict=True):
                name = adapter_of[r.request_id]
                ref = oracle(name, r.all_token_ids)
                where = (f"step {step}, request {tags[r.request_id]!r} (adapter {name!r}, "
                         f"{len(r.prompt_token_ids)} prompt + {len(r.output_token_ids)} output "
                         f"tokens): ")
                result.max_err = max(result.max_err, compare(row, ref, where))
                result.num_compared += 1
                r.output_token_ids.append(int(ref.argmax()))
                if len(r.output_token_ids) >= max_tokens:
                    engine.scheduler.finish(r, "length")
        step += 1
    for r in result.requests.values():
        assert len(r.output_token_ids) == max_tokens
        engine._tracked.pop(r.request_id)
    assert_kv_released(engine)
    return result


def assert_kv_released(engine: Engine) -> None:
    """Every KV page is free or an unheld prefix-cache block, and the block tables agree."""
    engine.scheduler.kv.check_invariants(engine.scheduler.running)
    stats = engine.stats()
    assert stats["pages_kv"] == stats["pages_kv_cached"], stats
