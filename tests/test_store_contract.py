"""The store contract (gridd.store.base), asserted on every implementation alike.

The ``store`` fixture yields a started store of each kind: memory, SQLite,
and MySQL on the session's throwaway MariaDB server (``tests/mariadb.py``).
Another kind joins by adding a parameter and a branch there, and nothing else.
"""

from __future__ import annotations

import contextlib

import pytest
import pytest_twisted

from gridd.errors import (
    DuplicateResult,
    Incomplete,
    InvalidState,
    StaleLease,
    Unavailable,
    UnknownJob,
    UnknownRecord,
)
from gridd.store.base import ACTIVE_STATES, JOB_STATES, SETTABLE_STATES, JobSpec, RecordResult
from gridd.store.memory import MemoryStore
from gridd.store.mysql import MySQLStore
from gridd.store.sqlite import SQLiteStore

T0 = 1_000_000.0


@pytest_twisted.async_yield_fixture(params=["memory", "sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
async def store(request, tmp_path):
    """A started store of each kind, stopped after the test; MySQL's on a fresh database."""
    with contextlib.ExitStack() as cleanup:
        if request.param == "memory":
            store = MemoryStore()
        elif request.param == "sqlite":
            store = SQLiteStore(str(tmp_path / "gridd.db"))
        elif request.param == "mysql":
            store = MySQLStore(cleanup.enter_context(request.getfixturevalue("mariadb").database()))
        await store.start()
        yield store
        await store.stop()


def spec(records=3, **fields) -> JobSpec:
    """A job of ``records`` small records, or of the records given."""
    if isinstance(records, int):
        records = [{"n": n} for n in range(records)]
    return JobSpec(type=fields.pop("type", "noop"), records=records, **fields)


def ok(*indices) -> list[RecordResult]:
    return [RecordResult(i, {"double": 2 * i}) for i in indices]


def event(at, name, attempt=None, lease=None, worker=None, detail=None) -> dict:
    """A history entry as get_job shows it."""
    return {"at": at, "event": name, "attempt": attempt, "lease": lease, "worker": worker, "detail": detail}


async def leased_job(store, records=3, lease="L1", worker="w1") -> int:
    """Submit a job and grant it as attempt 1; return its id."""
    [job_id] = await store.submit([spec(records)], T0)
    await store.grant(job_id, lease, worker, 1, T0 + 1)
    return job_id


async def snapshot(store, job_id):
    """Everything the store shows about a job, to prove a refused write changed nothing."""
    return await store.get_job(job_id), await store.get_results(job_id), await store.load_active()


# -- submit ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_submit_ids_ordered(store):
    """Submitted jobs get increasing ids, in the order given, and start queued."""
    specs = [
        spec(2, name="first", priority=5, requires={"tags": ["gpu"]}, params={"size": 3}, timeout=60.0),
        spec(1, type="resize", retries=0, submitter="cron"),
        spec(0),
    ]
    ids = await store.submit(specs, T0)
    assert ids == sorted(ids) and len(set(ids)) == 3
    job = await store.get_job(ids[0])
    assert job == {
        "id": ids[0],
        "name": "first",
        "type": "noop",
        "state": "queued",
        "priority": 5,
        "requires": {"tags": ["gpu"]},
        "params": {"size": 3},
        "total": 2,
        "accepted": 0,
        "failed_records": 0,
        "attempts": 0,
        "retries": 3,
        "timeout": 60.0,
        "lease": None,
        "worker": None,
        "not_before": None,
        "submitter": None,
        "created": T0,
        "updated": T0,
        "history": [event(T0, "submitted")],
    }
    second = await store.get_job(ids[1])
    assert (second["type"], second["retries"], second["submitter"], second["total"]) == ("resize", 0, "cron", 1)
    assert (await store.get_job(ids[2]))["total"] == 0
    assert await store.submit([], T0) == []


@pytest_twisted.ensureDeferred
async def test_submit_any_json_record_round_trips(store):
    """Record data may be any JSON value, and comes back equal."""
    records = [None, 0, -1.5, "é ✓", [1, [2]], {"a": {"b": True}}, ""]
    [job_id] = await store.submit([spec(records)], T0)
    [active] = await store.load_active()
    assert active.id == job_id
    assert active.pending == dict(enumerate(records))


@pytest_twisted.ensureDeferred
async def test_submit_values_copied(store):
    """Changing a value after submitting it, or one read back, changes nothing stored."""
    records = [{"n": [1]}]
    params = {"p": [1]}
    [job_id] = await store.submit([spec(records, params=params)], T0)
    records[0]["n"].append(2)
    params["p"].append(2)
    [active] = await store.load_active()
    active.pending[0]["n"].append(3)
    active.params["p"].append(3)
    [again] = await store.load_active()
    assert again.pending == {0: {"n": [1]}}
    assert again.params == {"p": [1]}
    assert (await store.get_job(job_id))["params"] == {"p": [1]}


@pytest.mark.parametrize(("value", "error"), [(float("nan"), ValueError), (object(), TypeError)])
@pytest_twisted.ensureDeferred
async def test_submit_non_json_fails(store, value, error):
    """A value that is not JSON fails the submit, and no job is stored."""
    with pytest.raises(error):
        await store.submit([spec(1), spec([value])], T0)
    assert await store.counts() == dict.fromkeys(JOB_STATES, 0)


# -- grant ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_grant_queued_job_runs(store):
    """Granting a queued job makes it running under the lease, worker and attempt given."""
    [job_id] = await store.submit([spec()], T0)
    queued = await store.get_job(job_id)
    await store.grant(job_id, "L1", "w1", 1, T0 + 1)
    assert await store.get_job(job_id) == queued | {
        "state": "running",
        "lease": "L1",
        "worker": "w1",
        "attempts": 1,
        "updated": T0 + 1,
        "history": queued["history"] + [event(T0 + 1, "leased", 1, "L1", "w1")],
    }


@pytest_twisted.ensureDeferred
async def test_grant_running_job_invalid_state(store):
    """Granting a job that is not queued raises InvalidState naming its state, and changes nothing."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(InvalidState) as caught:
        await store.grant(job_id, "L2", "w2", 2, T0 + 2)
    assert caught.value.extra == {"state": "running"}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_grant_unknown_job_raises(store):
    """Granting a job that does not exist raises UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.grant(999, "L1", "w1", 1, T0)


# -- add_results ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_add_results_returns_accepted_count(store):
    """Each accepted batch fires with the job's accepted count so far."""
    job_id = await leased_job(store, records=4)
    assert await store.add_results(job_id, "L1", ok(0, 2), T0 + 2) == 2
    assert await store.add_results(job_id, "L1", [], T0 + 3) == 2
    assert await store.add_results(job_id, "L1", ok(3), T0 + 4) == 3
    job = await store.get_job(job_id)
    assert (job["accepted"], job["state"], job["updated"]) == (3, "running", T0 + 4)


@pytest_twisted.ensureDeferred
async def test_add_results_error_result_accepted(store):
    """A record's error is its accepted result, counted as accepted and as a failed record."""
    job_id = await leased_job(store)
    results = [RecordResult(0, error="bad input"), RecordResult(1, None)]
    assert await store.add_results(job_id, "L1", results, T0 + 2) == 2
    job = await store.get_job(job_id)
    assert (job["accepted"], job["failed_records"]) == (2, 1)
    assert await store.get_results(job_id) == [
        {"i": 0, "error": "bad input", "worker": "w1", "lease": "L1"},
        {"i": 1, "out": None, "worker": "w1", "lease": "L1"},
    ]


@pytest_twisted.ensureDeferred
async def test_add_results_duplicate_in_one_call(store):
    """A record given twice in one call raises DuplicateResult, and none of the call is accepted."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(DuplicateResult) as caught:
        await store.add_results(job_id, "L1", ok(1, 0, 1), T0 + 2)
    assert caught.value.extra == {"records": [1]}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_add_results_duplicate_across_calls(store):
    """A record already accepted raises DuplicateResult, and the rest of the call is not accepted."""
    job_id = await leased_job(store)
    await store.add_results(job_id, "L1", ok(0), T0 + 2)
    before = await snapshot(store, job_id)
    with pytest.raises(DuplicateResult) as caught:
        await store.add_results(job_id, "L1", [RecordResult(2, "new"), RecordResult(0, "again")], T0 + 3)
    assert caught.value.extra == {"records": [0]}
    assert await snapshot(store, job_id) == before
    assert await store.get_results(job_id) == [{"i": 0, "out": {"double": 0}, "worker": "w1", "lease": "L1"}]


@pytest_twisted.ensureDeferred
async def test_add_results_unknown_record(store):
    """An index outside the job raises UnknownRecord listing them, and nothing is accepted."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(UnknownRecord) as caught:
        await store.add_results(job_id, "L1", ok(1, 3, -1), T0 + 2)
    assert caught.value.extra == {"records": [-1, 3]}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_add_results_stale_after_release(store):
    """Results under a lease that was released raise StaleLease and change nothing."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="worker lost")
    before = await snapshot(store, job_id)
    with pytest.raises(StaleLease):
        await store.add_results(job_id, "L1", ok(0), T0 + 3)
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_add_results_stale_after_regrant(store):
    """Results under a superseded lease raise StaleLease even while the job runs under a new one."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="heartbeat missed")
    await store.grant(job_id, "L2", "w2", 2, T0 + 3)
    before = await snapshot(store, job_id)
    with pytest.raises(StaleLease):
        await store.add_results(job_id, "L1", ok(0), T0 + 4)
    assert await snapshot(store, job_id) == before
    assert await store.add_results(job_id, "L2", ok(0), T0 + 5) == 1
    [result] = await store.get_results(job_id)
    assert (result["worker"], result["lease"]) == ("w2", "L2")


@pytest_twisted.ensureDeferred
async def test_add_results_queued_job_stale(store):
    """A job that holds no lease accepts no results, whatever lease is named."""
    [job_id] = await store.submit([spec()], T0)
    for lease in ("L1", None):
        with pytest.raises(StaleLease):
            await store.add_results(job_id, lease, ok(0), T0 + 1)


@pytest_twisted.ensureDeferred
async def test_add_results_unknown_job_raises(store):
    """Results for a job that does not exist raise UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.add_results(999, "L1", ok(0), T0)


# -- complete ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_complete_full_count_done(store):
    """Completing with the trailing results marks the job done and ends its lease."""
    job_id = await leased_job(store)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    running = await store.get_job(job_id)
    await store.complete(job_id, "L1", ok(2), T0 + 3)
    assert await store.get_job(job_id) == running | {
        "state": "done",
        "accepted": 3,
        "lease": None,
        "worker": None,
        "updated": T0 + 3,
        "history": running["history"] + [event(T0 + 3, "completed", 1, "L1", "w1")],
    }
    assert [r["i"] for r in await store.get_results(job_id)] == [0, 1, 2]
    assert await store.load_active() == []


@pytest_twisted.ensureDeferred
async def test_complete_missing_results_incomplete(store):
    """Completing short of the full count raises Incomplete with the number missing, and accepts nothing."""
    job_id = await leased_job(store, records=4)
    await store.add_results(job_id, "L1", ok(0), T0 + 2)
    before = await snapshot(store, job_id)
    with pytest.raises(Incomplete) as caught:
        await store.complete(job_id, "L1", ok(1), T0 + 3)
    assert caught.value.extra == {"missing": 2}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_complete_empty_job_done(store):
    """A job without records completes at once."""
    [job_id] = await store.submit([spec(0)], T0)
    await store.grant(job_id, "L1", "w1", 1, T0 + 1)
    await store.complete(job_id, "L1", [], T0 + 2)
    assert (await store.get_job(job_id))["state"] == "done"


@pytest_twisted.ensureDeferred
async def test_complete_twice_stale(store):
    """A completed job holds no lease, so completing it again raises StaleLease."""
    job_id = await leased_job(store, records=1)
    await store.complete(job_id, "L1", ok(0), T0 + 2)
    before = await snapshot(store, job_id)
    with pytest.raises(StaleLease):
        await store.complete(job_id, "L1", [], T0 + 3)
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_complete_duplicate_trailing_result(store):
    """A trailing result already accepted raises DuplicateResult, and the job stays running."""
    job_id = await leased_job(store, records=2)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    before = await snapshot(store, job_id)
    with pytest.raises(DuplicateResult):
        await store.complete(job_id, "L1", ok(1), T0 + 3)
    assert await snapshot(store, job_id) == before


# -- release ----------------------------------------------------------------


@pytest.mark.parametrize("state", SETTABLE_STATES)
@pytest_twisted.ensureDeferred
async def test_release_moves_job_with_history(store, state):
    """Releasing ends the lease, moves the job to the state given and records why."""
    job_id = await leased_job(store)
    running = await store.get_job(job_id)
    await store.release(job_id, "L1", state, T0 + 2, reason="handler error", error="Traceback ...")
    detail = {"to": state, "reason": "handler error", "error": "Traceback ..."}
    assert await store.get_job(job_id) == running | {
        "state": state,
        "lease": None,
        "worker": None,
        "updated": T0 + 2,
        "history": running["history"] + [event(T0 + 2, "released", 1, "L1", "w1", detail)],
    }


@pytest_twisted.ensureDeferred
async def test_release_backoff_and_attempts(store):
    """A release sets the backoff time and may give the attempt back; the next grant clears the backoff."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="host busy", not_before=T0 + 60, attempts=0)
    job = await store.get_job(job_id)
    assert (job["not_before"], job["attempts"]) == (T0 + 60, 0)
    assert job["history"][-1]["attempt"] == 1
    [active] = await store.load_active()
    assert (active.not_before, active.attempts, active.lease, active.worker) == (T0 + 60, 0, None, None)
    await store.grant(job_id, "L2", "w2", 1, T0 + 61)
    assert (await store.get_job(job_id))["not_before"] is None


@pytest_twisted.ensureDeferred
async def test_release_keeps_accepted_results(store):
    """Results accepted before a release stay, so the job resumes where it stopped."""
    job_id = await leased_job(store, records=3)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    await store.release(job_id, "L1", "queued", T0 + 3, reason="worker lost")
    [active] = await store.load_active()
    assert active.pending == {2: {"n": 2}}
    assert (await store.get_job(job_id))["accepted"] == 2


@pytest_twisted.ensureDeferred
async def test_release_stale_lease(store):
    """Releasing under a lease that is not the job's raises StaleLease and changes nothing."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(StaleLease):
        await store.release(job_id, "L0", "failed", T0 + 2, reason="timeout")
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_release_unknown_job_raises(store):
    """Releasing a job that does not exist raises UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.release(999, "L1", "queued", T0, reason="worker lost")


@pytest.mark.parametrize("state", ["running", "done", "lost"])
@pytest_twisted.ensureDeferred
async def test_release_unsettable_state_value_error(store, state):
    """Releasing to a state that only grant or complete reach, or to no state, raises ValueError."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(ValueError):
        await store.release(job_id, "L1", state, T0 + 2, reason="bug")
    assert await snapshot(store, job_id) == before


# -- set_state --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_set_state_allowed_moves_job(store):
    """A job in an allowed state moves to the new state, with the change in its history."""
    [job_id] = await store.submit([spec()], T0)
    queued = await store.get_job(job_id)
    await store.set_state(job_id, ("queued", "running"), "paused", T0 + 1, reason="operator pause")
    detail = {"from": "queued", "to": "paused", "reason": "operator pause"}
    assert await store.get_job(job_id) == queued | {
        "state": "paused",
        "updated": T0 + 1,
        "history": queued["history"] + [event(T0 + 1, "state", detail=detail)],
    }


@pytest_twisted.ensureDeferred
async def test_set_state_reset_attempts(store):
    """Re-queueing a failed job can give it its attempts back."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "failed", T0 + 2, reason="retries exhausted", attempts=4)
    await store.set_state(job_id, ("failed",), "queued", T0 + 3, reason="operator requeue", reset_attempts=True)
    job = await store.get_job(job_id)
    assert (job["state"], job["attempts"]) == ("queued", 0)
    await store.set_state(job_id, ("queued",), "paused", T0 + 4, reason="operator pause")
    assert (await store.get_job(job_id))["attempts"] == 0


@pytest_twisted.ensureDeferred
async def test_set_state_clears_backoff(store):
    """An operator's move overrides a job's backoff."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="handler error", not_before=T0 + 60)
    await store.set_state(job_id, ("queued",), "paused", T0 + 3, reason="operator pause")
    assert (await store.get_job(job_id))["not_before"] is None


@pytest_twisted.ensureDeferred
async def test_set_state_not_allowed_invalid_state(store):
    """A job outside the allowed states raises InvalidState naming its state, and stays."""
    [job_id] = await store.submit([spec()], T0)
    before = await snapshot(store, job_id)
    with pytest.raises(InvalidState) as caught:
        await store.set_state(job_id, ("paused",), "queued", T0 + 1, reason="operator resume")
    assert caught.value.extra == {"state": "queued"}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_set_state_leased_job_invalid_state(store):
    """A job that holds a lease cannot be moved by set_state, even if its state is allowed."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(InvalidState) as caught:
        await store.set_state(job_id, ("running",), "cancelled", T0 + 2, reason="operator cancel")
    assert caught.value.extra == {"state": "running"}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_set_state_unknown_job_raises(store):
    """Moving a job that does not exist raises UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.set_state(999, ("queued",), "paused", T0, reason="operator pause")


@pytest_twisted.ensureDeferred
async def test_set_state_to_done_value_error(store):
    """Only complete makes a job done: set_state to done raises ValueError."""
    [job_id] = await store.submit([spec()], T0)
    with pytest.raises(ValueError):
        await store.set_state(job_id, ("queued",), "done", T0 + 1, reason="bug")
    assert (await store.get_job(job_id))["state"] == "queued"


# -- reads ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_load_active_pending_records_only(store):
    """Active jobs come back by id with their unfinished records only: the point to resume from."""
    ids = await store.submit([spec(3, requires={"memory": 512}), spec(2), spec(1), spec(1), spec(2)], T0)
    running, queued, done, cancelled, paused = ids
    await store.grant(running, "L1", "w1", 1, T0 + 1)
    await store.add_results(running, "L1", ok(0, 2), T0 + 2)
    await store.grant(done, "L3", "w1", 1, T0 + 1)
    await store.complete(done, "L3", ok(0), T0 + 2)
    await store.set_state(cancelled, ("queued",), "cancelled", T0 + 1, reason="operator cancel")
    await store.set_state(paused, ("queued",), "paused", T0 + 1, reason="operator pause")
    active = await store.load_active()
    assert [(job.id, job.state) for job in active] == [(running, "running"), (queued, "queued"), (paused, "paused")]
    first = active[0]
    assert (first.lease, first.worker, first.attempts, first.total) == ("L1", "w1", 1, 3)
    assert (first.requires, first.params, first.name, first.submitter) == ({"memory": 512}, {}, None, None)
    assert (first.type, first.priority, first.retries, first.timeout, first.created) == ("noop", 0, 3, None, T0)
    assert first.pending == {1: {"n": 1}}
    assert active[1].pending == {0: {"n": 0}, 1: {"n": 1}}
    assert {job.state for job in active} <= set(ACTIVE_STATES)


@pytest_twisted.ensureDeferred
async def test_load_active_job_ids_selects(store):
    """With job ids, only the active jobs among them come back."""
    a, b, c = await store.submit([spec(1), spec(2), spec(1)], T0)
    await store.set_state(c, ("queued",), "cancelled", T0 + 1, reason="operator cancel")
    [active] = await store.load_active(job_ids=[b, c, 999])
    assert (active.id, active.pending) == (b, {0: {"n": 0}, 1: {"n": 1}})
    assert await store.load_active(job_ids=[]) == []
    assert [job.id for job in await store.load_active(job_ids=[b, a])] == [a, b]


@pytest_twisted.ensureDeferred
async def test_get_job_unknown_raises(store):
    """Asking for a job that does not exist raises UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.get_job(999)


@pytest_twisted.ensureDeferred
async def test_get_results_pages_by_index(store):
    """Accepted results come back by index, after a given index and up to a limit."""
    job_id = await leased_job(store, records=6)
    await store.add_results(job_id, "L1", ok(4, 0, 2), T0 + 2)
    await store.add_results(job_id, "L1", [RecordResult(1, error="boom")], T0 + 3)
    first = await store.get_results(job_id, limit=2)
    assert first == [
        {"i": 0, "out": {"double": 0}, "worker": "w1", "lease": "L1"},
        {"i": 1, "error": "boom", "worker": "w1", "lease": "L1"},
    ]
    assert [r["i"] for r in await store.get_results(job_id, after=1, limit=2)] == [2, 4]
    assert await store.get_results(job_id, after=4) == []


@pytest_twisted.ensureDeferred
async def test_get_results_unknown_job_raises(store):
    """Asking for the results of a job that does not exist raises UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.get_results(999)


@pytest_twisted.ensureDeferred
async def test_list_jobs_filters(store):
    """Listing filters by state and by type, and summarises each job."""
    a, b, c = await store.submit([spec(2, name="a"), spec(1, type="resize"), spec(1, type="resize")], T0)
    await store.grant(b, "L1", "w1", 1, T0 + 1)
    assert [j["id"] for j in await store.list_jobs(state="queued")] == [a, c]
    assert [j["id"] for j in await store.list_jobs(type="resize")] == [b, c]
    assert [j["id"] for j in await store.list_jobs(state="running", type="resize")] == [b]
    assert await store.list_jobs(state="done") == []
    [summary] = await store.list_jobs(type="noop")
    assert summary == {
        "id": a,
        "name": "a",
        "type": "noop",
        "state": "queued",
        "priority": 0,
        "total": 2,
        "accepted": 0,
        "attempts": 0,
        "worker": None,
        "created": T0,
        "updated": T0,
    }


@pytest_twisted.ensureDeferred
async def test_list_jobs_pages_by_id(store):
    """Listing returns jobs by id, after a given id and up to a limit."""
    ids = await store.submit([spec(1) for _ in range(5)], T0)
    first = [j["id"] for j in await store.list_jobs(limit=2)]
    assert first == ids[:2]
    assert [j["id"] for j in await store.list_jobs(after=first[-1], limit=2)] == ids[2:4]
    assert [j["id"] for j in await store.list_jobs(after=ids[3])] == ids[4:]


@pytest_twisted.ensureDeferred
async def test_counts_every_state(store):
    """Counts name every state, with zero for the states no job is in."""
    assert await store.counts() == dict.fromkeys(JOB_STATES, 0)
    ids = await store.submit([spec(1) for _ in range(4)], T0)
    await store.grant(ids[0], "L1", "w1", 1, T0 + 1)
    await store.set_state(ids[1], ("queued",), "cancelled", T0 + 1, reason="operator cancel")
    assert await store.counts() == dict.fromkeys(JOB_STATES, 0) | {"queued": 2, "running": 1, "cancelled": 1}


# -- lifecycle --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_stop_refuses_later_calls(store):
    """A stopped store answers Unavailable to reads and writes alike, and stopping again is harmless."""
    await store.stop()
    with pytest.raises(Unavailable):
        await store.submit([spec()], T0)
    with pytest.raises(Unavailable):
        await store.counts()
    await store.stop()
