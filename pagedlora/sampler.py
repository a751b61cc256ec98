"""Sampler: next tokens from last-position logits, per-request temperature, top-k, top-p."""

from __future__ import annotations

import torch

from pagedlora.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> list[int]:
    """Chooses one token per row.

    Greedy rows take the argmax; the others sample from ``softmax(logits / temperature)`` after
    top-k and top-p (nucleus, Holtzman et al. 2020) filtering, drawing from the request's own
    generator so a seeded request is reproducible whatever else shares its batch.

    Args:
        logits: ``[S, vocab_size]`` float32.
        params: one SamplingParams per row.
        generators: one ``torch.Generator`` per row (on the logits' device).
    Returns:
        ``S`` token ids.
    """
    tokens = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token crossing top_p
            row = row.scatter(0, order[drop], float("-inf"))
        probs = row.softmax(-1)
        tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return tokens
