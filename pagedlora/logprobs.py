"""Log-probabilities of chosen tokens and the most likely ones, from logits rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedlora.scheduler import TokenLogprobs


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], ks: Sequence[int]
                   ) -> list[TokenLogprobs]:
    """For each row i: ``log_softmax(logits[i])`` at ``targets[i]``, that token's rank, and the
    ``ks[i]`` most likely tokens, in one batched pass (one log-softmax, one gather, one top-k
    over every row; the Python objects are made from two host copies).

    The rank is vLLM's: the number of tokens at least as likely as the target (1 for the most
    likely; ties count against it).

    Args:
        logits: ``[M, vocab_size]`` float32, the raw logits (before temperature, top-k, top-p).
        targets: ``M`` token ids, the token whose log-probability each row reports.
        ks: ``M`` non-negative counts of top tokens per row.
    Returns:
        ``M`` :class:`TokenLogprobs`, row order.
    Raises:
        ValueError: ``targets`` or ``ks`` of another length than the rows.
    """
    m = logits.shape[0]
    if len(targets) != m or len(ks) != m:
        raise ValueError(f"{m} logits rows, {len(targets)} targets, {len(ks)} top counts")
    if m == 0:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)                       # [M, V]
    t = torch.tensor(list(targets), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, t[:, None])                                   # [M, 1]
    ranks = (lp >= chosen).sum(dim=-1).tolist()
    chosen = chosen[:, 0].tolist()
    k_max = max(ks)
    top_ids: list[list[int]] = [[] for _ in range(m)]
    top_lps: list[list[float]] = [[] for _ in range(m)]
    if k_max:
        top = lp.topk(min(k_max, lp.shape[1]), dim=-1)
        top_ids, top_lps = top.indices.tolist(), top.values.tolist()
    return [TokenLogprobs(token_id=int(targets[i]), logprob=chosen[i], rank=ranks[i],
                          top=tuple(zip(top_ids[i][:ks[i]], top_lps[i][:ks[i]], strict=True)))
            for i in range(m)]
