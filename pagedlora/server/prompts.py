"""An HTTP request's prompts as token ids, checked against ``max_model_len`` before queueing.

Offline, ``Engine.generate`` lets a request run until ``max_model_len`` and reports "length";
a server client instead asks for ``max_tokens`` and should hear at once when the prompt and
``max_tokens`` together do not fit, with both numbers (vLLM's OpenAI server checks the same after
tokenizing). The prompts are tokenized here, once, in a worker thread (not on the event loop),
and handed to the engine as token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pagedlora.engine import Engine, Prompt
from pagedlora.server.protocol import ApiError


class PromptTokens:
    """The token ids of one request's prompts, each named by where it is in the body.

    Args:
        engine: the base model's engine (its tokenizer and ``max_model_len``).
        model: the model name the client asked for (for messages).
        field: the body field holding the prompts ("prompt", "messages", "inputs").
        ids: token ids, one list per prompt.
        listed: whether the field held a list of prompts (messages then say ``prompt[2]``).
    """

    def __init__(self, engine: Engine, model: str, field: str, ids: list[list[int]],
                 listed: bool) -> None:
        self.max_model_len = engine.max_model_len
        self.model = model
        self.field = field
        self.ids = ids
        self.listed = listed
        for i, p in enumerate(ids):
            if not p:
                raise ApiError(400, f"{self.where(i)} is empty", param=field)
            if len(p) >= self.max_model_len:
                raise ApiError(400, f"{self.where(i)} has {_tokens(len(p))}, which leaves no room "
                               f"for output in max_model_len {self.max_model_len} of model "
                               f"{model!r}; shorten it", param=field)

    @classmethod
    async def of(cls, engine: Engine, model: str, field: str, prompts: Sequence[Prompt],
                 listed: bool) -> PromptTokens:
        """Tokenizes ``prompts`` as the engine would, in a worker thread.

        Raises:
            ApiError: 400 naming the prompt (``field`` or ``field[i]``) that is empty, leaves no
                room below ``max_model_len``, holds token ids outside the vocabulary, or that
                the chat template refuses.
        """
        def tokenize() -> list[list[int]]:
            out = []
            for i, p in enumerate(prompts):
                try:
                    out.append(engine.tokenize(p))
                except Exception as e:  # noqa: BLE001 - a bad prompt (a template error...)
                    reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                    where = f"{field}[{i}]" if listed else field
                    raise ApiError(400, f"{where}: {reason}", param=field) from None
            return out

        return cls(engine, model, field, await asyncio.to_thread(tokenize), listed)

    def where(self, i: int) -> str:
        """How messages name prompt ``i``: ``prompt[2]`` in a list, else the field's name."""
        return f"{self.field}[{i}]" if self.listed else self.field

    @property
    def room(self) -> int:
        """The most output tokens every prompt has room for below ``max_model_len``."""
        return self.max_model_len - max(len(p) for p in self.ids)

    def check_room(self, max_tokens: int, max_field: str) -> None:
        """Raises ApiError 400 naming both numbers when a prompt's tokens plus ``max_tokens``
        (the body's ``max_field``, or its default) exceed ``max_model_len``."""
        for i, p in enumerate(self.ids):
            if len(p) + max_tokens > self.max_model_len:
                raise ApiError(
                    400, f"{self.where(i)} has {_tokens(len(p))} and {max_field} is {max_tokens}: "
                    f"{len(p) + max_tokens} tokens, more than max_model_len "
                    f"{self.max_model_len} of model {self.model!r}; shorten the prompt or lower "
                    f"{max_field} (at most {self.max_model_len - len(p)} here)",
                    param=max_field)


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"
