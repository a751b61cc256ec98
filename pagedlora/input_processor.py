"""InputProcessor: a prompt, an adapter (name or mix) and sampling options -> a validated
Request."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from pagedlora.adapter_mix import AdapterMix
from pagedlora.errors import InvalidPromptError
from pagedlora.sampler import RequestSampling
from pagedlora.sampling_params import SamplingParams
from pagedlora.scheduler import AdapterTerms, Request

Prompt = str | list[dict] | list[int]
Adapter = str | AdapterMix | None
"""What a request runs with: an adapter name, an :class:`AdapterMix`, or None (the base
model)."""
ResolvedAdapter = str | AdapterTerms | None
"""An :data:`Adapter` resolved: a content key, a mix's terms (content key, weight), or None."""


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
        is_dora: content key -> whether it is a DoRA adapter (DoRA adapters are not mixed).
        rejection: ``(prompt tokens, adapter keys) -> reason or None``: why such a request
            could never run (the scheduler's check: the pool, ``max_loras``).
        clock: seconds, the scheduler's clock (arrival times, deadlines).
        max_logprobs: the largest ``logprobs``/``prompt_logprobs`` a request may ask.
    """

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int,
                 eos_token_ids: set[int], seed: int, ttft_deadline_s: float | None,
                 key_of: Callable[[str], str], is_dora: Callable[[str], bool],
                 rejection: Callable[[int, Sequence[str]], str | None],
                 clock: Callable[[], float], max_logprobs: int = 20) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.seed = seed
        self.ttft_deadline_s = ttft_deadline_s
        self.key_of = key_of
        self.is_dora = is_dora
        self.rejection = rejection
        self.clock = clock
        self.max_logprobs = max_logprobs
        self._ids = itertools.count()

    def next_id(self) -> int:
        """A new request id (also for a prompt that fails validation)."""
        return next(self._ids)

    def resolve_adapters(self, adapters: Sequence[Adapter]) -> list[ResolvedAdapter]:
        """Each adapter resolved: a name to its content key, a mix to its terms
        (:meth:`AdapterMix.resolve`), None stays None (the base model).

        Raises:
            UnknownAdapterError: a name never added (alone or in a mix).
            AdapterMixError: a DoRA adapter scaled or mixed.
        """
        return [a.resolve(self.key_of, self.is_dora) if isinstance(a, AdapterMix)
                else None if a is None else self.key_of(a) for a in adapters]

    def process_all(self, prompts: Sequence[Prompt], adapters: Sequence[Adapter],
                    params: Sequence[SamplingParams], *, all_or_none: bool = False
                    ) -> list[tuple[int, Request | None, str | None]]:
        """Processes one call's prompts (index = position): ``(request id, Request, None)``
        each, or ``(request id, None, reason)`` for an invalid prompt.

        Raises:
            UnknownAdapterError: an adapter name never added (before any prompt is processed).
            AdapterMixError: a mix that cannot be served (before any prompt is processed).
            InvalidPromptError: the first invalid prompt, with ``all_or_none``.
        """
        keys = self.resolve_adapters(adapters)
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

    def process(self, prompt: Prompt, adapter: ResolvedAdapter, params: SamplingParams, *,
                request_id: int, index: int = 0) -> Request:
        """The Request for ``prompt``, the ``index``-th of its call, with ``adapter`` (see
        :meth:`resolve_adapters`: a content key, a mix's terms, or None).

        Raises:
            InvalidPromptError: an empty prompt, one of ``max_model_len`` tokens or more,
                token ids outside the vocabulary, messages without string role and content,
                a model without a tokenizer for text, a failing chat template, one that
                could never fit the pool next to its adapters, or a mix of more adapters than
                ``max_loras``; ``logprobs`` or ``prompt_logprobs`` above ``max_logprobs``; the
                message names ``index``.
        """
        where = f"prompt {index}"
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.max_logprobs:
                raise InvalidPromptError(f"{where}: {name}={k} exceeds max_logprobs="
                                         f"{self.max_logprobs}")
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
        mix = adapter if isinstance(adapter, tuple) else ()
        adapter_key = adapter if isinstance(adapter, str) else None
        keys = tuple(k for k, _ in mix) if mix else () if adapter_key is None else (adapter_key,)
        reason = self.rejection(len(tokens), keys)
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
                       max_tokens=params.max_tokens, adapter_key=adapter_key,
                       adapter_mix=mix, arrival_time=now,
                       deadline=None if deadline_s is None else now + deadline_s,
                       stop_token_ids=frozenset(stop),
                       sampling=RequestSampling(params, seed),
                       needs_prompt_logprobs=params.prompt_logprobs is not None)

    def tokenize(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids (see the class docstring and :func:`tokenize`).

        Raises:
            InvalidPromptError: as :func:`tokenize`.
        """
        return tokenize(self.tokenizer, self.vocab_size, prompt)


def tokenize(tokenizer, vocab_size: int, prompt: Prompt) -> list[int]:
    """``prompt``'s token ids: a string through ``tokenizer``, chat messages through its chat
    template with the generation prompt, token ids as they are once checked against
    ``[0, vocab_size)``.

    Raises:
        InvalidPromptError: token ids outside the vocabulary, malformed messages, text
            without a tokenizer (``tokenizer`` None), or a prompt of another type.
    """
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InvalidPromptError(f"token ids {bad[:5]} are outside the vocabulary "
                                     f"(0..{vocab_size - 1})")
        return list(prompt)
    if tokenizer is None:
        raise InvalidPromptError("the model has no tokenizer; pass token ids")
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidPromptError(f"chat message {i} needs a string 'role' and "
                                         f"'content', got keys {sorted(m)}")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
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
    if value is None or isinstance(value, (str, SamplingParams, AdapterMix)):
        return [value] * n
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} must be one value for all prompts or a list of one per "
                        f"prompt, got {type(value).__name__}")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
    want, wanted = ((SamplingParams, "a SamplingParams") if what == "sampling_params"
                    else ((str, AdapterMix, type(None)), "a name, an AdapterMix or None"))
    bad = [i for i, v in enumerate(value) if not isinstance(v, want)]
    if bad:
        raise TypeError(f"{what}[{bad[0]}] has type {type(value[bad[0]]).__name__}; "
                        f"expected {wanted}")
    return value
