"""The good-guest verbs over the wire: STATE, CHECK, RETURN vacate, HELLO state, HOST and WORKER busy|idle.

The server on a task.Clock, the memory store and StringTransports (the Stack
of tests/test_server.py), lines fed whole and in small chunks: no sockets,
no sleeps.
"""

from __future__ import annotations

import pytest

from tests.test_server import Stack, run


@pytest.fixture
def stack():
    s = Stack()
    yield s
    s.stop()


def ok(reply) -> dict:
    assert reply is not None and reply.verb == "OK", reply
    return {k: v for k, v in reply.body.items() if k != "rid"}


def err(reply) -> str:
    assert reply is not None and reply.verb == "ERR", reply
    return reply.body["code"]


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_server_state_busy_holds_jobs_back_and_idle_sends_them_at_once(stack, chunk):
    """STATE busy: OK and no JOB for a submitted job; STATE idle: the JOB follows on that line alone."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    w1.send("STATE", {"rid": 5, "state": "busy", "reason": "keyboard"}, chunk=chunk)
    assert ok(w1.reply(5)) == {}
    job_id = stack.submit(c1)
    assert w1.take("JOB") == []
    w1.send("STATE", {"rid": 6, "state": "idle"}, chunk=chunk)
    assert ok(w1.reply(6)) == {}
    [job] = w1.take("JOB")
    assert job["job"] == job_id


def test_server_hello_state_busy_registers_the_worker_busy(stack):
    """A HELLO with state busy: no JOB, and WORKERS says busy, until STATE idle."""
    c1 = stack.client()
    stack.submit(c1)
    w1 = stack.worker("w1", state="busy")
    assert w1.take("JOB") == []
    [view] = ok(c1.request("WORKERS"))["workers"]
    assert (view["state"], view["silent"]) == ("busy", False)
    ok(w1.request("STATE", {"state": "idle"}))
    assert len(w1.take("JOB")) == 1


def test_server_hello_state_vacating_is_bad_request_and_closes(stack):
    """A HELLO may say idle or busy only: vacating is bad_request, and like every refused HELLO it closes."""
    peer = stack.connect()
    reply = stack.hello(peer, "worker", "w1", slots=1, types={"noop": "1.0"}, state="vacating")
    assert err(reply) == "bad_request" and "'state'" in reply.body["message"]
    assert peer.closed


def test_server_state_from_a_client_is_forbidden_and_changes_nothing(stack):
    """STATE and CHECK are worker verbs: a client gets forbidden with its rid and stays connected."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    before = stack.snapshot()
    assert err(c1.request("STATE", {"state": "busy"})) == "forbidden"
    assert err(c1.request("CHECK", {"holding": []})) == "forbidden"
    assert not c1.closed and stack.snapshot() == before
    [view] = ok(c1.request("WORKERS"))["workers"]
    assert view["state"] == "idle" and w1.take_all() == []


def test_server_state_with_an_unknown_state_is_bad_request_and_changes_nothing(stack):
    """STATE away: bad_request naming the field; the worker stays idle and connected."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    reply = w1.request("STATE", {"state": "away"})
    assert err(reply) == "bad_request" and reply.body["message"] == "STATE: invalid field 'state'"
    stack.submit(c1)
    assert len(w1.take("JOB")) == 1 and not w1.closed


def test_server_return_vacate_queues_the_job_for_another_worker_and_stats_count_it(stack):
    """RETURN vacate: OK; the job goes to w2 at the same attempt with the records left; STATS vacates 1."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    job_id = stack.submit(c1, records=["a", "b"])
    [job] = w1.take("JOB")
    ok(w1.request("RESULT", {"job": job_id, "lease": job["lease"], "results": [{"i": 0, "out": "A"}]}))
    body = {"job": job_id, "lease": job["lease"], "reason": "host busy for 600 s", "vacate": True}
    assert ok(w1.request("RETURN", body)) == {}
    ok(w1.request("STATE", {"state": "busy"}))
    w2 = stack.worker("w2")
    [again] = w2.take("JOB")
    assert (again["attempt"], again["records"]) == (1, [{"i": 1, "data": "b"}])
    assert ok(c1.request("STATS"))["vacates"] == 1
    released = [e for e in run(stack.store.get_job(job_id))["history"] if e["event"] == "released"]
    assert [e["detail"]["reason"] for e in released] == ["vacated"]


def test_server_return_vacate_again_after_it_was_answered_is_stale(stack):
    """A second RETURN vacate for the same lease is stale_lease (reason vacated) and counted once."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    job_id = stack.submit(c1)
    [job] = w1.take("JOB")
    body = {"job": job_id, "lease": job["lease"], "vacate": True}
    ok(w1.request("RETURN", body))
    reply = w1.request("RETURN", body)
    assert err(reply) == "stale_lease" and "(vacated)" in reply.body["message"]
    assert ok(c1.request("STATS"))["vacates"] == 1


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_server_check_answers_kept_with_todo_and_lost_with_reason(stack, chunk):
    """CHECK over the wire: the lease it holds kept with its todo, another worker's lost, an unknown job lost."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    w2 = stack.worker("w2")
    job_id = stack.submit(c1, records=["a", "b", "c"])
    other = stack.submit(c1)
    [mine] = w1.take("JOB")
    [theirs] = w2.take("JOB")
    assert (mine["job"], theirs["job"]) == (job_id, other)
    ok(w1.request("RESULT", {"job": job_id, "lease": mine["lease"], "results": [{"i": 2, "out": "C"}]}))
    holding = [
        {"job": job_id, "lease": mine["lease"]},
        {"job": other, "lease": theirs["lease"]},
        {"job": 42, "lease": "L42"},
    ]
    w1.send("CHECK", {"rid": 9, "holding": holding}, chunk=chunk)
    assert ok(w1.reply(9)) == {
        "kept": [{"job": job_id, "lease": mine["lease"], "todo": [0, 1]}],
        "lost": [
            {"job": other, "lease": theirs["lease"], "reason": "superseded"},
            {"job": 42, "lease": "L42", "reason": "unknown"},
        ],
    }
    # Nothing moved: w2 still holds its lease and can finish.
    assert ok(w2.request("DONE", {"job": other, "lease": theirs["lease"], "results": [{"i": 0, "out": 1}]})) == {}


def test_server_check_after_the_lease_timed_out_says_lost_timeout_and_results_are_stale(stack):
    """A worker stopped past its job's run-time limit (it still beat): CHECK says lost timeout; its RESULT is stale."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    job_id = stack.submit(c1, records=["a"], timeout=3.0)
    [job] = w1.take("JOB")
    w1.take_all()
    for _ in range(4):
        stack.advance(1.0)
        w1.send("BEAT")
        c1.send("BEAT")
    assert w1.take("REVOKE") == [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]
    reply = ok(w1.request("CHECK", {"holding": [{"job": job_id, "lease": job["lease"]}]}))
    assert reply == {"kept": [], "lost": [{"job": job_id, "lease": job["lease"], "reason": "timeout"}]}
    result = {"job": job_id, "lease": job["lease"], "results": [{"i": 0, "out": 1}]}
    assert err(w1.request("RESULT", result)) == "stale_lease"


def test_server_worker_busy_sends_host_now_and_after_the_next_hello(stack):
    """WORKER busy: HOST busy to the worker now; after a reconnect, HOST again right after the HELLO reply."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    assert ok(c1.request("WORKER", {"worker": "w1", "action": "busy", "reason": "desk in use"})) == {"connected": True}
    assert w1.take("HOST") == [{"busy": True, "reason": "desk in use"}]
    ok(c1.request("WORKER", {"worker": "w1", "action": "disconnect"}))
    assert w1.closed
    stack.submit(c1)
    again = stack.connect()
    again.send("HELLO", {"rid": 1, "proto": 1, "role": "worker", "name": "w1", "token": "s3cret", "slots": 1,
                         "types": {"noop": "1.0"}})  # fmt: skip
    verbs = [m.verb for m in again.take_all()]
    assert verbs == ["OK", "HOST", "JOB"]


def test_server_worker_idle_for_a_name_not_connected_answers_connected_false(stack):
    """WORKER idle for a name not connected: OK connected false, and the worker hears HOST idle at its HELLO."""
    c1 = stack.client()
    assert ok(c1.request("WORKER", {"worker": "vm9", "action": "idle"})) == {"connected": False}
    vm9 = stack.worker("vm9")
    assert vm9.take("HOST") == [{"busy": False, "reason": "said by an operator"}]


def test_server_job_carries_memory_when_the_job_requires_it(stack):
    """JOB memory is the job's requires.memory; the worker parses it (SERVER_VERBS)."""
    c1 = stack.client()
    w1 = stack.worker("w1", memory=4096)
    stack.submit(c1, requires={"memory": 1536})
    [job] = w1.take("JOB")
    assert job["memory"] == 1536


def test_server_workers_view_marks_a_worker_silent_past_one_beat(stack):
    """WORKERS: silent true once a worker has said nothing for more than a beat, false again when it is heard."""
    c1 = stack.client()
    w1 = stack.worker("w1")
    stack.advance(2.5)
    c1.send("BEAT")
    [view] = ok(c1.request("WORKERS"))["workers"]
    assert view["silent"] is True
    w1.send("BEAT")
    [view] = ok(c1.request("WORKERS"))["workers"]
    assert view["silent"] is False
