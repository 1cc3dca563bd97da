"""Handler processes: a pool of them per job type, and the runner of one attempt in one of them.

Rules this module owns:

- A job type's records are processed in a child process
  (``gridd.worker.child``), never in the worker's own: whatever the handler
  does (exits, crashes, hangs, eats memory) ends that process, fails that
  attempt only, and the worker keeps its connection and its other jobs.
- Processes are reused across attempts of the same type, version and
  limits, so a process's start-up is paid once; at most ``size`` of them per
  type are kept idle. Limits are fixed when a process starts (rlimits, and a
  control group of its own where the host offers one, ``gridd.worker.cgroups``),
  except CPU time, which each attempt gets afresh. A process that failed an attempt, was cancelled or passed a
  limit is killed with its whole process group, never reused.
- An attempt fails with a message naming its cause: the exit code or the
  signal, the memory or CPU limit passed, or the run-time limit.
- Cancel and revoke kill at once; results already streamed stay streamed.
- With a sandbox (``gridd.worker.sandbox``, ``twistd gridworker --sandbox``)
  each process starts under bubblewrap and confines itself before it loads
  its job type; it has the network only when its type says ``needs_network
  = True``. Its work directory, the one place it may write, is made when it
  starts and removed when it ends; each attempt runs in a new directory in
  it, and everything the attempt left there is removed when it is over.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger

from gridd.worker.cgroups import Cgroups, Group
from gridd.worker.processes import KeptOutput, end_of, kill, pause, resume
from gridd.worker.runner import Assignment, AttemptFailed
from gridd.worker.sandbox import Sandbox

__all__ = ["HandlerPool", "HandlerProcess", "ProcessRunner"]

log = Logger()

#: The last bytes of a handler's standard error kept, for the error of a failed attempt.
STDERR_KEPT = 16 * 1024
#: Seconds between tries to remove an ended process's control group, and how many tries
#: (killed processes leave their group only once the kernel has reaped them).
REMOVAL_DELAY = 0.05
REMOVAL_TRIES = 100


def type_path(job_type: Any) -> str:
    """``module:Class`` of a job type instance, as the child process loads it."""
    cls = type(job_type)
    return f"{cls.__module__}:{cls.__qualname__}"


def _describe_end(reason, limits: dict, group: Group | None = None, sandboxed: bool = False) -> str:
    """What ended a process, in words: "exit code 3", "killed by SIGSEGV", "CPU limit 10 s"."""
    code, killed_by = end_of(reason, sandboxed=sandboxed)
    if killed_by == "SIGXCPU" and limits.get("cpu"):
        return f"CPU limit {limits['cpu']} s"
    if killed_by == "SIGKILL" and group is not None and group.killed_for_memory():
        return f"memory limit {limits['memory']} MiB (control group)"
    if killed_by is not None:
        return f"killed by {killed_by}"
    return f"exit code {code}" if code else "exited"


class HandlerProcess(protocol.ProcessProtocol):
    """One handler process and the attempt it is serving, if any."""

    def __init__(self, key: tuple, limits: dict, group: Group | None = None, work_dir: str | None = None):
        self.key = key
        self.limits = limits
        self.group = group
        #: In the sandbox: the directory the process may write in.
        self.work_dir = work_dir
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.pid: int | None = None
        self.alive = True
        self.paused = False
        self.grouped = False  # it has left our process group (setsid): kill its group
        self._buffer = b""
        self._stderr = KeptOutput(STDERR_KEPT)
        #: The attempt served now hears each line and the process's end (its cause, in words).
        self.on_line: Callable[[dict], None] | None = None
        self.on_end: Callable[[str], None] | None = None

    # -- the process's side ----------------------------------------------

    def connectionMade(self):
        self.pid = self.transport.pid

    def outReceived(self, data: bytes):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                self.kill()
                return
            if "ready" in message and not self.ready.called:
                self.grouped = True
                if "confined" in message["ready"]:
                    log.info("handler process {pid} for {type} confined: {how}", pid=self.pid, type=self.key[0],
                             how=message["ready"]["confined"])  # fmt: skip
                self.ready.callback(self)
            elif self.on_line is not None:
                self.on_line(message)

    def errReceived(self, data: bytes):
        self._stderr.add(data)

    def processEnded(self, reason):
        self.alive = False
        cause = _describe_end(reason, self.limits, self.group, sandboxed=self.work_dir is not None)
        if not self.ready.called:
            self.ready.errback(AttemptFailed(f"the handler process did not start ({cause}): {self.stderr_tail()}"))
        if self.on_end is not None:
            self.on_end(cause)
        self.ended.callback(cause)

    # -- the worker's side -----------------------------------------------

    def send(self, **message) -> None:
        if self.alive:
            self.transport.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def stderr_tail(self, lines: int = 5) -> str:
        return self._stderr.tail(lines)

    def kill(self) -> None:
        """Kill the process, with its whole process group once it has one of its own."""
        if self.alive and self.pid is not None:
            kill(self.transport, self.pid, group=self.grouped)

    def pause(self) -> None:
        """Stop the process and everything it started (SIGSTOP to its group); nothing runs until resumed."""
        if self.alive and self.pid is not None:
            self.paused = True
            pause(self.pid, group=self.grouped)

    def resume(self) -> None:
        if self.alive and self.pid is not None:
            self.paused = False
            resume(self.pid, group=self.grouped)


class HandlerPool:
    """The worker's handler processes, by job type, version and limits; idle ones are reused.

    ``limits`` are those of an attempt that names none; ``cgroups``, where
    given, puts each process with a memory or process limit in control
    groups of its own; ``sandbox``, where given, starts every process in it.
    """

    def __init__(self, reactor, *, size: int = 4, limits: dict | None = None, cgroups: Cgroups | None = None,
                 sandbox: Sandbox | None = None):  # fmt: skip
        self.reactor = reactor
        self.size = size
        self.limits = dict(limits or {})
        self.cgroups = cgroups
        self.sandbox = sandbox
        self._idle: dict[tuple, deque[HandlerProcess]] = defaultdict(deque)
        self._all: set[HandlerProcess] = set()
        #: Control groups of ended processes that still held killed processes when last tried.
        self._unremoved: list[Group] = []
        self._removal_call = None
        self._removal_tries = 0

    def acquire(self, job_type: Any, limits: dict | None = None) -> defer.Deferred:
        """Fire with a ready process for ``job_type`` under ``limits``: an idle one, or one started now."""
        limits = self.limits if limits is None else dict(limits)
        key = (type_path(job_type), job_type.version, tuple(sorted(limits.items())))
        idle = self._idle[key]
        while idle:
            process = idle.popleft()
            if process.alive:
                return defer.succeed(process)
        return self._start(key, limits, network=bool(getattr(job_type, "needs_network", False)))

    @property
    def processes(self) -> int:
        """Handler processes alive now, busy or idle."""
        return len(self._all)

    def release(self, process: HandlerProcess) -> None:
        """The attempt is over and went well: keep the process for the next one, if there is room."""
        process.on_line = process.on_end = None
        if process.paused:  # the attempt ended while paused (its last results were already read): not the next one's
            process.resume()
        idle = self._idle[process.key]
        if process.alive and len(idle) < self.size:
            idle.append(process)
        else:
            process.kill()

    def discard(self, process: HandlerProcess) -> None:
        process.on_line = process.on_end = None
        process.kill()

    def stop(self) -> defer.Deferred:
        """Kill every process; fire once all have ended."""
        ends = [p.ended for p in self._all if p.alive]
        for process in list(self._all):
            process.kill()
        self._idle.clear()
        return defer.DeferredList(ends).addCallback(lambda _: self._remove_groups(again=False))

    def _remove_groups(self, again: bool = True) -> None:
        """Remove the groups of ended processes, killing what is left in them; try again shortly while any remain."""
        if self._removal_call is not None and self._removal_call.active():
            self._removal_call.cancel()
        self._removal_call = None
        for group in self._unremoved:
            group.kill_all()
        self._unremoved = [group for group in self._unremoved if not group.remove()]
        if not self._unremoved:
            self._removal_tries = 0
        elif again and self._removal_tries < REMOVAL_TRIES:
            self._removal_tries += 1
            self._removal_call = self.reactor.callLater(REMOVAL_DELAY, self._remove_groups)

    def _ended(self, process: HandlerProcess) -> None:
        self._all.discard(process)
        if process.work_dir is not None:
            Sandbox.remove_work_dir(process.work_dir)
        if process.group is not None:
            if process.grouped:
                kill(process.transport, process.pid, group=True)  # what it started, if anything is left
            self._unremoved.append(process.group)
        self._remove_groups()

    def _start(self, key: tuple, limits: dict, *, network: bool = False) -> defer.Deferred:
        self._remove_groups()
        group = None
        if self.cgroups is not None and ("memory" in limits or "processes" in limits):
            group = self.cgroups.make(memory=limits.get("memory"), processes=limits.get("processes"))
        work_dir = self.sandbox.make_work_dir("handler-") if self.sandbox is not None else None
        process = HandlerProcess(key, limits, group, work_dir)
        joins = group.procs_files() if group is not None else []
        # A control group measures memory and processes better than rlimits can (address space
        # is not memory; RLIMIT_NPROC counts all the user's processes and binds root not at all).
        kept_by_group = {"memory": "memory", "processes": "pids"}
        rlimits = {k: v for k, v in limits.items() if group is None or kept_by_group.get(k) not in group.paths}
        spec = {"type": key[0], "limits": rlimits, "cgroups": joins, "explain": limits, "parent": os.getpid()}
        python_path = os.pathsep.join(p for p in sys.path if p)
        if work_dir is None:
            argv = [sys.executable, "-m", "gridd.worker.child", json.dumps(spec)]
            env = dict(os.environ, PYTHONPATH=python_path)
        else:
            # Outside the sandbox: join the groups, then bubblewrap; the worker is not the child's parent.
            spec.update(cgroups=[], parent=None, confine={"work": work_dir, "network": network})
            argv = self.sandbox.argv([sys.executable, "-m", "gridd.worker.child", json.dumps(spec)],
                                     work_dir=work_dir, network=network, join=joins)  # fmt: skip
            env = self.sandbox.environment(work_dir, {"PYTHONPATH": python_path})
        self.reactor.spawnProcess(process, argv[0], argv, env=env)
        self._all.add(process)
        process.ended.addBoth(lambda r: self._ended(process) or r)
        return process.ready


class ProcessRunner:
    """Runs one attempt in a handler process from the pool; the ``JobRunner`` interface.

    ``limits`` (None: the pool's) are the attempt's; ``pause`` and ``resume``
    stop and continue its process group.
    """

    def __init__(self, pool: HandlerPool, job_type: Any, assignment: Assignment, *, clock, on_result, on_progress,
                 limits: dict | None = None):  # fmt: skip
        self._pool = pool
        self._job_type = job_type
        self._assignment = assignment
        self._limits = limits
        self._paused = False
        self._clock = clock
        self._on_result = on_result
        self._on_progress = on_progress
        self._process: HandlerProcess | None = None
        self._outcome: defer.Deferred | None = None
        self._cancelled = False
        self._limit_call = None
        #: Fires with the handler process once the attempt has one.
        self.started = defer.Deferred()

    def run(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._run())

    def pause(self) -> None:
        """Stop the attempt's process (SIGSTOP to its group) until :meth:`resume`."""
        self._paused = True
        if self._process is not None:
            self._process.pause()

    def resume(self) -> None:
        self._paused = False
        if self._process is not None:
            self._process.resume()

    def cancel(self) -> None:
        self._cancelled = True
        if self._process is not None:
            self._pool.discard(self._process)
        if self._outcome is not None and not self._outcome.called:
            self._outcome.callback(False)

    async def _run(self) -> bool:
        a = self._assignment
        process = await self._pool.acquire(self._job_type, self._limits)
        if self._cancelled:
            self._pool.release(process)
            return False
        self._process = process
        log.info(
            "job {job} attempt {attempt} runs in handler process {pid}", job=a.job, attempt=a.attempt, pid=process.pid
        )
        if self._paused:
            process.pause()
        pending = deque(record["i"] for record in a.records)
        outcome = self._outcome = defer.Deferred()

        def on_line(message: dict):
            if outcome.called:
                return
            if "out" in message or "error" in message:
                if not pending:
                    return end(AttemptFailed("the handler process gave more results than records"))
                self._on_result({"i": pending.popleft(), **message})
            elif "progress" in message:
                self._on_progress(str(message["progress"]))
            elif "done" in message:
                if pending:
                    return end(AttemptFailed(f"the handler process gave no result for {len(pending)} records"))
                outcome.callback(True)
            elif "failed" in message:
                end(AttemptFailed(str(message["failed"])))

        def end(failure: Exception):
            if not outcome.called:
                outcome.errback(failure)

        def died(cause: str):
            tail = process.stderr_tail()
            end(AttemptFailed(f"the handler process died ({cause})" + (f": {tail}" if tail else "")))

        process.on_line, process.on_end = on_line, died
        limit = a.timeout
        self._limit_call = self._clock.callLater(limit, end, AttemptFailed(f"run-time limit {limit:g} s"))
        job = {"job": a.job, "lease": a.lease, "attempt": a.attempt, "total": a.total, "params": a.params}
        if "cpu" in process.limits:
            job["cpu"] = process.limits["cpu"]
        if process.work_dir is not None and process.alive:
            job["cwd"] = os.path.join(process.work_dir, f"job-{a.job}.{a.attempt}")
            os.makedirs(job["cwd"], 0o700, exist_ok=True)
        process.send(job=job, records=list(a.records))
        self.started.callback(process)
        try:
            completed = await outcome
        except AttemptFailed:
            self._pool.discard(process)
            raise
        finally:
            # The process is no longer this attempt's: a late cancel (the
            # lease dropped after DONE) must not reach whoever reuses it.
            self._process = None
            if self._limit_call.active():
                self._limit_call.cancel()
            if process.work_dir is not None:
                Sandbox.empty_work_dir(process.work_dir)  # the next attempt starts with nothing of this one's
        if completed:
            self._pool.release(process)
        return completed
