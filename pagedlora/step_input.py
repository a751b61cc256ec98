"""StepInput: everything the model runner needs for one step, and nothing it must look up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pagedlora.adapter_pages import ResidentAdapter
from pagedlora.sampler import RequestSampling
from pagedlora.scheduler import SchedulerOutput


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
        adapter_key: its adapter's content key, None for the base model.
        sample: whether the step reaches its last known token, so that a token is sampled.
        sampling: how to sample it.
    """

    request_id: int
    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[list[int], ...]
    adapter_key: str | None
    sample: bool
    sampling: RequestSampling


@dataclass(frozen=True)
class StepInput:
    """The model runner's input for one step: plain ids and page tables (the adapters'
    placements hold small int64 page tables), so it can be broadcast to worker processes
    or copied into persistent device buffers.

    Attributes:
        sequences: the scheduled requests, in the scheduler's order.
        adapters: content key -> pool placement, for every adapter of ``sequences``.
        finished_request_ids: requests finished since the last step (the runner drops their
            state: sampler generators).
    """

    sequences: tuple[SequenceInput, ...]
    adapters: Mapping[str, ResidentAdapter]
    finished_request_ids: tuple[int, ...] = ()

    @classmethod
    def build(cls, out: SchedulerOutput, placements: Mapping[str, ResidentAdapter],
              finished_request_ids: tuple[int, ...] | None = None) -> StepInput:
        """From the scheduler's output (after ``drop_failed``) and the adapter store's
        placements of its adapters; ``finished_request_ids`` defaults to the output's.

        Raises:
            KeyError: an adapter of ``out`` without a placement.
        """
        sequences = []
        for s in out.scheduled:
            r, n = s.request, s.num_new_tokens
            first = r.num_computed_tokens
            sequences.append(SequenceInput(
                request_id=r.request_id,
                token_ids=tuple(r.all_token_ids[first:first + n]), start=first,
                block_table=s.block_table, adapter_key=r.adapter_key,
                sample=first + n == r.num_tokens, sampling=r.sampling))
        return cls(tuple(sequences), {k: placements[k] for k in out.adapter_keys},
                   out.finished_request_ids if finished_request_ids is None
                   else finished_request_ids)
