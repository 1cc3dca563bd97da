"""What a worker says of its host (HELLO state, STATE), vacates, the lease check after a suspend, and HOST.

On a task.Clock and the memory store, with the Grid helper of
tests/test_dispatcher.py: no sockets, no sleeps.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer

from gridd import errors
from gridd.scheduler.control import HOST_SETTINGS_KEPT
from tests.controlled import ControlledStore
from tests.test_dispatcher import FakeConnection, Grid, run
from tests.test_scheduler_guests import beating


def view_of(g: Grid, name: str) -> dict:
    [view] = [w for w in run(g.d.workers_view())["workers"] if w["name"] == name]
    return view


# ----------------------------------------------------------------------
# STATE and HELLO state: only an idle worker gets new jobs


@pytest.mark.parametrize("state", ["busy", "vacating"])
def test_worker_busy_or_vacating_gets_no_new_job_and_idle_brings_one_at_once(state):
    """STATE busy or vacating: no JOB, the job stays queued; STATE idle: the job is pushed in that same call."""
    g = Grid()
    w = g.worker("w1", slots=2)
    assert run(g.d.set_state(w, state, "a person at the desk")) == {}
    [job_id] = g.submit()
    assert w.take("JOB") == [] and run(g.d.stats())["queued_runnable"] == 1
    assert run(g.d.set_state(w, "idle")) == {}
    [job] = w.take("JOB")
    assert job["job"] == job_id


def test_busy_worker_keeps_its_leases_and_reports_on_them():
    """A worker that goes busy with a job keeps its lease: its RESULT and DONE are taken, only new work stops."""
    g = Grid()
    w = g.worker("w1", slots=2)
    [first] = g.submit(records=["a", "b"])
    [job] = w.take("JOB")
    run(g.d.set_state(w, "vacating", "keyboard"))
    [second] = g.submit()
    assert w.take("JOB") == []
    g.finish(w, job)
    assert g.state(first)["state"] == "done"
    assert w.take("JOB") == [] and g.state(second)["state"] == "queued"


def test_busy_worker_passed_over_while_an_idle_one_gets_the_job():
    """Matching skips a busy worker whatever its place in the table; the idle one behind it gets the job."""
    g = Grid()
    w1, w2 = g.worker("w1"), g.worker("w2")
    run(g.d.set_state(w1, "busy"))
    [job_id] = g.submit()
    assert w1.take("JOB") == []
    assert [j["job"] for j in w2.take("JOB")] == [job_id]


def test_hello_state_busy_gets_no_job_until_state_idle():
    """A HELLO that says state busy: the worker is registered busy and its free slots stay empty."""
    g = Grid()
    [job_id] = g.submit()
    w = g.worker("w1", state="busy")
    assert w.take("JOB") == []
    assert view_of(g, "w1")["state"] == "busy"
    run(g.d.set_state(w, "idle"))
    assert [j["job"] for j in w.take("JOB")] == [job_id]


def test_hello_without_state_is_idle():
    """No state in the HELLO: the worker is idle and takes work at once."""
    g = Grid()
    [job_id] = g.submit()
    w = g.worker("w1")
    assert [j["job"] for j in w.take("JOB")] == [job_id]
    assert view_of(g, "w1")["state"] == "idle"


def test_workers_view_shows_state_reason_since_and_silence():
    """WORKERS: state, its reason, when it began (kept while only the reason changes), and silent past one beat."""
    g = Grid(beat=2.0)
    w = g.worker("w1")
    started = g.clock.seconds()
    view = view_of(g, "w1")
    assert (view["state"], view["state_reason"], view["state_since"], view["silent"]) == ("idle", "", started, False)
    g.clock.advance(1.0)
    g.d.seen(w)
    run(g.d.set_state(w, "busy", "cpu 80 %"))
    g.clock.advance(1.0)
    g.d.seen(w)
    run(g.d.set_state(w, "busy", "cpu 90 %"))
    view = view_of(g, "w1")
    assert (view["state"], view["state_reason"], view["state_since"]) == ("busy", "cpu 90 %", started + 1.0)
    g.clock.advance(2.5)  # nothing heard for more than a beat
    assert view_of(g, "w1")["silent"] is True
    g.d.seen(w)
    assert view_of(g, "w1")["silent"] is False


# ----------------------------------------------------------------------
# RETURN vacate


def test_vacate_requeues_at_once_keeps_results_costs_no_attempt_and_is_in_history():
    """RETURN vacate: queued again at once for another worker from the first unfinished record; history says vacated."""
    g = Grid()
    w1, w2 = g.worker("w1"), g.worker("w2")
    run(g.d.set_state(w2, "busy"))
    [job_id] = g.submit(records=["a", "b", "c"], retries=0)
    [job] = w1.take("JOB")
    run(g.d.result(w1, job_id, job["lease"], [{"i": 0, "out": "A"}]))
    run(g.d.set_state(w1, "vacating", "desk in use"))
    reply = run(g.d.give_back(w1, job_id, job["lease"], "vacated: the host was busy for 600 s", True))
    assert reply == {}
    run(g.d.set_state(w1, "busy", "desk in use"))
    view = g.state(job_id)
    assert (view["state"], view["accepted"], view["attempts"]) == ("queued", 1, 0)
    assert view["history"][-1]["detail"] == {
        "to": "queued",
        "reason": "vacated",
        "error": "vacated: the host was busy for 600 s",
    }
    assert run(g.d.stats())["vacates"] == 1
    run(g.d.set_state(w2, "idle"))
    [again] = w2.take("JOB")
    # retries=0: a counted attempt would have failed the job; a vacate costs none.
    assert (again["job"], again["attempt"], [r["i"] for r in again["records"]]) == (job_id, 1, [1, 2])


def test_vacated_job_is_kept_from_its_worker_for_the_return_delay():
    """A vacated job goes to the worker that vacated it only after the return delay, like any RETURN."""
    g = Grid(return_delay=10.0)
    w = g.worker("w1")
    [job_id] = g.submit()
    [job] = w.take("JOB")
    run(g.d.give_back(w, job_id, job["lease"], "host busy", True))
    run(g.d.set_state(w, "idle"))  # the desk is free again at once
    beating(g, 9.5, w)
    assert w.take("JOB") == []
    beating(g, 0.5, w)
    assert [j["job"] for j in w.take("JOB")] == [job_id]


def test_vacate_of_a_lease_not_its_own_is_refused_and_changes_nothing():
    """RETURN vacate naming another worker's lease: stale_lease, the lease and the vacate count unchanged."""
    g = Grid()
    w1, w2 = g.worker("w1"), g.worker("w2")
    [job_id] = g.submit()
    [job] = w1.take("JOB")
    with pytest.raises(errors.StaleLease):
        run(g.d.give_back(w2, job_id, job["lease"], "host busy", True))
    assert g.d.jobs[job_id].token == job["lease"] and run(g.d.stats())["vacates"] == 0


def test_plain_return_is_no_vacate():
    """A RETURN without vacate is recorded as returned and not counted in vacates."""
    g = Grid()
    w = g.worker("w1")
    [job_id] = g.submit()
    [job] = w.take("JOB")
    run(g.d.give_back(w, job_id, job["lease"], "shutting down"))
    assert g.state(job_id)["history"][-1]["detail"]["reason"] == "returned"
    assert run(g.d.stats())["vacates"] == 0


# ----------------------------------------------------------------------
# CHECK: which leases are still the worker's own


def test_check_keeps_a_lease_still_held_with_the_records_left():
    """CHECK lists a lease the worker holds: kept, with the records still without an accepted result."""
    g = Grid()
    w = g.worker("w1")
    [job_id] = g.submit(records=["a", "b", "c"])
    [job] = w.take("JOB")
    run(g.d.result(w, job_id, job["lease"], [{"i": 1, "out": "B"}]))
    reply = run(g.d.check_leases(w, [{"job": job_id, "lease": job["lease"]}]))
    assert reply == {"kept": [{"job": job_id, "lease": job["lease"], "todo": [0, 2]}], "lost": []}
    g.finish(w, {**job, "records": [{"i": 0, "data": "a"}, {"i": 2, "data": "c"}]})
    assert g.state(job_id)["state"] == "done"


def test_check_after_a_suspend_past_the_deadline_reports_the_lease_lost_and_the_job_went_elsewhere():
    """Suspended past its deadline the worker was dropped; reconnected, its HELLO says lost; CHECK on a later
    lease that timed out says lost with the reason, and the job has gone to another worker."""
    g = Grid(beat=2.0)
    w1 = g.worker("w1")
    [job_id] = g.submit(records=["a", "b"], timeout=5.0)
    [job] = w1.take("JOB")
    w2 = g.worker("w2")
    beating(g, 6.0, w1, w2)  # w1 beats (its handler is stopped, not the worker) past the run-time limit
    assert g.d.jobs[job_id].token != job["lease"]
    reply = run(g.d.check_leases(w1, [{"job": job_id, "lease": job["lease"]}]))
    assert reply == {"kept": [], "lost": [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]}
    beating(g, 1.0, w1, w2)  # the backoff after a timed-out attempt
    assert [j["job"] for j in w2.take("JOB")] + [j["job"] for j in w1.take("JOB")] == [job_id]


def test_check_reports_a_lease_an_operator_ended_lost_and_keeps_the_others():
    """Two leases checked: the one requeued by an operator is lost (requeued), the other kept; nothing else moves."""
    g = Grid()
    w = g.worker("w1", slots=2)
    [a, b] = g.submit({}, {})
    jobs = {j["job"]: j for j in w.take("JOB")}
    run(g.d.requeue(a))
    w.take("REVOKE")
    holding = [{"job": a, "lease": jobs[a]["lease"]}, {"job": b, "lease": jobs[b]["lease"]}]
    reply = run(g.d.check_leases(w, holding))
    assert reply["kept"] == [{"job": b, "lease": jobs[b]["lease"], "todo": [0]}]
    assert reply["lost"] == [{"job": a, "lease": jobs[a]["lease"], "reason": "requeued"}]
    assert g.d.jobs[b].token == jobs[b]["lease"] and g.d.jobs[b].worker.name == "w1"


def test_check_of_another_workers_lease_is_lost_and_changes_nothing():
    """CHECK naming a lease another worker holds: lost (superseded); that worker keeps it."""
    g = Grid()
    w1, w2 = g.worker("w1"), g.worker("w2")
    [job_id] = g.submit()
    [job] = w1.take("JOB")
    reply = run(g.d.check_leases(w2, [{"job": job_id, "lease": job["lease"]}]))
    assert reply == {"kept": [], "lost": [{"job": job_id, "lease": job["lease"], "reason": "superseded"}]}
    assert g.d.jobs[job_id].worker.name == "w1"


def test_check_of_unknown_job_is_lost_as_unknown():
    """CHECK naming a job the store does not know: lost, reason unknown."""
    g = Grid()
    w = g.worker("w1")
    reply = run(g.d.check_leases(w, [{"job": 99, "lease": "L9"}]))
    assert reply == {"kept": [], "lost": [{"job": 99, "lease": "L9", "reason": "unknown"}]}


def test_check_leaves_unlisted_leases_alone():
    """A lease the worker holds but does not list in CHECK is neither kept nor lost: it goes on as it was."""
    g = Grid()
    w = g.worker("w1")
    [job_id] = g.submit()
    [job] = w.take("JOB")
    assert run(g.d.check_leases(w, [])) == {"kept": [], "lost": []}
    assert g.d.jobs[job_id].token == job["lease"]
    g.finish(w, job)
    assert g.state(job_id)["state"] == "done"


def test_check_answered_from_a_store_read_held_while_the_lease_ends_says_lost():
    """A CHECK whose store read is held: a listed lease that ends meanwhile is reported lost, not kept."""
    store = ControlledStore()
    g = Grid(store)
    w = g.worker("w1", slots=2)
    [job_id] = g.submit()
    [job] = w.take("JOB")
    store.hold("take_lease")
    d = defer.ensureDeferred(g.d.check_leases(w, [{"job": job_id, "lease": job["lease"]}, {"job": 77, "lease": "Lx"}]))
    result = []
    d.addBoth(result.append)
    assert result == []  # waiting for the store about job 77
    run(g.d.requeue(job_id))
    store.clear("take_lease")
    store.answer("take_lease")
    [reply] = result
    assert reply["kept"] == []
    assert sorted(e["job"] for e in reply["lost"]) == [job_id, 77]


# ----------------------------------------------------------------------
# WORKER busy|idle: HOST, remembered by name


def test_operator_busy_sends_host_to_the_worker_and_changes_nothing_else():
    """WORKER busy: the worker is sent HOST busy with the reason; the server's view of its state waits for its STATE."""
    g = Grid()
    w = g.worker("w1")
    assert run(g.d.worker_action("w1", "busy", "VM host in use")) == {"connected": True}
    assert w.take("HOST") == [{"busy": True, "reason": "VM host in use"}]
    assert view_of(g, "w1")["state"] == "idle"
    assert run(g.d.worker_action("w1", "idle")) == {"connected": True}
    assert w.take("HOST") == [{"busy": False, "reason": "said by an operator"}]


def test_operator_host_setting_is_sent_again_after_the_next_hello_before_any_job():
    """The last setting is remembered by name: a reconnecting worker hears it after its HELLO reply, before a JOB."""
    g = Grid()
    w = g.worker("w1")
    run(g.d.worker_action("w1", "busy", "desk in use"))
    w.take("HOST")
    run(g.d.worker_action("w1", "disconnect"))
    g.d.connection_lost(w)
    g.submit()
    again = g.worker("w1")
    verbs = [v for v, _ in again.sent]
    assert verbs[:2] == ["HOST", "JOB"]
    assert again.sent[0][1] == {"busy": True, "reason": "desk in use"}


def test_operator_host_setting_for_a_worker_not_connected_is_told_at_its_hello():
    """WORKER busy for a name not connected: answered connected false, remembered, sent after that worker's HELLO."""
    g = Grid()
    assert run(g.d.worker_action("vm7", "busy")) == {"connected": False}
    w = g.worker("vm7")
    assert w.take("HOST") == [{"busy": True, "reason": "said by an operator"}]
    other = g.worker("w2")
    assert other.take("HOST") == []


def test_operator_host_setting_not_sent_to_a_connection_gone_before_its_turn():
    """A worker that leaves between its HELLO and the next turn is sent nothing."""
    g = Grid()
    run(g.d.worker_action("w1", "idle"))
    conn = FakeConnection()
    run(g.d.worker_hello(conn, {"name": "w1", "slots": 1, "types": {"noop": "1"}}))
    g.d.connection_lost(conn)
    g.clock.advance(0)
    assert conn.take("HOST") == []


def test_host_settings_are_bounded_oldest_forgotten():
    """At most HOST_SETTINGS_KEPT names are remembered; setting a name again makes it the newest."""
    g = Grid()
    for n in range(HOST_SETTINGS_KEPT):
        run(g.d.worker_action(f"w{n}", "busy"))
    run(g.d.worker_action("w0", "idle"))  # w0 is now the newest
    run(g.d.worker_action("extra", "busy"))
    settings = g.d.control.host_settings
    assert len(settings) == HOST_SETTINGS_KEPT
    assert "w1" not in settings and settings["w0"] == (False, "said by an operator") and "extra" in settings


def test_drain_of_a_worker_not_connected_is_still_refused():
    """busy/idle are remembered for any name; drain, undrain and disconnect still need a connected worker."""
    g = Grid()
    with pytest.raises(errors.UnknownWorker):
        run(g.d.worker_action("nobody", "drain"))


# ----------------------------------------------------------------------
# JOB memory


def test_job_offer_carries_the_required_memory_when_set():
    """A job with requires.memory is offered with memory; one without has no memory field."""
    g = Grid()
    w = g.worker("w1", slots=2, memory=4096)
    g.submit({"requires": {"memory": 2048}}, {})
    jobs = w.take("JOB")
    assert [j.get("memory") for j in jobs] == [2048, None]
