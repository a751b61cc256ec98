"""ServerConfig: what ``pagedlora serve`` serves and its HTTP limits, one validated dataclass."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pagedlora.config import EngineConfig
from pagedlora.model_files import DEFAULT_MODEL_NAME
from pagedlora.sources import as_source

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


@dataclass(frozen=True)
class AdapterSource:
    """An adapter, or a folder of adapters, to register at startup.

    Attributes:
        model: the base model's served name; None: the only base model.
        path: a PEFT directory; or with ``name`` None, a folder (or ``.tar.gz``) of PEFT
            directories, each registered under its folder's name (``Engine.add_adapters_from_dir``);
            either may be an ``s3://`` URL (a string).
        name: the adapter's served name; None for a folder of adapters.
    """

    model: str | None
    path: str | Path
    name: str | None = None


@dataclass(frozen=True)
class ServerConfig:
    """Options of :func:`pagedlora.server.app.build_app` (``pagedlora serve``).

    Attributes:
        models: served name -> HF directory, ``.gguf`` file, ``s3://`` URL or cached Hugging
            Face id of each base model (see ``resolve_model``); empty serves the embedded
            default model (SmolLM2-135M-Instruct) under its name. Each base model has its own
            engine.
        adapters: adapters and folders of adapters registered at startup.
        host, port: where to listen.
        pool_gb: GiB of unified pool in all, split evenly between the base models.
        max_queue: most requests per base model waiting for their first token; beyond it a
            request gets 503 with Retry-After.
        max_body_bytes: largest request body; larger gets 413.
        shutdown_timeout_s: on SIGTERM, seconds running requests may take to finish before
            they are aborted.
        engine_options: other :class:`~pagedlora.EngineConfig` fields, for every engine.
        model_options: served name -> EngineConfig fields for that base model's engine alone,
            over ``engine_options`` (from its LMI ``serving.properties``).
        state_dir: where adapters loaded at run time are recorded (``adapters.json``), to be
            loaded again at the next start; None: they are not kept.

    Raises:
        ValueError: naming the offending option (a bad or duplicate name, an adapter without
            a base model when several are served, an invalid engine option).
        TypeError: an unknown engine option.
    """

    models: dict[str, str | Path | None] = field(default_factory=dict)
    adapters: tuple[AdapterSource, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    pool_gb: float = 1.0
    max_queue: int = 256
    max_body_bytes: int = 4 * 2**20
    shutdown_timeout_s: float = 30.0
    engine_options: dict = field(default_factory=dict)
    model_options: dict[str, dict] = field(default_factory=dict)
    state_dir: Path | None = None

    def __post_init__(self) -> None:
        models = dict(self.models) or {DEFAULT_MODEL_NAME: None}
        for name in models:
            _check_name(name, "model")
        object.__setattr__(self, "models", models)
        adapters = []
        for a in self.adapters:
            model = a.model
            if model is None:
                if len(models) > 1:
                    raise ValueError(f"adapter {a.name or a.path}: several base models are "
                                     f"served ({sorted(models)}); say which with MODEL:")
                model = next(iter(models))
            if model not in models:
                raise ValueError(f"adapter {a.name or a.path}: unknown base model {model!r}; "
                                 f"served: {sorted(models)}")
            if a.name is not None:
                _check_name(a.name, "adapter")
            adapters.append(AdapterSource(model, as_source(a.path), a.name))
        object.__setattr__(self, "adapters", tuple(adapters))
        named = [a.name for a in adapters if a.name is not None]
        clash = sorted({n for n in named if named.count(n) > 1 or n in models})
        if clash:
            raise ValueError(f"adapter names must be unique and differ from the base models': "
                             f"{clash}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        for name in ("max_queue", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s!r}")
        unknown = sorted(set(self.model_options) - set(models))
        if unknown:
            raise ValueError(f"model_options for models not served: {unknown}")
        if self.state_dir is not None:
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        for name in models:  # validates pool_gb and the engine options now, not at load time
            self.engine_config(name)

    @property
    def pool_gb_per_model(self) -> float:
        """Each base model's share of ``pool_gb``."""
        return self.pool_gb / len(self.models)

    def engine_options_for(self, model: str) -> dict:
        """The engine options of base model ``model``: ``engine_options`` and its own."""
        return {**self.engine_options, **self.model_options.get(model, {})}

    def engine_config(self, model: str | None = None) -> EngineConfig:
        """The EngineConfig of base model ``model`` (None: the options every engine gets)."""
        options = self.engine_options if model is None else self.engine_options_for(model)
        return EngineConfig.from_options(self.pool_gb_per_model, **options)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must start with a letter or digit and hold "
                         f"only letters, digits and . _ / -")

