"""The dispatcher: the scheduler's one object, wiring its parts together.

Its inputs, grouped by who calls them:

- from connections (via ``gridd.server.session``, or in-process):
  ``worker_hello``, ``client_hello``, ``seen``, ``connection_lost``; the
  worker requests ``result``, ``progress``, ``done``, ``fail``,
  ``give_back`` (a vacate too), ``set_slots``, ``set_state``,
  ``check_leases``; the client requests ``submit``, ``show``,
  ``list_jobs``, ``results``, ``workers_view``, ``stats``, ``watch``,
  ``cancel``, ``pause``, ``resume``, ``requeue``, ``worker_action``,
  ``set_dispatching``;
- from the clock: heartbeat deadlines and run-time limits
  (``gridd.deadline``), retry backoffs, and the beat and sync loops
  (``gridd.scheduler.shared``);
- from the store: the answers to its writes, in commit order.

Rules this module owns:

- Memory follows the store: a transition is written to the store first and
  applied here when the write has committed, in the store's commit order.
  Only the end of a lease takes effect at once (``gridd.scheduler.leases``);
  its job's next state still waits for the commit.
- Push, never poll: whenever a job becomes runnable or a slot frees up,
  runnable jobs are handed to free matching slots until either runs out
  (``dispatch``), unless dispatching is stopped. So too when a job given up
  may go back to the worker that gave it up (``return_delay`` later), and
  when a quiet worker that a dispatch passed over is heard again.
- A quiet worker (silent for more than one beat, ``gridd.scheduler.workers``)
  is handed no job; the jobs it would have had stay queued for the others.
  Nor is a worker whose host is busy or vacating (``Worker.state``); one
  that says it is idle again gets work at once.
- A job done, failed, cancelled or poison leaves memory; the store keeps it.

The job and lease states are those drawn in protocols/PROTOCOL.md,
section 8.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from gridd import errors
from gridd.scheduler.connection import IConnection, JobStatus
from gridd.scheduler.control import Control
from gridd.scheduler.leases import Leases
from gridd.scheduler.model import Job, Lease, LeaseState, Worker
from gridd.scheduler.poison import Poison
from gridd.scheduler.queue import RunQueue
from gridd.scheduler.rates import RateCounter
from gridd.scheduler.results import Results
from gridd.scheduler.shared import SharedStore
from gridd.scheduler.views import Views
from gridd.scheduler.watchers import Watchers
from gridd.scheduler.workers import Workers
from gridd.store.base import ActiveJob, JobSpec

__all__ = ["Dispatcher", "MAX_JOBS_PER_SUBMIT"]

log = Logger()

MAX_JOBS_PER_SUBMIT = 10_000


class Dispatcher:
    """Hands runnable jobs to matching workers and keeps their leases honest."""

    def __init__(
        self,
        store,
        clock,
        *,
        beat: float = 2.0,
        deadline: float | None = None,
        default_timeout: float = 3600.0,
        type_timeouts: dict[str, float] | None = None,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        return_delay: float = 30.0,
        reattach_grace: float | None = None,
        sync_interval: float | None = None,
        new_lease: Callable[[], str] = lambda: secrets.token_hex(8),
        poison_after: int = 3,
        bad_worker_after: int = 3,
    ):
        self.store = store
        self.clock = clock
        self.beat = beat
        self.deadline = deadline if deadline is not None else 3 * beat
        self.default_timeout = default_timeout
        #: Run-time limits of job types, for jobs that name none (else ``default_timeout``).
        self.type_timeouts = dict(type_timeouts or {})
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        #: Seconds a job given back (RETURN) is kept from the worker that gave
        #: it back; any other matching worker may take it at once.
        self.return_delay = return_delay
        # Reconnecting workers back off; give them time to find a restarted server.
        self.reattach_grace = reattach_grace if reattach_grace is not None else max(30.0, 2 * self.deadline)
        #: Seconds between looks at what other servers on the same store did
        #: (None: this server is alone on its store).
        self.sync_interval = sync_interval
        self.new_lease = new_lease
        self.dispatching = True
        self.stopped = False
        #: The active jobs held here, by id.
        self.jobs: dict[int, Job] = {}
        self.queue = RunQueue()
        #: Jobs submitted, records accepted, and jobs ended done/failed/cancelled, for operators.
        self.rates = RateCounter(clock)
        #: Called with a credential's id when a sync finds it revoked (the server
        #: closes the connections that use it); revocations already seen are skipped.
        self.on_credential_revoked: Callable[[str], None] | None = None
        # The parts, one per noun; each holds its own state.
        self.workers = Workers(self)
        self.leases = Leases(self)
        self.result_book = Results(self)
        self.control = Control(self)
        self.watchers = Watchers(self)
        self.views = Views(self)
        self.shared = SharedStore(self)
        self.poison = Poison(self, poison_after, bad_worker_after)
        self._in_dispatch = False
        #: Jobs given back with RETURN vacate since this server started, for operators.
        self.vacates = 0
        #: Timers of dispatches due when a job given up may go back to its worker.
        self._wakeups: set = set()
        #: When a stall of this server was last said (say_stalled).
        self._stall_said_at = -math.inf

    # ------------------------------------------------------------------
    # lifecycle

    async def start(self):
        """Announce this server in the store and load the jobs waiting to run.

        Running jobs are not loaded: their leases belong to whichever server
        granted them (an earlier run of this one, say). A worker that comes
        back holding one takes it over here (``worker_hello``); leases of a
        server that is gone end ``reattach_grace`` seconds after its deadline
        (``gridd.scheduler.shared``).
        """
        await self.shared.beat_first()
        now = self.clock.seconds()
        for active in await self.store.load_active():
            if active.state != "running":
                job = self.job_from_store(active)
                self.jobs[job.id] = job
                if job.state == "queued":
                    self.make_runnable(job, now)
        self.shared.start()
        log.info(
            "dispatcher {server} loaded {n} jobs ({q} runnable now){shared}",
            server=self.store.server_id,
            n=len(self.jobs),
            q=len(self.queue),
            shared=f", syncing with other servers every {self.sync_interval:g} s" if self.sync_interval else "",
        )

    def stop(self):
        """Cancel every timer; the dispatcher hands out nothing more."""
        self.stopped = True
        self.dispatching = False
        self.shared.stop()
        for job in self.jobs.values():
            self.cancel_timer(job)
            self.leases.stop(job)
        for call in self._wakeups:
            if call.active():
                call.cancel()
        self._wakeups.clear()
        self.workers.stop()

    # ------------------------------------------------------------------
    # from connections (the session layer calls these)

    def worker_hello(self, conn: IConnection, hello: dict):
        return self.workers.hello(conn, hello)

    def client_hello(self, conn: IConnection):
        """A client connected; nothing to do until it watches jobs."""

    def seen(self, conn: IConnection):
        self.workers.seen(conn)

    def connection_lost(self, conn: IConnection):
        self.watchers.forget(conn)
        self.workers.connection_lost(conn)

    def result(self, conn, job_id: int, lease: str, results: list[dict]):
        return self.result_book.result(conn, job_id, lease, results)

    def progress(self, conn, job_id: int, lease: str, note: str | None):
        return self.result_book.progress(conn, job_id, lease, note)

    def done(self, conn, job_id: int, lease: str, results: list[dict]):
        return self.result_book.done(conn, job_id, lease, results)

    def fail(self, conn, job_id: int, lease: str, error: str, retry: bool):
        return self.leases.fail(conn, job_id, lease, error, retry)

    def give_back(self, conn, job_id: int, lease: str, reason: str | None, vacate: bool = False):
        return self.leases.give_back(conn, job_id, lease, reason, vacate)

    def set_slots(self, conn, slots: int):
        return self.workers.set_slots(conn, slots)

    def set_state(self, conn, state: str, reason: str | None = None):
        return self.workers.set_state(conn, state, reason)

    def check_leases(self, conn, holding: list[dict]):
        return self.workers.check(conn, holding)

    def show(self, job_id: int):
        return self.views.show(job_id)

    def list_jobs(self, state=None, type=None, after=0, limit=100):
        return self.views.list_jobs(state, type, after, limit)

    def results(self, job_id: int, after: int = -1, limit: int = 1000):
        return self.views.results(job_id, after, limit)

    def workers_view(self):
        return self.views.workers_view()

    def stats(self):
        return self.views.stats()

    def queue_depth(self) -> dict[tuple[str, int], int]:
        return self.views.queue_depth()

    def job_submitter(self, job_id: int):
        return self.views.job_submitter(job_id)

    def watch(self, conn: IConnection, job_ids: list[int]):
        return self.watchers.watch(conn, job_ids)

    def cancel(self, job_id: int):
        return self.control.cancel(job_id)

    def pause(self, job_id: int):
        return self.control.pause(job_id)

    def resume(self, job_id: int):
        return self.control.resume(job_id)

    def requeue(self, job_id: int):
        return self.control.requeue(job_id)

    def worker_action(self, name: str, action: str, reason: str | None = None):
        return self.control.worker_action(name, action, reason)

    def set_dispatching(self, enabled: bool):
        return self.control.set_dispatching(enabled)

    async def submit(self, specs: list[dict], submitter: str | None = None, check: Callable | None = None) -> dict:
        """Store new jobs, queue them here and push them to free workers.

        ``check(index, spec, timeout)``, if given, may refuse a job before
        anything is written (a connection's line limit, say).
        """
        if len(specs) > MAX_JOBS_PER_SUBMIT:
            raise errors.TooMany(f"at most {MAX_JOBS_PER_SUBMIT} jobs per SUBMIT", limit=MAX_JOBS_PER_SUBMIT)
        if self.stopped:
            raise errors.ShuttingDown()
        if check is not None:
            for index, spec in enumerate(specs):
                check(index, spec, self.timeout_for(spec["type"], spec.get("timeout")))
        jobs = [
            JobSpec(
                type=s["type"],
                records=s["records"],
                params=s.get("params", {}),
                priority=s.get("priority", 0),
                requires=s.get("requires", {}),
                retries=s.get("retries", 3),
                timeout=s.get("timeout"),
                name=s.get("name"),
                submitter=submitter,
            )
            for s in specs
        ]
        ids = await self.store.submit(jobs, self.clock.seconds())
        for job_id, spec in zip(ids, jobs, strict=True):
            job = Job(
                id=job_id,
                type=spec.type,
                priority=spec.priority,
                requires=spec.requires,
                params=spec.params,
                total=len(spec.records),
                retries=spec.retries,
                timeout=self.timeout_for(spec.type, spec.timeout),
                state="queued",
                attempts=0,
                pending=dict(enumerate(spec.records)),
                name=spec.name,
            )
            self.jobs[job_id] = job
            self.queue.push(job)
            self.watchers.notify(job)
        self.rates.add("submitted", len(ids))
        self.dispatch()
        return {"jobs": ids}

    # ------------------------------------------------------------------
    # pushing work

    def dispatch(self, only: Worker | None = None):
        """Push runnable jobs to free matching slots until one of them runs out.

        ``only``: fill that worker's free slots alone (it was heard again).
        A quiet worker is passed over, and marked so (``Worker.passed_over``).
        """
        if not self.dispatching or self._in_dispatch or not self.queue:
            return
        self._in_dispatch = True
        try:
            now = self.clock.seconds()
            progress = True
            while progress and self.queue:
                progress = False
                for worker in self.workers.values() if only is None else [only]:
                    if worker.free <= 0 or worker.drained or worker.state != "idle":
                        continue
                    if worker.quiet:
                        worker.passed_over = True
                        continue
                    worker.passed_over = False
                    job_id = self.queue.pop_for(worker, now, self.poison.barred(worker.name))
                    if job_id is not None:
                        self.leases.grant(worker, self.jobs[job_id])
                        progress = True
        finally:
            self._in_dispatch = False

    def gave_up(self, job: Job, name: str):
        """Worker ``name`` gave ``job`` up: keep it from that worker for ``return_delay`` seconds.

        Called before the job is queued again. Then a dispatch, in case only
        that worker can take it.
        """
        if self.return_delay <= 0:
            return
        job.give_up(name, self.clock.seconds() + self.return_delay)

        def wake():
            self._wakeups.discard(call)
            self.dispatch()

        call = self.clock.callLater(self.return_delay, wake)
        self._wakeups.add(call)

    # ------------------------------------------------------------------
    # a job's resting states and its end

    def enter(self, job: Job, state: str, not_before: float | None):
        """Apply a committed state to the in-memory job (which holds no lease now)."""
        job.state = state
        if state in ("done", "failed", "cancelled", "poison"):
            self.finish(job, state)
            return
        if state == "queued":
            self.make_runnable(job, self.clock.seconds(), not_before)
        self.watchers.notify(job)
        self.dispatch()

    def finish(self, job: Job, state: str):
        """The job ended (committed): it leaves memory; its watchers are told."""
        self.leases.detach(job, state)
        self.queue.discard(job)
        job.state = state
        self.jobs.pop(job.id, None)
        self.rates.add(state)
        self.watchers.notify(job)
        self.dispatch()

    def forget(self, job: Job):
        """Drop this server's copy of a job (the store's view comes back with a reload)."""
        self.cancel_timer(job)
        self.queue.discard(job)
        self.jobs.pop(job.id, None)

    def make_runnable(self, job: Job, now: float, not_before: float | None = None):
        not_before = not_before if not_before is not None else job.not_before
        job.not_before = not_before
        if not_before is not None and not_before > now:
            self.cancel_timer(job)
            job.timer = self.clock.callLater(not_before - now, self._backoff_over, job)
        elif not job.changes:  # else the change's end makes it runnable (gridd.scheduler.control)
            job.not_before = None
            self.queue.push(job)

    def _backoff_over(self, job: Job):
        job.timer = None
        if job.state == "queued" and self.jobs.get(job.id) is job and not job.changes:
            job.not_before = None
            self.queue.push(job)
            self.dispatch()

    def cancel_timer(self, job: Job):
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        job.timer = None

    async def reload(self, *job_ids: int):
        """Take the store's view of these jobs: keep those that wait to run here.

        For a requeue, a disagreement with the store, another server's
        re-queued or new jobs, and leases of gone servers. Watchers of a job
        that ended meanwhile are told its end.
        """
        if not job_ids:
            return
        found = set()
        for active in await self.store.load_active(job_ids=list(job_ids)):
            found.add(active.id)
            if active.state == "running" or active.id in self.jobs:
                continue  # someone's lease; or it arrived while we read
            job = self.job_from_store(active)
            self.jobs[job.id] = job
            if job.state == "queued":
                self.make_runnable(job, self.clock.seconds())
            self.watchers.notify(job)
        ended = [i for i in job_ids if i not in found and i not in self.jobs]
        if ended and len(self.watchers):
            for status in await self.store.job_states(ended):
                if status["job"] not in self.jobs:
                    self.watchers.tell(JobStatus(status["job"], status["state"], status["accepted"], status["total"]))
        self.dispatch()

    def reload_soon(self, *job_ids: int):
        defer.Deferred.fromCoroutine(self.reload(*job_ids)).addErrback(lambda f: log.failure("reload", f))

    def timeout_for(self, job_type: str, timeout: float | None) -> float:
        """The run-time limit of one attempt: the job's own, else its type's, else the default."""
        if timeout is not None:
            return timeout
        return self.type_timeouts.get(job_type, self.default_timeout)

    def job_from_store(self, a: ActiveJob) -> Job:
        job = Job(
            id=a.id,
            type=a.type,
            priority=a.priority,
            requires=a.requires,
            params=a.params,
            total=a.total,
            retries=a.retries,
            timeout=self.timeout_for(a.type, a.timeout),
            state=a.state,
            attempts=a.attempts,
            pending=dict(a.pending),
            name=a.name,
            not_before=a.not_before,
            failures=list(a.failures),
        )
        if a.state == "running":
            granted_at = a.leased_at if a.leased_at is not None else self.clock.seconds()
            job.lease = Lease(a.lease, granted_at, LeaseState.HELD)
            job.lease.claim = defer.succeed(True)
        return job

    def say_stalled(self, stalled: float):
        """Say once per stall that deadlines and run-time limits were put off: this server was stalled."""
        now = self.clock.seconds()
        if now - self._stall_said_at > self.deadline:
            self._stall_said_at = now
            log.warn(
                "this server was stalled for {s:.1f} s (its timers ran late): workers whose heartbeat"
                " deadline or run-time limit passed meanwhile get {b:g} s more to be heard",
                s=stalled,
                b=self.beat,
            )
