"""MergePolicy: per step, whether to run on merged weights (one adapter folded into the base).

Torch-free: it sees only the step's adapter keys. The merged weights themselves are the model
runner's (:class:`pagedlora.merged_weights.MergedWeights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

MERGE_POLICIES = ("never", "auto")

# Single-adapter steps an adapter runs unmerged before it is merged: the credit a merge costs,
# in steps. Ski rental: paying the LoRA overhead until it adds up to the cost of one merge, then
# merging, costs at most twice what knowing the future would. Measured on this project's shared
# 2-core CPU (SmolLM2-135M, fp32, decode steps of 32 sequences): merging mixed-4's largest
# adapter (rank 32 on all seven projections: 405 MiB of copies) took 0.27 s (0.8 s when the
# copies' memory is fresh) against a decode step of 184 ms unmerged, 130 ms merged (55 ms
# saved: 5-15 steps to pay back); its q/v rank-4 adapter merges in 0.02 s and saves a few ms a
# step. A GPU shrinks both. One constant for all adapters, so that a run is reproducible (the
# decision depends on the batches only, not on timings, which dLoRA's tuned thresholds do).
MERGE_AFTER_STEPS = 8


@dataclass
class MergeStats:
    """The policy's counters since the start.

    Attributes:
        merged_steps: steps run on merged weights.
        merges: switches into merged mode that folded an adapter in (a merge was computed).
        reuses: switches into merged mode on the copy already made for the same adapter.
        unmerges: switches back to unmerged steps (free: the base weights were never changed).
    """

    merged_steps: int = 0
    merges: int = 0
    reuses: int = 0
    unmerges: int = 0

    @property
    def switches(self) -> int:
        """Mode changes, in and out."""
        return self.merges + self.reuses + self.unmerges


class MergePolicy:
    """Decides per step whether it runs on one adapter's merged weights (``W + scale * B A``
    for every module it targets: the base model's speed, no LoRA kernels) or unmerged (the LoRA
    of every sequence added through shrink/expand).

    The two kinds of LoRA serving of the article this project grew from, switched at run time
    as dLoRA does (Wu et al., "dLoRA: Dynamically Orchestrating Requests and Adapters for LoRA
    LLM Serving", OSDI 2024, section 4: credit-based merge/unmerge with hysteresis). dLoRA's
    scheduler defers other adapters' requests to keep a merged batch (entering merged mode when
    the top adapter holds all of the FCFS batch, leaving when its share falls below a lower
    threshold, credits against starvation); here the scheduler's batches are kept as they are
    (merged mode changes how a step computes, never which requests run), so:

    - A step is merged only when every scheduled request uses one adapter at weight 1 (no
      base request, no mix, no request scaling it by ``AdapterMix({name: w})``, w != 1: a
      merged copy holds one adapter at one weight, and scaled or mixed requests are the
      varied traffic merging does not pay for), and unmerged exactly when another adapter, a
      mix, a scaled request or a base request joins. DoRA adapters are merged too
      (``g * (W + scale * B A)``, see :class:`~pagedlora.merged_weights.MergedWeights`).
    - Entering has hysteresis: an adapter earns one credit per single-adapter step it runs
      unmerged (steps of other batches pause, not reset, its credit; a single-adapter step of
      another adapter moves the credit to that one) and is merged once it has run
      :data:`MERGE_AFTER_STEPS` such steps unmerged.
    - Leaving costs nothing and the merged copy is kept (the base weights are never changed),
      so the same adapter re-enters merged mode at once, without recomputing it: a hot
      adapter that a base request interrupts loses only the interrupted steps.

    The decision depends only on the sequence of batches (no clock), so a run is reproducible.

    Args:
        policy: "never" (always unmerged) or "auto" (as above).
        merge_after_steps: single-adapter steps an adapter runs unmerged before it is merged
            (0: merged from its first such step).
    Raises:
        ValueError: an unknown policy, or a merge_after_steps that is not an int >= 0.
    """

    def __init__(self, policy: str = "never", merge_after_steps: int = MERGE_AFTER_STEPS
                 ) -> None:
        if policy not in MERGE_POLICIES:
            raise ValueError(f"merge_policy must be one of {MERGE_POLICIES}, got {policy!r}")
        if isinstance(merge_after_steps, bool) or not isinstance(merge_after_steps, int) \
                or merge_after_steps < 0:
            raise ValueError(f"merge_after_steps must be an int >= 0, got {merge_after_steps!r}")
        self.policy = policy
        self.merge_after_steps = merge_after_steps
        self.stats = MergeStats()
        self._candidate: str | None = None  # the adapter earning credit
        self._credit = 0
        self._copy: str | None = None  # the adapter whose merged copy exists (told to merge)
        self._last: str | None = None  # the adapter the last step ran merged with

    @property
    def merged_copy(self) -> str | None:
        """The adapter key whose merged weights the runner holds (the last one merged)."""
        return self._copy

    def forget(self) -> None:
        """Forgets the merged copy and every credit (after the runner dropped its copies);
        the counters stay."""
        self._candidate, self._credit, self._copy, self._last = None, 0, None, None

    def decide(self, adapter_keys: Sequence[str | None],
               mergeable: Callable[[str], bool] | None = None) -> str | None:
        """The adapter to run this step merged with, or None (unmerged).

        Args:
            adapter_keys: each scheduled request's adapter content key at weight 1 (None: the
                base model, a weighted mix or a scaled adapter, none of which is merged).
            mergeable: whether an adapter can be merged at all (one with LoRA on
                ``embed_tokens`` or ``lm_head`` cannot); None: every adapter can. A step of an
                adapter that cannot runs unmerged and earns no credit.
        Returns:
            the single adapter's key when the step runs merged, else None.
        """
        if not adapter_keys:
            return None
        merged = self._choose(set(adapter_keys), mergeable)
        if merged is not None:
            self.stats.merged_steps += 1
            if merged != self._last and merged == self._copy:
                self.stats.reuses += 1
            elif merged != self._copy:
                self.stats.merges += 1
                self._copy = merged
        elif self._last is not None:
            self.stats.unmerges += 1
        self._last = merged
        return merged

    def _choose(self, keys: set[str | None], mergeable: Callable[[str], bool] | None
                ) -> str | None:
        if self.policy == "never" or len(keys) != 1 or None in keys:
            return None
        (key,) = keys
        if mergeable is not None and not mergeable(key):
            return None
        if key == self._copy:
            return key
        if key != self._candidate:
            self._candidate, self._credit = key, 0
        self._credit += 1
        if self._credit > self.merge_after_steps:
            self._candidate, self._credit = None, 0
            return key
        return None
