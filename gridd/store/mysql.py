"""The MariaDB/MySQL store: the shared SQL of ``gridd.store.sql`` over pymysql.

For an office that wants a real database server: the data lives in one
database on a MariaDB or MySQL server, backed up and looked after like the
office's other databases (see docs/mariadb.md). ``MySQLStore`` is the shared
``SQLStore`` with the connection details of ``--db mysql://USER@HOST:PORT/DB``;
everything that only MySQL needs is in ``MySQLDialect`` and the two adbapi
classes it plugs into the pool, ``_MySQLConnection`` and ``_MySQLTransaction``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.enterprise.adbapi import Connection, ConnectionPool, Transaction
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gridd.errors import Unavailable
from gridd.store.base import CommitOutcomeUnknown, StoreUnavailable
from gridd.store.sql import SQLStore

__all__ = ["MySQLDialect", "MySQLParams", "MySQLStore", "CommitOutcomeUnknown", "parse_mysql_uri"]

log = Logger()

#: Where the password comes from when the URI names no password file.
PASSWORD_ENV = "GRIDD_DB_PASSWORD"

# MySQL error numbers (pymysql.constants.ER and CR), named here so that
# importing this module does not need pymysql.
ER_LOCK_WAIT_TIMEOUT = 1205
ER_LOCK_DEADLOCK = 1213
CR_CONN_HOST_ERROR = 2003
CR_SERVER_GONE_ERROR = 2006
CR_SERVER_LOST = 2013
ER_TABLE_EXISTS_ERROR = 1050
ER_DUP_FIELDNAME = 1060
ER_DUP_KEYNAME = 1061
ER_CANT_DROP_FIELD_OR_KEY = 1091


@dataclass(frozen=True)
class MySQLParams:
    """Where the database is and who we are there; the password is read when connecting."""

    user: str
    database: str
    host: str = "127.0.0.1"
    port: int = 3306
    #: A UNIX socket path instead of host and port.
    unix_socket: str | None = None
    #: A file whose first line is the password; else ``$GRIDD_DB_PASSWORD``.
    password_file: str | None = None

    def describe(self) -> str:
        where = f"unix:{self.unix_socket}" if self.unix_socket else f"{self.host}:{self.port}"
        return f"mysql://{self.user}@{where}/{self.database}"

    def password(self) -> str:
        if self.password_file is not None:
            with open(self.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        return os.environ.get(PASSWORD_ENV, "")


def parse_mysql_uri(uri: str) -> MySQLParams:
    """Read ``mysql://USER@HOST[:PORT]/DB`` or ``mysql://USER@unix:/SOCKET/PATH/DB``.

    ``?password_file=PATH`` may follow. Raises ``ValueError`` for anything
    else, and for an URI that holds a password.
    """
    parts = urlsplit(uri)
    if parts.scheme != "mysql" or not parts.netloc:
        raise ValueError(f"not a MySQL URI: {uri!r}; expected mysql://USER@HOST:PORT/DB")
    if parts.password is not None:
        raise ValueError(
            "a password in the --db URI would be visible to every user of this host (ps) and in logs: "
            f"put it in a file named by ?password_file=PATH, or in ${PASSWORD_ENV}"
        )
    if not parts.username:
        raise ValueError(f"the MySQL URI names no user: expected mysql://USER@HOST:PORT/DB, got {uri!r}")
    query = parse_qs(parts.query)
    unknown = set(query) - {"password_file"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} in the MySQL URI; only password_file is known")
    password_file = query["password_file"][-1] if "password_file" in query else None
    user = unquote(parts.username)
    if parts.hostname == "unix":
        socket, _, database = parts.path.rpartition("/")
        if not socket or not database:
            raise ValueError(f"expected mysql://USER@unix:/SOCKET/PATH/DB, got {uri!r}")
        return MySQLParams(user, database, unix_socket=socket, password_file=password_file)
    database = parts.path.lstrip("/")
    if not parts.hostname or not database or "/" in database:
        raise ValueError(f"expected mysql://USER@HOST:PORT/DB, got {uri!r}")
    return MySQLParams(user, database, host=parts.hostname, port=parts.port or 3306, password_file=password_file)


class MySQLDialect:
    """Everything particular to MariaDB/MySQL, in one place.

    - Parameters: pymysql uses ``%s`` (format style); the shared SQL uses
      ``?``. ``_MySQLTransaction.execute`` converts every statement, in this
      one place (``_to_format``).
    - Connections: utf8mb4 (every Unicode character, not MySQL's 3-byte
      "utf8"), autocommit off, strict SQL mode (a value that does not fit
      is an error, not silently cut), and the ``FOUND_ROWS`` client flag:
      without it ``rowcount`` is the number of rows *changed*, and an
      ``UPDATE ... WHERE lease = ?`` that sets ``updated`` to the value it
      already has would look like a stale lease.
    - Isolation: writes run at READ COMMITTED. Every check a write makes is
      a locking ``UPDATE ... WHERE`` that reads the newest committed row in
      any isolation level, so REPEATABLE READ's snapshot adds nothing to
      writes, while its gap and next-key locks make concurrent inserts and
      claims (several servers, later) deadlock far more often. A read needs
      the opposite: the jobs and records it reads in several statements must
      come from one moment, so each read runs in its own REPEATABLE READ,
      READ ONLY transaction (a consistent snapshot, no locks taken).
    - Transactions: ``START TRANSACTION`` opens each write batch; savepoints
      work in InnoDB, so one write's failure is rolled back alone, as on
      SQLite.
    - Reconnects: adbapi runs with ``cp_reconnect=True``, and each
      interaction first pings its connection and replaces it if the ping
      fails (``_MySQLConnection``): after a server restart the first query on
      each pooled connection would otherwise fail with error 2013 (lost
      connection), and adbapi would log two errors for it.
    - Bounded retry: a whole transaction is run again, at most
      ``len(retry_delays)`` more times, after a deadlock (1213), a lock wait
      timeout (1205) or a lost connection (2003, 2006, 2013), all of which
      leave it rolled back. After an error that dooms the transaction no
      further statement runs on it (``_MySQLTransaction``). A COMMIT that
      loses its connection is never retried: ``CommitOutcomeUnknown``.
    - DDL commits implicitly: migrations run one file at a time under a
      named lock (``GET_LOCK``), each file's ``schema_version`` row committed
      after it (see ``gridd.store.sql.thd_migrate``). A file interrupted
      halfway runs again from its top; MySQL 8 has no ``ADD COLUMN IF NOT
      EXISTS``, so a DDL statement failing because its change is already
      there (duplicate column, index or table; nothing left to drop) is
      skipped: ``is_ddl_done``.
    - Claiming rows: ``SELECT ... FOR UPDATE SKIP LOCKED`` (MariaDB 10.6+,
      MySQL 8) hands each row to one of several servers claiming at once,
      without making the others wait (``skip_locked``).
    - Errors of the server or the connection (pymysql's ``OperationalError``
      and ``InterfaceError``) mean the database cannot serve:
      ``Unavailable``. Others (``ProgrammingError``, ``IntegrityError``) are
      bugs and pass through.
    """

    name = "mysql"
    begin = "START TRANSACTION"
    read_begin = ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", "START TRANSACTION READ ONLY")
    skip_locked = " FOR UPDATE SKIP LOCKED"
    transactional_ddl = False
    #: Errors of a DDL statement whose change is already in the database.
    ddl_done_codes = frozenset({ER_TABLE_EXISTS_ERROR, ER_DUP_FIELDNAME, ER_DUP_KEYNAME, ER_CANT_DROP_FIELD_OR_KEY})
    migration_lock = "SELECT GET_LOCK(CONCAT('gridd_migrate.', DATABASE()), 30)"
    migration_unlock = "SELECT RELEASE_LOCK(CONCAT('gridd_migrate.', DATABASE()))"
    #: Statements run on each new connection.
    session_setup = (
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
        # A row lock held longer than this by another client fails the
        # transaction (and it is retried) instead of blocking for InnoDB's
        # default 50 s.
        "SET SESSION innodb_lock_wait_timeout = 10",
    )
    connect_timeout = 5
    pool_size = 4
    #: Seconds to wait before each retry; three attempts in all.
    retry_delays = (0.1, 0.4)
    #: Errors after which the server has rolled the transaction back, or
    #: will (a lost session), so running it again applies it once.
    retry_codes = frozenset(
        {ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT, CR_CONN_HOST_ERROR, CR_SERVER_GONE_ERROR, CR_SERVER_LOST}
    )
    lost_connection_codes = frozenset({CR_SERVER_GONE_ERROR, CR_SERVER_LOST})

    @classmethod
    def connect_kwargs(cls, params: MySQLParams) -> dict:
        """pymysql.connect's arguments; reads the password."""
        from pymysql.constants import CLIENT

        kwargs = {
            "user": params.user,
            "password": params.password(),
            "database": params.database,
            "charset": "utf8mb4",
            "autocommit": False,
            "client_flag": CLIENT.FOUND_ROWS,
            "connect_timeout": cls.connect_timeout,
        }
        if params.unix_socket:
            # A local socket needs no TLS. Over TCP pymysql uses TLS when the
            # server offers it (without verifying its certificate).
            kwargs.update(unix_socket=params.unix_socket, ssl_disabled=True)
        else:
            kwargs.update(host=params.host, port=params.port)
        return kwargs

    @classmethod
    def connection_pool(cls, params: MySQLParams, reactor=None) -> ConnectionPool:
        return _MySQLConnectionPool(
            "pymysql",
            cp_min=1,
            cp_max=cls.pool_size,
            cp_reconnect=True,
            cp_openfun=cls.thd_configure,
            cp_reactor=reactor,
            **cls.connect_kwargs(params),
        )

    @classmethod
    def thd_configure(cls, conn) -> None:
        """Set up a new connection (adbapi's ``cp_openfun``, in the pool's thread)."""
        with conn.cursor() as cursor:
            for statement in cls.session_setup:
                cursor.execute(statement)
        conn.commit()

    @classmethod
    def is_driver_error(cls, error: BaseException) -> bool:
        """Any error of the database or the driver, as opposed to one of gridd's code."""
        import pymysql

        return isinstance(error, pymysql.err.MySQLError)

    @classmethod
    def is_unavailable(cls, error: BaseException) -> bool:
        import pymysql

        return isinstance(error, (pymysql.err.OperationalError, pymysql.err.InterfaceError, CommitOutcomeUnknown))

    @classmethod
    def is_ddl_done(cls, error: BaseException) -> bool:
        import pymysql

        return isinstance(error, pymysql.err.MySQLError) and _code(error) in cls.ddl_done_codes

    @classmethod
    def is_retryable(cls, error: BaseException) -> bool:
        """True if the transaction that failed with ``error`` surely did not commit."""
        import pymysql

        if isinstance(error, pymysql.err.InterfaceError):
            return True  # the connection was unusable before anything ran
        return isinstance(error, pymysql.err.OperationalError) and _code(error) in cls.retry_codes


def _code(error: BaseException) -> int | None:
    args = getattr(error, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


@functools.lru_cache(maxsize=512)
def _to_format(sql: str) -> str:
    """qmark (``?``) to pymysql's format style (``%s``); a literal ``%`` doubles.

    The shared SQL has no ``?`` inside string literals.
    """
    return sql.replace("%", "%%").replace("?", "%s")


class _MySQLConnection(Connection):
    """adbapi's connection wrapper, checked before use and quiet when lost.

    - Each interaction starts with a ping; a connection that fails it (the
      server restarted, or closed it after ``wait_timeout``) is replaced by a
      new one before any statement is sent. If no new one can be made, the
      interaction fails before it began: it is retried, then ``Unavailable``.
    - A COMMIT that fails on a lost connection raises ``CommitOutcomeUnknown``.
    - A ROLLBACK that fails (the connection is gone, and with it the
      transaction, which the server rolls back) drops the connection so the
      next interaction makes a new one; adbapi's own wrapper would log two
      errors and raise ``ConnectionLost`` instead of the cause.
    """

    def __init__(self, pool):
        super().__init__(pool)
        import pymysql

        try:
            self._connection.ping()
        except pymysql.err.Error:
            self.reconnect()

    def commit(self):
        import pymysql

        try:
            self._connection.commit()
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as error:
            if isinstance(error, pymysql.err.InterfaceError) or _code(error) in MySQLDialect.lost_connection_codes:
                raise CommitOutcomeUnknown(
                    f"the connection was lost during COMMIT ({_code(error)}): the writes may or may not be committed"
                ) from error
            raise

    def rollback(self):
        import pymysql

        try:
            self._connection.rollback()
        except pymysql.err.Error:
            self._pool.disconnect(self._connection)


class _MySQLTransaction(Transaction):
    """adbapi's cursor wrapper: qmark parameters, and no statement after a fatal error.

    After a deadlock InnoDB has rolled the whole transaction back, and after
    a lost connection the server will: a statement run after that would open
    a new transaction and commit half a batch. So once a statement fails
    with such an error, every later statement on this transaction raises it
    again (the group committer's ``ROLLBACK TO SAVEPOINT`` included), and the
    transaction fails as a whole, to be retried.
    """

    _doomed: BaseException | None = None

    def execute(self, sql, args=None):
        return self._run(self._cursor.execute, sql, args)

    def executemany(self, sql, args):
        return self._run(self._cursor.executemany, sql, args)

    def _run(self, method, sql, args):
        if self._doomed is not None:
            raise self._doomed
        try:
            return method(sql if args is None else _to_format(sql), args)
        except Exception as error:
            if MySQLDialect.is_retryable(error):
                self._doomed = error
            raise


class _MySQLConnectionPool(ConnectionPool):
    """adbapi's pool with MySQL's wrappers and a bounded retry of whole interactions."""

    connectionFactory = _MySQLConnection
    transactionFactory = _MySQLTransaction
    #: Set once closed: a retry must not queue work on a pool with no threads.
    closed = False

    def finalClose(self):
        self.closed = True
        super().finalClose()

    def runInteraction(self, interaction, *args, **kw):
        return Deferred.fromCoroutine(self._run_retrying(interaction, args, kw))

    async def _run_retrying(self, interaction, args, kw):
        for delay in (*MySQLDialect.retry_delays, None):
            if self.closed:
                raise Unavailable("the store is stopping")
            try:
                return await super().runInteraction(interaction, *args, **kw)
            except Exception as error:
                if delay is None or not MySQLDialect.is_retryable(error):
                    raise
                log.info("database: {error}; running the transaction again in {delay} s", error=error, delay=delay)
                await deferLater(self._reactor, delay, lambda: None)


class MySQLStore(SQLStore):
    """``gridd.store.base.IStore`` on one MariaDB/MySQL database, migrated on start."""

    dialect = MySQLDialect

    def __init__(self, params: MySQLParams, reactor=None, server_id: str | None = None):
        super().__init__(reactor, server_id)
        self.params = params

    def describe(self) -> str:
        return self.params.describe()

    def _open_pool(self) -> ConnectionPool:
        self._require_driver()
        return MySQLDialect.connection_pool(self.params, self._reactor)

    def _require_driver(self) -> None:
        try:
            import pymysql  # noqa: F401
        except ImportError:
            raise StoreUnavailable(self.describe(), "PyMySQL is not installed: pip install 'gridd[mysql]'") from None

    def _preflight(self) -> int:
        self._require_driver()
        import pymysql

        conn = pymysql.connect(**MySQLDialect.connect_kwargs(self.params))
        try:
            with conn.cursor() as cursor:
                try:
                    cursor.execute("SELECT MAX(version) FROM schema_version")
                except pymysql.err.ProgrammingError as error:
                    if _code(error) == 1146:  # no such table: a new database
                        return 0
                    raise
                return cursor.fetchone()[0] or 0
        finally:
            conn.close()
