"""SpillDir: the disk tier below host memory, one safetensors file per adapter content key."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from safetensors.torch import load_file, save_file

from pagedlora.cache import cache_dir
from pagedlora.lora_adapter import AdapterWeights, LoraAdapter, ModuleWeights, content_key

log = logging.getLogger(__name__)


class SpillDir:
    """Adapters evicted from host memory, as ``<key>.safetensors`` in the engine's dtype.

    Writes are atomic (a temporary file in the same directory, then ``os.replace``), so a
    reader never sees half a file; reads check the content hash, so a corrupt file is never
    served. Every failure (a full or read-only disk, a directory that cannot be made, a missing
    or corrupt file) is logged and reported as a miss: the store then re-reads the adapter from
    its source. vLLM and SageMaker LMI evict adapters beyond ``max_cpu_loras`` "to disk" the
    same way.

    Thread safety: the files are the only shared state besides ``_intact`` (a set, changed by
    single atomic operations); ``os.replace`` makes a concurrent read see the old or the new
    file, never a mix.

    Args:
        path: the directory (made on the first write, kept afterwards, its intact files reused
            across engines and runs); None for a private directory under
            ``cache_dir() / "spill"``, made on the first write and deleted with this object.
    """

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._intact: set[str] = set()  # keys whose file was written or verified here
        self._cleanup: weakref.finalize | None = None  # removes a private directory

    def close(self) -> None:
        """Removes the private directory now, if this object made one (an explicit path is
        kept). Idempotent."""
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup, self._path = None, None
            self._intact.clear()

    def has(self, key: str) -> bool:
        """Whether an intact file for ``key`` is known to be on disk."""
        return key in self._intact

    def file_of(self, key: str) -> Path | None:
        """Where ``key`` is (or would be) spilled; None before a private directory exists."""
        return None if self._path is None else self._path / f"{key}.safetensors"

    def write(self, adapter: LoraAdapter, weights: AdapterWeights) -> bool:
        """Spills ``weights`` unless an intact copy is already there.

        Returns:
            True when an intact copy is on disk afterwards; False (with a warning logged) when
            the directory or the file cannot be written.
        """
        key = adapter.key
        try:
            path = self._directory() / f"{key}.safetensors"
            if key in self._intact and path.is_file():
                return True
            if path.is_file() and self.read(adapter) is not None:  # left by an earlier run
                return True
            tensors = {}
            for (layer, module), w in weights.items():
                tensors[f"{layer}.{module}.lora_A"] = w.a
                tensors[f"{layer}.{module}.lora_B_t"] = w.b_t
                if w.dora is not None:
                    tensors[f"{layer}.{module}.dora_scale"] = w.dora
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}-", suffix=".tmp")
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata={"key": key})
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:
            self._intact.discard(key)
            log.warning("cannot spill adapter %r (%s) to disk: %s; it will be re-read from its "
                        "source %s", adapter.name, key, e, adapter.path)
            return False
        self._intact.add(key)
        return True

    def read(self, adapter: LoraAdapter) -> AdapterWeights | None:
        """The spilled weights of ``adapter``, hash-checked; None when there is no file or it
        is unreadable or corrupt (logged; a corrupt file is deleted so that it is rewritten)."""
        path = self.file_of(adapter.key)
        if path is None or not path.is_file():
            if adapter.key in self._intact:
                log.warning("spill file of adapter %r (%s) is gone", adapter.name, adapter.key)
                self._intact.discard(adapter.key)
            return None
        try:
            tensors = load_file(path)
            weights = {(layer, module): ModuleWeights(
                a=tensors[f"{layer}.{module}.lora_A"], b_t=tensors[f"{layer}.{module}.lora_B_t"],
                dora=tensors[f"{layer}.{module}.dora_scale"] if spec.dora else None)
                for (layer, module), spec in adapter.modules.items()}
            expected = sum(3 if spec.dora else 2 for spec in adapter.modules.values())
            if len(tensors) != expected:
                raise ValueError(f"{len(tensors)} tensors, expected {expected}")
            found = content_key(adapter.modules, weights)
            if found != adapter.key:
                raise ValueError(f"content hash {found} differs")
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same miss
            log.warning("spill file %s of adapter %r is unreadable or corrupt (%s); re-reading "
                        "the source", path, adapter.name, e)
            self.delete(adapter.key)
            return None
        self._intact.add(adapter.key)
        return weights

    def delete(self, key: str) -> None:
        """Removes ``key``'s file, if any (a failure is logged)."""
        self._intact.discard(key)
        path = self.file_of(key)
        try:
            if path is not None:
                path.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot delete spill file %s: %s", path, e)

    def _directory(self) -> Path:
        """The directory, made if needed. Raises OSError when it cannot be made."""
        if self._path is None:
            parent = cache_dir() / "spill"
            parent.mkdir(parents=True, exist_ok=True)
            self._path = Path(tempfile.mkdtemp(dir=parent, prefix="engine-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._path, ignore_errors=True)
        else:
            self._path.mkdir(parents=True, exist_ok=True)
        return self._path
