"""Several gridd servers on one MariaDB database, with real processes.

Two ``twistd gridd`` share a database (and a secret); workers know both
servers and fail over. Waits are on log lines and pushed events, never on
time.
"""

from __future__ import annotations

import re
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, threads

from gridd.client import connect
from gridd.launch import WAIT, LocalGrid

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def params(mariadb):
    with mariadb.database() as params:
        yield params


class TwoServers:
    """Servers ``a`` and ``b`` on one database, with one secret; workers that know both."""

    def __init__(self, reactor, tmp_path, params):
        self.a = LocalGrid(reactor, tmp_path / "a", beat=0.5)
        self.b = LocalGrid(reactor, tmp_path / "b", beat=0.5)
        self.secret_file = tmp_path / "secret"
        self.secret_file.write_text("multi-server-secret\n")
        self.uri = (
            f"mysql://{params.user}@{params.host}:{params.port}/{params.database}"
            f"?password_file={params.password_file}"
        )
        self.secret = "multi-server-secret"

    def server_args(self):
        return ("--db", self.uri, "--secret-file", str(self.secret_file), "--reattach-grace", "2")

    async def start(self, workers_on_a=2, workers_on_b=2, slots=4):
        await self.start_servers()
        await self.start_workers(workers_on_a, workers_on_b, slots)

    async def start_servers(self):
        await self.a.start_server(*self.server_args())
        await self.b.start_server(*self.server_args())

    async def start_workers(self, workers_on_a=2, workers_on_b=2, slots=4):
        for n in range(workers_on_a):
            await self.a.start_worker(f"a{n}", slots, *self.worker_args(self.b))
        for n in range(workers_on_b):
            await self.b.start_worker(f"b{n}", slots, *self.worker_args(self.a))

    def worker_args(self, other):
        """The other server as a second endpoint, and the shared secret."""
        return ("--server", other.endpoint, "--secret-file", str(self.secret_file))

    async def stop(self):
        await self.a.stop_all()
        await self.b.stop_all()


@pytest_twisted.ensureDeferred
async def test_multiserver_job_submitted_on_one_server_runs_on_the_others_worker(reactor, tmp_path, params):
    """A job submitted on server A is pushed to the idle worker connected to server B."""
    grid = TwoServers(reactor, tmp_path, params)
    try:
        await grid.a.start_server(*grid.server_args())
        await grid.b.start_server(*grid.server_args())
        await grid.b.start_worker("only-on-b", 1, "--secret-file", str(grid.secret_file))
        client = await connect(reactor, grid.a.endpoint, grid.secret, name="e2e")
        [job] = await client.submit([{"type": "noop", "records": [1, 2, 3]}])
        await client.wait([job]).addTimeout(WAIT, reactor)
        results = await client.results(job)
        assert {r["worker"] for r in results} == {"only-on-b"}
        await client.close()
    finally:
        await grid.stop()


class DoneCounter:
    """The jobs a client saw done, and Deferreds that fire when given jobs are."""

    def __init__(self):
        self.done: set[int] = set()
        #: Every accepted count seen per job, in the order the EVENTs came.
        self.accepted: dict[int, list[int]] = {}
        self._gates: list[tuple[int, set[int], defer.Deferred]] = []

    def on_event(self, status):
        self.accepted.setdefault(status["job"], []).append(status["accepted"])
        if status["state"] == "done":
            self.done.add(status["job"])
            self._open_gates()

    def when_done(self, count: int, among) -> defer.Deferred:
        """Fire once at least ``count`` of the jobs ``among`` are done."""
        d = defer.Deferred()
        self._gates.append((count, set(among), d))
        self._open_gates()
        return d

    def _open_gates(self):
        for gate in list(self._gates):
            count, among, d = gate
            if len(self.done & among) >= count:
                self._gates.remove(gate)
                d.callback(None)


def accepted_records(mariadb, database) -> dict[tuple[int, int], tuple]:
    """Every committed accepted result: (job, index) -> (lease, worker, accepted_at, output, error)."""
    rows = mariadb.query(
        database,
        "SELECT job_id, idx, lease, worker, accepted_at, output, error FROM records WHERE accepted_at IS NOT NULL",
    )
    return {(job, index): rest for job, index, *rest in rows}


async def set_states(client, action, ids, state):
    """PAUSE or RESUME every job of ``ids`` (in chunks, within the connection's outstanding limit)."""
    for start in range(0, len(ids), 50):
        chunk = ids[start : start + 50]
        replies = await defer.gatherResults([getattr(client, action)(job) for job in chunk], consumeErrors=True)
        assert replies == [state] * len(chunk)


async def explain(client, grid, jobs) -> str:
    """What went wrong with ``jobs``: their history as the server shows it, and the log lines naming them."""
    parts = []
    for job in jobs[:5]:
        parts.append(repr(await client.show(job)))
        pattern = re.compile(rf"\bjob {job}\b")
        for name, server in (("a", grid.a.server), ("b", grid.b.server)):
            parts += [f"{name}: {line}" for line in server.lines if pattern.search(line)][:40]
    return "\n".join(parts)


JOBS, RECORDS = 500, 10
#: Seconds per record: a job takes at least 0.3 s, so 16 slots finish at most ~53 jobs a second.
RECORD_SECONDS = 0.03


@pytest_twisted.ensureDeferred
async def test_multiserver_server_killed_and_database_restarted_loses_nothing(reactor, tmp_path, params, mariadb):
    """2 servers, 4 workers, 500 jobs x 10 records; SIGKILL a server and restart MariaDB mid-run: all done once.

    The run is kept going by pausing part of the batch: jobs 251-400 wait
    until the killed server's workers are on the survivor, and the database
    is stopped as soon as the first of them is done, with 149 of them
    (2.8 s of work at the least) still to do; jobs 401-500 wait until the
    database is back. So the database goes away with work in flight, and the
    run cannot end before it returns, however fast the machine.

    "Exactly one accepted result" is judged by what can change: no result
    committed before the kill or before the outage is changed afterwards,
    every accepted result was produced under a lease the job was granted, by
    the worker it was granted to, each job's accepted count is its total and
    its number of results, and the accepted counts the client was told never
    went down.
    """
    grid = TwoServers(reactor, tmp_path, params)
    store = f"mysql://{params.user}@{params.host}:{params.port}/{params.database}"
    try:
        await grid.start_servers()
        client = await connect(reactor, grid.b.endpoint, grid.secret, name="e2e")
        specs = [
            {"type": "sleep", "records": [f"{j}-{r}" for r in range(RECORDS)], "params": {"seconds": RECORD_SECONDS}}
            for j in range(JOBS)
        ]
        ids = []
        for start in range(0, len(specs), 100):
            ids += await client.submit(specs[start : start + 100])
        free, after_kill, after_outage = ids[:250], ids[250:400], ids[400:]
        await set_states(client, "pause", after_kill + after_outage, "paused")
        counter = DoneCounter()
        finished = client.wait(ids, counter.on_event)
        await grid.start_workers()

        # Server A dies with leases in hand; its workers fail over to B.
        await counter.when_done(100, free).addTimeout(WAIT, reactor)
        grid.a.server.send_signal(signal.SIGKILL)
        await grid.a.server.when_ended()
        at_kill = await threads.deferToThread(accepted_records, mariadb, params.database)
        for name in ("a0", "a1"):
            await grid.b.server.wait_for(rf"worker {name} connected")
        await set_states(client, "resume", after_kill, "queued")

        # The database restarts under the surviving server, mid-work.
        await counter.when_done(1, after_kill).addTimeout(WAIT, reactor)
        before_outage = await threads.deferToThread(accepted_records, mariadb, params.database)
        outage_from = len(grid.b.server.lines)
        await threads.deferToThread(mariadb.stop)
        done_at_stop = len(counter.done)
        assert done_at_stop < len(free) + len(after_kill), "the database stopped after the work it was to interrupt"
        await grid.b.server.wait_for(rf"store {re.escape(store)} cannot serve: ", since=outage_from)
        await threads.deferToThread(mariadb.start)
        done_at_restart = len(counter.done)
        assert done_at_stop <= done_at_restart < JOBS
        cannot_serve = [i for i, line in enumerate(grid.b.server.lines) if f"store {store} cannot serve: " in line]
        await grid.b.server.wait_for(rf"store {re.escape(store)} serves again", since=cannot_serve[-1] + 1)
        await set_states(client, "resume", after_outage, "queued")

        final = await finished.addTimeout(120, reactor)
        not_done = [job for job, status in final.items() if status["state"] != "done"]
        assert not not_done, await explain(client, grid, not_done)
        assert {(s["accepted"], s["total"]) for s in final.values()} == {(RECORDS, RECORDS)}
        await client.close()
    finally:
        await grid.stop()

    # Nothing acknowledged lost, nothing accepted twice.
    assert mariadb.query(params.database, "SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("done", JOBS)]
    results = accepted_records(mariadb, params.database)
    assert len(results) == JOBS * RECORDS
    for earlier in (at_kill, before_outage):
        assert earlier, "nothing was accepted before"
        assert {key: results.get(key) for key in earlier} == earlier
    # A sleep record's result is null; each was produced under a lease, by a worker.
    assert {(out, error) for _, _, _, out, error in results.values()} == {("null", None)}
    granted = set(
        mariadb.query(params.database, "SELECT job_id, lease, worker FROM job_events WHERE event = 'leased'")
    )
    assert {(job, lease, worker) for (job, _), (lease, worker, *_) in results.items()} <= granted
    assert mariadb.query(
        params.database,
        "SELECT jobs.id, jobs.total, jobs.accepted, COUNT(records.idx) FROM jobs JOIN records"
        " ON records.job_id = jobs.id AND records.accepted_at IS NOT NULL GROUP BY jobs.id ORDER BY jobs.id",
    ) == [(job, RECORDS, RECORDS, RECORDS) for job in sorted(ids)]
    assert {job for job, seen in counter.accepted.items() if seen != sorted(seen)} == set()
