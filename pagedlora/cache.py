"""The on-disk cache (``$PAGEDLORA_CACHE``): where it is, content hashes of files, entries that
appear whole or not at all, and tar archives extracted safely into it."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

from pagedlora.errors import SourceError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def cache_dir() -> Path:
    """Where converted models, downloads and extracted archives are cached:
    ``$PAGEDLORA_CACHE``, else ``~/.cache/pagedlora``."""
    return Path(os.environ.get("PAGEDLORA_CACHE", Path.home() / ".cache" / "pagedlora"))


def file_hash(path: Path) -> str:
    """xxhash (XXH3-64, hex) of a file's bytes, read in 16 MiB chunks."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def publishing(target: Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``target``; when the block ends normally it
    is renamed to ``target``, so readers see the whole entry or none. If another process
    published ``target`` first, theirs is kept. On an exception the temporary directory is
    removed and ``target`` is untouched."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_archive(path: Path) -> bool:
    """Whether ``path`` is named like a tar archive (``.tar.gz``, ``.tgz``, ``.tar``)."""
    return path.name.endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, label: str | None = None) -> Path:
    """Extracts a tar archive once per content into ``cache_dir()/archives/<stem>-<xxhash>``
    and returns that folder.

    Uses tarfile's ``"data"`` filter, which refuses members outside the destination (``../``,
    absolute paths, links out), device files and the like; ``tar czf x.tar.gz -C dir .``
    archives (members ``./...``) are fine.

    Args:
        archive: the local archive file.
        label: how errors name the archive, e.g. ``"adapters archive s3://b/a.tar.gz"`` (its
            URL when it was downloaded); default ``"archive <path>"``.
    Raises:
        SourceError: not a tar archive, truncated or corrupt, or holding an unsafe member; the
            message names ``label``.
    """
    label = label or f"archive {archive}"
    try:
        readable = tarfile.is_tarfile(archive)
    except OSError as e:
        raise SourceError(f"{label}: {e}") from e
    if not readable:
        raise SourceError(f"{label} is not a tar archive")
    stem = archive.name.split(".")[0] or "archive"
    target = cache_dir() / "archives" / f"{stem}-{file_hash(archive)}"
    if target.is_dir():
        return target
    try:
        with publishing(target) as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        # FilterError (an unsafe member) is a TarError; a truncated gzip stream is an EOFError
        raise SourceError(f"{label}: {type(e).__name__}: {e}") from e
    return target
