"""Sampler: next tokens from last-position logits, per-request temperature, top-k, top-p."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagedlora.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedlora.step_input import SequenceInput


@dataclass(frozen=True)
class RequestSampling:
    """What the sampler needs of one request (``Request.sampling``).

    Attributes:
        params: its sampling options.
        seed: the seed of its generator (its own ``SamplingParams.seed``, or one derived from
            the engine seed and its id), in ``[-2**63, 2**64)``.
    """

    params: SamplingParams
    seed: int


class Sampler:
    """Chooses one token per logits row and owns each request's random generator.

    Greedy rows take the argmax; the others sample from ``softmax(logits / temperature)`` after
    top-k and top-p (nucleus, Holtzman et al. 2020) filtering, drawing from the request's own
    generator (made on its first sampled token, kept until :meth:`forget`), so a seeded request
    is reproducible whatever else shares its batch and however often it is preempted.

    Args:
        device: where generators live (the logits' device).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, rows: Sequence[SequenceInput]) -> list[int]:
        """Tokens for ``logits``.

        Args:
            logits: ``[S, vocab_size]`` float32, row i for ``rows[i]``.
            rows: the sequences sampled, one per logits row (their ``request_id`` and
                ``sampling``).
        Returns:
            ``S`` token ids.
        """
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            p = row.sampling.params
            if p.greedy:
                continue
            x = logits[i] / p.temperature
            if p.top_k > 0 and p.top_k < x.shape[0]:
                kth = torch.topk(x, p.top_k).values[-1]
                x = x.masked_fill(x < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = x.sort(descending=True)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token crossing top_p
                x = x.scatter(0, order[drop], float("-inf"))
            tokens[i] = int(torch.multinomial(x.softmax(-1), 1, generator=self._generator(row)))
        return tokens

    def forget(self, request_ids: Iterable[int]) -> None:
        """Drops the generators of finished requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, row: SequenceInput) -> torch.Generator:
        g = self._generators.get(row.request_id)
        if g is None:
            g = torch.Generator(self.device).manual_seed(row.sampling.seed)
            self._generators[row.request_id] = g
        return g
