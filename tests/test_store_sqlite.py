"""What only the SQLite store has: a file that outlives it, migrations, group commit."""

from __future__ import annotations

import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from gridd.errors import StaleLease, Unavailable
from gridd.store.base import JobSpec, RecordResult, SchemaTooNew, StoreUnavailable
from gridd.store.sql import _statements
from gridd.store.sqlite import SQLiteDialect, SQLiteStore, load_migrations

T0 = 1_000_000.0


@pytest_twisted.async_yield_fixture
async def store(tmp_path):
    """A started SQLite store on a fresh file, stopped after the test."""
    store = SQLiteStore(str(tmp_path / "gridd.db"))
    await store.start()
    yield store
    await store.stop()


def query(path, sql, *args) -> list[tuple]:
    """Run ``sql`` on a connection of its own, which sees committed data only."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def spec(records=2) -> JobSpec:
    return JobSpec(type="noop", records=[{"n": n} for n in range(records)])


@pytest_twisted.ensureDeferred
async def test_reopen_sees_committed_work(tmp_path):
    """A new store on the same file sees everything the stopped one acknowledged."""
    path = str(tmp_path / "gridd.db")
    first = SQLiteStore(path)
    await first.start()
    [job_id] = await first.submit([spec(3)], T0)
    await first.grant(job_id, "L1", "w1", T0 + 1)
    await first.add_results(job_id, "L1", [RecordResult(0, "zero"), RecordResult(2, error="bad")], T0 + 2)
    job, results = await first.get_job(job_id), await first.get_results(job_id)
    await first.stop()

    # The same server started again (its --server-id kept) still owns its leases.
    second = SQLiteStore(path, server_id=first.server_id)
    await second.start()
    try:
        assert await second.get_job(job_id) == job
        assert await second.get_results(job_id) == results
        [active] = await second.load_active()
        assert (active.lease, active.pending) == ("L1", {1: {"n": 1}})
        assert await second.add_results(job_id, "L1", [RecordResult(1, "one")], T0 + 3) == 3
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_start_creates_parent_folder(tmp_path):
    """The store creates the folders its file lives in."""
    store = SQLiteStore(str(tmp_path / "var" / "lib" / "gridd.db"))
    await store.start()
    await store.stop()
    assert (tmp_path / "var" / "lib" / "gridd.db").is_file()


def test_migrations_numbered_from_one():
    """The shipped migrations are numbered 1, 2, 3... without gaps."""
    versions = [version for version, _ in load_migrations("sqlite")]
    assert versions == list(range(1, len(versions) + 1))


@pytest_twisted.ensureDeferred
async def test_start_migrations_recorded_once(tmp_path):
    """start() records each migration it applies, and a second start applies none."""
    path = str(tmp_path / "gridd.db")
    versions = [(version,) for version, _ in load_migrations("sqlite")]
    for _ in range(2):
        store = SQLiteStore(path)
        await store.start()
        await store.stop()
        assert query(path, "SELECT version FROM schema_version ORDER BY version") == versions
    assert query(path, "PRAGMA journal_mode") == [("wal",)]


@pytest_twisted.ensureDeferred
async def test_start_newer_schema_refuses(tmp_path):
    """A database migrated past what the code knows refuses to start, and is left as it was."""
    path = str(tmp_path / "gridd.db")
    store = SQLiteStore(path)
    await store.start()
    await store.stop()
    known = load_migrations("sqlite")[-1][0]
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (known + 1,))
    conn.close()

    newer = SQLiteStore(path)
    with pytest.raises(SchemaTooNew) as caught:
        await newer.start()
    assert (caught.value.found, caught.value.known) == (known + 1, known)
    assert str(known + 1) in str(caught.value)
    with pytest.raises(Unavailable):
        await newer.counts()
    await newer.stop()
    assert query(path, "SELECT MAX(version) FROM schema_version") == [(known + 1,)]


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_concurrent_writes(store):
    """500 submits given in one reactor turn take two transactions: the first at once, the rest together."""
    before = store.committer.transactions
    results = await DeferredList([store.submit([spec(1)], T0) for _ in range(500)], fireOnOneErrback=True)
    ids = [job_id for _, [job_id] in results]
    assert len(set(ids)) == 500 and ids == sorted(ids)
    assert store.committer.transactions - before == 2
    assert query(store.path, "SELECT COUNT(*) FROM jobs") == [(500,)]


@pytest_twisted.ensureDeferred
async def test_group_commit_stale_write_spares_neighbours(store):
    """A write refused inside a batch fails alone; the writes around it in the same transaction commit."""
    [a, b] = await store.submit([spec(), spec()], T0)
    await store.grant(a, "La", "w1", T0 + 1)
    await store.grant(b, "Lb", "w2", T0 + 1)
    first = store.grant(999, "L", "w", T0 + 2).addErrback(lambda _: None)
    before = store.committer.transactions
    good = store.add_results(a, "La", [RecordResult(0, "x")], T0 + 2)
    stale = store.add_results(b, "old", [RecordResult(0, "y")], T0 + 2)
    also_good = store.add_results(b, "Lb", [RecordResult(1, "z")], T0 + 2)
    await first
    assert await good == 1
    with pytest.raises(StaleLease):
        await stale
    assert await also_good == 1
    assert store.committer.transactions - before == 1
    assert query(store.path, "SELECT job_id, idx FROM records WHERE accepted_at IS NOT NULL ORDER BY job_id") == [
        (a, 0),
        (b, 1),
    ]


@pytest_twisted.ensureDeferred
async def test_ack_after_commit(store):
    """When a submit's Deferred fires, another connection already sees the job."""
    seen = []

    def acknowledged(ids):
        seen.extend(query(store.path, "SELECT id, state FROM jobs WHERE id = ?", ids[0]))
        return ids

    [job_id] = await store.submit([spec()], T0).addCallback(acknowledged)
    assert seen == [(job_id, "queued")]


@pytest_twisted.ensureDeferred
async def test_locked_database_unavailable(tmp_path, monkeypatch):
    """A write that cannot get the database's lock in time fails as Unavailable, and the next one works."""
    monkeypatch.setattr(SQLiteDialect, "busy_timeout_ms", 50)
    store = SQLiteStore(str(tmp_path / "gridd.db"))
    await store.start()
    try:
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(Unavailable):
            await store.submit([spec()], T0)
        other.execute("ROLLBACK")
        other.close()
        assert len(await store.submit([spec()], T0)) == 1
    finally:
        await store.stop()


@pytest.mark.parametrize("case", ["under a file", "not a database", "read-only file"])
@pytest_twisted.ensureDeferred
async def test_check_unusable_path_store_unavailable(tmp_path, case):
    """A path that cannot hold a writable database fails check() and start() with one line naming it."""
    if case == "under a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "gridd.db"
    elif case == "not a database":
        path = tmp_path / "gridd.db"
        path.write_text("this is not SQLite\n" * 100)
    else:
        path = tmp_path / "gridd.db"
        sqlite3.connect(path).close()
        path.chmod(0o444)
        if os.access(path, os.W_OK):  # root may write anyway: make the folder refuse the journal too
            pytest.skip("this user can write to read-only files")
    store = SQLiteStore(str(path))
    with pytest.raises(StoreUnavailable) as checked:
        store.check()
    assert str(checked.value).startswith(f"cannot open the store sqlite:{path}: ")
    assert "\n" not in str(checked.value)
    with pytest.raises(StoreUnavailable):
        await store.start()
    with pytest.raises(Unavailable):
        await store.counts()
    await store.stop()


# -- several servers on one file ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_stores_one_file_write_together(tmp_path):
    """Two stores on one file write at the same time: one waits for the other's lock, both commit everything."""
    path = str(tmp_path / "gridd.db")
    a, b = SQLiteStore(path, server_id="A"), SQLiteStore(path, server_id="B")
    await a.start()
    await b.start()
    try:
        writes = [store.submit([spec(2)], T0) for _ in range(100) for store in (a, b)]
        writes += [a.beat(T0, 10), b.beat(T0, 10)]
        results = await DeferredList(writes, fireOnOneErrback=True)
        ids = [job_id for _, answer in results[:-2] for job_id in answer]
        assert len(set(ids)) == 200
        grants = [
            store.grant(job_id, f"L{job_id}", "w", T0 + 1) for job_id, store in zip(ids, (a, b) * 100, strict=True)
        ]
        await DeferredList(grants, fireOnOneErrback=True)
        assert len(await a.own_leases()) == len(await b.own_leases()) == 100
        assert query(path, "SELECT server, COUNT(*) FROM jobs GROUP BY server ORDER BY server") == [
            ("A", 100),
            ("B", 100),
        ]
    finally:
        await a.stop()
        await b.stop()


def test_runnable_query_uses_descending_index(tmp_path):
    """runnable reads the queue through jobs_runnable in its own order, without a sort."""
    conn = sqlite3.connect(":memory:")
    for _, script in load_migrations("sqlite"):
        for statement in _statements(script):
            conn.execute(statement)
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= 5)"
        " ORDER BY priority DESC, id LIMIT 10"
    ).fetchall()
    assert [row[-1] for row in plan] == ["SEARCH jobs USING INDEX jobs_runnable (state=?)"]


@pytest_twisted.ensureDeferred
async def test_migration_4_upgrade_allows_poison(tmp_path):
    """A database of schema 3 with jobs keeps them on upgrade, and then takes the state poison, on every connection."""
    path = str(tmp_path / "gridd.db")
    conn = sqlite3.connect(path, isolation_level=None)
    for version, script in load_migrations("sqlite"):
        if version <= 3:
            for statement in _statements(script):
                conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY)")
    conn.executemany("INSERT INTO schema_version VALUES (?)", [(1,), (2,), (3,)])
    conn.execute(
        "INSERT INTO jobs (type, priority, requires, params, total, retries, state, created, updated)"
        " VALUES ('noop', 0, '{}', '{}', 1, 3, 'failed', 1, 1)"
    )
    conn.execute("INSERT INTO records (job_id, idx, data) VALUES (1, 0, '1')")
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE jobs SET state = 'poison'")
    store = SQLiteStore(path)
    await store.start()
    try:
        assert (await store.get_job(1))["state"] == "failed"
        [new] = await store.submit([spec(1)], T0)
        await store.grant(new, "L1", "w1", T0 + 1)
        await store.release(new, "L1", "poison", T0 + 2, reason="failed", error="e")
        assert (await store.counts())["poison"] == 1
        conn.execute("UPDATE jobs SET state = 'poison' WHERE id = 1")  # the connection open since before
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE jobs SET state = 'lost' WHERE id = 1")
        assert query(path, "PRAGMA integrity_check") == [("ok",)]
        assert query(path, "PRAGMA foreign_key_check") == []
        assert query(path, "SELECT version FROM schema_version ORDER BY version") == [(1,), (2,), (3,), (4,)]
    finally:
        await store.stop()
        conn.close()
