"""This server among others on one store: its beat, the leases of servers that are gone, and the sync.

Rules this module owns:

- Every beat, this server records that it is alive, and ends the leases of
  servers whose beat is older than their deadline plus the reattach grace
  (their workers had that long to reattach elsewhere).
- After an outage of the store (no beat recorded for more than a deadline)
  every other server looks long gone: none is judged until one deadline of
  working store has passed, time enough for the live ones to beat again.
- With several servers (``sync_interval`` set), every interval this server
  takes in what the others did: jobs submitted or re-queued elsewhere become
  runnable here; runnable jobs held here that left the shared queue are
  forgotten; leases this server granted that the store says ended (an
  operator elsewhere, a worker that moved) are revoked from their workers;
  watchers hear of watched jobs that run elsewhere; credentials revoked
  elsewhere close their connections here.
- A judgement is made only of what was settled before the read it rests on
  began: a job's stay in the queue, a lease's grant. A lease whose
  DONE, FAIL or RETURN is being committed, or is in doubt, is left to that
  write.
- A lease the store says is ours that no job here holds (a reattach taken
  over in the store whose answer was lost, say) is re-queued once it has
  looked so on two syncs in a row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import task
from twisted.logger import Logger

from gridd import errors
from gridd.scheduler.control import REASONS
from gridd.scheduler.model import LeaseState
from gridd.scheduler.rates import Complaint

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["SharedStore"]

log = Logger()


class SharedStore:
    """The housekeeping and sync loops of one server on a store it may share."""

    def __init__(self, core: Dispatcher):
        self.core = core
        #: How many jobs of the shared queue's head each sync reads.
        self.sync_batch = 1000
        self._housekeeping: task.LoopingCall | None = None
        self._syncing: task.LoopingCall | None = None
        self._housekeeping_trouble = Complaint(core.clock, "housekeeping (this server's beat in the store)")
        self._sync_trouble = Complaint(core.clock, "sync with the shared store")
        #: When the store last took this server's beat.
        self._last_beat_stored = core.clock.seconds()
        #: Before this time, other servers' stale beats are not held against them.
        self._judge_servers_after = 0.0
        #: Leases the store says are ours that no job here holds, at the last look.
        self._orphans: set[tuple[int, str]] = set()
        #: Credentials seen revoked at the last look.
        self._revoked_seen: set[str] = set()

    async def beat_first(self):
        core = self.core
        await core.store.beat(core.clock.seconds(), core.deadline)
        self._last_beat_stored = core.clock.seconds()

    def start(self):
        core = self.core
        self._housekeeping = task.LoopingCall(self._housekeep)
        self._housekeeping.clock = core.clock
        self._housekeeping.start(core.beat, now=False).addErrback(log.failure, "housekeeping stopped")
        if core.sync_interval:
            self._syncing = task.LoopingCall(self._sync)
            self._syncing.clock = core.clock
            self._syncing.start(core.sync_interval, now=False).addErrback(log.failure, "sync stopped")

    def stop(self):
        for loop in (self._housekeeping, self._syncing):
            if loop is not None and loop.running:
                loop.stop()

    # ------------------------------------------------------------------
    # every beat

    async def _housekeep(self):
        core = self.core
        now = core.clock.seconds()
        try:
            await core.store.beat(now, core.deadline)
        except Exception as e:
            self._housekeeping_trouble.failed(e, core.beat)
            return
        # An outage is a gap of more than a deadline between two beats that
        # the store took: beats that failed, or one that hung (a frozen
        # database) and then went through.
        answered = core.clock.seconds()
        if answered - self._last_beat_stored > core.deadline:
            self._judge_servers_after = answered + core.deadline
            log.info(
                "housekeeping: the store answers again after {s:.1f} s; other servers get {d:g} s to beat"
                " before their leases are judged",
                s=answered - self._last_beat_stored,
                d=core.deadline,
            )
        self._last_beat_stored = answered
        if core.clock.seconds() < self._judge_servers_after:
            self._housekeeping_trouble.ok()
            return
        try:
            ended = await core.store.expire_servers(core.clock.seconds(), core.reattach_grace)
        except Exception as e:
            self._housekeeping_trouble.failed(e, core.beat)
            return
        self._housekeeping_trouble.ok()
        if ended:
            log.info("leases of gone servers ended, jobs re-queued or failed: {ids}", ids=ended)
            await core.reload(*ended)

    # ------------------------------------------------------------------
    # every sync interval

    async def _sync(self):
        try:
            await self._sync_runnable()
            await self._sync_leases()
            await self.core.watchers.look_elsewhere()
            await self._sync_revocations()
        except Exception as e:
            self._sync_trouble.failed(e, self.core.sync_interval)
        else:
            self._sync_trouble.ok()

    async def _sync_runnable(self):
        """Take in the head of the shared queue; forget the runnable jobs held here that left it.

        A job submitted here and run by another server's worker would
        otherwise stay in this server's memory until one of its own workers
        tried to claim it: without end on a server that only takes
        submissions. The head is read in queue order, so a job held here
        that sorts within it but is missing from it is no longer queued.
        """
        core = self.core
        held = [(job, core.queue.stay(job)) for job in core.jobs.values() if job in core.queue]
        ids = await core.store.runnable(core.clock.seconds(), self.sync_batch)
        await core.reload(*(i for i in ids if i not in core.jobs))
        head = set(ids)
        horizon = None  # the whole queue was read
        if len(ids) >= self.sync_batch:
            ranks = [(-core.jobs[i].priority, i) for i in ids if i in core.jobs]
            if not ranks:
                return
            horizon = ranks[-1]
        gone = [
            job
            for job, stay in held
            if job.id not in head
            and core.jobs.get(job.id) is job
            and core.queue.stay(job) == stay  # the same stay in the queue as before the read
            and (horizon is None or (-job.priority, job.id) <= horizon)
        ]
        for job in gone:
            core.forget(job)
        if gone:
            log.debug("jobs taken or changed by other servers, forgotten here: {ids}", ids=[j.id for j in gone])

    async def _sync_leases(self):
        core = self.core
        # Only leases whose grant had committed before the read began, and
        # that no DONE/FAIL/RETURN of ours is ending, can be judged by it.
        settled = [(j, j.lease) for j in core.jobs.values() if j.lease and j.lease.state is LeaseState.HELD]
        owned = await core.store.own_leases()
        await self._end_orphans(owned)
        gone = [(j, lease) for j, lease in settled if j.lease is lease and lease.state is LeaseState.HELD]
        gone = [(j, lease) for j, lease in gone if owned.get(j.id) != lease.token]
        if not gone:
            return
        states = {s["job"]: s["state"] for s in await core.store.job_states([j.id for j, _ in gone])}
        for job, lease in gone:
            if job.lease is not lease or lease.state is not LeaseState.HELD:
                continue
            reason = REASONS.get(states.get(job.id), "superseded")
            log.info("job {job}: lease {lease} ended elsewhere ({reason})", job=job.id, lease=lease, reason=reason)
            if lease.worker is not None:
                lease.worker.conn.revoke(job.id, lease.token, reason)
            core.leases.detach(job, reason)
            core.forget(job)
        core.dispatch()

    async def _end_orphans(self, owned: dict[int, str]):
        """End leases the store says are ours but no job here holds.

        A lease must look orphaned on two looks in a row before it is ended,
        so that one whose holder is still being set up here (a takeover
        being committed) is left alone.
        """
        core = self.core
        known = {j.token for j in core.jobs.values() if j.lease}
        ended = core.leases.ended
        orphans = {(job_id, token) for job_id, token in owned.items() if token not in known and token not in ended}
        confirmed, self._orphans = orphans & self._orphans, orphans
        for job_id, token in sorted(confirmed):
            log.warn(
                "job {job}: lease {lease} is ours in the store but held by no worker; re-queued",
                job=job_id,
                lease=token,
            )
            try:
                await core.store.release(job_id, token, "queued", core.clock.seconds(), reason="orphaned")
            except errors.GriddError:
                continue
            await core.reload(job_id)

    async def _sync_revocations(self):
        """Credentials revoked through another server: their connections here close too."""
        core = self.core
        if core.on_credential_revoked is None:
            return
        revoked = {c["id"] for c in await core.store.list_credentials() if c.get("revoked") is not None}
        for credential_id in sorted(revoked - self._revoked_seen):
            core.on_credential_revoked(credential_id)
        self._revoked_seen = revoked
