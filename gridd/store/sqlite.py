"""The embedded store: one SQLite file, written through group commit.

SQLite has one writer at a time and pays a disk sync for every commit, so the
store talks to it over a single connection and hands every write to a
``GroupCommitter`` (``gridd.store.sql.SQLStore``): writes that arrive
together share one transaction, each in its own savepoint.

The queries are shared with MySQL in ``gridd.store.sql``; what only SQLite
needs lives in ``SQLiteDialect``.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.enterprise.adbapi import ConnectionPool

from gridd.store.sql import SQLStore, load_migrations

__all__ = ["SQLiteDialect", "SQLiteStore", "load_migrations"]


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
    - Reads run in a deferred ``BEGIN`` ... ``COMMIT``: on the one connection
      they queue behind the transactions already started, so they see every
      acknowledged write, and the transaction makes the several SELECTs of
      one read a single snapshot even when another process (a second store
      on the same file) commits in between.
    - No row locks: a write transaction holds the whole file, so claiming
      rows needs no ``FOR UPDATE SKIP LOCKED`` (``skip_locked`` is empty).
    - DDL is transactional: all migrations run in one transaction.
    - Parameters are in qmark style (``?``), as the shared SQL is written.
    """

    #: Also the name of the migrations folder.
    name = "sqlite"
    begin = "BEGIN IMMEDIATE"
    read_begin = ("BEGIN",)
    skip_locked = ""
    transactional_ddl = True
    migration_lock = None
    migration_unlock = None
    busy_timeout_ms = 5000
    #: Primary result codes that mean the database cannot serve just now, as
    #: opposed to an error in the SQL.
    unavailable_codes = frozenset(
        {
            sqlite3.SQLITE_BUSY,
            sqlite3.SQLITE_LOCKED,
            sqlite3.SQLITE_FULL,
            sqlite3.SQLITE_IOERR,
            sqlite3.SQLITE_CANTOPEN,
            sqlite3.SQLITE_READONLY,
            sqlite3.SQLITE_PERM,
            sqlite3.SQLITE_NOTADB,
            sqlite3.SQLITE_CORRUPT,
        }
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
    def is_driver_error(cls, error: BaseException) -> bool:
        """Any error of the database, as opposed to one of gridd's code."""
        return isinstance(error, sqlite3.Error)

    @classmethod
    def is_unavailable(cls, error: BaseException) -> bool:
        code = getattr(error, "sqlite_errorcode", None)
        return isinstance(error, sqlite3.OperationalError) and code is not None and code & 0xFF in cls.unavailable_codes

    @classmethod
    def is_ddl_done(cls, error: BaseException) -> bool:
        """Never asked: DDL is transactional, so a migration never runs twice."""
        return False


class SQLiteStore(SQLStore):
    """``gridd.store.base.IStore`` on an SQLite file, created with its folder if missing."""

    dialect = SQLiteDialect

    def __init__(self, path: str, reactor=None, server_id: str | None = None):
        super().__init__(reactor, server_id)
        self.path = path

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def _open_pool(self) -> ConnectionPool:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return SQLiteDialect.connection_pool(self.path, self._reactor)

    def _preflight(self) -> int:
        # Take the write lock and let go: proves the file (and its folder,
        # for the journal) can be written, not only read.
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=SQLiteDialect.busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                return conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            except sqlite3.OperationalError as error:
                if "no such table" in str(error):
                    return 0
                raise
            finally:
                conn.execute("ROLLBACK")
        finally:
            conn.close()
