"""gridctl photos rebuild-db and verify: the real console script on a local store, and each outcome in-process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gridd.cli import gridctl
from gridd.photos.catalog import open_catalog
from gridd.photos.storage import LocalStore, S3Store, meta_key
from tests.test_photos_catalog import document, sha, write_photo

GRIDCTL = str(Path(sys.executable).with_name("gridctl"))


def run(*argv: str) -> tuple[int, str, str]:
    """Run ``gridctl ARGV`` in-process, as main would; (status, stdout, stderr)."""
    args = gridctl.build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    return args.offline(args, out, err), out.getvalue(), err.getvalue()


def test_gridctl_photos_rebuild_db_then_verify_with_the_console_script(tmp_path):
    """The real gridctl rebuilds a lost catalog next to a local store, then verify says the copies agree."""
    store = LocalStore(tmp_path / "photos")
    for n in range(3):
        write_photo(store, document(n))
    url = (tmp_path / "photos").as_uri()
    env = dict(os.environ, COLUMNS="200")
    done = subprocess.run([GRIDCTL, "photos", "verify", url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stdout.count("no row in the catalog") == 3
    done = subprocess.run([GRIDCTL, "photos", "rebuild-db", url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"rebuilt 3 photo row(s) in sqlite:{tmp_path}/photos.db" in done.stdout
    done = subprocess.run([GRIDCTL, "photos", "verify", url], capture_output=True, text=True, env=env, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert "3 photo(s) checked" in done.stdout and "the copies agree" in done.stdout


@pytest.mark.s3
def test_gridctl_photos_verify_json_on_s3_reports_differences(moto_s3, tmp_path):
    """verify --json on an S3 store: one JSON object naming the missing and the differing rows; status 1."""
    store = S3Store(moto_s3.bucket(), "site", endpoint_url=moto_s3.endpoint)
    for n in range(3):
        write_photo(store, document(n))
    catalog_url = f"sqlite://{tmp_path}/c.db"
    catalog = open_catalog(catalog_url)
    catalog.upsert(document(0))
    catalog.upsert(document(1, iso=6400))
    catalog.close()
    url = f"s3://{store.bucket}/site?endpoint={moto_s3.endpoint}"
    status, out, err = run("photos", "verify", url, "--catalog", catalog_url, "--json")
    assert (status, err) == (1, "")
    report = json.loads(out)
    assert (report["ok"], report["checked"]) == (False, 3)
    assert report["missing_rows"] == [sha(2)]
    assert report["differing"] == [sha(1)]
    status, out, err = run("photos", "rebuild-db", url, "--catalog", catalog_url)
    assert status == 0 and "rebuilt 3 photo row(s)" in out
    assert run("photos", "verify", url, "--catalog", catalog_url)[0] == 0


def test_gridctl_photos_rebuild_db_reports_a_bad_document(tmp_path):
    """A meta.json that is not JSON is skipped with its URL on stderr; status 1, the others rebuilt."""
    store = LocalStore(tmp_path / "photos")
    write_photo(store, document(1))
    store.put(meta_key(sha(2)), b"{oops", "application/json")
    status, out, err = run("photos", "rebuild-db", (tmp_path / "photos").as_uri())
    assert status == 1
    assert "rebuilt 1 photo row(s)" in out and "1 bad document(s) skipped" in out
    assert f"skipped {store.url(meta_key(sha(2)))}: not JSON" in err


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["photos", "verify", "/no/scheme"], 2, "gridctl: error: not a store URL"),
        (["photos", "verify", "file:///tmp/x", "--catalog", "nosql://x"], 2, "unknown catalog scheme"),
        (
            ["photos", "rebuild-db", "file:///tmp/x", "--catalog", "sqlite:///FILE/c.db"],
            3,
            "cannot open the photo catalog",
        ),
    ],
)
def test_gridctl_photos_bad_urls_and_unreachable_catalogs(argv, status, message, tmp_path):
    """A URL that names nothing exits 2; a catalog that cannot be opened exits 3; each with one line."""
    (tmp_path / "file").write_bytes(b"not a directory")
    argv = [a.replace("/FILE", str(tmp_path / "file")) for a in argv]
    got, out, err = run(*argv)
    assert got == status
    assert message in err and len(err.splitlines()) == 1
