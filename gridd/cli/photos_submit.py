"""``gridctl photos submit``: turn a folder, a glob or an s3:// prefix of photos into ``photos`` jobs.

:func:`add_submit` adds the command to gridctl's ``photos`` subcommands.
Before anything is sent the source is listed and the options checked; a
mistake exits 2 with nothing submitted. The jobs are then submitted as
``gridctl submit`` does (the same report of a submit that fails part way),
``--per-job`` photos each, and with ``--wait`` a progress bar shows photos
done, photos per second and errors, followed by a summary and the first
errors, each with its photo.
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from typing import TextIO
from urllib.parse import urlsplit

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from twisted.internet.defer import Deferred

from gridd import client, errors
from gridd.cli import gridctl
from gridd.peer import ConnectionDropped

__all__ = ["add_submit", "list_source", "build_photo_jobs", "PHOTO_SUFFIXES", "cmd_photos_submit", "wait_and_summarise"]

#: File names taken from a folder or a glob (case-insensitive); a glob naming other files takes them too.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".bmp")

#: Errors listed after the summary; the rest are counted.
SHOWN_ERRORS = 10


def add_submit(subparsers) -> argparse.ArgumentParser:
    """Add ``submit`` to the ``photos`` subcommands (an ``add_subparsers`` result); return its parser."""
    submit = subparsers.add_parser(
        "submit",
        help="submit a folder, a glob or an s3:// prefix of photos as photos jobs",
        description="Each photo becomes one record {path|key, tags} of a photos job; --per-job photos a job.",
    )
    submit.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder (its photos, recursively), a glob ('uploads/*.jpg', quoted), or"
        " s3://bucket/prefix[?endpoint=URL] (every object under it)",
    )
    submit.add_argument(
        "--widths", type=_widths, metavar="W,W,...", help="rendition widths (default 320,640,1280,2048)"
    )
    submit.add_argument("--format", choices=["jpeg", "webp"], help="rendition format (default jpeg)")
    submit.add_argument("--quality", type=_quality, metavar="Q", help="rendition quality 1-100 (default 85)")
    submit.add_argument("--per-job", type=gridctl._positive_int, default=20, metavar="N", help="photos a job (20)")
    submit.add_argument("--tag", dest="photo_tags", action="append", default=[], metavar="TAG",
                        help="a tag for every photo (repeatable)")  # fmt: skip
    submit.add_argument("--store", metavar="URL", help="object store URL (the workers' default: file://./gridd-photos)")
    submit.add_argument("--catalog", metavar="URL", help="catalog URL (default: DIR.db next to a file:// store)")
    submit.add_argument("--priority", type=int, metavar="N", help="higher runs first (default 0)")
    submit.add_argument("--name", dest="job_name", metavar="NAME", help="job name (default: the source)")
    submit.add_argument("--wait", action="store_true", help="show progress until every photo is done, then a summary")
    submit.add_argument("--json", action="store_true", help="print JSON Lines instead of ids")
    submit.set_defaults(run=cmd_photos_submit)
    return submit


def _widths(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        widths = []
    if not widths or any(not 1 <= w <= 50_000 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of widths (1-50000 pixels)")
    return widths


_quality = gridctl._number(int, lambda v: 1 <= v <= 100, "a quality from 1 to 100")


# -- the source, listed before anything is sent -----------------------------------------


def list_source(source: str, open_store=None) -> list[dict]:
    """The photos of a source as records without tags: ``{"path": ABS}`` or ``{"key": "s3://bucket/key"}``.

    Raises ``gridctl.InputError`` when the source names nothing.
    """
    if source.startswith("s3://"):
        return _list_bucket(source, open_store)
    if os.path.isdir(source):
        paths = [
            os.path.join(folder, name)
            for folder, _, names in os.walk(source)
            for name in names
            if name.lower().endswith(PHOTO_SUFFIXES)
        ]
    elif glob.has_magic(source):
        paths = [path for path in glob.glob(source, recursive=True) if os.path.isfile(path)]
    elif os.path.isfile(source):
        paths = [source]
    else:
        raise gridctl.InputError(f"{source}: no such folder or file, and not a glob or an s3:// prefix")
    if not paths:
        raise gridctl.InputError(f"{source}: no photos ({', '.join(PHOTO_SUFFIXES)})")
    return [{"path": os.path.abspath(path)} for path in sorted(paths)]


def _list_bucket(source: str, open_store) -> list[dict]:
    parts = urlsplit(source)
    if not parts.netloc:
        raise gridctl.InputError(f"{source}: expected s3://bucket/prefix")
    if open_store is None:
        from gridd.photos.storage import open_store
    bucket = f"s3://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    prefix = parts.path.lstrip("/")
    try:
        keys = sorted(open_store(bucket).list(prefix))
    except Exception as e:
        raise gridctl.InputError(f"cannot list {source}: {e}") from None
    if not keys:
        raise gridctl.InputError(f"{source}: no objects")
    return [{"key": f"s3://{parts.netloc}/{key}"} for key in keys]


def build_photo_jobs(args: argparse.Namespace, records: list[dict]) -> list[dict]:
    """JOBSPECs of ``--per-job`` records each, with the tags and the photos params."""
    params = {
        key: value
        for key, value in [
            ("widths", args.widths),
            ("format", args.format and args.format.upper()),
            ("quality", args.quality),
            ("store", args.store),
            ("catalog", args.catalog),
        ]
        if value is not None
    }
    spec: dict = {"type": "photos", "params": params}
    if args.priority is not None:
        spec["priority"] = args.priority
    tagged = [dict(record, tags=list(args.photo_tags)) for record in records]
    parts = [tagged[start : start + args.per_job] for start in range(0, len(tagged), args.per_job)]
    name = args.job_name or args.source
    return [
        dict(spec, records=part, name=name if len(parts) == 1 else f"{name} [{number}/{len(parts)}]")
        for number, part in enumerate(parts, 1)
    ]


# -- the command ------------------------------------------------------------------------


async def cmd_photos_submit(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    try:
        records = list_source(args.source)
    except gridctl.InputError as e:
        print(f"gridctl: error: {e}", file=err)
        return gridctl.EXIT_USAGE
    args.jobs = build_photo_jobs(args, records)
    try:
        ids = await grid.submit(args.jobs)
    except (errors.GriddError, ConnectionDropped) as e:
        if not hasattr(e, "not_sent"):
            raise
        return gridctl._submit_failed(e, args, out, err)
    gridctl._print_submitted(ids, args, out)
    print(f"gridctl: {len(records)} photos in {len(ids)} jobs", file=err)
    if not args.wait:
        return gridctl.EXIT_OK
    out.flush()
    return await wait_and_summarise(grid, dict(zip(ids, args.jobs, strict=True)), err)


async def wait_and_summarise(grid: client.Client, jobs: dict[int, dict], err: TextIO) -> int:
    """Follow the jobs with a bar (photos, photos/s, errors), then print the summary and the first errors."""
    total = sum(len(spec["records"]) for spec in jobs.values())
    accepted: dict[int, int] = {}
    failed: dict[int, int] = {}
    started = time.monotonic()
    progress = Progress(
        TextColumn("photos"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.1f} photos/s  {task.fields[errors]} errors"),
        TimeElapsedColumn(),
        console=gridctl._console(err),
        redirect_stdout=False,
        redirect_stderr=False,
    )
    bar = progress.add_task("photos", total=total, rate=0.0, errors=0)
    pending = []

    def count_errors(job: int) -> None:
        async def look():
            failed[job] = (await grid.show(job)).get("failed_records") or 0
            progress.update(bar, errors=sum(failed.values()))

        pending.append(Deferred.fromCoroutine(look()))

    def on_event(status):
        job = status["job"]
        accepted[job] = status.get("accepted", accepted.get(job, 0))
        done = sum(accepted.values())
        elapsed = max(time.monotonic() - started, 1e-9)
        progress.update(bar, completed=done, rate=done / elapsed)
        if status["state"] in client.TERMINAL_STATES and job not in failed:
            failed[job] = 0
            count_errors(job)

    with progress:
        final = await grid.wait(list(jobs), on_event)
        for d in pending:
            await d
    elapsed = time.monotonic() - started
    done = sum(status.get("accepted", 0) for status in final.values())
    error_count = sum(failed.values())
    print(
        f"{done}/{total} photos in {elapsed:.1f} s ({done / max(elapsed, 1e-9):.1f} photos/s):"
        f" {done - error_count} stored, {error_count} error{'' if error_count == 1 else 's'}",
        file=err,
    )
    shown = 0
    for job, spec in jobs.items():
        if not failed.get(job) or shown >= SHOWN_ERRORS:
            continue
        page = await grid.results_page(job)
        while True:
            for result in page["results"]:
                if "error" in result and shown < SHOWN_ERRORS:
                    record = spec["records"][result["i"]]
                    print(f"  {record.get('path') or record.get('key')}: {result['error']}", file=err)
                    shown += 1
            if page.get("next") is None or shown >= SHOWN_ERRORS:
                break
            page = await grid.results_page(job, page["next"])
    if error_count > shown:
        print(f"  ... and {error_count - shown} more (gridctl results JOB)", file=err)
    unfinished = [status for status in final.values() if status["state"] != "done"]
    for status in unfinished:
        print(f"gridctl: job {status['job']} {status['state']}", file=err)
    return gridctl.EXIT_SERVER_ERROR if unfinished else gridctl.EXIT_OK
