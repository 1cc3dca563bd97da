"""End-to-end throughput of gridd on this machine: ``./dev bench`` (or ``python bench/throughput.py``).

For each way of submitting, a fresh ``twistd gridd`` (SQLite store) and 4
``twistd gridworker`` processes run 20,000 no-op jobs; the figure is jobs per
second from the first submit to the last completion, as the submitting client
sees it (completions arrive as WATCH events: nothing polls). Each scenario
runs ``--repeat`` times and the median is reported, with the machine.

Scenarios:
- ``one-by-one``: one client, one job per SUBMIT, each awaited before the next
  (the latency-bound case the issue asks for);
- ``pipelined``: one client, one job per SUBMIT, up to 64 in flight;
- ``batched``: one client, 1,000 jobs per SUBMIT.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gridd  # noqa: E402
import twisted  # noqa: E402
from gridd.client import connect  # noqa: E402
from gridd.launch import LocalGrid  # noqa: E402

SCENARIOS = ("one-by-one", "pipelined", "batched")


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{platform.node()}: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, Twisted {twisted.__version__}, SQLite {sqlite3.sqlite_version}, "
        f"gridd {gridd.__version__}"
    )


async def submit(client, scenario: str, jobs: int):
    spec = {"type": "noop", "records": [None]}
    if scenario == "one-by-one":
        for _ in range(jobs):
            await client.submit([spec])
    elif scenario == "pipelined":
        window = defer.DeferredSemaphore(64)
        await defer.gatherResults([window.run(client.submit, [spec]) for _ in range(jobs)], consumeErrors=True)
    else:
        for start in range(0, jobs, 1000):
            await client.submit([spec] * min(1000, jobs - start))


async def one_run(reactor, scenario: str, args) -> float:
    jobs, workers, slots = args.jobs, args.workers, args.slots
    with tempfile.TemporaryDirectory(prefix="gridd-bench-") as tmp:
        grid = LocalGrid(reactor, Path(tmp), beat=2.0)
        profile = ()
        if args.profile_server:
            profile = ("--profiler=cprofile", "--savestats", f"--profile={args.profile_server}.{scenario}")
        try:
            await grid.start_server(twistd_args=profile)
            for n in range(workers):
                await grid.start_worker(f"bench-{n}", slots)
            client = await connect(reactor, grid.endpoint, grid.secret, name="bench")
            all_done = defer.Deferred()
            done = 0

            def on_event(status):
                nonlocal done
                if status["state"] == "done":
                    done += 1
                    if done == jobs:
                        all_done.callback(None)

            await client.watch([], on_event)
            started = time.perf_counter()
            await submit(client, scenario, jobs)
            submitted = time.perf_counter()
            await all_done
            elapsed = time.perf_counter() - started
            print(
                f"  {scenario:<11} {jobs / elapsed:8.0f} jobs/s  "
                f"(submit {submitted - started:.2f} s, all done {elapsed:.2f} s)",
                flush=True,
            )
            await client.close()
            return jobs / elapsed
        finally:
            await grid.stop_all()


async def main(reactor, args):
    print(f"machine: {machine()}")
    print(f"{args.jobs} no-op jobs, {args.workers} worker processes x {args.slots} slots, SQLite store")
    results = {}
    for scenario in args.scenarios:
        runs = [await one_run(reactor, scenario, args) for _ in range(args.repeat)]
        results[scenario] = statistics.median(runs)
    print("median end-to-end throughput (first submit to last completion):")
    for scenario, rate in results.items():
        print(f"  {scenario:<11} {rate:8.0f} jobs/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile-server", metavar="FILE", help="write the server's cProfile stats to FILE.SCENARIO")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
