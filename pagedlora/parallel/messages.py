"""What the driver of a tensor-parallel engine and its workers send each other (one pipe per
worker; everything plain Python or small, except adapter buffers, which travel as file
descriptors of shared memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagedlora.config import EngineConfig
from pagedlora.lora_adapter import LoraAdapter
from pagedlora.parallel.host_weights import SharedWeights
from pagedlora.sampler import RequestSampling
from pagedlora.scheduler import AdapterTerms, RunnerOutput
from pagedlora.shared_pages import TailSpots
from pagedlora.step_input import SequenceInput


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to build its shard (sent once, at spawn).

    Attributes:
        model_dir: the HF model directory (each rank reads its slices of the weights).
        config: the engine's options (dtype, device, kernels, block size...).
        max_model_len: sizes the RoPE tables.
        num_pages: pages of each rank's pool (the driver's allocator hands out their ids).
        static_slot_pages: pages of an adapter slot with ``memory_layout="static"``.
        size: ranks.
        driver_samples: rank 0 returns the logits, not tokens (a sampler passed to the
            engine runs in the driver).
        threads: torch intra-op threads per worker (CPU).
        store_port: the driver's ``TCPStore`` on the loopback, where the ranks meet.
        driver_pid: a worker exits when its parent is no longer this process.
    """

    model_dir: Path
    config: EngineConfig
    max_model_len: int
    num_pages: int
    static_slot_pages: int
    size: int
    driver_samples: bool
    threads: int
    store_port: int
    driver_pid: int


@dataclass(frozen=True)
class Ready:
    """A worker built its shard and its pool; its kernels are ``kernel_backend``."""

    rank: int
    pid: int
    kernel_backend: str


@dataclass(frozen=True)
class LoadAdapter:
    """Fill ``pages`` of the pool with this rank's shard of an adapter (no answer: a failure
    is reported as :class:`WorkerError` instead of the next step's answer).

    Attributes:
        adapter: its description (ranks, scales per module).
        pages: the pages the driver's allocator gave it (the same on every rank).
        placement_id: the placement's id, by which steps name it.
        weights: the whole adapter, in shared memory.
        tail: where its last page's rows go in pages shared with other adapters (None when
            its last page is its own).
    """

    adapter: LoraAdapter
    pages: list[int]
    placement_id: int
    weights: SharedWeights
    tail: TailSpots | None = None


@dataclass(frozen=True)
class SequenceUpdate:
    """One request's part of a step as the workers receive it: a ``SequenceInput`` whose block
    table and sampling options the workers already hold, except for what changed (vLLM's
    scheduler sends its workers new block ids only, for the same reason: a long sequence's
    table is ``blocks x layers`` page ids, every step).

    Attributes:
        request_id, token_ids, start, adapter_key, sample, prompt_targets,
        prompt_logprobs_from, adapter_mix: as ``SequenceInput``.
        first_block: index of ``new_blocks[0]`` in the request's table; 0 replaces the whole
            table (a new request, or one whose table changed: preempted and readmitted).
        new_blocks: the table's blocks from ``first_block`` on (one page id per layer each).
        sampling: the request's sampling, sent with ``first_block == 0``; else None (as held).
    """

    request_id: int
    token_ids: tuple[int, ...]
    start: int
    adapter_key: str | None
    sample: bool
    first_block: int
    new_blocks: tuple[list[int], ...]
    sampling: RequestSampling | None
    prompt_targets: tuple[int, ...] = ()
    prompt_logprobs_from: int = 0
    adapter_mix: AdapterTerms = ()

    @classmethod
    def of(cls, s: SequenceInput, known: tuple[list[int], ...] | None) -> SequenceUpdate:
        """The update of ``s`` for workers that hold ``known`` (the table sent before; None:
        nothing). Blocks are compared by identity: the KV block manager never changes a
        block, and a table only grows until it is freed."""
        table = s.block_table
        rest = (s.prompt_targets, s.prompt_logprobs_from, s.adapter_mix)
        if known is not None and len(table) >= len(known) \
                and all(a is b for a, b in zip(table, known)):  # noqa: B905 - a prefix
            return cls(s.request_id, s.token_ids, s.start, s.adapter_key, s.sample,
                       len(known), tuple(table[len(known):]), None, *rest)
        return cls(s.request_id, s.token_ids, s.start, s.adapter_key, s.sample, 0,
                   tuple(table), s.sampling, *rest)


@dataclass(frozen=True)
class RunStep:
    """One step: the runner's ``StepInput`` with each adapter named by its placement id
    (placed by an earlier :class:`LoadAdapter`) and each sequence as its
    :class:`SequenceUpdate`, so a step carries ids and new blocks only.

    Attributes:
        sequences: the step's requests, in ``StepInput.sequences`` order.
        placements: adapter content key -> placement id.
        finished_request_ids: requests finished since the last step sent (the workers drop
            their tables).
    """

    sequences: tuple[SequenceUpdate, ...]
    placements: dict[str, int]
    finished_request_ids: tuple[int, ...]


@dataclass(frozen=True)
class StepDone:
    """A rank ran the step. Rank 0 answers with its ``output`` (tokens and log-probabilities),
    or, when the driver samples, with the step's ``logits`` (``[M, vocab]`` float32 numpy
    array) and which requests' ``rows`` they are (``LogitRows.ids``); the others with
    neither."""

    rank: int
    output: RunnerOutput | None = None
    rows: tuple = ()
    logits: object = None


@dataclass(frozen=True)
class WorkerError:
    """A worker failed (its traceback in ``message``) and is exiting; ``peer_lost``: in a
    collective that lost a peer or timed out waiting for one (a symptom of another rank's
    fault, which the driver looks for before it blames this one)."""

    rank: int
    message: str
    peer_lost: bool = False


@dataclass(frozen=True)
class Shutdown:
    """Leave the process group and exit."""
