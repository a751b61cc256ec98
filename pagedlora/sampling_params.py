"""SamplingParams: how one request's tokens are chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options (names follow vLLM).

    Attributes:
        max_tokens: most output tokens (>= 1).
        temperature: 0 (or below 1e-5) is greedy; otherwise logits are divided by it.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 or -1 keeps all.
        seed: per-request seed for reproducible sampling; None derives one from the engine seed.
        stop: strings that end the output; the text is cut before the first one.
        stop_token_ids: token ids that end the output (kept in token_ids).
        ignore_eos: keep going past the model's end-of-sequence token.
        deadline_s: seconds after arrival by which the first token is due; a request still
            waiting that can no longer make it finishes with "abort" (S-LoRA section 5.2,
            early abort). None: the engine's ``ttft_deadline_s``.
        logprobs: for each generated token, return its log-probability and those of the
            ``logprobs`` most likely tokens (``RequestOutput.logprobs``); 0: the sampled
            token's alone; None: none. Log-probabilities are ``log_softmax`` of the model's
            logits (the adapter's, lm_head delta included) before temperature, top-k and top-p
            (vLLM's default and OpenAI's), so they do not depend on how the token was chosen.
            At most the engine's ``max_logprobs``.
        prompt_logprobs: the same for every prompt token after the first
            (``RequestOutput.prompt_logprobs``), or None. Such a request is served from the
            prefix cache only where it already has the entries (after a preemption). The
            logits of a step's prompt positions are made at once: up to
            ``max_num_batched_tokens`` rows of ``vocab_size`` float32 per step.

    Raises:
        ValueError: naming the offending field, at construction.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: list[int] | tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    deadline_s: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("temperature", "top_p") + (() if self.deadline_s is None else ("deadline_s",)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (all) or a positive int, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, "
                             f"got {self.stop_token_ids!r}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {self.deadline_s!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax: temperature below 1e-5 (as vLLM), where
        ``logits / temperature`` would overflow to Inf and the softmax to NaN."""
        return self.temperature < _GREEDY_BELOW
