"""Finding adapters in a folder of PEFT directories, or in a ``.tar.gz`` archive of one."""

from __future__ import annotations

from pathlib import Path

from pagedlora.cache import extract_archive
from pagedlora.errors import AdapterError, SourceError


def adapter_dirs(root: str | Path) -> dict[str, Path]:
    """``name -> directory`` for every ``root/<name>/adapter_config.json``.

    This is SageMaker LMI's layout (an ``adapters/`` folder with one PEFT directory per
    adapter). ``root`` may also be a folder holding that ``adapters/`` folder, or a tar archive
    (``.tar.gz``, ``.tgz``, ``.tar``) of either, as ``tar czf adapters.tar.gz -C dir .`` makes
    it; the archive is extracted once into the cache with tarfile's ``"data"`` filter, which
    refuses members outside the destination (``../``, absolute paths, links out), device files
    and the like.

    Raises:
        AdapterError: ``root`` is neither a directory nor a readable tar archive, the archive
            holds an unsafe member, or no adapter directory is found.
    """
    root = Path(root)
    if root.is_file():
        try:
            root = extract_archive(root, label=f"adapters archive {root}")
        except SourceError as e:
            raise AdapterError(str(e)) from e
    if not root.is_dir():
        raise AdapterError(f"adapters root {root} is not a directory or a tar archive")
    for folder in (root, root / "adapters"):
        found = {p.parent.name: p.parent for p in sorted(folder.glob("*/adapter_config.json"))}
        if found:
            return found
    raise AdapterError(f"no adapters in {root}: expected <name>/adapter_config.json in it or "
                       f"in its adapters/ folder")
