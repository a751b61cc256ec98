"""RequestOutput: what generate returns for one prompt."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedlora.adapter_mix import AdapterMix

from pagedlora.scheduler import TokenLogprobs


@dataclass
class RequestOutput:
    """The result of one request.

    Attributes:
        request_id: engine-unique id.
        prompt: the prompt as given (text, messages or token ids).
        prompt_token_ids: the tokenized prompt.
        text: generated text (special tokens skipped, cut before a stop string).
        token_ids: generated tokens (an EOS or stop token included).
        finish_reason: "stop" (EOS, stop token or string), "length" (max_tokens or
            max_model_len), "abort" (``Engine.abort``, a closed stream, or a missed deadline),
            or "error" (see ``error``).
        adapter: the adapter name or :class:`~pagedlora.AdapterMix` it ran with, None for the
            base model.
        error: why the request failed, when finish_reason is "error".
        queue_time: seconds from arrival to first scheduled.
        ttft: time to first token, seconds from arrival.
        tpot: time per output token after the first, seconds (0 with one token).
        num_preemptions: times its KV pages were freed and recomputed.
        num_cached_tokens: prompt tokens whose K/V came from the prefix cache.
        logprobs: with ``SamplingParams.logprobs``, one :class:`TokenLogprobs` per token of
            ``token_ids`` (its log-probability, rank and the most likely tokens); else None.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs``, one per prompt token, None
            for the first (nothing predicts it), as vLLM's; else None.
    """

    request_id: int
    prompt: object
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    adapter: str | AdapterMix | None
    error: str | None = None
    queue_time: float | None = None
    ttft: float | None = None
    tpot: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class StreamOutput:
    """What one step added to one request (``Engine.stream`` yields these).

    Attributes:
        request_id: engine-unique id.
        index: position of the request's prompt in the call that submitted it.
        new_text: text added since the previous StreamOutput of this request (while it runs,
            the last ``len(longest stop string) - 1`` characters are held back).
        new_token_ids: tokens sampled since the previous one.
        finished: whether this is the request's last StreamOutput.
        output: the complete RequestOutput, on the last one; None before.
        new_logprobs: with ``SamplingParams.logprobs``, those of ``new_token_ids``; else None.
        prompt_token_ids: the tokenized prompt, on the request's first StreamOutput; None on
            the others.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs``, on the request's first
            StreamOutput, as ``RequestOutput.prompt_logprobs``; else None.
    """

    request_id: int
    index: int
    new_text: str
    new_token_ids: list[int]
    finished: bool
    output: RequestOutput | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
