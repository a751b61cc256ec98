"""Detokenizer: one request's output text, grown token by token, and its stop strings."""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """Incremental detokenization: each new token costs a decode of a few tokens, not of the
    whole output, so streaming and stop strings stay linear in the output length.

    Decodes the window ``tokens[prefix:]`` and emits what it adds beyond the decode of
    ``tokens[prefix:read]``; a window ending in an incomplete UTF-8 sequence ("\\ufffd") emits
    nothing until the next token completes it (the scheme of HF text-generation-inference and
    vLLM).

    Args:
        tokenizer: an HF tokenizer, or None (token-id prompts only: text stays empty).
        stop: strings that end the output; the text is cut before the first one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.text = ""  # all decoded text so far, stop string included
        self.stopped_at: int | None = None  # where the first stop string starts in ``text``
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0
        self._emitted = 0  # characters of ``text`` handed out by ``new_text``

    def push(self, token: int) -> None:
        """Adds one output token; afterwards ``stopped_at`` tells whether a stop string
        appeared."""
        if self.tokenizer is None:
            return
        self._tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self._tokens[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self._tokens[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return
        added = after[len(before):]
        self._prefix, self._read = self._read, len(self._tokens)
        start = len(self.text)
        self.text += added
        if self.stop and self.stopped_at is None:
            longest = max(map(len, self.stop))
            window = max(0, start - longest + 1)
            cuts = [i for s in self.stop if (i := self.text.find(s, window)) >= 0]
            if cuts:
                self.stopped_at = min(cuts)

    @property
    def final_text(self) -> str:
        """The output text, cut before the first stop string."""
        return self.text if self.stopped_at is None else self.text[:self.stopped_at]

    def new_text(self, finished: bool) -> str:
        """Text not handed out yet. While running, the last ``len(longest stop) - 1``
        characters are held back, since they may begin a stop string that is cut later."""
        end = len(self.final_text)
        if not finished and self.stop:
            end = max(self._emitted, end - max(map(len, self.stop)) + 1)
        piece = self.final_text[self._emitted:end]
        self._emitted = end
        return piece
