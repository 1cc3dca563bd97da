"""gridd's main job, end to end, on one machine: ``python -m gridd.demo``.

A photo site's uploads: it makes sample photos on the fly (varied sizes and
orientations, with a camera's EXIF, the time taken and a GPS position, and
one upload cut short), starts a real ``twistd gridd`` on loopback with the
embedded SQLite store and three ``twistd gridworker`` processes, and submits
them as ``photos`` jobs: each photo is resized to three widths and its
metadata extracted, the renditions and a metadata document go to a local
object store and a row to a SQLite catalog. A progress bar follows the grid;
a summary says what ran where and why the broken upload was refused; an
HTML gallery of the results is left to open. It stops everything it started.

``--textstats`` runs the earlier demo instead: word statistics for every
module of the Python standard library, ten files per job.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from twisted.internet import defer, task

from gridd.client import connect
from gridd.launch import LocalGrid

#: The widths each demo photo is resized to.
DEMO_WIDTHS = [320, 640, 1280]

console = Console(stderr=True)


def corpus(limit: int) -> list[dict]:
    """The batch: one record per standard-library module, with its text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for path in sorted(stdlib.glob("*.py"))[:limit]:
        records.append({"id": path.name, "text": path.read_text(encoding="utf-8", errors="replace")})
    return records


async def run_photos(reactor, args):
    from gridd.cli.photos_submit import wait_and_summarise
    from gridd.photos.gallery import write_gallery
    from gridd.photos.samples import make_samples

    out = Path(args.out).resolve()
    for old in ("uploads", "site"):  # a fresh run each time; nothing else in the directory is touched
        shutil.rmtree(out / old, ignore_errors=True)
    (out / "site.db").unlink(missing_ok=True)
    samples = make_samples(out / "uploads", args.photos)
    params = {"store": (out / "site").as_uri(), "catalog": f"sqlite://{out / 'site.db'}", "widths": DEMO_WIDTHS}
    records = [{"path": str(s.path), "tags": [s.place.lower()] if s.place else ["upload"]} for s in samples]
    specs = [
        {"type": "photos", "name": f"uploads-{i // args.per_job:02d}", "records": records[i : i + args.per_job],
         "params": params}
        for i in range(0, len(records), args.per_job)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gridd-demo-") as tmp:
        grid = LocalGrid(reactor, Path(tmp), beat=1.0)
        try:
            console.print(
                f"[bold]gridd demo[/]: {len(samples)} uploaded photos, a server and {args.workers} workers "
                f"on 127.0.0.1:{grid.port}"
            )
            await grid.start_server()
            for n in range(1, args.workers + 1):
                await grid.start_worker(f"worker-{n}", args.slots)
            client = await connect(reactor, grid.endpoint, grid.secret, name="demo")
            ids = await client.submit(specs)
            await wait_and_summarise(client, dict(zip(ids, specs, strict=True)), sys.stderr)
            documents, errors = await photo_summary(client, ids, specs)
            await client.close()
        finally:
            await grid.stop_all()
    page = write_gallery(out / "index.html", documents, errors, title="gridd demo: the uploads, processed")
    Console().print(
        f"renditions and metadata documents in {out / 'site'}, rows in {out / 'site.db'}\n"
        f"the gallery: [bold]{page.as_uri()}[/]"
    )


async def photo_summary(client, ids, specs):
    """Print what ran where; return the metadata documents and the (source, error) of the records refused."""
    per_worker: Counter = Counter()
    jobs_per_worker: dict[str, set] = {}
    documents, errors = [], []
    for job_id, spec in zip(ids, specs, strict=True):
        for result in await client.results(job_id):
            worker = result.get("worker", "?")
            per_worker[worker] += 1
            jobs_per_worker.setdefault(worker, set()).add(job_id)
            if "error" in result:
                errors.append((spec["records"][result["i"]]["path"], result["error"]))
            else:
                documents.append(result["out"])
    table = Table(title="What ran where")
    for column in ("worker", "jobs", "photos"):
        table.add_column(column, justify="left" if column == "worker" else "right")
    for worker in sorted(per_worker):
        table.add_row(worker, str(len(jobs_per_worker[worker])), str(per_worker[worker]))
    out = Console()
    out.print(table)
    renditions = sum(len(d.get("outputs") or ()) for d in documents)
    out.print(f"{len(documents)} photos stored as {renditions} renditions and {len(documents)} metadata documents")
    for source, error in errors:
        out.print(f"refused: {Path(source).name}: {error}")
    return documents, errors


async def run(reactor, args):
    records = corpus(args.files)
    jobs = [
        {"type": "textstats", "records": records[i : i + args.per_job], "name": f"stdlib-{i // args.per_job:03d}"}
        for i in range(0, len(records), args.per_job)
    ]
    with tempfile.TemporaryDirectory(prefix="gridd-demo-") as tmp:
        grid = LocalGrid(reactor, Path(tmp), beat=1.0)
        try:
            console.print(f"[bold]gridd demo[/]: server and {args.workers} workers on 127.0.0.1:{grid.port}")
            await grid.start_server()
            for n in range(1, args.workers + 1):
                await grid.start_worker(f"worker-{n}", args.slots)
            client = await connect(reactor, grid.endpoint, grid.secret, name="demo")
            started = time.monotonic()
            ids = await client.submit(jobs)
            await watch_with_progress(client, ids, sum(len(j["records"]) for j in jobs))
            elapsed = time.monotonic() - started
            await summarise(client, ids, elapsed)
            await client.close()
        finally:
            await grid.stop_all()
            console.print(f"stopped the server and the workers; logs were in {tmp} (now removed)")


async def watch_with_progress(client, ids, total_records):
    accepted: dict[int, int] = {}
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("records processed", total=total_records)

        def on_event(status):
            accepted[status["job"]] = status.get("accepted", 0)
            progress.update(bar, completed=sum(accepted.values()))

        await client.wait(ids, on_event)


async def summarise(client, ids, elapsed):
    per_worker: Counter = Counter()
    jobs_per_worker: dict[str, set] = {}
    words: Counter = Counter()
    biggest = []
    states = Counter()
    expected = accepted = 0
    for job_id in ids:
        job = await client.show(job_id)
        states[job["state"]] += 1
        expected += job["total"]
        accepted += job["accepted"]
        for result in await client.results(job_id):
            worker = result.get("worker", "?")
            per_worker[worker] += 1
            jobs_per_worker.setdefault(worker, set()).add(job_id)
            out = result.get("out") or {}
            for word, count in out.get("top", []):
                words[word] += count
            biggest.append((out.get("words", 0), out.get("id", "?")))
    table = Table(title="What ran where")
    table.add_column("worker")
    table.add_column("jobs", justify="right")
    table.add_column("records", justify="right")
    for worker in sorted(per_worker):
        table.add_row(worker, str(len(jobs_per_worker[worker])), str(per_worker[worker]))
    out = Console()
    out.print(table)
    records = sum(per_worker.values())
    out.print(
        f"{len(ids)} jobs ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))}), "
        f"{records} records in {elapsed:.1f} s ({records / elapsed:.0f} records/s)"
    )
    out.print(f"records with exactly one accepted result: {accepted} of {expected}")
    out.print("most common words in the standard library: " + ", ".join(w for w, _ in words.most_common(8)))
    out.print("longest modules: " + ", ".join(f"{name} ({n} words)" for n, name in sorted(biggest)[-3:][::-1]))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m gridd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--slots", type=int, default=1, help="jobs at once per worker (default 1: a core each)")
    parser.add_argument("--photos", type=int, default=48, help="how many sample photos to upload")
    parser.add_argument("--out", default="gridd-demo", help="where the photos, the site and the gallery go")
    parser.add_argument("--per-job", type=int, default=None, help="records per job (default 4 photos, 10 files)")
    parser.add_argument("--textstats", action="store_true", help="the word-statistics demo instead")
    parser.add_argument("--files", type=int, default=400, help="--textstats: how many stdlib modules to analyse")
    args = parser.parse_args(argv)
    if args.per_job is None:
        args.per_job = 10 if args.textstats else 4
    demo = run if args.textstats else run_photos
    task.react(lambda reactor: defer.Deferred.fromCoroutine(demo(reactor, args)))


if __name__ == "__main__":
    main()
