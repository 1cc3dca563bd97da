"""Poison jobs and bad workers, in the scheduler on a task.Clock and the memory store: no sockets, no sleeps."""

from __future__ import annotations

import pytest

from gridd import errors
from tests.test_dispatcher import FakeConnection, Grid, TwoServers, run


def fail_once(g: Grid, conn, error="boom") -> dict:
    """The worker on ``conn`` fails the one job it was sent; return the reply."""
    [job] = conn.take("JOB")
    return run(g.d.fail(conn, job["job"], job["lease"], error, True))


def test_fail_on_three_workers_makes_poison_with_every_worker_named():
    """A job that fails once on each of 3 workers ends poison at the third: not retried, its error names all."""
    g = Grid(backoff_base=1.0)
    watcher = FakeConnection()
    [job_id] = g.submit(retries=10)
    run(g.d.watch(watcher, [job_id]))
    workers = [g.worker(f"w{i}", slots=0) for i in (1, 2, 3)]
    for i, w in enumerate(workers, 1):
        run(g.d.set_slots(w, 1))
        reply = fail_once(g, w, f"boom {i}")
        run(g.d.set_slots(w, 0))
        if i < 3:
            assert reply["state"] == "queued"
            g.clock.advance(reply["retry_in"])
    assert reply == {"state": "poison"}
    view = g.state(job_id)
    assert (view["state"], view["not_before"]) == ("poison", None)
    assert view["error"] == "poison: failed on 3 workers: w1: boom 1, w2: boom 2, w3: boom 3"
    assert [(a["worker"], a["outcome"], a["error"]) for a in view["attempt_history"]] == [
        ("w1", "failed", "boom 1"),
        ("w2", "failed", "boom 2"),
        ("w3", "failed", "boom 3"),
    ]
    assert [e["state"] for e in watcher.take("EVENT")][-1] == "poison"
    assert job_id not in g.d.jobs
    for w in workers:
        run(g.d.set_slots(w, 1))
    g.clock.advance(600)
    assert all(not w.take("JOB") for w in workers)
    assert run(g.d.stats())["jobs"]["poison"] == 1
    assert [j["id"] for j in run(g.d.list_jobs(state="poison"))["jobs"]] == [job_id]


def test_fail_on_one_worker_repeatedly_fails_not_poison():
    """Failures on the same worker never make poison by themselves: the retry limit fails the job."""
    g = Grid(backoff_base=1.0)
    w = g.worker()
    [job_id] = g.submit(retries=3)
    for _ in range(3):
        g.clock.advance(fail_once(g, w)["retry_in"])
    assert fail_once(g, w) == {"state": "failed"}
    assert g.state(job_id)["state"] == "failed"


def test_poison_after_two_option_and_zero_disables():
    """``poison_after`` sets how many workers make poison; 0 never makes it."""
    for poison_after, expected in ((2, "poison"), (0, "queued")):
        g = Grid(backoff_base=1.0, poison_after=poison_after)
        [job_id] = g.submit(retries=10)
        w1, w2 = g.worker("w1"), g.worker("w2", slots=0)
        retry_in = fail_once(g, w1)["retry_in"]
        run(g.d.set_slots(w1, 0))
        g.clock.advance(retry_in)
        run(g.d.set_slots(w2, 1))
        assert fail_once(g, w2)["state"] == expected
        assert g.state(job_id)["state"] == expected


def test_lost_worker_and_return_do_not_count_towards_poison():
    """Only handler failures and run-time limits count: a lost worker or a RETURN is not the job's fault."""
    g = Grid(backoff_base=1.0, return_delay=0.0)  # no delay: the returned job may go straight back to w2
    [job_id] = g.submit(retries=10)
    w1 = g.worker("w1")
    retry_in = fail_once(g, w1)["retry_in"]
    run(g.d.set_slots(w1, 0))
    g.clock.advance(retry_in)
    w2 = g.worker("w2")
    [job] = w2.take("JOB")
    run(g.d.give_back(w2, job_id, job["lease"], "host busy"))
    [job] = w2.take("JOB")
    g.d.connection_lost(w2)
    g.clock.advance(60)
    w3 = g.worker("w3")
    assert fail_once(g, w3)["state"] == "queued"
    outcomes = [(a["worker"], a["outcome"]) for a in g.state(job_id)["attempt_history"]]
    assert outcomes == [("w1", "failed"), ("w2", "returned"), ("w2", "expired"), ("w3", "failed")]


def test_run_time_limit_counts_towards_poison():
    """An attempt past its run-time limit is a failure of the job on that worker."""
    g = Grid(backoff_base=1.0, poison_after=2)
    [job_id] = g.submit(retries=10, timeout=5.0)
    w1 = g.worker("w1")
    retry_in = fail_once(g, w1)["retry_in"]
    run(g.d.set_slots(w1, 0))
    g.clock.advance(retry_in)
    w2 = g.worker("w2")
    [job] = w2.take("JOB")
    for _ in range(6):
        g.clock.advance(1)
        g.d.seen(w2)
    view = g.state(job_id)
    assert view["state"] == "poison"
    assert view["error"] == "poison: failed on 2 workers: w1: boom, w2: run-time limit of 5 s exceeded"
    assert view["not_before"] is None
    assert [r["job"] for r in w2.take("REVOKE")] == [job_id]


def test_requeue_poison_job_runs_again_with_the_count_afresh():
    """An operator's REQUEUE puts a poison job back; it needs failures on as many workers again."""
    g = Grid(backoff_base=1.0, poison_after=2)
    [job_id] = g.submit(retries=10)
    w1, w2 = g.worker("w1"), g.worker("w2", slots=0)
    retry_in = fail_once(g, w1)["retry_in"]
    run(g.d.set_slots(w1, 0))
    g.clock.advance(retry_in)
    run(g.d.set_slots(w2, 1))
    assert fail_once(g, w2)["state"] == "poison"
    assert run(g.d.requeue(job_id)) == {"state": "queued"}
    view = g.state(job_id)  # queued afresh, and handed out again at once
    assert (view["state"], view["attempts"], view["error"]) == ("running", 1, None)
    assert fail_once(g, w2)["state"] == "queued"  # one worker since the requeue
    run(g.d.set_slots(w2, 0))
    run(g.d.set_slots(w1, 1))
    g.clock.advance(1)
    assert fail_once(g, w1)["state"] == "poison"


def test_two_servers_count_failures_on_either_towards_poison():
    """Failures committed by another server sharing the store count: the grant brings them."""
    two = TwoServers(backoff_base=1.0, poison_after=2)
    [job_id] = two.a.submit(retries=10)
    wa = two.a.worker("wa")
    assert fail_once(two.a, wa)["state"] == "queued"
    run(two.a.d.set_slots(wa, 0))
    wb = two.b.worker("wb")
    two.advance(2.0, (two.a, wa), (two.b, wb))
    assert fail_once(two.b, wb)["state"] == "poison"
    assert two.a.state(job_id)["error"] == "poison: failed on 2 workers: wa: boom, wb: boom"


def bad_worker_grid(**kwargs):
    """w-bad failed 3 noop jobs (alone, so nothing is flagged yet) and is drained; w-good is connected."""
    g = Grid(backoff_base=100.0, **kwargs)
    bad = g.worker("w-bad", types={"noop": "1", "other": "1"})
    g.submit(*[{"retries": 5} for _ in range(3)])
    for _ in range(3):
        fail_once(g, bad)
    run(g.d.worker_action("w-bad", "drain"))
    good = g.worker("w-good")
    return g, bad, good


def test_worker_failing_a_type_that_succeeds_elsewhere_is_flagged_and_gets_none_of_it():
    """A worker whose last 3 attempts of a type failed while it succeeded elsewhere gets no more of that type."""
    g, bad, good = bad_worker_grid()
    assert [w["flags"] for w in run(g.d.workers_view())["workers"]] == [[], []]  # nobody succeeded yet
    [fresh] = g.submit()
    g.finish(good, good.take("JOB")[0])
    [flags] = [w["flags"] for w in run(g.d.workers_view())["workers"] if w["name"] == "w-bad"]
    assert flags == [
        {
            "type": "noop",
            "reason": "its last 3 attempts of noop failed while noop succeeded on w-good",
            "since": g.clock.seconds(),
        }
    ]
    run(g.d.worker_action("w-bad", "undrain"))
    run(g.d.set_slots(good, 0))
    g.submit(), g.submit(type="other")
    assert [j["type"] for j in bad.take("JOB")] == ["other"]
    assert len(g.d.queue) == 1


def test_flag_outlives_reconnect_until_cleared():
    """Flags are kept by worker name: a reconnect keeps them; WORKER clear lifts them and work flows again."""
    g, bad, good = bad_worker_grid()
    g.submit()
    g.finish(good, good.take("JOB")[0])
    run(g.d.set_slots(good, 0))
    g.d.connection_lost(bad)
    again = g.worker("w-bad", types={"noop": "1"})
    [view] = [w for w in run(g.d.workers_view())["workers"] if w["name"] == "w-bad"]
    assert [f["type"] for f in view["flags"]] == ["noop"]
    g.clock.advance(1000)  # every backoff over: three noop jobs wait
    assert again.take("JOB") == []
    assert run(g.d.worker_action("w-bad", "clear")) == {"cleared": ["noop"]}
    assert len(again.take("JOB")) == 1
    [view] = [w for w in run(g.d.workers_view())["workers"] if w["name"] == "w-bad"]
    assert view["flags"] == []


def test_clear_disconnected_worker_by_name():
    """A flagged worker that is not connected is cleared by name; cleared and gone, it is unknown."""
    g, bad, good = bad_worker_grid()
    g.submit()
    g.finish(good, good.take("JOB")[0])
    g.d.connection_lost(bad)
    assert run(g.d.worker_action("w-bad", "clear")) == {"cleared": ["noop"]}
    with pytest.raises(errors.UnknownWorker):
        run(g.d.worker_action("w-bad", "clear"))
    assert run(g.d.worker_action("w-good", "clear")) == {"cleared": []}


def test_bad_worker_after_zero_flags_nobody():
    """``bad_worker_after`` 0 turns flagging off."""
    g, bad, good = bad_worker_grid(bad_worker_after=0)
    g.submit()
    g.finish(good, good.take("JOB")[0])
    assert all(not w["flags"] for w in run(g.d.workers_view())["workers"])


def test_clear_unknown_worker_refused():
    """WORKER clear of a name neither connected nor flagged is refused as unknown."""
    g = Grid()
    with pytest.raises(errors.UnknownWorker):
        run(g.d.worker_action("nobody", "clear"))


def test_type_failing_everywhere_flags_nobody():
    """When a type fails on every worker the jobs are to blame: no worker is flagged."""
    g = Grid(backoff_base=100.0)
    workers = [g.worker(f"w{i}") for i in range(2)]
    g.submit(*[{"retries": 5} for _ in range(6)])
    for _ in range(3):
        for w in workers:
            fail_once(g, w)
    assert all(not w["flags"] for w in run(g.d.workers_view())["workers"])


def test_success_before_the_failures_does_not_flag():
    """Only a success elsewhere since the first of the failures counts; a later one does."""
    g = Grid(backoff_base=100.0)
    good = g.worker("w-good")
    g.submit()
    g.finish(good, good.take("JOB")[0])
    run(g.d.set_slots(good, 0))
    g.clock.advance(1)
    bad = g.worker("w-bad")
    g.submit(*[{"retries": 5} for _ in range(3)])
    for _ in range(3):
        fail_once(g, bad)
    assert all(not w["flags"] for w in run(g.d.workers_view())["workers"])
    run(g.d.worker_action("w-bad", "drain"))
    run(g.d.set_slots(good, 1))
    g.submit()
    g.finish(good, good.take("JOB")[0])
    [flags] = [w["flags"] for w in run(g.d.workers_view())["workers"] if w["name"] == "w-bad"]
    assert [f["type"] for f in flags] == ["noop"]


def test_success_on_the_worker_itself_breaks_its_run_of_failures():
    """The last N attempts must all have failed: a success of the worker's own among them spares it."""
    g = Grid(backoff_base=100.0)
    bad = g.worker("w-bad")
    g.submit(*[{"retries": 5} for _ in range(2)])
    fail_once(g, bad)
    fail_once(g, bad)
    g.submit()
    g.finish(bad, bad.take("JOB")[0])
    g.submit(*[{"retries": 5} for _ in range(2)])
    fail_once(g, bad)
    fail_once(g, bad)
    run(g.d.worker_action("w-bad", "drain"))
    good = g.worker("w-good")
    g.submit()
    g.finish(good, good.take("JOB")[0])
    assert all(not w["flags"] for w in run(g.d.workers_view())["workers"])
    run(g.d.set_slots(good, 0))
    g.submit(retries=5)
    run(g.d.worker_action("w-bad", "undrain"))
    fail_once(g, bad)  # now its last 3 failed, and noop succeeded on w-good since the first of them
    [flags] = [w["flags"] for w in run(g.d.workers_view())["workers"] if w["name"] == "w-bad"]
    assert [f["type"] for f in flags] == ["noop"]
