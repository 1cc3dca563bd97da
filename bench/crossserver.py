"""Push latency across gridd servers on one MariaDB: ``./dev bench crossserver`` (or ``python bench/crossserver.py``).

Issue 3: with several servers on one database, a job submitted on server A
is pushed to an idle matching worker connected to server B within about a
second. This measures it. A throwaway MariaDB server (``tests/mariadb.py``)
and, per scenario, two fresh ``twistd gridd`` processes A and B on a fresh
database of it, all on 127.0.0.1; ONE in-process worker (``gridd.worker``,
1 slot, type ``noop``) connected to B, or to A for the baseline. Jobs are
submitted on A one at a time (``gridd.client``): each submit's OK is awaited
and timed, then the JOB is awaited at the worker and timed on the same
clock, then the worker's DONE is acknowledged, so every job finds the worker
idle. The figure is submit OK -> JOB received: median, p90, max.

Before each submit the bench pauses a random 0..``--pause`` seconds (seeded),
so submits fall at random points of B's sync cycle: submitted at once after
the previous JOB, each would come just after one of B's looks at the store
and wait almost a whole ``--sync-interval`` for the next.

Scenarios:
- ``same-server``: the worker on A (A pushes the moment the submit commits);
- ``cross-0.5``: the worker on B, servers at the default ``--sync-interval 0.5``;
- ``cross-0.1``: the worker on B, ``--sync-interval 0.1``.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gridd.client import connect  # noqa: E402
from gridd.jobtypes import Noop  # noqa: E402
from gridd.launch import LocalGrid  # noqa: E402
from gridd.worker.runner import InlineThreads  # noqa: E402
from gridd.worker.service import make_worker_service  # noqa: E402
from tests.mariadb import MariaDB  # noqa: E402
from throughput import machine as base_machine  # noqa: E402

#: name -> (server the worker connects to, --sync-interval of both servers)
SCENARIOS = {
    "same-server": ("A", 0.5),
    "cross-0.5": ("B", 0.5),
    "cross-0.1": ("B", 0.1),
}
SECRET = "crossserver-bench-secret"
#: Seconds any single awaited step (a submit's OK, a JOB, a DONE's reply, a start) may take.
WAIT = 30.0
JOB_WAIT = 10.0


def machine(mariadb: MariaDB) -> str:
    """throughput.py's machine line, with the MariaDB server's version instead of SQLite's."""
    with contextlib.closing(mariadb.root()) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT VERSION()")
        (version,) = cursor.fetchone()
    version = f"MariaDB {version.split('-')[0]}"
    line = base_machine()
    sqlite_part = f"SQLite {sqlite3.sqlite_version}"
    return line.replace(sqlite_part, version) if sqlite_part in line else f"{line}, {version}"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class ReceivingWorker:
    """An in-process gridworker (1 slot, ``noop``) that notes when each JOB arrives."""

    def __init__(self, reactor, endpoint: str):
        self.reactor = reactor
        self.received: dict[int, float] = {}
        self._waiters: dict[int, defer.Deferred] = {}
        self.service = make_worker_service(
            reactor,
            [endpoint],
            name="bench-worker",
            token=SECRET,
            job_types={"noop": Noop()},
            slots=1,
            handlers="threads",
            threads=InlineThreads(),
        )
        core = self.service.core
        start_job = core.start_job

        def received(assignment):
            # WorkerProtocol hands each JOB line to core.start_job: note it first.
            self.received.setdefault(assignment.job, time.monotonic())
            waiter = self._waiters.pop(assignment.job, None)
            start_job(assignment)
            if waiter is not None:
                waiter.callback(self.received[assignment.job])

        core.start_job = received
        self.started = False

    async def start(self):
        self.started = True
        self.service.startService()
        await self.service.when_connected(failAfterFailures=5).addTimeout(WAIT, self.reactor)

    def when_received(self, job: int) -> defer.Deferred:
        """Fire with the monotonic time the JOB of ``job`` arrived (at once if it has)."""
        if job in self.received:
            return defer.succeed(self.received[job])
        d = self._waiters[job] = defer.Deferred()

        def late(failure):
            failure.trap(defer.TimeoutError)
            self._waiters.pop(job, None)
            raise RuntimeError(f"the worker got no JOB for job {job} within {JOB_WAIT:g} s of its submit's OK")

        return d.addTimeout(JOB_WAIT, self.reactor).addErrback(late)

    def when_idle(self) -> defer.Deferred:
        """Fire once the worker holds no lease (its DONE was acknowledged)."""
        return self.service.core.when_idle().addTimeout(WAIT, self.reactor)

    async def stop(self):
        if self.started:
            self.started = False
            await self.service.stopService()


class Scenario:
    """Servers A and B on a fresh database, and the worker on one of them; stopped by PID."""

    def __init__(self, reactor, tmp: Path, params, sync_interval: float):
        self.reactor = reactor
        self.a = LocalGrid(reactor, tmp / "a", beat=2.0)
        self.b = LocalGrid(reactor, tmp / "b", beat=2.0)
        secret_file = tmp / "secret"
        secret_file.write_text(SECRET + "\n")
        uri = (
            f"mysql://{params.user}@{params.host}:{params.port}/{params.database}"
            f"?password_file={params.password_file}"
        )
        self.server_args = ("--db", uri, "--secret-file", str(secret_file), "--sync-interval", str(sync_interval))
        self.worker: ReceivingWorker | None = None
        self.client = None

    async def start(self, worker_on: str):
        await self.a.start_server(*self.server_args)
        await self.b.start_server(*self.server_args)
        grid = self.a if worker_on == "A" else self.b
        self.worker = ReceivingWorker(self.reactor, grid.endpoint)
        await self.worker.start()
        await grid.server.wait_for(r"worker bench-worker connected")
        self.client = await connect(self.reactor, self.a.endpoint, SECRET, name="bench")

    async def stop(self):
        if self.client is not None:
            client, self.client = self.client, None
            with contextlib.suppress(Exception):
                await client.close().addTimeout(WAIT, self.reactor)
        if self.worker is not None:
            with contextlib.suppress(Exception):
                await self.worker.stop()
        await self.a.stop_all()
        await self.b.stop_all()

    def tails(self) -> str:
        out = []
        for name, grid in (("A", self.a), ("B", self.b)):
            if grid.server is not None:
                out.append(f"--- server {name} (last lines) ---")
                out.extend(grid.server.lines[-15:])
        return "\n".join(out)


async def measure(reactor, scenario: Scenario, jobs: int, warmup: int, pause: float, rng: random.Random):
    """Submit ``warmup + jobs`` jobs one at a time; return (OK->JOB, sent->JOB) latencies in seconds."""
    spec = {"type": "noop", "records": [None]}
    after_ok, after_send = [], []
    for n in range(warmup + jobs):
        if pause > 0:
            await task.deferLater(reactor, rng.uniform(0, pause))
        sent = time.monotonic()
        [job] = await scenario.client.submit([spec]).addTimeout(WAIT, reactor)
        ok = time.monotonic()
        received = await scenario.worker.when_received(job)
        await scenario.worker.when_idle()
        if n >= warmup:
            after_ok.append(received - ok)
            after_send.append(received - sent)
    return after_ok, after_send


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"median {statistics.median(ms):7.1f} ms   p90 {percentile(ms, 0.9):7.1f} ms   max {max(ms):7.1f} ms"


async def main(reactor, args, mariadb: MariaDB, tmp: Path):
    print(f"machine: {machine(mariadb)}", flush=True)
    print(
        f"{args.jobs} no-op jobs per scenario (+{args.warmup} warm-up), one at a time, submitted on server A; "
        f"one worker of 1 slot; random pause 0-{args.pause:g} s before each submit; MariaDB store",
        flush=True,
    )
    rng = random.Random(args.seed)
    current: list[Scenario] = []

    async def stop_current():
        while current:
            await current.pop().stop()

    # Ctrl-C stops the reactor: stop the servers and the worker first.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.Deferred.fromCoroutine(stop_current()))
    results = {}
    try:
        for n, name in enumerate(args.scenarios):
            worker_on, sync_interval = SCENARIOS[name]
            with mariadb.database() as params:
                scenario = Scenario(reactor, tmp / f"{n}-{name}", params, sync_interval)
                current.append(scenario)
                try:
                    await scenario.start(worker_on)
                    after_ok, after_send = await measure(reactor, scenario, args.jobs, args.warmup, args.pause, rng)
                except Exception:
                    print(scenario.tails(), file=sys.stderr)
                    raise
                finally:
                    await stop_current()
            results[name] = (after_ok, after_send)
            print(
                f"  {name:<11} worker on {worker_on}, --sync-interval {sync_interval:g}: "
                f"submit OK -> JOB {summary(after_ok)}",
                flush=True,
            )
    finally:
        with contextlib.suppress(ValueError):
            reactor.removeSystemEventTrigger(trigger)
    print("submit OK -> JOB received at the worker (and, in brackets, submit sent -> JOB):")
    for name, (after_ok, after_send) in results.items():
        worker_on, sync_interval = SCENARIOS[name]
        where = "A (same server)" if worker_on == "A" else "B (other server)"
        print(f"  {name:<11} worker on {where:<16} --sync-interval {sync_interval:<4g} {summary(after_ok)}")
        print(f"  {'':<11} {'':<26} {'':<20} [{summary(after_send)}]")
    return True


def run(args) -> None:
    # Warnings and errors of this process (the worker, the client) go to stderr.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
            )
        ],
        redirectStandardIO=False,
    )
    with tempfile.TemporaryDirectory(prefix="gridd-bench-cross-") as name:
        tmp = Path(name)
        mariadb = MariaDB(tmp / "mariadb")
        mariadb.base.mkdir()
        finished = []
        try:
            mariadb.start()
            task.react(
                lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args, mariadb, tmp)).addCallback(
                    finished.append
                )
            )
        except SystemExit as end:
            if end.code == 0 and not finished:
                print("interrupted: everything started was stopped", file=sys.stderr)
                raise SystemExit(130) from None
            raise
        finally:
            mariadb.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100, help="measured jobs per scenario [100]")
    parser.add_argument("--warmup", type=int, default=2, help="jobs per scenario run first and not counted [2]")
    parser.add_argument("--pause", type=float, default=0.5, help="longest random pause before a submit, s [0.5]")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random pauses [1]")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    args = parser.parse_args()
    if args.jobs < 1 or args.warmup < 0 or args.pause < 0:
        parser.error("--jobs must be at least 1, --warmup and --pause not negative")
    run(args)
