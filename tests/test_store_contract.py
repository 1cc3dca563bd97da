"""The store contract (gridd.store.base), asserted on every implementation alike.

The ``store`` fixture yields a started store of each kind: memory, SQLite,
and MySQL on the session's throwaway MariaDB server (``tests/mariadb.py``).
The ``two`` fixture yields two started stores of one kind on the same data,
as two servers on one database: ``MemoryStore.sibling``, a second
``SQLiteStore`` on the same file, a second ``MySQLStore`` on the same
database. Another kind joins by adding a parameter and a branch in
``_make_store``, and nothing else.
"""

from __future__ import annotations

import contextlib

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from gridd.errors import (
    AlreadyExists,
    DuplicateResult,
    Incomplete,
    InvalidState,
    StaleLease,
    Unavailable,
    UnknownCredential,
    UnknownJob,
    UnknownRecord,
)
from gridd.store.base import (
    ACTIVE_STATES,
    JOB_STATES,
    SETTABLE_STATES,
    JobSpec,
    RecordResult,
    attempts_from_history,
    job_error,
    open_store,
)
from gridd.store.memory import MemoryStore
from gridd.store.mysql import MySQLStore
from gridd.store.sql import known_version
from gridd.store.sqlite import SQLiteStore

T0 = 1_000_000.0

KINDS = ["memory", "sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]


def _make_store(request, cleanup, tmp_path, server_id=None, like=None):
    """A store of the kind ``request.param`` names; with ``like``, another on the same data."""
    if request.param == "memory":
        return MemoryStore(server_id) if like is None else like.sibling(server_id)
    if request.param == "sqlite":
        return SQLiteStore(str(tmp_path / "gridd.db"), server_id=server_id)
    if request.param == "mysql":
        params = (
            like.params if like is not None else cleanup.enter_context(request.getfixturevalue("mariadb").database())
        )
        return MySQLStore(params, server_id=server_id)
    raise AssertionError(request.param)


@pytest_twisted.async_yield_fixture(params=KINDS)
async def store(request, tmp_path):
    """A started store of each kind, stopped after the test; MySQL's on a fresh database."""
    with contextlib.ExitStack() as cleanup:
        store = _make_store(request, cleanup, tmp_path)
        await store.start()
        yield store
        await store.stop()


@pytest_twisted.async_yield_fixture(params=KINDS)
async def two(request, tmp_path):
    """Two started stores on the same data, servers "A" and "B", stopped after the test."""
    with contextlib.ExitStack() as cleanup:
        a = _make_store(request, cleanup, tmp_path, "A")
        await a.start()
        b = _make_store(request, cleanup, tmp_path, "B", like=a)
        await b.start()
        yield a, b
        await b.stop()
        await a.stop()


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
    await store.grant(job_id, lease, worker, T0 + 1)
    return job_id


def plain(job: dict) -> dict:
    """``job`` without the keys read from its history, once they are checked to be read from it."""
    assert job["attempt_history"] == attempts_from_history(job["history"])
    assert job["error"] == job_error(job["state"], job["history"])
    return {key: value for key, value in job.items() if key not in ("attempt_history", "error")}


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
        "attempt_history": [],
        "error": None,
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
    await store.grant(job_id, "L1", "w1", T0 + 1)
    assert plain(await store.get_job(job_id)) == plain(queued) | {
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
        await store.grant(job_id, "L2", "w2", T0 + 2)
    assert caught.value.extra == {"state": "running"}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_grant_unknown_job_raises(store):
    """Granting a job that does not exist raises UnknownJob."""
    with pytest.raises(UnknownJob):
        await store.grant(999, "L1", "w1", T0)


@pytest_twisted.ensureDeferred
async def test_grant_returns_job_as_claimed(store):
    """A grant fires with the job as claimed: running under the lease, attempt 1, granted now, every record pending."""
    [job_id] = await store.submit([spec(2, params={"p": 1}, retries=2)], T0)
    active = await store.grant(job_id, "L1", "w1", T0 + 1)
    assert (active.id, active.state, active.lease, active.worker) == (job_id, "running", "L1", "w1")
    assert (active.attempts, active.retries, active.leased_at, active.not_before) == (1, 2, T0 + 1, None)
    assert (active.total, active.params, active.pending) == (2, {"p": 1}, {0: {"n": 0}, 1: {"n": 1}})
    assert await store.load_active() == [active]


@pytest_twisted.ensureDeferred
async def test_grant_counts_attempt_and_sends_pending_only(store):
    """A grant counts the stored attempts plus one, and its job holds only the records without an accepted result."""
    job_id = await leased_job(store, records=4)
    await store.add_results(job_id, "L1", ok(0, 2), T0 + 2)
    await store.release(job_id, "L1", "queued", T0 + 3, reason="worker lost")
    active = await store.grant(job_id, "L2", "w2", T0 + 4)
    assert (active.attempts, active.lease, active.leased_at) == (2, "L2", T0 + 4)
    assert active.pending == {1: {"n": 1}, 3: {"n": 3}}
    assert (await store.get_job(job_id))["history"][-1] == event(T0 + 4, "leased", 2, "L2", "w2")
    await store.release(job_id, "L2", "queued", T0 + 5, reason="returned", attempts=1)
    assert (await store.grant(job_id, "L3", "w2", T0 + 6)).attempts == 2


@pytest_twisted.ensureDeferred
async def test_grant_during_retry_backoff_refused_until_it_is_over(store):
    """A queued job whose backoff lasts past ``now`` is not granted (InvalidState, queued), changing nothing."""
    job_id = await leased_job(store, records=1)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="failed", error="boom", not_before=T0 + 10)
    before = await snapshot(store, job_id)
    with pytest.raises(InvalidState) as caught:
        await store.grant(job_id, "L2", "w2", T0 + 9)
    assert caught.value.extra == {"state": "queued"} and "backoff" in caught.value.message
    assert await snapshot(store, job_id) == before
    active = await store.grant(job_id, "L2", "w2", T0 + 10)
    assert (active.lease, active.attempts, active.not_before) == ("L2", 2, None)


@pytest_twisted.ensureDeferred
async def test_grant_repeated_same_answer_changes_nothing(store):
    """A grant sent again with the job's current lease fires with the job as it is now and changes nothing."""
    [job_id] = await store.submit([spec(3)], T0)
    first = await store.grant(job_id, "L1", "w1", T0 + 1)
    before = await snapshot(store, job_id)
    assert await store.grant(job_id, "L1", "w1", T0 + 2) == first
    assert await snapshot(store, job_id) == before
    await store.add_results(job_id, "L1", ok(1), T0 + 3)
    again = await store.grant(job_id, "L1", "w1", T0 + 4)
    assert (again.attempts, again.leased_at, again.pending) == (1, T0 + 1, {0: {"n": 0}, 2: {"n": 2}})
    history = (await store.get_job(job_id))["history"]
    assert [e["event"] for e in history] == ["submitted", "leased"]


@pytest_twisted.ensureDeferred
async def test_grant_ended_token_stale(store):
    """A token that was a lease of the job once is never granted again: StaleLease in any state, changing nothing."""
    job_id = await leased_job(store, records=1)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="worker lost")
    before = await snapshot(store, job_id)
    with pytest.raises(StaleLease):
        await store.grant(job_id, "L1", "w1", T0 + 3)
    assert await snapshot(store, job_id) == before
    await store.grant(job_id, "L2", "w2", T0 + 4)
    with pytest.raises(StaleLease):
        await store.grant(job_id, "L1", "w1", T0 + 5)
    await store.complete(job_id, "L2", ok(0), T0 + 6)
    before = await snapshot(store, job_id)
    for lease in ("L1", "L2"):
        with pytest.raises(StaleLease):
            await store.grant(job_id, lease, "w1", T0 + 7)
    assert await snapshot(store, job_id) == before
    with pytest.raises(InvalidState) as caught:
        await store.grant(job_id, "L3", "w1", T0 + 7)
    assert caught.value.extra == {"state": "done"}


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
    await store.grant(job_id, "L2", "w2", T0 + 3)
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


@pytest_twisted.ensureDeferred
async def test_add_results_repeated_same_answer_changes_nothing(store):
    """Results sent again under the same lease with the same values fire with the accepted count and change nothing."""
    job_id = await leased_job(store, records=4)
    results = [RecordResult(0, {"a": [1, "é"]}), RecordResult(1, error="bad input"), RecordResult(2, None)]
    assert await store.add_results(job_id, "L1", results, T0 + 2) == 3
    before = await snapshot(store, job_id)
    assert await store.add_results(job_id, "L1", results, T0 + 3) == 3
    assert await store.add_results(job_id, "L1", results[1:2], T0 + 4) == 3
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_add_results_repeats_with_new_ones_accept_only_new(store):
    """Repeated results in a call with new ones are left out: only the new ones are accepted and counted."""
    job_id = await leased_job(store, records=3)
    await store.add_results(job_id, "L1", ok(0), T0 + 2)
    assert await store.add_results(job_id, "L1", ok(0, 1), T0 + 3) == 2
    results = await store.get_results(job_id)
    assert [(r["i"], r["out"]) for r in results] == [(0, {"double": 0}), (1, {"double": 2})]
    assert (await store.get_job(job_id))["accepted"] == 2


@pytest_twisted.ensureDeferred
async def test_add_results_repeated_after_lease_ended_same_answer(store):
    """Results that are all repeats fire with the accepted count after their lease ended; with a new one, StaleLease."""
    job_id = await leased_job(store, records=3)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    await store.release(job_id, "L1", "queued", T0 + 3, reason="worker lost")
    await store.grant(job_id, "L2", "w2", T0 + 4)
    await store.add_results(job_id, "L2", ok(2), T0 + 5)
    before = await snapshot(store, job_id)
    assert await store.add_results(job_id, "L1", ok(1, 0), T0 + 6) == 3
    for results in (ok(0, 2), ok(0, 0), [RecordResult(0, "other")], []):
        with pytest.raises(StaleLease):
            await store.add_results(job_id, "L1", results, T0 + 6)
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_add_results_repeat_with_other_value_duplicate(store):
    """A result for an accepted record with another value, under another lease, or twice in a call: DuplicateResult."""
    job_id = await leased_job(store, records=3)
    await store.add_results(job_id, "L1", [RecordResult(0, {"x": 1}), RecordResult(1, error="boom")], T0 + 2)
    before = await snapshot(store, job_id)
    for results, duplicates in (
        ([RecordResult(0, {"x": 2})], [0]),
        ([RecordResult(0, error="boom")], [0]),
        ([RecordResult(1, error="other")], [1]),
        ([RecordResult(1, None)], [1]),
        ([RecordResult(2, 1), RecordResult(0, {"x": 1}), RecordResult(0, {"x": 1})], [0]),
        ([RecordResult(2, 1), RecordResult(2, 1), RecordResult(1, "x"), RecordResult(0, {"x": 1})], [1, 2]),
    ):
        with pytest.raises(DuplicateResult) as caught:
            await store.add_results(job_id, "L1", results, T0 + 3)
        assert caught.value.extra == {"records": duplicates}
    assert await snapshot(store, job_id) == before
    await store.release(job_id, "L1", "queued", T0 + 4, reason="worker lost")
    await store.grant(job_id, "L2", "w2", T0 + 5)
    with pytest.raises(DuplicateResult) as caught:
        await store.add_results(job_id, "L2", [RecordResult(0, {"x": 1})], T0 + 6)
    assert caught.value.extra == {"records": [0]}


# -- complete ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_complete_full_count_done(store):
    """Completing with the trailing results marks the job done and ends its lease."""
    job_id = await leased_job(store)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    running = await store.get_job(job_id)
    await store.complete(job_id, "L1", ok(2), T0 + 3)
    assert plain(await store.get_job(job_id)) == plain(running) | {
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
    await store.grant(job_id, "L1", "w1", T0 + 1)
    await store.complete(job_id, "L1", [], T0 + 2)
    assert (await store.get_job(job_id))["state"] == "done"


@pytest_twisted.ensureDeferred
async def test_complete_duplicate_trailing_result(store):
    """A trailing result already accepted with another value raises DuplicateResult, and the job stays running."""
    job_id = await leased_job(store, records=2)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    before = await snapshot(store, job_id)
    with pytest.raises(DuplicateResult) as caught:
        await store.complete(job_id, "L1", [RecordResult(1, "other")], T0 + 3)
    assert caught.value.extra == {"records": [1]}
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_complete_repeated_after_done_names_lease(store):
    """A complete sent again after its lease completed the job fires with None and changes nothing."""
    job_id = await leased_job(store, records=2)
    await store.add_results(job_id, "L1", ok(0), T0 + 2)
    assert await store.complete(job_id, "L1", ok(1), T0 + 3) is None
    before = await snapshot(store, job_id)
    for results in (ok(1), [], ok(0, 1), [RecordResult(1, "other")]):
        assert await store.complete(job_id, "L1", results, T0 + 4) is None
    assert await snapshot(store, job_id) == before
    history = (await store.get_job(job_id))["history"]
    assert [e["event"] for e in history].count("completed") == 1


@pytest_twisted.ensureDeferred
async def test_complete_stale_lease_after_done_stale(store):
    """A complete under a lease that ended before another completed the job is stale, even with repeated results."""
    job_id = await leased_job(store, records=2)
    await store.add_results(job_id, "L1", ok(0), T0 + 2)
    await store.release(job_id, "L1", "queued", T0 + 3, reason="worker lost")
    await store.grant(job_id, "L2", "w2", T0 + 4)
    await store.complete(job_id, "L2", ok(1), T0 + 5)
    before = await snapshot(store, job_id)
    for results in (ok(0), [], ok(0, 1)):
        with pytest.raises(StaleLease):
            await store.complete(job_id, "L1", results, T0 + 6)
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_complete_trailing_repeats_count_as_accepted(store):
    """Trailing results that repeat accepted ones under the same lease are left out, and the job completes."""
    job_id = await leased_job(store, records=3)
    await store.add_results(job_id, "L1", ok(0, 1), T0 + 2)
    await store.complete(job_id, "L1", ok(1, 2), T0 + 3)
    job = await store.get_job(job_id)
    assert (job["state"], job["accepted"]) == ("done", 3)
    assert [r["i"] for r in await store.get_results(job_id)] == [0, 1, 2]


# -- release ----------------------------------------------------------------


@pytest.mark.parametrize("state", SETTABLE_STATES)
@pytest_twisted.ensureDeferred
async def test_release_moves_job_with_history(store, state):
    """Releasing ends the lease, moves the job to the state given and records why."""
    job_id = await leased_job(store)
    running = await store.get_job(job_id)
    await store.release(job_id, "L1", state, T0 + 2, reason="handler error", error="Traceback ...")
    detail = {"to": state, "reason": "handler error", "error": "Traceback ..."}
    assert plain(await store.get_job(job_id)) == plain(running) | {
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
    await store.grant(job_id, "L2", "w2", T0 + 61)
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


@pytest_twisted.ensureDeferred
async def test_release_repeated_same_answer_changes_nothing(store):
    """A release sent again after it ended the lease fires with None and changes nothing, even once the job runs on."""
    job_id = await leased_job(store)
    release = dict(reason="failed", error="Traceback ...", not_before=T0 + 60)
    assert await store.release(job_id, "L1", "queued", T0 + 2, **release) is None
    before = await snapshot(store, job_id)
    assert await store.release(job_id, "L1", "queued", T0 + 3, **release) is None
    assert await store.release(job_id, "L1", "queued", T0 + 3, **release, attempts=0) is None
    assert await snapshot(store, job_id) == before
    await store.grant(job_id, "L2", "w2", T0 + 61)
    before = await snapshot(store, job_id)
    assert await store.release(job_id, "L1", "queued", T0 + 62, **release) is None
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_release_of_lease_ended_otherwise_stale(store):
    """A release under a lease ended by another write (other target, reason or error; an operator) raises StaleLease."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="failed", error="boom")
    before = await snapshot(store, job_id)
    others = (("failed", "failed", "boom"), ("queued", "returned", "boom"), ("queued", "failed", None))
    for state, reason, error in others:
        with pytest.raises(StaleLease):
            await store.release(job_id, "L1", state, T0 + 3, reason=reason, error=error)
    assert await snapshot(store, job_id) == before
    await store.grant(job_id, "L2", "w2", T0 + 4)
    await store.end_lease(job_id, "L2", "cancelled", T0 + 5, reason="cancelled")
    with pytest.raises(StaleLease):
        await store.release(job_id, "L2", "cancelled", T0 + 6, reason="cancelled")


# -- set_state --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_set_state_allowed_moves_job(store):
    """A job in an allowed state moves to the new state, with the change in its history."""
    [job_id] = await store.submit([spec()], T0)
    queued = await store.get_job(job_id)
    await store.set_state(job_id, ("queued", "running"), "paused", T0 + 1, reason="operator pause")
    detail = {"from": "queued", "to": "paused", "reason": "operator pause"}
    assert plain(await store.get_job(job_id)) == plain(queued) | {
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
    await store.grant(running, "L1", "w1", T0 + 1)
    await store.add_results(running, "L1", ok(0, 2), T0 + 2)
    await store.grant(done, "L3", "w1", T0 + 1)
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
    await store.grant(b, "L1", "w1", T0 + 1)
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
    await store.grant(ids[0], "L1", "w1", T0 + 1)
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


# -- several servers on one database -------------------------------------------


async def server_rows(store) -> dict[str, tuple[float, float]]:
    """The servers the store knows: id -> (last beat, deadline)."""
    if isinstance(store, MemoryStore):
        return dict(store._data.servers)

    def thd_servers(txn):
        txn.execute("SELECT id, last_beat, deadline FROM servers ORDER BY id")
        return {server: (beat, deadline) for server, beat, deadline in txn.fetchall()}

    return await store._read(thd_servers)


def test_server_id_given_or_unique(tmp_path):
    """A store writes as the server id it was given, or as a new one unique to it."""
    assert MemoryStore("A").server_id == "A"
    assert open_store("memory:", server_id="A").server_id == "A"
    assert open_store(f"sqlite:{tmp_path / 'gridd.db'}", server_id="B").server_id == "B"
    assert open_store("mysql://u@127.0.0.1/gridd", server_id="C").server_id == "C"
    ids = {MemoryStore().server_id, MemoryStore().server_id, SQLiteStore(str(tmp_path / "x.db")).server_id}
    assert len(ids) == 3 and all(isinstance(i, str) and i for i in ids)
    assert MemoryStore("A").sibling("B").server_id == "B"
    for bad in ("", "x" * 256):
        with pytest.raises(ValueError):
            MemoryStore(bad)


@pytest_twisted.ensureDeferred
async def test_sibling_started_on_its_own():
    """A memory sibling shares the data but is started and stopped on its own."""
    a = MemoryStore("A")
    await a.start()
    b = a.sibling("B")
    with pytest.raises(Unavailable):
        await b.counts()
    await b.start()
    [job_id] = await a.submit([spec()], T0)
    assert (await b.get_job(job_id))["state"] == "queued"
    await b.stop()
    assert (await a.counts())["queued"] == 1


@pytest_twisted.ensureDeferred
async def test_grant_records_owner(two):
    """A grant makes the granting server the lease's owner: its own_leases lists it, the other's does not."""
    a, b = two
    job_id = await leased_job(a)
    assert await a.own_leases() == {job_id: "L1"}
    assert await b.own_leases() == {}


@pytest.mark.parametrize("write", ["add_results", "complete", "release"])
@pytest_twisted.ensureDeferred
async def test_other_server_write_stale(two, write):
    """Another server's write under a lease it does not own raises StaleLease and changes nothing."""
    a, b = two
    job_id = await leased_job(a, records=1)
    before = await snapshot(a, job_id)
    with pytest.raises(StaleLease):
        if write == "add_results":
            await b.add_results(job_id, "L1", ok(0), T0 + 2)
        elif write == "complete":
            await b.complete(job_id, "L1", ok(0), T0 + 2)
        else:
            await b.release(job_id, "L1", "queued", T0 + 2, reason="worker lost")
    assert await snapshot(a, job_id) == before
    assert await a.complete(job_id, "L1", ok(0), T0 + 3) is None


@pytest_twisted.ensureDeferred
async def test_take_lease_moves_owner(two):
    """Taking a lease over makes this server its owner: the old owner is stale, the new one writes."""
    a, b = two
    job_id = await leased_job(a, records=3)
    await a.add_results(job_id, "L1", ok(0), T0 + 2)
    running = await a.get_job(job_id)
    active = await b.take_lease(job_id, "L1", "w2", T0 + 3)
    assert (active.id, active.state, active.lease, active.worker, active.attempts) == (job_id, "running", "L1", "w2", 1)
    assert active.pending == {1: {"n": 1}, 2: {"n": 2}}
    assert plain(await b.get_job(job_id)) == plain(running) | {
        "worker": "w2",
        "updated": T0 + 3,
        "history": running["history"] + [event(T0 + 3, "reattached", 1, "L1", "w2", {"from": "A"})],
    }
    assert (await a.own_leases(), await b.own_leases()) == ({}, {job_id: "L1"})
    before = await snapshot(a, job_id)
    with pytest.raises(StaleLease):
        await a.add_results(job_id, "L1", ok(1), T0 + 4)
    with pytest.raises(StaleLease):
        await a.release(job_id, "L1", "queued", T0 + 4, reason="worker lost")
    assert await snapshot(a, job_id) == before
    assert await b.add_results(job_id, "L1", ok(1), T0 + 5) == 2
    await b.complete(job_id, "L1", ok(2), T0 + 6)
    assert [(r["i"], r["worker"]) for r in await a.get_results(job_id)] == [(0, "w1"), (1, "w2"), (2, "w2")]
    assert await b.own_leases() == {}


@pytest_twisted.ensureDeferred
async def test_take_lease_and_load_active_tell_when_the_lease_was_granted(two):
    """A running job's ActiveJob carries the grant time of its current lease, so its run-time limit survives moves."""
    a, b = two
    job_id = await leased_job(a)  # granted at T0 + 1
    assert (await b.take_lease(job_id, "L1", "w1", T0 + 5)).leased_at == T0 + 1
    [active] = await a.load_active()
    assert (active.state, active.leased_at) == ("running", T0 + 1)
    await b.release(job_id, "L1", "queued", T0 + 6, reason="worker lost")
    await a.grant(job_id, "L2", "w2", T0 + 7)
    [active] = await a.load_active()
    assert (active.lease, active.leased_at) == ("L2", T0 + 7)
    await a.release(job_id, "L2", "queued", T0 + 8, reason="worker lost")
    [active] = await a.load_active()
    assert (active.state, active.leased_at) == ("queued", None)


@pytest_twisted.ensureDeferred
async def test_take_lease_back_from_taker(two):
    """A lease taken over can be taken back: ownership follows the last taker."""
    a, b = two
    job_id = await leased_job(a)
    await b.take_lease(job_id, "L1", "w1", T0 + 2)
    await a.take_lease(job_id, "L1", "w1", T0 + 3)
    assert (await a.get_job(job_id))["history"][-1]["detail"] == {"from": "B"}
    assert await a.add_results(job_id, "L1", ok(0), T0 + 4) == 1
    with pytest.raises(StaleLease):
        await b.add_results(job_id, "L1", ok(1), T0 + 4)


@pytest_twisted.ensureDeferred
async def test_take_lease_repeated_same_answer_changes_nothing(two):
    """A take_lease sent again by the new owner for the same worker fires with the same job and changes nothing."""
    a, b = two
    job_id = await leased_job(a)
    await a.add_results(job_id, "L1", ok(0), T0 + 2)
    first = await b.take_lease(job_id, "L1", "w2", T0 + 3)
    before = await snapshot(a, job_id)
    assert await b.take_lease(job_id, "L1", "w2", T0 + 4) == first
    assert await snapshot(a, job_id) == before
    assert (await a.take_lease(job_id, "L1", "w2", T0 + 5)).worker == "w2"
    assert (await a.get_job(job_id))["history"][-1]["detail"] == {"from": "B"}


@pytest_twisted.ensureDeferred
async def test_take_lease_wrong_or_ended_stale(two):
    """Taking over a lease that is not the job's current one raises StaleLease and changes nothing."""
    a, b = two
    job_id = await leased_job(a)
    before = await snapshot(a, job_id)
    with pytest.raises(StaleLease):
        await b.take_lease(job_id, "L0", "w2", T0 + 2)
    assert await snapshot(a, job_id) == before
    await a.release(job_id, "L1", "queued", T0 + 3, reason="worker lost")
    before = await snapshot(a, job_id)
    for lease in ("L1", None):
        with pytest.raises(StaleLease):
            await b.take_lease(job_id, lease, "w2", T0 + 4)
    assert await snapshot(a, job_id) == before
    with pytest.raises(UnknownJob):
        await b.take_lease(999, "L1", "w2", T0 + 4)


@pytest_twisted.ensureDeferred
async def test_expire_servers_after_deadline_and_grace(two):
    """A server silent past its deadline and the grace loses its leases: re-queued, or failed without attempts left."""
    a, b = two
    await a.beat(T0, 10)
    await b.beat(T0, 10)
    ids = await a.submit([spec(2), spec(1, retries=0), spec(1, retries=2)], T0)
    retried, exhausted, other = ids
    await a.grant(retried, "L1", "w1", T0 + 1)
    await a.add_results(retried, "L1", ok(0), T0 + 2)
    await a.grant(exhausted, "L2", "w1", T0 + 1)
    await b.grant(other, "L3", "w2", T0 + 1)
    await a.beat(T0 + 20, 10)  # the last beat: gone once now > T0 + 30, expired once now > T0 + 35
    await b.beat(T0 + 35, 10)
    assert await b.expire_servers(T0 + 35, 5) == []
    assert (await a.get_job(retried))["state"] == "running"
    assert set(await server_rows(a)) == {"A", "B"}

    before = {job_id: await a.get_job(job_id) for job_id in ids}
    assert await b.expire_servers(T0 + 36, 5) == [retried, exhausted]
    for job_id, to in ((retried, "queued"), (exhausted, "failed")):
        detail = {"to": to, "reason": "server lost", "error": "server A lost"}
        assert plain(await a.get_job(job_id)) == plain(before[job_id]) | {
            "state": to,
            "lease": None,
            "worker": None,
            "updated": T0 + 36,
            "history": before[job_id]["history"]
            + [event(T0 + 36, "released", 1, before[job_id]["lease"], "w1", detail)],
        }
    assert await a.get_job(other) == before[other]
    assert list(await server_rows(a)) == ["B"]
    [active] = await b.load_active(job_ids=[retried])
    assert (active.state, active.not_before, active.pending) == ("queued", None, {1: {"n": 1}})
    # The gone server's leases are stale, and it owns nothing any more.
    with pytest.raises(StaleLease):
        await a.add_results(retried, "L1", ok(1), T0 + 37)
    assert await a.own_leases() == {}
    assert await b.expire_servers(T0 + 37, 5) == []
    assert await b.runnable(T0 + 37, 10) == [retried]


@pytest_twisted.ensureDeferred
async def test_expire_servers_beat_keeps_alive(two):
    """Each beat moves a server's deadline: a server that beats is never expired."""
    a, b = two
    await a.beat(T0, 10)
    job_id = await leased_job(a)
    for t in range(1, 6):
        await a.beat(T0 + 10 * t, 10)
        assert await b.expire_servers(T0 + 10 * t + 15, 5) == []
    assert await server_rows(a) == {"A": (T0 + 50, 10)}
    assert await b.expire_servers(T0 + 66, 5) == [job_id]


@pytest_twisted.ensureDeferred
async def test_expire_servers_never_self(two):
    """A server never expires itself, however late its own last beat."""
    a, _ = two
    await a.beat(T0, 10)
    job_id = await leased_job(a)
    assert await a.expire_servers(T0 + 1000, 5) == []
    assert (await a.get_job(job_id))["state"] == "running"
    assert list(await server_rows(a)) == ["A"]


@pytest_twisted.ensureDeferred
async def test_expire_servers_owner_without_row(two):
    """An owner that never beat (or whose row is gone) counts as gone grace seconds after it last changed the job."""
    a, b = two
    job_id = await leased_job(a)  # granted at T0 + 1, without a beat
    await a.add_results(job_id, "L1", ok(0), T0 + 10)
    assert await b.expire_servers(T0 + 15, 5) == []
    assert await b.expire_servers(T0 + 16, 5) == [job_id]
    assert (await b.get_job(job_id))["history"][-1]["detail"] == {
        "to": "queued",
        "reason": "server lost",
        "error": "server A lost",
    }


@pytest_twisted.ensureDeferred
async def test_expire_servers_concurrent_each_job_once(two):
    """Two servers expiring the same gone server at once end each of its jobs once between them."""
    a, b = two
    await a.beat(T0, 10)
    ids = await a.submit([spec(1) for _ in range(20)], T0)
    for job_id in ids:
        await a.grant(job_id, f"L{job_id}", "w1", T0 + 1)
    c = _sibling_of(b, "C")
    await c.start()
    try:
        ended = await DeferredList(
            [b.expire_servers(T0 + 100, 5), c.expire_servers(T0 + 100, 5)], fireOnOneErrback=True
        )
    finally:
        await c.stop()
    first, second = (result for _, result in ended)
    assert sorted(first + second) == ids
    for job_id in ids:
        job = await b.get_job(job_id)
        assert [e["event"] for e in job["history"]] == ["submitted", "leased", "released"]


def _sibling_of(store, server_id):
    """Another store object on ``store``'s data, writing as ``server_id``."""
    if isinstance(store, MemoryStore):
        return store.sibling(server_id)
    if isinstance(store, SQLiteStore):
        return SQLiteStore(store.path, server_id=server_id)
    return MySQLStore(store.params, server_id=server_id)


@pytest_twisted.ensureDeferred
async def test_runnable_priority_then_id(two):
    """Runnable jobs come highest priority first, then oldest first, up to the limit."""
    a, b = two
    ids = await a.submit([spec(1, priority=p) for p in (0, 5, 1, 5, 0, 9)], T0)
    p0, p5, p1, p5b, p0b, p9 = ids
    await a.grant(p9, "L9", "w1", T0 + 1)  # running: not runnable
    await a.set_state(p1, ("queued",), "paused", T0 + 1, reason="operator pause")
    assert await b.runnable(T0 + 2, 10) == [p5, p5b, p0, p0b]
    assert await b.runnable(T0 + 2, 2) == [p5, p5b]
    assert await a.runnable(T0 + 2, 0) == []
    await a.release(p9, "L9", "queued", T0 + 3, reason="handler error", not_before=T0 + 60)
    assert await b.runnable(T0 + 59, 10) == [p5, p5b, p0, p0b]
    assert await b.runnable(T0 + 60, 10) == [p9, p5, p5b, p0, p0b]


@pytest_twisted.ensureDeferred
async def test_own_leases_running_only(two):
    """own_leases names exactly the running jobs this server granted or took over."""
    a, b = two
    j1, j2, j3, j4 = await a.submit([spec(1) for _ in range(4)], T0)
    await a.grant(j1, "L1", "w1", T0 + 1)
    await a.grant(j2, "L2", "w1", T0 + 1)
    await b.grant(j3, "L3", "w2", T0 + 1)
    await a.grant(j4, "L4", "w1", T0 + 1)
    await a.complete(j2, "L2", ok(0), T0 + 2)
    await a.release(j4, "L4", "queued", T0 + 2, reason="worker lost")
    assert await a.own_leases() == {j1: "L1"}
    assert await b.own_leases() == {j3: "L3"}
    await b.take_lease(j1, "L1", "w2", T0 + 3)
    assert await a.own_leases() == {}
    assert await b.own_leases() == {j1: "L1", j3: "L3"}


@pytest_twisted.ensureDeferred
async def test_job_states_existing_by_id(store):
    """job_states answers for the ids that exist, by id, with state and progress."""
    a, b = await store.submit([spec(3), spec(2)], T0)
    await store.grant(b, "L1", "w1", T0 + 1)
    await store.add_results(b, "L1", ok(1), T0 + 2)
    assert await store.job_states([999, b, a, b]) == [
        {"job": a, "state": "queued", "accepted": 0, "total": 3},
        {"job": b, "state": "running", "accepted": 1, "total": 2},
    ]
    assert await store.job_states([]) == []
    many = await store.submit([spec(0) for _ in range(1200)], T0)
    assert [s["job"] for s in await store.job_states(many)] == many


@pytest.mark.parametrize(("state", "attempts"), [("queued", 0), ("paused", 1), ("cancelled", 1)])
@pytest_twisted.ensureDeferred
async def test_end_lease_any_owner(two, state, attempts):
    """Any server ends a running lease as an operator's move: the lease's attempt not counted, a requeue resets."""
    a, b = two
    job_id = await leased_job(a)
    await a.release(job_id, "L1", "queued", T0 + 2, reason="worker lost")
    await a.grant(job_id, "L2", "w1", T0 + 3)
    await a.add_results(job_id, "L2", ok(0), T0 + 4)
    running = await a.get_job(job_id)
    reason = {"queued": "requeued", "paused": "paused", "cancelled": "cancelled"}[state]
    await b.end_lease(job_id, "L2", state, T0 + 5, reason=reason)
    assert plain(await a.get_job(job_id)) == plain(running) | {
        "state": state,
        "attempts": attempts,
        "lease": None,
        "worker": None,
        "updated": T0 + 5,
        "history": running["history"] + [event(T0 + 5, "released", 2, "L2", "w1", {"to": state, "reason": reason})],
    }
    assert await a.own_leases() == {}
    with pytest.raises(StaleLease):
        await a.add_results(job_id, "L2", ok(1), T0 + 6)
    assert await b.runnable(T0 + 6, 10) == ([job_id] if state == "queued" else [])


@pytest_twisted.ensureDeferred
async def test_end_lease_own_lease(store):
    """A server may end a lease it owns itself the same way."""
    job_id = await leased_job(store)
    await store.end_lease(job_id, "L1", "paused", T0 + 2, reason="paused")
    job = await store.get_job(job_id)
    assert (job["state"], job["attempts"], job["lease"]) == ("paused", 0, None)
    assert await store.own_leases() == {}


@pytest_twisted.ensureDeferred
async def test_end_lease_not_running_invalid_state(store):
    """Ending the lease of a job that holds none raises InvalidState naming its state, and changes nothing."""
    [job_id] = await store.submit([spec()], T0)
    before = await snapshot(store, job_id)
    with pytest.raises(InvalidState) as caught:
        await store.end_lease(job_id, "L1", "cancelled", T0 + 1, reason="cancelled")
    assert caught.value.extra == {"state": "queued"}
    assert await snapshot(store, job_id) == before
    with pytest.raises(UnknownJob):
        await store.end_lease(999, "L1", "cancelled", T0 + 1, reason="cancelled")


@pytest_twisted.ensureDeferred
async def test_end_lease_repeated_same_answer_changes_nothing(two):
    """An end_lease sent again after it ended the lease fires with None and changes nothing."""
    a, b = two
    job_id = await leased_job(a)
    assert await b.end_lease(job_id, "L1", "queued", T0 + 2, reason="requeued") is None
    before = await snapshot(a, job_id)
    assert await b.end_lease(job_id, "L1", "queued", T0 + 3, reason="requeued") is None
    assert await a.end_lease(job_id, "L1", "queued", T0 + 3, reason="requeued") is None
    assert await snapshot(a, job_id) == before
    await a.grant(job_id, "L2", "w1", T0 + 4)
    before = await snapshot(a, job_id)
    assert await b.end_lease(job_id, "L1", "queued", T0 + 5, reason="requeued") is None
    assert await snapshot(a, job_id) == before


@pytest_twisted.ensureDeferred
async def test_end_lease_not_current_lease_invalid_state(store):
    """Ending a lease the job does not run under (ended otherwise, never granted) is InvalidState, changing nothing."""
    job_id = await leased_job(store)
    await store.release(job_id, "L1", "queued", T0 + 2, reason="worker lost")
    await store.grant(job_id, "L2", "w2", T0 + 3)
    before = await snapshot(store, job_id)
    for lease, state in (("L1", "queued"), ("L0", "cancelled"), (None, "cancelled")):
        with pytest.raises(InvalidState) as caught:
            await store.end_lease(job_id, lease, state, T0 + 4, reason="requeued" if state == "queued" else state)
        assert caught.value.extra == {"state": "running"}
    assert await snapshot(store, job_id) == before
    await store.end_lease(job_id, "L2", "paused", T0 + 5, reason="paused")
    with pytest.raises(InvalidState) as caught:
        await store.end_lease(job_id, "L2", "cancelled", T0 + 6, reason="cancelled")
    assert caught.value.extra == {"state": "paused"}


@pytest.mark.parametrize("state", ["failed", "done", "running"])
@pytest_twisted.ensureDeferred
async def test_end_lease_other_state_value_error(store, state):
    """end_lease moves a job only to queued, paused or cancelled; another state raises ValueError."""
    job_id = await leased_job(store)
    before = await snapshot(store, job_id)
    with pytest.raises(ValueError):
        await store.end_lease(job_id, "L1", state, T0 + 2, reason="bug")
    assert await snapshot(store, job_id) == before


@pytest_twisted.ensureDeferred
async def test_multi_server_calls_stopped_unavailable(store):
    """The multi-server calls, like the others, answer Unavailable once the store is stopped."""
    await store.stop()
    for call in (
        store.beat(T0, 10),
        store.expire_servers(T0, 5),
        store.take_lease(1, "L1", "w1", T0),
        store.runnable(T0, 10),
        store.own_leases(),
        store.job_states([1]),
        store.end_lease(1, "L1", "queued", T0, reason="requeued"),
    ):
        with pytest.raises(Unavailable):
            await call


# -- migration 2 (SQL stores) ----------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def sql_stores(request, tmp_path):
    """Make SQL stores of one kind on one fresh database: ``make(server_id)``."""
    with contextlib.ExitStack() as cleanup:
        if request.param == "sqlite":
            path = str(tmp_path / "gridd.db")
            yield lambda server_id: SQLiteStore(path, server_id=server_id)
        else:
            params = cleanup.enter_context(request.getfixturevalue("mariadb").database())
            yield lambda server_id: MySQLStore(params, server_id=server_id)


def _thd_run_as_schema_1(txn, job_id, lease, now):
    """Lease a job as gridd with schema 1 did: no owner."""
    txn.execute(
        "UPDATE jobs SET state = 'running', lease = ?, worker = 'w1', attempts = 1, updated = ? WHERE id = ?",
        (lease, now, job_id),
    )
    txn.execute(
        "INSERT INTO job_events (job_id, at, event, attempt, lease, worker) VALUES (?, ?, 'leased', 1, ?, 'w1')",
        (job_id, now, lease),
    )


def _thd_schema_version(txn):
    txn.execute("SELECT MAX(version) FROM schema_version")
    return txn.fetchone()[0]


async def schema_1_database(make, monkeypatch, running=2) -> list[int]:
    """Make the database one at schema 1 with three jobs, the first ``running`` of them leased; return their ids."""
    from gridd.store import sql

    load = sql.load_migrations
    monkeypatch.setattr(sql, "load_migrations", lambda dialect: load(dialect)[:1])
    old = make("old")
    await old.start()
    try:
        assert await old._read(_thd_schema_version) == 1
        ids = await old.submit([spec(2), spec(2), spec(2)], T0)
        for n, job_id in enumerate(ids[:running]):
            await old._write(_thd_run_as_schema_1, job_id, f"L{job_id}", T0 + 4 + n)
    finally:
        await old.stop()
        monkeypatch.setattr(sql, "load_migrations", load)
    return ids


@pytest_twisted.ensureDeferred
async def test_migrate_2_running_jobs_taken_over_or_expired(sql_stores, monkeypatch):
    """Jobs running at the upgrade belong to "(before 2)": their workers may take them over, the rest expire."""
    taken, left, queued = await schema_1_database(sql_stores, monkeypatch)
    store = sql_stores("A")
    await store.start()
    try:
        assert await store._read(_thd_schema_version) == known_version(store.dialect.name)
        # The pseudo-server last beat when it last touched a job (T0 + 5), with no deadline.
        assert await server_rows(store) == {"(before 2)": (T0 + 5, 0)}
        assert await store.own_leases() == {}
        with pytest.raises(StaleLease):
            await store.add_results(taken, f"L{taken}", ok(0), T0 + 6)
        await store.beat(T0 + 6, 10)
        active = await store.take_lease(taken, f"L{taken}", "w1", T0 + 7)
        assert (active.state, active.lease, active.pending) == ("running", f"L{taken}", {0: {"n": 0}, 1: {"n": 1}})
        assert (await store.get_job(taken))["history"][-1]["detail"] == {"from": "(before 2)"}
        assert await store.add_results(taken, f"L{taken}", ok(0), T0 + 8) == 1
        assert await store.expire_servers(T0 + 35, 30) == []
        await store.beat(T0 + 36, 10)
        assert await store.expire_servers(T0 + 36, 30) == [left]
        job = await store.get_job(left)
        assert (job["state"], job["lease"], job["attempts"]) == ("queued", None, 1)
        assert job["history"][-1]["detail"] == {
            "to": "queued",
            "reason": "server lost",
            "error": "server (before 2) lost",
        }
        assert list(await server_rows(store)) == ["A"]
        assert await store.own_leases() == {taken: f"L{taken}"}
        assert await store.runnable(T0 + 36, 10) == [left, queued]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_migrate_2_nothing_running_no_pseudo_server(sql_stores, monkeypatch):
    """Without a running job the upgrade adds no server row, and a new database has none either."""
    await schema_1_database(sql_stores, monkeypatch, running=0)
    store = sql_stores("A")
    await store.start()
    try:
        assert await server_rows(store) == {}
        assert await store.expire_servers(T0 + 1000, 5) == []
    finally:
        await store.stop()


# -- credentials ------------------------------------------------------------------------

HASH_A, HASH_B = "a" * 64, "b" * 64


@pytest_twisted.ensureDeferred
async def test_credential_add_get_list(store):
    """An added credential reads back with its hash; the list shows every one by id, never a hash."""
    assert await store.get_credential("desk-7") is None
    assert await store.list_credentials() == []
    await store.add_credential("desk-7", "worker", HASH_A, T0, note="Anna's desktop")
    await store.add_credential("cron", "submitter", HASH_B, T0 + 1)
    assert await store.get_credential("desk-7") == {
        "id": "desk-7",
        "role": "worker",
        "secret_hash": HASH_A,
        "created": T0,
        "revoked": None,
        "note": "Anna's desktop",
    }
    assert await store.list_credentials() == [
        {"id": "cron", "role": "submitter", "created": T0 + 1, "revoked": None, "note": None},
        {"id": "desk-7", "role": "worker", "created": T0, "revoked": None, "note": "Anna's desktop"},
    ]


@pytest_twisted.ensureDeferred
async def test_credential_add_existing_id_refused_unchanged(store):
    """Adding an id that exists (revoked or not) raises AlreadyExists and changes nothing."""
    await store.add_credential("cron", "submitter", HASH_A, T0)
    with pytest.raises(AlreadyExists):
        await store.add_credential("cron", "admin", HASH_B, T0 + 1)
    await store.revoke_credential("cron", T0 + 2)
    with pytest.raises(AlreadyExists):
        await store.add_credential("cron", "admin", HASH_B, T0 + 3)
    got = await store.get_credential("cron")
    assert (got["role"], got["secret_hash"], got["created"], got["revoked"]) == ("submitter", HASH_A, T0, T0 + 2)


@pytest_twisted.ensureDeferred
async def test_credential_revoke_keeps_first_time_unknown_refused(store):
    """Revoking sets ``revoked`` once; an unknown id raises UnknownCredential."""
    await store.add_credential("cron", "submitter", HASH_A, T0)
    await store.revoke_credential("cron", T0 + 5)
    await store.revoke_credential("cron", T0 + 9)
    assert (await store.get_credential("cron"))["revoked"] == T0 + 5
    with pytest.raises(UnknownCredential):
        await store.revoke_credential("nobody", T0 + 9)
    assert [c["id"] for c in await store.list_credentials()] == ["cron"]


@pytest_twisted.ensureDeferred
async def test_credential_returned_dict_is_a_copy(store):
    """Changing a returned credential changes nothing in the store."""
    await store.add_credential("cron", "submitter", HASH_A, T0)
    got = await store.get_credential("cron")
    got["role"] = "admin"
    (await store.list_credentials())[0]["role"] = "admin"
    assert (await store.get_credential("cron"))["role"] == "submitter"


# -- attempts and poison -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_get_job_attempt_history_names_each_attempt(store):
    """SHOW's attempt history has one entry per lease: worker, start, end, outcome and error, oldest first."""
    job_id = await leased_job(store, records=1, lease="L1", worker="w1")
    await store.release(job_id, "L1", "queued", T0 + 2, reason="failed", error="disk full")
    await store.grant(job_id, "L2", "w2", T0 + 3)
    await store.release(job_id, "L2", "queued", T0 + 4, reason="returned", error="host busy", attempts=1)
    await store.grant(job_id, "L3", "w3", T0 + 5)
    await store.release(job_id, "L3", "queued", T0 + 6, reason="expired", error="worker w3 lost (expired)")
    await store.grant(job_id, "L4", "w1", T0 + 7)
    await store.take_lease(job_id, "L4", "w4", T0 + 8)
    running = await store.get_job(job_id)
    assert running["attempt_history"][-1] == {
        "attempt": 3,
        "lease": "L4",
        "worker": "w4",
        "start": T0 + 7,
        "end": None,
        "outcome": "running",
        "error": None,
    }
    await store.complete(job_id, "L4", ok(0), T0 + 9)
    job = await store.get_job(job_id)
    assert job["attempts"] == 3
    assert job["attempt_history"] == [
        {"attempt": 1, "lease": "L1", "worker": "w1", "start": T0 + 1, "end": T0 + 2, "outcome": "failed",
         "error": "disk full"},
        {"attempt": 2, "lease": "L2", "worker": "w2", "start": T0 + 3, "end": T0 + 4, "outcome": "returned",
         "error": "host busy"},
        {"attempt": 2, "lease": "L3", "worker": "w3", "start": T0 + 5, "end": T0 + 6, "outcome": "expired",
         "error": "worker w3 lost (expired)"},
        {"attempt": 3, "lease": "L4", "worker": "w4", "start": T0 + 7, "end": T0 + 9, "outcome": "done",
         "error": None},
    ]  # fmt: skip
    assert job["error"] is None


@pytest_twisted.ensureDeferred
async def test_active_job_failures_since_last_requeue(store):
    """grant and load_active give the workers and errors of the job's failed attempts since its last requeue."""
    job_id = await leased_job(store, records=1, lease="L1", worker="w1")
    await store.release(job_id, "L1", "queued", T0 + 2, reason="failed", error="e1")
    await store.grant(job_id, "L2", "w2", T0 + 3)
    await store.release(job_id, "L2", "queued", T0 + 4, reason="timeout", error="run-time limit of 5 s exceeded")
    granted = await store.grant(job_id, "L3", "w3", T0 + 5)
    assert granted.failures == [("w1", "e1"), ("w2", "run-time limit of 5 s exceeded")]
    await store.release(job_id, "L3", "queued", T0 + 6, reason="returned", error="host busy")
    [active] = await store.load_active([job_id])
    assert active.failures == granted.failures  # a returned attempt is not the job's failure
    await store.set_state(job_id, ("queued",), "paused", T0 + 7, reason="paused")
    await store.set_state(job_id, ("paused",), "queued", T0 + 8, reason="requeued", reset_attempts=True)
    [active] = await store.load_active([job_id])
    assert active.failures == []
    granted = await store.grant(job_id, "L4", "w1", T0 + 9)
    assert granted.failures == []


@pytest_twisted.ensureDeferred
async def test_poison_job_error_names_every_worker(store):
    """A job released to poison is terminal: counted, listed by state, and its error names each worker's failure."""
    job_id = await leased_job(store, records=1, lease="L1", worker="w1")
    await store.release(job_id, "L1", "queued", T0 + 2, reason="failed", error="e1")
    await store.grant(job_id, "L2", "w1", T0 + 3)
    await store.release(job_id, "L2", "queued", T0 + 4, reason="failed", error="e1 again")
    await store.grant(job_id, "L3", "w2", T0 + 5)
    await store.release(job_id, "L3", "poison", T0 + 6, reason="failed", error="e2")
    other = (await store.submit([spec(1)], T0 + 7))[0]
    job = await store.get_job(job_id)
    assert job["state"] == "poison"
    assert job["error"] == "poison: failed on 2 workers: w1: e1 again, w2: e2"
    assert [a["outcome"] for a in job["attempt_history"]] == ["failed", "failed", "failed"]
    assert (await store.counts())["poison"] == 1
    assert [j["id"] for j in await store.list_jobs(state="poison")] == [job_id]
    assert [j.id for j in await store.load_active()] == [other]
    await store.set_state(job_id, ("poison",), "queued", T0 + 8, reason="requeued", reset_attempts=True)
    job = await store.get_job(job_id)
    assert (job["state"], job["attempts"], job["error"]) == ("queued", 0, None)
    assert (await store.grant(job_id, "L4", "w3", T0 + 9)).failures == []


@pytest_twisted.ensureDeferred
async def test_failed_job_error_is_last_release_error(store):
    """A failed job's error is its last attempt's."""
    job_id = await leased_job(store, records=1)
    await store.release(job_id, "L1", "failed", T0 + 2, reason="failed", error="bad input")
    assert (await store.get_job(job_id))["error"] == "bad input"
