"""Leases: granting them, fencing requests by them, ending them, and their run-time limits.

Rules this module owns:

- A lease is granted by the store's ``grant``, which takes the job's
  attempt count and the records still without a result from the store
  itself, in the claiming transaction: the job is offered to its worker
  only once that has committed, with exactly those records.
- A request that names a lease is served only if the lease is its job's
  current lease, held by the connection that sends it, and not closing;
  otherwise it is refused as stale (or unknown), and changes nothing.
- A lease ends in memory at once (it is stale from then on and its slot is
  free); the job's next state is applied when the store has committed it.
- Every write under a lease gives the same answer when it is repeated with
  the same lease, so an answer lost with the database connection ("commit
  unknown") is settled by making the same write again: a grant by the
  scheduler itself, after a pause; a DONE, FAIL or RETURN by the worker,
  which sends it again (the lease is ``IN_DOUBT`` meanwhile); a lease's end
  by the scheduler, which records it again until the store answers.
- A lease whose job was never offered (ended while ``CLAIMING``) costs no
  attempt; its end is recorded once its grant has answered, so that the
  attempt count it writes is the store's.
- A job that fails or loses its worker goes back to the queue while it has
  attempts left (``1 + retries`` in all), after a backoff that doubles with
  each attempt; then it fails. A failure (FAIL, run-time limit) that makes
  it poison ends it so at once (``gridd.scheduler.poison`` judges).
- A job its worker gives back (RETURN) is queued again at once, kept from
  that worker for ``return_delay`` seconds from the commit
  (``gridd.scheduler.queue``); this server knows only of the RETURNs made
  to it. A vacate (RETURN with ``vacate``: the worker's host stayed busy) is
  the same, recorded in the job's history as ``vacated``; neither uses an
  attempt.
- The run-time limit of an attempt counts from its grant, across reattaches,
  and is judged as a heartbeat deadline is (a DONE sent in time but not yet
  read is taken).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridd import errors
from gridd.deadline import Deadline
from gridd.scheduler.connection import JobOffer
from gridd.scheduler.model import Job, Lease, LeaseState, Worker
from gridd.scheduler.rates import Complaint

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["Leases"]

log = Logger()

#: How many ended leases are remembered, to tell a late worker why its lease ended.
ENDED_KEPT = 100_000


class Leases:
    """Every lease this server has granted or taken over, and their ends."""

    def __init__(self, core: Dispatcher):
        self.core = core
        #: Why recently ended leases ended, for a reconnecting worker's ``lost``.
        self.ended: OrderedDict[str, str] = OrderedDict()
        #: The store could not record the last lease tried (an outage, said once).
        self._grants_failing = False
        self._ends_trouble = Complaint(core.clock, "recording the end of leases")

    # ------------------------------------------------------------------
    # granting

    def grant(self, worker: Worker, job: Job):
        """Claim ``job`` for ``worker`` in the store; offer it once the claim has committed.

        The slot is taken at once, so one dispatch round does not hand a
        worker more jobs than it has slots. The claim fails if the job is no
        longer queued in the store (another server claimed it first, when
        several share a database).
        """
        core = self.core
        lease = Lease(core.new_lease(), core.clock.seconds(), LeaseState.CLAIMING, worker)
        lease.claim = defer.Deferred()
        job.lease = lease
        job.state = "running"
        job.attempts += 1  # the store's own count arrives with the grant
        worker.leases[lease.token] = job
        self._claim(job, lease, unsure=False)

    def _claim(self, job: Job, lease: Lease, unsure: bool):
        lease.timer = None
        name = lease.worker.name if lease.worker is not None else ""
        d = self.core.store.grant(job.id, lease.token, name, lease.granted_at)
        d.addCallbacks(self._granted, self._claim_failed, (job, lease), None, (job, lease, unsure))

    def _granted(self, active, job: Job, lease: Lease):
        if self._grants_failing:
            self._grants_failing = False
            log.info("dispatching again: the store records leases")
        job.attempts = active.attempts
        if job.lease is not lease:
            # It ended while being claimed; its end is recorded now (_record_end).
            lease.state = LeaseState.HELD
            lease.claim.callback(True)
            return
        job.pending = dict(active.pending)
        job.failures = list(active.failures)
        lease.state = LeaseState.HELD
        left = max(0.0, lease.granted_at + job.timeout - self.core.clock.seconds())
        lease.timer = self._run_time_limit(job, lease, left)
        lease.worker.conn.offer(
            JobOffer(
                job=job.id,
                lease=lease.token,
                type=job.type,
                attempt=job.attempts,
                params=job.params,
                total=job.total,
                records=sorted(job.pending.items()),
                timeout=float(job.timeout),
                memory=int(job.requires.get("memory") or 0),
            )
        )
        self.core.watchers.notify(job)
        lease.claim.callback(True)

    def _claim_failed(self, failure, job: Job, lease: Lease, unsure: bool):
        core = self.core
        if failure.check(errors.CommitUnknown) or (unsure and failure.check(errors.Unavailable)):
            # It may have been made: the same grant again says which (a grant
            # repeated under its own lease answers as the first one did).
            self._say_grants_failing(failure)
            lease.timer = core.clock.callLater(core.backoff_base, self._claim, job, lease, True)
            return
        lease.claim.callback(False)
        if failure.check(errors.StaleLease):
            # Granted by an earlier try, then ended elsewhere: not ours to run.
            log.info("job {job}: lease {lease} was ended elsewhere while being claimed", job=job.id, lease=lease)
            if job.lease is lease:
                self.detach(job, "superseded")
            core.forget(job)
            core.reload_soon(job.id)
            core.dispatch()
            return
        if job.lease is not lease:
            return  # it ended meanwhile; _record_end takes the store's view
        self.detach(job, "unclaimed")
        # Not a lease that ended: one that never began.
        self.ended.pop(lease.token, None)
        job.attempts -= 1
        state = failure.value.extra.get("state") if failure.check(errors.InvalidState) else None
        if state in ("done", "failed", "cancelled", "poison", "paused"):
            # An operator's change committed before the claim: take it in.
            log.info("job {job}: not claimed, it is {state}", job=job.id, state=state)
            if state == "paused":
                # Said, then forgotten: a copy held here would go stale (with
                # several servers it can be resumed and run elsewhere); a
                # RESUME here reloads it from the store.
                job.state = "paused"
                core.watchers.notify(job)
                core.forget(job)
            else:
                core.finish(job, state)
        elif failure.check(errors.InvalidState, errors.UnknownJob):
            # Not ours to run now: another server sharing the store claimed it,
            # or put it in a retry backoff this copy has not seen; the next
            # sync brings the store's view.
            log.info("job {job}: not claimed ({f.value})", job=job.id, f=failure)
            core.forget(job)
        else:
            if failure.check(errors.Unavailable):
                self._say_grants_failing(failure)
            else:
                log.failure("job {job}: could not record lease {lease}", failure, job=job.id, lease=lease)
            job.state = "queued"
            now = core.clock.seconds()
            core.make_runnable(job, now, now + core.backoff_base)
        core.dispatch()

    def _say_grants_failing(self, failure):
        """Said once per outage, not once per job and second."""
        if not self._grants_failing:
            self._grants_failing = True
            log.warn(
                "dispatching held: the store cannot record leases ({f.value}); no job is sent until it can"
                " (trying again every {s:g} s)",
                f=failure,
                s=self.core.backoff_base,
            )

    def when_claimed(self, lease: Lease) -> defer.Deferred:
        """Fire with whether ``lease``'s grant was made, once the store has said so."""
        d = defer.Deferred()

        def tell(granted):
            d.callback(granted)
            return granted

        lease.claim.addCallback(tell)
        return d

    # ------------------------------------------------------------------
    # holding

    def bind(self, worker: Worker, job: Job):
        """Give a reattached lease to ``worker``; its run-time limit still counts from the grant.

        Reconnecting (or a server restart) does not buy a job more time: a
        lease past its limit while nobody held it times out at once.
        """
        lease = job.lease
        lease.worker = worker
        worker.leases[lease.token] = job
        left = max(0.0, lease.granted_at + job.timeout - self.core.clock.seconds())
        lease.timer = self._run_time_limit(job, lease, left)

    def unbind(self, job: Job):
        """The lease's holder is gone but the lease goes on (it moves to a new connection)."""
        lease = job.lease
        self._cancel(lease)
        if lease.worker is not None:
            lease.worker.leases.pop(lease.token, None)
        lease.worker = None

    def leased(self, conn, job_id: int, token: str) -> Job:
        """The job ``token`` names, if it is that job's current lease on ``conn`` and not closing."""
        worker = self.core.workers.by_connection.get(conn)
        job = worker.leases.get(token) if worker is not None else None
        if job is None or job.id != job_id or job.lease.state is LeaseState.CLOSING:
            if job_id not in self.core.jobs and token not in self.ended:
                raise errors.UnknownJob(f"no active job {job_id} with lease {token}")
            raise errors.StaleLease(f"lease {token} of job {job_id} is not yours ({self.ended.get(token, 'unknown')})")
        return job

    # ------------------------------------------------------------------
    # ending

    def next_state(self, job: Job, *, retry=True, backoff=False, count=True, attempts=None):
        """Where a job goes when a lease ends: (state, not_before, attempts)."""
        if attempts is None:
            attempts = job.attempts if count else job.attempts - 1
        if not retry or attempts >= 1 + job.retries:
            return "failed", None, attempts
        not_before = None
        if backoff:
            delay = min(self.core.backoff_max, self.core.backoff_base * 2 ** max(0, attempts - 1))
            not_before = self.core.clock.seconds() + delay
        return "queued", not_before, attempts

    def end(self, job: Job, reason: str, **how) -> defer.Deferred:
        """End ``job``'s lease now (server side): stale at once, next state on commit.

        ``how``: without ``to`` this is a failed attempt (worker lost,
        timeout), counted unless ``count=False``, re-queued after a backoff
        if ``backoff``; with ``to``, an operator's decision (``reset`` sets
        the attempts to 0, else the lease's attempt is not counted).
        ``error`` goes into the job's history; ``revoke`` tells the worker.
        Returns the Deferred of the write.
        """
        lease, plan = self._begin_end(job, reason, **how)
        return defer.Deferred.fromCoroutine(self._record_end(job, lease, reason, plan))

    async def end_as_asked(self, job: Job, reason: str, **how):
        """End a lease for an operator's change, who waits on the answer.

        The lease is stale at once and its worker told. If the store cannot
        record the end now, it is recorded again until the store answers,
        and the operator is told the change may not be made yet
        (``CommitUnknown``); if the store had moved on (the lease ended
        there first), its view is taken and the change is refused with the
        job's state there.
        """
        core = self.core
        lease, plan = self._begin_end(job, reason, **how)
        try:
            await self._record_end(job, lease, reason, plan)
        except (errors.StaleLease, errors.UnknownJob, errors.InvalidState):
            core.forget(job)
            await core.reload(job.id)
            state = (await core.store.get_job(job.id))["state"]
            raise errors.InvalidState(f"job {job.id} is {state}", state=state) from None
        except errors.Unavailable as e:
            if core.stopped:
                raise
            self._end_failed(Failure(e), job, lease, reason, plan)
            raise errors.CommitUnknown(f"the store cannot record it now ({e}); it is recorded when it can") from e

    def end_soon(self, job: Job, reason: str, **how):
        """End a lease for a reason no request waits on; a write that fails is made again until it is answered."""
        lease, plan = self._begin_end(job, reason, **how)
        self._record_end_until_answered(job, lease, reason, plan)

    def _begin_end(self, job, reason, *, to=None, reset=False, count=True, error=None, revoke=False, backoff=False):
        lease = job.lease
        if lease.state is LeaseState.CLAIMING:
            count = False  # never offered: the worker never ran it
        elif revoke and lease.worker is not None:
            lease.worker.conn.revoke(job.id, lease.token, reason)
        self.detach(job, reason)
        return lease, dict(to=to, reset=reset, count=count and to is None, error=error, backoff=backoff)

    async def _record_end(self, job: Job, lease: Lease, reason: str, plan: dict):
        core = self.core
        if lease.state is LeaseState.CLAIMING and not await self.when_claimed(lease):
            # The grant was never made: the job rests in the store as it was.
            core.forget(job)
            await core.reload(job.id)
            if plan["to"] is not None:
                raise errors.InvalidState(f"job {job.id} was being handed out; nothing was changed", state="queued")
            return
        worker = lease.worker.name if lease.worker is not None else None
        if plan["to"] is None:
            state, not_before, attempts = self.next_state(job, count=plan["count"], backoff=plan["backoff"])
            if reason == "timeout":
                state = core.poison.next_state(job, worker, state)
                not_before = None if state == "poison" else not_before
        else:
            state, not_before = plan["to"], None
            attempts = 0 if plan["reset"] else job.attempts - 1
        await self._release(job, lease, state, reason, plan["error"], not_before, attempts)
        self._ends_trouble.ok()
        job.attempts = attempts
        if reason == "timeout":
            core.poison.attempt_ended(job, worker, succeeded=False)
        core.enter(job, state, not_before)

    def _release(self, job: Job, lease: Lease, state: str, reason: str, error, not_before, attempts):
        """Record in the store that ``lease`` ended for ``reason`` and its job went to ``state``."""
        clock = self.core.clock
        return self.core.store.release(
            job.id,
            lease.token,
            state,
            clock.seconds(),
            reason=reason,
            error=error,
            not_before=not_before,
            attempts=attempts,
        )

    def _record_end_until_answered(self, job: Job, lease: Lease, reason: str, plan: dict):
        d = defer.Deferred.fromCoroutine(self._record_end(job, lease, reason, plan))
        d.addErrback(self._end_failed, job, lease, reason, plan)

    def _end_failed(self, failure, job: Job, lease: Lease, reason: str, plan: dict):
        core = self.core
        if failure.check(errors.StaleLease, errors.UnknownJob, errors.InvalidState):
            # The store moved on without us, and the store is the truth (a
            # DONE, FAIL or RETURN in doubt that had been made, say).
            say = log.info if lease.state is LeaseState.IN_DOUBT else log.error
            say("job {job}: the store disagrees about lease {lease}: {f.value}", job=job.id, lease=lease, f=failure)
            core.forget(job)
            core.reload_soon(job.id)
            return
        if core.stopped:
            # The lease stays in the store: it ends there when its server is
            # found gone (or a worker reattaches it after the restart).
            log.warn(
                "job {job}: the end of lease {lease} was not recorded before shutdown: {f.value}",
                job=job.id,
                lease=lease,
                f=failure,
            )
            return
        if failure.check(errors.Unavailable):
            # The store said why already (once per outage); so does this, once.
            self._ends_trouble.failed(failure.value, core.backoff_base)
        else:
            log.failure(
                "job {job}: could not record the end of lease {lease}; retrying", failure, job=job.id, lease=lease
            )

        def again():
            job.timer = None
            self._record_end_until_answered(job, lease, reason, plan)

        core.cancel_timer(job)
        job.timer = core.clock.callLater(core.backoff_base, again)

    def detach(self, job: Job, reason: str):
        """The lease ends in memory: stale from now on, the worker's slot is free."""
        lease = job.lease
        if lease is None:
            return
        if lease.state is not LeaseState.CLAIMING:
            self._cancel(lease)
        self.ended[lease.token] = reason
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)
        if lease.worker is not None:
            lease.worker.leases.pop(lease.token, None)
        job.lease = None

    def ended_elsewhere(self, job: Job, lease: Lease):
        """The store says ``lease`` is over though we hold it: another server ended or took it."""
        if job.lease is lease:
            log.info("job {job}: lease {lease} was ended elsewhere", job=job.id, lease=lease)
            self.detach(job, "superseded")
            self.core.forget(job)
            self.core.dispatch()

    def stop(self, job: Job):
        """Cancel the lease's timers (the server stops; the lease stays in the store)."""
        if job.lease is not None:
            self._cancel(job.lease)

    @staticmethod
    def _cancel(lease: Lease):
        if lease.timer is not None and lease.timer.active():
            lease.timer.cancel()
        lease.timer = None

    # ------------------------------------------------------------------
    # closing by the worker: FAIL and RETURN (DONE is gridd.scheduler.results')

    async def fail(self, conn, job_id: int, token: str, error: str, retry: bool) -> dict:
        job = self.leased(conn, job_id, token)
        state, not_before = await self.close(job, "failed", error=error, retry=retry, backoff=True)
        reply = {"state": state}
        if not_before is not None:
            reply["retry_in"] = max(0.0, not_before - self.core.clock.seconds())
        return reply

    async def give_back(self, conn, job_id: int, token: str, reason: str | None, vacate: bool = False) -> dict:
        """RETURN: the job goes back to the queue without using an attempt; a vacate is recorded as one."""
        job = self.leased(conn, job_id, token)
        await self.close(job, "vacated" if vacate else "returned", error=reason, count=False, given_up=True)
        if vacate:
            self.core.vacates += 1
        return {}

    async def close(self, job: Job, kind: str, *, error=None, retry=True, backoff=False, count=True, given_up=False):
        """A worker ends its own lease (FAIL, RETURN): commit, then apply.

        ``given_up``: the worker gave the job up (RETURN): once queued again it
        is kept from that worker for a while (``Dispatcher.gave_up``).
        """
        core = self.core
        lease = job.lease
        name = lease.worker.name if lease.worker is not None else None
        lease.state = LeaseState.CLOSING
        state, not_before, attempts = self.next_state(job, retry=retry, backoff=backoff, count=count)
        if kind == "failed":
            state = core.poison.next_state(job, lease.worker.name, state)
            not_before = None if state == "poison" else not_before
        try:
            await self._release(job, lease, state, kind, error, not_before, attempts)
        except errors.StaleLease:
            self.ended_elsewhere(job, lease)
            raise
        except BaseException as e:
            self.closing_failed(job, lease, e)
            raise
        self.detach(job, kind)
        job.attempts = attempts
        if given_up and name is not None and state == "queued":
            core.gave_up(job, name)  # before it is queued again: the queue reads it then
        if kind == "failed":
            core.poison.attempt_ended(job, lease.worker.name, succeeded=False)
        core.enter(job, state, not_before)
        return state, not_before

    def closing_failed(self, job: Job, lease: Lease, error: BaseException):
        """A DONE, FAIL or RETURN was not answered: the lease goes on, unless its worker left meanwhile.

        Answered "commit unknown", it may have ended in the store: it is in
        doubt until the worker sends the same write again.
        """
        if job.lease is not lease:
            return
        lease.state = LeaseState.IN_DOUBT if isinstance(error, errors.CommitUnknown) else LeaseState.HELD
        if self.core.stopped:
            return  # the lease stays in the store, for its worker to reattach after the restart
        if lease.worker is None or not self.core.workers.holds(lease.worker):
            self.end_soon(job, "expired", error="worker lost")

    # ------------------------------------------------------------------
    # run-time limits

    def _run_time_limit(self, job: Job, lease: Lease, left: float) -> Deadline:
        """The run-time limit of ``lease``, ``left`` seconds from now, judged as a deadline is."""
        core = self.core
        return Deadline(core.clock, left, core.beat, lambda: self._timed_out(job, lease), core.say_stalled)

    def _timed_out(self, job: Job, lease: Lease):
        """Its run-time limit passed (judged as a deadline is: a DONE sent in time and not yet read is taken)."""
        lease.timer = None
        if job.lease is not lease or lease.state is LeaseState.CLOSING:
            return
        log.warn("job {job}: lease {lease} passed its run-time limit of {t} s", job=job.id, lease=lease, t=job.timeout)
        self.end_soon(job, "timeout", error=f"run-time limit of {job.timeout:g} s exceeded", revoke=True, backoff=True)
