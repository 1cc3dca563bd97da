"""The controlled store (tests/controlled.py) does what its vocabulary says: other tests rest on it."""

from __future__ import annotations

import pytest

from gridd import errors
from gridd.store.base import JobSpec
from tests.controlled import ControlledStore
from tests.test_server import run


def started(**options) -> ControlledStore:
    store = ControlledStore(**options)
    run(store.start())
    return store


def spec(records=("a",)):
    return JobSpec(type="noop", records=list(records))


def failure_of(d):
    failures = []
    d.addErrback(failures.append)
    assert len(failures) == 1, "the call did not fail"
    return failures[0]


def test_held_call_is_made_at_once_and_answers_when_told():
    """``hold``: the work is done at the call (as a database commits), only the answer waits."""
    store = started()
    store.hold("submit")
    d = store.submit([spec()], 0.0)
    assert not d.called and run(store.inner.counts())["queued"] == 1
    [call] = store.held
    assert (call.name, call.succeeded, call.answered) == ("submit", True, False)
    store.answer("submit")
    assert run(d) == [1] and call.answered and store.held == []


def test_held_call_without_work_is_made_when_it_works_or_answers():
    """``hold(work=False)``: nothing happens until ``work()`` (its snapshot) or its answer."""
    store = started()
    [job_id] = run(store.submit([spec()], 0.0))
    store.hold("runnable", "counts", work=False)
    read = store.runnable(0.0, 10)
    counts = store.counts()
    store.held[0].work()  # the read looks now: the job is there
    run(store.set_state(job_id, ("queued",), "cancelled", 1.0, reason="cancelled"))
    store.answer_all()
    assert run(read) == [job_id]
    assert run(counts)["queued"] == 0  # it looked only when answered


def test_failing_call_changes_nothing_until_cleared():
    """``fail``: the call fails with the error given and changes nothing, ``times`` times or until cleared."""
    store = started()
    store.fail("submit", errors.Unavailable("down"), times=1)
    assert failure_of(store.submit([spec()], 0.0)).check(errors.Unavailable)
    assert run(store.inner.counts())["queued"] == 0
    assert run(store.submit([spec()], 0.0)) == [1]  # the rule was for one call
    store.fail("submit", errors.Unavailable("down"))
    for _ in range(3):
        failure_of(store.submit([spec()], 0.0))
    store.clear("submit")
    assert run(store.submit([spec()], 0.0)) == [2]


def test_lost_call_is_made_then_answered_commit_unknown():
    """``lose``: the next request's write commits, then its answer is ``commit_unknown``; housekeeping is left alone."""
    store = started(server_id="A")
    store.lose()
    run(store.beat(0.0, 6.0))  # housekeeping: not the write armed for
    assert failure_of(store.submit([spec()], 0.0)).check(errors.CommitUnknown)
    assert run(store.inner.counts())["queued"] == 1
    assert run(store.submit([spec()], 0.0)) == [2]


def test_in_commit_order_writes_wait_behind_a_held_write_and_answer_oldest_first():
    """``in_commit_order``: a write behind a held write is held too; held writes let go oldest first, reads any time."""
    store = started(in_commit_order=True)
    store.hold("submit", "get_job")
    first = store.submit([spec()], 0.0)
    store.clear()
    second = store.submit([spec("b")], 0.0)  # not held by a rule: behind the held write
    read = store.get_job(1)  # a read passes
    assert run(read)["id"] == 1 and not second.called
    store.hold("get_job")
    held_read = store.get_job(1)
    assert [store.held[k].name for k in store.releasable()] == ["get_job", "submit"]
    store.let_go(1)  # the oldest write
    assert run(first) == [1] and not second.called
    store.let_go(1)
    assert run(second) == [2] and not held_read.called
    store.let_go(0)
    assert run(held_read)["id"] == 1


def test_cause_follows_a_coroutine_across_its_awaits():
    """A call made by a coroutine that resumed on another call's answer is its own request's."""
    from twisted.internet import defer

    store = started()
    store.hold("submit")

    async def request():
        await store.submit([spec()], 0.0)
        await store.counts()

    store.cause = ("c", 1)
    done = defer.Deferred.fromCoroutine(request())
    store.cause = ("c", 2)
    store.get_job(1)
    store.cause = None
    store.answer("submit")  # answered outside any request: the coroutine resumes as ("c", 1)
    run(done)
    assert [(c.name, c.cause) for c in store.calls[1:]] == [  # after the start
        ("submit", ("c", 1)),
        ("get_job", ("c", 2)),
        ("counts", ("c", 1)),
    ]


def test_answering_what_is_not_held_is_an_error():
    with pytest.raises(AssertionError, match="no grant call is held"):
        ControlledStore().answer("grant")
