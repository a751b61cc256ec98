"""BaseFiles: the base model's weights that adapter registration reads, taken from the model's
files on demand by the driver of a tensor-parallel engine (which holds no model)."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from pagedlora.lora_adapter import BaseVocab

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class BaseWeights(Protocol):
    """What the adapter store reads of the base model: :class:`pagedlora.model.LlamaModel`
    in one process, :class:`BaseFiles` on a tensor-parallel driver."""

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """``[out_features, in_features]`` the whole weight of one projection."""

    @property
    def base_vocab(self) -> BaseVocab:
        """The whole embedding and output weights."""


class BaseFiles:
    """The base model's weights in its ``*.safetensors`` files, each read when asked for (one
    tensor at a time, in the engine's dtype, as :class:`~pagedlora.model.LlamaModel` holds
    it) and not kept: DoRA's weight norm ``||W + s B A||`` needs a projection's whole weight
    once per adapter and module at registration (DoRA, Liu et al. 2024, section 4.3: the norm
    is a constant), and a check of an adapter's saved vocabulary copies needs the whole
    embedding; no rank holds either whole under tensor parallelism, and the driver keeps
    none of it between registrations.

    Args:
        model_dir: the model directory the workers read their shards from.
        config: its transformers config (``tie_word_embeddings``).
        dtype: the engine's dtype.
    Raises:
        ValueError: the directory has no safetensors file.
    """

    def __init__(self, model_dir: Path, config, dtype: torch.dtype) -> None:
        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise ValueError(f"model directory {model_dir} has no *.safetensors weights")
        self.dtype = dtype
        self._file_of: dict[str, Path] = {}
        for f in files:
            with safe_open(f, framework="pt") as tensors:
                self._file_of.update(dict.fromkeys(tensors.keys(), f))
        self.tied = getattr(config, "tie_word_embeddings", False) \
            or "lm_head.weight" not in self._file_of

    def read(self, name: str) -> torch.Tensor:
        """The parameter ``name``, whole, in the engine's dtype.

        Raises:
            KeyError: no such parameter in the files (named).
        """
        if name not in self._file_of:
            raise KeyError(f"weight {name!r} is missing from the model files")
        with safe_open(self._file_of[name], framework="pt") as tensors:
            return tensors.get_tensor(name).to(self.dtype)

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """``[out_features, in_features]`` the weight of ``module`` in ``layer``.

        Raises:
            KeyError: an unknown module or a missing weight.
        """
        return self.read(f"model.layers.{layer}.{_PARENT[module]}.{module}.weight")

    @property
    def base_vocab(self) -> BaseVocab:
        """The embedding and output weights (``[vocab_size, hidden]`` each; one tensor when
        tied) as views of the memory-mapped files, in their stored dtype: pages of the file
        cache, read only where an adapter's saved copy is compared with them."""
        embed = self.mapped("model.embed_tokens.weight")
        return BaseVocab(embed, embed if self.tied else self.mapped("lm_head.weight"),
                         self.tied)

    def mapped(self, name: str) -> torch.Tensor:
        """The parameter ``name`` as a read-only-by-convention view of its memory-mapped file
        (copy-on-write: nothing is private memory until written).

        Raises:
            KeyError: no such parameter in the files (named).
        """
        if name not in self._file_of:
            raise KeyError(f"weight {name!r} is missing from the model files")
        path = self._file_of[name]
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_len))[name]
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        start, stop = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        flat = torch.frombuffer(mapping, dtype=dtype, offset=8 + header_len + start,
                                count=(stop - start) // dtype.itemsize)
        return flat.view(entry["shape"])
