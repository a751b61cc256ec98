"""SageMaker LMI's configuration keys (``OPTION_*`` environment variables, ``option.*`` keys of
``serving.properties``) and what each means here: mapped onto an engine or server option,
accepted with a logged note because it has no meaning in pagedlora, or refused.

Precedence is LMI's (a model's ``serving.properties`` over the environment), with
``pagedlora serve``'s explicit flags above both (applied by the CLI). Within the environment an
``OPTION_*`` variable wins over LMI's short alias of it (``HF_MODEL_ID``, ``MAX_BATCH_SIZE``...).
Empty values are skipped, as LMI does. A key nobody knows is a warning naming it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PROPERTIES_FILE = "serving.properties"
# LMI's simplified environment variables -> the key they set (starting-guide.md)
ENV_ALIASES = {"HF_MODEL_ID": "model_id", "HF_REVISION": "revision",
               "HF_MODEL_TRUST_REMOTE_CODE": "trust_remote_code",
               "TENSOR_PARALLEL_DEGREE": "tensor_parallel_degree",
               "MAX_BATCH_SIZE": "max_rolling_batch_size",
               "MAX_CONCURRENT_REQUESTS": "job_queue_size"}
SECRETS = ("HF_TOKEN",)  # never logged
_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
           "bf16": "bfloat16", "bfloat16": "bfloat16", "auto": None}
_ROLLING_BATCH = ("auto", "vllm", "lmi-dist", "deepspeed", "scheduler", "trtllm", "disable")
_BUILTIN_HANDLERS = re.compile(r"djl_python\.(huggingface|vllm|lmi_dist|deepspeed|transformers"
                               r"|lmi_vllm\.vllm_async_service)")


@dataclass(frozen=True)
class Setting:
    """One configuration value and where it came from.

    Attributes:
        key: LMI's key without ``option.``: "dtype", "job_queue_size", "SAGEMAKER_BIND_TO_PORT".
        value: the text as given.
        origin: where, for messages: "OPTION_DTYPE", "option.dtype in /m/serving.properties".
    """

    key: str
    value: str
    origin: str

    def __str__(self) -> str:
        shown = "<hidden>" if self.key in SECRETS else repr(self.value)
        return f"{self.origin}={shown}"


@dataclass
class MappedOptions:
    """What one model's settings mean here.

    Attributes:
        engine: EngineConfig fields -> values.
        model: "model_id", "revision", "enable_lora" -> values.
        server: ServerConfig-level values: "max_queue", "max_body_bytes", "port",
            "gpu_memory_utilization" (a fraction, sized into a pool by the deployment).
        notes: accepted settings without meaning here, with why (logged at INFO).
        unknown: settings nobody knows (logged as warnings).
        refused: settings that cannot be served as asked, with why.
    """

    engine: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


class Refused(ValueError):
    """A value this option cannot take here; the message says why."""


# -- reading --------------------------------------------------------------------------------


def read_properties(path: Path) -> dict[str, str]:
    """The ``key=value`` pairs of a Java properties file (``=``, ``:`` or a blank between key
    and value; ``#`` and ``!`` comments; a trailing backslash continues the line).

    Raises:
        OSError: the file cannot be read.
    """
    pairs: dict[str, str] = {}
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        if not line or line[0] in "#!":
            continue
        m = re.match(r"([^=:\s]+)\s*[=:\s]\s*(.*)", line)
        if m:
            pairs[m[1]] = m[2].strip()
    return pairs


def settings(env: Mapping[str, str], model_dir: Path | None = None) -> dict[str, Setting]:
    """The settings of one model: ``model_dir/serving.properties`` over ``env`` (``OPTION_X``
    -> key ``x``, ``SERVING_X`` -> ``x``, LMI's aliases, ``SAGEMAKER_*`` and ``HF_TOKEN`` as
    they are), empty values skipped.

    Raises:
        OSError: serving.properties exists but cannot be read.
    """
    found: dict[str, Setting] = {}
    for name in sorted(env, key=lambda n: n.startswith("OPTION_")):  # OPTION_* last: it wins
        value = env[name]
        if not value:
            continue
        if name.startswith(("OPTION_", "SERVING_")):
            key = name.split("_", 1)[1].lower()
            key = "entryPoint" if key == "entrypoint" else key
        elif name in ENV_ALIASES:
            key = ENV_ALIASES[name]
        elif name in _ENV_ONLY:
            key = name
        else:
            continue
        found[key] = Setting(key, value, name)
    path = model_dir / PROPERTIES_FILE if model_dir is not None else None
    if path is not None and path.is_file():
        for key, value in read_properties(path).items():
            if value:
                bare = key.removeprefix("option.")
                found[bare] = Setting(bare, value, f"{key} in {path}")
    return found


def map_settings(found: Mapping[str, Setting], num_devices: int) -> MappedOptions:
    """What each setting means here (see the table in the README, "Deploying as on SageMaker
    LMI"); nothing is raised: refusals are collected in ``refused``.

    Args:
        found: from :func:`settings`.
        num_devices: accelerators this process may use (tensor_parallel_degree "max").
    """
    out = MappedOptions()
    for key, s in sorted(found.items()):
        handler = _OPTIONS.get(key)
        if handler is None:
            out.unknown.append(f"{s}: unknown LMI option, ignored")
            continue
        try:
            note = handler(s.value, out, num_devices)
        except ValueError as e:  # Refused, or a malformed number or boolean
            out.refused.append(f"{s}: {e}")
        else:
            if note is not None:
                out.notes.append(f"{s}: accepted without effect: {note}")
    return out


# -- the options ------------------------------------------------------------------------------


def _int(value: str, minimum: int = 1) -> int:
    if not re.fullmatch(r"[+-]?\d+", value.strip()):
        raise ValueError(f"expected an integer >= {minimum}")
    number = int(value)
    if number < minimum:
        raise ValueError(f"expected an integer >= {minimum}")
    return number


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise ValueError("expected true or false")
    return text == "true"


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("expected a number in (0, 1]") from None
    if not 0 < number <= 1:
        raise ValueError("expected a number in (0, 1]")
    return number


# (value, what it maps to so far, number of devices) -> None when mapped, else the note of an
# option accepted without meaning here; raises ValueError (Refused) when the value is refused.
Handler = Callable[[str, MappedOptions, int], "str | None"]


def _engine(name: str, parse: Callable[[str], object] = _int) -> Handler:
    def handle(value: str, out: MappedOptions, _devices: int) -> None:
        out.engine[name] = parse(value)
    return handle


def _server(name: str, parse: Callable[[str], object]) -> Handler:
    def handle(value: str, out: MappedOptions, _devices: int) -> None:
        out.server[name] = parse(value)
    return handle


def _model(name: str, parse: Callable[[str], object] = str) -> Handler:
    def handle(value: str, out: MappedOptions, _devices: int) -> None:
        out.model[name] = parse(value)
    return handle


def _note(reason: str, check: Callable[[str], object] | None = None,
          allowed: tuple[str, ...] | None = None, refusal: str = "") -> Handler:
    """Accepted with ``reason`` logged; ``check`` validates the value, ``allowed`` lists the
    (lower-case) values accepted, others refused with ``refusal``."""

    def handle(value: str, out: MappedOptions, _devices: int) -> str:
        if check is not None:
            check(value)
        if allowed is not None and value.strip().lower() not in allowed:
            raise Refused(refusal or f"accepted values: {', '.join(allowed)}")
        return reason
    return handle


def _refuse(reason: str) -> Handler:
    def handle(value: str, out: MappedOptions, _devices: int) -> None:
        raise Refused(reason)
    return handle


def _dtype(value: str) -> str | None:
    text = value.strip().lower()
    if text not in _DTYPES:
        raise Refused(f"dtype must be one of {', '.join(_DTYPES)} (quantized types are not "
                      f"implemented)")
    return _DTYPES[text]


def _tensor_parallel(value: str, out: MappedOptions, devices: int) -> None:
    out.engine["tensor_parallel_size"] = max(devices, 1) if value.strip().lower() == "max" \
        else _int(value)


def _entry_point(value: str, out: MappedOptions, _devices: int) -> str:
    if not _BUILTIN_HANDLERS.fullmatch(value.strip()):
        raise Refused("custom inference handlers are not run; pagedlora serves the model "
                      "itself (drop option.entryPoint)")
    return "LMI's built-in handler: pagedlora serves the model itself"


_ENV_ONLY = ("HF_TOKEN", "SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_MAX_PAYLOAD_IN_MB",
             "SAGEMAKER_MAX_REQUEST_SIZE", "SAGEMAKER_STARTUP_TIMEOUT",
             "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "SAGEMAKER_NUM_MODEL_WORKERS")
_CONTINUOUS = "pagedlora always batches continuously, with its own scheduler"

_OPTIONS: dict[str, Handler] = {
    # the model
    "model_id": _model("model_id"),
    "revision": _model("revision"),
    "enable_lora": _model("enable_lora", _bool),
    # engine options
    "dtype": _engine("dtype", _dtype),
    "max_rolling_batch_size": _engine("max_num_seqs"),
    "max_rolling_batch_prefill_tokens": _engine("max_num_batched_tokens"),
    "max_num_batched_tokens": _engine("max_num_batched_tokens"),
    "max_model_len": _engine("max_model_len"),
    "block_size": _engine("block_size"),
    "max_loras": _engine("max_loras"),
    "max_lora_rank": _engine("max_lora_rank"),
    "max_cpu_loras": _engine("max_cpu_loras", lambda v: _int(v, minimum=0)),
    "enable_prefix_caching": _engine("enable_prefix_caching", _bool),
    "seed": _engine("seed", lambda v: _int(v, minimum=0)),
    "tensor_parallel_degree": _tensor_parallel,
    "pipeline_parallel_degree": _note("one device, no pipeline parallelism", _int, ("1",),
                                      "pipeline parallelism is not implemented; set 1"),
    # server options
    "gpu_memory_utilization": _server("gpu_memory_utilization", _fraction),
    "job_queue_size": _server("max_queue", _int),
    "SAGEMAKER_BIND_TO_PORT": _server("port", lambda v: _int(v, minimum=0)),
    "SAGEMAKER_MAX_PAYLOAD_IN_MB": _server("max_body_bytes", lambda v: _int(v) * 2**20),
    "SAGEMAKER_MAX_REQUEST_SIZE": _server("max_body_bytes", _int),
    # accepted, without meaning here
    "rolling_batch": _note(_CONTINUOUS, allowed=_ROLLING_BATCH),
    "batch_size": _note(_CONTINUOUS, _int),
    "max_idle_time": _note(_CONTINUOUS),
    "engine": _note("pagedlora serves the model in its own process", allowed=("python", "mpi")),
    "entryPoint": _entry_point,
    "trust_remote_code": _note("pagedlora implements the Llama family itself and runs no code "
                               "from model repositories", _bool),
    "enforce_eager": _note("pagedlora captures no CUDA graphs", _bool),
    "parallel_loading": _note("one engine per base model", _bool),
    "minWorkers": _note("one engine per base model", _int),
    "maxWorkers": _note("one engine per base model", _int),
    "SAGEMAKER_NUM_MODEL_WORKERS": _note("one engine per base model", _int),
    "model_loading_timeout": _note("loading is not timed out here; SageMaker's "
                                   "ContainerStartupHealthCheckTimeoutInSeconds still applies",
                                   _int),
    "SAGEMAKER_STARTUP_TIMEOUT": _note("loading is not timed out here", _int),
    "predict_timeout": _note("requests are not timed out here (ttft_deadline_s bounds the wait)",
                             _int),
    "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": _note("requests are not timed out here", _int),
    "fully_sharded_loras": _note("one device: nothing is sharded", _bool),
    "lora_extra_vocab_size": _note("adapters that add tokens are refused when added", _int),
    "lora_dtype": _note("adapter weights take the engine's dtype", allowed=("auto",),
                        refusal="adapter weights take the engine's dtype; set option.dtype "
                        "instead (or auto)"),
    "output_formatter": _note("the default JSON responses", allowed=("json",),
                              refusal="only the json output formatter is implemented"),
    "tgi_compat": _note("LMI's own response schema", _bool, ("false",),
                        "TGI-compatible responses are not implemented"),
    "enable_streaming": _note("responses are not streamed on /invocations", allowed=("false",),
                              refusal="streaming on /invocations is not implemented; use "
                              "/v1/completions with stream=true"),
    "HF_TOKEN": _note("nothing is downloaded from the Hugging Face hub; the token is unused"),
    # refused
    "quantize": _refuse("quantization is not implemented"),
    "long_lora_scaling_factors": _refuse("long-context LoRA scaling is not implemented"),
    "speculative_draft_model": _refuse("speculative decoding is not implemented"),
    "draft_model_id": _refuse("speculative decoding is not implemented"),
}
KNOWN_OPTIONS = frozenset(_OPTIONS)
