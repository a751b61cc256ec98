"""Adapter and source errors, free of torch so that the (torch-free) scheduler can catch them."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter that cannot be served as given; the message names the adapter and the cause."""


class UnsupportedAdapterError(NotImplementedError):
    """An adapter using a PEFT feature pagedlora does not implement (named in the message)."""


class AdapterUnavailableError(AdapterError):
    """A registered adapter whose weights cannot be had now: its spill file and its source are
    both unreadable, its source changed since registration, or it was removed while a request
    for it waited. Raised by ``AdapterStore.acquire``; the scheduler fails that request alone."""


class UnknownAdapterError(ValueError):
    """An adapter name that was never added (or was removed); the message lists the known
    ones. A ValueError, so callers that caught that keep working."""


class InvalidPromptError(ValueError):
    """A prompt the engine cannot run: empty, too long for ``max_model_len``, token ids outside
    the vocabulary, a chat template that fails, or too large for the pool next to its adapter.
    The message names the prompt by its position in the call."""
class SourceError(OSError):
    """A model or adapter source that cannot be had as given: a missing path, bucket, key or
    cached model id, an unreachable or refusing S3 endpoint, a download that fails its size or
    integrity check, an unreadable or unsafe archive. The message names the URL or path."""


class EngineDeadError(RuntimeError):
    """The engine cannot run any more: a tensor-parallel worker died, failed or hung (the
    message names the rank), or the engine was closed. Every later call raises it; make a new
    Engine."""


class AdapterMixError(ValueError):
    """An :class:`~pagedlora.AdapterMix` that cannot be served: empty, a weight that is not a
    finite number, more adapters than ``AdapterMix.MAX_ADAPTERS``, or a DoRA adapter scaled or
    combined with others. The message names the mix and the offending adapter or weight."""
