"""The ``photos`` job type: each record is one photo, resized, described, stored and catalogued.

A record names the photo and its submitter's tags::

    {"path": "/shared/uploads/x.jpg", "tags": ["beach", "2024"]}
    {"key": "s3://bucket/uploads/x.jpg", "tags": []}

(``path``: a file on storage the workers share; ``key``: an object in an
S3-compatible store, read with the endpoint of ``params.store`` when that is
an ``s3://`` store too). Params, all optional:

``widths``, ``format``, ``quality``
    the renditions (:func:`gridd.photos.images.process_photo`; default
    320, 640, 1280 and 2048 pixels, JPEG, 85);
``store``
    where outputs go: ``file:///dir``, ``file://./dir`` (relative to the
    worker's directory) or ``s3://bucket/prefix?endpoint=URL``; default
    ``file://./gridd-photos``;
``catalog``
    the SQL copy: ``sqlite:///path.db`` or ``mysql://USER@HOST:PORT/DB?password_file=PATH``
    (never a password in the URL); default ``DIR.db`` next to a ``file://``
    store's directory, else ``./gridd-photos.db``.

Per record, in this order: read the source, process it, put each rendition,
put the metadata document LAST (its presence marks the photo complete), then
upsert the catalog row. Keys derive from the original's SHA-256 and the
width, so a record run again (a job re-dispatched after its worker died)
writes the same objects and the same row. The record's result is the
document: the metadata plus ``tags``, ``source`` and ``outputs``
(``[{"width", "height", "format", "key", "url"}]``).

Bad photos (:class:`gridd.photos.images.PhotoError`), a missing file and a
bad record are that record's error; the job goes on. A store or catalog that
fails (after the store's own retries) fails the attempt, so the job is
retried and no photo is left half recorded.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gridd.jobtypes import JobContext, JobType, RecordError
from gridd.photos.images import DEFAULT_WIDTHS, PhotoError, process_photo
from gridd.photos.storage import meta_key, rendition_key

__all__ = ["Photos", "DEFAULT_STORE", "default_catalog"]

DEFAULT_STORE = "file://./gridd-photos"

#: A source larger than this is refused before it is read (bytes).
MAX_SOURCE_BYTES = 512 * 1024 * 1024


def default_catalog(store_url: str) -> str:
    """The catalog beside the store (``gridd.photos.catalog.default_catalog_url``): the same one gridctl reads."""
    from gridd.photos.catalog import default_catalog_url

    return default_catalog_url(store_url)


def _open_store(url: str):
    from gridd.photos.storage import open_store

    return open_store(url)


def _open_catalog(url: str):
    from gridd.photos.catalog import open_catalog

    return open_catalog(url)


class Photos(JobType):
    """Resizes each photo, extracts its metadata, and writes both to the object store and the catalog.

    ``open_store`` and ``open_catalog`` turn a URL into a store or a catalog
    (default: :func:`gridd.photos.storage.open_store` and
    :func:`gridd.photos.catalog.open_catalog`). Stores are opened once per
    URL; catalogs once per URL and thread, since a database connection
    belongs to the thread that opened it.
    """

    name = "photos"
    version = "1.0"
    threaded = True
    needs_network = True  # an s3:// store or a mysql:// catalog; a sandboxed worker gives it the network

    def __init__(
        self, open_store: Callable[[str], Any] = _open_store, open_catalog: Callable[[str], Any] = _open_catalog
    ):
        self._open_store = open_store
        self._open_catalog = open_catalog
        self._stores: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def process(self, record: Any, params: dict, context: JobContext) -> dict:
        source, tags = _parse_record(record)
        store_url = params.get("store", DEFAULT_STORE)
        catalog_url = params.get("catalog") or default_catalog(store_url)
        if not isinstance(store_url, str) or not isinstance(catalog_url, str):
            raise RecordError("params.store and params.catalog must be URLs (strings)")
        options = {
            "widths": params.get("widths", DEFAULT_WIDTHS),
            "format": params.get("format", "JPEG"),
            "quality": params.get("quality", 85),
        }
        data = self._read(source, store_url)
        processed = process_photo(data, **options)
        store = self.store(store_url)
        sha = processed.metadata["sha256"]
        outputs = []
        for rendition in processed.outputs:
            key = rendition_key(sha, rendition.width, rendition.format)
            url = store.put(key, rendition.data, rendition.content_type)
            outputs.append(
                {
                    "width": rendition.width,
                    "height": rendition.height,
                    "format": rendition.format,
                    "key": key,
                    "url": url,
                }
            )
        document = {**processed.metadata, "tags": tags, "source": source, "outputs": outputs}
        body = json.dumps(document, ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")
        store.put(meta_key(sha), body, "application/json")  # last: the photo is complete once this exists
        self.catalog(catalog_url).upsert(document)
        context.progress(f"{source}: {len(outputs)} outputs")
        return document

    def store(self, url: str):
        with self._lock:
            if url not in self._stores:
                self._stores[url] = self._open(self._open_store, url, "store")
            return self._stores[url]

    def catalog(self, url: str):
        catalogs = self._local.__dict__.setdefault("catalogs", {})
        if url not in catalogs:
            catalogs[url] = self._open(self._open_catalog, url, "catalog")
        return catalogs[url]

    @staticmethod
    def _open(opener, url: str, what: str):
        try:
            return opener(url)
        except ValueError as e:  # a URL the opener cannot use: every record of the job would fail alike
            raise RecordError(f"bad params.{what} {url!r}: {e}") from None

    def _read(self, source: str, store_url: str) -> bytes:
        if source.startswith("s3://"):
            return self._read_object(source, store_url)
        try:
            with open(source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_SOURCE_BYTES:
                    raise PhotoError(f"{source}: {size} bytes is larger than {MAX_SOURCE_BYTES} bytes")
                return f.read()
        except FileNotFoundError:
            raise PhotoError(f"missing file: {source}") from None
        except IsADirectoryError:
            raise PhotoError(f"not a file: {source} is a directory") from None
        except PermissionError:
            raise PhotoError(f"cannot read {source}: permission denied") from None

    def _read_object(self, source: str, store_url: str) -> bytes:
        parts = urlsplit(source)
        if not parts.netloc or not parts.path.strip("/"):
            raise RecordError(f"bad key {source!r}: expected s3://bucket/key")
        bucket_url = f"s3://{parts.netloc}"
        store = urlsplit(store_url)
        endpoint = parse_qs(store.query).get("endpoint") if store.scheme == "s3" else None
        if endpoint:
            bucket_url += "?endpoint=" + endpoint[0]
        from gridd.photos.storage import ObjectMissing

        try:
            return self.store(bucket_url).get(parts.path.lstrip("/"))
        except (ObjectMissing, KeyError, FileNotFoundError):
            # The photo is not there: that record's error. A store that cannot be reached fails the attempt.
            raise PhotoError(f"missing object: {source}") from None


def _parse_record(record) -> tuple[str, list[str]]:
    """The record's source (a path or an s3:// key) and its tags; RecordError for any other record."""
    usage = 'a photos record is {"path": PATH, "tags": [TEXT, ...]} or {"key": "s3://bucket/key", "tags": [...]}'
    if not isinstance(record, dict) or ("path" in record) == ("key" in record):
        raise RecordError(usage)
    unknown = set(record) - {"path", "key", "tags"}
    if unknown:
        raise RecordError(f"unknown record fields {', '.join(sorted(unknown))}: {usage}")
    source = record.get("path", record.get("key"))
    if not isinstance(source, str) or not source:
        raise RecordError(usage)
    if "key" in record and not source.startswith("s3://"):
        raise RecordError(f"bad key {source!r}: expected s3://bucket/key")
    tags = record.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise RecordError(f"tags must be a list of strings, not {json.dumps(tags)[:80]}")
    return source, tags
