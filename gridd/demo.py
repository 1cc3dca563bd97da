"""gridd's main job, end to end, on one machine: ``python -m gridd.demo``.

Starts a real ``twistd gridd`` on loopback with the embedded SQLite store,
three ``twistd gridworker`` processes, and submits a real batch: word
statistics (the ``textstats`` job type) for every module of the Python
standard library, ten files per job. It shows a progress bar while the grid
works, then a summary of what ran where, and stops everything it started.
"""

from __future__ import annotations

import argparse
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

console = Console(stderr=True)


def corpus(limit: int) -> list[dict]:
    """The batch: one record per standard-library module, with its text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for path in sorted(stdlib.glob("*.py"))[:limit]:
        records.append({"id": path.name, "text": path.read_text(encoding="utf-8", errors="replace")})
    return records


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
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--files", type=int, default=400, help="how many stdlib modules to analyse")
    parser.add_argument("--per-job", type=int, default=10, help="records per job")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
