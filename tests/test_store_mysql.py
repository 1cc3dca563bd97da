"""What only the MySQL store has: URIs and passwords, migrations, restarts, retries.

Every test that needs a server runs on the session's throwaway MariaDB
(``tests/mariadb.py``), on a database of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys

import pymysql
import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.logger import globalLogPublisher

from gridd.errors import CommitUnknown, Unavailable
from gridd.launch import ROOT
from gridd.store.base import JobSpec, RecordResult, SchemaTooNew, StoreUnavailable, open_store
from gridd.store.mysql import MySQLDialect, MySQLParams, MySQLStore, parse_mysql_uri
from gridd.store.sql import known_version, load_migrations

T0 = 1_000_000.0

pytestmark = pytest.mark.mysql


@pytest.fixture
def params(mariadb):
    """Connection parameters of a fresh, empty database, dropped after the test."""
    with mariadb.database() as params:
        yield params


@pytest_twisted.async_yield_fixture
async def store(params):
    """A started MySQL store on a fresh database, stopped after the test."""
    store = MySQLStore(params)
    await store.start()
    yield store
    await store.stop()


@pytest.fixture
def log_events():
    """Every log event emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def spec(records=2) -> JobSpec:
    return JobSpec(type="noop", records=[{"n": n} for n in range(records)])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- URIs and passwords -------------------------------------------------------


def test_parse_uri_tcp():
    """A TCP URI names user, host, port, database and an optional password file."""
    assert parse_mysql_uri("mysql://gridd@db.example:3307/grid?password_file=/etc/gridd/db") == MySQLParams(
        "gridd", "grid", host="db.example", port=3307, password_file="/etc/gridd/db"
    )
    assert parse_mysql_uri("mysql://gridd@10.0.0.5/grid") == MySQLParams("gridd", "grid", host="10.0.0.5", port=3306)


def test_parse_uri_unix_socket():
    """``unix:`` names a socket path; the database is its last path segment."""
    params = parse_mysql_uri("mysql://gridd@unix:/run/mysqld/mysqld.sock/grid")
    assert (params.unix_socket, params.database) == ("/run/mysqld/mysqld.sock", "grid")
    assert params.describe() == "mysql://gridd@unix:/run/mysqld/mysqld.sock/grid"


@pytest.mark.parametrize(
    "uri",
    [
        "mysql://gridd:secret@127.0.0.1:3306/grid",
        "mysql://gridd:@127.0.0.1/grid",
    ],
)
def test_parse_uri_password_refused(uri):
    """A password in the URI is refused, and the error says where to put it instead."""
    with pytest.raises(ValueError, match="password_file") as caught:
        open_store(uri)
    assert "secret" not in str(caught.value)


def test_tap_db_uri_with_password_usage_error():
    """twistd gridd --db with a password in the URI is a usage error before anything starts."""
    from twisted.python import usage

    from gridd.server.tap import Options

    with pytest.raises(usage.UsageError, match="password_file"):
        Options().parseOptions(["--db", "mysql://gridd:secret@127.0.0.1/grid"])
    assert Options().parseOptions(["--db", "mysql://gridd@127.0.0.1/grid"]) is None


@pytest.mark.parametrize(
    "uri",
    ["mysql://127.0.0.1/grid", "mysql://gridd@127.0.0.1/", "mysql://gridd@127.0.0.1/a/b", "mysql://u@h/db?ssl=1"],
)
def test_parse_uri_malformed_value_error(uri):
    """An URI without a user or a database, or with unknown options, is a ValueError."""
    with pytest.raises(ValueError):
        parse_mysql_uri(uri)


def test_migrations_same_versions_as_sqlite():
    """SQLite's and MySQL's migration folders hold the same version numbers."""
    versions = [version for version, _ in load_migrations("mysql")]
    assert versions == [version for version, _ in load_migrations("sqlite")]
    assert versions == list(range(1, len(versions) + 1))


@pytest_twisted.ensureDeferred
async def test_password_from_environment(mariadb, params, monkeypatch):
    """Without a password file the password comes from $GRIDD_DB_PASSWORD."""
    monkeypatch.setenv("GRIDD_DB_PASSWORD", mariadb.password)
    store = open_store(f"mysql://{params.user}@{params.host}:{params.port}/{params.database}")
    await store.start()
    try:
        assert len(await store.submit([spec()], T0)) == 1
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_unix_socket_store_works(mariadb, params):
    """A store reaches the server over its UNIX socket."""
    uri = f"mysql://{params.user}@unix:{mariadb.socket}/{params.database}?password_file={params.password_file}"
    store = open_store(uri)
    await store.start()
    try:
        [job_id] = await store.submit([spec()], T0)
        assert (await store.get_job(job_id))["state"] == "queued"
    finally:
        await store.stop()


# -- start-up errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("password", "(1045) Access denied"),
        ("port", "(2003) Can't connect"),
        ("database", "(1049) Unknown database"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_start_bad_database_store_unavailable(params, tmp_path, change, code):
    """A wrong password, port or database name fails check() and start() with one line naming store and cause."""
    if change == "password":
        (tmp_path / "wrong").write_text("not-the-password\n")
        params = dataclasses.replace(params, password_file=str(tmp_path / "wrong"))
    elif change == "port":
        params = dataclasses.replace(params, port=closed_port())
    else:
        params = dataclasses.replace(params, database="gridd_nosuchdb")
    store = MySQLStore(params)
    with pytest.raises(StoreUnavailable) as checked:
        store.check()
    with pytest.raises(StoreUnavailable) as started:
        await store.start()
    for caught in (checked, started):
        message = str(caught.value)
        assert message.startswith(f"cannot open the store {params.describe()}: {code}")
        assert "\n" not in message
    with pytest.raises(Unavailable):
        await store.counts()
    await store.stop()


def test_check_missing_password_file_store_unavailable(params, tmp_path):
    """A password file that cannot be read is a StoreUnavailable naming the file."""
    store = MySQLStore(dataclasses.replace(params, password_file=str(tmp_path / "missing")))
    with pytest.raises(StoreUnavailable, match="missing"):
        store.check()


@pytest_twisted.ensureDeferred
async def test_start_newer_schema_refuses(mariadb, params):
    """A database migrated past what the code knows refuses to start, and is left as it was."""
    first = MySQLStore(params)
    await first.start()
    await first.stop()
    known = known_version("mysql")
    mariadb.query(params.database, "INSERT INTO schema_version (version) VALUES (%s)", known + 1)

    newer = MySQLStore(params)
    with pytest.raises(SchemaTooNew):
        newer.check()
    with pytest.raises(SchemaTooNew) as caught:
        await newer.start()
    assert (caught.value.found, caught.value.known) == (known + 1, known)
    with pytest.raises(Unavailable):
        await newer.counts()
    await newer.stop()
    assert mariadb.query(params.database, "SELECT MAX(version) FROM schema_version") == [(known + 1,)]


@pytest_twisted.ensureDeferred
async def test_start_migrations_recorded_once(mariadb, params):
    """start() records each migration it applies, and a second start applies none."""
    versions = [(version,) for version, _ in load_migrations("mysql")]
    for _ in range(2):
        store = MySQLStore(params)
        store.check()
        await store.start()
        await store.stop()
        assert mariadb.query(params.database, "SELECT version FROM schema_version ORDER BY version") == versions
    [(charset,)] = mariadb.query(
        params.database,
        "SELECT table_collation FROM information_schema.tables WHERE table_schema = %s AND table_name = 'jobs'",
        params.database,
    )
    assert charset == "utf8mb4_bin"


@pytest.mark.parametrize("db", ["mysql", "sqlite"])
def test_twistd_bad_store_exits_nonzero(tmp_path, db):
    """twistd gridd with a store it cannot open exits non-zero with one line saying why, no traceback."""
    if db == "mysql":
        uri = f"mysql://u@127.0.0.1:{closed_port()}/gridd"
        expected = f"gridd: cannot open the store {uri}: (2003) Can't connect"
    else:
        (tmp_path / "file").write_text("")
        uri = f"sqlite:{tmp_path / 'file' / 'gridd.db'}"
        expected = f"gridd: cannot open the store {uri}: "
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "gridd"]
    argv += ["--data", str(tmp_path / "data"), "--db", uri, "--listen", "tcp:0:interface=127.0.0.1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "cannot open the store" in line]
    assert "#critical] " + expected in line


def test_twistd_newer_schema_exits_nonzero(mariadb, params, tmp_path):
    """twistd gridd on a database migrated past what the code knows exits non-zero with one line, no traceback."""
    known = known_version("mysql")
    mariadb.query(params.database, "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY)")
    mariadb.query(params.database, "INSERT INTO schema_version (version) VALUES (%s)", known + 1)
    uri = f"mysql://{params.user}@{params.host}:{params.port}/{params.database}?password_file={params.password_file}"
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "gridd"]
    argv += ["--data", str(tmp_path / "data"), "--db", uri, "--listen", "tcp:0:interface=127.0.0.1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "Traceback" not in output
    assert "listening" not in output
    [line] = [line for line in output.splitlines() if "schema version" in line]
    expected = f"gridd: database schema version {known + 1} is newer than this gridd knows ({known}); run a gridd"
    assert "#critical] " + expected in line
    # Refused before anything was changed: no table of gridd's was created.
    assert mariadb.query(params.database, "SHOW TABLES") == [("schema_version",)]
    assert mariadb.query(params.database, "SELECT version FROM schema_version") == [(known + 1,)]


# -- an outage ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_restart_mid_use_no_lost_or_duplicated_work(mariadb, params, store, log_events):
    """A server restart fails the writes during it as Unavailable; nothing acknowledged is lost or doubled.

    Writes after the restart succeed at once, without an error logged: each
    pooled connection is pinged, and replaced, before it is used.
    """
    acknowledged = set(await store.submit([spec(), spec()], T0))
    running = min(acknowledged)
    await store.grant(running, "L1", "w1", T0 + 1)
    assert await store.add_results(running, "L1", [RecordResult(0, "zero")], T0 + 2) == 1

    mariadb.stop()
    try:
        during = [
            store.submit([spec()], T0 + 3),
            store.add_results(running, "L1", [RecordResult(1, "one")], T0 + 3),
            store.counts(),
        ]
        for ok, failure in await DeferredList(during, consumeErrors=True):
            assert not ok and failure.check(Unavailable)
    finally:
        mariadb.start()

    # Several writes at once: each pooled connection meets the restart.
    results = await DeferredList([store.submit([spec()], T0 + 4) for _ in range(5)], fireOnOneErrback=True)
    acknowledged.update(job_id for _, [job_id] in results)
    assert await store.add_results(running, "L1", [RecordResult(1, "one")], T0 + 5) == 2
    assert (await store.counts())["queued"] == len(acknowledged) - 1

    assert mariadb.query(params.database, "SELECT id FROM jobs ORDER BY id") == [(i,) for i in sorted(acknowledged)]
    assert mariadb.query(
        params.database, "SELECT idx, output FROM records WHERE job_id = %s AND accepted_at IS NOT NULL", running
    ) == [(0, '"zero"'), (1, '"one"')]
    warnings = [e for e in log_events if "cannot serve" in e.get("log_format", "")]
    assert len(warnings) == 1  # one warning for the outage, saying why
    assert any("serves again" in e.get("log_format", "") for e in log_events)


# -- retries --------------------------------------------------------------------


def _thd_signal(txn, calls, failures, code):
    """Count a call; fail the first ``failures`` calls with MySQL error ``code``, as the server would."""
    calls.append(code)
    txn.execute("INSERT INTO job_events (job_id, at, event) SELECT MIN(id), 0, 'probe' FROM jobs")
    if len(calls) <= failures:
        txn.execute(f"SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = {code}, MESSAGE_TEXT = 'injected'")
    return len(calls)


@pytest.mark.parametrize("code", [1213, 1205, 2006, 2013])
@pytest_twisted.ensureDeferred
async def test_retry_transient_error_applies_once(mariadb, params, store, code):
    """A deadlock, lock wait timeout, gone server or lost connection reruns the whole batch, which applies once.

    The server reports each code here (SIGNAL), on a connection that stays
    up: this checks the decision by error code. 2006 and 2013 are client
    errors in real life; ``test_server_gone_mid_transaction_retried_once_applied``
    and ``test_lost_connection_mid_transaction_retried_once_applied`` make
    the driver raise them on a connection that really died.
    """
    [job_id] = await store.submit([spec()], T0)
    calls = []
    neighbour = store.submit([spec()], T0)  # starts a transaction; the next two share the one after
    probe = store._write(_thd_signal, calls, 1, code)
    other = store.add_results(job_id, "nope", [], T0)
    await neighbour
    assert await probe == 2
    with pytest.raises(Exception, match="lease"):
        await other
    assert calls == [code, code]
    assert mariadb.query(params.database, "SELECT COUNT(*) FROM job_events WHERE event = 'probe'") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_retry_bounded_then_unavailable(mariadb, params, store, monkeypatch):
    """A deadlock that keeps coming is retried a bounded number of times, then the writes fail as Unavailable."""
    monkeypatch.setattr(MySQLDialect, "retry_delays", (0.01, 0.01))
    await store.submit([spec()], T0)
    calls = []
    with pytest.raises(Unavailable, match="1213"):
        await store._write(_thd_signal, calls, 99, 1213)
    assert len(calls) == 3
    assert mariadb.query(params.database, "SELECT COUNT(*) FROM job_events WHERE event = 'probe'") == [(0,)]
    assert len(await store.submit([spec()], T0)) == 1


def _kill(root_socket: str, connection_id: int) -> None:
    """Have the server kill a client's connection, as a crash or a network cut would end it."""
    with contextlib.closing(pymysql.connect(unix_socket=root_socket, user="root", ssl_disabled=True)) as root:
        root.cursor().execute(f"KILL CONNECTION {int(connection_id)}")


def _thd_probe(txn, calls, root_socket=None):
    """Count a call and insert a probe event; on the first call, lose the connection halfway if asked."""
    calls.append(1)
    txn.execute("INSERT INTO job_events (job_id, at, event) SELECT MIN(id), 0, 'probe' FROM jobs")
    if root_socket is not None and len(calls) == 1:
        txn.execute("SELECT CONNECTION_ID()")
        [(connection_id,)] = txn.fetchall()
        _kill(root_socket, connection_id)
        txn.execute("SELECT 1")  # 2013: lost connection to MySQL server during query
    return len(calls)


@pytest_twisted.ensureDeferred
async def test_lost_connection_mid_transaction_retried_once_applied(mariadb, params, store):
    """A connection lost before COMMIT leaves nothing committed: the batch runs again and applies once."""
    await store.submit([spec()], T0)
    calls = []
    assert await store._write(_thd_probe, calls, mariadb.socket) == 2
    assert mariadb.query(params.database, "SELECT COUNT(*) FROM job_events WHERE event = 'probe'") == [(1,)]


def _thd_probe_cut(txn, calls):
    """Count a call and insert a probe event; on the first call, cut the socket before the next statement."""
    import socket

    calls.append(1)
    txn.execute("INSERT INTO job_events (job_id, at, event) SELECT MIN(id), 0, 'probe' FROM jobs")
    if len(calls) == 1:
        # What a dead network leaves: the next statement cannot be sent.
        txn._connection._connection._sock.shutdown(socket.SHUT_RDWR)
        txn.execute("SELECT 1")  # 2006: MySQL server has gone away (BrokenPipeError)
    return len(calls)


@pytest_twisted.ensureDeferred
async def test_server_gone_mid_transaction_retried_once_applied(mariadb, params, store, log_events):
    """A statement that cannot be sent (2006, server gone away) fails the batch, which runs again and applies once."""
    await store.submit([spec()], T0)
    calls = []
    assert await store._write(_thd_probe_cut, calls) == 2
    retries = [e for e in log_events if "running the transaction again" in e.get("log_format", "")]
    assert [e["error"].args[0] for e in retries] == [2006]
    assert mariadb.query(params.database, "SELECT COUNT(*) FROM job_events WHERE event = 'probe'") == [(1,)]
    assert len(await store.submit([spec()], T0)) == 1


@pytest_twisted.ensureDeferred
async def test_commit_lost_connection_commit_unknown_not_retried(mariadb, params, store, monkeypatch):
    """A COMMIT whose connection is lost fails as CommitUnknown (an Unavailable) and is not run again; the next write works."""
    from gridd.store import mysql

    armed = []
    commit = mysql._MySQLConnection.commit

    def commit_on_killed_connection(self):
        if armed:
            armed.clear()
            _kill(mariadb.socket, self._connection.thread_id())
        commit(self)

    def thd_arm(txn, calls):
        armed.append(True)
        return _thd_probe(txn, calls)

    monkeypatch.setattr(mysql._MySQLConnection, "commit", commit_on_killed_connection)
    await store.submit([spec()], T0)
    calls = []
    with pytest.raises(CommitUnknown, match="during COMMIT") as lost:
        await store._write(thd_arm, calls)
    assert lost.value.code == "commit_unknown" and isinstance(lost.value, Unavailable)
    assert calls == [1]
    # Here the server had not committed: nothing applied, nothing applied twice.
    assert mariadb.query(params.database, "SELECT COUNT(*) FROM job_events WHERE event = 'probe'") == [(0,)]
    assert len(await store.submit([spec()], T0)) == 1


@pytest.fixture
def lose_commit_reply(monkeypatch):
    """``lose()`` arms it: the next COMMIT is made on the server, and its reply never reaches the driver.

    The reply is taken off the socket once it has arrived (so the server has
    committed) and the socket is shut: the driver reads a closed connection
    (2013), as when MariaDB shuts down during a COMMIT it has made, and the
    store's own COMMIT handling answers ``CommitUnknown``.
    """
    import select
    import socket

    from gridd.store import mysql

    armed = []
    commit = mysql._MySQLConnection.commit

    def commit_and_lose_the_reply(self):
        if not armed:
            return commit(self)
        armed.clear()
        driver = self._connection
        read_ok = driver._read_ok_packet

        def lose_the_reply():
            sock = driver._sock
            assert select.select([sock], [], [], 10)[0], "no reply to COMMIT"
            sock.recv(65536)
            sock.shutdown(socket.SHUT_RDWR)
            return read_ok()

        driver._read_ok_packet = lose_the_reply
        try:
            return commit(self)
        finally:
            del driver._read_ok_packet

    monkeypatch.setattr(mysql._MySQLConnection, "commit", commit_and_lose_the_reply)
    return lambda: armed.append(True)


#: Per write: the call (store, job id), its answer, and the job's state once made.
LOST_COMMIT_WRITES = {
    "add_results": (
        lambda store, job_id: store.add_results(
            job_id, "L1", [RecordResult(0, {"z": "é"}), RecordResult(1, error="bad input")], T0 + 2
        ),
        2,
        "running",
    ),
    "complete": (
        lambda store, job_id: store.complete(job_id, "L1", [RecordResult(0, 0), RecordResult(1, 1)], T0 + 2),
        None,
        "done",
    ),
    "release": (
        lambda store, job_id: store.release(
            job_id, "L1", "queued", T0 + 2, reason="failed", error="boom", not_before=T0 + 9
        ),
        None,
        "queued",
    ),
}


@pytest.mark.parametrize("write", sorted(LOST_COMMIT_WRITES))
@pytest_twisted.ensureDeferred
async def test_commit_made_reply_lost_sent_again_first_answer(mariadb, params, store, lose_commit_reply, write):
    """A write made whose COMMIT reply was lost is CommitUnknown; sent again, it answers as made and changes nothing."""
    call, answer, state = LOST_COMMIT_WRITES[write]
    [job_id] = await store.submit([spec(records=2)], T0)
    await store.grant(job_id, "L1", "w1", T0 + 1)
    lose_commit_reply()
    with pytest.raises(CommitUnknown, match="during COMMIT"):
        await call(store, job_id)
    made = await store.get_job(job_id), await store.get_results(job_id)
    assert made[0]["state"] == state  # it was made
    assert await call(store, job_id) == answer
    assert (await store.get_job(job_id), await store.get_results(job_id)) == made
    events = mariadb.query(params.database, "SELECT event FROM job_events WHERE job_id = %s ORDER BY id", job_id)
    assert [e for (e,) in events][2:] == {"add_results": [], "complete": ["completed"], "release": ["released"]}[write]
    if write == "add_results":
        # The job then completes at its first attempt, each result accepted once.
        await store.complete(job_id, "L1", [], T0 + 3)
        job = await store.get_job(job_id)
        assert (job["state"], job["accepted"], job["attempts"]) == ("done", 2, 1)


@pytest_twisted.ensureDeferred
async def test_found_rows_same_value_update_not_stale(store):
    """An update that leaves a row as it was still counts as matched: same-time writes are not stale."""
    [job_id] = await store.submit([spec(3)], T0)
    await store.grant(job_id, "L1", "w1", T0)
    assert await store.add_results(job_id, "L1", [RecordResult(0, 0)], T0) == 1
    assert await store.add_results(job_id, "L1", [RecordResult(1, 1)], T0) == 2


@pytest_twisted.ensureDeferred
async def test_lease_compare_exact(store):
    """Leases compare byte for byte (binary collation), as in SQLite: another case is another lease."""
    [job_id] = await store.submit([spec()], T0)
    await store.grant(job_id, "Lease-a", "w1", T0)
    with pytest.raises(Exception, match="not the current lease"):
        await store.add_results(job_id, "LEASE-A", [RecordResult(0, 0)], T0)


@pytest_twisted.ensureDeferred
async def test_read_consistent_during_concurrent_writes(store):
    """load_active sees jobs and their records from one moment while submits commit around it."""
    await store.submit([spec(50)], T0)
    writes = [store.submit([spec(50)], T0) for _ in range(20)]
    reads = [store.load_active() for _ in range(20)]
    for active in await DeferredList(reads, fireOnOneErrback=True):
        for job in active[1]:
            assert len(job.pending) == 50
    await DeferredList(writes, fireOnOneErrback=True)


# -- several servers on one database ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_migrate_2_after_interrupted_ddl(mariadb, params, monkeypatch, log_events):
    """Migration 2 interrupted after some of its DDL runs again from its top and ends as a fresh database."""
    from gridd.store import sql

    load = sql.load_migrations
    monkeypatch.setattr(sql, "load_migrations", lambda dialect: load(dialect)[:1])
    old = MySQLStore(params)
    await old.start()
    await old.stop()
    monkeypatch.setattr(sql, "load_migrations", load)
    # What a start killed after the file's DDL statements, before its data moves, leaves behind.
    from gridd.store.sql import _statements

    script = dict(load_migrations("mysql"))[2]
    ddl = [statement for statement in _statements(script) if statement.startswith(("CREATE", "ALTER"))]
    assert len(ddl) == 2
    for statement in ddl:
        mariadb.query(params.database, statement)
    store = MySQLStore(params)
    await store.start()
    await store.stop()
    assert mariadb.query(params.database, "SELECT MAX(version) FROM schema_version") == [(known_version("mysql"),)]
    assert [e["version"] for e in log_events if "already applied" in e.get("log_format", "")] == [2]
    with mariadb.database() as fresh:
        store = MySQLStore(fresh)
        await store.start()
        await store.stop()
        for table in ("jobs", "servers"):
            [(_, want)] = mariadb.query(fresh.database, f"SHOW CREATE TABLE {table}")
            [(_, got)] = mariadb.query(params.database, f"SHOW CREATE TABLE {table}")
            assert got.replace(params.database, "DB") == want.replace(fresh.database, "DB")


@pytest_twisted.ensureDeferred
async def test_runnable_query_uses_descending_index(mariadb, params):
    """runnable reads the queue through jobs_runnable in its own order, without a sort."""
    store = MySQLStore(params)
    await store.start()
    await store.submit([JobSpec(type="noop", records=[], priority=n % 3) for n in range(50)], T0)
    await store.stop()
    [row] = mariadb.query(
        params.database,
        "EXPLAIN SELECT id FROM jobs WHERE state = 'queued' AND (not_before IS NULL OR not_before <= 5)"
        " ORDER BY priority DESC, id LIMIT 10",
    )
    key, extra = row[5], row[9] or ""
    assert key == "jobs_runnable" and "filesort" not in extra


async def _gone_and_orphaned(params, jobs):
    """Jobs leased by "G", a server that beat once, and by "H", which never beat; return the ids of each."""
    owned = {}
    for server_id in ("G", "H"):
        store = MySQLStore(params, server_id=server_id)
        await store.start()
        try:
            if server_id == "G":
                await store.beat(T0, 10)
            ids = await store.submit([spec(1) for _ in range(jobs)], T0)
            await DeferredList([store.grant(i, f"L{i}", "w", T0 + 1) for i in ids], fireOnOneErrback=True)
            owned[server_id] = ids
        finally:
            await store.stop()
    return owned["G"], owned["H"]


def _released_once(mariadb, params, ids):
    rows = mariadb.query(
        params.database,
        "SELECT job_id, COUNT(*) FROM job_events WHERE event = 'released' GROUP BY job_id ORDER BY job_id",
    )
    assert rows == [(i, 1) for i in sorted(ids)]
    assert mariadb.query(params.database, "SELECT state, COUNT(*) FROM jobs GROUP BY state") == [("queued", len(ids))]


@pytest.fixture
def a_and_b(params):
    """Two MySQL stores on one database, servers "A" and "B" (not started)."""
    return MySQLStore(params, server_id="A"), MySQLStore(params, server_id="B")


@pytest.mark.parametrize("skip_locked", [MySQLDialect.skip_locked, " FOR UPDATE", ""])
@pytest_twisted.ensureDeferred
async def test_expire_servers_concurrent_stores_end_each_job_once(mariadb, params, a_and_b, monkeypatch, skip_locked):
    """Two servers expiring at once, again and again, end each job of a gone server and of a rowless owner once.

    With the shipped ``FOR UPDATE SKIP LOCKED``, and also with a claim that
    waits or one that locks nothing: the DELETE of the server's row and the
    per-row UPDATE conditions alone keep it to once.
    """
    monkeypatch.setattr(MySQLDialect, "skip_locked", skip_locked)
    gone, orphaned = await _gone_and_orphaned(params, 60)
    a, b = a_and_b
    await a.start()
    await b.start()
    try:
        calls = [store.expire_servers(T0 + 100, 5) for _ in range(3) for store in (a, b)]
        ended = [ids for _, ids in await DeferredList(calls, fireOnOneErrback=True)]
    finally:
        await a.stop()
        await b.stop()
    everything = [job_id for ids in ended for job_id in ids]
    assert sorted(everything) == sorted(gone + orphaned)
    _released_once(mariadb, params, gone + orphaned)
    assert mariadb.query(params.database, "SELECT id FROM servers") == []


@pytest_twisted.ensureDeferred
async def test_grant_concurrent_stores_each_job_granted_once(mariadb, params, a_and_b):
    """Two servers' stores granting the same queued jobs at once, round after round, grant each job exactly once.

    Each store has its own pool, as two servers do; A asks for the round's
    jobs in id order and B in the opposite order, so their transactions meet
    on the same rows. The loser of each job gets ``InvalidState`` (the row
    was locked by the other's claim, or already running).
    """
    from gridd.errors import InvalidState

    a, b = a_and_b
    await a.start()
    await b.start()
    rounds, per_round = 20, 25
    try:
        ids = await a.submit([spec(1) for _ in range(rounds * per_round)], T0)
        granted = {}
        refused = 0
        for start in range(0, len(ids), per_round):
            batch = ids[start : start + per_round]
            calls = []
            for store, order in ((a, batch), (b, batch[::-1])):
                for job_id in order:
                    lease = f"{store.server_id}-{job_id}"
                    calls.append((job_id, lease, store.grant(job_id, lease, f"w{store.server_id}", T0 + 1)))
            outcomes = await DeferredList([d for _, _, d in calls], consumeErrors=True)
            for (job_id, lease, _), (ok, value) in zip(calls, outcomes, strict=True):
                if ok:
                    assert job_id not in granted, f"job {job_id} granted twice"
                    granted[job_id] = lease
                else:
                    value.trap(InvalidState)
                    refused += 1
    finally:
        await a.stop()
        await b.stop()
    assert sorted(granted) == sorted(ids)
    assert refused == len(ids)
    rows = mariadb.query(params.database, "SELECT id, state, lease, server FROM jobs ORDER BY id")
    assert rows == [(job_id, "running", granted[job_id], granted[job_id].split("-")[0]) for job_id in sorted(ids)]
    leased = mariadb.query(
        params.database, "SELECT job_id, lease FROM job_events WHERE event = 'leased' ORDER BY job_id"
    )
    assert leased == [(job_id, granted[job_id]) for job_id in sorted(ids)]
    # Both servers won some: the two really raced, not one after the other.
    assert {lease.split("-")[0] for lease in granted.values()} == {"A", "B"}


class _PausingTransaction:
    """A transaction that stops after the statement containing ``marker`` until ``resume`` is set."""

    def __init__(self, txn, marker, paused, resume):
        self._txn, self._marker, self._paused, self._resume = txn, marker, paused, resume

    def execute(self, sql, args=None):
        result = self._txn.execute(sql, args)
        if self._marker in sql:
            self._paused.set()
            assert self._resume.wait(10), "never resumed"
        return result

    def __getattr__(self, name):
        return getattr(self._txn, name)


@pytest_twisted.ensureDeferred
async def test_expire_servers_interleaved_each_job_once(mariadb, params, a_and_b, monkeypatch):
    """B reads what to end, A ends the orphans and commits, then B goes on: B ends only what A could not claim.

    B has claimed the gone server's row (locked, skipped by A); the orphans
    it read are A's by the time it updates them, and its UPDATEs match
    nothing.
    """
    import threading

    from twisted.internet import threads

    from gridd.store import sql

    gone, orphaned = await _gone_and_orphaned(params, 10)
    paused, resume = threading.Event(), threading.Event()
    real = sql.thd_expire_servers

    def thd_expire_pausing_b(txn, server, *args):
        if server == "B":
            txn = _PausingTransaction(txn, "NOT EXISTS", paused, resume)
        return real(txn, server, *args)

    monkeypatch.setattr(sql, "thd_expire_servers", thd_expire_pausing_b)
    a, b = a_and_b
    await a.start()
    await b.start()
    try:
        by_b = b.expire_servers(T0 + 100, 5)
        assert await threads.deferToThread(paused.wait, 10)
        assert await a.expire_servers(T0 + 100, 5) == orphaned
        resume.set()
        assert await by_b == gone
    finally:
        resume.set()
        await a.stop()
        await b.stop()
    _released_once(mariadb, params, gone + orphaned)


# -- the whole server on MariaDB -----------------------------------------------


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_e2e_grid_on_mariadb_database_restart_loses_nothing(mariadb, params, tmp_path):
    """twistd gridd on MariaDB runs a batch through a database restart: every record's result once."""
    from twisted.internet import reactor, threads

    from gridd.client import connect
    from gridd.launch import WAIT, LocalGrid

    grid = LocalGrid(reactor, tmp_path)
    uri = f"mysql://{params.user}@{params.host}:{params.port}/{params.database}?password_file={params.password_file}"
    try:
        await grid.start_server("--db", uri)
        await grid.start_worker("w1", 4)
        client = await connect(reactor, grid.endpoint, grid.secret, name="e2e")
        specs = [
            {"type": "sleep", "records": [f"{j}-{r}" for r in range(5)], "params": {"seconds": 0.02}} for j in range(40)
        ]
        ids = await client.submit(specs)
        done = client.wait(ids)
        await threads.deferToThread(mariadb.stop)
        await threads.deferToThread(mariadb.start)
        await done.addTimeout(WAIT, reactor)
        await client.close()
    finally:
        await grid.stop_all()
    rows = mariadb.query(params.database, "SELECT state, COUNT(*) FROM jobs GROUP BY state")
    assert rows == [("done", 40)]
    assert mariadb.query(
        params.database, "SELECT COUNT(*), COUNT(DISTINCT job_id, idx) FROM records WHERE accepted_at IS NOT NULL"
    ) == [(200, 200)]


@pytest_twisted.ensureDeferred
async def test_e2e_database_restarted_again_and_again_under_load_costs_no_attempt(mariadb, params, tmp_path):
    """MariaDB restarted 5 times while results stream in: every job done at its first attempt, every result once.

    A restart can end a COMMIT after InnoDB made it and before its reply
    left (error 2013): the writes are answered ``commit_unknown``. Results
    sent again then come back as duplicates and count as accepted; a lease
    whose grant was lost that way is re-queued without using an attempt.
    Restarts are paced by finished jobs, not by time. Whether a restart
    lands inside a COMMIT is chance (about one run in three with two
    servers and eight restarts); every run checks that the outages cost no
    attempt, and the unit and store tests make the lost COMMIT on cue.
    """
    from twisted.internet import defer, reactor, threads

    from gridd.client import connect
    from gridd.launch import WAIT, LocalGrid

    jobs, restarts = 300, 5
    grid = LocalGrid(reactor, tmp_path)
    uri = f"mysql://{params.user}@{params.host}:{params.port}/{params.database}?password_file={params.password_file}"
    done: set[int] = set()
    gates: list[tuple[int, defer.Deferred]] = []

    def seen(status):
        if status["state"] == "done":
            done.add(status["job"])
        for gate in [g for g in gates if len(done) >= g[0]]:
            gates.remove(gate)
            gate[1].callback(None)

    def when_done(count):
        d = defer.Deferred()
        gates.append((count, d))
        seen({"job": None, "state": None})
        return d.addTimeout(WAIT, reactor)

    try:
        await grid.start_server("--db", uri)
        for name in ("w1", "w2"):
            await grid.start_worker(name, 4)
        client = await connect(reactor, grid.endpoint, grid.secret, name="e2e")
        specs = [
            {"type": "sleep", "records": [f"{j}-{r}" for r in range(10)], "params": {"seconds": 0.01}}
            for j in range(jobs)
        ]
        ids = await client.submit(specs)
        finished = client.wait(ids, seen)
        for n in range(1, restarts + 1):
            await when_done(n * jobs // (restarts + 2))
            await threads.deferToThread(mariadb.stop)
            await threads.deferToThread(mariadb.start)
        final = await finished.addTimeout(4 * WAIT, reactor)
        assert {s["state"] for s in final.values()} == {"done"}
        await client.close()
    finally:
        await grid.stop_all()
    assert mariadb.query(params.database, "SELECT state, attempts, COUNT(*) FROM jobs GROUP BY state, attempts") == [
        ("done", 1, jobs)
    ]
    assert mariadb.query(
        params.database, "SELECT COUNT(*), COUNT(DISTINCT job_id, idx) FROM records WHERE accepted_at IS NOT NULL"
    ) == [(jobs * 10, jobs * 10)]


@pytest_twisted.ensureDeferred
async def test_grant_passes_over_a_job_another_server_is_claiming(mariadb, params, store):
    """A job whose row another transaction holds is refused at once (SKIP LOCKED), not waited for."""
    import contextlib

    import pymysql

    from gridd import errors
    from gridd.store.base import JobSpec

    [job_id] = await store.submit([JobSpec(type="noop", records=[1])], 1.0)
    other = pymysql.connect(
        host=params.host,
        port=params.port,
        user=params.user,
        database=params.database,
        password=open(params.password_file).read().strip(),
        autocommit=False,
    )
    with contextlib.closing(other), other.cursor() as cursor:
        cursor.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))  # another server mid-claim
        with pytest.raises(errors.InvalidState, match="being claimed by another server"):
            await store.grant(job_id, "L1", "w1", 2.0)
        other.rollback()
    await store.grant(job_id, "L1", "w1", 3.0)
    assert (await store.get_job(job_id))["lease"] == "L1"


@pytest_twisted.ensureDeferred
async def test_migration_4_upgrade_allows_poison(mariadb, params):
    """A database of schema 3 with jobs keeps them on upgrade, then takes the state poison and no unknown one."""
    from gridd.store.sql import _statements

    for version, script in load_migrations("mysql"):
        if version <= 3:
            for statement in _statements(script):
                mariadb.query(params.database, statement)
    mariadb.query(params.database, "CREATE TABLE schema_version (version INTEGER NOT NULL PRIMARY KEY)")
    mariadb.query(params.database, "INSERT INTO schema_version VALUES (1), (2), (3)")
    mariadb.query(
        params.database,
        "INSERT INTO jobs (type, priority, requires, params, total, retries, state, created, updated)"
        " VALUES ('noop', 0, '{}', '{}', 1, 3, 'failed', 1, 1)",
    )
    store = MySQLStore(params)
    await store.start()
    try:
        assert (await store.get_job(1))["state"] == "failed"
        [new] = await store.submit([spec(1)], 1000.0)
        await store.grant(new, "L1", "w1", 1001.0)
        await store.release(new, "L1", "poison", 1002.0, reason="failed", error="e")
        assert (await store.counts())["poison"] == 1
        with pytest.raises(Exception, match="4025|CONSTRAINT"):
            mariadb.query(params.database, "UPDATE jobs SET state = 'lost' WHERE id = 1")
    finally:
        await store.stop()
