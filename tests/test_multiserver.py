"""Several gridd servers on one MariaDB database, with real processes.

Two ``twistd gridd`` share a database (and a secret); workers know both
servers and fail over. Waits are on log lines and pushed events, never on
time.
"""

from __future__ import annotations

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
        await self.a.start_server(*self.server_args())
        await self.b.start_server(*self.server_args())
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


@pytest_twisted.ensureDeferred
async def test_multiserver_server_killed_and_database_restarted_loses_nothing(reactor, tmp_path, params, mariadb):
    """2 servers, 4 workers, 500 jobs x 10 records; SIGKILL a server and restart MariaDB mid-run: all done once."""
    grid = TwoServers(reactor, tmp_path, params)
    try:
        await grid.start()
        client = await connect(reactor, grid.b.endpoint, grid.secret, name="e2e")
        specs = [
            {"type": "sleep", "records": [f"{j}-{r}" for r in range(10)], "params": {"seconds": 0.002}}
            for j in range(500)
        ]
        ids = []
        for start in range(0, len(specs), 100):
            ids += await client.submit(specs[start : start + 100])
        progress = defer.Deferred()
        seen_done = set()

        def on_event(status):
            if status["state"] == "done":
                seen_done.add(status["job"])
                if len(seen_done) == 50 and not progress.called:
                    progress.callback(None)

        finished = client.wait(ids, on_event)
        await progress.addTimeout(WAIT, reactor)
        # Server A dies with leases in hand; its workers fail over to B.
        grid.a.server.send_signal(signal.SIGKILL)
        await grid.a.server.when_ended()
        for name in ("a0", "a1"):
            await grid.b.server.wait_for(rf"worker {name} connected")
        # The database restarts under the surviving server.
        await threads.deferToThread(mariadb.stop)
        await threads.deferToThread(mariadb.start)
        final = await finished.addTimeout(120, reactor)
        assert {s["state"] for s in final.values()} == {"done"}
        await client.close()
    finally:
        await grid.stop()
    assert mariadb.query(params.database, "SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("done", 500)]
    assert mariadb.query(
        params.database, "SELECT COUNT(*), COUNT(DISTINCT job_id, idx) FROM records WHERE accepted_at IS NOT NULL"
    ) == [(5000, 5000)]
