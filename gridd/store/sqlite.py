"""The embedded store: one SQLite file, written through group commit.

SQLite has one writer at a time and pays a disk sync for every commit, so the
store talks to it over a single connection and hands every write to a
``GroupCommitter``: writes that arrive together share one transaction, each
in its own savepoint.

The SQL below is written so that MySQL can run it too. What only SQLite
needs lives in ``SQLiteDialect``; the MySQL store (its own issue) brings a
dialect of its own and reuses the ``thd_*`` functions.

Fencing and once-only results are checked in SQL inside each write's
savepoint, not only by the dispatcher: a lease is checked by an ``UPDATE ...
WHERE lease = ?`` and a result is taken by an ``UPDATE ... WHERE accepted_at
IS NULL``, so a write that races another one loses cleanly.
"""

from __future__ import annotations

import json
import os
import sqlite3
from importlib import resources

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from gridd.errors import (
    DuplicateResult,
    Incomplete,
    InvalidState,
    StaleLease,
    Unavailable,
    UnknownJob,
    UnknownRecord,
)
from gridd.store.base import ACTIVE_STATES, JOB_STATES, SETTABLE_STATES, ActiveJob, SchemaTooNew
from gridd.store.groupcommit import GroupCommitter

__all__ = ["SQLiteDialect", "SQLiteStore", "load_migrations"]

log = Logger()


class SQLiteDialect:
    """Everything particular to SQLite, in one place.

    - One connection (``cp_max=1``): SQLite has one writer anyway, and with one
      connection the pool's queue is the order in which work reaches the file.
    - ``check_same_thread=False``: adbapi closes connections from the reactor
      thread. ``isolation_level=None``: the sqlite3 module must not open
      transactions on its own; every write transaction starts with ``begin``.
    - ``BEGIN IMMEDIATE`` takes the write lock at once. A deferred transaction
      that turns into a writer halfway can fail with SQLITE_BUSY instead of
      waiting for the lock.
    - WAL with ``synchronous=NORMAL``: readers and the writer don't block each
      other, and a commit survives the process being killed, at a fraction of
      the cost of FULL; a power cut may lose the last commits, never the file.
    - ``busy_timeout``: another process holding the lock (an operator's
      ``sqlite3`` shell, a backup) is waited for this long, then the write
      fails as ``Unavailable``.
    - Parameters are in qmark style (``?``). A driver with another style
      converts them in the adbapi ``transactionFactory`` its dialect sets.
    """

    #: Also the name of the migrations folder.
    name = "sqlite"
    begin = "BEGIN IMMEDIATE"
    busy_timeout_ms = 5000
    #: Primary result codes that mean the database cannot serve just now, as
    #: opposed to an error in the SQL.
    unavailable_codes = frozenset(
        {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
    )

    @classmethod
    def connection_pool(cls, path: str, reactor=None) -> ConnectionPool:
        return ConnectionPool(
            "sqlite3",
            path,
            check_same_thread=False,
            isolation_level=None,
            cp_min=1,
            cp_max=1,
            cp_openfun=cls.thd_configure,
            cp_reactor=reactor,
        )

    @classmethod
    def thd_configure(cls, conn) -> None:
        """Set up a new connection (adbapi's ``cp_openfun``, in the pool's thread)."""
        for pragma in (
            "journal_mode = WAL",
            "synchronous = NORMAL",
            f"busy_timeout = {cls.busy_timeout_ms}",
            "foreign_keys = ON",
        ):
            conn.execute(f"PRAGMA {pragma}")

    @classmethod
    def is_unavailable(cls, error: BaseException) -> bool:
        code = getattr(error, "sqlite_errorcode", None)
        return isinstance(error, sqlite3.OperationalError) and code is not None and code & 0xFF in cls.unavailable_codes


class SQLiteStore:
    """``gridd.store.base.IStore`` on an SQLite file, created with its folder if missing."""

    def __init__(self, path: str, reactor=None):
        self.path = path
        self._reactor = reactor
        # start() makes the pool: building a store (in a service tree under
        # test, say) must not start threads.
        self._pool: ConnectionPool | None = None
        #: The ``GroupCommitter`` once started; its counters are for metrics.
        self.committer: GroupCommitter | None = None

    def start(self) -> Deferred:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        pool = SQLiteDialect.connection_pool(self.path, self._reactor)
        try:
            applied = await pool.runInteraction(thd_migrate, SQLiteDialect.begin, load_migrations(SQLiteDialect.name))
        except BaseException:
            pool.close()
            raise
        if applied:
            log.info("migrated {path} to schema {version}", path=self.path, version=applied[-1])
        self._pool = pool
        self.committer = GroupCommitter(pool, begin=SQLiteDialect.begin)

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await self.committer.flush()
            pool.close()

    # -- writes ----------------------------------------------------------
    # Caller values are encoded to JSON here, in the reactor thread, so that
    # what is written is the value at the time of the call.

    def submit(self, specs, now):
        try:
            jobs = [_encode_job(spec) for spec in specs]
        except (TypeError, ValueError):
            return fail()
        return self._write(thd_submit, jobs, now)

    def grant(self, job_id, lease, worker, attempt, now):
        return self._write(thd_grant, job_id, lease, worker, attempt, now)

    def add_results(self, job_id, lease, results, now):
        try:
            encoded = _encode_results(results)
        except (TypeError, ValueError):
            return fail()
        return self._write(thd_add_results, job_id, lease, encoded, now)

    def complete(self, job_id, lease, results, now):
        try:
            encoded = _encode_results(results)
        except (TypeError, ValueError):
            return fail()
        return self._write(thd_complete, job_id, lease, encoded, now)

    def release(self, job_id, lease, state, now, *, reason, error=None, not_before=None, attempts=None):
        if state not in SETTABLE_STATES:
            return fail(ValueError(f"cannot release a job to {state!r}"))
        detail = {"to": state, "reason": reason, "error": error}
        return self._write(thd_release, job_id, lease, state, now, detail, not_before, attempts)

    def set_state(self, job_id, allowed, state, now, *, reason, reset_attempts=False):
        if state not in SETTABLE_STATES:
            return fail(ValueError(f"cannot set a job to {state!r}"))
        return self._write(thd_set_state, job_id, tuple(allowed), state, now, reason, reset_attempts)

    # -- reads -----------------------------------------------------------

    def load_active(self, job_ids=None):
        return self._read(thd_load_active, job_ids)

    def get_job(self, job_id):
        return self._read(thd_get_job, job_id)

    def list_jobs(self, state=None, type=None, after=0, limit=100):
        return self._read(thd_list_jobs, state, type, after, limit)

    def get_results(self, job_id, after=-1, limit=1000):
        return self._read(thd_get_results, job_id, after, limit)

    def counts(self):
        return self._read(thd_counts)

    # -- plumbing --------------------------------------------------------

    def _write(self, thd_fn, *args) -> Deferred:
        if self._pool is None:
            return fail(Unavailable("the store is not running"))
        return self.committer.write(thd_fn, *args).addErrback(_unavailable)

    def _read(self, thd_fn, *args) -> Deferred:
        # Reads skip the committer: with one connection they queue behind the
        # transactions already started, so they see every acknowledged write.
        if self._pool is None:
            return fail(Unavailable("the store is not running"))
        return self._pool.runInteraction(thd_fn, *args).addErrback(_unavailable)


def _unavailable(failure):
    """Turn a database that cannot serve now into ``Unavailable``, which clients retry."""
    if SQLiteDialect.is_unavailable(failure.value):
        raise Unavailable(f"database unavailable: {failure.value}") from failure.value
    return failure


def _dump(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _encode_job(spec):
    row = (
        spec.name,
        spec.type,
        spec.priority,
        _dump(spec.requires),
        _dump(spec.params),
        len(spec.records),
        spec.retries,
        spec.timeout,
        spec.submitter,
    )
    return row, [_dump(data) for data in spec.records]


def _encode_results(results):
    """(index, output JSON or None, error) per result; an error result has no output."""
    return [(r.index, None if r.error is not None else _dump(r.output), r.error) for r in results]


# -- migrations ----------------------------------------------------------


def load_migrations(dialect: str) -> list[tuple[int, str]]:
    """The migration scripts shipped for ``dialect`` as (version, script), oldest first.

    They are ``gridd/store/migrations/<dialect>/NNN_what.sql``, version NNN.
    """
    folder = resources.files("gridd.store") / "migrations" / dialect
    return sorted(
        (int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )


def _statements(script: str) -> list[str]:
    """Split a migration script: ``;`` ends a statement, ``--`` starts a comment line.

    Drivers run one statement per ``execute``, and sqlite3's ``executescript``
    would commit the migration transaction half way.
    """
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
    return [statement.strip() for statement in code.split(";") if statement.strip()]


def thd_migrate(txn, begin: str, migrations: list[tuple[int, str]]) -> list[int]:
    """Apply the migrations the database lacks, in one transaction; return their versions.

    ``schema_version`` has a row per applied migration. Raises ``SchemaTooNew``
    if the database is past the last of ``migrations``.
    """
    txn.execute(begin)
    txn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL PRIMARY KEY)")
    txn.execute("SELECT MAX(version) FROM schema_version")
    current = txn.fetchone()[0] or 0
    known = migrations[-1][0]
    if current > known:
        raise SchemaTooNew(current, known)
    applied = []
    for version, script in migrations:
        if version > current:
            for statement in _statements(script):
                txn.execute(statement)
            txn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            applied.append(version)
    return applied


# -- writes, in the pool's thread -----------------------------------------


def thd_submit(txn, jobs, now) -> list[int]:
    """Insert jobs with their records and a ``submitted`` event each; return their ids.

    Jobs go in one INSERT each because ``lastrowid`` is the portable way to
    learn an id and ``executemany`` sets none; the records, the bulk, go in
    with ``executemany``.
    """
    ids = []
    for row, records in jobs:
        txn.execute(
            "INSERT INTO jobs (name, type, priority, requires, params, total, retries, timeout, submitter,"
            " state, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
            (*row, now, now),
        )
        job_id = txn.lastrowid
        txn.executemany(
            "INSERT INTO records (job_id, idx, data) VALUES (?, ?, ?)",
            [(job_id, index, data) for index, data in enumerate(records)],
        )
        ids.append(job_id)
    txn.executemany("INSERT INTO job_events (job_id, at, event) VALUES (?, ?, 'submitted')", [(i, now) for i in ids])
    return ids


def thd_grant(txn, job_id, lease, worker, attempt, now) -> None:
    txn.execute(
        "UPDATE jobs SET state = 'running', lease = ?, worker = ?, attempts = ?, not_before = NULL, updated = ?"
        " WHERE id = ? AND state = 'queued'",
        (lease, worker, attempt, now, job_id),
    )
    if txn.rowcount == 0:
        state = _thd_state(txn, job_id)
        raise InvalidState(f"job {job_id} is {state}, not queued", state=state)
    _thd_event(txn, job_id, now, "leased", attempt, lease, worker)


def thd_add_results(txn, job_id, lease, results, now) -> int:
    return _thd_accept(txn, job_id, lease, results, now)[1]


def thd_complete(txn, job_id, lease, results, now) -> None:
    total, accepted, attempt, worker = _thd_accept(txn, job_id, lease, results, now)
    if accepted < total:
        raise Incomplete(f"job {job_id} lacks {total - accepted} results", missing=total - accepted)
    txn.execute("UPDATE jobs SET state = 'done', lease = NULL, worker = NULL WHERE id = ?", (job_id,))
    _thd_event(txn, job_id, now, "completed", attempt, lease, worker)


def thd_release(txn, job_id, lease, state, now, detail, not_before, attempts) -> None:
    _, _, attempt, worker = _thd_fence(txn, job_id, lease, now)
    txn.execute(
        "UPDATE jobs SET state = ?, lease = NULL, worker = NULL, not_before = ?, attempts = ? WHERE id = ?",
        (state, not_before, attempt if attempts is None else attempts, job_id),
    )
    _thd_event(txn, job_id, now, "released", attempt, lease, worker, detail)


def thd_set_state(txn, job_id, allowed, state, now, reason, reset_attempts) -> None:
    # Touching the row first locks it where the database has row locks
    # (MySQL), so the checks below still hold at commit. (SQLite's BEGIN
    # IMMEDIATE already keeps every other writer out.)
    txn.execute("UPDATE jobs SET updated = ? WHERE id = ?", (now, job_id))
    if txn.rowcount == 0:
        raise UnknownJob(f"no job {job_id}")
    txn.execute("SELECT state, lease, attempts FROM jobs WHERE id = ?", (job_id,))
    current, lease, attempts = txn.fetchone()
    if current not in allowed or lease is not None:
        raise InvalidState(f"job {job_id} is {current}", state=current)
    txn.execute(
        "UPDATE jobs SET state = ?, attempts = ?, not_before = NULL WHERE id = ?",
        (state, 0 if reset_attempts else attempts, job_id),
    )
    _thd_event(txn, job_id, now, "state", detail={"from": current, "to": state, "reason": reason})


def _thd_fence(txn, job_id, lease, now) -> tuple[int, int, int, str]:
    """Check that ``lease`` is the job's current lease; return its total, accepted, attempts, worker.

    The check is an UPDATE, which also locks the job's row where the database
    has row locks, so that no other writer can end the lease before this
    write commits.
    """
    txn.execute("UPDATE jobs SET updated = ? WHERE id = ? AND lease = ?", (now, job_id, lease))
    if txn.rowcount == 0:
        _thd_state(txn, job_id)  # UnknownJob if there is no such job
        raise StaleLease(f"lease {lease!r} is not the current lease of job {job_id}")
    txn.execute("SELECT total, accepted, attempts, worker FROM jobs WHERE id = ?", (job_id,))
    return txn.fetchone()


def _thd_accept(txn, job_id, lease, results, now) -> tuple[int, int, int, str]:
    """Accept ``results`` under ``lease``, all or none; return the job's total, accepted, attempts, worker."""
    total, accepted, attempt, worker = _thd_fence(txn, job_id, lease, now)
    unknown = sorted({index for index, _, _ in results if not 0 <= index < total})
    if unknown:
        raise UnknownRecord(f"job {job_id} has no records {unknown}", records=unknown)
    duplicates = set()
    for index, output, error in results:
        txn.execute(
            "UPDATE records SET output = ?, error = ?, accepted_at = ?, lease = ?, worker = ?"
            " WHERE job_id = ? AND idx = ? AND accepted_at IS NULL",
            (output, error, now, lease, worker, job_id, index),
        )
        if txn.rowcount == 0:
            duplicates.add(index)
    if duplicates:
        raise DuplicateResult(f"job {job_id} already has results {sorted(duplicates)}", records=sorted(duplicates))
    txn.execute("UPDATE jobs SET accepted = accepted + ? WHERE id = ?", (len(results), job_id))
    return total, accepted + len(results), attempt, worker


def _thd_state(txn, job_id) -> str:
    """Return the job's state; raise ``UnknownJob`` if there is no such job."""
    txn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,))
    row = txn.fetchone()
    if row is None:
        raise UnknownJob(f"no job {job_id}")
    return row[0]


def _thd_event(txn, job_id, now, event, attempt=None, lease=None, worker=None, detail=None) -> None:
    txn.execute(
        "INSERT INTO job_events (job_id, at, event, attempt, lease, worker, detail) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (job_id, now, event, attempt, lease, worker, None if detail is None else _dump(detail)),
    )


# -- reads, in the pool's thread ------------------------------------------

#: ACTIVE_STATES as an SQL list, for ``state IN ...``.
_ACTIVE = "(" + ", ".join(f"'{state}'" for state in ACTIVE_STATES) + ")"


def thd_load_active(txn, job_ids) -> list[ActiveJob]:
    where, args = f"jobs.state IN {_ACTIVE}", ()
    if job_ids is not None:
        if not job_ids:
            return []  # MySQL has no empty "IN ()"
        where += f" AND jobs.id IN ({', '.join('?' * len(job_ids))})"
        args = tuple(job_ids)
    txn.execute(
        "SELECT id, type, priority, requires, params, total, state, attempts, retries, timeout, lease, worker,"
        f" not_before, name, submitter, created FROM jobs WHERE {where} ORDER BY id",
        args,
    )
    jobs = {}
    for row in _thd_dicts(txn):
        row.update(requires=json.loads(row["requires"]), params=json.loads(row["params"]))
        jobs[row["id"]] = ActiveJob(**row, pending={})
    txn.execute(
        "SELECT records.job_id, records.idx, records.data FROM records JOIN jobs ON jobs.id = records.job_id"
        f" WHERE {where} AND records.accepted_at IS NULL ORDER BY records.job_id, records.idx",
        args,
    )
    for job_id, index, data in txn.fetchall():
        jobs[job_id].pending[index] = json.loads(data)
    return list(jobs.values())


def thd_get_job(txn, job_id) -> dict:
    txn.execute(
        "SELECT id, name, type, state, priority, requires, params, total, accepted, attempts, retries, timeout,"
        " lease, worker, not_before, submitter, created, updated FROM jobs WHERE id = ?",
        (job_id,),
    )
    rows = _thd_dicts(txn)
    if not rows:
        raise UnknownJob(f"no job {job_id}")
    job = rows[0]
    job.update(requires=json.loads(job["requires"]), params=json.loads(job["params"]))
    txn.execute("SELECT COUNT(*) FROM records WHERE job_id = ? AND error IS NOT NULL", (job_id,))
    job["failed_records"] = txn.fetchone()[0]
    txn.execute(
        "SELECT at, event, attempt, lease, worker, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,)
    )
    job["history"] = _thd_dicts(txn)
    for event in job["history"]:
        if event["detail"] is not None:
            event["detail"] = json.loads(event["detail"])
    return job


def thd_list_jobs(txn, state, type, after, limit) -> list[dict]:
    where, args = ["id > ?"], [after]
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if type is not None:
        where.append("type = ?")
        args.append(type)
    txn.execute(
        "SELECT id, name, type, state, priority, total, accepted, attempts, worker, created, updated FROM jobs"
        f" WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
        (*args, limit),
    )
    return _thd_dicts(txn)


def thd_get_results(txn, job_id, after, limit) -> list[dict]:
    _thd_state(txn, job_id)  # UnknownJob if there is no such job
    txn.execute(
        "SELECT idx, output, error, worker, lease FROM records"
        " WHERE job_id = ? AND idx > ? AND accepted_at IS NOT NULL ORDER BY idx LIMIT ?",
        (job_id, after, limit),
    )
    return [
        ({"i": index, "error": error} if error is not None else {"i": index, "out": json.loads(output)})
        | {"worker": worker, "lease": lease}
        for index, output, error, worker, lease in txn.fetchall()
    ]


def thd_counts(txn) -> dict[str, int]:
    txn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")
    return dict.fromkeys(JOB_STATES, 0) | dict(txn.fetchall())


def _thd_dicts(txn) -> list[dict]:
    """The rows of the last query as dicts keyed by column name."""
    names = [column[0] for column in txn.description]
    return [dict(zip(names, row, strict=True)) for row in txn.fetchall()]
