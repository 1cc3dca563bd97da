"""Running one leased job: its records, in index order, through its job type.

:class:`JobRunner` knows nothing of connections or leases' fate: it hands each
record's result to a callback the moment it exists (the worker core streams
it to the server) and tells, through the Deferred of :meth:`JobRunner.run`,
whether the attempt completed, was cancelled, or failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.python.threadpool import ThreadPool

from gridd.jobtypes import JobContext, RecordError

__all__ = ["Assignment", "AttemptFailed", "JobRunner", "PoolThreads", "InlineThreads"]


class AttemptFailed(Exception):
    """An attempt failed for a cause outside the job type's code, which the message names.

    A handler process that exited or was killed ("exit code 3", "killed by
    SIGSEGV"), a limit passed ("memory limit 512 MiB", "run-time limit
    600 s"), a command's output that breaks its contract. The FAIL sent to
    the server carries the message as it is.
    """


@dataclass(frozen=True)
class Assignment:
    """A ``JOB`` message: one attempt at a job, handed to this worker under a lease."""

    job: int
    lease: str
    type: str
    attempt: int
    params: dict
    total: int
    #: ``({"i": INDEX, "data": VALUE}, ...)``: only the records still without a result.
    records: tuple
    timeout: float
    #: MiB of memory the job requires, and so may use (0: it says nothing).
    memory: int = 0

    @classmethod
    def from_body(cls, body: dict) -> Assignment:
        return cls(
            job=body["job"],
            lease=body["lease"],
            type=body["type"],
            attempt=body["attempt"],
            params=body["params"],
            total=body["total"],
            records=tuple(body["records"]),
            timeout=body["timeout"],
            memory=body.get("memory") or 0,
        )


class PoolThreads:
    """Runs threaded job types in a thread pool the worker service owns."""

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool):
        self._reactor = reactor
        self._pool = pool

    def run(self, f: Callable, *args) -> defer.Deferred:
        return threads.deferToThreadPool(self._reactor, self._pool, f, *args)

    def call_from_thread(self, f: Callable, *args) -> None:
        self._reactor.callFromThread(f, *args)


class InlineThreads:
    """Runs "threaded" job types on the calling thread: for tests and embedding."""

    def run(self, f: Callable, *args) -> defer.Deferred:
        return defer.maybeDeferred(f, *args)

    def call_from_thread(self, f: Callable, *args) -> None:
        f(*args)


class JobRunner:
    """Processes an assignment's records one at a time, streaming each result.

    ``on_result`` receives ``{"i": INDEX, "out": VALUE}`` or
    ``{"i": INDEX, "error": TEXT}`` as each record finishes. A job type that
    runs on the reactor and returns at once would otherwise hold the reactor
    for the whole job: after ``time_slice`` seconds of such work the runner
    yields to the reactor, so heartbeats and replies keep flowing and the
    results of one slice go out together.
    """

    def __init__(
        self,
        job_type: Any,
        assignment: Assignment,
        *,
        clock: IReactorTime,
        threads: PoolThreads | InlineThreads,
        on_result: Callable[[dict], None],
        on_progress: Callable[[str], None] = lambda note: None,
        time_slice: float = 0.05,
    ):
        self._job_type = job_type
        self._assignment = assignment
        self._clock = clock
        self._threads = threads
        self._on_result = on_result
        self._time_slice = time_slice
        self._threaded = bool(getattr(job_type, "threaded", False))
        report = on_progress
        if self._threaded:
            report = lambda note: threads.call_from_thread(on_progress, note)  # noqa: E731
        self.context = JobContext(
            clock=clock,
            job=assignment.job,
            lease=assignment.lease,
            attempt=assignment.attempt,
            total=assignment.total,
            report_progress=report,
        )
        self._current: defer.Deferred | None = None
        self._cancelled = False
        #: While paused: fires on resume.
        self._resumed: defer.Deferred | None = None

    def run(self) -> defer.Deferred:
        """Process every record; fires True when done, False when cancelled.

        Fails with the job type's exception when the attempt failed.
        """
        return defer.Deferred.fromCoroutine(self._run())

    def pause(self) -> None:
        """Take no further record until :meth:`resume` (a record already running finishes: threads cannot stop)."""
        if self._resumed is None:
            self._resumed = defer.Deferred()

    def resume(self) -> None:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def cancel(self) -> None:
        """Stop at the current record; its result, if it comes, is dropped.

        A threaded record cannot be interrupted: its thread finishes in the
        background and its result is ignored.
        """
        self._cancelled = True
        if self._current is not None:
            self._current.cancel()

    async def _run(self) -> bool:
        slice_start = self._clock.seconds()
        for record in self._assignment.records:
            if self._resumed is not None:
                try:
                    await self._wait(self._resumed)
                except defer.CancelledError:
                    return False
            if self._cancelled:
                return False
            index = record["i"]
            self.context.index = index
            processing = self._process(record["data"])
            waited = not processing.called
            try:
                body = await self._wait(processing)
            except defer.CancelledError:
                if self._cancelled:
                    return False
                raise
            if self._cancelled:
                return False
            self._on_result({"i": index, **body})
            if waited:
                slice_start = self._clock.seconds()
            elif self._clock.seconds() - slice_start >= self._time_slice:
                try:
                    await self._wait(task.deferLater(self._clock, 0))
                except defer.CancelledError:
                    return False
                slice_start = self._clock.seconds()
        return True

    async def _wait(self, d: defer.Deferred):
        """Await ``d`` where :meth:`cancel` can reach it."""
        self._current = d
        try:
            return await d
        finally:
            self._current = None

    def _process(self, data) -> defer.Deferred:
        """One record's result body: fires with ``{"out": ...}`` or ``{"error": ...}``."""
        process = self._job_type.process
        params, context = self._assignment.params, self.context
        if self._threaded:
            d = self._threads.run(process, data, params, context)
        else:
            d = defer.maybeDeferred(process, data, params, context)
        return d.addCallbacks(_output, _record_error)


def _output(out) -> dict:
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"the job type's output is not a JSON value: {e}") from None
    return {"out": out}


def _record_error(failure):
    failure.trap(RecordError)
    return {"error": str(failure.value) or type(failure.value).__name__}
