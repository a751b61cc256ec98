"""ModelRunner: turns a StepInput into tensors, runs the model, samples the next tokens."""

from __future__ import annotations

import torch

from pagedlora.kernels.paged_attention import attention_metadata
from pagedlora.lora_layouts import LoraLayouts
from pagedlora.model import AttentionGroup, ForwardBatch, LlamaModel
from pagedlora.pool import UnifiedPool
from pagedlora.sampler import Sampler
from pagedlora.scheduler import RunnerOutput
from pagedlora.step_input import SequenceInput, StepInput


class ModelRunner:
    """Builds the flattened batch of a step (no padding), runs the forward pass and samples.

    Sequences are ordered by adapter so that each adapter's tokens form one contiguous segment
    (the SGMV layout, Punica section 4); decodes (one new token) and prefills are attended in
    two groups so a long prompt does not pad every decode.

    Args:
        model: the model (its kernels decide the LoRA layout, see :class:`LoraLayouts`).
        pool: the unified pool the model reads and writes.
        sampler: chooses the tokens (a test may pass its own); None on a tensor-parallel rank
            that only runs the forward pass (:meth:`forward`).
    """

    def __init__(self, model: LlamaModel, pool: UnifiedPool, sampler: Sampler | None) -> None:
        self.model = model
        self.pool = pool
        self.sampler = sampler
        self.lora = LoraLayouts(pool, model.lora_widths, model.kernels.reads_gathered_rows)

    @property
    def vocab_size(self) -> int:
        """Columns of the logits (token ids a prompt may hold)."""
        return self.model.vocab_size

    @property
    def kernel_backend(self) -> str:
        """The kernels the model runs: "torch" or "triton"."""
        return self.model.kernels.backend

    def run(self, step: StepInput) -> RunnerOutput:
        """Runs one step.

        Returns:
            the requests whose known tokens are all computed after it, each with its sampled
            token.
        """
        self.sampler.forget(step.finished_request_ids)
        if not step.sequences:
            return RunnerOutput()
        logits, sampled = self.forward(step)
        tokens = self.sampler.sample(logits, sampled)
        return RunnerOutput(tuple(s.request_id for s in sampled), tuple(tokens))

    def forward(self, step: StepInput) -> tuple[torch.Tensor | None, list[SequenceInput]]:
        """The step's forward pass without sampling (``step.sequences`` not empty).

        Returns:
            ``[S, vocab_size]`` float32 logits (None on tensor-parallel ranks other than 0)
            and the S sequences they belong to, row by row.
        """
        order = sorted(step.sequences, key=lambda s: s.adapter_key or "")
        batch, sampled = self._build(order, step)
        return self.model.forward(batch, self.pool), sampled

    def close(self) -> None:
        """Nothing to release: the model and the pool are this process's memory."""

    def _build(self, order: list[SequenceInput], step: StepInput
               ) -> tuple[ForwardBatch, list[SequenceInput]]:
        device = self.pool.tensor.device
        bs = self.pool.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_pages: list[list[int]] = []
        sample_index: list[int] = []
        sampled: list[SequenceInput] = []
        groups_of = {True: [], False: []}  # is_decode -> [(q_start, q_len, ctx_len, blocks)]
        segments: list[tuple[int, int, str]] = []  # (start, end, adapter key), one per adapter
        for s in order:
            start, n = len(input_ids), len(s.token_ids)
            input_ids.extend(s.token_ids)
            pos = range(s.start, s.start + n)
            positions.extend(pos)
            slot_pages.extend(s.block_table[p // bs] for p in pos)
            groups_of[n == 1].append((start, n, s.start + n, s.block_table))
            if s.sample:
                sample_index.append(start + n - 1)
                sampled.append(s)
            key = s.adapter_key
            if key is not None:
                if segments and segments[-1][2] == key:
                    segments[-1] = (segments[-1][0], start + n, key)
                else:
                    segments.append((start, start + n, key))

        def t(x) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        groups = []
        for members in groups_of.values():
            if not members:
                continue
            width = max(len(m[3]) for m in members)
            tables = [list(m[3]) + [m[3][0]] * (width - len(m[3])) for m in members]
            groups.append(AttentionGroup(
                block_tables=t(tables).permute(2, 0, 1).contiguous(),  # [L, B, max_blocks]
                meta=attention_metadata(t([m[0] for m in members]), t([m[1] for m in members]),
                                        t([m[2] for m in members]), width * bs)))
        lora = self.lora.batches([step.adapters[key] for *_, key in segments],
                                 [(a, b) for a, b, _ in segments], len(input_ids))
        batch = ForwardBatch(
            input_ids=t(input_ids), positions=t(positions),
            slot_pages=t(slot_pages).t().contiguous(), slot_offsets=t(positions) % bs,
            groups=groups, sample_index=t(sample_index), lora=lora)
        return batch, sampled
