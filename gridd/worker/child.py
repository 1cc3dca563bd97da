"""A handler process: runs one job type's ``process`` for the worker, over its standard input and output.

Started by ``gridd.worker.pool`` as ``python -m gridd.worker.child SPEC``,
where SPEC is a JSON object: ``{"type": "module:Class", "limits": {...}}``.
The process first leaves the worker's process group (``setsid``), so that
the worker can kill it with everything it started, then applies its
limits, loads the job type and says ``{"ready": {"pid": PID}}``.

It then serves attempts, one at a time, as JSON lines on standard input:

- ``{"job": {"job": ID, "lease": L, "attempt": N, "total": T, "params": {...}}}``
  starts an attempt;
- ``{"record": {"i": INDEX, "data": VALUE}}`` is one record of it, in order;
- ``{"end": true}`` ends its records.

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
error instead, so that it cannot break the protocol.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys

__all__ = ["LIMITS", "apply_limits", "main"]

#: The limits a handler process may be given, and the resource each sets.
LIMITS = {
    "memory": resource.RLIMIT_AS,  # MiB of address space
    "cpu": resource.RLIMIT_CPU,  # seconds of CPU time
    "files": resource.RLIMIT_NOFILE,  # open files
    "processes": resource.RLIMIT_NPROC,  # processes of this user
}


def apply_limits(limits: dict) -> None:
    """Set each limit given (None or absent: left as inherited) as both soft and hard limit."""
    for name, value in limits.items():
        if value is None:
            continue
        amount = int(value) * 1024 * 1024 if name == "memory" else int(value)
        resource.setrlimit(LIMITS[name], (amount, amount))


def load_type(path: str):
    module, _, name = path.partition(":")
    factory = importlib.import_module(module)
    for part in name.split("."):
        factory = getattr(factory, part)
    return factory()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    os.setsid()
    limits = spec.get("limits") or {}
    apply_limits(limits)
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # the handler's own prints go to the log, not into the protocol
    sys.stdout = sys.stderr

    from twisted.internet import defer, reactor, task

    from gridd.jobtypes import JobContext, RecordError

    job_type = load_type(spec["type"])

    def say(**message):
        out.write(json.dumps(message, separators=(",", ":"), allow_nan=False) + "\n")

    def explain(failure) -> str:
        if failure.check(MemoryError) and limits.get("memory"):
            return f"memory limit {limits['memory']} MiB ({failure.type.__name__})"
        return f"{failure.type.__name__}: {failure.getErrorMessage()}"

    async def attempt(job: dict, records: list[dict]):
        context = JobContext(
            clock=reactor,
            job=job["job"],
            lease=job["lease"],
            attempt=job["attempt"],
            total=job["total"],
            report_progress=lambda note: say(progress=str(note)),
        )
        for record in records:
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
        say(done=True)

    def failed(failure):
        failure.printTraceback(file=sys.stderr)
        say(failed=explain(failure))

    def serve(done):
        job, records = None, []
        for raw in sys.stdin:
            message = json.loads(raw)
            if "job" in message:
                job, records = message["job"], []
            elif "record" in message:
                records.append(message["record"])
            elif "end" in message:
                yield defer.Deferred.fromCoroutine(attempt(job, records)).addErrback(failed)
        done.callback(None)

    say(ready={"pid": os.getpid(), "type": job_type.name, "version": job_type.version})

    def run(_reactor):
        done = defer.Deferred()
        defer.inlineCallbacks(serve)(done)
        return done

    task.react(run)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
