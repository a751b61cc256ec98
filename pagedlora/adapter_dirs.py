"""Finding adapters in a folder of PEFT directories, or in a ``.tar.gz`` archive of one."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from pagedlora.errors import AdapterError
from pagedlora.model_files import cache_dir, file_hash


def adapter_dirs(root: str | Path) -> dict[str, Path]:
    """``name -> directory`` for every ``root/<name>/adapter_config.json``.

    This is SageMaker LMI's layout (an ``adapters/`` folder with one PEFT directory per
    adapter). ``root`` may also be a folder holding that ``adapters/`` folder, or a tar archive
    (``.tar.gz``, ``.tgz``, ``.tar``) of either, as ``tar czf adapters.tar.gz -C dir .`` makes
    it; the archive is extracted once into ``$PAGEDLORA_CACHE/adapters/<name>-<xxhash>`` with
    tarfile's ``"data"`` filter, which refuses members outside the destination (``../``,
    absolute paths, links out), device files and the like.

    Raises:
        AdapterError: ``root`` is neither a directory nor a readable tar archive, the archive
            holds an unsafe member, or no adapter directory is found.
    """
    root = Path(root)
    if root.is_file():
        root = _extracted(root)
    if not root.is_dir():
        raise AdapterError(f"adapters root {root} is not a directory or a tar archive")
    for folder in (root, root / "adapters"):
        found = {p.parent.name: p.parent for p in sorted(folder.glob("*/adapter_config.json"))}
        if found:
            return found
    raise AdapterError(f"no adapters in {root}: expected <name>/adapter_config.json in it or "
                       f"in its adapters/ folder")


def _extracted(archive: Path) -> Path:
    """Extracts ``archive`` into the cache (once per content) and returns the folder."""
    if not tarfile.is_tarfile(archive):
        raise AdapterError(f"adapters archive {archive} is not a tar archive")
    stem = archive.name.split(".")[0] or "adapters"
    target = cache_dir() / "adapters" / f"{stem}-{file_hash(archive)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        # FilterError (an unsafe member) is a TarError; a truncated gzip stream is an EOFError
        raise AdapterError(f"adapters archive {archive}: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
