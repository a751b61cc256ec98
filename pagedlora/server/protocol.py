"""Request bodies of the HTTP API (OpenAI and SageMaker LMI), their validation, and errors.

Bodies are validated strictly (no string-to-number coercion) and unknown fields are refused
with a 400 naming them, so a client never gets a silent default for an option it asked for.
Fields that OpenAI defines but pagedlora does not implement are accepted only at their
neutral value (``n=1``, penalties 0...). Log-probabilities (``logprobs``, ``top_logprobs``,
vLLM's ``prompt_logprobs``, LMI's ``top_n_tokens``) take at most the engine's
``max_logprobs`` top tokens (``--max-logprobs``, 20 by default); above it is a 400 naming the
field.
"""

from __future__ import annotations

import difflib
import json
import types
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pagedlora.sampling_params import SamplingParams

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error",
                409: "conflict_error", 413: "request_too_large", 503: "overloaded_error",
                500: "internal_error"}


class ApiError(Exception):
    """An HTTP error, answered as OpenAI's error object
    ``{"error": {"message", "type", "param", "code"}}`` (which the ``openai`` client raises as
    ``BadRequestError``, ``NotFoundError``...).

    Args:
        status: HTTP status code.
        message: what went wrong, naming the offending model, adapter or field.
        param: the offending request field, if one.
        headers: extra response headers (``Retry-After`` for 503).
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON error object."""
        return {"error": {"message": self.message,
                          "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.status}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _where(loc: tuple) -> str:
    """A field path without pydantic's union-member tags: ("stop", "list[str]", 0) -> stop.0"""
    return ".".join(str(p) for p in loc
                    if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS))


# Other APIs' names for a field (HF generate and TGI, LMI, OpenAI), suggested when a body uses
# one where the other is this body's name.
_OTHER_NAMES = {"max_tokens": "max_new_tokens", "max_new_tokens": "max_tokens",
                "max_completion_tokens": "max_new_tokens", "stop_sequences": "stop",
                "adapter": "adapters", "adapter_id": "adapters", "lora": "adapters",
                "prompt": "inputs", "inputs": "prompt", "lora_id": "lora_name"}


def _model_at(model: type[BaseModel], path: tuple) -> type[BaseModel] | None:
    """The body model that holds the field at ``path`` (list indices skipped), or None."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        todo, model = [field.annotation], None
        while todo and model is None:  # the first BaseModel inside Optional/list/Union
            t = todo.pop(0)
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
            elif isinstance(t, types.UnionType) or typing.get_origin(t) is not None:
                todo.extend(typing.get_args(t))
        if model is None:
            return None
    return model


def _suggestion(model: type[BaseModel], loc: tuple) -> str:
    """'; did you mean X?' for an unsupported field that is another API's name for field X, or
    close to the spelling of one; else ''."""
    holder = _model_at(model, loc[:-1])
    if holder is None or not isinstance(loc[-1], str):
        return ""
    known = list(holder.model_fields)
    other = _OTHER_NAMES.get(loc[-1])
    close = [other] if other in known else difflib.get_close_matches(loc[-1], known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_body(model: type[BaseModel], raw: bytes, query: dict | None = None) -> Any:
    """Validates a JSON request body as ``model``.

    Args:
        query: fields given in the query string instead (DJL's management API takes its
            parameters there); with it, an empty body stands for ``{}``.
    Raises:
        ApiError: 400 for malformed JSON (with the position), a body that is not a JSON object,
            a field given both in the query string and the body, or fields that fail
            validation (each named with its reason; an unsupported field with the supported
            one it likely means, e.g. ``max_tokens`` -> ``max_new_tokens`` in SageMaker's
            ``parameters``).
    """
    try:
        data = {} if query is not None and not raw.strip() else json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    if query:
        both = sorted(set(query) & set(data))
        if both:
            raise ApiError(400, f"{both} given both in the query string and the body")
        data = {**query, **data}
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems, first = [], None
        for err in e.errors():
            where = _where(err["loc"])
            first = first or where or None
            msg = ("unsupported field" + _suggestion(model, err["loc"])
                   if err["type"] == "extra_forbidden"
                   else err["msg"].removeprefix("Value error, "))
            problem = f"{where}: {msg}" if where else msg
            if problem not in problems:
                problems.append(problem)
        raise ApiError(400, "invalid request: " + "; ".join(problems), param=first) from None


def sampling_params(**kwargs) -> SamplingParams:
    """``SamplingParams(**kwargs)``, with its validation error as a 400."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise ApiError(400, f"invalid sampling parameters: {e}") from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Neutral(_Strict):
    """A body whose fields in ``NEUTRAL`` (defined by the API, not implemented here) are
    accepted only at their neutral value."""

    NEUTRAL: ClassVar[dict[str, object]] = {}

    @model_validator(mode="after")
    def _only_neutral(self):
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value != neutral:
                raise ValueError(f"{name}={value!r} is not supported (only {neutral!r})")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAIRequest(_Neutral):
    """Fields shared by /v1/completions and /v1/chat/completions (names as OpenAI's)."""

    # OpenAI's fields that pagedlora does not implement: accepted only at these values
    NEUTRAL: ClassVar[dict[str, object]] = {"n": 1, "presence_penalty": 0,
                                            "frequency_penalty": 0, "logit_bias": None}

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # end-user id, for the caller's records
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    # pagedlora's extension: a scaled adapter or weighted mix of adapters of the base model
    # that ``model`` names, {name: weight} (the openai client: extra_body={"adapters": ...})
    adapters: dict[str, float] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The request's SamplingParams; ``max_tokens`` defaults to ``default_max_tokens``.

        Raises:
            ApiError: 400 naming the invalid value (e.g. ``max_tokens`` 0, ``top_p`` 2).
        """
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = getattr(self, "max_completion_tokens", None)
        if max_tokens is None:  # not "or": an explicit 0 is refused, not replaced
            max_tokens = default_max_tokens
        return sampling_params(max_tokens=max_tokens, temperature=self.temperature,
                               top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                               stop=[] if self.stop is None else self.stop,
                               stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                               logprobs=self.sample_logprobs,
                               prompt_logprobs=self.prompt_logprob_count)

    @property
    def sample_logprobs(self) -> int | None:
        """Top tokens per generated token (``SamplingParams.logprobs``), None for none."""
        return None

    @property
    def prompt_logprob_count(self) -> int | None:
        """Top tokens per prompt token (``SamplingParams.prompt_logprobs``), None for none."""
        return self.prompt_logprobs

    def check_logprobs(self, limit: int) -> None:
        """Raises: ApiError: 400 naming the first field asking more top tokens than
        ``limit`` (the engine's ``max_logprobs``)."""
        for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
            k = getattr(self, name, None)
            if isinstance(k, int) and not isinstance(k, bool) and k > limit:
                raise ApiError(400, f"{name}={k} exceeds the largest number of log-probabilities "
                               f"this server returns, {limit} (--max-logprobs)", param=name)

    @property
    def max_tokens_field(self) -> str:
        """The body's name for the output length it asked for (for messages)."""
        if self.max_tokens is None and getattr(self, "max_completion_tokens", None) is not None:
            return "max_completion_tokens"
        return "max_tokens"

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk holding ``usage``."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_OpenAIRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or a list
    of token-id lists (one choice per prompt). ``logprobs=k``: each generated token's
    log-probability and the k most likely tokens'; ``echo``: the prompt before the text (and,
    with ``logprobs``, its tokens' entries first, the first one null), as lm-evaluation-harness
    scores continuations; ``prompt_logprobs=k`` (vLLM's): vLLM's per-prompt-token object in
    each choice."""

    NEUTRAL: ClassVar[dict[str, object]] = {**_OpenAIRequest.NEUTRAL, "suffix": None,
                                            "best_of": None}

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(default=None, ge=0)

    @property
    def sample_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprob_count(self) -> int | None:
        """vLLM's: with ``echo``, the prompt's entries come with ``logprobs`` top tokens."""
        asked = [k for k in (self.prompt_logprobs,
                             self.logprobs if self.echo else None) if k is not None]
        return max(asked) if asked else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice.

        Raises:
            ApiError: 400 for an empty list.
        """
        p = self.prompt
        if not self.listed:
            return [p]
        if not p:
            raise ApiError(400, "prompt is an empty list", param="prompt")
        return list(p)

    @property
    def listed(self) -> bool:
        """Whether ``prompt`` is a list of prompts (not one string or one list of ids)."""
        p = self.prompt
        return not (isinstance(p, str) or (p and isinstance(p[0], int)))


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message; the roles are OpenAI's (a chat template knows no others)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}`` with text parts joined, as the chat template wants."""
        content = self.content
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_OpenAIRequest):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template.
    ``max_tokens`` (or ``max_completion_tokens``) defaults to the room left in
    ``max_model_len``. ``logprobs: true`` returns each generated token's log-probability,
    with the ``top_logprobs`` most likely tokens (which needs ``logprobs``, as OpenAI's)."""

    NEUTRAL: ClassVar[dict[str, object]] = {**_OpenAIRequest.NEUTRAL, "tools": None}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[dict] | None = None

    @property
    def sample_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_logprobs(self, limit: int) -> None:
        """Raises: ApiError: 400 for ``top_logprobs`` without ``logprobs``, or as
        :meth:`_OpenAIRequest.check_logprobs`."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        super().check_logprobs(limit)


class RegisterAdapterRequest(_Neutral):
    """LMI's ``POST /models/{model}/adapters`` (DJL's parameters). ``preload`` (DJL's default
    true) keeps the weights in host memory; ``pin`` (keeping an adapter in device memory for
    good) is accepted only false: here an adapter stays in the pool while its requests run and
    is then evicted least recently used."""

    NEUTRAL: ClassVar[dict[str, object]] = {"pin": False}

    name: str = Field(min_length=1)
    src: str = Field(min_length=1)
    preload: bool = True
    pin: bool = False


class LoadAdapterRequest(_Strict):
    """``POST /v1/load_lora_adapter`` (vLLM's body); ``model`` names the base model, needed
    when several are served; ``load_inplace`` (vLLM's) replaces the weights of a name already
    loaded, which is otherwise refused."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    model: str | None = None
    load_inplace: bool = False


class UnloadAdapterRequest(_Strict):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM's clients send it; names are what count here


class InvocationParameters(_Neutral):
    """SageMaker LMI's ``parameters`` (its input/output schema's GenerationParameters). As in
    LMI (and HF ``generate``), decoding is greedy unless ``do_sample`` is true;
    ``temperature``, ``top_p`` and ``top_k`` apply only when sampling. ``details`` adds LMI's
    ``details`` object to each result (each generated token's ``log_prob``; with
    ``top_n_tokens`` also its most likely alternatives, with ``decoder_input_details`` the
    input tokens' as ``prefill``), ``return_full_text`` puts the input before the text.
    ``stop_sequences`` (LMI's name) and ``stop`` both end the output. LMI's parameters that
    pagedlora does not implement are accepted only at their neutral value."""

    NEUTRAL: ClassVar[dict[str, object]] = {"repetition_penalty": 1.0, "n": 1, "best_of": 1,
                                            "num_beams": 1}

    max_new_tokens: int = 30  # LMI's default
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: str | list[str] | None = None
    stop_sequences: list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos_token: bool = False
    seed: int | None = None
    details: bool = False
    return_full_text: bool = False
    repetition_penalty: float = 1.0
    decoder_input_details: bool = False
    top_n_tokens: int = Field(default=0, ge=0)
    n: int = 1
    best_of: int = 1
    num_beams: int = 1

    @property
    def stop_strings(self) -> list[str]:
        """``stop`` and ``stop_sequences`` together."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return stop + list(self.stop_sequences or [])

    def to_sampling_params(self) -> SamplingParams:
        """Raises: ApiError: 400 naming the invalid value."""
        sample = self.do_sample
        return sampling_params(max_tokens=self.max_new_tokens,
                               temperature=self.temperature if sample else 0.0,
                               top_p=self.top_p if sample else 1.0,
                               top_k=self.top_k if sample else 0, seed=self.seed,
                               stop=self.stop_strings, stop_token_ids=self.stop_token_ids,
                               ignore_eos=self.ignore_eos_token,
                               logprobs=self.top_n_tokens if self.details else None,
                               prompt_logprobs=0 if self.details and self.decoder_input_details
                               else None)

    def check_logprobs(self, limit: int) -> None:
        """Raises: ApiError: 400 when ``top_n_tokens`` exceeds ``limit`` (``max_logprobs``)."""
        if self.top_n_tokens > limit:
            raise ApiError(400, f"parameters.top_n_tokens={self.top_n_tokens} exceeds the "
                           f"largest number of log-probabilities this server returns, {limit} "
                           f"(--max-logprobs)", param="parameters.top_n_tokens")


MixWeights = dict[str, float]
"""A weighted mix of adapters in a request body, ``{name: weight}`` (``AdapterMix``)."""


class InvocationRequest(_Strict):
    """``POST /invocations`` (SageMaker LMI): ``inputs`` one string or a list; ``adapters``
    one for all inputs or one per input: a name (absent, null or ``""``: the base model, as
    in LMI) or, pagedlora's extension, a weighted mix ``{name: weight}``; ``model`` picks
    the base model when several are served and no ``X-Amzn-SageMaker-Inference-Component``
    header does."""

    inputs: str | list[str]
    adapters: str | MixWeights | list[str | MixWeights | None] | None = None
    parameters: InvocationParameters = Field(default_factory=InvocationParameters)
    model: str | None = None

    def prompts_and_adapters(self) -> tuple[list[str], list[str | MixWeights | None]]:
        """One adapter name, mix (or None) per input.

        Raises:
            ApiError: 400 for no inputs or a count of adapters that differs from the inputs'.
        """
        inputs = [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
        if not inputs:
            raise ApiError(400, "inputs is an empty list", param="inputs")
        adapters = self.adapters
        if adapters is None or isinstance(adapters, (str, dict)):
            return inputs, [_adapter(adapters)] * len(inputs)
        if len(adapters) != len(inputs):
            raise ApiError(400, f"adapters has {len(adapters)} entries for {len(inputs)} "
                           f"inputs; give one name for all or one per input", param="adapters")
        return inputs, [_adapter(a) for a in adapters]


def _adapter(value: str | MixWeights | None) -> str | MixWeights | None:
    """An adapter of /invocations: ``""`` is the base model (as in LMI); a mix, even empty,
    stays a mix (an empty one is refused, naming it)."""
    return value if isinstance(value, dict) else (value or None)
