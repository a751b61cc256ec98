"""ModelRegistry: the names a client may put in ``model`` (base models and adapters)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import NamedTuple

from pagedlora.adapter_mix import AdapterMix
from pagedlora.errors import AdapterError, AdapterMixError, UnsupportedAdapterError
from pagedlora.server.engine_loop import EngineLoop
from pagedlora.server.protocol import ApiError
from pagedlora.sources import as_source


class ServedAdapter(NamedTuple):
    """An adapter name's base model, source (a path, or an ``s3://`` URL or model id as the
    client gave it), and whether its weights were preloaded into host memory."""

    base: str
    source: str | Path
    preload: bool = False


class ModelRegistry:
    """Base models, each driven by its :class:`EngineLoop`, and the adapters of each.

    An adapter name is unique across base models, so a request's ``model`` (a base model's
    name or an adapter's) selects exactly one engine. Names are only changed in the event loop
    (``load``/``unload``) or before serving (``register``).

    Args:
        loops: base model name -> its engine loop.
    """

    def __init__(self, loops: dict[str, EngineLoop]) -> None:
        self.loops = loops
        self.adapters: dict[str, ServedAdapter] = {}  # by adapter name
        self._lock = asyncio.Lock()  # one load or unload at a time
        self.created = int(time.time())  # OpenAI's model ``created`` (unix seconds)

    def register(self, base: str, name: str, path: str | os.PathLike, preload: bool = False
                 ) -> None:
        """Records an adapter already added to ``base``'s engine (at startup).

        Raises:
            ValueError: the name is a base model's or another base model's adapter's.
        """
        self.check_free(name, base)
        self.adapters[name] = ServedAdapter(base, as_source(path), preload)

    def resolve(self, model: str) -> tuple[EngineLoop, str | None]:
        """The engine loop and adapter name (None: the base model) that ``model`` names.

        Raises:
            ApiError: 404 naming ``model`` and what is served.
        """
        if model in self.loops:
            return self.loops[model], None
        if model in self.adapters:
            return self.loops[self.adapters[model][0]], model
        raise ApiError(404, f"model {model!r} does not exist; served: base models "
                       f"{sorted(self.loops)}, adapters {sorted(self.adapters)}", param="model")

    def mix(self, weights: dict[str, float], base: str, param: str = "adapters") -> AdapterMix:
        """The :class:`AdapterMix` of a request body's ``{name: weight}``, its adapters all of
        base model ``base``.

        Raises:
            ApiError: 404 for an unknown adapter; 400 for a base model's name, an adapter of
                another base model, or a mix AdapterMix refuses (empty, a weight that is not
                finite, too many adapters), each named.
        """
        for name in weights:
            if name in self.loops:
                raise ApiError(400, f"{param}: {name!r} is a base model, not an adapter",
                               param=param)
            owner = self.adapter_base(name, param)  # 404 for an unknown one
            if owner != base:
                raise ApiError(400, f"{param}: adapter {name!r} belongs to base model "
                               f"{owner!r}, not {base!r}", param=param)
        try:
            return AdapterMix(weights)
        except (AdapterMixError, TypeError) as e:
            raise ApiError(400, f"{param}: {e}", param=param) from None
    def adapter_base(self, name: str, field: str) -> str:
        """The base model of adapter ``name``, given in the body's ``field``.

        Raises:
            ApiError: 404 naming ``field`` and the loaded adapters (and saying so when
                ``name`` is a base model's).
        """
        if name in self.adapters:
            return self.adapters[name][0]
        hint = (f"; {name!r} is a base model (null in {field} runs the base model)"
                if name in self.loops else "")
        raise ApiError(404, f"{field}: adapter {name!r} is not loaded{hint}; loaded: "
                       f"{sorted(self.adapters)}", param=field)

    def base(self, name: str | None, how: str = "'model'") -> str:
        """The base model named ``name``; None picks the only one served.

        Raises:
            ApiError: 404 for an unknown base model (naming an adapter's base if ``name`` is
                an adapter); 400 when ``name`` is None and several are served (``how`` says
                how to name one).
        """
        if name is None:
            if len(self.loops) > 1:
                raise ApiError(400, f"several base models are served ({sorted(self.loops)}); "
                               f"name one with {how}")
            return next(iter(self.loops))
        if name not in self.loops:
            hint = (f" ({name!r} is an adapter of {self.adapters[name][0]!r})"
                    if name in self.adapters else "")
            raise ApiError(404, f"base model {name!r} does not exist{hint}; served: "
                           f"{sorted(self.loops)}", param="model")
        return name

    def models(self) -> list[dict]:
        """``/v1/models`` entries: base models, then adapters with ``parent`` = their base."""
        common = {"object": "model", "created": self.created, "owned_by": "pagedlora"}
        bases = [{"id": name, **common, "root": name, "parent": None,
                  "max_model_len": loop.engine.max_model_len}
                 for name, loop in self.loops.items()]
        return bases + [{"id": name, **common, "root": str(a.source), "parent": a.base}
                        for name, a in sorted(self.adapters.items())]

    async def load(self, name: str, path: str, base: str | None, preload: bool = False,
                   replace: bool = False) -> str:
        """Adds the PEFT adapter at ``path`` (a directory, archive, ``s3://`` URL or cached
        model id: ``Engine.add_adapter``) to base model ``base`` (None: the only one) as
        ``name``. A name already loaded is refused unless ``replace`` (vLLM's
        ``load_inplace``): then its weights are replaced for later requests (requests already
        queued keep the old ones). The adapter is fetched, read and validated in a worker
        thread; the engine keeps stepping meanwhile. ``preload`` keeps its weights in host
        memory.

        Returns:
            the base model's name.
        Raises:
            ApiError: 400 with the engine's validation message (missing path, a source that
                cannot be had, bad config, shapes that do not fit, rank too high, unsupported
                PEFT features), for a name already loaded without ``replace``, or for a name
                taken by a base model or another base's adapter; 404 for an unknown base.
        """
        base = self.base(base, "'model' (the base model to add the adapter to)")
        async with self._lock:
            self._check_free(name, base, ApiError)
            if name in self.adapters and not replace:
                raise ApiError(400, f"adapter {name!r} is already loaded (from "
                               f"{str(self.adapters[name][1])!r}); send \"load_inplace\": true "
                               f"to replace its weights, or unload it first", param="lora_name")
            try:
                await self.loops[base].add_adapter(name, path, preload)
            except (AdapterError, UnsupportedAdapterError, OSError) as e:
                raise ApiError(400, f"cannot load adapter {name!r} from {path!r}: {e}",
                               param="lora_path") from None
            self.adapters[name] = ServedAdapter(base, as_source(path), preload)
        return base

    async def unload(self, name: str) -> None:
        """Removes adapter ``name`` from its base model's engine.

        Raises:
            ApiError: 404 for an unknown adapter; 409 while requests for it wait or run.
        """
        async with self._lock:
            if name not in self.adapters:
                raise ApiError(404, f"adapter {name!r} is not loaded; loaded: "
                               f"{sorted(self.adapters)}", param="lora_name")
            base = self.adapters[name][0]
            try:
                await self.loops[base].remove_adapter(name)
            except ValueError as e:
                raise ApiError(409, str(e), param="lora_name") from None
            del self.adapters[name]

    def check_free(self, name: str, base: str) -> None:
        """Raises ValueError when ``name`` cannot be an adapter of ``base`` (it is a base
        model's name, or another base model's adapter's)."""
        self._check_free(name, base, ValueError)

    def _check_free(self, name: str, base: str, error: type[Exception]) -> None:
        if name in self.loops:
            raise _error(error, f"{name!r} is the name of a base model; adapters need "
                         f"another name")
        owner = self.adapters.get(name, (base,))[0]
        if owner != base:
            raise _error(error, f"adapter {name!r} is already served by base model "
                         f"{owner!r}; adapter names are unique across base models")


def _error(kind: type[Exception], message: str) -> Exception:
    return ApiError(400, message, param="lora_name") if kind is ApiError else kind(message)
