"""The SQL copy of the photos' metadata: one ``photos`` table on SQLite or MariaDB/MySQL.

One row per photo, keyed by the SHA-256 of the original. Columns:

    sha256        the original's SHA-256 (64 lowercase hex), the key
    width, height the original's pixel size (after EXIF orientation)
    format        the original's format (JPEG, PNG, ...)
    bytes         the original's size in bytes
    taken         when it was taken, ISO 8601 (with its offset where the EXIF has one)
    make, model, lens                    the camera and the lens (cut to 255 characters)
    exposure_time (s), f_number, iso, focal_length (mm)
    lat, lon, alt the GPS position in decimal degrees (alt in metres), NULL without GPS
    orientation   the EXIF orientation (1-8)
    tags          the submitter's tags, a JSON array
    outputs       the renditions, a JSON array of {width, height, format, key, url}
    document      the whole metadata document, JSON, as in the store's meta.json
    updated       when the row was last written, seconds since the epoch

``upsert`` inserts a row or replaces the one with the same key (``INSERT
... ON CONFLICT`` on SQLite, ``ON DUPLICATE KEY UPDATE`` on MySQL), so a
photo written again — a job re-dispatched after its worker died — leaves one
row. ``rebuild(catalog, store)`` re-creates the rows from every ``meta.json``
in an object store; ``verify(catalog, store)`` reports what differs.

``open_catalog(url)`` reads ``sqlite:///abs/path.db``, ``sqlite://./rel.db``
or gridd's own MySQL URI ``mysql://USER@HOST:PORT/DB`` (the password in a
file named by ``?password_file=PATH``, else in ``$GRIDD_DB_PASSWORD``; never
in the URL, where ``ps`` and the job's parameters would show it). The calls
block, and a catalog may be shared by threads (one lock around its one
connection).
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from gridd.photos.storage import ObjectStore, StorageError, sha_of_meta_key
from gridd.store.mysql import MySQLParams, parse_mysql_uri

__all__ = [
    "COLUMNS",
    "Catalog",
    "CatalogError",
    "RebuildReport",
    "VerifyReport",
    "default_catalog_url",
    "open_catalog",
    "rebuild",
    "row_of",
    "verify",
]

#: The table's columns, in order; ``sha256`` is the key.
COLUMNS = (
    "sha256",
    "width",
    "height",
    "format",
    "bytes",
    "taken",
    "make",
    "model",
    "lens",
    "exposure_time",
    "f_number",
    "iso",
    "focal_length",
    "lat",
    "lon",
    "alt",
    "orientation",
    "tags",
    "outputs",
    "document",
    "updated",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_JSON_COLUMNS = ("tags", "outputs", "document")
_INT_COLUMNS = ("width", "height", "bytes", "iso", "orientation")
_FLOAT_COLUMNS = ("exposure_time", "f_number", "focal_length")
_TEXT_COLUMNS = {"format": 16, "taken": 64, "make": 255, "model": 255, "lens": 255}

# One statement for both databases: SQLite reads these types by affinity
# (CHAR and TEXT as text, BIGINT as integer, DOUBLE as real).
_CREATE = """CREATE TABLE IF NOT EXISTS photos (
    sha256 CHAR(64) NOT NULL PRIMARY KEY,
    width INTEGER, height INTEGER, format VARCHAR(16), bytes BIGINT, taken VARCHAR(64),
    make VARCHAR(255), model VARCHAR(255), lens VARCHAR(255),
    exposure_time DOUBLE, f_number DOUBLE, iso BIGINT, focal_length DOUBLE,
    lat DOUBLE, lon DOUBLE, alt DOUBLE, orientation INTEGER,
    tags MEDIUMTEXT NOT NULL, outputs MEDIUMTEXT NOT NULL, document MEDIUMTEXT NOT NULL,
    updated DOUBLE NOT NULL
)"""


class CatalogError(Exception):
    """The catalog's database cannot be opened or refused a statement."""


def row_of(document: dict) -> dict:
    """The row a metadata document makes (without ``updated``); ValueError for a document without a SHA-256.

    Values that do not fit their column (text, a number that is not finite,
    an integer out of range) become NULL or are cut; the ``document``
    column keeps them whole.
    """
    if not isinstance(document, dict):
        raise ValueError(f"a photo's document must be a JSON object, not {type(document).__name__}")
    sha = document.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"the document has no valid sha256 (64 lowercase hex digits): {sha!r}")
    row = {"sha256": sha}
    for name in _INT_COLUMNS:
        value = document.get(name)
        row[name] = value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None
    for name in _FLOAT_COLUMNS:
        row[name] = _number(document.get(name))
    for name, size in _TEXT_COLUMNS.items():
        value = document.get(name)
        row[name] = value[:size] if isinstance(value, str) else None
    gps = document.get("gps") if isinstance(document.get("gps"), dict) else {}
    for name in ("lat", "lon", "alt"):
        row[name] = _number(gps.get(name))
    tags = document.get("tags") or []
    outputs = document.get("outputs") or []
    row["tags"] = tags if isinstance(tags, list) else [tags]
    row["outputs"] = outputs if isinstance(outputs, list) else []
    row["document"] = document
    return row


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


class _SQLite:
    """SQLite's part: WAL with synchronous=NORMAL and a busy timeout, as gridd's own store; qmark parameters."""

    name = "sqlite"
    busy_timeout_ms = 5000
    errors = (sqlite3.Error,)
    upsert_tail = "ON CONFLICT(sha256) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])

    def __init__(self, path: str):
        self.path = path

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def connect(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL", f"busy_timeout = {self.busy_timeout_ms}"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute(_CREATE)
        return conn

    def sql(self, statement: str) -> str:
        return statement

    def run(self, conn, statement: str, args=()):
        return conn.execute(statement, args).fetchall()

    def write(self, conn, statement: str, args=()):
        conn.execute(statement, args)  # autocommit: one statement, one transaction


class _MySQL:
    """MariaDB/MySQL's part: pymysql with gridd's connection settings (utf8mb4, strict mode); %s parameters.

    Each call pings its connection first and reconnects if the server
    closed it (a restart, ``wait_timeout``).
    """

    name = "mysql"
    upsert_tail = "ON DUPLICATE KEY UPDATE " + ", ".join(f"{c} = VALUES({c})" for c in COLUMNS[1:])

    def __init__(self, params: MySQLParams):
        import pymysql

        self.params = params
        self.errors = (pymysql.err.MySQLError,)

    def describe(self) -> str:
        return self.params.describe()

    def connect(self):
        import pymysql

        from gridd.store.mysql import MySQLDialect

        kwargs = MySQLDialect.connect_kwargs(self.params)
        kwargs["autocommit"] = True
        conn = pymysql.connect(**kwargs)
        self._setup(conn)
        with conn.cursor() as cursor:
            cursor.execute(_CREATE + " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin")
        return conn

    def _setup(self, conn) -> None:
        with conn.cursor() as cursor:
            cursor.execute("SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'")

    def _alive(self, conn) -> None:
        import pymysql

        try:
            conn.ping()
        except pymysql.err.Error:
            conn.connect()
            self._setup(conn)

    def sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def run(self, conn, statement: str, args=()):
        self._alive(conn)
        with conn.cursor() as cursor:
            cursor.execute(statement, args or None)
            return list(cursor.fetchall())

    def write(self, conn, statement: str, args=()):
        self.run(conn, statement, args)


class Catalog:
    """The ``photos`` table of one database: ``upsert``, ``get``, ``rows``, ``close``."""

    def __init__(self, dialect, clock=time.time):
        self._dialect = dialect
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._conn = dialect.connect()
        except dialect.errors + (OSError,) as error:
            raise CatalogError(f"cannot open the photo catalog {dialect.describe()}: {error}") from error
        placeholders = ", ".join("?" for _ in COLUMNS)
        self._upsert = dialect.sql(f"INSERT INTO photos ({', '.join(COLUMNS)}) VALUES ({placeholders}) ")
        self._upsert += dialect.upsert_tail

    def __repr__(self) -> str:
        return f"Catalog({self._dialect.describe()})"

    def describe(self) -> str:
        return self._dialect.describe()

    def _call(self, method, statement: str, args=()):
        with self._lock:
            if self._conn is None:
                raise CatalogError(f"the photo catalog {self.describe()} is closed")
            try:
                return method(self._conn, self._dialect.sql(statement), args)
            except self._dialect.errors as error:
                raise CatalogError(f"the photo catalog {self.describe()} failed: {error}") from error

    def upsert(self, document: dict) -> None:
        """Insert the photo's row, or replace the row with its SHA-256."""
        row = row_of(document)
        row["updated"] = self._clock()
        args = [_dumps(row[c]) if c in _JSON_COLUMNS else row[c] for c in COLUMNS]
        self._call(self._dialect.write, self._upsert, args)

    def get(self, sha256: str) -> dict | None:
        """The photo's row (as ``rows()`` gives them), or None."""
        found = self._call(self._dialect.run, f"SELECT {', '.join(COLUMNS)} FROM photos WHERE sha256 = ?", (sha256,))
        return _row_dict(found[0]) if found else None

    def rows(self) -> Iterator[dict]:
        """Every row, in order of SHA-256; the JSON columns decoded."""
        found = self._call(self._dialect.run, f"SELECT {', '.join(COLUMNS)} FROM photos ORDER BY sha256")
        for values in found:
            yield _row_dict(values)

    def delete(self, sha256: str) -> None:
        """Remove the photo's row, if any."""
        self._call(self._dialect.write, "DELETE FROM photos WHERE sha256 = ?", (sha256,))

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _row_dict(values) -> dict:
    row = dict(zip(COLUMNS, values, strict=True))
    for name in _JSON_COLUMNS:
        row[name] = json.loads(row[name])
    for name in _FLOAT_COLUMNS + ("lat", "lon", "alt", "updated"):
        if row[name] is not None:
            row[name] = float(row[name])
    return row


def default_catalog_url(store_url: str) -> str:
    """The SQLite file next to a local store (``DIR`` -> ``DIR.db``); for any other store, ./gridd-photos.db."""
    parts = urlsplit(store_url)
    if parts.scheme == "file":
        path = (parts.netloc if parts.netloc in (".", "..") else "") + unquote(parts.path)
        path = os.path.abspath(path.rstrip("/"))
        return f"sqlite://{path}.db"
    return f"sqlite://{os.path.abspath('gridd-photos.db')}"


def open_catalog(url: str, clock=time.time) -> Catalog:
    """The catalog a URL names: ``sqlite:///abs.db``, ``sqlite://./rel.db`` or ``mysql://USER@HOST:PORT/DB``.

    Raises ``ValueError`` for a URL that names no catalog, ``CatalogError``
    for a database that cannot be opened.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"not a catalog URL: {url!r}; expected sqlite:///PATH.db or mysql://USER@HOST:PORT/DB")
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.query or parts.fragment:
            raise ValueError(f"a sqlite: catalog URL takes no options: {url!r}")
        if parts.netloc in ("", "localhost"):
            path = unquote(parts.path)
        elif parts.netloc in (".", ".."):
            path = parts.netloc + unquote(parts.path)
        else:
            raise ValueError(f"bad sqlite: catalog URL {url!r}: write sqlite:///ABSOLUTE/PATH.db or sqlite://./REL.db")
        if not path or path.endswith("/"):
            raise ValueError(f"the sqlite: catalog URL {url!r} names no file")
        return Catalog(_SQLite(path), clock)
    if parts.scheme == "mysql":
        return Catalog(_MySQL(parse_mysql_uri(url)), clock)
    raise ValueError(f"unknown catalog scheme {parts.scheme!r} in {url!r}; known: sqlite, mysql")


# -- the two copies -----------------------------------------------------------------------


@dataclass
class RebuildReport:
    """What ``rebuild`` did: rows written, and the documents it could not use (key, why)."""

    rows: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class VerifyReport:
    """What differs between a catalog and a store; ``ok`` when nothing does.

    - ``missing_rows``: photos complete in the store (a ``meta.json``) without a row;
    - ``missing_documents``: rows whose photo has no ``meta.json`` in the store;
    - ``differing``: rows that are not what the store's document makes;
    - ``missing_outputs``: (sha256, key) of renditions a document names and the store lacks;
    - ``incomplete``: photos with renditions but no ``meta.json`` (being written, or a failed attempt);
    - ``unreadable``: (key, why) of documents that are not a photo's JSON.
    """

    checked: int = 0
    missing_rows: list[str] = field(default_factory=list)
    missing_documents: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    missing_outputs: list[tuple[str, str]] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing_rows or self.missing_documents or self.differing or self.missing_outputs or self.unreadable
        )


def _documents(store: ObjectStore, keys: list[str], errors: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
    """(sha256, document) of every metadata document among ``keys``; the bad ones go to ``errors``."""
    for key in keys:
        sha = sha_of_meta_key(key)
        if sha is None:
            continue
        try:
            document = json.loads(store.get(key))
        except StorageError:
            raise
        except ValueError as error:
            errors.append((key, f"not JSON: {error}"))
            continue
        if not isinstance(document, dict) or document.get("sha256") != sha:
            errors.append((key, "not a photo's document: its sha256 is not the one its key names"))
            continue
        yield sha, document


def rebuild(catalog: Catalog, store: ObjectStore) -> RebuildReport:
    """Upsert a row for every photo document in ``store``; rows of other photos are left as they are."""
    report = RebuildReport()
    for _, document in _documents(store, list(store.list("photos/")), report.errors):
        catalog.upsert(document)
        report.rows += 1
    return report


def verify(catalog: Catalog, store: ObjectStore) -> VerifyReport:
    """Compare the catalog's rows with the store's documents and objects."""
    report = VerifyReport()
    keys = list(store.list("photos/"))
    present = set(keys)
    documents = dict(_documents(store, keys, report.unreadable))
    rows = {row["sha256"]: row for row in catalog.rows()}
    with_objects = {
        parts[2]
        for parts in (key.split("/") for key in keys)
        if len(parts) == 4 and _SHA256.fullmatch(parts[2]) and parts[1] == parts[2][:2]
    }
    report.incomplete = sorted(with_objects - set(documents) - {sha_of_meta_key(key) for key, _ in report.unreadable})
    for sha in sorted(set(documents) | set(rows)):
        report.checked += 1
        document, row = documents.get(sha), rows.get(sha)
        if document is None:
            report.missing_documents.append(sha)
            continue
        for output in document.get("outputs") or []:
            key = output.get("key") if isinstance(output, dict) else None
            if not isinstance(key, str) or key not in present:
                report.missing_outputs.append((sha, str(key)))
        if row is None:
            report.missing_rows.append(sha)
        elif {c: v for c, v in row.items() if c != "updated"} != json.loads(_dumps(row_of(document))):
            report.differing.append(sha)
    return report
