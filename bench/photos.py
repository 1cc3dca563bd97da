"""Photos/s through gridd against a plain single-process loop: ``./dev bench photos`` (or ``python bench/photos.py``).

The same sample photos (gridd.photos.samples) go through the same work —
the ``photos`` job type's ``process``: decode, turn upright, resize to three
widths, extract the metadata, write the renditions and the metadata document
to a local store and a row to a SQLite catalog — once in a plain loop in
this one process (the ceiling: N cores can at best do N times it), and then
through a real ``twistd gridd`` and 1, 2 and 4 ``twistd gridworker``
processes of one slot each (handlers in child processes, the default), in
jobs of ``--per-job`` photos. Each kind runs ``--repeat`` times, alternating
with the others so that all see the same machine, and the medians are
reported with the share of the ceiling gridd reaches: photos/s divided by
min(workers, cores) times the loop's photos/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import machine  # noqa: E402
from gridd.client import connect  # noqa: E402
from gridd.jobtypes import JobContext  # noqa: E402
from gridd.launch import LocalGrid  # noqa: E402
from gridd.photos.jobtype import Photos  # noqa: E402
from gridd.photos.samples import make_samples  # noqa: E402

WIDTHS = [320, 640, 1280]


def params_for(site: Path) -> dict:
    return {"store": (site / "objects").as_uri(), "catalog": f"sqlite://{site / 'photos.db'}", "widths": WIDTHS}


def loop(reactor, records: list[dict], site: Path) -> float:
    """The same work in a plain loop in this process: photos/s."""
    photos, params = Photos(), params_for(site)
    context = JobContext(clock=reactor, job=1, lease="bench", attempt=1, total=len(records))
    started = time.perf_counter()
    for index, record in enumerate(records):
        context.index = index
        photos.process(record, params, context)
    return len(records) / (time.perf_counter() - started)


async def through_gridd(reactor, records: list[dict], site: Path, workers: int, per_job: int) -> float:
    """Photos/s from the first submit to the last completion, ``workers`` worker processes of one slot."""
    params = params_for(site)
    specs = [
        {"type": "photos", "records": records[i : i + per_job], "params": params}
        for i in range(0, len(records), per_job)
    ]
    grid = LocalGrid(reactor, site / "grid", beat=2.0)
    try:
        await grid.start_server()
        for n in range(workers):
            await grid.start_worker(f"bench-{n}", 1)
        client = await connect(reactor, grid.endpoint, grid.secret, name="bench")
        # Warm up, untimed: each worker's handler process starts and imports Pillow once.
        await client.wait(await client.submit([{**specs[0], "records": specs[0]["records"][:1]}] * workers))
        started = time.perf_counter()
        ids = await client.submit(specs)
        await client.wait(ids)
        elapsed = time.perf_counter() - started
        await client.close()
        return len(records) / elapsed
    finally:
        await grid.stop_all()


async def main(reactor, args):
    print(f"machine: {machine()}")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="gridd-bench-photos-") as tmp:
        tmp = Path(tmp)
        samples = make_samples(tmp / "uploads", args.photos, corrupt=False)
        records = [{"path": str(s.path), "tags": ["bench"]} for s in samples]
        megapixels = sum(s.width * s.height for s in samples) / 1e6
        print(
            f"{len(records)} photos ({megapixels:.0f} Mpx in all), widths {WIDTHS}, jobs of {args.per_job}; "
            f"{cores} cores; median of {args.repeat}"
        )
        kinds = ["loop", *(f"{n} workers" for n in args.workers)]
        runs: dict[str, list[float]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeat):
            for kind in kinds:  # alternating: every kind sees the same moments of the machine
                site = tmp / f"site-{repeat}-{kind.replace(' ', '-')}"
                site.mkdir()
                if kind == "loop":
                    rate = loop(reactor, records, site)
                else:
                    rate = await through_gridd(reactor, records, site, int(kind.split()[0]), args.per_job)
                runs[kind].append(rate)
                print(f"  {kind:<10} {rate:6.1f} photos/s", flush=True)
    ceiling = statistics.median(runs["loop"])
    print("median photos/s (min-max); share of the ceiling min(workers, cores) x the loop's rate:")
    for kind in kinds:
        figures = runs[kind]
        line = f"  {kind:<10} {statistics.median(figures):6.1f} ({min(figures):.1f}-{max(figures):.1f})"
        if kind != "loop":
            workers = int(kind.split()[0])
            line += f"  {statistics.median(figures) / (min(workers, cores) * ceiling) * 100:4.0f} % of the ceiling"
        print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=48)
    parser.add_argument("--per-job", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
