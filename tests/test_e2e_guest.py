"""End to end, real processes: a worker on a desk that is used and left alone, over and over, under a CPU load.

A ``twistd gridworker --when-idle`` follows its host's signal file (the
VM case) while a real CPU load generator keeps both cores busy. Its host
turns busy and idle again 20 times: every other time it is idle again
within the grace period (its paused jobs resume in place), the others it
stays busy past it (its jobs are vacated and run elsewhere). Every record
must be accepted exactly once, and every change is awaited as an event.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytest_twisted

from gridd.client import connect
from gridd.launch import LocalGrid
from tests.test_e2e import assert_every_record_once, submit_batch

pytestmark = pytest.mark.e2e

FLIPS = 20
GRACE = 1.0
#: Seconds of CPU load at most: the generator is stopped by the test well before.
LOAD_LIMIT = 300


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def cpu_load():
    """Two processes spinning, one per core, for at most LOAD_LIMIT seconds."""
    code = f"import time\nend = time.monotonic() + {LOAD_LIMIT}\nwhile time.monotonic() < end: pass\n"
    burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    yield burners
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest_twisted.ensureDeferred
async def test_e2e_host_busy_and_idle_twenty_times_under_cpu_load_accepts_every_record_once(
    reactor, tmp_path, cpu_load
):
    state = tmp_path / "host-state"
    state.write_text("idle")
    grid = LocalGrid(reactor, tmp_path)
    try:
        await grid.start_server()
        guest = await grid.start_worker(
            "guest", 4, "--when-idle", "--cpu-threshold", "100", "--user-idle", "0",
            "--host-signal-file", str(state), "--idle-poll", "0.1", "--grace", str(GRACE),
        )  # fmt: skip
        await grid.start_worker("steady", 1)
        client = await connect(reactor, grid.endpoint, grid.secret, name="flapper")
        ids = await submit_batch(client, jobs=150, records=10, seconds=0.1)
        vacated = resumed = 0
        for flip in range(FLIPS):
            since = len(guest.lines)
            await guest.wait_for(r"\] job \d+ attempt \d+ runs in handler process", since)
            since = len(guest.lines)
            state.write_text(f"busy flip {flip}")
            busy = await guest.wait_for(r"\] host busy \(the host says busy", since)
            if "jobs paused" in busy and flip % 2:
                await guest.wait_for(r"\] host busy for .* vacating \d+ jobs", since)
                vacated += 1
            state.write_text("idle")
            idle = await guest.wait_for(r"\] host idle again", since)
            resumed += "paused jobs resume" in idle
        await client.wait(ids)
        assert_every_record_once(grid, ids)
        assert vacated >= FLIPS // 4 and resumed >= FLIPS // 4, (vacated, resumed)
        # The server put each vacated job straight back, recorded as a vacate (no attempt used).
        [(vacates,)] = grid.db_rows(
            "SELECT COUNT(*) FROM job_events WHERE event = 'released' AND detail LIKE '%\"reason\":\"vacated\"%'"
        )
        assert vacates >= vacated, vacates
        # A vacate uses no attempt: a job ran more than once only for a lease lost otherwise (a starved worker).
        over = grid.db_rows(
            "SELECT j.id FROM jobs j WHERE j.attempts > 1 + (SELECT COUNT(*) FROM job_events e WHERE e.job_id = j.id"
            " AND e.event = 'released' AND e.detail NOT LIKE '%\"reason\":\"vacated\"%')"
        )
        assert over == [], "a vacate used an attempt"
        refused = [line for line in guest.matching(r"refused by server") if "stale_lease" in line]
        assert refused == [], "a paused or vacated job's result was sent under a lease it no longer held"
        await client.close()
    finally:
        await grid.stop_all()
