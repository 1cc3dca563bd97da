"""The photos catalog (gridd.photos.catalog) on real SQLite and a real MariaDB, and rebuild/verify against a store.

The ``catalog`` fixture yields an empty catalog of each kind: an SQLite file
in a temporary directory, and a database of its own on the session's
throwaway MariaDB server (tests/mariadb.py). rebuild and verify run against
a LocalStore and the session's moto S3 server (tests/motoserver.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json

import pytest

from gridd.photos.catalog import (
    Catalog,
    CatalogError,
    default_catalog_url,
    open_catalog,
    rebuild,
    row_of,
    verify,
)
from gridd.photos.storage import LocalStore, S3Store, meta_key, rendition_key

KINDS = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


def sha(n: int) -> str:
    return hashlib.sha256(f"photo {n}".encode()).hexdigest()


def document(n: int, **changes) -> dict:
    """A metadata document as the photos job type writes it."""
    digest = sha(n)
    doc = {
        "width": 4000,
        "height": 3000,
        "format": "JPEG",
        "bytes": 2_345_678 + n,
        "sha256": digest,
        "make": "Canon",
        "model": "EOS R6",
        "lens": "RF24-105mm F4 L IS USM",
        "exposure_time": 0.004,
        "f_number": 5.6,
        "iso": 200,
        "focal_length": 50.0,
        "taken": "2026-06-01T14:03:22+02:00",
        "gps": {"lat": 48.858222, "lon": 2.2945, "alt": 35.5},
        "orientation": 6,
        "tags": ["paris", f"upload-{n}"],
        "source": f"/shared/uploads/{n}.jpg",
        "outputs": [
            {"width": w, "height": w * 3 // 4, "format": "JPEG", "key": rendition_key(digest, w, "JPEG"), "url": "x"}
            for w in (320, 640)
        ],
    }
    doc.update(changes)
    return doc


@pytest.fixture(params=KINDS)
def catalog_url(request, tmp_path):
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            yield f"sqlite://{tmp_path}/catalog/photos.db"
        else:
            params = stack.enter_context(request.getfixturevalue("mariadb").database())
            yield (
                f"mysql://{params.user}@{params.host}:{params.port}/{params.database}"
                f"?password_file={params.password_file}"
            )


@pytest.fixture
def catalog(catalog_url):
    ticks = itertools.count(1000)
    with contextlib.closing(open_catalog(catalog_url, clock=lambda: float(next(ticks)))) as opened:
        yield opened


def write_photo(store, doc: dict) -> None:
    """What the job type writes: every rendition, then the document last."""
    for output in doc["outputs"]:
        store.put(output["key"], b"jpeg", "image/jpeg")
    store.put(meta_key(doc["sha256"]), json.dumps(doc).encode(), "application/json")


# -- the table ------------------------------------------------------------------------


def test_catalog_upsert_writes_a_row_of_the_document(catalog):
    """A document becomes one row: its columns, GPS split out, tags, outputs and the document kept as JSON."""
    doc = document(1)
    catalog.upsert(doc)
    row = catalog.get(doc["sha256"])
    assert row == {
        "sha256": doc["sha256"],
        "width": 4000,
        "height": 3000,
        "format": "JPEG",
        "bytes": 2_345_679,
        "taken": "2026-06-01T14:03:22+02:00",
        "make": "Canon",
        "model": "EOS R6",
        "lens": "RF24-105mm F4 L IS USM",
        "exposure_time": 0.004,
        "f_number": 5.6,
        "iso": 200,
        "focal_length": 50.0,
        "lat": 48.858222,
        "lon": 2.2945,
        "alt": 35.5,
        "orientation": 6,
        "tags": ["paris", "upload-1"],
        "outputs": doc["outputs"],
        "document": doc,
        "updated": 1000.0,
    }
    assert catalog.get(sha(2)) is None


def test_catalog_upsert_again_replaces_the_row(catalog):
    """The same photo written twice (a re-dispatched job) leaves one row, holding the last write."""
    catalog.upsert(document(1))
    catalog.upsert(document(1, tags=["second"]))
    catalog.upsert(document(2))
    rows = list(catalog.rows())
    assert [row["sha256"] for row in rows] == sorted([sha(1), sha(2)])
    assert catalog.get(sha(1))["tags"] == ["second"]
    assert catalog.get(sha(1))["updated"] == 1001.0


def test_catalog_keeps_absent_metadata_as_null(catalog):
    """A photo without EXIF or GPS: those columns are NULL; odd values that do not fit are NULL or cut."""
    doc = document(3, make=None, model="M" * 400, lens=None, gps=None, iso=2**70, exposure_time="1/250", taken=None)
    catalog.upsert(doc)
    row = catalog.get(sha(3))
    assert (row["make"], row["lens"], row["taken"], row["iso"], row["exposure_time"]) == (None,) * 5
    assert (row["lat"], row["lon"], row["alt"]) == (None, None, None)
    assert row["model"] == "M" * 255
    assert row["document"]["model"] == "M" * 400


def test_catalog_keeps_unicode_tags(catalog):
    """Tags and names outside ASCII (and outside the BMP) survive the round trip."""
    catalog.upsert(document(4, tags=["café", "日本", "🐈"], make="Ōlympus"))
    row = catalog.get(sha(4))
    assert row["tags"] == ["café", "日本", "🐈"]
    assert row["make"] == "Ōlympus"


@pytest.mark.parametrize("bad", [{}, {"sha256": "abc"}, {"sha256": sha(1).upper()}, ["not", "a", "dict"]])
def test_catalog_refuses_a_document_without_a_sha256(catalog, bad):
    """A document whose sha256 is missing or malformed is a ValueError and writes nothing."""
    with pytest.raises(ValueError, match="sha256|JSON object"):
        catalog.upsert(bad)
    assert list(catalog.rows()) == []


def test_catalog_reopened_keeps_its_rows(catalog_url):
    """Rows are committed as written: a new catalog on the same database sees them."""
    first = open_catalog(catalog_url)
    first.upsert(document(5))
    second = open_catalog(catalog_url)
    try:
        assert second.get(sha(5))["document"] == document(5)
    finally:
        first.close()
        second.close()


def test_catalog_closed_refuses_calls(catalog_url):
    """A closed catalog says so instead of failing on a dead connection."""
    catalog = open_catalog(catalog_url)
    catalog.close()
    with pytest.raises(CatalogError, match="closed"):
        catalog.get(sha(1))


def test_sqlite_catalog_uses_wal(tmp_path):
    """The SQLite file is in WAL mode, as gridd's own store."""
    catalog = open_catalog(f"sqlite://{tmp_path}/p.db")
    try:
        assert catalog._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        catalog.close()


def test_open_catalog_relative_sqlite_path(tmp_path, monkeypatch):
    """sqlite://./rel.db is relative to the current directory."""
    monkeypatch.chdir(tmp_path)
    catalog = open_catalog("sqlite://./sub/photos.db")
    catalog.close()
    assert (tmp_path / "sub" / "photos.db").is_file()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("photos.db", "not a catalog URL"),
        ("postgres://u@h/db", "unknown catalog scheme"),
        ("sqlite://host/x.db", "ABSOLUTE"),
        ("sqlite:///dir/", "names no file"),
        ("mysql://u:secret@127.0.0.1/db", "password"),
        ("mysql://127.0.0.1/db", "no user"),
    ],
)
def test_open_catalog_refuses_bad_urls(url, message):
    """A URL that names no catalog is a ValueError that says what is wrong (a password in it, too)."""
    with pytest.raises(ValueError, match=message):
        open_catalog(url)


def test_open_catalog_unreachable_mysql_is_catalog_error(tmp_path):
    """A MySQL server that does not answer: CatalogError naming the database."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(CatalogError, match=f"mysql://u@127.0.0.1:{port}/db"):
            open_catalog(f"mysql://u@127.0.0.1:{port}/db")


def test_default_catalog_url_is_next_to_a_local_store(tmp_path, monkeypatch):
    """file:///dir/photos -> sqlite:///dir/photos.db; other stores -> ./gridd-photos.db."""
    monkeypatch.chdir(tmp_path)
    assert default_catalog_url(f"file://{tmp_path}/site/photos/") == f"sqlite://{tmp_path}/site/photos.db"
    assert default_catalog_url("file://./gridd-photos") == f"sqlite://{tmp_path}/gridd-photos.db"
    assert default_catalog_url("s3://bucket/p") == f"sqlite://{tmp_path}/gridd-photos.db"


# -- rebuild and verify -------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    moto = request.getfixturevalue("moto_s3")
    return S3Store(moto.bucket(), "site", endpoint_url=moto.endpoint)


def test_rebuild_from_the_store_gives_the_same_rows(catalog_url, store, tmp_path):
    """The rows rebuilt from the store's documents equal those the pipeline wrote (but for ``updated``)."""
    docs = [document(n) for n in range(6)]
    with contextlib.closing(open_catalog(catalog_url)) as written:
        for doc in docs:
            write_photo(store, doc)
            written.upsert(doc)
        before = [{k: v for k, v in row.items() if k != "updated"} for row in written.rows()]
        for row in before:
            written.delete(row["sha256"])
        assert list(written.rows()) == []
        report = rebuild(written, store)
        assert (report.rows, report.errors) == (6, [])
        after = [{k: v for k, v in row.items() if k != "updated"} for row in written.rows()]
    assert after == before
    assert len(after) == 6


def test_rebuild_skips_a_bad_document_and_says_why(catalog, store):
    """A meta.json that is not JSON, or names another photo, is reported; the others are rebuilt."""
    write_photo(store, document(1))
    store.put(meta_key(sha(2)), b"{not json", "application/json")
    store.put(meta_key(sha(3)), json.dumps(document(4)).encode(), "application/json")
    report = rebuild(catalog, store)
    assert report.rows == 1
    assert [key for key, _ in report.errors] == sorted([meta_key(sha(2)), meta_key(sha(3))])
    assert [row["sha256"] for row in catalog.rows()] == [sha(1)]


def test_verify_agrees_when_both_copies_match(catalog, store):
    """Every photo in both copies, the same: verify is ok."""
    for n in range(3):
        write_photo(store, document(n))
        catalog.upsert(document(n))
    report = verify(catalog, store)
    assert report.ok
    assert report.checked == 3


def test_verify_finds_a_missing_row_a_differing_one_and_more(catalog, store):
    """verify reports a photo without a row, a row unlike its document, a row without a document, a lost
    rendition, and renditions whose document was never written."""
    for n in range(4):
        write_photo(store, document(n))
    catalog.upsert(document(0))
    catalog.upsert(document(1, tags=["edited in the database"]))
    catalog.upsert(document(2))
    # photo 3: no row. photo 5: a row, nothing in the store.
    catalog.upsert(document(5))
    # photo 2 loses a rendition; photo 6 has renditions and no meta.json (a failed attempt).
    if isinstance(store, LocalStore):
        (store.root / rendition_key(sha(2), 640, "JPEG")).unlink()
    else:
        store.client.delete_object(Bucket=store.bucket, Key=store.prefix + rendition_key(sha(2), 640, "JPEG"))
    store.put(rendition_key(sha(6), 320, "JPEG"), b"jpeg", "image/jpeg")
    store.put("photos/not/a-photo/x.txt", b"stray", "text/plain")  # neither a photo nor a finding
    report = verify(catalog, store)
    assert not report.ok
    assert report.missing_rows == [sha(3)]
    assert report.differing == [sha(1)]
    assert report.missing_documents == [sha(5)]
    assert report.missing_outputs == [(sha(2), rendition_key(sha(2), 640, "JPEG"))]
    assert report.incomplete == [sha(6)]
    assert report.checked == 5


def test_row_of_is_what_the_catalog_stores(catalog):
    """The row a document makes is the row read back, but for ``updated``."""
    catalog.upsert(document(7))
    row = catalog.get(sha(7))
    del row["updated"]
    assert row == json.loads(json.dumps(row_of(document(7))))


def test_catalog_is_a_catalog(catalog):
    """open_catalog returns a Catalog that names its database."""
    assert isinstance(catalog, Catalog)
    assert catalog.describe().split(":")[0] in ("sqlite", "mysql")


@pytest.mark.mysql
def test_mysql_catalog_reconnects_after_its_connection_is_killed(mariadb):
    """The server closing the catalog's connection (a restart, wait_timeout): the next call reconnects."""
    with mariadb.database() as params:
        url = (
            f"mysql://{params.user}@{params.host}:{params.port}/{params.database}?password_file={params.password_file}"
        )
        with contextlib.closing(open_catalog(url)) as catalog:
            catalog.upsert(document(1))
            (thread,) = catalog._call(catalog._dialect.run, "SELECT CONNECTION_ID()")[0]
            with contextlib.closing(mariadb.root()) as root, root.cursor() as cursor:
                cursor.execute(f"KILL {int(thread)}")
            catalog.upsert(document(2))
            assert [row["sha256"] for row in catalog.rows()] == sorted([sha(1), sha(2)])
