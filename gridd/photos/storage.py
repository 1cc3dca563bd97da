"""Where the photos' renditions and metadata documents go: a local directory or an S3 bucket.

Both stores keep objects under the same keys, derived from the SHA-256 of
the original photo, so that the same photo always writes the same keys:

    photos/{sha[:2]}/{sha}/{width}.{ext}    one rendition per width (ext: jpg, webp, ...)
    photos/{sha[:2]}/{sha}/meta.json        the metadata document, written last

A photo is complete when its ``meta.json`` exists: the job type writes it
after every rendition. A job re-dispatched after its worker died mid-photo
writes the same keys again (idempotent), so it leaves no orphaned objects;
renditions without a ``meta.json`` are a photo still being written, or one
whose attempt failed and will be retried.

``open_store(url)`` reads a store's URL: ``file:///abs/dir``,
``file://./rel/dir`` (relative to the current directory) or
``s3://bucket/prefix?endpoint=http://HOST:PORT&region=REGION``. An S3 store
takes its credentials from the usual AWS chain (environment, shared
credentials file, instance role); the region defaults to
``$AWS_DEFAULT_REGION``, else us-east-1.

A write the store refuses (a lost connection, a refusal by the server, a
full disk) is tried again after each of ``retry_delays`` seconds, then
fails with ``StorageError``: the caller's attempt fails and the job is
retried, never a half-recorded photo.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "EXTENSIONS",
    "LocalStore",
    "ObjectMissing",
    "ObjectStore",
    "RETRY_DELAYS",
    "S3Store",
    "StorageError",
    "meta_key",
    "open_store",
    "photo_prefix",
    "rendition_key",
    "sha_of_meta_key",
]

#: The top folder of every key.
ROOT = "photos"
#: File name extensions of the rendition formats.
EXTENSIONS = {"JPEG": "jpg", "WEBP": "webp", "PNG": "png"}
#: Seconds to wait before each new try of a refused operation: five tries in all, under 4 s of waiting.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)
#: The region an S3 store uses when neither the URL nor $AWS_DEFAULT_REGION names one.
DEFAULT_REGION = "us-east-1"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_META = re.compile(rf"{ROOT}/([0-9a-f]{{2}})/([0-9a-f]{{64}})/meta\.json")

T = TypeVar("T")


class StorageError(Exception):
    """The store cannot do what was asked: refused (after retries), unreachable, or misconfigured."""


class ObjectMissing(StorageError):
    """No object has that key."""


# -- keys ----------------------------------------------------------------------


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a SHA-256 in lowercase hex: {sha256!r}")
    return sha256


def photo_prefix(sha256: str) -> str:
    """``photos/{sha[:2]}/{sha}/``: every object of one photo lies under it."""
    _check_sha(sha256)
    return f"{ROOT}/{sha256[:2]}/{sha256}/"


def rendition_key(sha256: str, width: int, format: str) -> str:
    """The key of one photo's rendition ``width`` pixels wide, in ``format`` (JPEG, WEBP, PNG)."""
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ValueError(f"a rendition's width must be a positive integer, not {width!r}")
    try:
        ext = EXTENSIONS[format.upper()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown rendition format {format!r}; known: {', '.join(EXTENSIONS)}") from None
    return f"{photo_prefix(sha256)}{width}.{ext}"


def meta_key(sha256: str) -> str:
    """The key of one photo's metadata document."""
    return f"{photo_prefix(sha256)}meta.json"


def sha_of_meta_key(key: str) -> str | None:
    """The photo's SHA-256 if ``key`` is a metadata document's key, else None."""
    match = _META.fullmatch(key)
    if match is None or match.group(2)[:2] != match.group(1):
        return None
    return match.group(2)


def _check_key(key: str) -> str:
    """A key is a relative path of non-empty parts, none ``.`` or ``..``."""
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"bad object key {key!r}: a relative path like photos/ab/abcd.../640.jpg")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"bad object key {key!r}: empty, '.' or '..' parts")
    return key


# -- the interface ------------------------------------------------------------------


class ObjectStore(Protocol):
    """What the photos job type, ``rebuild`` and ``verify`` need of a store. Blocking calls."""

    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Write ``data`` at ``key`` (replacing what was there, whole or not at all); return its URL."""

    def get(self, key: str) -> bytes:
        """The object's bytes; ``ObjectMissing`` if there is none."""

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix``, in sorted order."""

    def url(self, key: str) -> str:
        """Where the object at ``key`` is, as a URL (``file://...`` or ``s3://bucket/...``)."""


def _retrying(what: str, operation: Callable[[], T], delays, sleep, fatal: Callable[[Exception], bool]) -> T:
    """Run ``operation``; after a failure, wait each of ``delays`` and run it again; then ``StorageError``.

    An error ``fatal`` says trying again cannot help (a missing object,
    missing credentials) is raised at once.
    """
    tries = len(delays) + 1
    for attempt in range(tries):
        try:
            return operation()
        except StorageError:
            raise
        except Exception as error:
            if fatal(error):
                raise
            if attempt == tries - 1:
                raise StorageError(f"{what} failed {tries} times; the last error: {_describe(error)}") from error
            sleep(delays[attempt])
    raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# -- a local directory ------------------------------------------------------------------


class LocalStore:
    """Objects as files under ``root`` (created if missing); the embedded default.

    A write goes to a temporary file in the object's folder, is flushed to
    disk, then renamed over the key: a reader sees the old object or the new
    one, never part of one, and a crash leaves at most a temporary file
    (``.NAME.*.tmp``), which ``list`` does not show.
    """

    def __init__(self, root: str | os.PathLike, *, retry_delays=RETRY_DELAYS, sleep=time.sleep):
        self.root = Path(root).absolute()
        self.retry_delays = tuple(retry_delays)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self._path(key)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"an object's data must be bytes, not {type(data).__name__}")

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(temp, 0o644)
                os.replace(temp, path)
            except BaseException:
                try:
                    os.unlink(temp)
                except FileNotFoundError:
                    pass
                raise

        _retrying(f"writing {path}", write, self.retry_delays, self._sleep, lambda error: False)
        return self.url(key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectMissing(f"no object {key!r} in {self.root}") from None
        except OSError as error:
            raise StorageError(f"cannot read {path}: {_describe(error)}") from error

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the folders that can hold such keys.
        top, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*top.split("/")) if top else self.root
        if not start.is_dir():
            return
        keys = []
        for folder, dirs, files in os.walk(start, onerror=_raise):
            dirs.sort()
            relative = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # a write under way, or one a crash left behind
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)

    def url(self, key: str) -> str:
        return self._path(key).as_uri()


def _raise(error: OSError) -> None:
    raise StorageError(f"cannot list {error.filename}: {_describe(error)}") from error


# -- an S3 bucket -----------------------------------------------------------------------


class S3Store:
    """Objects in an S3 bucket (AWS, MinIO, Ceph, ...) under ``prefix``, through boto3.

    ``client`` is a boto3 S3 client to use instead of one made here from
    ``endpoint_url`` and ``region``. botocore's own retries are turned off in
    the client made here, so that the retries and their bound are this
    module's (``retry_delays``).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        client=None,
        *,
        region: str | None = None,
        retry_delays=RETRY_DELAYS,
        sleep=time.sleep,
    ):
        if not bucket or "/" in bucket:
            raise ValueError(f"bad bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.retry_delays = tuple(retry_delays)
        self._sleep = sleep
        if client is None:
            import boto3.session
            from botocore.config import Config

            # A session of its own: boto3's default session is shared by
            # every thread and keeps the credentials it found first.
            session = boto3.session.Session()
            client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region or session.region_name or DEFAULT_REGION,
                config=Config(
                    retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=5,
                    read_timeout=30,
                ),
            )
        self.client = client

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store(s3://{self.bucket}/{self.prefix}{where})"

    def _name(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _run(self, what: str, operation: Callable[[], T], missing_is_fatal: bool = False) -> T:
        return _retrying(
            f"{what} (s3://{self.bucket}/{self.prefix})",
            operation,
            self.retry_delays,
            self._sleep,
            lambda error: _no_credentials(error) or (missing_is_fatal and _is_missing(error)),
        )

    def put(self, key: str, data: bytes, content_type: str) -> str:
        name = self._name(key)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"an object's data must be bytes, not {type(data).__name__}")
        try:
            self._run(
                f"writing {name}",
                lambda: self.client.put_object(
                    Bucket=self.bucket, Key=name, Body=bytes(data), ContentType=content_type
                ),
            )
        except Exception as error:
            raise _storage_error(error, f"writing {name}") from error
        return self.url(key)

    def get(self, key: str) -> bytes:
        name = self._name(key)
        try:
            return self._run(
                f"reading {name}",
                lambda: self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read(),
                missing_is_fatal=True,
            )
        except Exception as error:
            if _is_missing(error):
                raise ObjectMissing(f"no object {name!r} in bucket {self.bucket!r}") from None
            raise _storage_error(error, f"reading {name}") from error

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._run(
                f"looking for {name}",
                lambda: self.client.head_object(Bucket=self.bucket, Key=name),
                missing_is_fatal=True,
            )
        except Exception as error:
            if _is_missing(error) and _error_code(error) != "NoSuchBucket":
                return False
            raise _storage_error(error, f"looking for {name}") from error
        return True

    def list(self, prefix: str = "") -> Iterator[str]:
        start = self.prefix + prefix

        def pages():
            paginator = self.client.get_paginator("list_objects_v2")
            return [page for page in paginator.paginate(Bucket=self.bucket, Prefix=start)]

        try:
            result = self._run(f"listing {start or '/'}", pages)
        except Exception as error:
            raise _storage_error(error, f"listing {start or '/'}") from error
        keys = sorted(item["Key"] for page in result for item in page.get("Contents", ()))
        for name in keys:
            yield name[len(self.prefix) :]

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._name(key)}"


def _error_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")) or None
    return None


def _is_missing(error: BaseException) -> bool:
    return _error_code(error) in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def _no_credentials(error: BaseException) -> bool:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    return isinstance(error, NoCredentialsError | PartialCredentialsError)


def _storage_error(error: Exception, what: str) -> StorageError:
    if isinstance(error, StorageError):
        return error
    if _no_credentials(error):
        return StorageError(
            f"{what}: no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "a profile (AWS_PROFILE, ~/.aws/credentials) or an instance role"
        )
    if _error_code(error) == "NoSuchBucket":
        return StorageError(f"{what}: the bucket does not exist")
    return StorageError(f"{what}: {_describe(error)}")


# -- URLs -----------------------------------------------------------------------------


def open_store(url: str, **kwargs) -> ObjectStore:
    """The store a URL names: ``file:///abs/dir``, ``file://./rel/dir`` or ``s3://bucket/prefix?endpoint=URL``.

    ``kwargs`` go to the store's constructor (``retry_delays``, ``sleep``;
    ``client`` and ``region`` for S3). Raises ``ValueError`` for a URL that
    names no store.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"not a store URL: {url!r}; expected file:///DIR, file://./DIR or s3://BUCKET/PREFIX")
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    if parts.scheme == "file":
        if query or parts.fragment:
            raise ValueError(f"a file: store URL takes no options: {url!r}")
        if parts.netloc in ("", "localhost"):
            path = unquote(parts.path)
        elif parts.netloc in (".", ".."):
            path = parts.netloc + unquote(parts.path)
        else:
            raise ValueError(
                f"bad file: store URL {url!r}: write file:///ABSOLUTE/DIR or file://./RELATIVE/DIR"
                f" (the {parts.netloc!r} after file:// would be a host name)"
            )
        if not path or path == "/":
            raise ValueError(f"the file: store URL {url!r} names no directory")
        return LocalStore(path, **kwargs)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"the s3: store URL {url!r} names no bucket: expected s3://BUCKET/PREFIX")
        unknown = set(query) - {"endpoint", "region"}
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} in {url!r}; known: endpoint, region")
        endpoint = query["endpoint"][-1] if "endpoint" in query else None
        if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
            raise ValueError(f"the endpoint in {url!r} must be an http:// or https:// URL, not {endpoint!r}")
        if "region" in query:
            kwargs.setdefault("region", query["region"][-1])
        return S3Store(parts.netloc, unquote(parts.path), endpoint_url=endpoint, **kwargs)
    raise ValueError(f"unknown store scheme {parts.scheme!r} in {url!r}; known: file, s3")
