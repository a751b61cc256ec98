"""ModelRunner: turns a StepInput into tensors, runs the model, samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedlora.kernels.lora import TokenRange
from pagedlora.kernels.paged_attention import attention_metadata
from pagedlora.logprobs import token_logprobs
from pagedlora.lora_layouts import LoraLayouts
from pagedlora.merged_weights import MergedWeights
from pagedlora.model import AttentionGroup, ForwardBatch, LlamaModel
from pagedlora.pool import UnifiedPool
from pagedlora.sampler import Sampler
from pagedlora.scheduler import RunnerOutput, TokenLogprobs
from pagedlora.step_input import SequenceInput, StepInput
from pagedlora.step_upload import StepUpload


@dataclass(frozen=True)
class LogitRows:
    """Which rows of the step's logits serve what (see :meth:`ModelRunner._build`).

    Attributes:
        sampled: the sequences that sample, in row order.
        sample_rows: their rows, or None when the logits hold exactly those rows, in order.
        prompt: per sequence that wants prompt log-probabilities, ``(sequence, first row)``;
            its ``len(sequence.prompt_targets)`` rows follow one another.
    """

    sampled: list[SequenceInput]
    sample_rows: list[int] | None
    prompt: list[tuple[SequenceInput, int]]

    def output(self, sampler: Sampler, logits: torch.Tensor) -> RunnerOutput:
        """Samples this step's ``logits`` (``[M, vocab_size]`` float32, every row) and
        computes the log-probabilities its requests asked for."""
        sample_logits = logits if self.sample_rows is None else logits[self.sample_rows]
        tokens = sampler.sample(sample_logits, self.sampled)
        return RunnerOutput(tuple(s.request_id for s in self.sampled), tuple(tokens),
                            _sample_logprobs(sample_logits, self.sampled, tokens),
                            _prompt_logprobs(logits, self.prompt))

    def ids(self) -> tuple:
        """The rows by request id, plain values (what a tensor-parallel rank 0 sends a
        driver that samples; :meth:`of_ids` reads them back)."""
        return (tuple(s.request_id for s in self.sampled), self.sample_rows,
                tuple((s.request_id, row) for s, row in self.prompt))

    @classmethod
    def of_ids(cls, ids: tuple, sequences: dict[int, SequenceInput]) -> LogitRows:
        """From :meth:`ids`, with ``sequences`` by request id."""
        sampled, sample_rows, prompt = ids
        return cls([sequences[r] for r in sampled], sample_rows,
                   [(sequences[r], row) for r, row in prompt])


class ModelRunner:
    """Builds the flattened batch of a step (no padding), runs the forward pass and samples.

    Sequences are ordered by adapter (and weight) so that each adapter's tokens form few
    contiguous ranges (the SGMV layout, Punica section 4; a request of a mix has its tokens in
    a range of each of its adapters, at its weight); decodes (one new token) and prefills are
    attended in two groups so a long prompt does not pad every decode. Logits are computed
    only where they are used: the last position of each sequence that samples, and the
    positions whose prompt log-probabilities a request asked for; log-probabilities only for
    the requests that asked (:func:`pagedlora.logprobs.token_logprobs`). A step marked
    ``merged`` runs on that adapter's merged weights (:class:`MergedWeights`) with no LoRA work.
    The step's index tensors (token ids, positions, slot mapping, block tables, attention
    metadata) are built on the host, with every size the kernels need known there, and reach
    the device in one non-blocking copy (:class:`StepUpload`), and nothing in the step reads
    a device value back but the sampled tokens after the forward pass. (The torch kernels'
    BGMV token layouts, built only on the CPU path, are tensors of their own.)

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
        self.lora = LoraLayouts(pool, model.lora_widths, model.kernels.reads_gathered_rows,
                                scale_widths=model.dora_widths, fused_rows=model.fused_rows,
                                block_diagonal=model.dtype != torch.float32)
        self.merged = MergedWeights(model, pool)
        self.upload = StepUpload(pool.tensor.device)

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
            token (and its log-probabilities, when asked), and the prompt log-probabilities the
            step computed.
        """
        self.sampler.forget(step.finished_request_ids)
        if not step.sequences:
            return RunnerOutput()
        logits, rows = self.forward(step)
        return rows.output(self.sampler, logits)

    def forward(self, step: StepInput) -> tuple[torch.Tensor | None, LogitRows]:
        """The step's forward pass without sampling (``step.sequences`` not empty).

        Returns:
            ``[M, vocab_size]`` float32 logits (None on tensor-parallel ranks other than 0)
            and which sequences' rows they are (:meth:`LogitRows.output` samples them).
        """
        order = sorted(step.sequences, key=lambda s: s.lora_terms)
        batch, rows = self._build(order, step)
        return self.model.forward(batch, self.pool), rows

    def close(self) -> None:
        """Nothing to release: the model and the pool are this process's memory."""

    def _build(self, order: list[SequenceInput], step: StepInput
               ) -> tuple[ForwardBatch, LogitRows]:
        bs = self.pool.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_pages: list[list[int]] = []
        logits_index: list[int] = []  # tokens whose logits are computed, in token order
        sample_rows: list[int] = []
        sampled: list[SequenceInput] = []
        prompt_rows: list[tuple[SequenceInput, int]] = []
        groups_of = {True: [], False: []}  # is_decode -> [(q_start, q_len, ctx_len, blocks)]
        # adapter key -> its tokens, and its rows of the logits, with their weights
        uses: dict[str, list[TokenRange]] = {}
        logit_uses: dict[str, list[TokenRange]] = {}
        for s in order:
            start, n = len(input_ids), len(s.token_ids)
            row_start = len(logits_index)
            input_ids.extend(s.token_ids)
            pos = range(s.start, s.start + n)
            positions.extend(pos)
            slot_pages.extend(s.block_table[p // bs] for p in pos)
            groups_of[n == 1].append((start, n, s.start + n, s.block_table))
            if s.prompt_targets:
                first = start + s.prompt_logprobs_from - s.start
                prompt_rows.append((s, len(logits_index)))
                logits_index.extend(range(first, first + len(s.prompt_targets)))
            if s.sample:
                sample_rows.append(len(logits_index))
                logits_index.append(start + n - 1)
                sampled.append(s)
            for key, weight in s.lora_terms:
                _extend(uses.setdefault(key, []), start, start + n, weight)
                _extend(logit_uses.setdefault(key, []), row_start, len(logits_index), weight)

        def t(x) -> torch.Tensor:  # a host tensor: the upload moves them all at once
            return torch.tensor(x, dtype=torch.long)

        pos = t(positions)
        # token ids, positions, slot pages [L, T], slot offsets, sampled rows; then per group
        host = [t(input_ids), pos, t(slot_pages).t().contiguous(), pos % bs, t(logits_index)]
        per_step = len(host)
        shapes = []  # per attention group: (max blocks, longest new-token count)
        for members in filter(None, groups_of.values()):
            width = max(len(m[3]) for m in members)
            longest = max(m[1] for m in members)
            tables = [list(m[3]) + [m[3][0]] * (width - len(m[3])) for m in members]
            of_group = [t(tables).permute(2, 0, 1).contiguous(),  # [L, B, max_blocks]
                        t([m[0] for m in members]), t([m[1] for m in members]),
                        t([m[2] for m in members]),
                        t([i for m in members for i in range(m[0], m[0] + m[1])]),
                        t([b * longest + i for b, m in enumerate(members)
                           for i in range(m[1])])]
            host += of_group
            per_group = len(of_group)
            shapes.append((width, longest))
        on_device = self.upload(host)  # one non-blocking copy on a GPU; none on the CPU
        groups = []
        for g, (width, longest) in enumerate(shapes):
            at = per_step + per_group * g
            tables, q_start, q_lens, ctx_lens, flat, padded = on_device[at:at + per_group]
            groups.append(AttentionGroup(tables, attention_metadata(
                q_start, q_lens, ctx_lens, width * bs, max_q_len=longest, flat_index=flat,
                padded_index=padded, whole_batch=len(shapes) == 1)))
        if step.merged is None:
            keys = sorted(uses)  # a fixed order: LoraLayouts keeps its layouts while it repeats
            lora = self.lora.batches([step.adapters[k] for k in keys], [uses[k] for k in keys],
                                     len(input_ids), logit_uses=[logit_uses[k] for k in keys],
                                     num_logits=len(logits_index))
            fused, layers = self.lora.fused(lora, len(input_ids)), None
        else:
            lora, fused = {}, {}
            layers = self.merged.layers_for(step.merged, step.adapters[step.merged])
        ids, pos, slot_pages_t, slot_offsets, sample_index = on_device[:per_step]
        batch = ForwardBatch(
            input_ids=ids, positions=pos, slot_pages=slot_pages_t, slot_offsets=slot_offsets,
            groups=groups, sample_index=sample_index, lora=lora, fused_lora=fused,
            layers=layers)
        only_samples = not prompt_rows
        return batch, LogitRows(sampled, None if only_samples else sample_rows, prompt_rows)


def _sample_logprobs(logits: torch.Tensor, sampled: list[SequenceInput], tokens: list[int]
                     ) -> tuple[TokenLogprobs | None, ...]:
    """The sampled tokens' entries, for the rows whose request asked (else None); ``()`` when
    none did. ``logits``: ``[len(sampled), vocab_size]``."""
    asking = [i for i, s in enumerate(sampled) if s.sampling.params.logprobs is not None]
    if not asking:
        return ()
    found = token_logprobs(logits[asking], [tokens[i] for i in asking],
                           [sampled[i].sampling.params.logprobs for i in asking])
    by_row = dict(zip(asking, found, strict=True))
    return tuple(by_row.get(i) for i in range(len(sampled)))


def _prompt_logprobs(logits: torch.Tensor, prompt: list[tuple[SequenceInput, int]]
                     ) -> tuple[tuple[int, tuple[TokenLogprobs, ...]], ...]:
    """``(request id, entries)`` per sequence of ``prompt`` (``(sequence, first row)``), from
    its rows of the step's ``logits``, in one batched pass."""
    if not prompt:
        return ()
    index = [r0 + j for s, r0 in prompt for j in range(len(s.prompt_targets))]
    found = token_logprobs(logits[index], [t for s, _ in prompt for t in s.prompt_targets],
                           [s.sampling.params.prompt_logprobs for s, _ in prompt
                            for _ in s.prompt_targets])
    out, at = [], 0
    for s, _ in prompt:
        n = len(s.prompt_targets)
        out.append((s.request_id, tuple(found[at:at + n])))
        at += n
    return tuple(out)

def _extend(ranges: list[TokenRange], start: int, end: int, weight: float) -> None:
    """Adds ``[start, end)`` at ``weight`` to an adapter's ranges, extending the last one when
    it ends at ``start`` with the same weight (consecutive requests of one adapter)."""
    if ranges and ranges[-1][1] == start and ranges[-1][2] == weight:
        ranges[-1] = (ranges[-1][0], end, weight)
    else:
        ranges.append((start, end, weight))
