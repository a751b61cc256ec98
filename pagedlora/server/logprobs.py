"""Log-probabilities in the HTTP APIs' forms: OpenAI's completions (legacy) and chat objects,
vLLM's ``prompt_logprobs`` and SageMaker LMI's ``details``, made from the engine's
:class:`~pagedlora.TokenLogprobs`."""

from __future__ import annotations

from collections.abc import Sequence

from pagedlora.scheduler import TokenLogprobs


class TokenTexts:
    """Each token's own text, ``tokenizer.decode([id])`` with special tokens kept (what vLLM
    reports as a token's ``decoded_token``), cached per id. A token that ends inside a UTF-8
    character decodes to U+FFFD, as in vLLM and OpenAI, whose ``bytes`` then tell the truth
    only for whole characters.

    Args:
        tokenizer: an HF tokenizer, or None (texts are then empty).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = "" if self.tokenizer is None else self.tokenizer.decode([token_id])
            self._texts[token_id] = text
        return text


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[TokenLogprobs | None],
                        texts: TokenTexts, k: int, offset: int = 0) -> tuple[dict, int]:
    """OpenAI's completions ``logprobs`` object for these tokens: ``tokens`` (texts),
    ``token_logprobs``, ``top_logprobs`` (text -> logprob of the ``k`` most likely tokens and of
    the token itself, as vLLM's) and ``text_offset`` (each token's character offset in the
    choice's text, from ``offset``); an entry None (the first prompt token, with ``echo``) is
    null in the last three.

    Returns:
        ``(object, offset after the last token)``, so that a stream's chunks continue it.
    Raises:
        ValueError: ``token_ids`` and ``entries`` of different lengths.
    """
    if len(token_ids) != len(entries):
        raise ValueError(f"{len(token_ids)} tokens, {len(entries)} logprob entries")
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, e in zip(token_ids, entries, strict=True):
        text = texts(token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {texts(t): lp for t, lp in e.top[:k]}
        top.setdefault(text, e.logprob)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(entries: Sequence[TokenLogprobs], texts: TokenTexts, k: int) -> dict:
    """OpenAI's chat ``logprobs`` object: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [k x {"token", "logprob", "bytes"}]}]}``."""

    def item(token: int, logprob: float) -> dict:
        text = texts(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token_id, e.logprob),
                         "top_logprobs": [item(t, lp) for t, lp in e.top[:k]]}
                        for e in entries]}


def vllm_prompt_logprobs(entries: Sequence[TokenLogprobs | None], texts: TokenTexts
                         ) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or
    ``{token id: {"logprob", "rank", "decoded_token"}}`` for the token and its most likely
    alternatives (ids as JSON object keys, strings)."""

    def item(logprob: float, rank: int, token: int) -> dict:
        return {"logprob": logprob, "rank": rank, "decoded_token": texts(token)}

    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        d = {str(t): item(lp, j + 1, t) for j, (t, lp) in enumerate(e.top)}
        d.setdefault(str(e.token_id), item(e.logprob, e.rank, e.token_id))
        out.append(d)
    return out


def lmi_token(token: int, logprob: float | None, text: str, special: set[int]) -> dict:
    """LMI's ``{"id", "text", "log_prob"}`` (``"special_token": true`` for special tokens)."""
    item = {"id": token, "text": text, "log_prob": logprob}
    if token in special:
        item["special_token"] = True
    return item
