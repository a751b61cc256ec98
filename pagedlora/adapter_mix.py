"""AdapterMix: one request's scaled adapter, or weighted combination of adapters."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from pagedlora.errors import AdapterMixError, UnknownAdapterError
from pagedlora.scheduler import AdapterTerms


@dataclass(frozen=True, init=False)
class AdapterMix:
    """A weighted combination of LoRA adapters for one request, e.g.
    ``AdapterMix({"fr": 0.7, "es": 0.3})``; ``AdapterMix({"fr": 0.5})`` is one adapter at half
    strength. A plain name stays the common case (one adapter at weight 1).

    The request's delta on each projection is ``sum_i w_i * scaling_i * B_i A_i x``: exactly
    PEFT's ``add_weighted_adapter(adapters, weights, combination_type="cat")`` (which
    concatenates ``w_i * scaling_i * A_i`` and ``B_i`` into one adapter of rank ``sum r_i``),
    served unmerged: a mix's tokens are batched with every other request of the step, each
    adapter reading its own rows with the token's weight (no merged copy, no sub-batch per mix).
    A module that only some adapters target gets only their terms. Weights may be negative
    (task arithmetic) or 0 (the adapter contributes nothing: a mix of zeros runs as the base
    model).

    DoRA adapters are not combinable: their magnitude vector rescales the whole projection
    output, and PEFT defines no weighted combination of DoRA adapters (``add_weighted_adapter``
    builds a plain LoRA from their A and B and drops the magnitudes); a DoRA adapter may only
    appear alone at weight 1 (the same as its plain name).

    Attributes:
        weights: ``(name, weight)`` pairs in the order given; names distinct, weights finite.
        MAX_ADAPTERS: most adapters in one mix (each also counts against the engine's
            ``max_loras``, the most distinct adapters in one step).

    Args:
        weights: adapter name -> weight (a real number).
    Raises:
        AdapterMixError (a ValueError): no adapter, more than ``MAX_ADAPTERS``, a name that is
            empty, a weight that is not finite.
        TypeError: ``weights`` is not a mapping, a name is not a string, a weight not a real
            number (bools are refused).
    """

    weights: tuple[tuple[str, float], ...]
    MAX_ADAPTERS: ClassVar[int] = 8

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not isinstance(weights, Mapping):
            raise TypeError(f"AdapterMix takes a mapping of adapter name -> weight, got "
                            f"{type(weights).__name__}")
        pairs = []
        for name, weight in weights.items():
            if not isinstance(name, str):
                raise TypeError(f"AdapterMix: adapter name {name!r} is not a string")
            if not name:
                raise AdapterMixError("AdapterMix: an adapter name is empty")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"AdapterMix: the weight of adapter {name!r} is "
                                f"{weight!r}, not a real number")
            if not math.isfinite(weight):
                raise AdapterMixError(f"AdapterMix: the weight of adapter {name!r} is "
                                      f"{weight!r}, not a finite number")
            pairs.append((name, float(weight)))
        if not pairs:
            raise AdapterMixError("AdapterMix: the mix names no adapter")
        if len(pairs) > self.MAX_ADAPTERS:
            raise AdapterMixError(f"AdapterMix: {len(pairs)} adapters in one mix; at most "
                                  f"{self.MAX_ADAPTERS} (AdapterMix.MAX_ADAPTERS)")
        object.__setattr__(self, "weights", tuple(pairs))

    def __repr__(self) -> str:
        return f"AdapterMix({dict(self.weights)!r})"

    @property
    def names(self) -> list[str]:
        """The adapters' names, in the order given."""
        return [n for n, _ in self.weights]

    def resolve(self, key_of: Callable[[str], str], is_dora: Callable[[str], bool]
                ) -> str | AdapterTerms | None:
        """The mix as the scheduler takes it: names to content keys, weights of names that
        share content summed, zero terms dropped, sorted by key.

        Args:
            key_of: adapter name -> content key (raises UnknownAdapterError).
            is_dora: content key -> whether the adapter is a DoRA adapter.
        Returns:
            None when every weight is 0 (the base model); a content key when one adapter is
            left at weight 1 (its plain name's request, sharing its prefix cache); else the
            terms.
        Raises:
            UnknownAdapterError: a name never added (the message names the mix).
            AdapterMixError: a DoRA adapter scaled or combined with others.
        """
        summed: dict[str, float] = {}
        for name, weight in self.weights:
            try:
                key = key_of(name)
            except UnknownAdapterError as e:
                raise UnknownAdapterError(f"{self!r}: {e}") from None
            if is_dora(key) and self.weights != ((name, 1.0),):
                raise AdapterMixError(
                    f"{self!r}: adapter {name!r} is a DoRA adapter, which can only be used "
                    f"alone at weight 1 (its magnitude rescales the whole projection; PEFT "
                    f"defines no weighted combination of DoRA adapters)")
            summed[key] = summed.get(key, 0.0) + weight
        terms = tuple(sorted((k, w) for k, w in summed.items() if w != 0.0))
        if not terms:
            return None
        if len(terms) == 1 and terms[0][1] == 1.0:
            return terms[0][0]
        return terms
