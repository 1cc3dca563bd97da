"""gridctl photos submit (gridd.cli.photos_submit): listing the source, the jobs it builds, --wait's summary.

The command runs the real client against tests/test_gridctl.py's fake server
(iosim pairs, no reactor), parsed by gridctl's own parser.
"""

from __future__ import annotations

import argparse
import io

import pytest
from twisted.internet import defer

from gridd.cli import gridctl
from gridd.cli.photos_submit import list_source
from tests.test_gridctl import Grid, Outcome, submitted_ids


def photos_parser() -> argparse.ArgumentParser:
    return gridctl.build_parser()


class PhotosOutcome(Outcome):
    def __init__(self, grid, argv, tmp_path):
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        self.args = photos_parser().parse_args(["--secret-file", str(secret), "photos", "submit", *argv])
        gridctl.prepare(self.args, io.BytesIO())
        self.out, self.err = io.StringIO(), io.StringIO()
        self.grid = grid
        self.done = defer.ensureDeferred(gridctl.run(None, self.args, connect=grid.connect, out=self.out, err=self.err))
        grid.flush()


@pytest.fixture
def uploads(tmp_path):
    folder = tmp_path / "uploads"
    (folder / "2024").mkdir(parents=True)
    for name in ("a.jpg", "b.JPEG", "2024/c.png", "notes.txt", "2024/d.webp"):
        (folder / name).write_bytes(b"x")
    return folder


def test_list_source_folder_takes_its_photos_recursively(uploads):
    """A folder gives its photo files, in every subfolder, as absolute paths; other files are left out."""
    records = list_source(str(uploads))
    assert records == [{"path": str(uploads / name)} for name in ("2024/c.png", "2024/d.webp", "a.jpg", "b.JPEG")]


def test_list_source_glob_and_single_file(uploads):
    """A glob gives the files it matches; a file gives itself."""
    assert list_source(str(uploads / "*.jpg")) == [{"path": str(uploads / "a.jpg")}]
    assert list_source(str(uploads / "a.jpg")) == [{"path": str(uploads / "a.jpg")}]


def test_list_source_s3_prefix_lists_the_bucket_through_the_store():
    """s3://bucket/prefix?endpoint=URL lists the bucket's keys under the prefix, at that endpoint."""
    opened = []

    class Bucket:
        def list(self, prefix=""):
            return iter(k for k in ("in/b.jpg", "in/a.jpg", "other/c.jpg") if k.startswith(prefix))

    def open_store(url):
        opened.append(url)
        return Bucket()

    records = list_source("s3://site/in/?endpoint=http://127.0.0.1:9000", open_store)
    assert records == [{"key": "s3://site/in/a.jpg"}, {"key": "s3://site/in/b.jpg"}]
    assert opened == ["s3://site?endpoint=http://127.0.0.1:9000"]


@pytest.mark.parametrize("source", ["missing-folder", "*.nothing-matches", "s3://"])
def test_list_source_that_names_nothing_is_an_input_error(tmp_path, monkeypatch, source):
    """A source with no photos raises InputError naming it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gridctl.InputError, match="no such folder|no photos|expected s3://bucket/prefix"):
        list_source(source)


def test_submit_builds_photos_jobs_of_per_job_photos_with_tags_and_params(tmp_path, uploads):
    """Jobs of --per-job records {path, tags} of type photos, carrying widths, format, quality, store and catalog."""
    grid = Grid(SUBMIT=submitted_ids)
    argv = [str(uploads), "--per-job", "3", "--tag", "beach", "--tag", "2024", "--widths", "320,640", "--format",
            "webp", "--quality", "70", "--store", "file:///srv/p", "--catalog", "sqlite:///srv/p/c.db"]  # fmt: skip
    outcome = PhotosOutcome(grid, argv, tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == ["1", "2"]
    (submit,) = grid.server.requests("SUBMIT")
    jobs = submit["jobs"]
    assert [len(job["records"]) for job in jobs] == [3, 1]
    assert jobs[0]["type"] == "photos"
    assert jobs[0]["records"][0] == {"path": str(uploads / "2024/c.png"), "tags": ["beach", "2024"]}
    assert jobs[0]["params"] == {
        "widths": [320, 640],
        "format": "WEBP",
        "quality": 70,
        "store": "file:///srv/p",
        "catalog": "sqlite:///srv/p/c.db",
    }
    assert jobs[1]["name"] == f"{uploads} [2/2]"
    assert "4 photos in 2 jobs" in outcome.err.getvalue()


def test_submit_of_an_empty_source_exits_2_and_submits_nothing(tmp_path):
    """A folder without photos exits 2 with nothing sent."""
    (tmp_path / "empty").mkdir()
    grid = Grid(SUBMIT=submitted_ids)
    outcome = PhotosOutcome(grid, [str(tmp_path / "empty")], tmp_path)
    assert outcome.code == 2
    assert grid.server.requests("SUBMIT") == []
    assert "no photos" in outcome.err.getvalue()


@pytest.mark.parametrize("argv", [["--widths", "0,320"], ["--widths", "big"], ["--quality", "101"], ["--per-job", "0"]])
def test_submit_bad_options_exit_2(tmp_path, argv, capsys):
    """Bad widths, quality or --per-job are usage errors."""
    with pytest.raises(SystemExit) as exited:
        photos_parser().parse_args(["photos", "submit", str(tmp_path), *argv])
    assert exited.value.code == 2


def test_submit_wait_counts_photos_and_errors_and_lists_the_errors(tmp_path, uploads):
    """--wait shows photos done and errors, then a summary with each failed photo's error."""

    def results(body):
        if body["job"] == 1:
            return {"results": [{"i": 0, "out": {}}, {"i": 1, "error": "truncated image: image file is truncated"},
                                {"i": 2, "out": {}}], "next": None}  # fmt: skip
        return {"results": [{"i": 0, "out": {}}], "next": None}

    grid = Grid(
        SUBMIT=submitted_ids,
        WATCH=lambda body: {"jobs": [{"job": j, "state": "queued", "accepted": 0, "total": 3} for j in body["jobs"]]},
        SHOW=lambda body: {"job": {"id": body["job"], "failed_records": 1 if body["job"] == 1 else 0}},
        RESULTS=results,
    )
    outcome = PhotosOutcome(grid, [str(uploads), "--per-job", "3", "--wait"], tmp_path)
    grid.server.push("EVENT", {"job": 1, "state": "done", "accepted": 3, "total": 3})
    grid.flush()
    assert not outcome.done.called
    grid.server.push("EVENT", {"job": 2, "state": "done", "accepted": 1, "total": 1})
    grid.flush()
    assert outcome.code == 0
    text = outcome.err.getvalue()
    assert "4/4 photos in" in text and "3 stored, 1 error" in text
    assert f"  {uploads / '2024/d.webp'}: truncated image: image file is truncated" in text
    assert "photos/s" in text
