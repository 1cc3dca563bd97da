"""The manhole's operator object and the dispatcher's figures behind it, on a task.Clock and the memory store."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from gridd import errors
from gridd.scheduler import Dispatcher, RateCounter
from gridd.server.actions import WireActions
from gridd.server.operator import Operator
from gridd.store.memory import MemoryStore


class FakeConnection(WireActions):
    """A worker's connection as the scheduler sees it, recording what it is sent as the wire would carry it."""

    def __init__(self, address="10.0.0.7:4242"):
        self.address = address
        self.sent: list[tuple[str, dict]] = []
        self.dropped = None

    def send(self, verb, body=None):
        self.sent.append((verb, body or {}))

    def drop(self, reason):
        self.dropped = reason

    def ping(self, timeout):
        return defer.succeed(False)

    def take(self, verb):
        found = [b for v, b in self.sent if v == verb]
        self.sent = [(v, b) for v, b in self.sent if v != verb]
        return found


@dataclass(frozen=True)
class Who:
    user: str = "alice"
    fingerprint: str = "SHA256:abc"
    address: str = "127.0.0.1:5000"


def run(d):
    """The result of a Deferred or coroutine that completes at once (memory store), or raise its failure."""
    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    out = []
    d.addBoth(out.append)
    assert out, "did not complete synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class Console:
    """A dispatcher on a clock and the memory store, with an Operator on it."""

    def __init__(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.store = MemoryStore()
        counter = itertools.count(1)
        self.dispatcher = Dispatcher(self.store, self.clock, beat=2.0, new_lease=lambda: f"L{next(counter)}")
        run(self.store.start())
        run(self.dispatcher.start())
        self.grid = Operator(self.dispatcher, self.store, clock=self.clock, who=Who())

    def worker(self, name="w1", slots=1, types=None):
        conn = FakeConnection()
        hello = {"name": name, "slots": slots, "types": types or {"noop": "1.0", "sleep": "2.1"}, "agent": "test/1"}
        run(self.dispatcher.worker_hello(conn, hello))
        self.clock.advance(0)  # work is pushed one turn after the HELLO
        return conn

    def submit(self, *specs):
        return run(self.dispatcher.submit([{"type": "noop", "records": ["a"], **s} for s in specs]))["jobs"]

    def finish(self, conn, job):
        results = [{"i": r["i"], "out": r["data"]} for r in job["records"]]
        run(self.dispatcher.done(conn, job["job"], job["lease"], results))


def test_rate_counter_sums_recent_slots_only():
    """Counts fall in clock slots; a window sums the slots that began within it, and old slots are dropped."""
    clock = task.Clock()
    rates = RateCounter(clock, slot=10, keep=900)
    rates.add("done")
    clock.advance(30)
    rates.add("done", 5)
    clock.advance(100)  # t = 130
    rates.add("done", 2)
    rates.add("failed")
    clock.advance(5)  # t = 135: the last minute's slots began at 80..130
    assert rates.total("done", 60) == 2
    assert rates.total("done", 300) == 8
    assert rates.total("failed", 60) == 1
    assert rates.total("submitted", 60) == 0
    clock.advance(2000)
    rates.add("done")
    assert rates.total("done", 900) == 1
    assert len(rates._slots) == 1


def test_queue_depth_counts_queued_jobs_by_type_and_priority():
    """Queued jobs, runnable or backing off, are counted by (type, priority), highest priority first."""
    c = Console()
    ids = c.submit({}, {}, {"priority": 5}, {"type": "sleep", "priority": 5}, {"type": "sleep"})
    run(c.dispatcher.pause(ids[0]))
    assert c.dispatcher.queue_depth() == {("noop", 5): 1, ("sleep", 5): 1, ("noop", 0): 1, ("sleep", 0): 1}
    assert list(c.dispatcher.queue_depth()) == [("noop", 5), ("sleep", 5), ("noop", 0), ("sleep", 0)]
    w = c.worker(types={"sleep": "2.1"})
    [job] = w.take("JOB")
    assert job["job"] == ids[3]
    run(c.dispatcher.fail(w, job["job"], job["lease"], "boom", True))  # back to the queue, in backoff
    assert c.dispatcher.jobs[ids[3]].not_before is not None
    # The sleep job of priority 0 now runs in the freed slot; the one backing off still counts.
    assert c.dispatcher.queue_depth() == {("noop", 5): 1, ("sleep", 5): 1, ("noop", 0): 1}


def test_overview_figures_add_up_to_what_happened():
    """The overview's job counts, queue, workers and rates are those of the jobs submitted and run, counted by hand."""
    c = Console()
    w = c.worker(slots=2)
    done_id, failed_id = c.submit({}, {"retries": 0})
    jobs = {j["job"]: j for j in w.take("JOB")}
    c.finish(w, jobs[done_id])
    run(c.dispatcher.fail(w, failed_id, jobs[failed_id]["lease"], "bad input", False))
    run(c.dispatcher.worker_action("w1", "drain"))
    paused, *_ = c.submit({"type": "sleep", "priority": 3}, {"type": "sleep", "priority": 3}, {})
    run(c.grid.pause(paused))

    report = run(c.grid.overview())

    assert report.data["jobs"] == {
        "queued": 2,
        "running": 0,
        "paused": 1,
        "done": 1,
        "failed": 1,
        "cancelled": 0,
        "poison": 0,
    }
    assert report.data["queue"] == [
        {"type": "sleep", "priority": 3, "queued": 1},
        {"type": "noop", "priority": 0, "queued": 1},
    ]
    assert report.data["workers"] == {"connected": 1, "slots": 2, "busy": 0, "drained": 1}
    assert report.data["recent"]["submitted"] == {1: 5, 5: 5, 15: 5}
    assert report.data["recent"]["done"][1] == 1
    assert report.data["recent"]["failed"][1] == 1
    assert report.data["recent"]["records"][1] == 1
    text = repr(report)
    assert "queued 2  running 0  paused 1  done 1  failed 1  cancelled 0" in text
    assert "1 connected  2 slots  0 busy  1 drained" in text
    assert "dispatching  on" in text


def test_overview_text_shows_exact_figures_of_a_known_grid():
    """Jobs in every state, a queue of two types at two priorities and two workers render as these exact lines."""
    c = Console()
    w1 = c.worker("w1", slots=3)
    done_id, failed_id = c.submit({"records": ["a", "b"]}, {"retries": 0})
    jobs = {j["job"]: j for j in w1.take("JOB")}
    c.finish(w1, jobs[done_id])
    run(c.dispatcher.fail(w1, failed_id, jobs[failed_id]["lease"], "bad input", False))
    c.submit({"type": "sleep"}, {"type": "sleep", "priority": 9})
    assert len(w1.take("JOB")) == 2  # these two run on
    run(c.grid.stop_dispatching())
    queued = c.submit(
        {"type": "sleep", "priority": 5},
        {"type": "sleep", "priority": 5},
        {"priority": 5},
        {"priority": -1},
        {"priority": -1},
        {"type": "sleep", "priority": -1},
        {},
    )
    run(c.grid.pause(queued[1]))
    run(c.grid.cancel(queued[6]))
    c.worker("w2", slots=2)
    run(c.grid.drain("w2"))

    report = run(c.grid.overview())

    # 11 submitted; 2 records accepted (the done job's); 11/5 = 2.2, 11/15 = 0.73, 2/15 = 0.13, 1/15 = 0.07.
    assert repr(report).splitlines() == [
        "dispatching  OFF (grid.start_dispatching() turns it on)",
        "jobs         queued 5  running 2  paused 1  done 1  failed 1  cancelled 1  poison 0",
        "workers      2 connected  5 slots  2 busy  1 drained",
        "",
        "queued by type and priority",
        "  type   priority  queued",
        "  noop          5       1",
        "  sleep         5       1",
        "  noop         -1       2",
        "  sleep        -1       1",
        "",
        "per minute, over the last",
        "             1 min  5 min  15 min",
        "  submitted     11    2.2     0.7",
        "  records        2    0.4     0.1",
        "  done           1    0.2     0.1",
        "  failed         1    0.2     0.1",
        "  cancelled      1    0.2     0.1",
    ]
    assert report.data["recent"]["submitted"] == {1: 11, 5: 11, 15: 11}


def test_overview_of_an_empty_grid_says_no_queue_and_zeros():
    """With no job and no worker the overview shows every figure as 0 and the queue as none."""
    report = run(Console().grid.overview())
    assert repr(report).splitlines()[:5] == [
        "dispatching  on",
        "jobs         queued 0  running 0  paused 0  done 0  failed 0  cancelled 0  poison 0",
        "workers      0 connected  0 slots  0 busy  0 drained",
        "",
        "queued by type and priority: none",
    ]
    assert [line.split()[1:] for line in repr(report).splitlines()[-5:]] == [["0", "0", "0"]] * 5


def test_overview_rates_age_out_after_fifteen_minutes():
    """Rates are about the last minutes: after a quiet quarter hour they are all zero."""
    c = Console()
    c.submit({}, {})
    assert run(c.grid.overview()).data["recent"]["submitted"][1] == 2
    c.clock.advance(61)
    rates = run(c.grid.overview()).data["recent"]["submitted"]
    assert rates[1] == 0 and rates[5] == 2
    c.clock.advance(15 * 60)
    assert run(c.grid.overview()).data["recent"]["submitted"] == {1: 0, 5: 0, 15: 0}


def test_workers_shows_slots_running_jobs_beat_versions_and_address():
    """Each connected worker is a row with its host state, load, running job ids, last heartbeat, handlers, address."""
    c = Console()
    w = c.worker("w2", slots=3)
    ids = c.submit({}, {})
    c.clock.advance(1.5)
    report = run(c.grid.workers())
    [row] = report.data
    assert row["name"] == "w2" and sorted(row["running"]) == ids
    line = repr(report).splitlines()[1]
    assert line.split()[:5] == ["w2", "idle", "2/3", f"{ids[0]},", str(ids[1])]
    assert "1.5 s ago" in line and "noop 1.0, sleep 2.1" in line and w.address in line and "test/1" in line
    run(c.grid.drain("w2"))
    assert "w2 (drained)" in repr(run(c.grid.workers()))


def test_workers_shows_a_busy_worker_and_a_silent_one():
    """The state column says what a worker said of its host, and marks one silent for more than a beat."""
    c = Console()
    w = c.worker("w2")
    run(c.dispatcher.set_state(w, "vacating", "keyboard"))
    assert repr(run(c.grid.workers())).splitlines()[1].split()[:2] == ["w2", "vacating"]
    c.clock.advance(2.5)  # more than a beat without a line from it
    assert "vacating (silent)" in repr(run(c.grid.workers()))


def test_busy_and_idle_tell_the_worker_host_and_report_it():
    """grid.busy and grid.idle send the worker HOST and say so; for a name not connected, when it is told."""
    c = Console()
    w = c.worker("w2")
    report = run(c.grid.busy("w2", "desk in use"))
    assert repr(report) == "worker w2: host busy" and report.data == {"connected": True}
    assert w.take("HOST") == [{"busy": True, "reason": "desk in use"}]
    run(c.grid.idle("w2"))
    assert w.take("HOST") == [{"busy": False, "reason": "said by an operator"}]
    assert repr(run(c.grid.busy("vm9"))) == "worker vm9: host busy (not connected: told at its next HELLO)"


def test_job_shows_leases_errors_and_per_record_progress():
    """A job's view tells its attempts, each lease and how it ended, and which records are ok, failed or pending."""
    c = Console()
    w = c.worker()
    [job_id] = c.submit({"records": ["r0", "r1", "r2"], "name": "nightly"})
    [job] = w.take("JOB")
    run(c.dispatcher.result(w, job_id, job["lease"], [{"i": 0, "out": {"n": 3}}, {"i": 1, "error": "no such file"}]))
    c.dispatcher.connection_lost(w)  # the worker is lost mid-job

    report = run(c.grid.job(job_id))

    text = repr(report)
    assert text.splitlines()[0].startswith(f"job {job_id} 'nightly'  noop  priority 0  queued  attempt 1 of 4")
    assert "records  3: 1 ok, 1 error, 1 pending" in text
    history = text.split("history\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[2] for line in history[1:]] == ["submitted", "leased", "released"]
    assert history[2].split()[3:] == ["1", "L1", "w1"]
    assert "-> queued (disconnected): worker w1 lost (disconnected)" in history[3]
    records = text.split("\nrecords\n", 1)[1].splitlines()[1:]
    assert [r.split()[:2] for r in records] == [["0", "ok"], ["1", "error"], ["2", "pending"]]
    assert records[0].endswith('{"n":3}') and records[1].endswith("no such file")
    assert [r and r["i"] for r in report.data["records"]] == [0, 1, None]


def test_ended_job_shows_records_without_a_result_not_pending():
    """A failed job's records that never got a result are not called pending: nothing will run them."""
    c = Console()
    w = c.worker()
    [job_id] = c.submit({"records": ["r0", "r1"], "retries": 0})
    [job] = w.take("JOB")
    run(c.dispatcher.fail(w, job_id, job["lease"], "Boom: bad input", False))
    text = repr(run(c.grid.job(job_id)))
    assert "failed  attempt 1 of 1" in text.splitlines()[0]
    assert "records  2: 0 ok, 0 error, 2 without a result" in text
    assert "-> failed (failed): Boom: bad input" in text
    assert [r.split()[:2] for r in text.split("\nrecords\n", 1)[1].splitlines()[1:]] == [["0", "none"], ["1", "none"]]


def test_job_lists_only_the_first_records_asked_for():
    """A long job shows its first ``records`` records and says how to see the rest."""
    c = Console()
    [job_id] = c.submit({"records": list(range(50))})
    text = repr(run(c.grid.job(job_id, records=5)))
    assert "records 0..4 of 50" in text
    assert f"grid.job({job_id}, records=50)" in text
    assert len(text.split("records 0..4 of 50\n", 1)[1].splitlines()) == 1 + 5 + 1


def test_jobs_lists_by_state_and_says_how_to_page():
    """The job list filters by state and type and tells the call for the next page."""
    c = Console()
    ids = c.submit(*[{} for _ in range(4)])
    run(c.grid.pause(ids[1]))
    report = run(c.grid.jobs("queued", limit=2))
    assert [j["id"] for j in report.data] == [ids[0], ids[2]]
    assert f"grid.jobs('queued', after={ids[2]})" in repr(report)
    assert repr(run(c.grid.jobs("done"))) == "no such jobs"
    with pytest.raises(ValueError):
        run(c.grid.jobs("finished"))


def test_actions_change_the_server_and_are_logged_with_who_took_them():
    """Pause, resume, cancel, requeue, drain, undrain, disconnect and the stop switch act and log user, key, address."""
    c = Console()
    a, b = c.submit({}, {})
    w = c.worker(slots=1)
    [running] = w.take("JOB")
    with capturedLogs() as events:
        assert repr(run(c.grid.pause(b))) == f"job {b} is paused"
        assert repr(run(c.grid.resume(b))) == f"job {b} is queued"
        assert repr(run(c.grid.cancel(running["job"]))) == f"job {running['job']} is cancelled"
        assert w.take("REVOKE") == [{"job": running["job"], "lease": running["lease"], "reason": "cancelled"}]
        [next_job] = w.take("JOB")
        assert repr(run(c.grid.requeue(running["job"]))) == f"job {running['job']} is queued"
        assert repr(run(c.grid.drain("w1"))) == "worker w1 drained"
        assert w.take("DRAIN") == [{"drain": True}]
        assert repr(run(c.grid.undrain("w1"))) == "worker w1 undrained"
        assert repr(run(c.grid.stop_dispatching())) == "dispatching is OFF"
        assert c.dispatcher.dispatching is False
        assert repr(run(c.grid.start_dispatching())) == "dispatching is on"
        assert repr(run(c.grid.disconnect("w1"))) == "worker w1 disconnected"
        assert w.dropped == "disconnected by an operator"
    assert next_job["job"] == b
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "gridd.server.operator"]
    assert len(lines) == 9
    assert all(line.startswith("manhole: alice [SHA256:abc] from 127.0.0.1:5000: ") for line in lines)
    assert lines[0].endswith(f"pause job {b}: job {b} is paused")
    assert lines[6].endswith("stop dispatching all workers: dispatching is OFF")


def test_refused_action_fails_with_its_error_and_is_logged():
    """An action the dispatcher refuses fails with that error, changes nothing, and the refusal is logged."""
    c = Console()
    [job_id] = c.submit({})
    run(c.grid.cancel(job_id))
    with capturedLogs() as events:
        with pytest.raises(errors.InvalidState):
            run(c.grid.pause(job_id))
        with pytest.raises(errors.UnknownWorker):
            run(c.grid.drain("nobody"))
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "gridd.server.operator"]
    assert lines[0].endswith(f"pause job {job_id} refused: invalid_state: job {job_id} is cancelled") or (
        "refused: invalid_state" in lines[0]
    )
    assert "drain worker nobody refused: unknown_worker" in lines[1]
    assert run(c.store.get_job(job_id))["state"] == "cancelled"


def test_wait_fires_when_the_job_ends_and_forgets_its_watch():
    """wait() fires with the job's final state pushed by the dispatcher, then unregisters from it."""
    c = Console()
    [job_id] = c.submit({})
    d = c.grid.wait(job_id)
    assert not d.called and len(c.dispatcher.watchers) == 1
    w = c.worker()
    [job] = w.take("JOB")
    c.finish(w, job)
    assert repr(run(d)) == f"job {job_id} done: 1/1 records"
    c.clock.advance(0)
    assert len(c.dispatcher.watchers) == 0
    assert repr(run(c.grid.wait(job_id))) == f"job {job_id} done: 1/1 records"  # already over: at once
    c.clock.advance(0)
    assert len(c.dispatcher.watchers) == 0


def test_close_cancels_waits_and_leaves_no_watch_behind():
    """When the session ends, its waits are cancelled and the dispatcher keeps nothing of them."""
    c = Console()
    [job_id] = c.submit({})
    d = c.grid.wait(job_id)
    c.grid.close()
    with pytest.raises(defer.CancelledError):
        run(d)
    c.clock.advance(0)
    assert len(c.dispatcher.watchers) == 0


def test_wait_cancelled_before_its_watch_is_set_up_leaves_no_watch():
    """A wait cancelled while the store still looks the job up leaves no watch behind once the lookup ends."""
    c = Console()
    [job_id] = c.submit({})
    c.dispatcher.jobs.pop(job_id)  # make watch() ask the store, and hold the store's answer
    gate = defer.Deferred()
    get_job = c.store.get_job
    c.store.get_job = lambda job: gate.addCallback(lambda _: get_job(job))
    d = c.grid.wait(job_id)
    d.cancel()
    c.clock.advance(0)
    gate.callback(None)
    c.clock.advance(0)
    with pytest.raises(defer.CancelledError):
        run(d)
    assert len(c.dispatcher.watchers) == 0


def test_wait_for_an_unknown_job_fails():
    """Waiting on a job that does not exist fails with unknown_job rather than waiting for ever."""
    c = Console()
    with pytest.raises(errors.UnknownJob):
        run(c.grid.wait(99))
    c.clock.advance(0)
    assert len(c.dispatcher.watchers) == 0


def test_repr_and_doc_explain_every_method():
    """``grid`` at the prompt shows the guide; the class doc (help(grid)) names every public method."""
    c = Console()
    guide = repr(c.grid)
    public = [n for n in dir(Operator) if not n.startswith("_") and n != "close"]
    doc = Operator.__doc__
    for name in public:
        assert f"grid.{name}(" in doc, name
        assert f"grid.{name}(" in guide, name
    assert "dispatcher, store, server, reactor" in doc


def test_workers_shows_flags_with_why_and_clear_lifts_them():
    """A flagged worker's types show in its row and, below the table, why; grid.clear lifts them and is logged."""
    c = Console()
    bad = c.worker("w-bad")
    ids = c.submit(*[{"retries": 5} for _ in range(3)])
    for job_id in ids:
        [job] = bad.take("JOB")
        run(c.dispatcher.fail(bad, job_id, job["lease"], "ImportError", True))
    run(c.grid.drain("w-bad"))
    good = c.worker("w-good")
    c.submit({})
    c.finish(good, good.take("JOB")[0])
    text = repr(run(c.grid.workers()))
    row = [line for line in text.splitlines() if line.startswith("w-bad")][0]
    assert " noop " in row
    assert "w-bad flagged for noop since " in text and "noop succeeded on w-good" in text
    assert 'grid.clear("NAME")' in text
    with capturedLogs() as events:
        assert repr(run(c.grid.clear("w-bad"))) == "worker w-bad cleared: noop"
        assert repr(run(c.grid.clear("w-good"))) == "worker w-good had no flags"
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "gridd.server.operator"]
    assert lines[0].endswith("clear worker w-bad: worker w-bad cleared: noop")
    assert "flagged for" not in repr(run(c.grid.workers()))
    with pytest.raises(errors.UnknownWorker):
        run(c.grid.clear("nobody"))


def test_job_shows_poison_error_and_each_attempt():
    """A poison job's view says why, and has a row per attempt with its worker, outcome and error."""
    c = Console()
    [job_id] = c.submit({"retries": 5})
    for name in ("w1", "w2", "w3"):
        w = c.worker(name)
        [job] = w.take("JOB")
        run(c.dispatcher.fail(w, job_id, job["lease"], f"crash on {name}", True))
        run(c.dispatcher.set_slots(w, 0))
        c.clock.advance(10)
    text = repr(run(c.grid.job(job_id)))
    assert "  poison  " in text.splitlines()[0]
    assert "error    poison: failed on 3 workers: w1: crash on w1, w2: crash on w2, w3: crash on w3" in text
    attempts = text.split("\nattempts\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert [line.split()[:2] for line in attempts] == [["1", "w1"], ["2", "w2"], ["3", "w3"]]
    assert all("failed" in line for line in attempts) and attempts[2].endswith("crash on w3")
