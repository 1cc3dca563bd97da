"""The photos job type (gridd.photos.jobtype), run through a worker core as tests/test_worker.py does.

The store and the catalog are the real ones: a local directory (or moto's
S3 server) and a SQLite file. ``Written`` wraps each store opened to note
the order of its writes, and records the store's retry pauses instead of
waiting them.
"""

from __future__ import annotations

import json
import os

import pytest

from gridd.jobtypes import load_job_types
from gridd.photos.catalog import open_catalog
from gridd.photos.jobtype import Photos, default_catalog
from gridd.photos.storage import meta_key, open_store, rendition_key
from tests.photos import exif_block, make_photo
from tests.test_worker import Harness, job_line


class Written:
    """The real stores and catalogs a Photos instance opens, by URL, with the order of each store's writes."""

    def __init__(self):
        self.stores: dict[str, object] = {}
        self.writes: dict[str, list[str]] = {}
        self.pauses: list[float] = []

    def store(self, url):
        store = open_store(url, sleep=self.pauses.append)
        writes = self.writes.setdefault(url, [])
        put = store.put

        def noting(key, data, content_type):
            url_of = put(key, data, content_type)
            writes.append(key)
            return url_of

        store.put = noting
        self.stores[url] = store
        return store

    def catalog(self, url):
        return open_catalog(url)


def harness(written: Written) -> Harness:
    return Harness(types={"photos": Photos(open_store=written.store, open_catalog=written.catalog)}).welcome()


def results(lines: list[str]) -> list[dict]:
    """The results of the one DONE sent (progress notes aside)."""
    (line,) = [line for line in lines if not line.startswith(("BEAT", "PROGRESS "))]
    assert line.startswith("DONE "), line
    return json.loads(line.split(" ", 1)[1])["results"]


def all_results(w: Harness) -> list[dict]:
    """Every result sent until DONE, each RESULT acknowledged (records slow enough to go out apart)."""
    got = []
    for _ in range(100):
        for line in [line for line in w.sent() if not line.startswith(("BEAT", "PROGRESS "))]:
            verb, body = line.split(" ", 1)
            body = json.loads(body)
            got += body.get("results") or []
            if verb == "DONE":
                return got
            assert verb == "RESULT", line
            w.receive(f'OK {{"rid":{body["rid"]},"accepted":{len(body["results"])}}}')
        w.clock.advance(0)
    raise AssertionError(f"no DONE: {got}")


@pytest.fixture
def photos_dir(tmp_path):
    (tmp_path / "a.jpg").write_bytes(make_photo(1500, 1000, exif=exif_block(orientation=6)))
    (tmp_path / "b.png").write_bytes(make_photo(300, 200, format="PNG"))
    (tmp_path / "corrupt.jpg").write_bytes(make_photo(800, 600)[:2000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a photo\n")
    return tmp_path


@pytest.fixture
def site(tmp_path):
    """Where the photos go: a local store and the catalog beside it."""
    return {"store": f"file://{tmp_path}/site", "catalog": f"sqlite://{tmp_path}/site.db"}


def rows(site) -> dict[str, dict]:
    catalog = open_catalog(site["catalog"])
    try:
        return {row["sha256"]: row for row in catalog.rows()}
    finally:
        catalog.close()


def test_photos_job_stores_outputs_then_the_document_and_upserts_the_row(photos_dir, site, tmp_path):
    """Renditions go to the store, then the photo's meta.json, then its catalog row; the result is the document."""
    written = Written()
    w = harness(written)
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "a.jpg"), "tags": ["beach"]}], params=site))
    (result,) = results(w.sent())
    document = result["out"]
    sha = document["sha256"]
    assert [(o["width"], o["height"]) for o in document["outputs"]] == [(320, 480), (640, 960)]  # upright: 1000x1500
    assert [o["key"] for o in document["outputs"]] == [rendition_key(sha, 320, "JPEG"), rendition_key(sha, 640, "JPEG")]
    on_disk = tmp_path / "site" / "photos" / sha[:2] / sha
    assert document["outputs"][0]["url"] == (on_disk / "320.jpg").as_uri()
    assert written.writes[site["store"]] == [o["key"] for o in document["outputs"]] + [meta_key(sha)]
    assert json.loads((on_disk / "meta.json").read_bytes()) == document
    assert (on_disk / "320.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG
    assert (document["tags"], document["source"], document["make"]) == (["beach"], str(photos_dir / "a.jpg"), "Canon")
    assert rows(site)[sha]["document"] == document


def test_photos_job_bad_records_are_errors_and_the_job_goes_on(photos_dir, site):
    """Missing, empty, corrupt and non-image files and malformed records get error results; good photos are stored."""
    w = harness(Written())
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
    w.receive(job_line(type="photos", records=records, params=site))
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
    assert list(rows(site)) == [got[9]["out"]["sha256"]]


def test_photos_job_run_again_writes_the_same_keys_and_one_row(photos_dir, site):
    """A re-dispatched job puts the same objects under the same keys and upserts the same single row."""
    written = Written()
    w = harness(written)
    record = {"path": str(photos_dir / "a.jpg"), "tags": ["t"]}
    w.receive(job_line(type="photos", records=[record], params=site))
    first = results(w.sent())[0]["out"]
    keys = sorted(written.stores[site["store"]].list())
    w.receive(job_line(job=2, lease="L2", type="photos", records=[record], params=site, attempt=2))
    second = [line for line in w.sent() if line.startswith("DONE")]
    assert json.loads(second[0].split(" ", 1)[1])["results"][0]["out"] == first
    assert sorted(written.stores[site["store"]].list()) == keys, "no second copy, no orphan"
    assert len(written.writes[site["store"]]) == 2 * len(keys), "written twice, under the same keys"
    assert list(rows(site)) == [first["sha256"]]


def test_photos_job_refused_write_fails_the_attempt_and_records_nothing_half(photos_dir, site, tmp_path):
    """A store that keeps refusing a rendition fails the attempt after its retries; no meta.json, no row."""
    import hashlib

    sha = hashlib.sha256((photos_dir / "a.jpg").read_bytes()).hexdigest()
    (tmp_path / "site" / rendition_key(sha, 640, "JPEG")).mkdir(parents=True)  # a directory where 640.jpg must go
    written = Written()
    w = harness(written)
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "a.jpg")}], params=site))
    (line,) = [line for line in w.sent() if not line.startswith(("BEAT", "PROGRESS "))]
    assert line.startswith('FAIL {"job":1,"lease":"L1","error":"StorageError: ')
    assert '"retry":true' in line
    assert written.pauses, "the store retried before giving up"
    assert not (tmp_path / "site" / meta_key(sha)).exists()
    assert rows(site) == {}


def test_photos_job_params_choose_widths_format_and_quality(photos_dir, site):
    """params.widths, format and quality reach the renditions; bad ones are the record's error."""
    w = harness(Written())
    params = {**site, "widths": [100, 5000], "format": "webp", "quality": 50}
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "b.png")}], params=params))
    (result,) = results(w.sent())
    assert [(o["width"], o["format"]) for o in result["out"]["outputs"]] == [(100, "WEBP")]
    assert result["out"]["outputs"][0]["key"].endswith("/100.webp")
    w.receive(job_line(job=2, lease="L2", type="photos", records=[{"path": str(photos_dir / "b.png")}],
                       params={**site, "quality": 101}))  # fmt: skip
    assert results(w.sent())[0]["error"] == "quality must be a whole number from 1 to 100, not 101"


def test_photos_job_bad_store_url_is_the_records_error(photos_dir):
    """A store URL the store cannot open gives each record an error that names it."""
    w = harness(Written())
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "b.png")}], params={"store": "bogus://x"}))
    assert results(w.sent())[0]["error"].startswith("bad params.store 'bogus://x': ")


def test_photos_job_reads_an_s3_key_through_the_store_with_its_endpoint(photos_dir, moto_s3, tmp_path):
    """A record's s3:// key is read from that bucket (a real S3 server), at the endpoint of an s3:// params.store."""
    uploads, site_bucket = moto_s3.bucket(), moto_s3.bucket()
    moto_s3.client().put_object(Bucket=uploads, Key="in/b.png", Body=(photos_dir / "b.png").read_bytes())
    w = harness(Written())
    params = {"store": f"s3://{site_bucket}/photos?endpoint={moto_s3.endpoint}", "catalog": f"sqlite://{tmp_path}/c.db"}
    records = [{"key": f"s3://{uploads}/in/b.png"}, {"key": f"s3://{uploads}/in/gone.png"}]
    w.receive(job_line(type="photos", records=records, params=params))
    got = all_results(w)
    assert got[0]["out"]["source"] == f"s3://{uploads}/in/b.png"
    assert got[1]["error"] == f"missing object: s3://{uploads}/in/gone.png"
    listed = moto_s3.client().list_objects_v2(Bucket=site_bucket)["Contents"]
    assert any(item["Key"].endswith("meta.json") for item in listed)


def test_photos_default_store_and_catalog(tmp_path, photos_dir, monkeypatch):
    """Without params the store is ./gridd-photos under the worker's directory and the catalog beside it."""
    monkeypatch.chdir(tmp_path)
    # Beside the store, not in it: each copy is the other's backup (and gridctl photos verify finds it).
    assert default_catalog("file://./gridd-photos") == "sqlite://" + str(tmp_path / "gridd-photos.db")
    assert default_catalog("file:///srv/p") == "sqlite:///srv/p.db"
    assert default_catalog("s3://b/p") == "sqlite://" + str(tmp_path / "gridd-photos.db")
    written = Written()
    w = harness(written)
    w.receive(job_line(type="photos", records=[{"path": str(photos_dir / "b.png")}]))
    (result,) = results(w.sent())
    assert list(written.stores) == ["file://./gridd-photos"]
    assert (tmp_path / "gridd-photos" / meta_key(result["out"]["sha256"])).exists()
    assert list(rows({"catalog": "sqlite://" + os.path.join(str(tmp_path), "gridd-photos.db")})) == [
        result["out"]["sha256"]
    ]


def test_photos_is_an_installed_threaded_job_type():
    """photos is found through the gridd.jobtypes entry point and runs in threads (or handler processes)."""
    photos = load_job_types(["photos"])["photos"]
    assert isinstance(photos, Photos)
    assert (photos.threaded, photos.needs_network, photos.version) == (True, True, "1.0")
