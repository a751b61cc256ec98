"""Our forward pass against HF transformers on the same weights (the numerics oracle).

The engine is driven one step at a time (``add_request`` and ``step``) with a sampler
(``support.OracleSampler``) that compares every row of logits it is given with ``transformers``'
last-position logits for the very same token sequence and returns HF's greedy choice, so both
sides always see identical sequences.
"""

from __future__ import annotations

import pytest
import torch
from support import (
    BF16_UNITS,
    TINY,
    OracleSampler,
    assert_kv_released,
    drive,
    logits_rtol,
    random_prompt,
    randomize_qkv_biases,
    row_error,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedlora import Engine, SamplingParams

# -- helpers ---------------------------------------------------------------------------------------


def load_hf(model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


@torch.inference_mode()
def hf_last_logits(model, token_ids: list[int]) -> torch.Tensor:
    """HF's ``[vocab]`` float32 logits of the last position of ``token_ids`` (no cache)."""
    return model(torch.tensor([token_ids])).logits[0, -1].float()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """HF ``generate`` greedy, never stopping at eos."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens
    return tokens


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    return load_hf(tiny_llama_dir)


@pytest.fixture(scope="module")
def hf_smol(default_model_dir):
    return load_hf(default_model_dir)


# -- tiny random Llama -----------------------------------------------------------------------------


def test_tiny_single_prefill_and_decode(tiny_llama_dir, hf_tiny):
    torch.manual_seed(0)
    engine = Engine(tiny_llama_dir, sampler=OracleSampler(), pool_gb=0.05)
    prompt = random_prompt(13, seed=1)  # 13 + 8 tokens cross the first 16-token block
    d = drive(engine, {0: [("a", prompt, None)]},
              lambda adapter, ids: hf_last_logits(hf_tiny, ids), max_tokens=8)
    assert d.num_compared == 8
    assert d.steps[0] == [("a", None, 13, 0)]  # one prefill step, then decodes
    assert all(s == [("a", None, 1, 13 + i)] for i, s in enumerate(d.steps[1:]))


def test_tiny_detects_a_wrong_reference(tiny_llama_dir, hf_tiny):
    """The comparison can fail: a reference one token off is far beyond the tolerance."""
    engine = Engine(tiny_llama_dir, sampler=OracleSampler(), pool_gb=0.05)
    prompt = random_prompt(9, seed=2)
    with pytest.raises(AssertionError):
        drive(engine, {0: [("a", prompt, None)]},
              lambda adapter, ids: hf_last_logits(hf_tiny, ids[:-1]), max_tokens=2)


def test_tiny_batch_of_different_lengths(tiny_llama_dir, hf_tiny):
    """Several prompts prefilled together, then decoded together; a request arriving later is
    prefilled in the same steps as the others' decodes (block_size 8: many page crossings)."""
    engine = Engine(tiny_llama_dir, sampler=OracleSampler(), pool_gb=0.05, block_size=8)
    arrivals = {
        0: [("a", random_prompt(5, seed=10), None), ("b", random_prompt(17, seed=11), None),
            ("c", random_prompt(8, seed=12), None), ("d", random_prompt(1, seed=13), None)],
        3: [("e", random_prompt(23, seed=14), None)],
        5: [("f", random_prompt(7, seed=15), None), ("g", random_prompt(2, seed=16), None)],
    }
    d = drive(engine, arrivals, lambda adapter, ids: hf_last_logits(hf_tiny, ids), max_tokens=7)
    assert d.num_compared == 7 * 7
    # The first step prefilled four prompts at once.
    assert sorted(n for _, _, n, _ in d.steps[0]) == [1, 5, 8, 17]
    mixed = d.mixed_steps()
    assert len(mixed) >= 2, d.steps  # "e" and "f"/"g" each joined running decodes


def test_tiny_chunked_prefill(tiny_llama_dir, hf_tiny):
    """A prompt longer than max_num_batched_tokens is prefilled in chunks, sharing steps with a
    decoding request; the logits after the last chunk and after each decode match HF."""
    engine = Engine(tiny_llama_dir, sampler=OracleSampler(), pool_gb=0.05,
                    max_num_batched_tokens=12, block_size=8)
    arrivals = {0: [("short", random_prompt(6, seed=20), None)],
                2: [("long", random_prompt(41, seed=21), None)]}
    d = drive(engine, arrivals, lambda adapter, ids: hf_last_logits(hf_tiny, ids), max_tokens=6)
    chunks = d.chunked("long")
    assert len(chunks) >= 4 and sum(chunks) == 41, chunks
    assert max(chunks) <= 12
    assert d.mixed_steps(), d.steps


def test_tiny_generate_matches_hf_generate(tiny_llama_dir, hf_tiny):
    prompts = [random_prompt(n, seed=30 + n) for n in (3, 11, 16, 29)]
    engine = Engine(tiny_llama_dir, sampler=OracleSampler(), pool_gb=0.05)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, sampling_params=sp, progress=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf_tiny, prompt, 16)
    assert_kv_released(engine)


def drive_bf16(model_dir, hf_fp32, arrivals: dict, max_tokens: int):
    """Drives a bf16 engine; each logits row must be about as close to the fp32 reference as
    HF's own bf16 logits are (twice HF's error plus one bf16 unit, for rows where HF's rounding
    happens to be lucky), and within support.logits_rtol(config, bfloat16) of HF bf16."""
    hf_bf16 = load_hf(model_dir, torch.bfloat16)
    engine = Engine(model_dir, sampler=OracleSampler(), pool_gb=0.05, dtype="bfloat16")
    assert engine.pool.tensor.dtype == torch.bfloat16
    rtol = logits_rtol(hf_fp32.config, torch.bfloat16)
    unit = rtol / BF16_UNITS
    seen = {}

    def oracle(adapter, ids):
        seen["ids"] = ids
        return hf_last_logits(hf_fp32, ids)

    def compare(ours, ref32, where):
        ref16 = hf_last_logits(hf_bf16, seen["ids"])
        hf_err, our_err = row_error(ref16, ref32), row_error(ours, ref32)
        assert torch.isfinite(ours).all(), where
        assert our_err <= 2 * hf_err + unit, \
            f"{where}bf16 error vs fp32 {our_err:.4f} of the logits' scale, HF bf16's {hf_err:.4f}"
        diff = row_error(ours, ref16)
        assert diff <= rtol, f"{where}bf16 diff vs HF bf16 {diff:.4f} > {rtol:.4f}"
        return our_err

    return drive(engine, arrivals, oracle, max_tokens=max_tokens, compare=compare)


def test_tiny_bf16(tiny_llama_dir, hf_tiny):
    arrivals = {0: [("a", random_prompt(12, seed=40), None)],
                2: [("b", random_prompt(19, seed=41), None)]}
    assert drive_bf16(tiny_llama_dir, hf_tiny, arrivals, max_tokens=5).num_compared == 10


# -- other members of the Llama family, random and tiny --------------------------------------------

VARIANTS = {
    "llama-untied-mha": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4)),
    "llama-head-dim-32": ("llama", dict(head_dim=32)),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(
        rope_type="linear", factor=2.0, rope_theta=500000.0))),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, rope_theta=500000.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "qwen2-qkv-bias": ("qwen2", dict()),
    "mistral": ("mistral", dict(sliding_window=None)),
}


def save_variant(out, name: str):
    from transformers import AutoConfig

    model_type, overrides = VARIANTS[name]
    torch.manual_seed(3)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # biases are zero-initialized; make them matter
        randomize_qkv_biases(model)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_prefill_and_decode(variant, tmp_path):
    model_dir = save_variant(tmp_path / variant, variant)
    hf = load_hf(model_dir)
    engine = Engine(model_dir, sampler=OracleSampler(), pool_gb=0.05, block_size=8)
    prompt = random_prompt(37, seed=80)
    d = drive(engine, {0: [("a", prompt, None)], 1: [("b", random_prompt(5, seed=81), None)]},
              lambda adapter, ids: hf_last_logits(hf, ids), max_tokens=4)
    assert d.num_compared == 8


# -- SmolLM2-135M-Instruct (the default model, 30 layers, GQA 9/3) --------------------------------


@pytest.mark.slow
def test_smollm2_prefill_decode_and_mixed_batch(default_model_dir, hf_smol):
    """Prefill, decode, a later arrival sharing steps with decodes, and a chunked prefill."""
    engine = Engine(default_model_dir, sampler=OracleSampler(), pool_gb=0.05,
                    max_num_batched_tokens=16)
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = tok("The capital of France is").input_ids
    arrivals = {0: [("text", text, None)],
                2: [("long", random_prompt(27, seed=50), None)]}
    d = drive(engine, arrivals, lambda adapter, ids: hf_last_logits(hf_smol, ids), max_tokens=6)
    assert d.num_compared == 12
    assert len(d.chunked("long")) >= 2
    assert d.mixed_steps(), d.steps


@pytest.mark.slow
def test_smollm2_bf16(default_model_dir, hf_smol):
    arrivals = {0: [("a", random_prompt(9, seed=70), None)],
                1: [("b", random_prompt(14, seed=71), None)]}
    assert drive_bf16(default_model_dir, hf_smol, arrivals, max_tokens=3).num_compared == 6


@pytest.mark.slow
def test_smollm2_generate_matches_hf_generate(default_model_dir, hf_smol):
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = "Name three colors:"
    prompts = [text, random_prompt(6, seed=60)]
    engine = Engine(default_model_dir, sampler=OracleSampler(), pool_gb=0.05)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outs = engine.generate(prompts, sampling_params=sp, progress=False)
    expected_ids = [tok(text).input_ids, prompts[1]]
    for ids, out in zip(expected_ids, outs, strict=True):
        assert out.prompt_token_ids == ids
        assert out.token_ids == hf_greedy(hf_smol, ids, 16)
    assert outs[0].text == tok.decode(outs[0].token_ids, skip_special_tokens=True)
