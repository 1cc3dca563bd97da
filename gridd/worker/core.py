"""The worker's state that outlives connections: its leases and their results.

:class:`WorkerCore` is driven by three kinds of input, grouped below by who
calls them: the connection (attached after a handshake, detached when it
closes), the server's notifications (``JOB``, ``REVOKE``, ``DRAIN``) and the
job runners (a result, a completion, a failure). It talks to the server only
through the small :class:`ServerConnection` interface, which
``gridd.worker.protocol.WorkerProtocol`` implements over the wire.

Per lease it keeps a :class:`Holding`: the runner, the results not yet
acknowledged, and the attempt's outcome. Results go out as they are produced,
those of one reactor turn in one ``RESULT``; the last ones ride in ``DONE``.
While disconnected, jobs keep running and results accumulate; after the
reconnect handshake (PROTOCOL.md 6.2) only those the server lists in ``todo``
are sent, and leases it lists in ``lost`` are stopped and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from gridd import errors, wire
from gridd.peer import ConnectionDropped
from gridd.worker.holding import Holding
from gridd.worker.runner import Assignment, AttemptFailed, InlineThreads, JobRunner, PoolThreads

__all__ = ["ServerConnection", "WorkerCore"]

#: RESULT requests one lease may have awaiting a reply; later results wait
#: and go out together, so a slow store means fewer, larger messages. Past
#: the first, a request goes only with a full share of the line's budget
#: (budget / RESULT_WINDOW): results that trickle in (a handler process's,
#: one pipe read at a time) wait for the reply in flight and go together.
RESULT_WINDOW = 4
#: Room for the verb, rid, job id and lease around a message's results.
ENVELOPE_BYTES = 512
#: Seconds before resending what the server could not store (``unavailable``).
RETRY_DELAY = 1.0
#: Longest error text or progress note sent (the wire allows more; people read these).
MAX_TEXT = 4096


class ServerConnection(Protocol):
    """What the core needs from a connection to the server.

    Each ``send_*`` method sends one request and returns its Deferred: it
    fires with the ``OK`` body, or fails with the ``GriddError`` of the
    ``ERR`` reply, or with ``ConnectionDropped``.
    """

    #: The longest line the server accepts.
    max_line: int

    def send_results(self, job: int, lease: str, results: list) -> defer.Deferred: ...

    def send_done(self, job: int, lease: str, results: list) -> defer.Deferred: ...

    def send_fail(self, job: int, lease: str, error: str, retry: bool) -> defer.Deferred: ...

    def send_return(self, job: int, lease: str, reason: str, vacate: bool = False) -> defer.Deferred: ...

    def send_progress(self, job: int, lease: str, note: str) -> defer.Deferred: ...

    def send_state(self, state: str, reason: str) -> defer.Deferred: ...

    def send_check(self, holding: list[dict]) -> defer.Deferred: ...

    def drop(self) -> None:
        """Close the connection at once; the worker reconnects, and the next HELLO settles its leases."""


def _pause(runner) -> None:
    """Pause a runner that can be paused (a job type's own runner may not)."""
    if runner is not None and hasattr(runner, "pause"):
        runner.pause()


def _resume(runner) -> None:
    if runner is not None and hasattr(runner, "resume"):
        runner.resume()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


class WorkerCore:
    """Runs the jobs pushed to this worker and reports them, across connections.

    ``job_types`` maps names to job type instances; ``threads`` runs threaded
    job types (a :class:`PoolThreads` in the service, :class:`InlineThreads`
    in tests). ``make_runner(job_type, assignment, on_result=, on_progress=)``
    builds the runner of one attempt (an object with ``run()``, firing True
    when done and False when cancelled, and ``cancel()``); by default a
    :class:`JobRunner` on ``threads``. A job type with a ``runner`` method
    (the built-in ``command`` type, say) builds its own: ``runner(assignment,
    clock=, on_result=, on_progress=)``. ``on_drained_idle`` is called once the server has drained the
    worker and no lease is left (``--exit-when-drained`` stops the reactor).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        job_types: dict[str, Any],
        slots: int,
        *,
        memory: int = 0,
        tags: Iterable[str] = (),
        threads: PoolThreads | InlineThreads | None = None,
        make_runner: Callable[..., Any] | None = None,
        on_drained_idle: Callable[[], None] | None = None,
    ):
        self.clock = clock
        self.job_types = dict(job_types)
        self.slots = slots
        self.memory = memory
        self.tags = list(tags)
        self.threads = threads or InlineThreads()
        self.make_runner = make_runner or self._thread_runner
        self.on_drained_idle = on_drained_idle
        self.drained = False
        self.returning = False
        self._holdings: dict[str, Holding] = {}
        self._connection: ServerConnection | None = None
        self._max_line = wire.DEFAULT_MAX_LINE
        self._idle_waiters: list[defer.Deferred] = []
        #: The host's state as this worker sees it: "idle", "busy" or "vacating" (STATE).
        self.host_state = "idle"
        self.host_reason = ""
        #: Why running attempts are paused now ("host", "check"); empty: they run.
        self._pauses: set[str] = set()
        #: After a suspend, until the server has said which leases are still ours: nothing is reported.
        self.checking = False
        #: The heartbeat deadline and beat the server last said (its HELLO reply).
        self.server_deadline = math.inf
        self.server_beat = 0.0
        #: Counts lease checks: only the answer to the latest ends one.
        self._check_number = 0
        #: Called with (busy, reason) when the server relays the host-side signal (HOST).
        self.on_host_signal: Callable[[bool, str], None] | None = None

    # -- what the HELLO says -------------------------------------------------

    def type_versions(self) -> dict[str, str]:
        return {name: job_type.version for name, job_type in self.job_types.items()}

    def holding(self) -> list[dict]:
        """The leases to list in a reconnecting HELLO, oldest first."""
        return [{"job": h.job, "lease": h.lease} for h in self._holdings.values()]

    @property
    def holdings(self) -> dict[str, Holding]:
        """The leases held now, by lease token (read only)."""
        return dict(self._holdings)

    @property
    def connected(self) -> bool:
        return self._connection is not None

    # -- from the connection ------------------------------------------------

    def attach(self, connection: ServerConnection, welcome: dict) -> None:
        """A handshake succeeded: settle held leases by the reply, then report."""
        self._connection = connection
        self._max_line = connection.max_line
        self.server_deadline = float(welcome.get("deadline") or math.inf)
        self.server_beat = float(welcome.get("beat") or 0.0)
        self._settle(welcome, set(self._holdings), reconnected=True)
        if self.host_state == "vacating":  # the HELLO could only say busy
            self._send_state(connection)
        self._end_check()
        for holding in list(self._holdings.values()):
            self._flush(holding)

    @property
    def silence_allowed(self) -> float:
        """Seconds this worker may go unheard before its server may end its leases: a stop shorter loses nothing.

        The server's deadline counts from the last line it heard, which can be
        up to a beat before the stop began.
        """
        return self.server_deadline - self.server_beat

    def _settle(self, reply: dict, listed: set[str], reconnected: bool) -> None:
        """Keep the ``listed`` leases the reply (HELLO's or CHECK's) lists in ``kept``; drop the other listed ones.

        After a reconnect nothing is in flight any more; after a CHECK on the
        same connection, requests still in flight are answered later.
        """
        kept = {k["lease"]: k for k in reply.get("kept") or ()}
        lost = {k["lease"]: k for k in reply.get("lost") or ()}
        for holding in list(self._holdings.values()):
            if holding.lease not in listed:
                continue
            if holding.lease in kept:
                todo = kept[holding.lease].get("todo") or ()
                holding.reattach(todo) if reconnected else holding.recheck(todo)
                self.log.info(
                    "lease {lease} of job {job} kept: {n} records to report",
                    lease=holding.lease,
                    job=holding.job,
                    n=len(holding.todo),
                )
            else:
                reason = lost.get(holding.lease, {}).get("reason", "not kept")
                self.log.info(
                    "lease {lease} of job {job} lost: {reason}", lease=holding.lease, job=holding.job, reason=reason
                )
                self._drop(holding)

    def detach(self, connection: ServerConnection) -> None:
        """The connection is gone; jobs keep running and results wait for the next."""
        if self._connection is not connection:
            return
        self._connection = None
        if self._holdings:
            self.log.info("disconnected: {n} leases held until the server answers again", n=len(self._holdings))
        if self.returning:
            self._fire_idle_waiters()

    # -- from the server -----------------------------------------------------

    def start_job(self, assignment: Assignment) -> None:
        """``JOB``: run it, unless it cannot be run here."""
        if assignment.lease in self._holdings:
            self.log.warn("JOB repeats lease {lease} of job {job}: ignored", lease=assignment.lease, job=assignment.job)
            return
        for old in [h for h in self._holdings.values() if h.job == assignment.job]:
            self.log.info("lease {lease} of job {job} superseded", lease=old.lease, job=old.job)
            self._drop(old)
        holding = self._holdings[assignment.lease] = Holding(assignment, started=self.clock.seconds())
        if self.returning:
            self._conclude(holding, "RETURN", "worker is shutting down")
            return
        if self.host_state != "idle":  # sent before the server heard the host is busy
            self._conclude(holding, "RETURN", f"the host is busy: {self.host_reason}", vacate=True)
            return
        job_type = self.job_types.get(assignment.type)
        if job_type is None:
            self._conclude(holding, "FAIL", f"worker has no job type {assignment.type!r}")
            return
        if len(self._holdings) > self.slots:
            self.log.warn("job {job} runs beyond the {slots} slots offered", job=assignment.job, slots=self.slots)
        self.log.info(
            "job {job} attempt {attempt} ({type}, {n} records) under lease {lease}",
            job=assignment.job,
            attempt=assignment.attempt,
            type=assignment.type,
            n=len(assignment.records),
            lease=assignment.lease,
        )
        report = dict(
            on_result=lambda result: self._result(holding, result),
            on_progress=lambda note: self._progress(holding, note),
        )
        own = getattr(job_type, "runner", None)
        if own is not None:
            holding.runner = own(assignment, clock=self.clock, **report)
        else:
            holding.runner = self.make_runner(job_type, assignment, **report)
        holding.runner.run().addCallbacks(
            self._runner_finished, self._runner_failed, callbackArgs=(holding,), errbackArgs=(holding,)
        )
        if self._pauses:
            _pause(holding.runner)

    def _thread_runner(self, job_type, assignment: Assignment, *, on_result, on_progress) -> JobRunner:
        return JobRunner(
            job_type, assignment, clock=self.clock, threads=self.threads, on_result=on_result, on_progress=on_progress
        )

    def revoke(self, job: int, lease: str, reason: str) -> None:
        """``REVOKE``: the lease ended; stop the job and drop its results."""
        holding = self._holdings.get(lease)
        if holding is None or holding.job != job:
            self.log.info("REVOKE of lease {lease} of job {job}, which is not held: ignored", lease=lease, job=job)
            return
        self.log.info("lease {lease} of job {job} revoked: {reason}", lease=lease, job=job, reason=reason)
        self._drop(holding)

    def set_drained(self, drained: bool) -> None:
        """``DRAIN``: no new jobs will come; finish the running ones."""
        if drained == self.drained:
            return
        self.drained = drained
        if drained:
            self.log.info("drained by the server: finishing {n} running jobs", n=len(self._holdings))
            self._check_idle()
        else:
            self.log.info("undrained by the server: taking jobs again")

    def host_signal(self, busy: bool, reason: str = "") -> None:
        """``HOST``: the server relays the host-side signal (an operator's ``gridctl worker busy|idle``)."""
        self.log.info("the server says the host is {state}", state="busy" if busy else "idle")
        if self.on_host_signal is not None:
            self.on_host_signal(busy, reason)

    # -- from the host -------------------------------------------------------

    def set_host_state(self, state: str, reason: str = "") -> None:
        """The host is ``idle``, ``busy`` or ``vacating`` (its jobs paused): say it to the server (STATE).

        While the host is not idle, a ``JOB`` the server sent before it heard
        is given straight back (RETURN vacate).
        """
        if (state, reason) == (self.host_state, self.host_reason):
            return
        self.host_state, self.host_reason = state, reason
        if self._connection is not None:
            self._send_state(self._connection)

    def pause(self, why: str) -> None:
        """Stop every running attempt (its handler process gets SIGSTOP) until :meth:`resume` with the same ``why``."""
        if not self._pauses:
            for holding in self._holdings.values():
                _pause(holding.runner)
        self._pauses.add(why)

    def resume(self, why: str) -> None:
        """Undo one :meth:`pause`; attempts run again once no reason to pause is left."""
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if not self._pauses:
            for holding in self._holdings.values():
                _resume(holding.runner)

    def vacate(self, reason: str) -> None:
        """Give every running job back (RETURN with vacate): the host stayed busy past the grace period."""
        for holding in list(self._holdings.values()):
            if holding.outcome is None:
                if holding.runner is not None:
                    holding.runner.cancel()
                self._conclude(holding, "RETURN", reason, vacate=True)

    def check_leases(self, how: str) -> None:
        """After a suspend (``how`` says what happened): pause every attempt, send nothing, ask the server (CHECK).

        Leases the server no longer counts as this worker's are dropped with
        their results unsent; the others resume. Without a connection, the
        next handshake's reply answers the same question.
        """
        if not self._holdings:
            self.log.info("{how}; no job was running", how=how)
            return
        self.log.info(
            "{how}: {n} jobs paused until the server says which leases are still ours", how=how, n=len(self._holdings)
        )
        self.pause("check")
        self.checking = True
        self._check_number += 1
        if self._connection is not None:
            connection, listed, number = self._connection, set(self._holdings), self._check_number
            d = connection.send_check(self.holding())
            d.addCallbacks(
                self._checked,
                self._check_failed,
                callbackArgs=(connection, listed, number),
                errbackArgs=(connection, number),
            )

    def _checked(self, reply: dict, connection: ServerConnection, listed: set[str], number: int) -> None:
        if connection is not self._connection:
            return  # a reconnect's handshake settled the leases
        if number != self._check_number or not self.checking:
            # An earlier check's answer: a later suspend asked again. What it
            # says is lost is lost; what it keeps waits for the latest answer.
            self._settle({"lost": reply.get("lost") or ()}, {k["lease"] for k in reply.get("lost") or ()}, False)
            return
        self._settle(reply, listed, reconnected=False)
        self._end_check()

    def _check_failed(self, failure: Failure, connection: ServerConnection, number: int) -> None:
        if failure.check(ConnectionDropped) or connection is not self._connection or number != self._check_number:
            return  # the next handshake, or the latest check, answers
        if not self.checking:
            return
        # Going on could spend CPU on work no longer ours: reconnect instead,
        # and let the HELLO's reply (kept, lost) settle every lease.
        self.log.warn(
            "the server did not answer the lease check ({f.value}): reconnecting so that the handshake settles "
            "the leases",
            f=failure,
        )
        connection.drop()

    def _end_check(self) -> None:
        """The leases are settled: the kept ones run and report again."""
        if not self.checking:
            return
        self.checking = False
        self.resume("check")
        for holding in list(self._holdings.values()):
            self._flush(holding)

    def _send_state(self, connection: ServerConnection) -> None:
        d = connection.send_state(self.host_state, self.host_reason)
        d.addErrback(self._state_refused, self.host_state)

    def _state_refused(self, failure: Failure, state: str) -> None:
        if not failure.check(ConnectionDropped):  # else the next HELLO says it
            self.log.warn("the server refused STATE {state}: {f.value}", state=state, f=failure)

    # -- shutting down -------------------------------------------------------

    def return_all(self, reason: str) -> defer.Deferred:
        """Give every running job back, and fire once all leases are settled.

        Results already produced are reported first; a job already finished
        waits for its DONE or FAIL reply. Without a connection nothing can be
        said: the Deferred fires at once (the server will expire the leases),
        and if the connection goes meanwhile it fires then.
        """
        self.returning = True
        for holding in list(self._holdings.values()):
            if holding.runner is not None:
                holding.runner.cancel()
            self._conclude(holding, "RETURN", reason)
        if self._connection is None:
            return defer.succeed(None)
        return self.when_idle()

    def when_idle(self) -> defer.Deferred:
        """Fires once no lease is held."""
        if not self._holdings:
            return defer.succeed(None)
        d = defer.Deferred(self._idle_waiters.remove)
        self._idle_waiters.append(d)
        return d

    # -- from the runners ----------------------------------------------------

    def _result(self, holding: Holding, result: dict) -> None:
        if not self._holds(holding):
            return
        holding.add_result(result, self._budget())
        if holding.flush_call is None:
            holding.flush_call = self.clock.callLater(0, self._flush, holding)

    def _runner_finished(self, completed: bool, holding: Holding) -> None:
        if completed and self._holds(holding):
            self._conclude(holding, "DONE")

    def _runner_failed(self, failure: Failure, holding: Holding) -> None:
        if not self._holds(holding):
            return
        self.log.failure(
            "job {job} attempt {attempt} failed",
            failure,
            LogLevel.warn,
            job=holding.job,
            attempt=holding.assignment.attempt,
        )
        if failure.check(AttemptFailed):
            detail = failure.getErrorMessage()  # says its cause itself: "exit code 3", "run-time limit 600 s"
        else:
            detail = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self._conclude(holding, "FAIL", _clip(detail))

    def _progress(self, holding: Holding, note: str) -> None:
        if not self._holds(holding) or holding.outcome is not None:
            return
        holding.progress_note = _clip(note)
        if not holding.progress_in_flight and self._connection is not None and not self.checking:
            self._send_progress(holding)

    # -- reporting -----------------------------------------------------------

    def _conclude(self, holding: Holding, outcome: str, detail: str = "", vacate: bool = False) -> None:
        if holding.finish(outcome, detail):
            holding.vacate = vacate
            self._flush(holding)

    def _budget(self) -> int:
        return self._max_line - ENVELOPE_BYTES

    def _flush(self, holding: Holding) -> None:
        """Send what can be sent now: results, then the outcome once they are in."""
        if holding.flush_call is not None and holding.flush_call.active():
            holding.flush_call.cancel()
        holding.flush_call = None
        connection = self._connection
        if connection is None or self.checking or holding.final_in_flight or not self._holds(holding):
            return
        budget = self._budget()
        done = holding.outcome == "DONE"
        while holding.unsent and holding.in_flight < RESULT_WINDOW:
            if done and holding.unsent_fit(budget):
                break  # the last results ride in DONE
            if holding.in_flight and holding.unsent_fit(budget // RESULT_WINDOW):
                break  # a few small results: they wait for the reply in flight
            self._send_results(connection, holding, holding.pop_batch(budget))
        if holding.outcome is None or holding.in_flight or (holding.unsent and not done):
            return
        self._send_final(connection, holding, holding.pop_batch(budget) if done else [])

    def _send_results(self, connection: ServerConnection, holding: Holding, results: list) -> None:
        holding.in_flight += 1
        d = connection.send_results(holding.job, holding.lease, results)
        d.addCallbacks(
            self._results_accepted,
            self._results_refused,
            callbackArgs=(holding, results),
            errbackArgs=(holding, results),
        )

    def _results_accepted(self, reply: dict, holding: Holding, results: list) -> None:
        holding.in_flight -= 1
        holding.acknowledge(results)
        self._flush(holding)

    def _results_refused(self, failure: Failure, holding: Holding, results: list) -> None:
        holding.in_flight -= 1
        self._refused(failure, holding, results, "RESULT")

    def _send_final(self, connection: ServerConnection, holding: Holding, results: list) -> None:
        holding.final_in_flight = True
        if holding.outcome == "DONE":
            d = connection.send_done(holding.job, holding.lease, results)
        elif holding.outcome == "FAIL":
            d = connection.send_fail(holding.job, holding.lease, holding.detail, True)
        else:
            d = connection.send_return(holding.job, holding.lease, holding.detail, holding.vacate)
        d.addCallbacks(
            self._final_accepted,
            self._final_refused,
            callbackArgs=(holding,),
            errbackArgs=(holding, results),
        )

    def _final_accepted(self, reply: dict, holding: Holding) -> None:
        if not self._holds(holding):
            return
        if holding.outcome == "DONE":
            self.log.info("job {job} done", job=holding.job)
        elif holding.outcome == "FAIL":
            self.log.info("job {job} failed: {state}", job=holding.job, state=reply.get("state", "?"))
        else:
            self.log.info("job {job} returned: {reason}", job=holding.job, reason=holding.detail)
        self._drop(holding)

    def _final_refused(self, failure: Failure, holding: Holding, results: list) -> None:
        holding.final_in_flight = False
        self._refused(failure, holding, results, holding.outcome)

    def _refused(self, failure: Failure, holding: Holding, results: list, verb: str) -> None:
        """A request about ``holding`` came to nothing: decide what happens next."""
        if not self._holds(holding):
            return
        if failure.check(ConnectionDropped):
            holding.unsend(results)  # sent again on reconnect, if still wanted
            return
        error = failure.value if failure.check(errors.GriddError) else errors.GriddError(failure.getErrorMessage())
        if isinstance(error, (errors.StaleLease, errors.UnknownJob)):
            self._lease_refused(holding, error.code)
        elif isinstance(error, (errors.DuplicateResult, errors.UnknownRecord)):
            records = error.extra.get("records") or []
            self.log.warn(
                "job {job}: server refused {verb} for records {records}: {code}; sending the others again",
                job=holding.job,
                verb=verb,
                records=records,
                code=error.code,
            )
            holding.unsend(results)
            holding.forget(records if records else [r["i"] for r in results])
            self._flush(holding)
        elif isinstance(error, (errors.Unavailable, errors.ShuttingDown, errors.TooMany)):
            # Nothing was changed; try again a little later (too_many: a connection limit, PROTOCOL.md 12).
            holding.unsend(results)
            if holding.retry_call is None or not holding.retry_call.active():
                holding.retry_call = self.clock.callLater(RETRY_DELAY, self._flush, holding)
        elif verb in ("RESULT", "DONE"):
            # The server will not take this attempt's results: end the attempt
            # (bounded by the job's retries) rather than offer them forever.
            self.log.warn(
                "job {job}: server refused {verb}: {code}: {message}",
                job=holding.job,
                verb=verb,
                code=error.code,
                message=error.message,
            )
            if holding.runner is not None:
                holding.runner.cancel()
            holding.outcome = None
            self._conclude(holding, "FAIL", f"server refused {verb}: {error.code}: {error.message}")
        else:
            self.log.error(
                "job {job}: server refused {verb}: {code}: {message}; dropping the lease",
                job=holding.job,
                verb=verb,
                code=error.code,
                message=error.message,
            )
            self._drop(holding)

    def _lease_refused(self, holding: Holding, code: str) -> None:
        self.log.warn(
            "lease {lease} of job {job} refused by server: {code}", lease=holding.lease, job=holding.job, code=code
        )
        self._drop(holding)

    def _send_progress(self, holding: Holding) -> None:
        note, holding.progress_note = holding.progress_note, None
        holding.progress_in_flight = True
        d = self._connection.send_progress(holding.job, holding.lease, note)
        d.addBoth(self._progress_answered, holding)

    def _progress_answered(self, result, holding: Holding) -> None:
        holding.progress_in_flight = False
        if not self._holds(holding):
            return
        if isinstance(result, Failure):
            if result.check(errors.StaleLease):
                self._lease_refused(holding, result.value.code)
                return
            if not result.check(ConnectionDropped):
                self.log.info("job {job}: PROGRESS refused: {f.value}", job=holding.job, f=result)
        if (
            holding.progress_note is not None
            and holding.outcome is None
            and self._connection is not None
            and not self.checking
        ):
            self._send_progress(holding)

    # -- bookkeeping ---------------------------------------------------------

    def _holds(self, holding: Holding) -> bool:
        return self._holdings.get(holding.lease) is holding

    def _drop(self, holding: Holding) -> None:
        """Forget a lease: its runner stops and its unsent results are dropped."""
        if not self._holds(holding):
            return
        del self._holdings[holding.lease]
        holding.stop()
        self._check_idle()

    def _check_idle(self) -> None:
        if self._holdings:
            return
        self._fire_idle_waiters()
        # While returning, the worker is already stopping: exiting again would fail.
        if self.drained and not self.returning and self.on_drained_idle is not None:
            self.log.info("drained and idle: exiting")
            callback, self.on_drained_idle = self.on_drained_idle, None
            callback()

    def _fire_idle_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)
