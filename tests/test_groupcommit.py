"""GroupCommitter on a real SQLite pool: batching, savepoint isolation, commit-then-ack."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from gridd.store.groupcommit import GroupCommitter
from gridd.store.sqlite import SQLiteDialect


@pytest.fixture
def db(tmp_path):
    """The path of an SQLite file with a table ``t`` and a table with a deferred foreign key."""
    path = str(tmp_path / "gc.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        conn.execute("CREATE TABLE child (parent INTEGER REFERENCES t (k) DEFERRABLE INITIALLY DEFERRED)")
    conn.close()
    return path


@pytest.fixture
def committer(db):
    """A GroupCommitter on a pool over ``db``, configured as the SQLite store does."""
    pool = SQLiteDialect.connection_pool(db)
    yield GroupCommitter(pool, begin=SQLiteDialect.begin)
    pool.close()


def rows(path) -> list[tuple]:
    """Table ``t`` as a separate connection sees it: committed rows only."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT k, v FROM t ORDER BY k").fetchall()
    finally:
        conn.close()


def thd_insert(txn, k, v):
    txn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (k, v))
    return k


def thd_read(txn, k):
    txn.execute("SELECT v FROM t WHERE k = ?", (k,))
    row = txn.fetchone()
    return row and row[0]


def thd_orphan(txn):
    """A write that succeeds but makes the COMMIT fail (its foreign key is deferred)."""
    txn.execute("INSERT INTO child (parent) VALUES (12345)")


@pytest_twisted.ensureDeferred
async def test_write_fires_with_result_after_commit(committer, db):
    """A write's Deferred fires with what its thread function returned, once the row is committed."""
    seen = []
    d = committer.write(thd_insert, 1, "one")
    d.addCallback(lambda k: seen.append((k, rows(db))))
    await d
    assert seen == [(1, [(1, "one")])]


@pytest_twisted.ensureDeferred
async def test_writes_in_one_turn_share_transaction(committer, db):
    """Writes given while a transaction runs all share the next one."""
    results = await DeferredList([committer.write(thd_insert, k, str(k)) for k in range(200)], fireOnOneErrback=True)
    assert [k for _, k in results] == list(range(200))
    assert (committer.writes, committer.transactions) == (200, 2)
    assert len(rows(db)) == 200


@pytest_twisted.ensureDeferred
async def test_max_batch_bounds_transaction(db):
    """No transaction runs more than max_batch writes."""
    pool = SQLiteDialect.connection_pool(db)
    try:
        committer = GroupCommitter(pool, begin=SQLiteDialect.begin, max_batch=10)
        await DeferredList([committer.write(thd_insert, k, str(k)) for k in range(51)], fireOnOneErrback=True)
        assert committer.transactions == 1 + 5
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_writes_see_earlier_writes(committer):
    """Writes run in the order given, so a later write in a batch sees an earlier one."""
    committer.write(thd_insert, 0, "first")
    d1 = committer.write(thd_insert, 1, "second")
    d2 = committer.write(thd_read, 1)
    assert await d1 == 1
    assert await d2 == "second"


@pytest_twisted.ensureDeferred
async def test_failing_write_rolls_back_alone(committer, db):
    """A write that raises fails alone and leaves nothing behind; its batch neighbours commit."""
    first = committer.write(thd_insert, 0, "busy")
    before = committer.transactions
    a = committer.write(thd_insert, 1, "a")
    clash = committer.write(thd_insert, 1, "clash")
    b = committer.write(thd_insert, 2, "b")
    await first
    assert await a == 1
    with pytest.raises(sqlite3.IntegrityError):
        await clash
    assert await b == 2
    assert committer.transactions == before + 1
    assert rows(db) == [(0, "busy"), (1, "a"), (2, "b")]


@pytest_twisted.ensureDeferred
async def test_commit_failure_fails_whole_batch(committer, db):
    """If COMMIT fails, every write of the batch fails, and none is stored."""
    first = committer.write(thd_insert, 0, "alone")
    batch = [committer.write(thd_insert, 1, "a"), committer.write(thd_orphan), committer.write(thd_insert, 2, "b")]
    await first
    for d in batch:
        with pytest.raises(sqlite3.IntegrityError):
            await d
    assert rows(db) == [(0, "alone")]


@pytest_twisted.ensureDeferred
async def test_flush_waits_for_queued_writes(committer, db):
    """flush() fires after every write given before it has settled, failed ones included."""
    writes = [committer.write(thd_insert, k, "v") for k in (1, 2, 2)]
    settled = []
    for d in writes:
        d.addBoth(settled.append)
    await committer.flush()
    assert len(settled) == 3
    assert rows(db) == [(1, "v"), (2, "v")]
    assert isinstance(settled[2].value, sqlite3.IntegrityError)


def test_flush_idle_fires_at_once(committer):
    """With nothing queued, flush() has already fired."""
    fired = []
    committer.flush().addCallback(fired.append)
    assert fired == [None]
