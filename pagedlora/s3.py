"""``s3://bucket/key`` sources: an object or every object under a prefix, downloaded once into
the cache with boto3, each file checked against the size and ETag S3 reports.

Needs the ``s3`` extra (``pip install 'pagedlora[s3]'``: boto3). Credentials, region and
endpoint come from boto3's standard chain (``AWS_*`` environment variables, ``~/.aws``, an
instance or task role; ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store); none are logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import xxhash

from pagedlora.cache import cache_dir, publishing
from pagedlora.errors import SourceError

log = logging.getLogger(__name__)

_NO_MD5_ETAG = ("aws:kms", "aws:kms:dsse")  # S3 server-side encryptions whose ETag is no MD5
_MD5_CHUNK = 1 << 23


@dataclass(frozen=True)
class S3Options:
    """How patient S3 downloads are.

    Attributes:
        connect_timeout_s: seconds to wait for a TCP connection to the endpoint.
        read_timeout_s: seconds to wait for bytes on an open connection.
        max_attempts: tries per request, the first included (botocore's "standard" retries).

    Raises:
        ValueError: a timeout not > 0, or max_attempts below 1.
    """

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")


@dataclass(frozen=True)
class S3Url:
    """A parsed ``s3://bucket/key`` URL; ``key`` may be a prefix or empty (the whole bucket)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Url:
        """Raises: SourceError: not ``s3://<bucket>[/<key>]``."""
        m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url)
        if m is None:
            raise SourceError(f"{url!r} is not an S3 URL of the form s3://<bucket>/<key or "
                              f"prefix>")
        return cls(m[1], m[2] or "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class _Object:
    key: str
    relative: str  # path below the downloaded folder (the file name for a single object)
    size: int  # bytes
    etag: str  # without quotes


def is_s3_url(source: object) -> bool:
    """Whether ``source`` is a string starting with ``s3://``."""
    return isinstance(source, str) and source.startswith("s3://")


def download(url: str, options: S3Options | None = None) -> Path:
    """The local copy of ``url``: a file for an object, a folder (same layout) for a prefix.

    ``s3://b/k`` is the object ``k`` if it exists, else every object under ``k/``. The copy
    lives in ``cache_dir()/s3/<bucket>/<key>-<digest of the listing>``: listing again (one
    request) finds an unchanged source already there, so it is downloaded once; a changed one
    (other sizes or ETags) gets a new folder. Each file is fetched if its ETag is still the
    listed one, then checked: its size, and its MD5 against the listed ETag (a multipart ETag,
    ``md5-of-part-md5s-N``, is recomputed with the part size S3 reports for part 1); objects
    under SSE-KMS, whose ETag is no MD5, get the size check only. The folder appears whole or
    not at all.

    Raises:
        SourceError: naming the URL: malformed, boto3 missing, no such bucket, no such object
            or prefix, access denied or no credentials, an unreachable endpoint (after
            ``options``' timeouts and attempts), an object that changed during the download,
            a key escaping its prefix (``..``), a file failing its size or MD5 check.
    """
    options = options or S3Options()
    where = S3Url.parse(url)
    client, service_errors = _client(options)
    try:
        objects = _listing(client, where)
        target = _cache_target(where, objects)
        if not all(_intact(target / o.relative, o) for o in objects):
            if target.exists():
                log.warning("the cached copy of %s in %s is damaged; downloading it again",
                            where, target)
                shutil.rmtree(target)
            with publishing(target) as tmp:
                for o in objects:
                    _fetch(client, where, o, tmp / o.relative)
            log.info("downloaded %s (%d files, %d bytes) to %s", where, len(objects),
                     sum(o.size for o in objects), target)
    except service_errors as e:  # botocore's and boto3's: classified, naming the URL
        raise _error(e, where, client, options) from e
    single = len(objects) == 1 and objects[0].key == where.key
    return target / objects[0].relative if single else target


def _client(options: S3Options) -> tuple[object, tuple[type[Exception], ...]]:
    """An S3 client with ``options``, and the exception types its calls raise."""
    try:
        import boto3
        from boto3.exceptions import Boto3Error
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as e:
        raise SourceError(f"s3:// sources need boto3: pip install 'pagedlora[s3]' ({e})") from e
    config = Config(connect_timeout=options.connect_timeout_s,
                    read_timeout=options.read_timeout_s,
                    retries={"max_attempts": options.max_attempts, "mode": "standard"})
    return boto3.client("s3", config=config), (BotoCoreError, ClientError, Boto3Error)


def _listing(client, where: S3Url) -> list[_Object]:
    """The object ``where.key``, else the objects under ``where.key/``."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=where.bucket,
                                                             Prefix=where.key)
    listed = [o for page in pages for o in page.get("Contents", [])]
    exact = [o for o in listed if o["Key"] == where.key and not where.key.endswith("/")]
    if exact:
        o = exact[0]
        return [_Object(o["Key"], PurePosixPath(o["Key"]).name, o["Size"], _etag(o["ETag"]))]
    prefix = where.key if where.key.endswith("/") or not where.key else where.key + "/"
    found = []
    for o in listed:
        relative = o["Key"][len(prefix):]
        if not o["Key"].startswith(prefix) or not relative or relative.endswith("/"):
            continue  # a sibling prefix ("k2/..."), or a folder marker
        parts = PurePosixPath(relative).parts
        if ".." in parts or relative.startswith("/"):
            raise SourceError(f"{where}: key {o['Key']!r} points outside the prefix; refused")
        found.append(_Object(o["Key"], relative, o["Size"], _etag(o["ETag"])))
    if not found:
        raise SourceError(f"{where}: no such object, and no object under "
                          f"s3://{where.bucket}/{prefix}")
    return found


def _cache_target(where: S3Url, objects: list[_Object]) -> Path:
    listing = [where.bucket, where.key, [(o.relative, o.size, o.etag) for o in objects]]
    digest = xxhash.xxh3_64(json.dumps(listing).encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", where.key.strip("/"))[-100:] or "_bucket"
    return cache_dir() / "s3" / where.bucket / f"{name}-{digest}"


def _intact(path: Path, o: _Object) -> bool:
    return path.is_file() and path.stat().st_size == o.size


def _fetch(client, where: S3Url, o: _Object, dest: Path) -> None:
    """Downloads one object and checks it against the listing (a changed object fails its
    ETag precondition, or its MD5 check if it changes during the download)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    match = {"IfMatch": f'"{o.etag}"'}
    head = client.head_object(Bucket=where.bucket, Key=o.key, **match)
    client.download_file(where.bucket, o.key, str(dest))  # ranged GETs in parallel
    no_md5 = head.get("ServerSideEncryption") in _NO_MD5_ETAG or head.get("SSECustomerAlgorithm")
    part_size = None
    if not no_md5 and "-" in o.etag:
        part_size = client.head_object(Bucket=where.bucket, Key=o.key,
                                       PartNumber=1)["ContentLength"]
    check_download(dest, f"s3://{where.bucket}/{o.key}", o.size, None if no_md5 else o.etag,
                   part_size)


def check_download(path: Path, url: str, size: int, etag: str | None,
                   part_size: int | None = None) -> None:
    """Checks a downloaded file against what S3 reports for it.

    Args:
        size: the object's size in bytes.
        etag: its ETag without quotes: the MD5 of the content, or for a multipart upload the
            MD5 of the parts' MD5s and ``-<parts>``; None when it is no MD5 (SSE-KMS, SSE-C):
            then only the size is checked.
        part_size: for a multipart ETag, the bytes of every part but the last.
    Raises:
        SourceError: naming ``url``, when the size or the MD5 differs.
    """
    got = path.stat().st_size
    if got != size:
        raise SourceError(f"{url}: downloaded {got} bytes, S3 lists {size}")
    if etag is None:
        return
    if "-" in etag:
        digest = _multipart_md5(path, part_size or size, int(etag.rsplit("-", 1)[1]))
    else:
        digest = _md5(path)
    if digest != etag:
        raise SourceError(f"{url}: the download's MD5 {digest} differs from the ETag {etag} "
                          f"S3 listed: the copy is corrupt, or the object changed meanwhile")


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_MD5_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _multipart_md5(path: Path, part_size: int, parts: int) -> str:
    """S3's multipart ETag of a file uploaded in parts of ``part_size`` bytes (the last one
    shorter): MD5 of the concatenated part MD5s, then ``-<number of parts>``."""
    digests = []
    with open(path, "rb") as f:
        while part := f.read(part_size):
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    if len(digests) != parts:
        return f"({len(digests)} parts of {part_size} bytes, not {parts})"
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{parts}"


def _etag(value: str) -> str:
    return value.strip('"')


def _error(e: Exception, where: S3Url, client, options: S3Options) -> SourceError:
    """A SourceError naming the URL, the endpoint and what S3 (or the network) said."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    endpoint = client.meta.endpoint_url
    cause: BaseException = e
    while not isinstance(cause, ClientError):  # boto3's transfer errors wrap botocore's
        inner = getattr(cause, "last_exception", None) or cause.__cause__
        if inner is None:
            break
        cause = inner
    if isinstance(cause, ClientError):
        err = cause.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            return SourceError(f"{where}: bucket {where.bucket!r} does not exist "
                               f"(endpoint {endpoint})")
        if code in ("NoSuchKey", "404", "NotFound"):
            return SourceError(f"{where}: an object vanished while downloading ({code})")
        if code in ("PreconditionFailed", "412"):
            return SourceError(f"{where}: an object changed while downloading (its ETag no "
                               f"longer matches the listing); try again")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return SourceError(f"{where}: access denied ({code}); credentials come from "
                               f"the standard AWS chain (environment, ~/.aws, instance role)")
        return SourceError(f"{where}: S3 error {code}: {err.get('Message', cause)}")
    if isinstance(cause, NoCredentialsError):
        return SourceError(f"{where}: no AWS credentials found in the standard chain "
                           f"(environment, ~/.aws, instance role)")
    if isinstance(cause, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError,
                          ConnectionClosedError)):
        return SourceError(
            f"{where}: cannot reach the S3 endpoint {endpoint}: {cause} (connect timeout "
            f"{options.connect_timeout_s:g} s, read timeout {options.read_timeout_s:g} s, "
            f"{options.max_attempts} attempt(s))")
    return SourceError(f"{where}: {type(cause).__name__}: {cause}")
