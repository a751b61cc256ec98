"""LlamaModel: the Llama-family forward pass over a flattened token batch and the paged pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pagedlora.kernels.backend import select_kernels
from pagedlora.kernels.lora import (
    DENSE_MAX_TOKENS,
    FusedLora,
    LoraBatch,
    dense_rows,
    dora_rescale,
    lora_embedding,
    lora_fused,
    lora_shrink_expand,
)
from pagedlora.kernels.paged_attention import AttentionMetadata
from pagedlora.lora_adapter import VOCAB_LAYER, BaseVocab
from pagedlora.packed_linear import PackedLinear
from pagedlora.parallel.comm import TPComm
from pagedlora.parallel.shard import ROW_PARALLEL, Shard
from pagedlora.pool import UnifiedPool

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class AttentionGroup:
    """Sequences attended together (decodes in one group, prefills in another).

    Attributes:
        block_tables: ``[num_layers, B, max_blocks]`` int64 page of each block per layer.
        meta: padding and causal mask, the same in every layer.
    """

    block_tables: torch.Tensor
    meta: AttentionMetadata


@dataclass
class ForwardBatch:
    """Everything one step's forward pass reads, built by the model runner.

    Attributes:
        input_ids: ``[T]`` int64 new tokens of all scheduled sequences, one after another.
        positions: ``[T]`` int64 position of each token in its sequence.
        slot_pages: ``[num_layers, T]`` int64 page receiving each token's K/V in each layer.
        slot_offsets: ``[T]`` int64 slot of each token inside its block.
        groups: attention groups covering every sequence once.
        sample_index: ``[S]`` int64 tokens whose logits are returned, in token order.
        lora: ``(layer, module) -> LoraBatch`` for every module some token's adapter targets;
            ``(VOCAB_LAYER, "embed_tokens")`` over the tokens, ``(VOCAB_LAYER, "lm_head")``
            over the ``S`` logits rows.
        fused_lora: ``(layer, fused weight) -> FusedLora``: modules of one fused GEMM
            ("qkv", "gate_up") whose LoRA runs in one shrink (their ``lora`` entries are then
            not run), see :meth:`pagedlora.lora_layouts.LoraLayouts.fused`.
        layers: per layer, the weights to run with in place of the model's (``layers[n]`` has
            the keys of ``LlamaModel.layers[n]``): one adapter's merged weights
            (:class:`pagedlora.merged_weights.MergedWeights`); None: the model's own.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_pages: torch.Tensor
    slot_offsets: torch.Tensor
    groups: list[AttentionGroup]
    sample_index: torch.Tensor
    lora: dict[tuple[int, str], LoraBatch] = field(default_factory=dict)
    fused_lora: dict[tuple[int, str], FusedLora] = field(default_factory=dict)
    layers: list[dict[str, torch.Tensor]] | None = None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' LlamaRMSNorm: normalize in float32, scale in the input dtype.
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


class LlamaModel:
    """Decoder-only Llama family: RMSNorm, RoPE, grouped-query attention, SwiGLU, unmerged LoRA.

    Covers Llama 2/3, Mistral (without sliding windows beyond ``max_model_len``), Qwen2 (q/k/v
    biases) and SmolLM2. The projections q/k/v and gate/up are fused into one GEMM each; LoRA
    deltas are added per module through the kernels' ``lora_shrink_expand``, then DoRA
    adapters' tokens are rescaled (:func:`~pagedlora.kernels.lora.dora_rescale`); on
    ``embed_tokens`` (a row lookup, :func:`lora_embedding`) and ``lm_head`` (on the logits
    rows) through the torch ops on rows read out of the pool, whatever the backend. With tied
    embeddings (SmolLM2) ``lm_head`` is the embedding matrix, and a LoRA on either applies where
    PEFT applies it: on the lookup for ``embed_tokens``, on the logits for ``lm_head``. Or a
    step runs on decoder weights with one adapter merged in (``ForwardBatch.layers``;
    ``fused_rows`` says where each module's rows are in the fused weights).

    Under tensor parallelism each rank builds the model from its :class:`Shard` of the weights
    (Megatron-LM, Shoeybi et al. 2019, section 3) and runs the same forward pass over its
    heads, intermediate features and vocabulary rows, with these collectives (T tokens in the
    step, S sampled, H hidden size, V vocabulary, N ranks):

    - per step: the vocab-parallel embedding's all-reduce of ``[T, H]``; the gather of
      ``[S, V / N]`` logits from every rank to rank 0 (so rank 0 samples and computes
      log-probabilities over the whole vocabulary); LoRA on ``embed_tokens`` and ``lm_head``
      adds none: each rank holds its vocabulary columns of the embedding's lora_A and of
      lm_head's lora_B^T (and all of the other half), adds its tokens' deltas before the
      embedding's all-reduce and its logits columns' before the gather;
    - per layer, base model: one all-reduce of ``[T, H]`` after o_proj, one after down_proj;
    - per layer, LoRA (S-LoRA, Sheng et al. 2023, section 6): nothing for the column-parallel
      q/k/v/gate/up (whole lora_A, this rank's columns of lora_B); for each row-parallel
      module (o_proj, down_proj) that an adapter of the step targets in the layer, one
      all-reduce of the shrink's output before the expand (this rank's columns of lora_A see
      only its columns of x): ``[T', R]`` in the dense form (T' tokens of the module's
      adapters, R the sum of their ranks), ``sum(len_s * r_s)`` elements in the segment loop,
      ``[S_a, width, r_max]`` in BGMV, ``[G, T, r_max]`` float32 with Triton (G = 1 but
      for mixes, whose overlapping segments take one group each). Each rank then
      expands with its ``H / N`` columns of lora_B into its columns of the output, which the
      base all-reduce sums (a DoRA adapter's output scale is applied after that all-reduce,
      every rank holding the module's whole ``[H]`` scale row; on a column-parallel module
      each rank scales its own output features). So LoRA adds up to two all-reduces per
      layer, of ``T * R`` elements each against the base's ``T * H`` (R = 64 and H = 4096:
      1.6% more bytes), but on latency-bound decode steps each collective's fixed cost counts
      as much as the base's. (vLLM's default ``RowParallelLinearWithLoRA`` instead keeps all
      of lora_B on every rank and adds its partial delta before the base all-reduce: no extra
      collective, N times the memory for lora_B; BD-LoRA, arXiv 2510.23346, restricts the adapter to
      remove the extra communication.)

    Args:
        config: a transformers ``PretrainedConfig`` of a supported model type.
        weights: HF parameter names -> tensors (``model.layers.0.self_attn.q_proj.weight``...);
            under tensor parallelism this rank's slices of them (``Shard.weight_range``).
        dtype, device: of the weights and activations.
        max_model_len: longest sequence; sizes the RoPE table.
        kernel_backend: "auto", "torch" or "triton" (see :class:`pagedlora.EngineConfig`).
        shard: this rank's part; None: the whole model (one rank).
        comm: the collectives of this rank's group; None with one rank.
        lora_shrink_in_base_after: steps of at most ``DENSE_MAX_TOKENS`` tokens that a set of
            adapters runs in a row before its lora_A rows are packed below the base weights
            they share an input with (:meth:`PackedLinear.ride`; one process only); 0: never.

    Raises:
        ValueError: an unsupported model type, rope type, or a missing weight (named); a
            kernel backend that cannot run on ``device`` (see
            :func:`pagedlora.kernels.backend.select_kernels`); a shard of another size than
            ``comm``'s group.
    """

    def __init__(self, config, weights: dict[str, torch.Tensor], *, dtype: torch.dtype,
                 device: torch.device, max_model_len: int, kernel_backend: str = "auto",
                 shard: Shard | None = None, comm: TPComm | None = None,
                 lora_shrink_in_base_after: int = 0) -> None:
        self.check_config(config)
        shard = shard or Shard.of(config)
        if (comm.size if comm is not None else 1) != shard.size:
            raise ValueError(f"a shard of {shard.size} ranks needs a group of as many")
        self.config = config
        self.shard, self.comm = shard, comm
        self.dtype, self.device = dtype, device
        self.kernels = select_kernels(kernel_backend, device)
        self.num_layers = config.num_hidden_layers
        self.num_heads = shard.num_heads
        self.num_kv_heads = shard.num_kv_heads
        self.head_dim = shard.head_dim
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        self.module_shapes = shard.module_shapes
        self.lora_module_shapes = shard.lora_module_shapes  # what an adapter must fit
        self.lora_widths = shard.lora_widths  # this rank's rows of them
        self.dora_widths = shard.dora_widths
        d = self.head_dim
        self._split_qkv = [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]
        h, i = self.hidden_size, shard.intermediate[1] - shard.intermediate[0]
        q_out, kv_out = self._split_qkv[0], self._split_qkv[1]
        # module -> (fused weight of self.layers[n], its first row, its end row) on this rank
        self.fused_rows = {
            "q_proj": ("qkv", 0, q_out), "k_proj": ("qkv", q_out, q_out + kv_out),
            "v_proj": ("qkv", q_out + kv_out, q_out + 2 * kv_out), "o_proj": ("o", 0, h),
            "gate_proj": ("gate_up", 0, i), "up_proj": ("gate_up", i, 2 * i),
            "down_proj": ("down", 0, h)}

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise ValueError(f"weight {name!r} is missing from the model files")
            return weights[name].to(device=device, dtype=dtype)

        self.embed = self._vocab_rows(take("model.embed_tokens.weight"))
        self.norm = take("model.norm.weight")
        tied = getattr(config, "tie_word_embeddings", False) or "lm_head.weight" not in weights
        self.lm_head = self.embed if tied else self._vocab_rows(take("lm_head.weight"))
        self.vocab_size = shard.vocab_size if comm is not None else self.embed.shape[0]
        self.tied_embeddings = tied
        self.layers = []
        for n in range(self.num_layers):
            p = f"model.layers.{n}."
            qkv_names = [p + f"self_attn.{m}_proj" for m in "qkv"]
            has_bias = qkv_names[0] + ".bias" in weights
            self.layers.append({
                "in_norm": take(p + "input_layernorm.weight"),
                "post_norm": take(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([take(q + ".weight") for q in qkv_names]),
                "qkv_bias": torch.cat([take(q + ".bias") for q in qkv_names]) if has_bias
                else None,
                "o": take(p + "self_attn.o_proj.weight"),
                "gate_up": torch.cat([take(p + "mlp.gate_proj.weight"),
                                      take(p + "mlp.up_proj.weight")]),
                "down": take(p + "mlp.down_proj.weight"),
            })
        # the base GEMMs (oneDNN CPU: prepacked), in decode steps with the LoRA shrinks
        self.linear = PackedLinear(dtype, device, ride_after=lora_shrink_in_base_after)
        for w in self.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                self.linear.pack(w[name])
        self.linear.pack(self.lm_head)
        self._rope_cos, self._rope_sin = self._rope_tables(config, max_model_len)
        self._qkv_modules = {"q_proj": 0, "k_proj": 1, "v_proj": 2}

    def base_weight(self, layer: int, module: str) -> torch.Tensor:
        """``[out_features, in_features]`` weight of one projection of ``layer`` (a view into
        the fused q/k/v or gate/up weight), e.g. for DoRA's weight norm; under tensor
        parallelism this rank's part of it (a tensor-parallel driver reads the whole weight
        from the files instead, :class:`pagedlora.parallel.base_files.BaseFiles`).

        Raises:
            KeyError: an unknown module.
        """
        w = self.layers[layer]
        if module in self._qkv_modules:
            return w["qkv"].split(self._split_qkv)[self._qkv_modules[module]]
        if module in ("gate_proj", "up_proj"):
            return w["gate_up"].chunk(2)[module == "up_proj"]
        return w[{"o_proj": "o", "down_proj": "down"}[module]]

    def base_bias(self, layer: int, module: str) -> torch.Tensor | None:
        """``[out_features]`` bias of one projection of ``layer`` (Qwen2's q/k/v), or None."""
        bias = self.layers[layer]["qkv_bias"]
        if bias is None or module not in self._qkv_modules:
            return None
        return bias.split(self._split_qkv)[self._qkv_modules[module]]

    @property
    def base_vocab(self) -> BaseVocab:
        """The embedding and output weights, for checking an adapter's saved copies."""
        return BaseVocab(self.embed, self.lm_head, self.tied_embeddings)

    @staticmethod
    def check_config(config) -> None:
        """Raises ValueError for a model type or activation this model does not implement."""
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported; "
                             f"supported: {SUPPORTED_MODEL_TYPES}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")

    def _vocab_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's embedding or LM head rows, zero-padded to ``vocab_per_rank``."""
        missing = self.shard.vocab_per_rank - rows.shape[0]
        if self.comm is None or missing == 0:
            return rows
        return torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])

    def _rope_tables(self, config, max_model_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[max_model_len, head_dim]`` float32 cos and sin, as transformers computes them."""
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) \
            or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            d = self.head_dim
            inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
            attention_scaling = 1.0
        elif rope_type in ("linear", "llama3", "yarn"):
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported "
                             f"(default, linear, llama3, yarn are)")
        freqs = torch.arange(max_model_len, dtype=torch.float)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return ((emb.cos() * attention_scaling).to(self.device),
                (emb.sin() * attention_scaling).to(self.device))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: UnifiedPool) -> torch.Tensor | None:
        """Runs the batch, writing its K/V into the pool.

        Returns:
            ``[S, vocab_size]`` float32 logits of the tokens in ``batch.sample_index`` (under
            tensor parallelism on rank 0; None on the other ranks).
        """
        cos = self._rope_cos[batch.positions].to(self.dtype)[:, None, :]   # [T, 1, D]
        sin = self._rope_sin[batch.positions].to(self.dtype)[:, None, :]
        # transformers' rotate_half(x) * sin is roll(x, D / 2) * [-sin_1, sin_2] (sin's two
        # halves, the first negated): the same products, two ops a layer instead of five
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        h = self._embed(batch.input_ids, batch)                            # [T, H]
        kv_pages = pool.kv_pages
        rows = pool.stored_rows  # each module's rows, whole or in pieces, as stored
        ops, linear = self.kernels, self.linear
        comm = self.comm
        hidden = slice(*self.shard.hidden)
        t, d = h.shape[0], self.head_dim
        # decode-sized steps in one process: the dense form's shrinks ride the base GEMMs
        ride = comm is None and t <= DENSE_MAX_TOKENS
        linear.begin_step()

        def project(x: torch.Tensor, weight: torch.Tensor, lora_rows: torch.Tensor | None,
                    bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The base projection and, where it rode along, the shrink ``x @ lora_rows^T``."""
            if ride:
                return linear.ride(x, weight, lora_rows, bias)
            return linear(x, weight, bias), None

        for n, w in enumerate(self.layers if batch.layers is None else batch.layers):
            def lora(module: str, y: torch.Tensor, x: torch.Tensor, raw: torch.Tensor | None,
                     n: int = n) -> None:
                work = batch.lora.get((n, module))
                if work is None:
                    return
                a_width, b_width = self.lora_widths[module]
                a_view, b_view = rows(a_width, work.a), rows(b_width, work.b)
                if raw is not None:  # the dense form over read-out rows: torch's kernel
                    lora_shrink_expand(y, x, work, a_view, b_view, raw)
                elif comm is None or module not in ROW_PARALLEL:
                    ops.lora_shrink_expand(y, x, work, a_view, b_view)
                else:
                    shrunk = ops.lora_shrink(x, work, a_view)  # partial: x's columns
                    comm.all_reduce(shrunk)
                    ops.lora_expand(y[:, hidden], shrunk, work, b_view)
                if work.dora is not None and (comm is None or module not in ROW_PARALLEL):
                    dora_rescale(y, self.base_bias(n, module), work.dora,
                                 rows(self.dora_widths[module], work.dora.rows))

            def reduce(module: str, y: torch.Tensor, n: int = n) -> None:
                """A row-parallel output's all-reduce, then its DoRA scale (on the reduced
                output)."""
                comm.all_reduce(y)
                work = batch.lora.get((n, module))
                if work is not None and work.dora is not None:
                    dora_rescale(y, None, work.dora,
                                 rows(self.dora_widths[module], work.dora.rows))

            x = _rms_norm(h, w["in_norm"], self.eps)
            fused = batch.fused_lora.get((n, "qkv"))
            qkv, raw = project(x, w["qkv"], None if fused is None else fused.a,
                               w["qkv_bias"])                              # [T, (H+2KVH)*D]
            q, k, v = qkv.split(self._split_qkv, dim=-1)
            if fused is not None:
                lora_fused(qkv, x, fused, raw)
            else:
                lora("q_proj", q, x, None)
                lora("k_proj", k, x, None)
                lora("v_proj", v, x, None)
            # RoPE on q and k at once: they are adjacent columns of qkv.
            qk = qkv[:, : self._split_qkv[0] + self._split_qkv[1]].view(
                t, self.num_heads + self.num_kv_heads, d)
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = v.reshape(t, self.num_kv_heads, d)
            ops.write_kv(kv_pages, batch.slot_pages[n], batch.slot_offsets, k, v)
            if len(batch.groups) == 1:  # every token, in order: no scatter of the outputs
                g = batch.groups[0]
                attn = ops.paged_attention(q, kv_pages, g.block_tables[n], g.meta, d ** -0.5)
            else:
                attn = torch.empty_like(q)
                for g in batch.groups:
                    attn[g.meta.flat_index] = ops.paged_attention(
                        q, kv_pages, g.block_tables[n], g.meta, d ** -0.5)
            attn = attn.reshape(t, self.num_heads * d)
            o, raw = project(attn, w["o"], dense_rows(batch.lora.get((n, "o_proj")), t))
            lora("o_proj", o, attn, raw)
            if comm is not None:
                reduce("o_proj", o)
            h = h + o
            x = _rms_norm(h, w["post_norm"], self.eps)
            fused = batch.fused_lora.get((n, "gate_up"))
            gate_up, raw = project(x, w["gate_up"], None if fused is None else fused.a)
            gate, up = gate_up.chunk(2, dim=-1)
            if fused is not None:
                lora_fused(gate_up, x, fused, raw)
            else:
                lora("gate_proj", gate, x, None)
                lora("up_proj", up, x, None)
            a = F.silu(gate) * up
            down, raw = project(a, w["down"], dense_rows(batch.lora.get((n, "down_proj")), t))
            lora("down_proj", down, a, raw)
            if comm is not None:
                reduce("down_proj", down)
            h = h + down
        h = _rms_norm(h[batch.sample_index], self.norm, self.eps)        # [S, H]
        logits = linear(h, self.lm_head)                                   # [S, V / N]
        head_lora = batch.lora.get((VOCAB_LAYER, "lm_head"))
        if head_lora is not None:  # this rank's vocabulary columns of lora_B^T
            lora_shrink_expand(logits, h, head_lora, None, None)  # rows are gathered
        logits = logits.float()
        return logits if comm is None else comm.gather_vocab(logits, self.vocab_size)

    def _embed(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """``[T, H]`` embeddings, with their ``embed_tokens`` LoRA deltas; under tensor
        parallelism each rank looks up the ids of its vocabulary rows (and its columns of the
        LoRA's lora_A), zeros for the others, and the all-reduce sums them."""
        lora = batch.lora.get((VOCAB_LAYER, "embed_tokens"))
        if self.comm is None:
            h = self.embed[input_ids]
            if lora is not None:
                lora_embedding(h, input_ids, lora)
            return h
        lo, hi = self.shard.vocab
        outside = (input_ids < lo) | (input_ids >= hi)
        local = (input_ids - lo).masked_fill(outside, 0)
        h = self.embed[local]
        if lora is not None:
            lora_embedding(h, local, lora)
        h.masked_fill_(outside[:, None], 0)
        self.comm.all_reduce(h)
        return h
