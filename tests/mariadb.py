"""A throwaway MariaDB server for the tests, started with --no-defaults on its own data directory, socket and port.

One server serves the whole test session (``conftest.py``'s ``mariadb``
fixture); each test gets a database of its own from ``database()``, dropped
afterwards, so tests are independent. The server runs as a child process on
a free loopback port and a socket in a temporary folder, and is stopped by
its PID at the end.

Readiness is not polled: mariadbd reports it over the systemd notification
protocol (``NOTIFY_SOCKET``), which Debian's build speaks; one
``mariadb-admin ping`` then confirms it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pymysql

from gridd.store.mysql import MySQLParams

__all__ = ["MariaDB", "MariaDBMissing"]

USER = "u"
PASSWORD = "gridd-test-pw"
#: Seconds a start or a stop may take before the tests give up on it.
TIMEOUT = 30.0


class MariaDBMissing(Exception):
    """mariadbd or its tools are not installed."""


def _tool(name: str) -> str:
    # mariadbd lives in /usr/sbin, which a non-login PATH may lack.
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise MariaDBMissing(
            f"{name} not found: the MariaDB tests need Debian's mariadb-server "
            "(`./dev setup` installs it when run as root, or: apt-get install mariadb-server)"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MariaDB:
    """A MariaDB server in ``base``: ``start()``, ``stop()``, ``database()``."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.datadir = self.base / "data"
        self.socket = str(self.base / "mysqld.sock")
        self.log = self.base / "mysqld.log"
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.user = USER
        self.password = PASSWORD
        #: The stores under test read the password from here (``?password_file=``).
        self.password_file = self.base / "password"
        self.process: subprocess.Popen | None = None
        self._names = itertools.count(1)

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Start the server (creating its data folder the first time); return when it serves."""
        mariadbd = _tool("mariadbd")
        admin = _tool("mariadb-admin")
        first = not self.datadir.exists()
        if first:
            self.password_file.write_text(PASSWORD + "\n")
            subprocess.run(
                [
                    _tool("mariadb-install-db"),
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={self.datadir}",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--innodb-log-file-size=16M",
                ],
                check=True,
                capture_output=True,
                timeout=TIMEOUT,
            )
        notify_path = str(self.base / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(self.log, "ab") as log:
            notify.bind(notify_path)
            self.process = subprocess.Popen(
                [
                    mariadbd,
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={self.datadir}",
                    f"--socket={self.socket}",
                    f"--port={self.port}",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    f"--pid-file={self.base / 'mysqld.pid'}",
                    f"--log-error={self.log}",
                    "--character-set-server=utf8mb4",
                    "--collation-server=utf8mb4_general_ci",
                    "--innodb-buffer-pool-size=64M",
                    "--innodb-log-file-size=16M",
                ],
                stdout=log,
                stderr=log,
                env=dict(os.environ, NOTIFY_SOCKET=notify_path),
            )
            self._wait_ready(notify)
        subprocess.run(
            [admin, "--no-defaults", f"--socket={self.socket}", "-uroot", "ping"],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )
        if first:
            self._create_users()

    def _wait_ready(self, notify: socket.socket) -> None:
        """Block until mariadbd says READY=1; fail if it exits or takes longer than TIMEOUT."""
        deadline = time.monotonic() + TIMEOUT
        notify.settimeout(0.5)  # to notice a server that died without a word
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in notify.recv(4096):
                    return
            except TimeoutError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.process.returncode}:\n{self._log_tail()}")
        self.process.kill()
        self.process.wait()
        raise RuntimeError(f"mariadbd did not become ready in {TIMEOUT} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Shut the server down cleanly (``mariadb-admin shutdown``), else kill it by its PID."""
        if self.process is None:
            return
        process, self.process = self.process, None
        subprocess.run(
            [_tool("mariadb-admin"), "--no-defaults", f"--socket={self.socket}", "-uroot", "shutdown"],
            capture_output=True,
            timeout=TIMEOUT,
        )
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    # -- users and databases --------------------------------------------

    def root(self) -> pymysql.Connection:
        """A connection as root over the socket, autocommitting."""
        # No TLS on the socket: pymysql would build a TLS context (tens of ms) per connection.
        return pymysql.connect(unix_socket=self.socket, user="root", autocommit=True, ssl_disabled=True)

    def _create_users(self) -> None:
        # The grant docs/mariadb.md recommends, on the test databases' names.
        with contextlib.closing(self.root()) as conn, conn.cursor() as cursor:
            for host in ("127.0.0.1", "localhost"):
                cursor.execute(f"CREATE USER '{USER}'@'{host}' IDENTIFIED BY %s", (PASSWORD,))
                cursor.execute(
                    "GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES"
                    f" ON `gridd\\_%`.* TO '{USER}'@'{host}'"
                )

    @contextlib.contextmanager
    def database(self):
        """Create a fresh, empty database; yield its ``MySQLParams`` (TCP); drop it afterwards."""
        name = f"gridd_t{next(self._names)}"
        with contextlib.closing(self.root()) as conn, conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        try:
            yield MySQLParams(USER, name, host=self.host, port=self.port, password_file=str(self.password_file))
        finally:
            if self.process is not None:
                with contextlib.closing(self.root()) as conn, conn.cursor() as cursor:
                    cursor.execute(f"DROP DATABASE IF EXISTS {name}")

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        """Run ``sql`` as root on a connection of its own, which sees committed data only."""
        with contextlib.closing(self.root()) as conn, conn.cursor() as cursor:
            cursor.execute(f"USE {database}")
            cursor.execute(sql, args or None)
            return list(cursor.fetchall())
