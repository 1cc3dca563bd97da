"""Run a local grid of real processes: a ``twistd gridd`` and ``twistd gridworker``s.

Used by the demo, the benchmark and the end-to-end tests. Nothing here
sleeps: callers wait on a line a process prints (``wait_for``) or on a
Deferred from the client API. Every wait has a bound, so a hung process
fails loudly instead of hanging. Processes are stopped by the PID this
module started, never by name. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

from twisted.internet import defer, protocol

#: The source tree, put on PYTHONPATH so twistd finds the plugins without an install.
ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # seconds any single awaited event may take before the caller fails


#: ``twistd`` run by this very interpreter (its console script may not be on PATH).
_TWISTD = "from twisted.scripts.twistd import run; run()"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server that must restart on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class GriddProcess(protocol.ProcessProtocol):
    """One ``twistd -n`` process whose log lines can be awaited."""

    def __init__(self, reactor, name: str, args: list[str], log_dir: Path, twistd_args: tuple[str, ...] = ()):
        self.reactor = reactor
        self.name = name
        self.args = args
        self.twistd_args = twistd_args
        self.lines: list[str] = []
        self._partial = b""
        self._waiters: list[tuple[re.Pattern, int, defer.Deferred]] = []
        self.ended = defer.Deferred()
        self.exit_code = None
        #: The signal that ended the process, or None if it exited (twistd
        #: ends itself with the signal that stopped it, after shutting down).
        self.exit_signal = None
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        self.transport = None

    def start(self):
        argv = [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "--logfile=-", *self.twistd_args, *self.args]
        self.reactor.spawnProcess(self, sys.executable, argv, env=_env(), path=str(ROOT))
        return self

    @property
    def pid(self) -> int:
        return self.transport.pid

    def outReceived(self, data: bytes):
        self._partial += data
        *complete, self._partial = self._partial.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            self._log.write(line + "\n")
            self._log.flush()
            for waiter in list(self._waiters):
                pattern, _, d = waiter
                if pattern.search(line):
                    self._waiters.remove(waiter)
                    d.callback(line)

    errReceived = outReceived

    def processEnded(self, reason):
        self._log.close()
        for _, _, d in self._waiters:
            d.errback(AssertionError(f"{self.name} exited while waiting for a log line; see {self.log_path}"))
        self._waiters.clear()
        self.exit_code = reason.value.exitCode
        self.exit_signal = reason.value.signal
        self.ended.callback(self.exit_code)

    def when_ended(self) -> defer.Deferred:
        """A new Deferred that fires with the exit code (cancelling it leaves ``ended`` alone)."""
        d = defer.Deferred()
        if self.ended.called:
            d.callback(self.exit_code)
        else:

            def relay(code):
                if not d.called:
                    d.callback(code)
                return code

            self.ended.addBoth(relay)
        return d

    def wait_for(self, pattern: str, since: int = 0, timeout: float = WAIT) -> defer.Deferred:
        """Fire with the first line at index >= ``since`` matching ``pattern``."""
        regex = re.compile(pattern)
        for line in self.lines[since:]:
            if regex.search(line):
                return defer.succeed(line)
        if self.ended.called:
            return defer.fail(AssertionError(f"{self.name} has exited; no line matches {pattern!r}"))
        d = defer.Deferred()
        self._waiters.append((regex, since, d))
        return d.addTimeout(timeout, self.reactor).addErrback(self._explain_timeout, pattern, d)

    def _explain_timeout(self, failure, pattern, d):
        self._waiters = [w for w in self._waiters if w[2] is not d]
        failure.trap(defer.TimeoutError, defer.CancelledError)
        raise AssertionError(f"{self.name}: no log line matched {pattern!r} in time; see {self.log_path}")

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self.lines if regex.search(line)]

    def send_signal(self, sig: int):
        # The pid is None once the process has exited, even before processEnded.
        if not self.ended.called and self.transport.pid is not None:
            os.kill(self.pid, sig)

    async def stop(self, sig=signal.SIGTERM, timeout: float = WAIT):
        """Signal the process and wait for it to exit; SIGKILL it if it will not."""
        if self.ended.called:
            return self.exit_code
        self.send_signal(sig)
        try:
            return await self.when_ended().addTimeout(timeout, self.reactor)
        except defer.TimeoutError:
            self.send_signal(signal.SIGKILL)
            await self.when_ended()
            raise AssertionError(f"{self.name} ignored signal {sig}; killed") from None


class LocalGrid:
    """A server and workers in subprocesses on loopback, sharing one data directory."""

    def __init__(
        self,
        reactor,
        tmp_path: Path,
        *,
        beat: float = 0.5,
        port: int | None = None,
        listen: str | None = None,
        connect: str | None = None,
    ):
        """``listen`` replaces the server's ``tcp:PORT:interface=127.0.0.1`` (an ``ssl:`` endpoint on
        PORT, say) and ``connect`` the ``tcp:127.0.0.1:PORT`` that workers and clients use."""
        self.reactor = reactor
        self.tmp = tmp_path
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.data = tmp_path / "data"
        self.beat = beat
        self.port = port or free_port()
        self.listen = listen or f"tcp:{self.port}:interface=127.0.0.1"
        self.connect = connect or f"tcp:127.0.0.1:{self.port}"
        self.server: GriddProcess | None = None
        self.workers: dict[str, GriddProcess] = {}
        self._generation = 0

    @property
    def endpoint(self) -> str:
        return self.connect

    @property
    def secret(self) -> str:
        return (self.data / "secret").read_text().strip()

    async def start_server(self, *extra: str, twistd_args: tuple[str, ...] = ()) -> GriddProcess:
        """Start ``twistd gridd`` with ``extra`` options; ``twistd_args`` go to twistd itself."""
        self._generation += 1
        args = [
            "gridd",
            "--data",
            str(self.data),
            "--listen",
            self.listen,
            "--beat",
            str(self.beat),
            *extra,
        ]
        self.server = GriddProcess(self.reactor, f"server-{self._generation}", args, self.tmp, twistd_args).start()
        await self.server.wait_for(r"gridd listening on")
        return self.server

    async def start_worker(self, name: str, slots: int = 2, *extra: str) -> GriddProcess:
        args = [
            "gridworker",
            "--server",
            self.endpoint,
            "--name",
            name,
            "--slots",
            str(slots),
            "--secret-file",
            str(self.data / "secret"),
            *extra,
        ]
        proc = GriddProcess(self.reactor, name, args, self.tmp).start()
        self.workers[name] = proc
        await self.server.wait_for(rf"worker {re.escape(name)} connected")
        return proc

    async def stop_all(self):
        for proc in [*self.workers.values(), self.server]:
            if proc is not None and not proc.ended.called:
                try:
                    await proc.stop()
                except AssertionError:
                    pass

    def db_rows(self, query: str, *args):
        """Read the server's SQLite file directly (a second reader; WAL allows it)."""
        import sqlite3
        from contextlib import closing

        # closing(): sqlite3's own context manager ends a transaction, not the connection.
        with closing(sqlite3.connect(self.data / "gridd.db")) as db:
            return db.execute(query, args).fetchall()


