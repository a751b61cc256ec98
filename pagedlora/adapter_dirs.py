"""Finding adapters: one PEFT directory, or a folder of them (SageMaker LMI's ``adapters/``),
local, in a ``.tar.gz``, or at an ``s3://`` URL (see :mod:`pagedlora.sources`)."""

from __future__ import annotations

import os
from pathlib import Path

from pagedlora.cache import extract_archive, is_archive
from pagedlora.errors import AdapterError, SourceError
from pagedlora.sources import fetch


def fetch_adapter(source: str | os.PathLike) -> Path:
    """The local PEFT directory of one adapter ``source``: a directory, a tar archive holding
    ``adapter_config.json`` at its root, an ``s3://`` URL of either (downloaded once into the
    cache), or an ``org/name`` id in the local Hugging Face cache.

    Raises:
        AdapterError: naming the source, when it cannot be had (S3 failure, an id not in the
            cache, a bad archive). A missing local path is returned as is: reading it
            (``read_lora_adapter``) reports it, naming the adapter.
    """
    try:
        path = fetch(source, "adapter")
        if path.is_file() and is_archive(path):
            path = extract_archive(path, label=f"adapter archive {source}")
    except FileNotFoundError:
        return Path(source)  # read_lora_adapter says what is missing, naming the adapter
    except SourceError as e:
        raise AdapterError(str(e)) from e
    return path


def adapter_dirs(root: str | os.PathLike) -> dict[str, Path]:
    """``name -> directory`` for every ``root/<name>/adapter_config.json``.

    This is SageMaker LMI's layout (an ``adapters/`` folder with one PEFT directory per
    adapter). ``root`` may also be a folder holding that ``adapters/`` folder, or a tar archive
    (``.tar.gz``, ``.tgz``, ``.tar``) of either, as ``tar czf adapters.tar.gz -C dir .`` makes
    it, or an ``s3://`` URL of any of these (downloaded once into the cache). An archive is
    extracted once into the cache with tarfile's ``"data"`` filter, which refuses members
    outside the destination (``../``, absolute paths, links out), device files and the like.

    Raises:
        AdapterError: naming ``root``: it cannot be had (missing, S3 failure), it is neither a
            directory nor a readable tar archive, the archive holds an unsafe member, or no
            adapter directory is found.
    """
    try:
        path = fetch(root, "adapters root")
        if path.is_file():
            path = extract_archive(path, label=f"adapters archive {root}")
    except OSError as e:  # SourceError, FileNotFoundError: their messages name the source
        raise AdapterError(str(e)) from e
    if not path.is_dir():
        raise AdapterError(f"adapters root {root} is not a directory or a tar archive")
    for folder in (path, path / "adapters"):
        found = {p.parent.name: p.parent for p in sorted(folder.glob("*/adapter_config.json"))}
        if found:
            return found
    raise AdapterError(f"no adapters in {root}: expected <name>/adapter_config.json in it or "
                       f"in its adapters/ folder")
