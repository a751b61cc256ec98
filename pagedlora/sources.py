"""Where models and adapters come from: a local path, an ``s3://`` URL, or a Hugging Face model
id found in the local Hugging Face cache. Nothing is ever downloaded from a model hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pagedlora.errors import SourceError
from pagedlora.s3 import S3Options, download, is_s3_url

# "org/name" as the Hub spells repository ids; a bare name is taken as a local path.
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

__all__ = ["S3Options", "as_source", "fetch", "hf_cached", "is_hf_id", "is_s3_url"]


def as_source(source: str | os.PathLike) -> str | Path:
    """``source`` as stored in configs: URLs and model ids stay strings (``Path`` would fold
    ``s3://`` into ``s3:/``), local paths become ``Path``."""
    if is_s3_url(source) or (isinstance(source, str) and is_hf_id(source)
                             and not Path(source).exists()):
        return source
    return Path(source)


def is_hf_id(source: object) -> bool:
    """Whether ``source`` is shaped like a Hub repository id (``org/name``)."""
    return isinstance(source, str) and _HF_ID.fullmatch(source) is not None


def fetch(source: str | os.PathLike, what: str = "model", revision: str | None = None,
          s3: S3Options | None = None) -> Path:
    """A local path holding ``source``.

    Args:
        source: a local file or directory (returned as is); ``s3://bucket/key-or-prefix``
            (downloaded once into the cache, checked, see :func:`pagedlora.s3.download`); or
            ``org/name``, a Hugging Face model id that is not a local path, looked up in the
            local Hugging Face cache (``HF_HUB_CACHE``) only.
        what: the kind of thing, for error messages ("model", "adapter", "adapters").
        revision: for a model id, the branch, tag or commit in the cache (default "main").
        s3: timeouts and attempts for S3.
    Raises:
        FileNotFoundError: a missing local path (that is not shaped like a model id).
        SourceError: naming the source: an id not in the cache (the message says how to
            fill it), or as ``pagedlora.s3.download``.
    """
    if is_s3_url(source):
        return download(source, s3)
    path = Path(source)
    if path.exists():
        return path
    if is_hf_id(source):
        return hf_cached(str(source), revision, what)
    raise FileNotFoundError(f"{what} path {source} does not exist")


def hf_cached(repo_id: str, revision: str | None = None, what: str = "model") -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` in the local Hugging Face cache,
    found without any network access.

    Raises:
        SourceError: the id (or that revision) is not in the cache, naming the id, the cache
            folder and the command that fills it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        at = f" at revision {revision!r}" if revision else ""
        raise SourceError(
            f"{what} {repo_id!r}{at} is neither a local path nor in the local Hugging Face "
            f"cache ({constants.HF_HUB_CACHE}); pagedlora never downloads from the hub at run "
            f"time: fetch it beforehand (huggingface-cli download {repo_id}), or give a local "
            f"path or an s3:// URL ({type(e).__name__})") from e
