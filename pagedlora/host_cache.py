"""HostCache: adapter weights in host memory, bounded, spilling what it pushes out to disk."""

from __future__ import annotations

from collections import OrderedDict

from pagedlora.lora_adapter import AdapterWeights, LoraAdapter
from pagedlora.spill import SpillDir


class HostCache:
    """The host tier: weights of recently used adapters, least recently used first.

    Bounded by a count (``max_cpu_loras``, as in vLLM and SageMaker LMI) and by bytes
    (``host_cache_gb``); a copy pushed out by either is written to the spill directory (S-LoRA,
    section 4: adapters are fetched from host memory into the device pool on demand). Not
    locked: the AdapterStore's lock guards it.

    Args:
        spill: where pushed-out copies go.
        max_adapters: most adapters held; None for no limit, 0 for none.
        max_bytes: most bytes of weights held; None for no limit.
    """

    def __init__(self, spill: SpillDir, *, max_adapters: int | None,
                 max_bytes: int | None) -> None:
        self.spill = spill
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[LoraAdapter, AdapterWeights]] = OrderedDict()
        self._num_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def keys(self) -> list[str]:
        """Content keys held, least recently used first."""
        return list(self._entries)

    @property
    def num_bytes(self) -> int:
        """Bytes of the weights held."""
        return self._num_bytes

    def get(self, key: str) -> AdapterWeights | None:
        """``key``'s weights (now the most recently used), or None when not held."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, adapter: LoraAdapter, weights: AdapterWeights) -> list[LoraAdapter]:
        """Holds ``weights`` as the most recently used, then pushes out the least recently used
        (possibly this one, if the budget is 0 or smaller than it) until both bounds hold,
        spilling each.

        Returns:
            the adapters pushed out.
        """
        self.discard(adapter.key)
        self._entries[adapter.key] = (adapter, weights)
        self._num_bytes += adapter.num_bytes
        pushed = []
        while self._entries and (
                (self.max_adapters is not None and len(self._entries) > self.max_adapters)
                or (self.max_bytes is not None and self._num_bytes > self.max_bytes)):
            _, (old, old_weights) = self._entries.popitem(last=False)
            self._num_bytes -= old.num_bytes
            self.spill.write(old, old_weights)
            pushed.append(old)
        return pushed

    def discard(self, key: str) -> None:
        """Drops ``key``'s copy, if held, without spilling it."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._num_bytes -= entry[0].num_bytes
