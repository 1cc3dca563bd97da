"""End to end: real twistd processes on loopback, real TCP, the SQLite store, signals.

Each test waits on events (log lines, the client's EVENTs), never on time.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import defer

from gridd.client import connect
from gridd.launch import WAIT, LocalGrid

pytestmark = pytest.mark.e2e

JOBS, RECORDS = 200, 10
SLEEP = 0.02  # seconds per record: long enough to interrupt a job mid-way


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def grid(reactor, tmp_path):
    """A running server and three workers (w1, w2, w3) of 4 slots, all stopped afterwards."""
    grid = LocalGrid(reactor, tmp_path)
    try:
        await grid.start_server()
        for n in (1, 2, 3):
            await grid.start_worker(f"w{n}", 4)
        yield grid
    finally:
        await grid.stop_all()


class Watcher:
    """Follows every job's status through the client's WATCH events."""

    def __init__(self, client):
        self.client = client
        self.status: dict[int, dict] = {}
        self._waiters: list[tuple] = []

    async def start(self):
        await self.client.watch([], self._seen)

    def _seen(self, status):
        self.status[status["job"]] = status
        for waiter in list(self._waiters):
            test, d = waiter
            if test(status):
                self._waiters.remove(waiter)
                d.callback(status)

    def first(self, test, reactor) -> defer.Deferred:
        """Fire with the first future event that passes ``test``."""
        d = defer.Deferred()
        self._waiters.append((test, d))
        return d.addTimeout(WAIT, reactor)


async def submit_batch(client, jobs=JOBS, records=RECORDS, seconds=SLEEP):
    specs = [
        {"type": "sleep", "records": [f"job{j}-rec{r}" for r in range(records)], "params": {"seconds": seconds}}
        for j in range(jobs)
    ]
    return await client.submit(specs)


def assert_every_record_once(grid: LocalGrid, ids: list[int]):
    """Every job is done and every record has exactly one accepted result."""
    states = dict(grid.db_rows("SELECT id, state FROM jobs"))
    assert {states[i] for i in ids} == {"done"}, Counter(states[i] for i in ids)
    per_job = grid.db_rows(
        "SELECT job_id, COUNT(*) FROM records WHERE output IS NOT NULL OR error IS NOT NULL GROUP BY job_id"
    )
    assert dict(per_job) == {i: RECORDS for i in ids}
    assert grid.db_rows("SELECT COUNT(*) FROM jobs WHERE accepted != total") == [(0,)]


async def run_with_client(grid, reactor):
    client = await connect(reactor, grid.endpoint, grid.secret, name="e2e")
    watcher = Watcher(client)
    await watcher.start()
    return client, watcher


@pytest_twisted.ensureDeferred
async def test_e2e_killed_worker_job_resumes_on_another_worker(reactor, grid):
    """SIGKILL a worker mid-job: everything completes once, and its job resumes from its first unfinished record."""
    client, watcher = await run_with_client(grid, reactor)
    ids = await submit_batch(client)
    # Wait until a job of w1's is part way done, then kill w1.
    workers = {w["name"]: w for w in await client.workers()}
    victim_jobs = set(workers["w1"]["running"])
    assert victim_jobs, "w1 was given no job"
    status = await watcher.first(lambda s: s["job"] in victim_jobs and 1 <= s["accepted"] < RECORDS - 1, reactor)
    grid.workers["w1"].send_signal(signal.SIGKILL)
    killed_job = status["job"]
    await grid.server.wait_for(r"worker w1 gone")
    await client.wait(ids)
    assert_every_record_once(grid, ids)
    rows = grid.db_rows("SELECT idx, worker FROM records WHERE job_id = ? ORDER BY idx", killed_job)
    by_w1 = [idx for idx, worker in rows if worker == "w1"]
    assert by_w1 == list(range(len(by_w1))), "w1's accepted results are not a prefix"
    assert 1 <= len(by_w1) < RECORDS
    assert {worker for _, worker in rows[len(by_w1) :]} <= {"w2", "w3"}
    history = (await client.show(killed_job))["history"]
    leases = [h for h in history if h["event"] == "leased"]
    assert len(leases) == 2 and leases[-1]["worker"] in ("w2", "w3")
    await client.close()


@pytest_twisted.ensureDeferred
async def test_e2e_suspended_worker_is_replaced_and_its_late_results_refused(reactor, grid):
    """SIGSTOP a worker past its deadline: its job is re-dispatched; after SIGCONT its lease is refused."""
    client, watcher = await run_with_client(grid, reactor)
    ids = await submit_batch(client)
    workers = {w["name"]: w for w in await client.workers()}
    held = set(workers["w2"]["running"])
    status = await watcher.first(lambda s: s["job"] in held and 1 <= s["accepted"] < RECORDS - 1, reactor)
    suspended_job = status["job"]
    since = len(grid.server.lines)
    grid.workers["w2"].send_signal(signal.SIGSTOP)
    await grid.server.wait_for(r"worker w2 silent", since)
    count_w2 = "SELECT job_id, COUNT(*) FROM records WHERE worker = 'w2' GROUP BY job_id"
    before = dict(grid.db_rows(count_w2))
    await client.wait([suspended_job])
    worker_since = len(grid.workers["w2"].lines)
    grid.workers["w2"].send_signal(signal.SIGCONT)
    # Back from suspension, w2 learns its leases are gone ...
    await grid.workers["w2"].wait_for(r"lease \w+ of job \d+ (refused by server|lost)", worker_since)
    await client.wait(ids)
    assert_every_record_once(grid, ids)
    # ... and nothing it computed under them was accepted after it was cut off.
    after = dict(grid.db_rows(count_w2))
    assert {job: after[job] for job in before} == before
    history = (await client.show(suspended_job))["history"]
    assert any(h["event"] == "released" and h["detail"]["reason"] == "expired" for h in history), history
    await client.close()


@pytest_twisted.ensureDeferred
async def test_e2e_server_killed_and_restarted_loses_nothing(reactor, grid):
    """SIGKILL the server mid-run and restart it: every acknowledged job and result survives and the run completes."""
    client, watcher = await run_with_client(grid, reactor)
    ids = await submit_batch(client)
    await watcher.first(lambda s: s["state"] == "done", reactor)
    grid.server.send_signal(signal.SIGKILL)
    await grid.server.when_ended()
    done_before = {job for job, s in watcher.status.items() if s["state"] == "done"}
    await client.closed
    # A lease granted just before the kill, whose JOB never left, waits out the
    # reattach grace before it is re-queued: keep that short here.
    server = await grid.start_server("--reattach-grace", "5")
    for n in (1, 2, 3):
        await server.wait_for(rf"worker w{n} connected")
    # Workers came back holding leases the restarted server still honours.
    assert any(int(line.rsplit("kept ", 1)[1].split(",")[0]) > 0 for line in server.matching(r"kept \d+"))
    client, watcher = await run_with_client(grid, reactor)
    final = await client.wait(ids)
    assert set(final) == set(ids)
    assert done_before <= {j for j, s in final.items() if s["state"] == "done"}
    assert_every_record_once(grid, ids)
    await client.close()
