"""A handler process: runs one job type's ``process`` for the worker, over its standard input and output.

Started by ``gridd.worker.pool`` as ``python -m gridd.worker.child SPEC``,
where SPEC is a JSON object::

    {"type": "module:Class", "limits": {...}, "cgroups": [PROCS_FILE, ...],
     "explain": {...}, "parent": PID, "confine": {"work": DIR, "network": BOOL}}

(``limits``: the rlimits to set; ``explain``: every limit of the process,
to name the one a failure passed; ``parent``: the worker's pid; ``confine``,
only in the sandbox: see below). The process first joins its control groups
(by writing its pid to each ``cgroup.procs`` file), leaves the worker's
process group (``setsid``), so that the worker can kill it with everything
it started, asks to be killed when the worker dies, then applies its
limits, loads the job type and says ``{"ready": {"pid": PID, ...}}``.

In the sandbox (``gridd.worker.sandbox``) the control groups were joined and
the session made before bubblewrap started, and the worker is not this
process's parent: the process skips those steps, and confines itself
(``gridd.worker.confine``: seccomp, Landlock) after its limits and before it
imports the job type's module, and its ready message says how
(``"confined": "seccomp filter, Landlock ABI 7"``). Each attempt then runs in the work
directory its ``job`` message names (``cwd``).

It then serves attempts, one at a time, one JSON line on standard input each:

- ``{"job": {"job": ID, "lease": L, "attempt": N, "total": T, "params": {...}, "cpu": S, "cwd": DIR},
  "records": [{"i": INDEX, "data": VALUE}, ...]}`` runs an attempt on its
  records, in order (``cpu``, optional: the attempt may use S more seconds
  of CPU time from now on, whatever earlier attempts used; ``cwd``,
  optional: the attempt's work directory);

and answers on standard output, one JSON line each:

- ``{"out": VALUE}`` or ``{"error": TEXT}``: the next record's result (an
  error result is what ``RecordError`` gives);
- ``{"progress": NOTE}``: the handler's progress note;
- ``{"done": true}`` once every record of the attempt has its result;
- ``{"failed": TEXT}``: the attempt failed (the handler raised anything but
  ``RecordError``, or gave an output that is not JSON). The worker then
  ends this process: a handler that failed may have left its state broken.

Standard error is the handler's own log; the worker keeps its last lines.
Whatever the handler prints to standard output itself is sent to standard
error instead, so that it cannot break the protocol. A result is written
before the next record starts (so that it survives a handler that then
crashes), and the last one together with ``done``.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import resource
import signal
import sys

__all__ = ["LIMITS", "allow_cpu", "apply_limits", "die_with_parent", "join_cgroups", "main"]

#: prctl's request to be sent a signal when the parent process dies.
PR_SET_PDEATHSIG = 1

#: The limits a handler process may be given, and the resource each sets.
LIMITS = {
    "memory": resource.RLIMIT_AS,  # MiB of address space
    "cpu": resource.RLIMIT_CPU,  # seconds of CPU time
    "files": resource.RLIMIT_NOFILE,  # open files
    "processes": resource.RLIMIT_NPROC,  # processes of this user
}


def apply_limits(limits: dict) -> None:
    """Set each limit given (None or absent: left as inherited) as both soft and hard limit.

    CPU time is the exception: only its soft limit is set, so that each
    attempt can be given its own allowance (:func:`allow_cpu`).
    """
    for name, value in limits.items():
        if value is None:
            continue
        if name == "cpu":
            allow_cpu(int(value))
            continue
        amount = int(value) * 1024 * 1024 if name == "memory" else int(value)
        resource.setrlimit(LIMITS[name], (amount, amount))


def allow_cpu(seconds: int) -> None:
    """Let this process use ``seconds`` more of CPU time, then SIGXCPU ends it."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = used + seconds
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def die_with_parent(parent: int | None) -> None:
    """Be killed when the worker dies, even by SIGKILL: a handler never outlives its worker (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # the worker died before the request took hold
        os._exit(1)


def join_cgroups(procs_files: list[str]) -> None:
    """Move this process into its control groups, before it runs anything it could leave them with."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


class Answers:
    """The protocol's side of standard output: lines kept until :meth:`flush` writes them in one go."""

    def __init__(self, fd: int):
        self._fd = fd
        self._lines: list[str] = []

    def write(self, line: str) -> None:
        self._lines.append(line)

    def flush(self) -> None:
        if not self._lines:
            return
        view = memoryview("".join(self._lines).encode("utf-8"))
        self._lines.clear()
        while view:
            view = view[os.write(self._fd, view) :]


def load_type(path: str):
    module, _, name = path.partition(":")
    factory = importlib.import_module(module)
    for part in name.split("."):
        factory = getattr(factory, part)
    return factory()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    join_cgroups(spec.get("cgroups") or [])
    confined = spec.get("confine")
    if not confined:
        os.setsid()
    die_with_parent(spec.get("parent"))
    limits = spec.get("limits") or {}
    apply_limits(limits)
    ready = {"pid": os.getpid()}
    if confined:
        from gridd.worker.confine import confine

        ready["confined"] = confine(confined["work"], network=bool(confined.get("network")))
    out = Answers(os.dup(1))
    os.dup2(2, 1)  # the handler's own prints go to the log, not into the protocol
    sys.stdout = sys.stderr

    from twisted.internet import defer, reactor, task

    from gridd.jobtypes import JobContext, RecordError

    job_type = load_type(spec["type"])

    def say(now=False, **message):
        out.write(json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n")
        if now:
            out.flush()

    named = spec.get("explain") or limits

    def explain(failure) -> str:
        said = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        if failure.check(MemoryError) and named.get("memory"):
            return f"memory limit {named['memory']} MiB ({failure.type.__name__})"
        if failure.check(BlockingIOError) and named.get("processes"):
            return f"process limit {named['processes']} ({said})"
        return said

    async def attempt(job: dict, records: list[dict]):
        context = JobContext(
            clock=reactor,
            job=job["job"],
            lease=job["lease"],
            attempt=job["attempt"],
            total=job["total"],
            report_progress=lambda note: say(progress=str(note), now=True),
        )
        for record in records:
            out.flush()  # the results so far leave before this record can crash the process
            context.index = record["i"]
            try:
                output = await defer.maybeDeferred(job_type.process, record["data"], job["params"], context)
            except RecordError as e:
                say(error=str(e) or type(e).__name__)
                continue
            try:
                line = json.dumps({"out": output}, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise TypeError(f"the job type's output is not a JSON value: {e}") from None
            out.write(line + "\n")
        say(done=True, now=True)

    def failed(failure):
        failure.printTraceback(file=sys.stderr)
        say(failed=explain(failure), now=True)

    def serve(done):
        for raw in sys.stdin:
            message = json.loads(raw)
            job = message["job"]
            if job.get("cpu"):
                allow_cpu(int(job["cpu"]))
            if job.get("cwd"):
                os.chdir(job["cwd"])
            yield defer.Deferred.fromCoroutine(attempt(job, message["records"])).addErrback(failed)
        done.callback(None)

    say(ready={**ready, "type": job_type.name, "version": job_type.version}, now=True)

    def run(_reactor):
        done = defer.Deferred()
        defer.inlineCallbacks(serve)(done)
        return done

    task.react(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
