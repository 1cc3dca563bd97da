"""The good-guest wire end to end: a real worker core over real TCP to a real server in the test reactor.

The server is ``makeService``'s (tests/live.py), the worker is
``make_worker_service``'s core with thread handlers, the client is
``gridd.client``: every message crosses a socket. Waits are on events
(replies, job ends) or bounded reactor turns, never on a set time.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from gridd.client import connect
from gridd.jobtypes import load_job_types
from gridd.worker.runner import InlineThreads
from gridd.worker.service import make_worker_service
from tests.live import LiveServer, bounded, turns


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_live_worker_busy_gets_no_job_then_idle_gets_it_and_hears_host(reactor, tmp_path):
    """STATE busy over TCP: a job submitted stays queued, the worker holds nothing; STATE idle: it runs it.

    An operator's WORKER busy reaches the worker's core as HOST.
    """
    server = await LiveServer(reactor, tmp_path, "tcp:0:interface=127.0.0.1").start()
    worker = make_worker_service(
        reactor,
        [f"tcp:127.0.0.1:{server.port}"],
        name="w1",
        token=server.secret,
        job_types=load_job_types(["noop"]),
        slots=1,
        handlers="threads",
        threads=InlineThreads(),
    )
    heard = []
    worker.core.on_host_signal = lambda busy, reason: heard.append((busy, reason))
    worker.startService()
    client = None
    try:
        await bounded(worker.when_connected(), reactor)
        client = await bounded(connect(reactor, f"tcp:127.0.0.1:{server.port}", server.secret), reactor)

        worker.core.set_host_state("busy", "desk in use")
        await turns(reactor, lambda: server.dispatcher.workers["w1"].state == "busy", what="the server hearing busy")
        [job] = await bounded(client.submit([{"type": "noop", "records": [1, 2]}]), reactor)
        # The SUBMIT's OK follows its dispatch: had the job been handed out, it would be leased by now.
        assert server.dispatcher.jobs[job].lease is None and server.dispatcher.jobs[job].state == "queued"
        [view] = await bounded(client.workers(), reactor)
        assert (view["state"], view["state_reason"], view["running"]) == ("busy", "desk in use", [])
        assert not worker.core.holdings

        worker.core.set_host_state("idle")
        final = await bounded(client.wait([job]), reactor)
        assert final[job]["state"] == "done"
        assert {r["worker"] for r in await bounded(client.results(job), reactor)} == {"w1"}

        assert await bounded(client.worker_host("w1", True, "VM host in use"), reactor) is True
        await turns(reactor, lambda: heard == [(True, "VM host in use")], what="the worker hearing HOST")
    finally:
        if client is not None:
            await client.close()
        await worker.stopService()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_live_worker_checks_its_leases_after_a_suspend_and_goes_on_with_the_kept_one(reactor, tmp_path):
    """After a suspend the worker's core asks CHECK over TCP: its lease is kept, it resumes and finishes the job."""
    server = await LiveServer(reactor, tmp_path, "tcp:0:interface=127.0.0.1").start()
    worker = make_worker_service(
        reactor,
        [f"tcp:127.0.0.1:{server.port}"],
        name="w1",
        token=server.secret,
        job_types=load_job_types(["sleep"]),
        slots=1,
        handlers="threads",
        threads=InlineThreads(),
    )
    answers = []
    check = server.dispatcher.check_leases

    async def recorded(conn, holding):
        reply = await check(conn, holding)
        answers.append(reply)
        return reply

    server.dispatcher.check_leases = recorded
    worker.startService()
    client = None
    try:
        await bounded(worker.when_connected(), reactor)
        client = await bounded(connect(reactor, f"tcp:127.0.0.1:{server.port}", server.secret), reactor)
        [job] = await bounded(
            client.submit([{"type": "sleep", "records": [0, 1, 2], "params": {"seconds": 0.05}}]), reactor
        )
        await turns(reactor, lambda: worker.core.holdings, what="the worker holding the job")
        worker.core.check_leases("resumed after a test suspend")
        assert worker.core.checking
        await turns(reactor, lambda: not worker.core.checking, what="the server answering CHECK")
        [answer] = answers
        assert [k["job"] for k in answer["kept"]] == [job] and answer["lost"] == []
        final = await bounded(client.wait([job]), reactor)
        assert final[job]["state"] == "done"
        view = await bounded(client.show(job), reactor)
        assert [e["event"] for e in view["history"]] == ["submitted", "leased", "completed"]
    finally:
        if client is not None:
            await client.close()
        await worker.stopService()
        await server.stop()
