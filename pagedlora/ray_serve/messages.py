"""What the ingress and the engine replicas send each other through Ray Serve handles: typed,
picklable values (errors too, so that the ingress maps them to the same HTTP statuses as
``pagedlora serve`` rather than unwrapping Ray's exceptions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedlora.config import EngineConfig
from pagedlora.errors import AdapterError, UnknownAdapterError
from pagedlora.input_processor import tokenize
from pagedlora.sampling_params import SamplingParams
from pagedlora.server.engine_loop import LoopStopped, PromptRejected, QueueFull


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as every replica can register it: its served name, a source any replica
    can read (a path on storage every node sees, an ``s3://`` URL, a cached model id), and
    the content key (XXH3-128 of its weights) the ingress validated, so that a replica never
    serves other weights under the name."""

    name: str
    source: str
    key: str
    preload: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs of a base model without loading it: its tokenizer (chat
    template, LMI's token details), vocabulary size, ``max_model_len`` (tokens) and engine
    options; the routes read it as they read an Engine."""

    tokenizer: object
    vocab_size: int
    max_model_len: int
    config: EngineConfig

    def tokenize(self, prompt) -> list[int]:
        """``Engine.tokenize``: the token ids the replicas' engines run for ``prompt``.

        Raises:
            InvalidPromptError: as :func:`pagedlora.input_processor.tokenize`.
        """
        return tokenize(self.tokenizer, self.vocab_size, prompt)


@dataclass(frozen=True)
class Work:
    """One replica call: prompts that all use one adapter (``adapter`` None: the base model),
    one SamplingParams per prompt."""

    prompts: list
    adapter: AdapterRef | None
    params: list[SamplingParams]


@dataclass(frozen=True)
class Accepted:
    """First message of a call: the replica's engine has queued the prompts."""

    replica: str


# Refused.kind -> the exception it stands for, on both sides
ERRORS: dict[str, type[Exception]] = {
    "queue_full": QueueFull, "prompt": PromptRejected, "adapter": UnknownAdapterError,
    "invalid_adapter": AdapterError, "stopped": LoopStopped}


@dataclass(frozen=True)
class Refused:
    """The only message of a call the replica could not take, or the last one of a call
    whose engine loop failed; ``kind``: "queue_full", "prompt", "adapter" (unknown),
    "invalid_adapter" (cannot be loaded), "stopped" (see :data:`ERRORS`)."""

    kind: str
    message: str

    @classmethod
    def of(cls, error: Exception) -> Refused:
        """The message of ``error`` (one of :data:`ERRORS`' types)."""
        kind = next(k for k, t in ERRORS.items() if isinstance(error, t))
        return cls(kind, str(error))

    def error(self) -> Exception:
        """The exception again, on the ingress's side."""
        return ERRORS[self.kind](self.message)


@dataclass(frozen=True)
class ReplicaReport:
    """One replica's accounting at the end of a call (``Engine.stats()`` then).

    Attributes:
        replica: Ray Serve's replica id.
        model: the base model's served name.
        pid: the replica's process id.
        requests_running, requests_waiting: in its engine.
        adapters_registered: adapter names its engine knows.
        loads: pool loads since the start, summed over its adapters: ``from_source`` (read
            from the adapter's source), ``from_disk`` (spill files), ``from_host``.
        adapters: ``Engine.stats()["adapters"]`` entries (tier and counters) of the call's
            adapter.
    """

    replica: str
    model: str
    pid: int
    requests_running: int
    requests_waiting: int
    adapters_registered: int
    loads: dict[str, int]
    adapters: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    """Last message of a call that ran: the replica's report."""

    report: ReplicaReport
