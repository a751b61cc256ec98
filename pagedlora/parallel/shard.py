"""Shard: what one rank of a tensor-parallel engine holds of the model and of every adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Megatron-LM's split of a decoder layer (Shoeybi et al. 2019, section 3): the first GEMM of
# each block is split by its output features (column-parallel: attention heads, MLP
# intermediate rows), the second by its input features (row-parallel), so each block needs
# one all-reduce of its [tokens, hidden] output.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
# The vocabulary modules' LoRA halves split by token id (vocab-parallel, as their base rows).
EMBED, HEAD = "embed_tokens", "lm_head"

Range = tuple[int, int]  # [start, stop)


@dataclass(frozen=True, eq=False)
class Shard:
    """One rank's part of a Llama-family model under tensor parallelism over ``size`` ranks.

    Base weights (HF layout ``[out_features, in_features]``), Megatron-LM style:

    - q/k/v (by heads) and gate/up (by intermediate rows): column-parallel, rows
      ``q_heads``/``kv_heads``/``intermediate`` of the weight (and of q/k/v biases);
    - o (by its input heads) and down (by its input intermediate columns): row-parallel, each
      followed by one all-reduce of ``[T, hidden]``;
    - embedding and LM head: vocab-parallel (rows ``vocab``, zero-padded to
      ``vocab_per_rank``): the embedding's lookup is all-reduced (``[T, hidden]``, once per
      step), the LM head's logits gathered to rank 0 (``[S, vocab_per_rank]`` from each rank).
      Replicating them would save those two collectives but cost every rank the whole
      ``vocab x hidden`` matrix, twice when untied: 2 GiB per device for Llama-3-70B's
      128,256 x 8,192 in bf16, which is what tensor parallelism exists to avoid;
    - norms: replicated.

    KV heads: split like the query heads when ``num_key_value_heads`` is a multiple of
    ``size``; when ``size`` is a multiple of it (e.g. one KV head, MQA, over 2 ranks), each
    rank holds one KV head, the one its query heads use, replicated on ``size /
    num_key_value_heads`` ranks (vLLM's ``QKVParallelLinear`` does the same). Anything else is
    refused.

    LoRA follows the base sharding (S-LoRA, Sheng et al. 2023, section 6; vLLM's
    ``ColumnParallelLinearWithLoRA`` and the fully sharded ``RowParallelLinearWithShardedLoRA``):
    for a column-parallel module the whole lora_A ``[r, in]`` and this rank's columns of
    lora_B^T ``[r, out / size]``; for a row-parallel module this rank's columns of lora_A
    ``[r, in / size]`` and its ``hidden`` columns of lora_B^T ``[r, hidden / size]``. So an
    adapter's pages hold different rows on each rank, of the same widths (:attr:`lora_widths`)
    and hence the same page ids. The vocabulary modules follow their vocab-parallel base rows:
    ``embed_tokens``' lora_A ``[r, vocab]`` by this rank's token ids (its lookup adds the
    deltas of its tokens only) with the whole lora_B^T ``[r, hidden]``; ``lm_head``'s whole
    lora_A ``[r, hidden]`` with its token ids' columns of lora_B^T ``[r, vocab]`` (its logits
    columns); both zero-padded to ``vocab_per_rank``. A DoRA module's output scale row
    (``[out]``) is split like the output: a column-parallel module's by this rank's output
    features, a row-parallel module's kept whole (applied after the all-reduce)
    (:attr:`dora_widths`). See :class:`pagedlora.model.LlamaModel` for the communication this
    adds.

    Attributes:
        rank, size: this rank among ``size``.
        num_layers, head_dim, hidden_size: of the whole model.
        num_heads, num_kv_heads: query and KV heads on this rank.
        q_heads, kv_heads: the model's heads this rank holds, ``[start, stop)``.
        intermediate: this rank's MLP intermediate features.
        hidden: the hidden features whose LoRA deltas this rank adds in row-parallel modules.
        vocab: token ids this rank's embedding and LM head rows cover (``stop <= vocab_size``).
        vocab_per_rank: rows of each rank's embedding and LM head shard (the last rank's
            zero-padded when ``vocab_size`` is not a multiple of ``size``).
        vocab_size: the model's vocabulary.
        module_shapes: ``module -> (in_features, out_features)`` of the whole model's decoder
            projections.
    """

    rank: int
    size: int
    num_layers: int
    head_dim: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    q_heads: Range
    kv_heads: Range
    intermediate: Range
    hidden: Range
    vocab: Range
    vocab_per_rank: int
    vocab_size: int
    module_shapes: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, config, rank: int = 0, size: int = 1) -> Shard:
        """Rank ``rank``'s shard of a model with the transformers ``config``.

        Raises:
            ValueError: ``num_attention_heads``, ``intermediate_size`` or ``hidden_size`` not a
                multiple of ``size``, or ``num_key_value_heads`` neither a multiple nor a
                divisor of it (the message names both numbers); a bad rank or size.
        """
        if not isinstance(size, int) or size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank {rank!r} of tensor_parallel_size {size!r}")
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
        for name, value in (("num_attention_heads", heads), ("intermediate_size", inter),
                            ("hidden_size", hidden)):
            if value % size:
                raise ValueError(f"{name}={value} is not a multiple of "
                                 f"tensor_parallel_size={size}: the model cannot be split "
                                 f"evenly over {size} ranks")
        if kv % size == 0:
            kv_heads = _part(kv, rank, size)
        elif size % kv == 0:
            k = rank * kv // size  # the KV head of this rank's query heads
            kv_heads = (k, k + 1)
        else:
            raise ValueError(f"num_key_value_heads={kv} is neither a multiple nor a divisor of "
                             f"tensor_parallel_size={size}: the KV heads can be neither split "
                             f"nor replicated evenly")
        q_out, kv_out = heads * head_dim, kv * head_dim
        per = -(-vocab // size)
        return cls(
            rank=rank, size=size, num_layers=config.num_hidden_layers, head_dim=head_dim,
            hidden_size=hidden, num_heads=heads // size, num_kv_heads=kv_heads[1] - kv_heads[0],
            q_heads=_part(heads, rank, size), kv_heads=kv_heads,
            intermediate=_part(inter, rank, size), hidden=_part(hidden, rank, size),
            vocab=(min(rank * per, vocab), min((rank + 1) * per, vocab)), vocab_per_rank=per,
            vocab_size=vocab,
            module_shapes={"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out),
                           "v_proj": (hidden, kv_out), "o_proj": (q_out, hidden),
                           "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                           "down_proj": (inter, hidden)})

    # -- which features of each module -----------------------------------------------------------

    def _out_features(self, module: str) -> Range:
        """This rank's output features of a column-parallel module's base weight."""
        d = self.head_dim
        if module == "q_proj":
            return self.q_heads[0] * d, self.q_heads[1] * d
        if module in ("k_proj", "v_proj"):
            return self.kv_heads[0] * d, self.kv_heads[1] * d
        return self.intermediate

    def _in_features(self, module: str) -> Range:
        """This rank's input features of a row-parallel module."""
        d = self.head_dim
        return (self.q_heads[0] * d, self.q_heads[1] * d) if module == "o_proj" \
            else self.intermediate

    @property
    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """``module -> (in_features, out_features)`` of every module of the whole model a
        LoRA may target (what an adapter must fit): the decoder projections and the
        vocabulary modules (PEFT's ``lora_embedding_A`` is ``[r, vocab_size]``, as a Linear's
        lora_A is ``[r, in_features]``)."""
        h, v = self.hidden_size, self.vocab_size
        return {**self.module_shapes, EMBED: (v, h), HEAD: (h, v)}

    def lora_ranges(self, module: str) -> tuple[Range | None, Range | None]:
        """``(columns of lora_A [r, in], columns of lora_B^T [r, out])`` this rank holds of
        ``module``'s adapter weights, each None for all of them."""
        if self.size == 1:
            return None, None
        if module == EMBED:
            return self.vocab, None
        if module == HEAD:
            return None, self.vocab
        if module in ROW_PARALLEL:
            return self._in_features(module), self.hidden
        return None, self._out_features(module)

    def _width(self, module: str, cols: Range | None, whole: int) -> int:
        if cols is None:
            return whole
        return self.vocab_per_rank if module in (EMBED, HEAD) else cols[1] - cols[0]

    @property
    def lora_widths(self) -> dict[str, tuple[int, int]]:
        """``module -> (lora_A row width, lora_B^T row width)`` on this rank: the row widths
        its pool's adapter pages hold (the same on every rank)."""
        widths = {}
        for module, (in_f, out_f) in self.lora_module_shapes.items():
            a, b = self.lora_ranges(module)
            widths[module] = (self._width(module, a, in_f), self._width(module, b, out_f))
        return widths

    @property
    def dora_widths(self) -> dict[str, int]:
        """``module -> width`` of a DoRA module's output scale row on this rank (the decoder
        projections: DoRA on the vocabulary modules is not served)."""
        return {module: out_f if module in ROW_PARALLEL else self.lora_widths[module][1]
                for module, (_, out_f) in self.module_shapes.items()}

    def shard_lora(self, module: str, a: torch.Tensor, b_t: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of one module's ``lora_A [r, in]`` and ``lora_B^T [r, out]``
        (views, except a vocabulary module's columns on a last rank short of
        ``vocab_per_rank``: zero-padded copies)."""
        a_cols, b_cols = self.lora_ranges(module)
        return self._columns(module, a, a_cols), self._columns(module, b_t, b_cols)

    def shard_dora(self, module: str, scale: torch.Tensor) -> torch.Tensor:
        """This rank's part of a DoRA module's ``[out]`` output scale (a view): a
        column-parallel module's output features, a row-parallel module's whole row."""
        if module in ROW_PARALLEL:
            return scale
        _, cols = self.lora_ranges(module)
        return self._columns(module, scale[None], cols)[0]

    def _columns(self, module: str, t: torch.Tensor, cols: Range | None) -> torch.Tensor:
        if cols is None:
            return t
        part = t[:, cols[0]:cols[1]]
        missing = self._width(module, cols, t.shape[1]) - part.shape[1]
        return part if missing == 0 else torch.cat([part, part.new_zeros(part.shape[0],
                                                                         missing)], dim=1)

    def weight_range(self, name: str) -> tuple[int, Range] | None:
        """``(dim, [start, stop))`` of the HF parameter ``name`` that this rank holds, or None
        for all of it (norms; every parameter with one rank)."""
        if self.size == 1:
            return None
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return 0, self.vocab
        parts = name.split(".")
        if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
            return None
        module = parts[-2]
        if module in COLUMN_PARALLEL:
            return 0, self._out_features(module)
        if module in ROW_PARALLEL and parts[-1] == "weight":
            return 1, self._in_features(module)
        return None


def _part(n: int, rank: int, size: int) -> Range:
    """Rank ``rank``'s equal part of ``n`` (a multiple of ``size``)."""
    per = n // size
    return rank * per, (rank + 1) * per
