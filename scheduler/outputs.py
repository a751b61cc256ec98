"""RunnerOutput: what the model runner hands back to the scheduler after a step (no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one position of a sequence: of the token that is there (sampled, or
    the prompt's next token) and of the ``k`` most likely tokens.

    Log-probabilities (natural log) are those of the model's own distribution at the position:
    ``log_softmax`` of the logits (the adapter's, lm_head delta included) before temperature,
    top-k and top-p, as vLLM's default and OpenAI's.

    Attributes:
        token_id: the token at the position (the one sampled, or the prompt token).
        logprob: its log-probability.
        rank: its rank in the distribution: 1 + the number of tokens more likely.
        top: the ``k`` most likely ``(token_id, logprob)``, most likely first (ranks 1..k);
            empty for ``k = 0``.
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RunnerOutput:
    """The sampled tokens of one step, plain Python so that it crosses process boundaries
    (a tensor-parallel worker) as cheaply as it crosses function calls.

    Attributes:
        request_ids: the requests that produced a token this step (their known tokens all
            computed), in the runner's order.
        token_ids: the token sampled for each, same order.
        logprobs: the sampled token's :class:`TokenLogprobs` for each, same order, None for
            requests that did not ask (``SamplingParams.logprobs``); empty when none did.
        prompt_logprobs: ``(request_id, entries)`` for the requests asking for prompt
            logprobs whose step computed positions that predict prompt tokens: entries for
            the prompt tokens ``first + 1, first + 2, ...`` in order, ``first`` the position
            the step's ``SequenceInput.prompt_logprobs_from`` named.
    """

    request_ids: tuple[int, ...] = ()
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    prompt_logprobs: tuple[tuple[int, tuple[TokenLogprobs, ...]], ...] = ()
