"""InputProcessor: a prompt, an adapter name and sampling options -> a validated Request."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from pagedlora.errors import InvalidPromptError
from pagedlora.sampler import RequestSampling
from pagedlora.sampling_params import SamplingParams
from pagedlora.scheduler import Request

Prompt = str | list[dict] | list[int]


class InputProcessor:
    """Tokenizes and validates prompts and builds the scheduler's Requests (vLLM's input
    processor: the one place that turns user input into engine requests).

    A prompt is a string (tokenized as is), a list of chat messages (rendered with the model's
    chat template and a generation prompt) or a list of token ids. Thread-safe: request ids come
    from one counter, everything else is read-only.

    Args:
        tokenizer: an HF tokenizer, or None (token-id prompts only).
        vocab_size: token ids must be below it.
        max_model_len: a prompt must be shorter (its first output token must fit).
        eos_token_ids: tokens that end a request with "stop" unless ``ignore_eos``.
        seed: the engine seed; a request without its own seed samples from a generator seeded
            with ``seed * 1_000_003 + request_id`` (modulo 2**64 when out of torch's range).
        ttft_deadline_s: the engine-wide first-token deadline, seconds (None: none).
        key_of: adapter name -> content key (raises ``UnknownAdapterError``).
        rejection: ``(prompt tokens, adapter key) -> reason or None``: why such a request could
            never fit the pool (the scheduler's check).
        clock: seconds, the scheduler's clock (arrival times, deadlines).
    """

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int,
                 eos_token_ids: set[int], seed: int, ttft_deadline_s: float | None,
                 key_of: Callable[[str], str],
                 rejection: Callable[[int, str | None], str | None],
                 clock: Callable[[], float]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.seed = seed
        self.ttft_deadline_s = ttft_deadline_s
        self.key_of = key_of
        self.rejection = rejection
        self.clock = clock
        self._ids = itertools.count()

    def next_id(self) -> int:
        """A new request id (also for a prompt that fails validation)."""
        return next(self._ids)

    def adapter_keys(self, names: Sequence[str | None]) -> list[str | None]:
        """The content key of each adapter name (None stays None, the base model).

        Raises:
            UnknownAdapterError: a name never added.
        """
        return [None if n is None else self.key_of(n) for n in names]

    def process_all(self, prompts: Sequence[Prompt], adapters: Sequence[str | None],
                    params: Sequence[SamplingParams], *, all_or_none: bool = False
                    ) -> list[tuple[int, Request | None, str | None]]:
        """Processes one call's prompts (index = position): ``(request id, Request, None)``
        each, or ``(request id, None, reason)`` for an invalid prompt.

        Raises:
            UnknownAdapterError: an adapter name never added (before any prompt is processed).
            InvalidPromptError: the first invalid prompt, with ``all_or_none``.
        """
        keys = self.adapter_keys(adapters)
        made = []
        for i, (prompt, key, sp) in enumerate(zip(prompts, keys, params, strict=True)):
            rid = self.next_id()
            try:
                made.append((rid, self.process(prompt, key, sp, request_id=rid, index=i), None))
            except InvalidPromptError as e:
                if all_or_none:
                    raise
                made.append((rid, None, str(e)))
        return made

    def process(self, prompt: Prompt, adapter_key: str | None, params: SamplingParams, *,
                request_id: int, index: int = 0) -> Request:
        """The Request for ``prompt``, the ``index``-th of its call.

        Raises:
            InvalidPromptError: an empty prompt, one of ``max_model_len`` tokens or more,
                token ids outside the vocabulary, messages without string role and content,
                a model without a tokenizer for text, a failing chat template, or one that
                could never fit the pool next to its adapter; the message names ``index``.
        """
        where = f"prompt {index}"
        try:
            tokens = self.tokenize(prompt)
        except InvalidPromptError as e:
            raise InvalidPromptError(f"{where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a template error... fails this prompt alone
            raise InvalidPromptError(f"{where}: {type(e).__name__}: {e}") from e
        if not tokens:
            raise InvalidPromptError(f"{where}: the prompt is empty")
        if len(tokens) >= self.max_model_len:
            raise InvalidPromptError(f"{where}: the prompt has {len(tokens)} tokens; "
                                     f"max_model_len is {self.max_model_len}")
        reason = self.rejection(len(tokens), adapter_key)
        if reason is not None:
            raise InvalidPromptError(f"{where}: {reason}")
        now = self.clock()
        deadline_s = params.deadline_s or self.ttft_deadline_s
        seed = params.seed
        if seed is None:
            seed = self.seed * 1_000_003 + request_id
            if not -2**63 <= seed < 2**64:  # torch takes 64 bits; in range, unchanged
                seed %= 2**64
        stop = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        return Request(request_id=request_id, prompt_token_ids=tokens,
                       max_tokens=params.max_tokens, adapter_key=adapter_key, arrival_time=now,
                       deadline=None if deadline_s is None else now + deadline_s,
                       stop_token_ids=frozenset(stop),
                       sampling=RequestSampling(params, seed))

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids (see the class docstring).

        Raises:
            InvalidPromptError: token ids outside the vocabulary, malformed messages, text
                without a tokenizer, or a prompt of another type.
        """
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidPromptError(f"token ids {bad[:5]} are outside the vocabulary "
                                         f"(0..{self.vocab_size - 1})")
            return list(prompt)
        if self.tokenizer is None:
            raise InvalidPromptError("the model has no tokenizer; pass token ids")
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            for i, m in enumerate(prompt):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidPromptError(f"chat message {i} needs a string 'role' and "
                                             f"'content', got keys {sorted(m)}")
            text = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                      tokenize=False)
            return self.tokenizer(text, add_special_tokens=False).input_ids
        raise InvalidPromptError(f"a prompt must be a string, chat messages or token ids, "
                                 f"got {type(prompt).__name__}")


def as_prompt_list(prompts) -> list:
    """``prompts`` as a list of prompts (one prompt, or a list of them).

    Raises:
        TypeError: neither.
    """
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, chat messages, token ids or a list of "
                        f"those, got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], (dict, int)):
        return [prompts]  # one chat conversation or one token-id prompt
    return prompts


def per_prompt(value, n: int, what: str) -> list:
    """``value`` (one for all, or a list of one per prompt) as a list of ``n``.

    Raises:
        TypeError: a value of the wrong type (``what`` names the argument).
        ValueError: a list whose length is not ``n``.
    """
    if value is None or isinstance(value, (str, SamplingParams)):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be one value for all prompts or a list of one per "
                        f"prompt, got {type(value).__name__}")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
    want, wanted = ((SamplingParams, "a SamplingParams") if what == "sampling_params"
                    else ((str, type(None)), "a name or None"))
    bad = [i for i, v in enumerate(value) if not isinstance(v, want)]
    if bad:
        raise TypeError(f"{what}[{bad[0]}] has type {type(value[bad[0]]).__name__}; "
                        f"expected {wanted}")
    return value
