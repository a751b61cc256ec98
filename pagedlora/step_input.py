"""StepInput: everything the model runner needs for one step, and nothing it must look up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pagedlora.adapter_pages import ResidentAdapter
from pagedlora.sampler import RequestSampling
from pagedlora.scheduler import AdapterTerms, SchedulerOutput


@dataclass(frozen=True)
class SequenceInput:
    """One request's part of a step.

    Attributes:
        request_id: the request.
        token_ids: its tokens computed in this step (prompt chunk, recomputation or the last
            sampled token), in order.
        start: position of ``token_ids[0]`` in the sequence (tokens already computed).
        block_table: its KV blocks covering ``start + len(token_ids)`` tokens, each one page
            id per layer.
        adapter_key: its adapter's content key (at weight 1), None for the base model or a
            mix.
        sample: whether the step reaches its last known token, so that a token is sampled.
        sampling: how to sample it (its ``params.logprobs``: whether, and how many top
            tokens, the sampled token's log-probabilities are wanted).
        prompt_targets: the prompt tokens whose log-probabilities the step must compute,
            those predicted by positions ``prompt_logprobs_from, prompt_logprobs_from + 1,
            ...`` (each inside this step's tokens); empty when none are wanted (the request did
            not ask, or already has them, or the step holds no prompt position but the last).
        prompt_logprobs_from: the first of those positions.
        adapter_mix: its scaled adapter or mix, ``(content key, weight)`` pairs (empty
            otherwise).
    """

    request_id: int
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[list[int], ...]
    adapter_key: str | None
    sample: bool
    sampling: RequestSampling
    prompt_targets: tuple[int, ...] = ()
    prompt_logprobs_from: int = 0
    adapter_mix: AdapterTerms = ()

    @property
    def lora_terms(self) -> AdapterTerms:
        """Its adapters and their weights: the mix, ``((adapter_key, 1.0),)``, or ``()``."""
        if self.adapter_mix:
            return self.adapter_mix
        return () if self.adapter_key is None else ((self.adapter_key, 1.0),)


@dataclass(frozen=True)
class StepInput:
    """The model runner's input for one step: plain ids and page tables (the adapters'
    placements hold small int64 page tables), so it can be broadcast to worker processes
    or copied into persistent device buffers.

    Attributes:
        sequences: the scheduled requests, in the scheduler's order.
        adapters: content key -> pool placement, for every adapter of ``sequences`` (those
            of mixes included).
        finished_request_ids: requests finished since the last step (the runner drops their
            state: sampler generators).
        merged: the adapter key of every sequence when the step runs on that adapter's merged
            weights (:class:`pagedlora.merge_policy.MergePolicy`), None when it runs unmerged.
    """

    sequences: tuple[SequenceInput, ...]
    adapters: Mapping[str, ResidentAdapter]
    finished_request_ids: tuple[int, ...] = ()
    merged: str | None = None

    @classmethod
    def build(cls, out: SchedulerOutput, placements: Mapping[str, ResidentAdapter],
              finished_request_ids: tuple[int, ...] | None = None, *,
              merged: str | None = None) -> StepInput:
        """From the scheduler's output (after ``drop_failed``), the adapter store's
        placements of its adapters and the merge decision; ``finished_request_ids`` defaults
        to the output's.

        Raises:
            KeyError: an adapter of ``out`` without a placement.
            ValueError: ``merged`` set while a sequence uses another adapter or none.
        """
        sequences = []
        for s in out.scheduled:
            r, n = s.request, s.num_new_tokens
            first = r.num_computed_tokens
            # Position p predicts token p + 1; positions before len(prompt) - 1 predict prompt
            # tokens. Entries already recorded (before a preemption) are not computed again;
            # the scheduler never lets the prefix cache skip one that is missing.
            lo, hi = first, first
            if r.needs_prompt_logprobs:
                lo = max(first, len(r.prompt_logprobs))
                hi = max(lo, min(first + n, len(r.prompt_token_ids) - 1))
            sequences.append(SequenceInput(
                request_id=r.request_id,
                token_ids=tuple(r.all_token_ids[first:first + n]), start=first,
                block_table=s.block_table, adapter_key=r.adapter_key,
                sample=first + n == r.num_tokens, sampling=r.sampling,
                prompt_targets=tuple(r.prompt_token_ids[lo + 1:hi + 1]),
                prompt_logprobs_from=lo, adapter_mix=r.adapter_mix))
        if merged is not None and any(s.lora_terms != ((merged, 1.0),) for s in sequences):
            raise ValueError(f"step merged with adapter {merged!r}, but it runs "
                             f"{sorted({repr(s.lora_terms) for s in sequences})}")
        return cls(tuple(sequences), {k: placements[k] for k in out.adapter_keys},
                   out.finished_request_ids if finished_request_ids is None
                   else finished_request_ids, merged)
