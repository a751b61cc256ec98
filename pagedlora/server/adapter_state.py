"""AdapterState: the adapters loaded at run time (``/v1/load_lora_adapter``, LMI's
``POST /models/{model}/adapters``), kept in a state directory so that a restarted server serves
them again.

The record is one JSON file, ``<state dir>/adapters.json``, rewritten whole on every change
through a temporary file and ``os.replace`` (after an fsync), so a crash leaves the old record
or the new one, never half of one. At start the entries are loaded again in the order they were
loaded; one whose source is gone or no longer valid is logged and dropped, never fatal.
Adapters given on the command line are not recorded: they come from the command line again.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from pagedlora.errors import AdapterError, UnsupportedAdapterError
from pagedlora.server.registry import ModelRegistry

log = logging.getLogger(__name__)

STATE_FILE = "adapters.json"
_VERSION = 1


@dataclass(frozen=True)
class AdapterEntry:
    """One adapter loaded at run time.

    Attributes:
        model: the base model's served name.
        name: the adapter's served name.
        src: its source as the client gave it (a path, an ``s3://`` URL, a model id).
        preload: whether its weights were kept in host memory when loaded.
    """

    model: str
    name: str
    src: str
    preload: bool = False


class AdapterState:
    """The record of run-time adapters in ``state_dir`` (made if missing).

    Only the event loop thread changes it (after a load or unload succeeded), so it needs no
    lock.

    Raises:
        OSError: the directory cannot be made.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, AdapterEntry] = {}  # by adapter name, in load order

    @property
    def entries(self) -> list[AdapterEntry]:
        """The recorded adapters, in load order."""
        return list(self._entries.values())

    def read(self) -> list[AdapterEntry]:
        """The entries recorded by the previous run (none if there is no file); an unreadable
        file or entry is logged and skipped."""
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            raw = data["adapters"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("state file %s is unreadable (%s); starting without its adapters",
                      self.path, e)
            return []
        entries = []
        for item in raw:
            try:
                entries.append(AdapterEntry(**item))
            except TypeError as e:
                log.error("state file %s: entry %r skipped: %s", self.path, item, e)
        return entries

    def loaded(self, entry: AdapterEntry) -> None:
        """Records ``entry`` (replacing the record of its name) and writes the file."""
        self._record(entry)
        self._write()

    def unloaded(self, name: str) -> None:
        """Forgets adapter ``name`` (if recorded) and writes the file."""
        if self._entries.pop(name, None) is not None:
            self._write()

    def _record(self, entry: AdapterEntry) -> None:
        self._entries.pop(entry.name, None)
        self._entries[entry.name] = entry

    def _write(self) -> None:
        body = json.dumps({"version": _VERSION, "adapters": [asdict(e) for e in self.entries]},
                          indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".adapters-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def replay(state: AdapterState, registry: ModelRegistry) -> None:
    """Loads the adapters the previous run recorded in ``state`` into their engines (before
    serving) and records the ones that loaded; an entry whose base model is no longer served,
    whose name is now taken, or whose source is gone or invalid is logged and dropped."""
    for e in state.read():
        if e.model not in registry.loops:
            log.warning("state %s: adapter %r skipped: its base model %r is not served",
                        state.path, e.name, e.model)
            continue
        try:
            registry.check_free(e.name, e.model)
            registry.loops[e.model].engine.add_adapter(e.name, e.src, preload=e.preload)
        except (AdapterError, UnsupportedAdapterError, OSError, ValueError) as err:
            log.warning("state %s: adapter %r of %r from %s skipped: %s", state.path, e.name,
                        e.model, e.src, err)
            continue
        registry.register(e.model, e.name, e.src, e.preload)
        state._record(e)
        log.info("state %s: adapter %r of %r loaded again from %s", state.path, e.name,
                 e.model, e.src)
    state._write()  # without the entries dropped
