"""End-to-end throughput of gridd on this machine: ``./dev bench`` (or ``python bench/throughput.py``).

For each way of submitting, a fresh ``twistd gridd`` (SQLite store) and 4
``twistd gridworker`` processes run 20,000 no-op jobs; the figure is jobs per
second from the first submit to the last completion, as the submitting client
sees it (completions arrive as WATCH events: nothing polls). Each scenario
runs ``--repeat`` times and the median is reported, with the machine. Each
grid is first warmed up with two no-op jobs per slot, untimed, so that every
handler process has started: a process's start-up is paid once, not per job.

Scenarios:
- ``one-by-one``: one client, one job per SUBMIT, each awaited before the next
  (the latency-bound case);
- ``pipelined``: one client, one job per SUBMIT, up to 64 in flight;
- ``batched``: one client, 1,000 jobs per SUBMIT;
- ``records``: one job of 1,000 no-op records alone on the grid: records/s
  from its submit to its completion.

``--handlers`` runs each scenario with the workers' handlers in child
processes (``processes``, the default of ``twistd gridworker``), in the
workers' threads (``threads``), or both, alternating run by run so that both
see the same machine, and prints the ratio: the cost of process isolation.
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

SCENARIOS = ("one-by-one", "pipelined", "batched", "records")
HANDLERS = ("processes", "threads")
#: Records in the ``records`` scenario's one job.
RECORDS = 1000


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
    elif scenario == "records":
        await client.submit([{"type": "noop", "records": [None] * RECORDS}])
    else:
        for start in range(0, jobs, 1000):
            await client.submit([spec] * min(1000, jobs - start))


async def one_run(reactor, scenario: str, handlers: str, args) -> float:
    """One run on a fresh grid: jobs/s (records/s for ``records``)."""
    jobs, workers, slots = args.jobs, args.workers, args.slots
    if scenario == "records":
        jobs = 1
    with tempfile.TemporaryDirectory(prefix="gridd-bench-") as tmp:
        grid = LocalGrid(reactor, Path(tmp), beat=2.0)
        profile = ()
        if args.profile_server:
            profile = ("--profiler=cprofile", "--savestats", f"--profile={args.profile_server}.{scenario}")
        try:
            await grid.start_server(twistd_args=profile)
            for n in range(workers):
                await grid.start_worker(f"bench-{n}", slots, "--handlers", handlers)
            client = await connect(reactor, grid.endpoint, grid.secret, name="bench")
            target = {"left": 0, "done": None}

            def on_event(status):
                if status["state"] == "done" and target["left"] > 0:
                    target["left"] -= 1
                    if target["left"] == 0:
                        target["done"].callback(None)

            def expect(n: int) -> defer.Deferred:
                target["left"], target["done"] = n, defer.Deferred()
                return target["done"]

            await client.watch([], on_event)
            # Warm up: every slot runs a job first, so that each handler process
            # (processes mode) has started; a process's start-up is paid once.
            warm = workers * slots * 2
            warmed = expect(warm)
            await client.submit([{"type": "noop", "records": [None]}] * warm)
            await warmed
            all_done = expect(jobs)
            started = time.perf_counter()
            await submit(client, scenario, jobs)
            submitted = time.perf_counter()
            await all_done
            elapsed = time.perf_counter() - started
            rate, unit = (RECORDS / elapsed, "records/s") if scenario == "records" else (jobs / elapsed, "jobs/s")
            print(
                f"  {scenario:<11} {handlers:<9} {rate:8.0f} {unit:<9} "
                f"(submit {submitted - started:.2f} s, all done {elapsed:.2f} s)",
                flush=True,
            )
            await client.close()
            return rate
        finally:
            await grid.stop_all()


async def main(reactor, args):
    print(f"machine: {machine()}")
    print(
        f"{args.jobs} no-op jobs ({RECORDS} records for 'records'), {args.workers} worker processes x "
        f"{args.slots} slots, SQLite store; handlers: {', '.join(args.handlers)}"
    )
    runs: dict[tuple[str, str], list[float]] = {}
    for scenario in args.scenarios:
        for _ in range(args.repeat):
            for handlers in args.handlers:  # alternating: both modes see the same moments of the machine
                runs.setdefault((scenario, handlers), []).append(await one_run(reactor, scenario, handlers, args))
    print(f"median of {args.repeat} (min-max), first submit to last completion:")
    for scenario in args.scenarios:
        unit = "records/s" if scenario == "records" else "jobs/s"
        medians = {}
        for handlers in args.handlers:
            figures = runs[(scenario, handlers)]
            medians[handlers] = statistics.median(figures)
            print(
                f"  {scenario:<11} {handlers:<9} {medians[handlers]:8.0f} {unit:<9} "
                f"({min(figures):.0f}-{max(figures):.0f})"
            )
        if len(medians) == 2:
            print(f"  {scenario:<11} processes/threads: {medians['processes'] / medians['threads']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile-server", metavar="FILE", help="write the server's cProfile stats to FILE.SCENARIO")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--handlers", nargs="+", choices=HANDLERS, default=["processes"], help="where workers run handlers"
    )
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))
