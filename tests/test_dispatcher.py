"""The dispatcher on a task.Clock and the memory store: no sockets, no database, no sleeps."""

from __future__ import annotations

import itertools

import pytest
from twisted.internet import defer, task
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from gridd import errors
from gridd.scheduler import Dispatcher, parse_version
from gridd.server.actions import WireActions
from gridd.server.session import Session
from gridd.store.memory import MemoryStore
from tests.controlled import ControlledStore


class FakeConnection(WireActions):
    """The scheduler's connection interface, recording what it is told as the wire would carry it."""

    def __init__(self, address="10.0.0.1:1234"):
        self.address = address
        self.sent: list[tuple[str, dict]] = []
        self.dropped: str | None = None
        self.answers_ping = False

    def send(self, verb, body=None):
        self.sent.append((verb, body or {}))

    def drop(self, reason):
        self.dropped = reason

    def ping(self, timeout):
        return defer.succeed(self.answers_ping)

    def take(self, verb):
        """Return and forget the bodies of every ``verb`` sent so far."""
        found = [b for v, b in self.sent if v == verb]
        self.sent = [(v, b) for v, b in self.sent if v != verb]
        return found


def run(awaitable):
    """Run a coroutine whose awaits all fire at once (memory store) and return its result."""
    d = defer.ensureDeferred(awaitable)
    out = []
    d.addBoth(out.append)
    assert out, "did not complete synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class Grid:
    """A dispatcher with its clock and store, plus helpers to drive it."""

    def __init__(self, store=None, lease_prefix="L", clock=None, **kwargs):
        if clock is None:
            clock = task.Clock()
            clock.advance(1000)
        self.clock = clock
        self.store = store or MemoryStore()
        counter = itertools.count(1)
        kwargs.setdefault("beat", 2.0)
        self.d = Dispatcher(self.store, self.clock, new_lease=lambda: f"{lease_prefix}{next(counter)}", **kwargs)
        run(self.store.start())
        run(self.d.start())

    def worker(self, name="w1", slots=1, types=None, holding=(), **extra):
        conn = FakeConnection()
        hello = {"name": name, "slots": slots, "types": types or {"noop": "1.0"}, "holding": list(holding), **extra}
        reply = run(self.d.worker_hello(conn, hello))
        conn.hello_reply = reply
        self.clock.advance(0)  # the dispatcher pushes work one turn after the HELLO reply
        return conn

    def submit(self, *specs, **spec):
        specs = list(specs) or [spec]
        for s in specs:
            s.setdefault("type", "noop")
            s.setdefault("records", ["a"])
        return run(self.d.submit(specs))["jobs"]

    def finish(self, conn, job_body):
        results = [{"i": r["i"], "out": r["data"]} for r in job_body["records"]]
        return run(self.d.done(conn, job_body["job"], job_body["lease"], results))

    def state(self, job_id):
        return run(self.store.get_job(job_id))


def test_submit_pushes_job_to_idle_worker_at_once():
    """A submitted job is sent to an idle matching worker without any poll."""
    g = Grid()
    w = g.worker()
    [job_id] = g.submit(records=["x", "y"])
    [job] = w.take("JOB")
    assert job["job"] == job_id
    assert job["lease"] == "L1"
    assert job["records"] == [{"i": 0, "data": "x"}, {"i": 1, "data": "y"}]
    assert job["attempt"] == 1
    assert g.state(job_id)["state"] == "running"


def test_worker_hello_pushes_waiting_jobs():
    """A worker that connects while jobs wait receives as many as it has slots."""
    g = Grid()
    g.submit(*[{} for _ in range(5)])
    w = g.worker(slots=3)
    assert [j["job"] for j in w.take("JOB")] == [1, 2, 3]


def test_slots_limit_running_jobs_and_done_frees_one():
    """A worker never holds more leases than slots; completing one pushes the next."""
    g = Grid()
    w = g.worker(slots=2)
    g.submit(*[{} for _ in range(4)])
    jobs = w.take("JOB")
    assert [j["job"] for j in jobs] == [1, 2]
    g.finish(w, jobs[0])
    assert [j["job"] for j in w.take("JOB")] == [3]
    assert g.state(1)["state"] == "done"


def test_priority_higher_first_then_fifo():
    """Higher priority jobs go first; within a priority, first in first out."""
    g = Grid()
    g.submit({"priority": 0}, {"priority": 5}, {"priority": 0}, {"priority": 5})
    w = g.worker(slots=4)
    assert [j["job"] for j in w.take("JOB")] == [2, 4, 1, 3]


def test_matching_type_version_memory_tags():
    """A job goes only to a worker with its type at a high enough version, the memory and the tags."""
    g = Grid()
    [job_id] = g.submit(type="resize", requires={"version": "1.10", "memory": 2048, "tags": ["gpu"]})
    wrong = [
        g.worker("no-type", types={"noop": "1"}, memory=4096, tags=["gpu"]),
        g.worker("old", types={"resize": "1.9"}, memory=4096, tags=["gpu"]),
        g.worker("small", types={"resize": "1.10"}, memory=1024, tags=["gpu"]),
        g.worker("untagged", types={"resize": "2.0"}, memory=4096, tags=["cpu"]),
    ]
    assert all(not w.take("JOB") for w in wrong)
    right = g.worker("right", types={"resize": "1.10.0"}, memory=2048, tags=["gpu", "linux"])
    assert [j["job"] for j in right.take("JOB")] == [job_id]


def test_parse_version_compares_numerically():
    """Dotted versions compare as numbers by leading digits, with trailing zeros ignored."""
    assert parse_version("1.10") > parse_version("1.9")
    assert parse_version("2") == parse_version("2.0.0")
    assert parse_version("1.2rc1") == parse_version("1.2")


def test_worker_lost_requeues_at_once_and_resumes_from_first_unfinished_record():
    """A disconnect ends the leases now; the job resumes elsewhere from its first record without a result."""
    g = Grid()
    w1 = g.worker("w1")
    [job_id] = g.submit(records=["a", "b", "c"])
    [job] = w1.take("JOB")
    run(g.d.result(w1, job_id, job["lease"], [{"i": 0, "out": "A"}]))
    g.d.connection_lost(w1)
    w2 = g.worker("w2")
    [again] = w2.take("JOB")
    assert again["lease"] != job["lease"]
    assert again["attempt"] == 2
    assert again["records"] == [{"i": 1, "data": "b"}, {"i": 2, "data": "c"}]


def test_missed_heartbeats_end_leases_and_drop_the_worker():
    """A worker silent past the deadline is dropped and its job re-dispatched at once."""
    g = Grid(beat=2.0)
    w1 = g.worker("w1")
    w2 = g.worker("w2")
    [job_id] = g.submit()
    holder, other = (w1, w2) if w1.take("JOB") else (w2, w1)
    for _ in range(3):  # the other worker keeps beating
        g.clock.advance(2.0)
        g.d.seen(other)
    assert holder.dropped
    assert other.dropped is None
    [job] = other.take("JOB")
    assert job["job"] == job_id


def test_heartbeats_keep_a_worker_alive():
    """A worker that beats within the deadline keeps its lease indefinitely."""
    g = Grid(beat=2.0)
    w = g.worker()
    g.submit()
    [job] = w.take("JOB")
    for _ in range(50):
        g.clock.advance(1.9)
        g.d.seen(w)
    assert w.dropped is None
    assert g.d.jobs[job["job"]].token == job["lease"]


def test_deadline_passed_while_the_server_was_stalled_gives_one_more_beat():
    """A deadline timer that runs late (this server was stalled) waits one beat for lines already sent."""
    g = Grid(beat=2.0)
    w = g.worker()
    g.submit()
    [job] = w.take("JOB")
    g.clock.advance(20.0)  # one step: the 6 s deadline's timer runs 14 s late
    assert w.dropped is None
    g.d.seen(w)  # the beat that waited unread while the server was stalled
    g.clock.advance(5.9)
    assert w.dropped is None
    assert g.d.jobs[job["job"]].token == job["lease"]
    g.clock.advance(0.1)  # on time now, and nothing heard: silent
    assert w.dropped


def test_deadline_after_a_stall_with_nothing_heard_drops_the_worker_one_beat_later():
    """The extra beat after a stall is one beat, not another deadline: a dead worker is still judged."""
    g = Grid(beat=2.0)
    w = g.worker()
    [job_id] = g.submit()
    w.take("JOB")
    g.clock.advance(20.0)
    assert w.dropped is None
    g.clock.advance(1.9)
    assert w.dropped is None
    g.clock.advance(0.1)
    assert w.dropped
    assert g.d.jobs[job_id].lease is None and g.d.jobs[job_id].state == "queued"


def test_stale_lease_refused_and_changes_nothing():
    """A result from a worker whose lease was re-dispatched is refused; the store is unchanged."""
    g = Grid()
    w1 = g.worker("w1")
    [job_id] = g.submit(records=["a", "b"])
    [old] = w1.take("JOB")
    g.d.connection_lost(w1)
    w2 = g.worker("w2")
    [new] = w2.take("JOB")
    with pytest.raises(errors.StaleLease):
        run(g.d.result(w1, job_id, old["lease"], [{"i": 0, "out": "late"}]))
    with pytest.raises(errors.StaleLease):
        run(g.d.result(w2, job_id, old["lease"], [{"i": 0, "out": "stolen"}]))
    assert run(g.store.get_results(job_id)) == []
    run(g.d.result(w2, job_id, new["lease"], [{"i": 0, "out": "ok"}]))
    assert [r["out"] for r in run(g.store.get_results(job_id))] == ["ok"]


def test_another_workers_lease_is_refused():
    """A worker cannot report results under a lease held by another worker."""
    g = Grid()
    w1, w2 = g.worker("w1"), g.worker("w2")
    [job_id] = g.submit()
    [job] = w1.take("JOB") or w2.take("JOB")
    thief = w2 if g.d.workers["w1"].leases else w1
    with pytest.raises(errors.StaleLease):
        run(g.d.done(thief, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert g.state(job_id)["state"] == "running"


def test_duplicate_and_unknown_records_refused():
    """A record already accepted, named twice, or out of range is refused and nothing is accepted."""
    g = Grid()
    w = g.worker()
    [job_id] = g.submit(records=["a", "b", "c"])
    [job] = w.take("JOB")
    lease = job["lease"]
    run(g.d.result(w, job_id, lease, [{"i": 0, "out": 1}]))
    with pytest.raises(errors.DuplicateResult) as e:
        run(g.d.result(w, job_id, lease, [{"i": 1, "out": 1}, {"i": 0, "out": 2}]))
    assert e.value.extra["records"] == [0]
    with pytest.raises(errors.DuplicateResult):
        run(g.d.result(w, job_id, lease, [{"i": 2, "out": 1}, {"i": 2, "out": 2}]))
    with pytest.raises(errors.UnknownRecord) as e:
        run(g.d.result(w, job_id, lease, [{"i": 1, "out": 1}, {"i": 3, "out": 1}]))
    assert e.value.extra["records"] == [3]
    assert [r["i"] for r in run(g.store.get_results(job_id))] == [0]
    assert g.state(job_id)["accepted"] == 1


def test_done_only_when_every_record_has_a_result():
    """DONE before every record has a result is refused with the missing count."""
    g = Grid()
    w = g.worker()
    [job_id] = g.submit(records=["a", "b", "c"])
    [job] = w.take("JOB")
    with pytest.raises(errors.Incomplete) as e:
        run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert e.value.extra["missing"] == 2
    assert g.state(job_id)["accepted"] == 0
    run(g.d.result(w, job_id, job["lease"], [{"i": 0, "out": 1}, {"i": 1, "out": 1}]))
    run(g.d.done(w, job_id, job["lease"], [{"i": 2, "out": 1}]))
    view = g.state(job_id)
    assert (view["state"], view["accepted"]) == ("done", 3)


def test_fail_retries_with_backoff_then_fails_with_history():
    """A failing job is retried after growing backoffs, then failed with every error kept."""
    g = Grid(backoff_base=1.0, backoff_max=300.0)
    w = g.worker()
    [job_id] = g.submit(retries=2)
    delays = []
    for attempt in (1, 2):
        [job] = w.take("JOB")
        assert job["attempt"] == attempt
        reply = run(g.d.fail(w, job_id, job["lease"], f"boom {attempt}", True))
        assert reply["state"] == "queued"
        delays.append(reply["retry_in"])
        g.clock.advance(reply["retry_in"] - 0.01)
        assert not w.take("JOB"), "pushed before its backoff ended"
        g.clock.advance(0.01)
    assert delays == [1.0, 2.0]
    [job] = w.take("JOB")
    assert run(g.d.fail(w, job_id, job["lease"], "boom 3", True)) == {"state": "failed"}
    view = g.state(job_id)
    assert view["state"] == "failed"
    assert view["attempts"] == 3
    errors_kept = [h["detail"]["error"] for h in view["history"] if h["event"] == "released"]
    assert errors_kept == ["boom 1", "boom 2", "boom 3"]


def test_fail_without_retry_fails_at_once():
    """FAIL with retry false fails the job even with retries left."""
    g = Grid()
    w = g.worker()
    [job_id] = g.submit(retries=5)
    [job] = w.take("JOB")
    assert run(g.d.fail(w, job_id, job["lease"], "bad input", False)) == {"state": "failed"}
    assert g.state(job_id)["state"] == "failed"


def test_runtime_limit_revokes_lease_and_counts_an_attempt():
    """A job past its run-time limit is revoked and retried, even though its worker beats."""
    g = Grid(backoff_base=1.0)
    w = g.worker()
    [job_id] = g.submit(timeout=10.0, retries=1)
    [job] = w.take("JOB")
    for _ in range(6):
        g.clock.advance(2.0)
        g.d.seen(w)
    assert w.take("REVOKE") == [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]
    with pytest.raises(errors.StaleLease):
        run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    g.clock.advance(1.0)
    g.d.seen(w)
    [again] = w.take("JOB")
    assert again["attempt"] == 2


def test_runtime_limit_passed_while_the_server_was_stalled_waits_one_beat_for_a_done():
    """A run-time limit judged late (the server was stalled) waits one beat: a DONE sent in time is taken."""
    g = Grid(beat=2.0)
    w = g.worker()
    [job_id] = g.submit(timeout=10.0)
    [job] = w.take("JOB")
    g.clock.advance(4.0)  # within the deadline; then the limit's timer runs 4 s late:
    g.d.seen(w)
    g.clock.advance(10.0)
    assert w.take("REVOKE") == []
    g.d.seen(w)
    run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert run(g.store.get_job(job_id))["state"] == "done"


def test_runtime_limit_after_a_stall_still_ends_a_lease_one_beat_later():
    """The extra beat after a stall is one beat: a job that is not done by then is revoked."""
    g = Grid(beat=2.0)
    w = g.worker()
    [job_id] = g.submit(timeout=10.0)
    [job] = w.take("JOB")
    g.clock.advance(4.0)
    g.d.seen(w)
    g.clock.advance(10.0)
    g.d.seen(w)
    g.clock.advance(2.0)
    assert w.take("REVOKE") == [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]


def test_return_gives_back_without_using_an_attempt():
    """A returned job is re-queued at once and its attempt is not counted."""
    g = Grid()
    w1 = g.worker("w1")
    [job_id] = g.submit(retries=0)
    [job] = w1.take("JOB")
    run(g.d.set_slots(w1, 0))
    run(g.d.give_back(w1, job_id, job["lease"], "host busy"))
    w2 = g.worker("w2")
    [again] = w2.take("JOB")
    assert again["attempt"] == 1


def test_cancel_running_job_revokes_its_lease():
    """Cancelling a running job revokes the worker's lease and frees its slot."""
    g = Grid()
    w = g.worker()
    [a, b] = g.submit({}, {})
    [job] = w.take("JOB")
    assert run(g.d.cancel(a)) == {"state": "cancelled"}
    assert w.take("REVOKE") == [{"job": a, "lease": job["lease"], "reason": "cancelled"}]
    assert g.state(a)["state"] == "cancelled"
    assert [j["job"] for j in w.take("JOB")] == [b]
    with pytest.raises(errors.InvalidState):
        run(g.d.resume(a))


def test_paused_job_is_not_dispatched_until_resumed():
    """A paused job stays put; resuming it queues it again."""
    g = Grid()
    [job_id] = g.submit()
    assert run(g.d.pause(job_id)) == {"state": "paused"}
    w = g.worker()
    assert not w.take("JOB")
    assert run(g.d.resume(job_id)) == {"state": "queued"}
    assert [j["job"] for j in w.take("JOB")] == [job_id]


def test_requeue_failed_job_resets_attempts():
    """A failed job can be re-queued by an operator with a fresh attempt budget."""
    g = Grid()
    w = g.worker()
    [job_id] = g.submit(retries=0)
    [job] = w.take("JOB")
    run(g.d.fail(w, job_id, job["lease"], "boom", True))
    assert g.state(job_id)["state"] == "failed"
    assert run(g.d.requeue(job_id)) == {"state": "queued"}
    [again] = w.take("JOB")
    assert again["attempt"] == 1


def test_unknown_job_refused():
    """Job control on an id that does not exist says so."""
    g = Grid()
    for action in (g.d.cancel, g.d.pause, g.d.resume, g.d.requeue, g.d.show):
        with pytest.raises(errors.UnknownJob):
            run(action(999))


def test_drained_worker_gets_no_new_jobs():
    """A drained worker keeps its running job and receives nothing more until undrained."""
    g = Grid()
    w = g.worker(slots=2)
    g.submit()
    [job] = w.take("JOB")
    run(g.d.worker_action("w1", "drain"))
    assert w.take("DRAIN") == [{"drain": True}]
    g.submit()
    assert not w.take("JOB")
    assert g.d.jobs[job["job"]].token == job["lease"]
    run(g.d.worker_action("w1", "undrain"))
    assert len(w.take("JOB")) == 1


def test_global_stop_switch_stops_all_dispatching():
    """With dispatching off no job is pushed; turning it on pushes at once."""
    g = Grid()
    w = g.worker()
    run(g.d.set_dispatching(False))
    g.submit()
    assert not w.take("JOB")
    run(g.d.set_dispatching(True))
    assert len(w.take("JOB")) == 1


def test_disconnect_worker_by_operator_requeues_without_using_an_attempt():
    """An operator's disconnect drops the worker and re-queues its job with its attempt returned."""
    g = Grid()
    w1 = g.worker("w1")
    [job_id] = g.submit(retries=0)
    w1.take("JOB")
    run(g.d.worker_action("w1", "disconnect"))
    assert w1.dropped
    w2 = g.worker("w2")
    assert [j["attempt"] for j in w2.take("JOB")] == [1]
    with pytest.raises(errors.UnknownWorker):
        run(g.d.worker_action("nobody", "drain"))


def test_restart_reattaches_held_lease_and_ends_the_rest():
    """After a restart a worker that comes back within the grace keeps its lease; the others expire."""
    store = MemoryStore(server_id="first-run")
    g = Grid(store)
    w = g.worker("w1", slots=2)
    [a, b] = g.submit({"records": ["x", "y"]}, {"records": ["z"]})
    ja, jb = w.take("JOB")
    run(g.d.result(w, a, ja["lease"], [{"i": 0, "out": 1}]))
    g.d.stop()
    # The server restarts on the same store, as a new server.
    g2 = Grid(store.sibling("second-run"), lease_prefix="R", reattach_grace=4.0, clock=g.clock)
    w_again = g2.worker("w1", slots=2, holding=[{"job": a, "lease": ja["lease"]}])
    assert w_again.hello_reply["kept"] == [{"job": a, "lease": ja["lease"], "todo": [1]}]
    assert not w_again.take("JOB")
    # b was not reattached: once the first run's deadline and the grace have
    # passed, its lease ends and it comes back as a new attempt.
    while g2.clock.seconds() < 1000 + g.d.deadline + g2.d.reattach_grace + g2.d.beat:
        g2.clock.advance(1.0)
        g2.d.seen(w_again)
    [again] = w_again.take("JOB")
    assert (again["job"], again["attempt"]) == (b, 2)
    run(g2.d.done(w_again, a, ja["lease"], [{"i": 1, "out": 2}]))
    assert g2.state(a)["state"] == "done"
    g2.d.stop()


class TwoServers:
    """Dispatchers A and B on one clock and one shared store, syncing every half second."""

    def __init__(self, **kwargs):
        store = MemoryStore(server_id="A")
        self.a = Grid(store, lease_prefix="A", sync_interval=0.5, **kwargs)
        self.b = Grid(store.sibling("B"), lease_prefix="B", sync_interval=0.5, clock=self.a.clock, **kwargs)
        self.clock = self.a.clock

    def advance(self, seconds, *alive):
        """Let time pass in half-second steps while the workers in ``alive`` keep beating."""
        for _ in range(int(seconds / 0.5)):
            self.clock.advance(0.5)
            for grid, conn in alive:
                grid.d.seen(conn)


def test_two_servers_job_submitted_on_one_runs_on_the_others_worker():
    """A job submitted on server A reaches the idle worker of server B at B's next sync."""
    two = TwoServers()
    w = two.b.worker("on-b")
    [job_id] = two.a.submit()
    assert not w.take("JOB")
    two.advance(0.5, (two.b, w))
    [job] = w.take("JOB")
    assert job["job"] == job_id
    assert two.a.state(job_id)["worker"] == "on-b"


def stale_copy_on_b_after_a_lost_its_worker(two: TwoServers, records=4):
    """B holds a copy of a queued job read before A's worker took it, recorded results and was lost.

    Returns (job id, B's idle worker, the JOB A's worker got). B has not
    synced since: its copy has every record pending and no attempt used.
    """
    wb = two.b.worker("wb", slots=0)
    [job_id] = two.a.submit(records=[f"r{i}" for i in range(records)])
    two.advance(0.5, (two.b, wb))  # B's sync reads the job, queued
    assert job_id in two.b.d.jobs and two.b.d.jobs[job_id].attempts == 0
    wa = two.a.worker("wa")
    [job] = wa.take("JOB")
    assert run(two.a.d.result(wa, job_id, job["lease"], [{"i": 0, "out": 0}, {"i": 2, "out": 2}])) == {"accepted": 2}
    two.a.d.connection_lost(wa)  # the worker is lost: the attempt counts, the job is queued again
    assert (two.a.state(job_id)["state"], two.a.state(job_id)["attempts"]) == ("queued", 1)
    assert len(two.b.d.jobs[job_id].pending) == records  # B's copy has not seen any of it
    return job_id, wb, job


def test_two_servers_claim_from_a_stale_copy_carries_only_records_without_a_result():
    """The JOB a server sends from its stale copy of a job holds only the records the store has no result for."""
    two = TwoServers()
    job_id, wb, _ = stale_copy_on_b_after_a_lost_its_worker(two)
    run(two.b.d.set_slots(wb, 1))  # B hands its copy out before its next sync
    [job] = wb.take("JOB")
    assert job["job"] == job_id and [r["i"] for r in job["records"]] == [1, 3]
    run(two.b.d.done(wb, job_id, job["lease"], [{"i": 1, "out": 1}, {"i": 3, "out": 3}]))
    assert [r["i"] for r in run(two.a.store.get_results(job_id))] == [0, 1, 2, 3]


def test_two_servers_claim_from_a_stale_copy_counts_the_attempts_the_store_counted():
    """An attempt used on one server counts on the other: the retry budget is the store's, whoever grants."""
    two = TwoServers()
    job_id, wb, first = stale_copy_on_b_after_a_lost_its_worker(two)
    run(two.b.d.set_slots(wb, 1))
    [job] = wb.take("JOB")
    assert (first["attempt"], job["attempt"]) == (1, 2)
    assert two.b.d.jobs[job_id].attempts == 2
    history = [(e["event"], e.get("attempt")) for e in two.a.state(job_id)["history"] if e["event"] == "leased"]
    assert history == [("leased", 1), ("leased", 2)]


def test_two_servers_claim_from_a_stale_copy_waits_out_the_retry_backoff_set_elsewhere():
    """A job another server put in its retry backoff is not granted from a copy that predates it."""
    two = TwoServers(backoff_base=10.0)
    wb = two.b.worker("wb", slots=0)
    [job_id] = two.a.submit()
    two.advance(0.5, (two.b, wb))
    wa = two.a.worker("wa")
    [job] = wa.take("JOB")
    assert run(two.a.d.fail(wa, job_id, job["lease"], "boom", True)) == {"state": "queued", "retry_in": 10.0}
    run(two.b.d.set_slots(wb, 1))  # B's copy says queued, now: the store says not before 10 s
    assert wb.take("JOB") == [] and two.a.state(job_id)["attempts"] == 1
    two.advance(9.0, (two.b, wb), (two.a, wa))
    assert wb.take("JOB") == [] and wa.take("JOB") == []
    two.advance(1.5, (two.b, wb), (two.a, wa))
    [again] = wb.take("JOB") + wa.take("JOB")
    assert (again["job"], again["attempt"]) == (job_id, 2)


def test_store_outage_while_ending_leases_is_one_warning_with_its_cause_and_no_traceback():
    """Ends of leases the store cannot record are retried under one warning naming the cause, then its end."""
    from twisted.logger import globalLogPublisher

    store = ControlledStore()
    g = Grid(store, backoff_base=1.0)
    workers = [g.worker(f"w{i}") for i in range(3)]
    ids = g.submit(*[{} for _ in workers])
    for w in workers:
        w.take("JOB")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        store.fail("release", errors.Unavailable("the database is restarting"))
        for w in workers:
            g.d.connection_lost(w)
        for _ in range(30):  # 30 s of outage: each end is tried again every second
            g.clock.advance(1.0)
        assert sum(c.name == "release" for c in store.calls) >= 3 * 30
        store.clear("release")
        g.clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [(e["log_level"].name, formatEvent(e)) for e in events if "recording the end of leases" in formatEvent(e)]
    assert [level for level, _ in said] == ["warn", "info"], said
    assert "the database is restarting" in said[0][1] and "works again" in said[1][1]
    assert not [e for e in events if e.get("log_failure") is not None or e.get("isError")]
    assert [(g.state(i)["state"], g.state(i)["attempts"]) for i in ids] == [("queued", 1)] * 3


def test_two_servers_each_job_is_leased_once():
    """With workers on both servers, every job is granted exactly once across them."""
    two = TwoServers()
    wa, wb = two.a.worker("wa", slots=3), two.b.worker("wb", slots=3)
    ids = two.a.submit(*[{} for _ in range(4)]) + two.b.submit(*[{} for _ in range(4)])
    two.advance(1.0, (two.a, wa), (two.b, wb))
    got = [j["job"] for j in wa.take("JOB")] + [j["job"] for j in wb.take("JOB")]
    assert sorted(got) == sorted(set(got))
    assert len(got) == 6
    assert set(got) <= set(ids)


def test_worker_fails_over_and_its_lease_is_taken_over():
    """A worker whose server went away reattaches its lease on the other server and finishes there."""
    two = TwoServers()
    w = two.a.worker("w1")
    [job_id] = two.a.submit(records=["x", "y"])
    [job] = w.take("JOB")
    run(two.a.d.result(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    two.a.d.stop()  # A dies
    moved = two.b.worker("w1", holding=[{"job": job_id, "lease": job["lease"]}])
    assert moved.hello_reply["kept"] == [{"job": job_id, "lease": job["lease"], "todo": [1]}]
    run(two.b.d.done(moved, job_id, job["lease"], [{"i": 1, "out": 2}]))
    view = two.b.state(job_id)
    assert (view["state"], view["accepted"]) == ("done", 2)
    assert [h["event"] for h in view["history"]].count("reattached") == 1


def test_gone_servers_leases_end_on_the_survivor():
    """Leases of a server that stopped beating end after its deadline and the grace; the survivor runs the job."""
    two = TwoServers(reattach_grace=2.0)
    wa = two.a.worker("wa")
    [job_id] = two.a.submit()
    [job] = wa.take("JOB")
    two.a.d.stop()  # A dies with the lease; its worker never comes back
    wb = two.b.worker("wb")
    two.advance(two.a.d.deadline + 2.0 + two.b.d.beat + 0.5, (two.b, wb))
    [again] = wb.take("JOB")
    assert (again["job"], again["attempt"]) == (job_id, 2)
    released = [h for h in two.b.state(job_id)["history"] if h["event"] == "released"]
    assert released[-1]["detail"]["reason"] == "server lost"


def test_operator_on_one_server_cancels_a_job_running_on_the_other():
    """Cancelling on B a job A's worker runs ends it in the store; A revokes its worker's lease at its sync."""
    two = TwoServers()
    wa = two.a.worker("wa")
    [job_id] = two.a.submit()
    [job] = wa.take("JOB")
    assert run(two.b.d.cancel(job_id)) == {"state": "cancelled"}
    two.advance(0.5, (two.a, wa))
    assert wa.take("REVOKE") == [{"job": job_id, "lease": job["lease"], "reason": "cancelled"}]
    assert not two.a.d.workers["wa"].leases
    with pytest.raises(errors.StaleLease):
        run(two.a.d.done(wa, job_id, job["lease"], [{"i": 0, "out": 1}]))


def test_watch_on_one_server_follows_a_job_the_other_runs():
    """A client watching on B is told of progress made by A's worker."""
    two = TwoServers()
    watcher = FakeConnection()
    wa = two.a.worker("wa")
    [job_id] = two.a.submit(records=[1, 2])
    [job] = wa.take("JOB")
    run(two.b.d.watch(watcher, [job_id]))
    run(two.a.d.result(wa, job_id, job["lease"], [{"i": 0, "out": 1}]))
    two.advance(0.5, (two.a, wa))
    run(two.a.d.done(wa, job_id, job["lease"], [{"i": 1, "out": 1}]))
    two.advance(0.5, (two.a, wa))
    events = [(e["state"], e["accepted"]) for e in watcher.take("EVENT")]
    assert events == [("running", 1), ("done", 2)]


def test_orphaned_lease_in_the_store_is_requeued():
    """A lease the store says is this server's but no worker holds (a grant whose outcome was lost) is re-queued."""
    g = Grid(MemoryStore(server_id="A"), sync_interval=0.5)
    run(g.d.set_dispatching(False))
    [job_id] = g.submit()
    run(g.store.grant(job_id, "ghost", "w-never", g.clock.seconds()))
    w = g.worker()
    run(g.d.set_dispatching(True))
    g.clock.advance(0.5)
    g.d.seen(w)
    assert not w.take("JOB"), "re-queued after a single look"
    g.clock.advance(0.5)
    g.d.seen(w)
    [job] = w.take("JOB")
    assert job["job"] == job_id


def test_reconnect_with_lost_lease_is_told_why():
    """A worker reconnecting with a lease that ended meanwhile gets it in ``lost`` with a reason."""
    g = Grid()
    w1 = g.worker("w1")
    [job_id] = g.submit()
    [job] = w1.take("JOB")
    g.clock.advance(g.d.deadline)  # suspended: misses its beats
    assert w1.dropped
    g.d.connection_lost(w1)
    back = g.worker("w1", holding=[{"job": job_id, "lease": job["lease"]}])
    assert back.hello_reply["lost"] == [{"job": job_id, "lease": job["lease"], "reason": "expired"}]
    assert back.hello_reply["kept"] == []


def test_second_connection_with_live_name_refused():
    """If the old connection of a worker name answers a ping, the newcomer is refused."""
    g = Grid()
    old = g.worker("w1")
    old.answers_ping = True
    with pytest.raises(errors.NameInUse):
        g.worker("w1")
    assert old.dropped is None


def test_second_connection_supersedes_dead_one_and_takes_its_lease():
    """If the old connection does not answer, it is dropped and its held lease moves to the new one."""
    g = Grid()
    old = g.worker("w1")
    [job_id] = g.submit()
    [job] = old.take("JOB")
    new = g.worker("w1", holding=[{"job": job_id, "lease": job["lease"]}])
    assert old.dropped
    assert new.hello_reply["kept"] == [{"job": job_id, "lease": job["lease"], "todo": [0]}]
    run(g.d.done(new, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert g.state(job_id)["state"] == "done"


def test_watch_pushes_events_on_change():
    """A watcher is told of state and progress changes of its jobs, and of no other."""
    g = Grid()
    watcher = FakeConnection()
    [a, b] = g.submit({"records": [1, 2]}, {})
    reply = run(g.d.watch(watcher, [a]))
    assert reply["jobs"] == [{"job": a, "state": "queued", "accepted": 0, "total": 2}]
    w = g.worker(slots=2)
    ja = next(j for j in w.take("JOB") if j["job"] == a)
    run(g.d.result(w, a, ja["lease"], [{"i": 0, "out": 1}]))
    run(g.d.done(w, a, ja["lease"], [{"i": 1, "out": 1}]))
    events = watcher.take("EVENT")
    assert {e["job"] for e in events} == {a}
    assert [(e["state"], e["accepted"]) for e in events] == [("running", 0), ("running", 1), ("done", 2)]


def test_job_claimed_elsewhere_is_dropped_and_the_slot_reused():
    """A job another server claimed in the shared store first is not sent; the slot takes the next job."""
    g = Grid()
    run(g.d.set_dispatching(False))
    [taken, free] = g.submit({}, {})
    run(g.store.grant(taken, "X1", "other-server-worker", g.clock.seconds()))
    w = g.worker()
    run(g.d.set_dispatching(True))
    assert [j["job"] for j in w.take("JOB")] == [free]
    assert taken not in g.d.jobs
    assert g.state(taken)["lease"] == "X1"


def test_superseding_connection_naming_a_lease_with_the_wrong_job_does_not_strand_it():
    """A lease is handed over only with its own job id; a mismatched claim ends it like any other."""
    g = Grid()
    old = g.worker("w1")
    [job_id] = g.submit()
    [job] = old.take("JOB")
    new = g.worker("w1", holding=[{"job": 99, "lease": job["lease"]}])
    assert new.hello_reply["kept"] == []
    [again] = new.take("JOB")
    assert (again["job"], again["attempt"]) == (job_id, 2)


def test_submit_refuses_a_job_whose_job_line_would_not_fit():
    """A job whose JOB push would exceed the line limit is refused whole, before anything is stored."""
    g = Grid()
    check = Session(None, g.d, None, max_line=65_536).check_fits
    with pytest.raises(errors.TooLarge) as e:
        run(g.d.submit([{"type": "noop", "records": ["a"]}, {"type": "noop", "records": ["x" * 100] * 700}], check=check))
    assert e.value.extra == {"job": 1, "max_line": 65_536}
    assert run(g.store.counts())["queued"] == 0
    assert run(g.d.submit([{"type": "noop", "records": ["x" * 100] * 500}], check=check))["jobs"]


def test_credential_revoked_through_another_server_is_acted_on_at_the_next_sync():
    """A sync finds credentials revoked elsewhere and reports each once, so their connections close here."""
    two = TwoServers()
    closed = []
    two.a.d.on_credential_revoked = closed.append
    run(two.b.store.add_credential("desk-7", "worker", "0" * 64, two.clock.seconds()))
    run(two.b.store.add_credential("old-cron", "submitter", "1" * 64, two.clock.seconds()))
    two.advance(0.5)
    assert closed == []
    run(two.b.store.revoke_credential("desk-7", two.clock.seconds()))
    two.advance(1.0)
    assert closed == ["desk-7"]


def test_runtime_limit_counts_from_the_grant_across_a_reconnect():
    """A worker that reconnects and keeps its lease gets no extra time: the limit counts from the grant."""
    g = Grid()
    old = g.worker("w1")
    [job_id] = g.submit(timeout=10.0)
    [job] = old.take("JOB")
    for _ in range(3):
        g.clock.advance(2.0)
        g.d.seen(old)
    new = g.worker("w1", holding=[{"job": job_id, "lease": job["lease"]}])
    assert new.hello_reply["kept"] == [{"job": job_id, "lease": job["lease"], "todo": [0]}]
    g.clock.advance(3.9)
    g.d.seen(new)
    assert not new.take("REVOKE")
    g.clock.advance(0.2)  # 10.1 s after the grant, 4.1 s after the reattach
    assert new.take("REVOKE") == [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]


def test_runtime_limit_counts_from_the_grant_across_a_server_restart():
    """A lease reattached on a restarted server times out at its original limit, not a fresh one."""
    store = MemoryStore(server_id="first-run")
    g = Grid(store)
    w = g.worker("w1")
    [job_id] = g.submit(timeout=10.0)
    [job] = w.take("JOB")
    for _ in range(7):
        g.clock.advance(1.0)
        g.d.seen(w)
    g.d.stop()
    g2 = Grid(store.sibling("second-run"), clock=g.clock)
    back = g2.worker("w1", holding=[{"job": job_id, "lease": job["lease"]}])
    assert back.hello_reply["kept"] == [{"job": job_id, "lease": job["lease"], "todo": [0]}]
    g2.clock.advance(2.9)
    g2.d.seen(back)
    assert not back.take("REVOKE")
    g2.clock.advance(0.2)
    assert back.take("REVOKE") == [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]
    g2.d.stop()


def test_reattached_lease_past_its_limit_is_lost_with_reason_timeout():
    """A lease whose run-time limit passed while no connection held it is reported lost (timeout) at the reattach."""
    store = MemoryStore(server_id="first-run")
    g = Grid(store)
    w = g.worker("w1")
    [job_id] = g.submit(timeout=5.0, retries=1)
    [job] = w.take("JOB")
    g.d.stop()
    g.clock.advance(6.0)
    # Leases of its own (a token is granted once; real ones are random).
    g2 = Grid(store.sibling("second-run"), lease_prefix="R", clock=g.clock, backoff_base=1.0)
    back = g2.worker("w1", holding=[{"job": job_id, "lease": job["lease"]}])
    assert back.hello_reply == {"kept": [], "lost": [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]}
    assert not back.take("REVOKE")
    released = [h for h in g2.state(job_id)["history"] if h["event"] == "released"]
    assert released[-1]["detail"]["reason"] == "timeout"
    g2.clock.advance(1.0)  # the failed attempt's backoff
    g2.d.seen(back)
    [again] = back.take("JOB")
    assert (again["job"], again["attempt"]) == (job_id, 2)
    g2.d.stop()


def test_connection_lost_while_stopping_leaves_leases_for_reattaching():
    """Connections closed by a shutdown end no lease: the jobs stay the workers' to reattach after a restart."""
    g = Grid()
    w = g.worker("w1")
    [job_id] = g.submit(retries=0)
    [job] = w.take("JOB")
    g.d.stop()
    g.d.connection_lost(w)
    g.clock.advance(60.0)
    view = g.state(job_id)
    assert (view["state"], view["lease"], view["attempts"]) == ("running", job["lease"], 1)
    assert "released" not in [h["event"] for h in view["history"]]
    assert len(g.d.workers) == 0


def test_store_outage_does_not_expire_live_servers_leases():
    """After an outage that outlasted every deadline, a server back first waits for the others to beat again."""
    two = TwoServers(reattach_grace=2.0)
    wa = two.a.worker("wa")
    [job_id] = two.a.submit()
    [job] = wa.take("JOB")
    run(two.a.store.stop())
    run(two.b.store.stop())
    two.advance(30.0, (two.a, wa))  # far past A's deadline and the grace: its beat in the store is stale
    run(two.b.store.start())  # B reaches the database first ...
    two.advance(3.0, (two.a, wa))
    run(two.a.store.start())  # ... A a moment later
    two.advance(10.0, (two.a, wa))
    view = two.a.state(job_id)
    assert (view["state"], view["lease"], view["worker"]) == ("running", job["lease"], "wa")
    assert "released" not in [h["event"] for h in view["history"]]
    assert not wa.take("REVOKE")
    run(two.a.d.done(wa, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert two.a.state(job_id)["state"] == "done"
    two.a.d.stop()
    two.b.d.stop()


def test_store_outage_a_server_that_stays_gone_still_has_its_leases_ended():
    """After an outage, a server that never beats again has its leases ended once the waiting is over."""
    two = TwoServers(reattach_grace=2.0)
    wa = two.a.worker("wa")
    [job_id] = two.a.submit()
    wa.take("JOB")
    two.a.d.stop()  # A dies during the outage
    run(two.b.store.stop())
    two.advance(30.0)
    run(two.b.store.start())
    wb = two.b.worker("wb")
    two.advance(two.b.d.beat, (two.b, wb))
    assert not wb.take("JOB")  # B waits for A to beat again ...
    two.advance(two.b.d.deadline + two.b.d.beat + 0.5, (two.b, wb))
    [again] = wb.take("JOB")  # ... and A never does
    assert (again["job"], again["attempt"]) == (job_id, 2)
    two.b.d.stop()


def test_runtime_limit_of_a_job_type_applies_to_its_jobs_that_name_none():
    """A type's run-time limit covers its jobs without a timeout of their own; others keep the default or theirs."""
    g = Grid(type_timeouts={"noop": 5.0}, default_timeout=100.0)
    w = g.worker(slots=3, types={"noop": "1.0", "sleep": "1.0"})
    [typed, own] = g.submit({"type": "noop"}, {"type": "noop", "timeout": 50.0})
    [other] = g.submit(type="sleep")
    jobs = {j["job"]: j for j in w.take("JOB")}
    assert {i: j["timeout"] for i, j in jobs.items()} == {typed: 5.0, own: 50.0, other: 100.0}
    for _ in range(6):
        g.clock.advance(1.0)
        g.d.seen(w)
    assert [r["job"] for r in w.take("REVOKE")] == [typed]


def test_store_outage_holds_dispatching_says_why_once_and_resumes_by_itself():
    """While the store cannot record leases no job is sent (one warning says why); once it can, work flows again."""
    from twisted.logger import globalLogPublisher

    g = Grid(backoff_base=1.0)
    ids = g.submit(*[{} for _ in range(3)])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        run(g.store.stop())
        w = g.worker(slots=2)
        for _ in range(5):
            g.clock.advance(1.0)
            g.d.seen(w)
        assert not w.take("JOB")
        run(g.store.start())
        g.clock.advance(1.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    pushed = [j["job"] for j in w.take("JOB")]
    assert len(pushed) == 2 and set(pushed) <= set(ids)
    said = [e.get("log_format", "") for e in events]
    assert sum("dispatching held" in f for f in said) == 1
    assert sum("dispatching again" in f for f in said) == 1
    assert {g.state(i)["attempts"] for i in pushed} == {1}


def thaw(store: ControlledStore):
    """The hung beats go through, with the times they were made at."""
    store.clear("beat")
    store.answer_all("beat")


def test_store_that_hangs_then_answers_does_not_expire_live_servers_leases():
    """A beat that hung past every deadline and then went through counts as an outage: the others get time to beat."""
    store = ControlledStore(server_id="A")
    a = Grid(store, lease_prefix="A", sync_interval=0.5, reattach_grace=2.0)
    b = Grid(store.sibling("B"), lease_prefix="B", sync_interval=0.5, reattach_grace=2.0, clock=a.clock)
    wa = a.worker("wa")
    [job_id] = a.submit()
    [job] = wa.take("JOB")
    a.store.hold("beat", work=False)  # a database that froze, then went on
    b.store.hold("beat", work=False)
    for _ in range(60):  # 30 s frozen: both servers' last stored beats are stale
        a.clock.advance(0.5)
        a.d.seen(wa)
    thaw(b.store)  # B's hung beat goes through first ...
    for _ in range(6):
        a.clock.advance(0.5)
        a.d.seen(wa)
    thaw(a.store)  # ... A's a moment later
    for _ in range(20):
        a.clock.advance(0.5)
        a.d.seen(wa)
    view = a.state(job_id)
    assert (view["state"], view["lease"], view["worker"]) == ("running", job["lease"], "wa")
    assert "released" not in [h["event"] for h in view["history"]]
    a.d.stop()
    b.d.stop()


def test_two_newcomers_racing_for_a_dead_name_one_wins_the_other_is_refused():
    """Two HELLOs that both pinged the same dead connection: the first takes the name, the second gets name_in_use."""
    g = Grid()
    old = g.worker("w1")
    pings = []
    old.ping = lambda timeout: pings.append(defer.Deferred()) or pings[-1]
    first, second = FakeConnection("10.0.0.2:1"), FakeConnection("10.0.0.3:1")
    hello = {"name": "w1", "slots": 1, "types": {"noop": "1.0"}}
    d1 = defer.ensureDeferred(g.d.worker_hello(first, dict(hello)))
    d2 = defer.ensureDeferred(g.d.worker_hello(second, dict(hello)))
    assert len(pings) == 2
    pings[0].callback(False)  # the old connection is dead: the first newcomer takes the name
    assert d1.called and g.d.workers["w1"].conn is first and old.dropped
    pings[1].callback(False)
    failures = []
    d2.addErrback(failures.append)
    assert failures and failures[0].check(errors.NameInUse)
    assert g.d.workers["w1"].conn is first and first.dropped is None


def test_store_outage_is_logged_once_then_every_minute_then_its_end():
    """A long store outage says so once, then once a minute with a count, and once when it is over."""
    from twisted.logger import globalLogPublisher

    two = TwoServers()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        run(two.a.store.stop())
        two.advance(150.0)  # 75 beats, 300 syncs
        run(two.a.store.start())
        two.advance(2.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    # (which loop, what was said): "{what} failed ...", "{what} still failing ...", "{what} works again ..."
    lines = [(e["what"].split()[0], e["log_format"].split(" ")[1]) for e in events if "what" in e]
    assert lines.count(("housekeeping", "failed")) == 1 and lines.count(("sync", "failed")) == 1
    assert lines.count(("housekeeping", "still")) == 2 and lines.count(("sync", "still")) == 2
    assert lines.count(("housekeeping", "works")) == 1 and lines.count(("sync", "works")) == 1
    two.a.d.stop()
    two.b.d.stop()


def test_two_servers_jobs_run_elsewhere_leave_the_submitting_servers_memory():
    """A server that only takes submissions forgets, at its next sync, the jobs another server's workers took."""
    two = TwoServers()
    ids = two.a.submit(*[{} for _ in range(5)])  # A has no worker at all
    wb = two.b.worker("wb", slots=5)
    two.advance(0.5, (two.b, wb))
    assert sorted(j["job"] for j in wb.take("JOB")) == ids
    two.advance(0.5, (two.b, wb))
    assert two.a.d.jobs == {} and run(two.a.d.stats())["queued_runnable"] == 0


def test_two_servers_sync_judges_only_jobs_within_the_head_it_read():
    """With a long shared queue, a job beyond the head a sync read is kept; one within it that left is forgotten."""
    two = TwoServers()
    two.a.d.sync_batch = 3
    [low] = two.a.submit({"priority": 0})
    high = two.a.submit(*[{"priority": 5} for _ in range(4)])
    wb = two.b.worker("wb", slots=1)
    two.advance(0.5, (two.b, wb))
    [taken] = [j["job"] for j in wb.take("JOB")]
    assert taken == high[0]
    two.advance(0.5, (two.b, wb))
    # A read the head [high[1], high[2], high[3]]: high[0] sorts before it and left; low is beyond it.
    assert sorted(two.a.d.jobs) == sorted([low, *high[1:]])


def test_run_queue_drops_the_ids_of_jobs_that_left_it():
    """Jobs that leave the queue without being popped (cancelled, taken elsewhere) do not pile up in its heaps."""
    g = Grid()
    ids = g.submit(*[{"priority": i % 3} for i in range(1500)])
    for job_id in ids[:1200]:
        run(g.d.cancel(job_id))
    assert sum(len(heap) for heap in g.d.queue._heaps.values()) < 1500 - 1000
    w = g.worker(slots=300)
    expected = sorted(ids[1200:], key=lambda i: (-((i - ids[0]) % 3), i))
    assert [j["job"] for j in w.take("JOB")] == expected


def test_sync_keeps_a_job_that_left_and_reentered_the_queue_during_its_read():
    """A job granted and given back while a sync's read was out is not judged by that read: it stays queued here."""
    store = ControlledStore(server_id="A")
    g = Grid(store, sync_interval=0.5)
    [job_id] = g.submit()
    store.hold("runnable", work=False)
    g.clock.advance(0.5)  # a sync starts its read; the job is runnable here
    w = g.worker("wa")
    [job] = w.take("JOB")
    [read] = store.held
    read.work()  # the read's snapshot sees the job running
    run(g.d.set_slots(w, 0))
    run(g.d.give_back(w, job_id, job["lease"], "host busy"))  # queued again, before the read returns
    store.clear("runnable")
    store.answer("runnable")
    assert job_id in g.d.jobs and run(g.d.stats())["queued_runnable"] == 1
    run(g.d.set_slots(w, 1))
    assert w.take("JOB") == []  # kept from the worker that gave it back, for the return delay
    other = g.worker("wb")
    assert [j["job"] for j in other.take("JOB")] == [job_id]
    g.d.stop()


def test_results_committed_though_reported_lost_do_not_fail_the_job():
    """A RESULT committed though answered ``commit_unknown``: sent again it is OK, counted once; DONE goes through."""
    g = Grid(store=ControlledStore())
    w = g.worker()
    [job_id] = g.submit(records=["a", "b", "c"])
    [job] = w.take("JOB")
    g.store.lose("add_results")
    with pytest.raises(errors.CommitUnknown):
        run(g.d.result(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert g.state(job_id)["accepted"] == 1  # it did commit
    # The worker sends it again after a while, with a new one: the repeat is taken as the same write.
    assert run(g.d.result(w, job_id, job["lease"], [{"i": 0, "out": 1}, {"i": 1, "out": 1}])) == {"accepted": 2}
    # Sent with another value, it is a duplicate.
    with pytest.raises(errors.DuplicateResult):
        run(g.d.result(w, job_id, job["lease"], [{"i": 2, "out": 1}, {"i": 1, "out": 2}]))
    run(g.d.done(w, job_id, job["lease"], [{"i": 2, "out": 1}]))
    view = g.state(job_id)
    assert (view["state"], view["accepted"], view["attempts"]) == ("done", 3, 1)
    assert [r["i"] for r in run(g.store.get_results(job_id))] == [0, 1, 2]


@pytest.mark.parametrize("verb", ["FAIL", "RETURN"])
def test_fail_or_return_committed_though_reported_lost_answered_as_made_when_sent_again(verb):
    """A FAIL or RETURN answered ``commit_unknown`` that was made: sent again it is answered as the first time."""
    g = Grid(ControlledStore(), backoff_base=1.0)
    w = g.worker()
    [job_id] = g.submit()
    [job] = w.take("JOB")

    def send():
        if verb == "FAIL":
            return run(g.d.fail(w, job_id, job["lease"], "boom", True))
        return run(g.d.give_back(w, job_id, job["lease"], "host busy"))

    g.store.lose("release")
    with pytest.raises(errors.CommitUnknown):
        send()
    made = g.state(job_id)
    assert (made["state"], made["lease"]) == ("queued", None)  # it was made
    assert send() == ({"state": "queued", "retry_in": 1.0} if verb == "FAIL" else {})
    released = [e for e in g.state(job_id)["history"] if e["event"] == "released"]
    assert released == made["history"][-1:]  # not released a second time
    # FAIL: back after its backoff; RETURN: kept from the worker that gave it back for the return delay.
    wait = 1.0 if verb == "FAIL" else g.d.return_delay
    for _ in range(round(wait / 0.5)):
        assert w.take("JOB") == []
        g.clock.advance(0.5)
        g.d.seen(w)
    [again] = w.take("JOB")
    assert (again["job"], again["attempt"]) == (job_id, 2 if verb == "FAIL" else 1)


def test_grant_committed_though_reported_lost_is_made_again_and_the_job_sent_at_its_first_attempt():
    """A grant answered ``commit_unknown`` that did commit: the same grant again says so, and the JOB goes out once."""
    g = Grid(ControlledStore(server_id="A"), sync_interval=0.5, backoff_base=1.0)
    g.store.lose("grant")
    [job_id] = g.submit()
    w = g.worker()  # the grant commits, and is reported lost: no JOB yet
    assert not w.take("JOB")
    g.clock.advance(1.0)  # the grant is made again under the same lease
    [job] = w.take("JOB")
    assert (job["job"], job["lease"], job["attempt"]) == (job_id, "L1", 1)
    for _ in range(4):  # no sync takes the lease for an orphan
        g.clock.advance(0.5)
        g.d.seen(w)
    assert w.take("JOB") == [] and w.take("REVOKE") == []
    history = g.state(job_id)["history"]
    assert [e["event"] for e in history] == ["submitted", "leased"]
    run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert (g.state(job_id)["state"], g.state(job_id)["attempts"]) == ("done", 1)


def test_resume_committed_though_reported_lost_runs_the_job_after_the_next_sync():
    """A RESUME answered ``commit_unknown`` that was made: the paused copy here is dropped, the sync brings the job."""
    g = Grid(ControlledStore(server_id="A"), sync_interval=0.5)
    [job_id] = g.submit()
    assert run(g.d.pause(job_id)) == {"state": "paused"}
    g.store.lose("set_state")
    with pytest.raises(errors.CommitUnknown):
        run(g.d.resume(job_id))
    assert g.state(job_id)["state"] == "queued"  # it was made
    w = g.worker()
    g.clock.advance(0.5)
    [job] = w.take("JOB")
    assert (job["job"], job["attempt"]) == (job_id, 1)


def test_grant_reported_lost_that_was_not_made_is_made_by_the_next_try():
    """A grant answered ``commit_unknown`` that did not commit: the same grant again makes it, at attempt 1."""
    g = Grid(ControlledStore(server_id="A"), sync_interval=0.5, backoff_base=1.0)
    g.store.fail("grant", errors.CommitUnknown(), times=1)
    [job_id] = g.submit()
    w = g.worker()
    assert not w.take("JOB") and g.state(job_id)["state"] == "queued"
    g.clock.advance(1.0)
    [job] = w.take("JOB")
    assert (job["job"], job["lease"], job["attempt"]) == (job_id, "L1", 1)
    assert g.state(job_id)["attempts"] == 1


def done_made_but_answered_commit_unknown(g):
    """A watched one-record job whose DONE commits and is answered ``commit_unknown``: (watcher, worker, id, JOB)."""
    client = FakeConnection()
    w = g.worker()
    [job_id] = g.submit()
    [job] = w.take("JOB")
    run(g.d.watch(client, [job_id]))
    client.take("EVENT")
    g.store.lose("complete")
    with pytest.raises(errors.CommitUnknown):
        run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    return client, w, job_id, job


def test_done_committed_though_reported_lost_is_answered_ok_when_sent_again():
    """A DONE answered ``commit_unknown`` that was made: sent again it is OK, and watchers hear the job is done."""
    g = Grid(ControlledStore())
    client, w, job_id, job = done_made_but_answered_commit_unknown(g)
    assert g.state(job_id)["state"] == "done"  # it was made
    assert run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}])) == {}
    assert [e["state"] for e in client.take("EVENT")] == ["done"]
    assert w.take("JOB") == [] and job_id not in g.d.jobs


def test_done_after_commit_unknown_of_a_lease_that_did_not_complete_the_job_stays_stale():
    """Sent again, a DONE answered ``commit_unknown`` that was not made, on a lease ended since, is still stale."""
    g = Grid(ControlledStore(server_id="A"))
    w = g.worker()
    [job_id] = g.submit()
    [job] = w.take("JOB")
    g.store.fail("complete", errors.CommitUnknown(), times=1)
    with pytest.raises(errors.CommitUnknown):
        run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    # The store ends the lease behind this server's back (an operator on another server).
    run(g.store.end_lease(job_id, job["lease"], "queued", g.clock.seconds(), reason="requeued"))
    with pytest.raises(errors.StaleLease):
        run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}]))
    assert g.state(job_id)["state"] == "queued"


def test_done_reported_lost_that_was_made_is_left_in_doubt_by_the_sync_and_its_resend_answered_ok():
    """With a shared store the sync leaves a lease in doubt to its resend: no REVOKE; the resend is OK, watchers hear done once."""
    g = Grid(ControlledStore(server_id="A"), sync_interval=0.5)
    client, w, job_id, job = done_made_but_answered_commit_unknown(g)
    g.clock.advance(1.0)  # two syncs, before the worker's retry (1 s later)
    g.d.seen(w)
    assert w.take("REVOKE") == []
    assert run(g.d.done(w, job_id, job["lease"], [{"i": 0, "out": 1}])) == {}
    assert [(e["state"], e["accepted"]) for e in client.take("EVENT")] == [("done", 1)]
    g.clock.advance(1.0)
    assert client.take("EVENT") == []
    assert (g.state(job_id)["state"], g.state(job_id)["attempts"]) == ("done", 1)
