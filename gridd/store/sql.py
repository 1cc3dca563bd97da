"""What the SQL stores share: the Deferred API, group commit and every query.

``SQLStore`` turns each ``IStore`` call into a thread function (``thd_*``)
run on an adbapi ``ConnectionPool``: writes through a ``GroupCommitter``, so
that writes arriving together share one transaction, each in its own
savepoint; reads straight on the pool. The ``thd_*`` functions take the
transaction, return plain data and never touch the reactor.

The SQL is written once, in qmark style (``?``), for SQLite and MySQL alike.
Whatever differs between the databases lives in one dialect class per
database (``gridd.store.sqlite.SQLiteDialect``,
``gridd.store.mysql.MySQLDialect``): the statement that opens a write
transaction, how a read gets a consistent view, whether DDL is
transactional, the driver's parameter style, and which driver errors mean
"the database cannot serve just now".

Fencing and once-only results are checked in SQL inside each write's
savepoint, not only by the dispatcher: a lease is checked by an ``UPDATE ...
WHERE lease = ? AND server = ?`` and a result is taken by an ``UPDATE ...
WHERE accepted_at IS NULL``, so a write that races another one loses
cleanly. Both rely on the row count being the number of rows *matched*,
which is SQLite's and, with the ``FOUND_ROWS`` client flag, MySQL's.

A lease's writes are idempotent (``IStore``): when such a check fails, the
write looks for what it would have left behind had it committed before (the
same results under the same lease, a ``completed`` or ``released`` event
naming the lease, a ``leased`` event naming the token) and, finding it,
answers as the first time and changes nothing. These look-ups run only on
the refused path, except the one ``grant`` makes on ``job_events``.

Several servers on one database (``IStore``'s last section): each store
object writes as its ``server_id``. Every change that ends or moves a lease
is an ``UPDATE`` whose ``WHERE`` names what the writer saw (lease, owner,
state), so of two servers racing for the same lease exactly one matches the
row and the other changes nothing; see ``thd_expire_servers``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import ClassVar

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from gridd.errors import (
    AlreadyExists,
    CommitUnknown,
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
    END_LEASE_STATES,
    JOB_STATES,
    SETTABLE_STATES,
    ActiveJob,
    CommitOutcomeUnknown,
    SchemaTooNew,
    StoreUnavailable,
    attempts_from_history,
    dump_json,
    encode_results,
    failures_since_reset,
    job_error,
    server_id_for,
)
from gridd.store.groupcommit import GroupCommitter

__all__ = ["SQLStore", "load_migrations", "known_version"]

log = Logger()


class SQLStore:
    """``gridd.store.base.IStore`` on an SQL database through adbapi.

    A subclass names its ``dialect`` and says how to reach its database:
    ``describe()`` (for messages, never with a password), ``_open_pool()``
    and ``_preflight()``.

    The dialect provides ``name`` (also the migrations folder), ``begin``
    (opens a write transaction), ``read_begin`` (statements that open a read
    transaction), ``transactional_ddl``, ``migration_lock`` and
    ``migration_unlock`` (statements, or None), ``skip_locked`` (what makes
    a SELECT claim rows another transaction has not locked, or ""),
    ``is_unavailable(error)``, ``is_driver_error(error)`` and
    ``is_ddl_done(error)``.
    """

    dialect: ClassVar[type]

    def __init__(self, reactor=None, server_id: str | None = None):
        #: The server this store object writes as (``IStore.server_id``).
        self.server_id = server_id_for(server_id)
        self._reactor = reactor
        # start() makes the pool: building a store (in a service tree under
        # test, say) must not start threads.
        self._pool: ConnectionPool | None = None
        #: The ``GroupCommitter`` once started; its counters are for metrics.
        self.committer: GroupCommitter | None = None
        #: Set while the database fails calls, so an outage is logged once.
        self._outage: str | None = None

    def describe(self) -> str:
        """The store as an operator names it, without secrets."""
        raise NotImplementedError

    def _open_pool(self) -> ConnectionPool:
        """Build the connection pool (in the reactor thread; it connects lazily)."""
        raise NotImplementedError

    def _preflight(self) -> int:
        """Connect once, synchronously, and return the schema version found (0 if none)."""
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------

    def check(self) -> None:
        """Synchronously check that the database can be opened and is not too new.

        For a daemon's start-up, before its reactor runs, so that a wrong
        ``--db`` is one clear line and a non-zero exit. Raises
        ``StoreUnavailable`` or ``SchemaTooNew``; it blocks for a connection
        attempt at most.
        """
        try:
            found = self._preflight()
        except StoreUnavailable:
            raise
        except Exception as error:
            if isinstance(error, OSError) or self.dialect.is_driver_error(error):
                raise StoreUnavailable(self.describe(), _reason(error)) from error
            raise
        known = known_version(self.dialect.name)
        if found > known:
            raise SchemaTooNew(found, known)

    def start(self) -> Deferred:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            pool = self._open_pool()
        except OSError as error:
            raise StoreUnavailable(self.describe(), _reason(error)) from error
        try:
            applied = await pool.runInteraction(thd_migrate, self.dialect, load_migrations(self.dialect.name))
        except BaseException as error:
            pool.close()
            if self.dialect.is_driver_error(error):
                raise StoreUnavailable(self.describe(), _reason(error)) from error
            raise
        if applied:
            log.info("migrated {store} to schema {version}", store=self.describe(), version=applied[-1])
        self._pool = pool
        self.committer = GroupCommitter(pool, begin=self.dialect.begin)

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

    def grant(self, job_id, lease, worker, now):
        return self._write(thd_grant, self.server_id, job_id, lease, worker, now, self.dialect.skip_locked)

    def add_results(self, job_id, lease, results, now):
        try:
            encoded = encode_results(results)
        except (TypeError, ValueError):
            return fail()
        return self._write(thd_add_results, self.server_id, job_id, lease, encoded, now)

    def complete(self, job_id, lease, results, now):
        try:
            encoded = encode_results(results)
        except (TypeError, ValueError):
            return fail()
        return self._write(thd_complete, self.server_id, job_id, lease, encoded, now)

    def release(self, job_id, lease, state, now, *, reason, error=None, not_before=None, attempts=None):
        if state not in SETTABLE_STATES:
            return fail(ValueError(f"cannot release a job to {state!r}"))
        detail = {"to": state, "reason": reason, "error": error}
        return self._write(thd_release, self.server_id, job_id, lease, state, now, detail, not_before, attempts)

    def set_state(self, job_id, allowed, state, now, *, reason, reset_attempts=False):
        if state not in SETTABLE_STATES:
            return fail(ValueError(f"cannot set a job to {state!r}"))
        return self._write(thd_set_state, job_id, tuple(allowed), state, now, reason, reset_attempts)

    def beat(self, now, deadline):
        return self._write(thd_beat, self.server_id, now, deadline)

    def expire_servers(self, now, grace):
        return self._write(thd_expire_servers, self.server_id, now, grace, self.dialect.skip_locked)

    def take_lease(self, job_id, lease, worker, now):
        return self._write(thd_take_lease, self.server_id, job_id, lease, worker, now)

    def end_lease(self, job_id, lease, state, now, *, reason):
        if state not in END_LEASE_STATES:
            return fail(ValueError(f"cannot end a lease to {state!r}"))
        return self._write(thd_end_lease, job_id, lease, state, now, reason)

    def add_credential(self, credential_id, role, secret_hash, now, note=None):
        return self._write(thd_add_credential, credential_id, role, secret_hash, now, note)

    def revoke_credential(self, credential_id, now):
        return self._write(thd_revoke_credential, credential_id, now)

    # -- reads -----------------------------------------------------------

    def get_credential(self, credential_id):
        return self._read(thd_get_credential, credential_id)

    def list_credentials(self):
        return self._read(thd_list_credentials)

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

    def runnable(self, now, limit):
        return self._read(thd_runnable, now, limit)

    def own_leases(self):
        return self._read(thd_own_leases, self.server_id)

    def job_states(self, job_ids):
        return self._read(thd_job_states, list(job_ids))

    # -- plumbing --------------------------------------------------------

    def _write(self, thd_fn, *args) -> Deferred:
        if self._pool is None:
            return fail(Unavailable("the store is not running"))
        return self.committer.write(thd_fn, *args).addCallbacks(self._served, self._unavailable)

    def _read(self, thd_fn, *args) -> Deferred:
        # Reads skip the committer. On SQLite's one connection they queue
        # behind the transactions already started; on MySQL they run on a
        # connection of their own and see every write acknowledged so far.
        if self._pool is None:
            return fail(Unavailable("the store is not running"))
        d = self._pool.runInteraction(_thd_read, self.dialect.read_begin, thd_fn, *args)
        return d.addCallbacks(self._served, self._unavailable)

    def _served(self, result):
        if self._outage is not None:
            self._outage = None
            log.info("store {store} serves again", store=self.describe())
        return result

    def _unavailable(self, failure):
        """Turn a database that cannot serve now into ``Unavailable``, which clients retry.

        The first such failure of an outage is logged as a warning with its
        cause; the next call that succeeds logs the end of it.
        """
        if not self.dialect.is_unavailable(failure.value):
            return failure
        reason = _reason(failure.value)
        if self._outage is None:
            self._outage = reason
            log.warn(
                "store {store} cannot serve: {reason}; requests fail as 'unavailable' until it is back",
                store=self.describe(),
                reason=reason,
            )
        if isinstance(failure.value, CommitOutcomeUnknown):
            raise CommitUnknown(f"database unavailable: {reason}") from failure.value
        raise Unavailable(f"database unavailable: {reason}") from failure.value


def _thd_read(txn, begin: tuple[str, ...], thd_fn, *args):
    """Run a read after the dialect's statements that give it a consistent view."""
    for statement in begin:
        txn.execute(statement)
    return thd_fn(txn, *args)


def _reason(error: BaseException) -> str:
    """A driver error as one line: ``(1045) Access denied ...`` or the error's text."""
    if isinstance(error, OSError):
        return str(error)
    args = getattr(error, "args", ())
    if len(args) == 2 and isinstance(args[0], int):
        return f"({args[0]}) {args[1]}"
    return " ".join(str(error).split()) or type(error).__name__


def _encode_job(spec):
    row = (
        spec.name,
        spec.type,
        spec.priority,
        dump_json(spec.requires),
        dump_json(spec.params),
        len(spec.records),
        spec.retries,
        spec.timeout,
        spec.submitter,
    )
    return row, [dump_json(data) for data in spec.records]


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


def known_version(dialect: str) -> int:
    """The newest schema version this code ships for ``dialect``."""
    return load_migrations(dialect)[-1][0]


def thd_migrate(txn, dialect, migrations: list[tuple[int, str]]) -> list[int]:
    """Apply the migrations the database lacks; return their versions.

    ``schema_version`` has a row per applied migration. Raises ``SchemaTooNew``
    if the database is past the last of ``migrations``, before changing
    anything.

    Where DDL is transactional (SQLite) every migration runs in one
    transaction: all or nothing. Where it is not (MySQL commits before and
    after each DDL statement), migrations are applied one file at a time,
    each file's ``schema_version`` row committed right after it, under the
    dialect's ``migration_lock`` so that two servers starting together do not
    both migrate; a file interrupted halfway is run again from its start, so
    such files are written to be re-runnable (``CREATE TABLE IF NOT EXISTS``),
    and a DDL statement that fails because its change is already there (the
    dialect's ``is_ddl_done``: a column, an index added before) is skipped.
    """
    if dialect.migration_lock is not None:
        txn.execute(dialect.migration_lock)
        if txn.fetchone()[0] != 1:
            raise Unavailable("another gridd is migrating this database; try again")
    try:
        txn.execute(dialect.begin)
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
                    try:
                        txn.execute(statement)
                    except Exception as error:
                        if dialect.transactional_ddl or not dialect.is_ddl_done(error):
                            raise
                        log.info("migration {version}: already applied: {error}", version=version, error=error)
                txn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                if not dialect.transactional_ddl:
                    txn.execute("COMMIT")
                applied.append(version)
        return applied
    finally:
        if dialect.migration_unlock is not None:
            txn.execute(dialect.migration_unlock)


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


def thd_grant(txn, server, job_id, lease, worker, now, skip_locked="") -> ActiveJob:
    """Claim a queued job under ``lease``; return the job as read in this transaction.

    The row lock decides between servers racing for the job. With
    ``skip_locked`` (MySQL), a job whose row another server is claiming at
    this moment is passed over at once instead of waited for: the claim
    fails as ``InvalidState`` and the dispatcher takes its next job.

    The attempt count is the row's own plus one, and the pending records are
    read after the claim, so a server never hands out a job from a stale
    copy of it; nor before its retry backoff is over (``not_before``), which
    another server may have set since its copy was read. A token that appears in an earlier ``leased`` event of the
    job is never granted again (one indexed look-up on ``job_events``):
    that is what makes a repeated grant recognisable as one.
    """
    if skip_locked:
        txn.execute(f"SELECT id FROM jobs WHERE id = ? AND state = 'queued'{skip_locked}", (job_id,))
        if txn.fetchone() is None:
            return _thd_not_granted(txn, job_id, lease, now, locked=True)
    if _thd_has_event(txn, job_id, "leased", lease):
        return _thd_not_granted(txn, job_id, lease, now)
    txn.execute(
        "UPDATE jobs SET state = 'running', lease = ?, worker = ?, server = ?, attempts = attempts + 1,"
        " not_before = NULL, updated = ? WHERE id = ? AND state = 'queued'"
        " AND (not_before IS NULL OR not_before <= ?)",
        (lease, worker, server, now, job_id, now),
    )
    if txn.rowcount == 0:
        return _thd_not_granted(txn, job_id, lease, now)
    job = _thd_one_active(txn, job_id, leased_at=now)
    _thd_event(txn, job_id, now, "leased", job.attempts, lease, worker)
    return job


def _thd_not_granted(txn, job_id, lease, now, locked=False) -> ActiveJob:
    """Why a grant claimed nothing: the same claim repeated (return the job), or raise.

    ``locked``: the claim found the row locked or not queued (SKIP LOCKED).
    """
    txn.execute("SELECT state, lease, not_before FROM jobs WHERE id = ?", (job_id,))
    row = txn.fetchone()
    if row is None:
        raise UnknownJob(f"no job {job_id}")
    state, current, not_before = row
    if lease is not None and current == lease:
        return _thd_one_active(txn, job_id)
    if _thd_has_event(txn, job_id, "leased", lease):
        raise StaleLease(f"lease {lease!r} of job {job_id} has ended; a lease is granted once")
    if state == "queued" and locked:  # another server's claim is committing
        raise InvalidState(f"job {job_id} is being claimed by another server", state=state)
    if state == "queued" and not_before is not None and not_before > now:
        raise InvalidState(f"job {job_id} waits out its retry backoff for {not_before - now:g} s more", state=state)
    raise InvalidState(f"job {job_id} is {state}, not queued", state=state)


def _thd_one_active(txn, job_id, leased_at=None) -> ActiveJob:
    """The active job ``job_id`` as ``thd_load_active`` gives it, in two queries when ``leased_at`` is known."""
    if leased_at is None:
        [job] = thd_load_active(txn, [job_id])
        return job
    txn.execute(f"SELECT {_ACTIVE_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
    [row] = _thd_dicts(txn)
    txn.execute("SELECT idx, data FROM records WHERE job_id = ? AND accepted_at IS NULL ORDER BY idx", (job_id,))
    pending = {index: json.loads(data) for index, data in txn.fetchall()}
    failures = _thd_failures(txn, "jobs.id = ?", (job_id,)).get(job_id, [])
    return _active_job(row, pending=pending, leased_at=leased_at, failures=failures)


def thd_add_results(txn, server, job_id, lease, results, now) -> int:
    try:
        return _thd_accept(txn, server, job_id, lease, results, now)[1]
    except StaleLease:
        # The same results sent again after the lease ended: answered as the first time.
        if results and _thd_all_repeats(txn, job_id, lease, results):
            txn.execute("SELECT accepted FROM jobs WHERE id = ?", (job_id,))
            return txn.fetchone()[0]
        raise


def thd_complete(txn, server, job_id, lease, results, now) -> None:
    try:
        total, accepted, attempt, worker = _thd_accept(txn, server, job_id, lease, results, now)
    except StaleLease:
        if _thd_state(txn, job_id) == "done" and _thd_has_event(txn, job_id, "completed", lease):
            return None  # this completion, made before: sent again
        raise
    if accepted < total:
        raise Incomplete(f"job {job_id} lacks {total - accepted} results", missing=total - accepted)
    txn.execute(
        "UPDATE jobs SET state = 'done', lease = NULL, worker = NULL, server = NULL, updated = ? WHERE id = ?",
        (now, job_id),
    )
    _thd_event(txn, job_id, now, "completed", attempt, lease, worker)


def thd_release(txn, server, job_id, lease, state, now, detail, not_before, attempts) -> None:
    try:
        _, _, attempt, worker = _thd_fence(txn, server, job_id, lease)
    except StaleLease:
        if _thd_ended_by(txn, job_id, lease, detail):
            return None  # this release, made before: sent again
        raise
    txn.execute(
        "UPDATE jobs SET state = ?, lease = NULL, worker = NULL, server = NULL, not_before = ?, attempts = ?,"
        " updated = ? WHERE id = ?",
        (state, not_before, attempt if attempts is None else attempts, now, job_id),
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


def thd_beat(txn, server, now, deadline) -> None:
    """Upsert the server's row. Only this server writes it, so no two upserts race."""
    txn.execute("UPDATE servers SET last_beat = ?, deadline = ? WHERE id = ?", (now, deadline, server))
    if txn.rowcount == 0:
        txn.execute("INSERT INTO servers (id, last_beat, deadline) VALUES (?, ?, ?)", (server, now, deadline))


#: What a lost lease's job becomes: attempts are counted at grant, so the
#: lease that was lost used one.
_LOST_TO = "CASE WHEN attempts < 1 + retries THEN 'queued' ELSE 'failed' END"


def thd_expire_servers(txn, server, now, grace, skip_locked) -> list[int]:
    """End the leases of the servers gone for more than ``grace``; return the jobs ended, by id.

    Safe when several servers run it at once, on any database:

    - A gone server's row is claimed by deleting it: ``SELECT ... FOR UPDATE
      SKIP LOCKED`` (MySQL) hands each such row to one transaction only (the
      others skip it instead of waiting), and the ``DELETE`` re-checks that
      the row is still there and still gone (it may have beaten since).
      SQLite runs one write transaction at a time: the second sees no row.
    - Each job is then ended by an ``UPDATE ... WHERE id = ? AND server = ?
      AND lease = ? AND state = 'running'`` naming what was read; a job that
      changed meanwhile (taken over by a reattaching worker, released by its
      owner, ended by another expiry) matches nothing and is left alone,
      and its event is written only if the row matched. The new state is
      computed from the row itself (``_LOST_TO``), and attempts and retries
      cannot change while the lease is the one read, so the rule applies
      once whichever server applies it.

    Jobs can also be left with an owner that has no row: a server that was
    thought gone (suspended, or its clock behind) granted a lease after its
    row was deleted, and died before it beat again. Such an owner counts as
    gone with its last beat the job's last change and no deadline, so these
    jobs end too, ``grace`` seconds after they last changed, instead of
    running forever.
    """
    txn.execute(
        f"SELECT id FROM servers WHERE id <> ? AND ? > last_beat + deadline + ? ORDER BY id{skip_locked}",
        (server, now, grace),
    )
    gone = []
    for (gone_id,) in txn.fetchall():
        txn.execute("DELETE FROM servers WHERE id = ? AND ? > last_beat + deadline + ?", (gone_id, now, grace))
        if txn.rowcount:
            gone.append(gone_id)
    candidates = []
    for gone_id in gone:
        txn.execute(
            "SELECT id, lease, worker, server FROM jobs WHERE server = ? AND state = 'running' ORDER BY id",
            (gone_id,),
        )
        candidates.extend(txn.fetchall())
    txn.execute(
        "SELECT id, lease, worker, server FROM jobs WHERE state = 'running' AND server <> ? AND ? > updated + ?"
        " AND NOT EXISTS (SELECT 1 FROM servers WHERE servers.id = jobs.server) ORDER BY id",
        (server, now, grace),
    )
    candidates.extend(txn.fetchall())
    ended = []
    for job_id, lease, worker, owner in sorted(set(candidates)):
        txn.execute(
            f"UPDATE jobs SET state = {_LOST_TO}, lease = NULL, worker = NULL, server = NULL, not_before = NULL,"
            " updated = ? WHERE id = ? AND server = ? AND lease = ? AND state = 'running'",
            (now, job_id, owner, lease),
        )
        if not txn.rowcount:
            continue
        txn.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,))
        state, attempt = txn.fetchone()
        detail = {"to": state, "reason": "server lost", "error": f"server {owner} lost"}
        _thd_event(txn, job_id, now, "released", attempt, lease, worker, detail)
        ended.append(job_id)
    return ended


def thd_take_lease(txn, server, job_id, lease, worker, now) -> ActiveJob:
    """Make ``server`` the owner of the job's running lease; return the job."""
    # The fence without the owner: any owner's lease may be taken over.
    # The UPDATE locks the row (MySQL), so the owner read next is the one replaced.
    txn.execute("UPDATE jobs SET updated = updated WHERE id = ? AND lease = ?", (job_id, lease))
    if txn.rowcount == 0:
        _thd_state(txn, job_id)  # UnknownJob if there is no such job
        raise StaleLease(f"lease {lease!r} is not the current lease of job {job_id}")
    txn.execute("SELECT server, worker, attempts FROM jobs WHERE id = ?", (job_id,))
    previous, current_worker, attempt = txn.fetchone()
    if (previous, current_worker) != (server, worker):
        txn.execute("UPDATE jobs SET server = ?, worker = ?, updated = ? WHERE id = ?", (server, worker, now, job_id))
        _thd_event(txn, job_id, now, "reattached", attempt, lease, worker, {"from": previous})
    # else: taken over by this server already, and sent again: nothing changes.
    return _thd_one_active(txn, job_id)


def thd_end_lease(txn, job_id, lease, state, now, reason) -> None:
    """End the job's running ``lease``, whoever owns it, as an operator's move."""
    detail = {"to": state, "reason": reason}
    txn.execute("UPDATE jobs SET updated = ? WHERE id = ? AND state = 'running' AND lease = ?", (now, job_id, lease))
    if txn.rowcount == 0:
        current = _thd_state(txn, job_id)
        if _thd_ended_by(txn, job_id, lease, detail):
            return None  # this end, made before: sent again
        raise InvalidState(f"job {job_id} is {current}, not running under lease {lease!r}", state=current)
    txn.execute("SELECT attempts, worker FROM jobs WHERE id = ?", (job_id,))
    attempt, worker = txn.fetchone()
    txn.execute(
        "UPDATE jobs SET state = ?, lease = NULL, worker = NULL, server = NULL, not_before = NULL, attempts = ?"
        " WHERE id = ?",
        (state, 0 if state == "queued" else max(attempt - 1, 0), job_id),
    )
    _thd_event(txn, job_id, now, "released", attempt, lease, worker, detail)


def thd_add_credential(txn, credential_id, role, secret_hash, now, note) -> None:
    # Checked first rather than caught: the driver's IntegrityError differs
    # between databases, and a refused write must change nothing.
    txn.execute("SELECT 1 FROM credentials WHERE id = ?", (credential_id,))
    if txn.fetchone() is not None:
        raise AlreadyExists(f"a credential {credential_id!r} already exists")
    txn.execute(
        "INSERT INTO credentials (id, role, secret_hash, created, revoked, note) VALUES (?, ?, ?, ?, NULL, ?)",
        (credential_id, role, secret_hash, now, note),
    )


def thd_revoke_credential(txn, credential_id, now) -> None:
    txn.execute("UPDATE credentials SET revoked = ? WHERE id = ? AND revoked IS NULL", (now, credential_id))
    if txn.rowcount == 0:
        txn.execute("SELECT 1 FROM credentials WHERE id = ?", (credential_id,))
        if txn.fetchone() is None:
            raise UnknownCredential(f"no credential {credential_id!r}")


def _thd_fence(txn, server, job_id, lease) -> tuple[int, int, int, str]:
    """Check that ``lease`` is the job's current lease and ``server`` its owner.

    Return the job's total, accepted, attempts, worker. The check is an
    UPDATE (that changes nothing), which also locks the job's row where the
    database has row locks, so that no other writer (another server taking
    the lease over, say) can end or move the lease before this write
    commits. The write that follows sets ``updated`` if it changes the job.
    """
    txn.execute("UPDATE jobs SET updated = updated WHERE id = ? AND lease = ? AND server = ?", (job_id, lease, server))
    if txn.rowcount == 0:
        _thd_state(txn, job_id)  # UnknownJob if there is no such job
        raise StaleLease(f"lease {lease!r} is not the current lease of job {job_id}")
    txn.execute("SELECT total, accepted, attempts, worker FROM jobs WHERE id = ?", (job_id,))
    return txn.fetchone()


def _thd_accept(txn, server, job_id, lease, results, now) -> tuple[int, int, int, str]:
    """Accept ``results`` under ``lease``, all or none; return the job's total, accepted, attempts, worker.

    A result the record already has from this lease, unchanged, is a repeat:
    left out, and not an error.
    """
    total, accepted, attempt, worker = _thd_fence(txn, server, job_id, lease)
    unknown = sorted({index for index, _, _ in results if not 0 <= index < total})
    if unknown:
        raise UnknownRecord(f"job {job_id} has no records {unknown}", records=unknown)
    seen, duplicates = set(), set()
    for index, _, _ in results:
        (duplicates if index in seen else seen).add(index)  # named twice in the call
    taken = {}  # index -> (output, error) given for a record that was accepted already
    for index, output, error in results:
        if index in duplicates:
            continue
        txn.execute(
            "UPDATE records SET output = ?, error = ?, accepted_at = ?, lease = ?, worker = ?"
            " WHERE job_id = ? AND idx = ? AND accepted_at IS NULL",
            (output, error, now, lease, worker, job_id, index),
        )
        if txn.rowcount == 0:
            taken[index] = (output, error)
    if taken:
        found = _thd_accepted(txn, job_id, sorted(taken))
        duplicates.update(index for index, value in taken.items() if found.get(index) != (lease, *value))
    if duplicates:
        # The savepoint is rolled back: none of the call is accepted.
        raise DuplicateResult(f"job {job_id} already has results {sorted(duplicates)}", records=sorted(duplicates))
    fresh = len(results) - len(taken)
    if fresh:
        txn.execute("UPDATE jobs SET accepted = accepted + ?, updated = ? WHERE id = ?", (fresh, now, job_id))
    return total, accepted + fresh, attempt, worker


def _thd_accepted(txn, job_id, indices) -> dict[int, tuple[str, str | None, str | None]]:
    """The accepted results among the job's records ``indices``: index -> (lease, output, error)."""
    found = {}
    for start in range(0, len(indices), _IN_CHUNK):
        chunk = indices[start : start + _IN_CHUNK]
        txn.execute(
            f"SELECT idx, lease, output, error FROM records WHERE job_id = ? AND idx IN ({', '.join('?' * len(chunk))})"
            " AND accepted_at IS NOT NULL",
            (job_id, *chunk),
        )
        found.update((index, (lease, output, error)) for index, lease, output, error in txn.fetchall())
    return found


def _thd_all_repeats(txn, job_id, lease, results) -> bool:
    """Is every one of ``results`` (distinct indices) accepted already under ``lease``, unchanged?"""
    indices = [index for index, _, _ in results]
    if len(set(indices)) != len(indices):
        return False
    found = _thd_accepted(txn, job_id, sorted(indices))
    return all(found.get(index) == (lease, output, error) for index, output, error in results)


def _thd_has_event(txn, job_id, event, lease) -> bool:
    """Does an ``event`` of the job name ``lease``? One look-up on the index (job_id, id)."""
    if lease is None:
        return False
    txn.execute("SELECT 1 FROM job_events WHERE job_id = ? AND event = ? AND lease = ? LIMIT 1", (job_id, event, lease))
    return txn.fetchone() is not None


def _thd_ended_by(txn, job_id, lease, detail) -> bool:
    """Did a ``released`` event with exactly ``detail`` end ``lease``: is this write a repeat?"""
    if lease is None:
        return False
    txn.execute("SELECT detail FROM job_events WHERE job_id = ? AND event = 'released' AND lease = ?", (job_id, lease))
    return any(text is not None and json.loads(text) == detail for (text,) in txn.fetchall())


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
        (job_id, now, event, attempt, lease, worker, None if detail is None else dump_json(detail)),
    )


# -- reads, in the pool's thread ------------------------------------------

#: ACTIVE_STATES as an SQL list, for ``state IN ...``.
_ACTIVE = "(" + ", ".join(f"'{state}'" for state in ACTIVE_STATES) + ")"


#: The columns of ``jobs`` an ``ActiveJob`` is made of (``_active_job``).
_ACTIVE_COLUMNS = (
    "id, type, priority, requires, params, total, state, attempts, retries, timeout, lease, worker,"
    " not_before, name, submitter, created"
)


def _active_job(row: dict, **more) -> ActiveJob:
    """An ``ActiveJob`` from a row of ``_ACTIVE_COLUMNS`` (its JSON columns decoded) and ``more``."""
    return ActiveJob(**row | {"requires": json.loads(row["requires"]), "params": json.loads(row["params"])}, **more)


def thd_load_active(txn, job_ids) -> list[ActiveJob]:
    where, args = f"jobs.state IN {_ACTIVE}", ()
    if job_ids is not None:
        if not job_ids:
            return []  # MySQL has no empty "IN ()"
        where += f" AND jobs.id IN ({', '.join('?' * len(job_ids))})"
        args = tuple(job_ids)
    txn.execute(
        f"SELECT {_ACTIVE_COLUMNS} FROM jobs WHERE {where} ORDER BY id",
        args,
    )
    jobs = {}
    for row in _thd_dicts(txn):
        jobs[row["id"]] = _active_job(row, pending={})
    txn.execute(
        "SELECT records.job_id, records.idx, records.data FROM records JOIN jobs ON jobs.id = records.job_id"
        f" WHERE {where} AND records.accepted_at IS NULL ORDER BY records.job_id, records.idx",
        args,
    )
    for job_id, index, data in txn.fetchall():
        jobs[job_id].pending[index] = json.loads(data)
    if any(job.state == "running" for job in jobs.values()):
        txn.execute(
            "SELECT job_events.job_id, MAX(job_events.at) FROM job_events JOIN jobs ON jobs.id = job_events.job_id"
            f" WHERE {where} AND jobs.state = 'running' AND job_events.event = 'leased'"
            " AND job_events.lease = jobs.lease GROUP BY job_events.job_id",
            args,
        )
        for job_id, at in txn.fetchall():
            jobs[job_id].leased_at = at
    for job_id, failures in _thd_failures(txn, where, args).items():
        jobs[job_id].failures = failures
    return list(jobs.values())


#: The events ``failures_since_reset`` looks at: the compact JSON of their
#: details (``dump_json``) names one of these reasons. A pre-filter only; the
#: function decides.
_FAILURE_EVENTS = (
    '(job_events.detail LIKE \'%"reason":"failed"%\' OR job_events.detail LIKE \'%"reason":"timeout"%\''
    ' OR job_events.detail LIKE \'%"reason":"requeued"%\')'
)


def _thd_failures(txn, where, args) -> dict[int, list[tuple[str | None, str | None]]]:
    """``failures_since_reset`` of each job matching ``where`` (on ``jobs``) that has any: job id -> list."""
    txn.execute(
        "SELECT job_events.job_id, job_events.event, job_events.worker, job_events.detail FROM job_events"
        f" JOIN jobs ON jobs.id = job_events.job_id WHERE {where} AND {_FAILURE_EVENTS}"
        " ORDER BY job_events.job_id, job_events.id",
        args,
    )
    events: dict[int, list[dict]] = {}
    for job_id, event, worker, detail in txn.fetchall():
        events.setdefault(job_id, []).append({"event": event, "worker": worker, "detail": json.loads(detail)})
    found = {job_id: failures_since_reset(history) for job_id, history in events.items()}
    return {job_id: failures for job_id, failures in found.items() if failures}


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
    job["attempt_history"] = attempts_from_history(job["history"])
    job["error"] = job_error(job["state"], job["history"])
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


def thd_runnable(txn, now, limit) -> list[int]:
    # Served by the index jobs_runnable (state, priority DESC, id) in its own
    # order: see migrations/*/002_servers.sql.
    txn.execute(
        "SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= ?)"
        " ORDER BY priority DESC, id LIMIT ?",
        (now, limit),
    )
    return [job_id for (job_id,) in txn.fetchall()]


def thd_own_leases(txn, server) -> dict[int, str]:
    txn.execute("SELECT id, lease FROM jobs WHERE server = ? AND state = 'running' ORDER BY id", (server,))
    return dict(txn.fetchall())


#: Ids per ``IN (...)``: SQLite builds before 3.32 allow 999 parameters.
_IN_CHUNK = 500


def thd_job_states(txn, job_ids) -> list[dict]:
    ids = sorted(set(job_ids))
    found = []
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start : start + _IN_CHUNK]
        txn.execute(
            f"SELECT id, state, accepted, total FROM jobs WHERE id IN ({', '.join('?' * len(chunk))}) ORDER BY id",
            tuple(chunk),
        )
        found.extend(
            {"job": job_id, "state": state, "accepted": accepted, "total": total}
            for job_id, state, accepted, total in txn.fetchall()
        )
    return found


_CREDENTIAL_COLUMNS = "id, role, created, revoked, note"


def thd_get_credential(txn, credential_id) -> dict | None:
    txn.execute(f"SELECT {_CREDENTIAL_COLUMNS}, secret_hash FROM credentials WHERE id = ?", (credential_id,))
    rows = _thd_dicts(txn)
    return rows[0] if rows else None


def thd_list_credentials(txn) -> list[dict]:
    txn.execute(f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials ORDER BY id")
    return _thd_dicts(txn)


def _thd_dicts(txn) -> list[dict]:
    """The rows of the last query as dicts keyed by column name."""
    names = [column[0] for column in txn.description]
    return [dict(zip(names, row, strict=True)) for row in txn.fetchall()]
