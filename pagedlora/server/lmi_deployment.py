"""LmiDeployment: SageMaker LMI model directories (and the ``OPTION_*`` environment) turned into
what ``pagedlora serve`` serves: base models, their startup adapters, engine and server options.

An LMI model directory is what SageMaker extracts a model's ``ModelDataUrl`` into
(``/opt/ml/model``): an optional ``serving.properties``, the model's own files unless
``option.model_id`` names them elsewhere, and an ``adapters/`` folder of PEFT directories. Here
it may also be an ``s3://`` URL or a ``.tar.gz`` (downloaded and extracted once into the cache),
which stands in for SageMaker's download of ``ModelDataUrl``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pagedlora.cache import ARCHIVE_SUFFIXES, extract_archive, is_archive
from pagedlora.model_files import resolve_model
from pagedlora.server.lmi_options import MappedOptions, map_settings, settings
from pagedlora.sources import as_source, fetch, is_hf_id

log = logging.getLogger(__name__)

SAGEMAKER_MODEL_DIR = "/opt/ml/model"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ENGINE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class LmiConfigError(ValueError):
    """LMI settings that cannot be served: the message names every refused option, its value,
    where it was set and why."""


@dataclass(frozen=True)
class LmiModel:
    """One base model of an LMI deployment.

    Attributes:
        name: the served name (the ``X-Amzn-SageMaker-Inference-Component`` header picks it).
        model_dir: the local LMI model directory (serving.properties, adapters/).
        model: the local HF directory of the base model.
        adapters: folders of PEFT directories registered at startup (``adapters/`` of the model
            directory, and of an ``s3://`` model_id's download), when ``enable_lora`` is true.
        engine_options: EngineConfig fields set by LMI options.
    """

    name: str
    model_dir: Path
    model: Path
    adapters: tuple[Path, ...]
    engine_options: dict


@dataclass(frozen=True)
class LmiDeployment:
    """What the LMI configuration of every model directory asks for.

    Attributes:
        models: one per model directory, in the order given.
        server: server-wide values ("max_queue", "max_body_bytes", "port",
            "gpu_memory_utilization"), equal across the models that set them.
    """

    models: tuple[LmiModel, ...]
    server: dict = field(default_factory=dict)


def lmi_deployment(model_dirs: Sequence[tuple[str | None, str | os.PathLike]],
                   env: Mapping[str, str], num_devices: int) -> LmiDeployment:
    """Reads every LMI model directory with the environment ``env`` and maps the settings.

    Logs every note (an option accepted without effect) at INFO and every unknown option as a
    warning. Slow: model directories and models given as ``s3://`` are downloaded (once), GGUF
    files converted (once).

    Args:
        model_dirs: ``(served name or None, directory)``: a local directory, a ``.tar.gz``, or
            an ``s3://`` URL of either. Without a name, a model is served as its
            ``option.model_id`` when that is a Hugging Face id, else as the directory's name.
        env: the environment (``OPTION_*``, LMI's aliases, ``SAGEMAKER_*``).
        num_devices: accelerators this process may use (for tensor_parallel_degree "max").
    Raises:
        LmiConfigError: naming each refused option and its value, a model directory without a
            model, or server-wide options that differ between models.
        SourceError, FileNotFoundError, ValueError: a model directory or model that cannot be
            had, naming it.
    """
    models, server, refused = [], {}, []
    for name, source in model_dirs:
        model_dir = _local_dir(source)
        mapped = map_settings(settings(env, model_dir), num_devices)
        for note in mapped.notes:
            log.info("LMI %s", note)
        for unknown in mapped.unknown:
            log.warning("LMI %s", unknown)
        refused += mapped.refused
        if mapped.refused:
            continue
        for key, value in mapped.server.items():
            if server.setdefault(key, value) != value:
                refused.append(f"{key}={value!r} for {source} differs from {server[key]!r} "
                               f"for another model: server-wide options must agree")
        models.append(_model(name, source, model_dir, mapped))
    if refused:
        raise LmiConfigError("LMI configuration refused:\n  " + "\n  ".join(refused))
    return LmiDeployment(tuple(models), server)


def pool_gb_for_utilization(fraction: float, device: str, models: Sequence[LmiModel]
                            ) -> float | None:
    """The unified pool for ``gpu_memory_utilization``: ``fraction`` of the device's free
    memory after the weights of every model (in their dtypes), in GiB, for all models
    together (the server splits it evenly). None on the CPU, where the pool stays
    ``--pool-gb``: there is no device memory to take a fraction of, and a fraction of host
    memory would starve the host tier and the OS.

    Raises:
        LmiConfigError: the weights alone exceed the free memory.
    """
    if not device.startswith("cuda"):
        log.info("LMI gpu_memory_utilization=%s: the device is %s, so the pool is --pool-gb",
                 fraction, device)
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    weights = sum(weight_bytes(m.model, m.engine_options.get("dtype") or "bfloat16")
                  for m in models)
    if weights >= free:
        raise LmiConfigError(f"gpu_memory_utilization={fraction}: the weights ({weights} bytes) "
                             f"do not fit the {free} bytes free on {device}")
    pool_gb = fraction * (free - weights) / 2**30
    log.info("LMI gpu_memory_utilization=%s: pool %.2f GiB = %s x (%d free - %d weights bytes)",
             fraction, pool_gb, fraction, free, weights)
    return pool_gb


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes the floating-point weights of ``model_dir/*.safetensors`` take in ``dtype``
    (integer tensors at their own size), read from the files' headers alone."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for n in info["shape"]:
                numel *= n
            kind = info["dtype"]
            size = _ENGINE_BYTES[dtype] if kind.startswith(("F", "BF")) else _DTYPE_BYTES[kind]
            total += numel * size
    return total


def _local_dir(source: str | os.PathLike) -> Path:
    """The local folder of an LMI model directory (downloaded, extracted)."""
    path = fetch(source, "model directory")
    if path.is_file() and is_archive(path):
        path = extract_archive(path, label=f"model directory archive {source}")
    if not path.is_dir():
        raise LmiConfigError(f"model directory {source} is not a directory or a tar archive")
    return path


def _model(name: str | None, source, model_dir: Path, mapped: MappedOptions) -> LmiModel:
    model_id = mapped.model.get("model_id")
    if model_id is None:
        if not (model_dir / "config.json").is_file():
            raise LmiConfigError(
                f"model directory {source}: no option.model_id (OPTION_MODEL_ID, HF_MODEL_ID) "
                f"and no model files (config.json) in it")
        model_source: str | Path = model_dir
    elif (model_dir / model_id).exists() and not is_hf_id(model_id):
        model_source = model_dir / model_id  # a path relative to the model directory
    else:
        model_source = as_source(model_id)
    model = resolve_model(model_source, mapped.model.get("revision"))
    adapters = tuple(dict.fromkeys(d for d in (model_dir / "adapters", model / "adapters")
                                   if d.is_dir()))
    if adapters and not mapped.model.get("enable_lora", False):
        log.warning("LMI model %s: %s not registered, because option.enable_lora is false "
                    "(LMI's default); set OPTION_ENABLE_LORA=true to serve them", source,
                    ", ".join(map(str, adapters)))
        adapters = ()
    return LmiModel(name or _default_name(source, model_id), model_dir, model, adapters,
                    dict(mapped.engine))


def _default_name(source, model_id: str | None) -> str:
    if model_id is not None and is_hf_id(model_id):
        return model_id
    name = PurePosixPath(str(source).rstrip("/")).name
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name or "model"
