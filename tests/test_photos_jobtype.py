"""The photos job type (gridd.photos.jobtype), run through a worker core as tests/test_worker.py does.

Until gridd.photos.storage and gridd.photos.catalog are merged, the store and
the catalog here are the in-test doubles DoubleStore and DoubleCatalog, coded
to their documented interface (put/get/exists/list/url; upsert/get/rows/close).
"""

from __future__ import annotations

import json
import os

import pytest

from gridd.jobtypes import load_job_types
from gridd.photos.jobtype import Photos, default_catalog, meta_key, rendition_key
from tests.photos import exif_block, make_photo
from tests.test_worker import Harness, job_line


class DoubleStoreError(Exception):
    """What DoubleStore raises for a write it refuses (the real store raises StorageError after retries)."""


class DoubleStore:
    """An in-test double of gridd.photos.storage's ObjectStore: objects in a dict, writes in order."""

    def __init__(self, url, refuse=None):
        self.base = url
        self.objects: dict[str, tuple[bytes, str]] = {}
        self.writes: list[str] = []
        self.refuse = refuse  # a predicate on keys whose writes fail

    def put(self, key, data, content_type):
        if self.refuse is not None and self.refuse(key):
            raise DoubleStoreError(f"write of {key} refused")
        self.objects[key] = (data, content_type)
        self.writes.append(key)
        return self.url(key)

    def get(self, key):
        if key not in self.objects:
            raise KeyError(key)
        return self.objects[key][0]

    def exists(self, key):
        return key in self.objects

    def list(self, prefix=""):
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def url(self, key):
        return f"{self.base}/{key}"


class DoubleCatalog:
    """An in-test double of gridd.photos.catalog's Catalog: rows by SHA-256."""

    def __init__(self, url):
        self.url = url
        self.photos: dict[str, dict] = {}
        self.upserts = 0

    def upsert(self, document):
        self.photos[document["sha256"]] = json.loads(json.dumps(document))
        self.upserts += 1

    def get(self, sha256):
        return self.photos.get(sha256)

    def rows(self):
        return iter(self.photos.values())

    def close(self):
        pass


class Opened:
    """The stores and catalogs a Photos instance opened, by URL."""

    def __init__(self, refuse=None):
        self.stores: dict[str, DoubleStore] = {}
        self.catalogs: dict[str, DoubleCatalog] = {}
        self.refuse = refuse

    def store(self, url):
        if url.startswith("bogus:"):
            raise ValueError("no such store scheme")
        return self.stores.setdefault(url, DoubleStore(url, self.refuse))

    def catalog(self, url):
        return self.catalogs.setdefault(url, DoubleCatalog(url))


def harness(opened: Opened) -> Harness:
    return Harness(types={"photos": Photos(open_store=opened.store, open_catalog=opened.catalog)}).welcome()


def results(lines: list[str]) -> list[dict]:
    """The results of the one DONE sent (progress notes aside)."""
    (line,) = [line for line in lines if not line.startswith(("BEAT", "PROGRESS "))]
    assert line.startswith("DONE "), line
    return json.loads(line.split(" ", 1)[1])["results"]


@pytest.fixture
def photos_dir(tmp_path):
    (tmp_path / "a.jpg").write_bytes(make_photo(1500, 1000, exif=exif_block(orientation=6)))
    (tmp_path / "b.png").write_bytes(make_photo(300, 200, format="PNG"))
    (tmp_path / "corrupt.jpg").write_bytes(make_photo(800, 600)[:2000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a photo\n")
    return tmp_path


PARAMS = {"store": "file:///srv/photos", "catalog": "sqlite:///srv/photos/catalog.db"}


def test_photos_job_stores_outputs_then_the_document_and_upserts_the_row(photos_dir):
    """Renditions go to the store, then the photo's meta.json, then its catalog row; the result is the document."""
    opened = Opened()
    w = harness(opened)
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "a.jpg"), "tags": ["beach"]}], params=PARAMS))
    (result,) = results(w.sent())
    document = result["out"]
    store = opened.stores["file:///srv/photos"]
    sha = document["sha256"]
    assert [(o["width"], o["height"]) for o in document["outputs"]] == [(320, 480), (640, 960)]  # upright: 1000x1500
    assert [o["key"] for o in document["outputs"]] == [rendition_key(sha, 320, "jpg"), rendition_key(sha, 640, "jpg")]
    assert document["outputs"][0]["url"] == f"file:///srv/photos/photos/{sha[:2]}/{sha}/320.jpg"
    assert store.writes == [o["key"] for o in document["outputs"]] + [meta_key(sha)]
    assert json.loads(store.objects[meta_key(sha)][0]) == document
    assert store.objects[meta_key(sha)][1] == "application/json"
    assert store.objects[rendition_key(sha, 320, "jpg")][1] == "image/jpeg"
    assert (document["tags"], document["source"], document["make"]) == (["beach"], str(photos_dir / "a.jpg"), "Canon")
    assert opened.catalogs["sqlite:///srv/photos/catalog.db"].get(sha) == document


def test_photos_job_bad_records_are_errors_and_the_job_goes_on(photos_dir):
    """Missing, empty, corrupt and non-image files and malformed records get error results; good photos are stored."""
    opened = Opened()
    w = harness(opened)
    records = [
        {"path": str(photos_dir / "missing.jpg")},
        {"path": str(photos_dir / "empty.jpg")},
        {"path": str(photos_dir / "corrupt.jpg")},
        {"path": str(photos_dir / "notes.txt")},
        {"path": str(photos_dir)},
        {"path": str(photos_dir / "b.png"), "tags": "x"},
        {"path": "x.jpg", "size": 3},
        "a.jpg",
        {"key": "/not/s3"},
        {"path": str(photos_dir / "b.png")},
    ]
    w.receive(job_line(type="photos", records=records, params=PARAMS))
    got = results(w.sent())
    errors = [r.get("error") for r in got]
    assert errors[0] == f"missing file: {photos_dir / 'missing.jpg'}"
    assert errors[1] == "empty file (zero bytes)"
    assert errors[2].startswith("truncated image")
    assert errors[3].startswith("not an image")
    assert errors[4] == f"not a file: {photos_dir} is a directory"
    assert errors[5].startswith("tags must be a list of strings")
    assert errors[6].startswith("unknown record fields size")
    assert errors[7].startswith("a photos record is")
    assert errors[8] == "bad key '/not/s3': expected s3://bucket/key"
    assert errors[9] is None and got[9]["out"]["outputs"][0]["width"] == 300
    assert list(opened.catalogs["sqlite:///srv/photos/catalog.db"].photos) == [got[9]["out"]["sha256"]]


def test_photos_job_run_again_writes_the_same_keys_and_one_row(photos_dir):
    """A re-dispatched job puts the same objects under the same keys and upserts the same single row."""
    opened = Opened()
    w = harness(opened)
    record = {"path": str(photos_dir / "a.jpg"), "tags": ["t"]}
    w.receive(job_line(type="photos", records=[record], params=PARAMS))
    first = results(w.sent())[0]["out"]
    store = opened.stores["file:///srv/photos"]
    keys = sorted(store.objects)
    w.receive(job_line(job=2, lease="L2", type="photos", records=[record], params=PARAMS, attempt=2))
    second = [line for line in w.sent() if line.startswith("DONE")]
    assert json.loads(second[0].split(" ", 1)[1])["results"][0]["out"] == first
    assert sorted(store.objects) == keys
    catalog = opened.catalogs["sqlite:///srv/photos/catalog.db"]
    assert (len(catalog.photos), catalog.upserts) == (1, 2)


def test_photos_job_refused_write_fails_the_attempt_and_records_nothing_half(photos_dir):
    """A store that refuses a rendition fails the attempt (retried); no meta.json, no row for that photo."""
    opened = Opened(refuse=lambda key: key.endswith("/640.jpg"))
    w = harness(opened)
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "a.jpg")}], params=PARAMS))
    (line,) = [line for line in w.sent() if not line.startswith(("BEAT", "PROGRESS "))]
    assert line.startswith('FAIL {"job":1,"lease":"L1","error":"DoubleStoreError: write of photos/')
    assert '"retry":true' in line
    store = opened.stores["file:///srv/photos"]
    assert not any(key.endswith("meta.json") for key in store.objects)
    assert opened.catalogs == {}


def test_photos_job_params_choose_widths_format_and_quality(photos_dir):
    """params.widths, format and quality reach the renditions; bad ones are the record's error."""
    opened = Opened()
    w = harness(opened)
    params = {**PARAMS, "widths": [100, 5000], "format": "webp", "quality": 50}
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "b.png")}], params=params))
    (result,) = results(w.sent())
    assert [(o["width"], o["format"]) for o in result["out"]["outputs"]] == [(100, "WEBP")]
    assert result["out"]["outputs"][0]["key"].endswith("/100.webp")
    w.receive(job_line(job=2, lease="L2", type="photos", records=[{"path": str(photos_dir / "b.png")}],
                       params={**PARAMS, "quality": 101}))  # fmt: skip
    assert results(w.sent())[0]["error"] == "quality must be a whole number from 1 to 100, not 101"


def test_photos_job_bad_store_url_is_the_records_error(photos_dir):
    """A store URL the store cannot open gives each record an error that names it."""
    w = harness(Opened())
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "b.png")}], params={"store": "bogus://x"}))
    assert results(w.sent())[0]["error"] == "bad params.store 'bogus://x': no such store scheme"


def test_photos_job_reads_an_s3_key_through_the_store_with_its_endpoint(photos_dir):
    """A record's s3:// key is read from that bucket, at the endpoint of an s3:// params.store."""
    opened = Opened()
    source = opened.store("s3://uploads?endpoint=http://127.0.0.1:9000")
    source.put("in/b.png", (photos_dir / "b.png").read_bytes(), "image/png")
    w = harness(opened)
    params = {"store": "s3://site/photos?endpoint=http://127.0.0.1:9000", "catalog": "sqlite:///c.db"}
    records = [{"key": "s3://uploads/in/b.png"}, {"key": "s3://uploads/in/gone.png"}]
    w.receive(job_line(type="photos", records=records, params=params))
    got = results(w.sent())
    assert got[0]["out"]["source"] == "s3://uploads/in/b.png"
    assert got[1]["error"] == "missing object: s3://uploads/in/gone.png"
    assert any(k.endswith("meta.json") for k in opened.stores[params["store"]].objects)


def test_photos_default_store_and_catalog(tmp_path, photos_dir, monkeypatch):
    """Without params the store is ./gridd-photos under the worker's directory and the catalog is in it."""
    monkeypatch.chdir(tmp_path)
    # Beside the store, not in it: each copy is the other's backup (and gridctl photos verify finds it).
    assert default_catalog("file://./gridd-photos") == "sqlite://" + str(tmp_path / "gridd-photos.db")
    assert default_catalog("file:///srv/p") == "sqlite:///srv/p.db"
    assert default_catalog("s3://b/p") == "sqlite://" + str(tmp_path / "gridd-photos.db")
    opened = Opened()
    w = harness(opened)
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "b.png")}]))
    assert "out" in results(w.sent())[0]
    assert list(opened.stores) == ["file://./gridd-photos"]
    assert list(opened.catalogs) == ["sqlite://" + os.path.join(str(tmp_path), "gridd-photos", "catalog.db")]


def test_photos_is_an_installed_threaded_job_type():
    """photos is found through the gridd.jobtypes entry point and runs in threads (or handler processes)."""
    photos = load_job_types(["photos"])["photos"]
    assert isinstance(photos, Photos)
    assert (photos.threaded, photos.needs_network, photos.version) == (True, True, "1.0")
