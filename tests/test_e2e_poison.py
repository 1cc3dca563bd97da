"""End to end: a poison job among real processes (twistd gridd, three twistd gridworker), on loopback.

The test waits on the client's EVENTs and the server's log lines, never on time.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from gridd.launch import LocalGrid
from tests.test_e2e import Watcher, run_with_client

pytestmark = pytest.mark.e2e


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.async_yield_fixture
async def grid(reactor, tmp_path):
    """A running server (poison after 3 workers, the default) and no worker yet; all stopped afterwards."""
    grid = LocalGrid(reactor, tmp_path)
    try:
        await grid.start_server("--backoff-base", "0.2")
        yield grid
    finally:
        await grid.stop_all()


def running_on_a_fresh_worker(watcher: Watcher, job: int, reactor):
    """Fire when ``job`` is next sent to a worker."""
    return watcher.first(lambda s: s["job"] == job and s["state"] == "running", reactor)


@pytest_twisted.ensureDeferred
async def test_e2e_job_failing_on_three_workers_ends_poison_while_a_good_job_completes(reactor, grid):
    """A job whose handler always fails ends poison once it failed on 3 workers, each named; a good job completes.

    Workers join one at a time, and each is drained once the bad job runs on
    it, so that the next attempt goes to a worker that has not failed it yet.
    """
    client, watcher = await run_with_client(grid, reactor)
    [bad, good] = await client.submit(
        [{"type": "fail", "records": ["x"], "retries": 10}, {"type": "noop", "records": [1, 2, 3]}]
    )
    poisoned = watcher.first(lambda s: s["job"] == bad and s["state"] == "poison", reactor)
    completed = watcher.first(lambda s: s["job"] == good and s["state"] == "done", reactor)
    for name in ("w1", "w2", "w3"):
        running = running_on_a_fresh_worker(watcher, bad, reactor)
        await grid.start_worker(name, 1)
        await running  # the only undrained worker runs it
        if name != "w3":
            await client.worker_action(name, "drain")
    status = await poisoned
    assert status["accepted"] == 0
    await completed
    await grid.server.wait_for(rf"job {bad}: poison, failed on 3 workers \(w1, w2, w3\); not retried")

    job = await client.show(bad)
    assert (job["state"], job["attempts"]) == ("poison", 3)
    attempts = job["attempt_history"]
    assert [a["worker"] for a in attempts] == ["w1", "w2", "w3"], attempts
    assert all(a["outcome"] == "failed" and a["error"] and a["end"] >= a["start"] for a in attempts), attempts
    assert job["error"].startswith("poison: failed on 3 workers: w1: ")
    for a in attempts:
        assert f"{a['worker']}: {a['error']}" in job["error"]
    assert (await client.show(good))["state"] == "done"
    assert [j["id"] for j in await client.all_jobs(state="poison")] == [bad]
    assert (await client.stats())["jobs"]["poison"] == 1
    # No worker is sent the poison job again: its one lease per worker is all there is.
    assert grid.db_rows("SELECT COUNT(*) FROM job_events WHERE job_id = ? AND event = 'leased'", bad) == [(3,)]
    assert all(w["flags"] == [] for w in await client.workers())  # the type failed everywhere: nobody's fault
    await client.close()
