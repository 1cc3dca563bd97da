"""The built-in job type ``command``: a program the worker's operator names runs each job, over JSON lines.

Rules this module owns:

- Which programs run is the worker operator's decision, never the
  submitter's: ``twistd gridworker --command NAME=PATH`` names them, and a
  job says only ``params.command = NAME``. A job naming no command, or one
  this worker does not have, fails its attempt and starts nothing.
- One process per attempt, started as ``[PATH]`` (no shell, no arguments)
  in the worker's working directory, with the worker's environment plus
  ``GRIDD_PARAMS`` (the job's params as JSON), ``GRIDD_JOB`` (its id) and
  ``GRIDD_ATTEMPT`` (the attempt number). When ``setsid`` is installed the
  program runs in a session, and so a process group, of its own; without
  it only the program itself can be killed, not what it started.
- Standard input: one line per record of the attempt, in index order, the
  record's data as JSON; then end of file. It is written without blocking:
  a program that never reads it, or exits before reading it all, does not
  hold the worker, and its attempt ends by its exit status and results.
- Standard output: one line per record, in the same order, each a JSON
  object with one key: ``{"out": VALUE}`` is the record's output (any JSON
  value, null included), ``{"error": "TEXT"}`` gives the record an error
  result. Blank lines are ignored. Anything else (a line that is not JSON,
  a bare value, an object with other or more keys, a non-string error)
  breaks the contract. Each result is reported as its line arrives.
- The attempt completes when the program exits with code 0 having given a
  result for every record. It fails, with an ``AttemptFailed`` naming the
  cause, when the program exits with another code or is killed by a signal,
  breaks the output contract, gives more results than records or fewer, or
  passes the attempt's run-time limit. Results already given stay given.
- On a broken contract, a run-time limit or a cancel, the program is killed
  at once (SIGKILL, its whole process group); when it exits by itself,
  whatever it left running in its group is killed too.
- Standard error is the attempt's log: its last ``STDERR_KEPT`` bytes are
  kept, their last lines end the message of a failure, and all of them are
  logged with the attempt's end.
- With a sandbox (``gridd.worker.sandbox``, ``twistd gridworker --sandbox``)
  the program runs under bubblewrap, confined (``gridd.worker.confine``)
  before it starts, in a work directory of its own (its current directory,
  the one place it may write, removed when it ends), seeing only its own
  file of the worker's; its environment is not the worker's but ``PATH``,
  ``HOME``, ``TMPDIR``, ``LANG`` and the three above. It has the network
  only when its name is among those the operator allows it
  (``--command-network NAME``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from twisted.internet import defer, protocol
from twisted.logger import Logger

from gridd.worker.processes import KeptOutput, end_of, kill, pause, resume
from gridd.worker.runner import Assignment, AttemptFailed
from gridd.worker.sandbox import Sandbox

__all__ = ["CommandType", "CommandRunner", "STDERR_KEPT", "parse_command"]

log = Logger()

#: The last bytes of a program's standard error that are kept.
STDERR_KEPT = 64 * 1024
#: The longest line of standard output read before the attempt fails.
MAX_LINE = 16 * 1024 * 1024
#: A variable of the environment longer than this cannot be passed (Linux's MAX_ARG_STRLEN, less a margin).
MAX_PARAMS = 128 * 1024 - 64
#: Lines of standard error, and characters of a bad line, quoted in a failure's message.
TAIL_LINES = 5
QUOTED = 200

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def parse_command(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` as ``(NAME, absolute PATH)``; ValueError says what is wrong with it."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError("expected NAME=PATH")
    if not _NAME.match(name):
        raise ValueError(
            f"the name {name!r} is not 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    if not os.access(path, os.X_OK):
        raise ValueError(f"{path} is not executable")
    return name, path


class CommandType:
    """The ``command`` job type: runs the operator's programs, by name.

    ``reactor`` spawns the processes; ``group=False`` (or no ``setsid``
    installed) runs each program in the worker's process group. ``sandbox``
    runs each in it (and in a group of its own), with the network for the
    commands named in ``network``.
    """

    name = "command"
    version = "1.0"
    threaded = False

    def __init__(self, commands: Mapping[str, str], *, reactor, group: bool = True, sandbox: Sandbox | None = None,
                 network: Iterable[str] = ()):  # fmt: skip
        self.commands = dict(commands)
        self.reactor = reactor
        self.sandbox = sandbox
        self.network = frozenset(network)
        self.setsid = sandbox.setsid if sandbox is not None else shutil.which("setsid") if group else None

    def runner(self, assignment: Assignment, *, clock, on_result: Callable[[dict], None], on_progress=None):
        return CommandRunner(self, assignment, clock=clock, on_result=on_result)


class CommandRunner(protocol.ProcessProtocol):
    """One attempt of a ``command`` job: its process, its results, its outcome."""

    def __init__(self, command_type: CommandType, assignment: Assignment, *, clock, on_result):
        self._type = command_type
        self._assignment = assignment
        self._clock = clock
        self._on_result = on_result
        self._pending = deque(record["i"] for record in assignment.records)
        self._outcome = defer.Deferred()
        self._name = ""
        self._stdin = b""
        self._stdout = bytearray()
        self._stderr = KeptOutput(STDERR_KEPT)
        self._pid: int | None = None
        self._paused = False
        self._exited = False
        self._cancelled = False
        self._limit = None
        self._work_dir: str | None = None
        #: Fires with the end of the process in words ("exited with code 0") once it is gone.
        self.ended = defer.Deferred()

    def run(self) -> defer.Deferred:
        """Start the program; fires True once it gave every result, False if cancelled."""
        if self._cancelled:
            return defer.succeed(False)
        a, commands = self._assignment, self._type.commands
        name = a.params.get("command")
        known = ", ".join(sorted(commands)) or "none"
        if not isinstance(name, str):
            return defer.fail(AttemptFailed(f"the job names no command (params.command); this worker has: {known}"))
        if name not in commands:
            return defer.fail(AttemptFailed(f"no command {name!r} on this worker; it has: {known}"))
        params = json.dumps(a.params, separators=(",", ":"))
        if len(params) > MAX_PARAMS:
            return defer.fail(AttemptFailed(f"the job's params take {len(params)} bytes as JSON, over {MAX_PARAMS}"))
        self._name, path = name, commands[name]
        given = {"GRIDD_PARAMS": params, "GRIDD_JOB": str(a.job), "GRIDD_ATTEMPT": str(a.attempt)}
        sandbox = self._type.sandbox
        if sandbox is None:
            env = dict(os.environ, **given)
            # setsid execs the program in place (a freshly forked child leads no group), so its pid is the program's.
            setsid = self._type.setsid
            argv = [setsid, path] if setsid else [path]
        else:
            try:
                self._work_dir = sandbox.make_work_dir(f"command-{a.job}.{a.attempt}-")
            except OSError as e:
                return defer.fail(AttemptFailed(f"command {name}: no work directory: {e}"))
            network = name in self._type.network
            confine = json.dumps({"work": self._work_dir, "network": network})
            inside = [sys.executable, "-m", "gridd.worker.confine", confine, "--", path]
            argv = sandbox.argv(inside, work_dir=self._work_dir, network=network, read_only=[path])
            env = sandbox.environment(
                self._work_dir, {**given, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            )
        self._stdin = b"".join(json.dumps(r["data"], separators=(",", ":")).encode() + b"\n" for r in a.records)
        try:
            self._type.reactor.spawnProcess(self, argv[0], argv, env=env)
        except OSError as e:
            self._remove_work_dir()
            return defer.fail(AttemptFailed(f"command {name} cannot be started: {e}"))
        limit = f"command {name} passed the run-time limit of {a.timeout:g} s"
        self._limit = self._clock.callLater(a.timeout, self._fail, limit)
        return self._outcome

    def cancel(self) -> None:
        """Kill the program at once; ``run()`` fires False."""
        self._cancelled = True
        self._settle(False)

    def pause(self) -> None:
        """Stop the program and what it started (SIGSTOP to its group) until :meth:`resume`."""
        self._paused = True
        self._signal(pause)

    def resume(self) -> None:
        self._paused = False
        self._signal(resume)

    def _signal(self, send) -> None:
        if self._pid is not None and not self._exited:
            send(self._pid, group=bool(self._type.setsid))

    @property
    def stderr(self) -> str:
        """The standard error kept so far."""
        return self._stderr.text()

    # -- the process's side ----------------------------------------------

    def connectionMade(self):
        self._pid = self.transport.pid
        if self._paused:
            self._signal(pause)
        # The transport buffers what the pipe cannot take yet; a program that
        # closes its input early only ends the writing (childConnectionLost).
        self.transport.write(self._stdin)
        self._stdin = b""
        self.transport.closeStdin()

    def outReceived(self, data: bytes):
        if self._outcome.called:
            return
        self._stdout += data
        if b"\n" in data:
            *lines, rest = self._stdout.split(b"\n")
            self._stdout = bytearray(rest)
            for line in lines:
                self._line(bytes(line))
        if len(self._stdout) > MAX_LINE:
            self._fail(f"command {self._name} wrote a line longer than {MAX_LINE} bytes")

    def errReceived(self, data: bytes):
        self._stderr.add(data)

    def processExited(self, reason):
        self._exited = True
        self._kill_group()  # what the program left running would keep its output open

    def processEnded(self, reason):
        self._exited = True
        self._remove_work_dir()
        if self._stdout.strip():
            self._line(bytes(self._stdout))
        self._stdout.clear()
        cause, failed = _cause(reason, sandboxed=self._type.sandbox is not None)
        tail = self._stderr.tail(TAIL_LINES)
        tail = f": {tail}" if tail else ""
        given, total = len(self._assignment.records) - len(self._pending), len(self._assignment.records)
        if failed:
            self._fail(f"command {self._name} {cause}{tail}")
        elif self._pending:
            self._fail(f"command {self._name} gave {given} results for {total} records{tail}")
        else:
            self._settle(True)
        a = self._assignment
        log.info(
            "command {name} of job {job} attempt {attempt} {cause}{stderr}",
            name=self._name,
            job=a.job,
            attempt=a.attempt,
            cause=cause,
            stderr=f"; its standard error:\n{self.stderr}" if self._stderr else "",
        )
        self.ended.callback(cause)

    # -- results and outcome -----------------------------------------------

    def _line(self, line: bytes) -> None:
        if self._outcome.called or not line.strip():
            return
        body = _result_body(line)
        if body is None:
            shown = line.decode("utf-8", "replace")
            shown = shown if len(shown) <= QUOTED else shown[: QUOTED - 1] + "…"
            self._fail(f"command {self._name} wrote a line that is not a result: {shown}")
        elif not self._pending:
            self._fail(f"command {self._name} gave more results than its {len(self._assignment.records)} records")
        else:
            self._on_result({"i": self._pending.popleft(), **body})

    def _fail(self, message: str) -> None:
        self._settle(AttemptFailed(message))

    def _remove_work_dir(self) -> None:
        if self._work_dir is not None:
            Sandbox.remove_work_dir(self._work_dir)
            self._work_dir = None

    def _settle(self, outcome: bool | AttemptFailed) -> None:
        """The first outcome wins; any other than completion kills the program."""
        if self._outcome.called:
            return
        if self._limit is not None and self._limit.active():
            self._limit.cancel()
        if outcome is not True:
            self._kill()
        if isinstance(outcome, AttemptFailed):
            self._outcome.errback(outcome)
        else:
            self._outcome.callback(outcome)

    def _kill(self) -> None:
        if self._pid is None or self._exited:
            return
        if not self._kill_group():
            kill(self.transport, self._pid, group=False)

    def _kill_group(self) -> bool:
        """SIGKILL the program's own process group, if it has one (yet)."""
        return self._pid is not None and bool(self._type.setsid) and kill(self.transport, self._pid, group=True)


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _result_body(line: bytes) -> dict | None:
    """``{"out": VALUE}`` or ``{"error": TEXT}``, or None for a line that is neither."""
    try:
        body = json.loads(line, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or len(body) != 1:
        return None
    if "out" in body or isinstance(body.get("error"), str):
        return body
    return None


def _cause(reason, sandboxed: bool = False) -> tuple[str, bool]:
    """How the process ended, in words, and whether that fails the attempt."""
    code, killed_by = end_of(reason, sandboxed=sandboxed)
    if killed_by is not None:
        return f"was killed by {killed_by}", True
    return f"exited with code {code}", code != 0
