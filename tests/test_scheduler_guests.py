"""Workers that are good guests: a job given back is not handed straight back, and a silent worker gets no new job.

On a task.Clock and the memory store, with the Grid helper of
tests/test_dispatcher.py: no sockets, no sleeps. ``g.d.seen(conn)`` is a
line heard from that worker (the server calls it for every line).
"""

from __future__ import annotations

from gridd.scheduler.model import GIVEN_UP_KEPT, Job
from tests.test_dispatcher import Grid, run


def beating(g: Grid, seconds: float, *conns, step: float = 0.5):
    """Let ``seconds`` pass in small steps (no stall) while the workers in ``conns`` keep beating."""
    for _ in range(round(seconds / step)):
        g.clock.advance(step)
        for conn in conns:
            g.d.seen(conn)


def give_back(g: Grid, conn, body):
    assert run(g.d.give_back(conn, body["job"], body["lease"], "host busy")) == {}


# ----------------------------------------------------------------------
# a job given back (RETURN) is not handed straight back to its worker


def test_returned_job_goes_to_the_other_worker_not_the_one_that_returned_it():
    """RETURN: the job is queued again and goes to the other idle worker; the one that gave it back gets nothing."""
    g = Grid()
    w1, w2 = g.worker("w1"), g.worker("w2")
    [job_id] = g.submit(records=["a", "b"])
    [job] = w1.take("JOB")  # the first worker in the table gets it
    assert not w2.take("JOB")
    give_back(g, w1, job)
    assert w1.take("JOB") == []
    [again] = w2.take("JOB")
    assert (again["job"], again["attempt"]) == (job_id, 1)
    assert g.state(job_id)["worker"] == "w2"


def test_returned_job_waits_for_another_workers_free_slot_rather_than_going_back():
    """With the other worker busy, a job given back waits for it; it is not handed back meanwhile."""
    g = Grid(return_delay=30.0)
    w1, w2 = g.worker("w1"), g.worker("w2")
    [first, busy] = g.submit({}, {})
    [job] = w1.take("JOB")
    [other] = w2.take("JOB")
    assert (job["job"], other["job"]) == (first, busy)
    give_back(g, w1, job)
    beating(g, 5.0, w1, w2)
    assert w1.take("JOB") == [] and run(g.d.stats())["queued_runnable"] == 1
    g.finish(w2, other)
    [again] = w2.take("JOB")
    assert again["job"] == first and w1.take("JOB") == []


def test_lone_worker_gets_its_returned_job_back_after_the_delay_and_not_before():
    """With no other worker the job goes back to the one that returned it, ``return_delay`` seconds after the RETURN."""
    g = Grid(return_delay=10.0)
    w = g.worker("w1")
    [job_id] = g.submit(records=["a", "b"])
    [job] = w.take("JOB")
    run(g.d.result(w, job_id, job["lease"], [{"i": 0, "out": "A"}]))
    give_back(g, w, job)
    for _ in range(19):  # 9.5 s, beating all along: a slot is free, the job is queued
        beating(g, 0.5, w)
        assert w.take("JOB") == [], f"handed back {g.clock.seconds() - 1000:g} s after the RETURN"
    beating(g, 0.5, w)
    [again] = w.take("JOB")
    assert (again["job"], again["attempt"], again["records"]) == (job_id, 1, [{"i": 1, "data": "b"}])
    g.finish(w, again)
    assert g.state(job_id)["state"] == "done"


def test_return_delay_defaults_to_30_seconds():
    """The default delay before a lone worker gets its returned job back is 30 s."""
    g = Grid()
    assert g.d.return_delay == 30.0
    w = g.worker("w1")
    g.submit()
    [job] = w.take("JOB")
    give_back(g, w, job)
    beating(g, 29.5, w)
    assert w.take("JOB") == []
    beating(g, 0.5, w)
    assert [j["job"] for j in w.take("JOB")] == [job["job"]]


def test_job_returned_by_a_worker_does_not_hold_up_the_jobs_behind_it_for_that_worker():
    """The worker gets the next jobs in the queue instead; the jobs it gave back stay queued, in order, for others."""
    g = Grid()
    w1 = g.worker("w1", slots=3)
    [a, b, c, d, e] = g.submit({}, {}, {}, {}, {})
    jobs = w1.take("JOB")
    assert [j["job"] for j in jobs] == [a, b, c]
    give_back(g, w1, jobs[0])  # a lies ahead of d in the same bucket, kept from w1
    assert [j["job"] for j in w1.take("JOB")] == [d]
    give_back(g, w1, jobs[1])  # now a and b, both kept from w1, lie ahead of e
    assert [j["job"] for j in w1.take("JOB")] == [e]
    assert run(g.d.stats())["queued_runnable"] == 2
    w2 = g.worker("w2", slots=3)
    assert [j["job"] for j in w2.take("JOB")] == [a, b]


def test_job_returned_at_a_higher_priority_does_not_hold_up_lower_priorities_for_that_worker():
    """A job kept from the worker in a higher priority's bucket: the worker gets the best job it may have."""
    g = Grid()
    w1 = g.worker("w1")
    [high, low] = g.submit({"priority": 5}, {"priority": 0})
    [job] = w1.take("JOB")
    assert job["job"] == high
    give_back(g, w1, job)
    assert [j["job"] for j in w1.take("JOB")] == [low]
    w2 = g.worker("w2")
    assert [j["job"] for j in w2.take("JOB")] == [high]


def test_jobs_kept_from_one_worker_cost_the_others_one_look_per_bucket(monkeypatch):
    """Many jobs given back by w1 lie at the head of the queue: w2's pick looks at one of them, w1's at each."""
    g = Grid()
    w1 = g.worker("w1", slots=100)
    ids = g.submit(*[{} for _ in range(100)])
    jobs = w1.take("JOB")
    run(g.d.set_slots(w1, 0))
    for job in jobs:
        give_back(g, w1, job)
    [last] = g.submit()
    looks = []
    kept_from = Job.kept_from
    monkeypatch.setattr(Job, "kept_from", lambda job, name, now: looks.append(name) or kept_from(job, name, now))
    run(g.d.set_slots(w1, 1))
    assert [j["job"] for j in w1.take("JOB")] == [last]
    assert looks.count("w1") == 100  # the jobs it gave back, each once, then the one it may have
    looks.clear()
    w2 = g.worker("w2", slots=2)
    assert [j["job"] for j in w2.take("JOB")] == ids[:2]
    assert looks == ["w2", "w2"]  # one look per pick: the top of the one bucket
    assert run(g.d.stats())["queued_runnable"] == 98


def test_a_job_remembers_a_bounded_number_of_workers_that_gave_it_up():
    """At most GIVEN_UP_KEPT names; the one whose time ends first is forgotten; a time that is over is forgotten."""
    job = Job(1, "noop", 0, {}, {}, 1, 3, 10.0, "queued", 0, {0: "a"})
    for n in range(GIVEN_UP_KEPT + 1):
        job.give_up(f"w{n}", 100.0 + n)
    assert len(job.given_up) == GIVEN_UP_KEPT
    assert not job.kept_from("w0", 50.0)
    assert job.kept_from("w1", 50.0) and job.kept_from(f"w{GIVEN_UP_KEPT}", 50.0)
    assert not job.kept_from("w1", 101.0)
    assert "w1" not in job.given_up


# ----------------------------------------------------------------------
# a worker silent for more than one beat gets no new job


def test_silent_worker_gets_no_new_job_while_another_does():
    """A worker not heard for more than one beat is skipped; its jobs stay queued; it keeps what it holds."""
    g = Grid(beat=2.0)
    w1 = g.worker("w1", slots=3)
    w2 = g.worker("w2", slots=1)
    [held] = g.submit()
    [job] = w1.take("JOB")
    beating(g, 1.5, w2)  # w1 silent for less than a beat: still given work (it comes first)
    [soon] = g.submit()
    assert [j["job"] for j in w1.take("JOB")] == [soon]
    beating(g, 1.0, w2)  # w1 now silent for 2.5 s
    [a, b] = g.submit({}, {})
    assert w1.take("JOB") == []
    assert [j["job"] for j in w2.take("JOB")] == [a]
    assert run(g.d.stats())["queued_runnable"] == 1 and g.state(b)["state"] == "queued"
    assert w1.dropped is None and g.d.jobs[held].token == job["lease"]


def test_silent_worker_heard_again_gets_work_at_once():
    """The first line from a worker that a dispatch passed over fills its free slot there and then."""
    g = Grid(beat=2.0)
    w1 = g.worker("w1")
    beating(g, 3.0)
    [job_id] = g.submit()
    assert w1.take("JOB") == []
    g.d.seen(w1)  # no time passes: the line alone brings the job
    [job] = w1.take("JOB")
    assert job["job"] == job_id


def test_silent_worker_is_still_dropped_at_its_deadline_and_the_job_it_did_not_get_runs_elsewhere():
    """Being passed over changes nothing of the heartbeat deadline; the queued job goes to a worker that beats."""
    g = Grid(beat=2.0)
    w1 = g.worker("w1")
    beating(g, 3.0)
    [job_id] = g.submit()
    beating(g, 3.0)
    assert w1.dropped and w1.take("JOB") == []
    w2 = g.worker("w2")
    assert [j["job"] for j in w2.take("JOB")] == [job_id]


def test_server_stall_does_not_make_every_worker_silent():
    """After a stall of this server its workers get one more beat to be heard, as for deadlines: they get work."""
    g = Grid(beat=2.0, backoff_base=4.0)
    w = g.worker("w1", slots=2)
    [retried] = g.submit()
    [job] = w.take("JOB")
    reply = run(g.d.fail(w, retried, job["lease"], "boom", True))
    assert reply["retry_in"] == 4.0
    g.clock.advance(20.0)  # one step: every timer runs late, the worker's lines wait unread
    # The backoff ended during the stall, after the worker's beat was due: it gets the job all the same.
    assert [j["job"] for j in w.take("JOB")] == [retried]
    [fresh] = g.submit()
    assert [j["job"] for j in w.take("JOB")] == [fresh]


def test_after_a_stall_a_worker_that_stays_silent_is_skipped_one_beat_later():
    """The allowance after a stall is one beat, once: a worker still silent then gets no new job until heard."""
    g = Grid(beat=2.0, deadline=20.0)  # the heartbeat deadline is not what this is about
    w = g.worker("w1")
    g.clock.advance(4.0)  # a stall: the one-beat timer runs 2 s late
    beating(g, 1.5)
    [first] = g.submit()
    assert [j["job"] for j in w.take("JOB")] == [first]
    g.finish(w, {"job": first, "lease": g.d.jobs[first].token, "records": [{"i": 0, "data": "a"}]})
    beating(g, 0.5)  # one beat after the stall, nothing heard
    [second] = g.submit()
    assert w.take("JOB") == []
    g.d.seen(w)
    assert [j["job"] for j in w.take("JOB")] == [second]
