"""The scheduling state machine: queues, leases, connected workers, matching.

The dispatcher is pure logic. It knows connections only through the small
:class:`IConnection` interface, durable state only through the store
interface (``gridd.store.base.IStore``), and time only through the injected
clock. The server's session layer calls it; nothing in it touches a socket.

Its inputs, grouped by who calls them:

- from the wire (via ``gridd.server.session``): ``worker_hello``,
  ``client_hello``, ``seen``, ``connection_lost``, the worker requests
  (``result``, ``progress``, ``done``, ``fail``, ``give_back``,
  ``set_slots``) and the client requests (``submit``, ``show``,
  ``list_jobs``, ``results``, ``workers_view``, ``stats``, ``watch``,
  ``cancel``, ``pause``, ``resume``, ``requeue``, ``worker_action``,
  ``set_dispatching``);
- from the clock: a worker's heartbeat deadline, a lease's run-time limit, a
  job's retry backoff, and the reattach grace after a restart.

The states and transitions are those drawn in protocols/PROTOCOL.md,
section 8. The rule that keeps memory and store in agreement: a transition
is written to the store first and applied in memory when the write has
committed, in the store's commit order. Only the end of a lease takes effect
at once (a revoked lease is stale the moment it is revoked); its job's next
state still waits for the commit.
"""

from __future__ import annotations

import functools
import heapq
import math
import re
import secrets
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer, task
from twisted.logger import Logger

from gridd import errors, wire
from gridd.deadline import Deadline
from gridd.store.base import ActiveJob, JobSpec, RecordResult

__all__ = ["Dispatcher", "IConnection", "RateCounter", "parse_version"]

log = Logger()

MAX_JOBS_PER_SUBMIT = 10_000
MAX_ID = 2**53 - 1
#: For how many sync intervals a grant answered commit_unknown is remembered,
#: in case its lease turns up orphaned (two looks in a row confirm one).
ORPHAN_LOOKS_KEPT = 10


class IConnection(Protocol):
    """What the dispatcher needs of a connection (the wire, in-process, or a test fake)."""

    #: A printable peer address, for operators.
    address: str

    def send(self, verb: str, body: dict | None = None) -> None:
        """Send one notification to the peer."""

    def drop(self, reason: str) -> None:
        """Close the connection now; ``connection_lost`` follows (perhaps later)."""

    def ping(self, timeout: float) -> defer.Deferred:
        """Fire with True if the peer answers a PING within ``timeout`` seconds, else False."""


def parse_version(text: str) -> tuple[int, ...]:
    """Turn ``"1.10.2"`` into ``(1, 10, 2)`` for comparison.

    Each dotted part counts by its leading digits (``"2rc1"`` is 2, ``"x"`` is 0).
    """
    parts = []
    for piece in (text or "0").split("."):
        digits = re.match(r"\d*", piece).group()
        parts.append(int(digits) if digits else 0)
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class _Bucket:
    """Jobs that any one worker either can or cannot all run, at one priority."""

    priority: int
    type: str
    version: tuple[int, ...]
    memory: int
    tags: frozenset


@dataclass(eq=False)
class Job:
    """A queued, running or paused job as the dispatcher holds it."""

    id: int
    type: str
    priority: int
    requires: dict
    params: dict
    total: int
    retries: int
    timeout: float
    state: str
    attempts: int
    #: Records without an accepted result: index -> data.
    pending: dict[int, Any]
    name: str | None = None
    lease: str | None = None
    worker: Worker | None = None
    not_before: float | None = None
    note: str | None = None
    #: Record indices whose results are being committed.
    in_flight: set[int] = field(default_factory=set)
    #: A DONE, FAIL or RETURN for the current lease is being committed.
    closing: bool = False
    #: The current lease is being claimed in the store; its JOB is not sent yet.
    claiming: bool = False
    #: The lease whose DONE was answered commit_unknown: it may have completed the job.
    unsure_done: str | None = None
    #: The one timer a job has at a time: run-time limit, backoff, or reattach grace.
    timer: Any = None
    #: The run queue's push count when this job last entered it.
    queued_at_push: int = 0
    #: Operators' changes of this resting job being committed: it is held
    #: out of the run queue meanwhile, so no slot hands it out under them.
    changing: int = 0
    #: When the current lease was granted (on the server's clock): its run-time
    #: limit counts from then, across reattaches.
    leased_at: float | None = None

    @property
    def accepted(self) -> int:
        return self.total - len(self.pending)

    @property
    def bucket(self) -> _Bucket:
        return _Bucket(
            self.priority,
            self.type,
            parse_version(self.requires.get("version", "")),
            int(self.requires.get("memory", 0)),
            frozenset(self.requires.get("tags", ())),
        )

    def event_body(self) -> dict:
        return {"job": self.id, "state": self.state, "accepted": self.accepted, "total": self.total}


@dataclass(eq=False)
class Worker:
    """A connected worker and the leases it holds."""

    name: str
    conn: IConnection
    slots: int
    types: dict[str, tuple[int, ...]]
    type_versions: dict[str, str]
    memory: int
    tags: frozenset
    agent: str
    connected_at: float
    last_seen: float
    drained: bool = False
    leases: dict[str, Job] = field(default_factory=dict)
    #: Its heartbeat deadline (gridd.deadline.Deadline), from its HELLO on.
    deadline: Any = None

    @property
    def free(self) -> int:
        return self.slots - len(self.leases)

    def can_run(self, bucket: _Bucket) -> bool:
        version = self.types.get(bucket.type)
        return (
            version is not None
            and version >= bucket.version
            and self.memory >= bucket.memory
            and bucket.tags <= self.tags
        )


class _RunQueue:
    """Runnable jobs: per bucket a heap of job ids, so the lowest id comes first.

    Removal is lazy: a job leaves the member set and its heap entry is skipped
    when it reaches the top.
    """

    def __init__(self):
        self._heaps: dict[_Bucket, list[int]] = {}
        self._members: set[int] = set()
        #: Discards since the heaps were last compacted.
        self._stale = 0
        #: Pushes so far: a job's ``queued_at_push`` tells one stay in the queue from the next.
        self.pushes = 0

    def __len__(self):
        return len(self._members)

    def __contains__(self, job: Job):
        return job.id in self._members

    def push(self, job: Job):
        heapq.heappush(self._heaps.setdefault(job.bucket, []), job.id)
        self._members.add(job.id)
        self.pushes += 1
        job.queued_at_push = self.pushes

    def discard(self, job: Job):
        if job.id not in self._members:
            return
        self._members.discard(job.id)
        self._stale += 1
        if self._stale > 1000 and self._stale > len(self._members):
            # Lazy removal leaves ids in the heaps until they reach a top: a
            # server whose jobs run elsewhere would keep them all.
            self._heaps = {
                bucket: [i for i in heap if i in self._members] for bucket, heap in self._heaps.items()
            }
            self._heaps = {bucket: heap for bucket, heap in self._heaps.items() if heap}
            for heap in self._heaps.values():
                heapq.heapify(heap)
            self._stale = 0

    def pop_for(self, worker: Worker) -> int | None:
        """Remove and return the best job id ``worker`` can run, or None."""
        best = None
        for bucket in list(self._heaps):
            heap = self._heaps[bucket]
            while heap and heap[0] not in self._members:
                heapq.heappop(heap)
            if not heap:
                del self._heaps[bucket]
                continue
            if worker.can_run(bucket):
                rank = (-bucket.priority, heap[0])
                if best is None or rank < best[0]:
                    best = (rank, bucket)
        if best is None:
            return None
        job_id = heapq.heappop(self._heaps[best[1]])
        self._members.discard(job_id)
        return job_id


class RateCounter:
    """Events by kind in fixed time slots on a clock, for "how many per minute lately".

    ``add`` counts into the slot the clock is in; ``total`` sums the slots
    that began within the last ``seconds``. Slots older than ``keep`` seconds
    are dropped as new ones start, so memory is bounded and nothing is
    scheduled on the clock.
    """

    def __init__(self, clock, *, slot: float = 10.0, keep: float = 900.0):
        self.clock = clock
        self.slot = slot
        self.keep = keep
        #: (slot number, Counter of kinds), oldest first.
        self._slots: deque[tuple[int, Counter]] = deque()

    def add(self, kind: str, n: int = 1):
        current = int(self.clock.seconds() // self.slot)
        if not self._slots or self._slots[-1][0] != current:
            self._slots.append((current, Counter()))
            oldest = current - int(self.keep // self.slot)
            while self._slots[0][0] <= oldest:
                self._slots.popleft()
        self._slots[-1][1][kind] += n

    def total(self, kind: str, seconds: float) -> int:
        """Events of ``kind`` in the slots that began within the last ``seconds``."""
        first = int(self.clock.seconds() // self.slot) - int(seconds // self.slot) + 1
        return sum(counts[kind] for number, counts in self._slots if number >= first)


class _Complaint:
    """A failure that recurs on a timer (a store out of reach), said once, then every ``every`` seconds, then its end.

    An outage of an hour would otherwise log a line every beat and every
    sync: thousands of lines that bury the one that says why.
    """

    def __init__(self, clock, what: str, every: float = 60.0):
        self.clock = clock
        self.what = what
        self.every = every
        self.since: float | None = None
        self._said = 0.0
        self._tries = 0

    def failed(self, error: BaseException, retry: float):
        now = self.clock.seconds()
        self._tries += 1
        if self.since is None:
            self.since = self._said = now
            log.warn("{what} failed ({e}); trying again every {r:g} s", what=self.what, e=error, r=retry)
        elif now - self._said >= self.every:
            self._said = now
            log.warn(
                "{what} still failing after {s:.0f} s ({n} tries; last: {e})",
                what=self.what,
                s=now - self.since,
                n=self._tries,
                e=error,
            )

    def ok(self):
        if self.since is not None:
            log.info(
                "{what} works again after {s:.1f} s ({n} failed tries)",
                what=self.what,
                s=self.clock.seconds() - self.since,
                n=self._tries,
            )
            self.since, self._tries = None, 0


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
        reattach_grace: float | None = None,
        max_line: int = wire.DEFAULT_MAX_LINE,
        sync_interval: float | None = None,
        new_lease: Callable[[], str] = lambda: secrets.token_hex(8),
    ):
        self.store = store
        #: Seconds between looks at what other servers on the same store did
        #: (None: this server is alone on its store).
        self.sync_interval = sync_interval
        #: How many jobs of the shared queue's head each sync reads.
        self.sync_batch = 1000
        self.max_line = max_line
        self.clock = clock
        self.beat = beat
        self.deadline = deadline if deadline is not None else 3 * beat
        self.default_timeout = default_timeout
        #: Run-time limits of job types, for jobs that name none (else ``default_timeout``).
        self.type_timeouts = dict(type_timeouts or {})
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        # Reconnecting workers back off; give them time to find a restarted server.
        self.reattach_grace = reattach_grace if reattach_grace is not None else max(30.0, 2 * self.deadline)
        self.new_lease = new_lease
        self.dispatching = True
        self.jobs: dict[int, Job] = {}
        self.workers: dict[str, Worker] = {}
        self._worker_by_conn: dict[IConnection, Worker] = {}
        #: Connections whose worker HELLO is being handled (and that are still there).
        self._hellos: set[IConnection] = set()
        self._watchers: dict[IConnection, set[int] | None] = {}
        self._queue = _RunQueue()
        #: Why recently ended leases ended, for a reconnecting worker's ``lost``.
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._in_dispatch = False
        self._stopped = False
        self._housekeeping: task.LoopingCall | None = None
        #: Called with a credential's id when a sync finds it revoked (the server
        #: closes the connections that use it); revocations already seen are skipped.
        self.on_credential_revoked: Callable[[str], None] | None = None
        self._revoked_seen: set[str] = set()
        #: The store could not record the last lease tried (an outage, said once).
        self._grants_failing = False
        self._housekeeping_trouble = _Complaint(clock, "housekeeping (this server's beat in the store)")
        self._sync_trouble = _Complaint(clock, "sync with the shared store")
        #: When a stall of this server was last said (_say_stalled).
        self._stall_said_at = -math.inf
        #: When the store last took this server's beat.
        self._last_beat_stored = clock.seconds()
        #: Before this time, other servers' stale beats are not held against them.
        self._judge_servers_after = 0.0
        #: Leases the store says are ours that no job here holds, at the last look.
        self._orphans: set[tuple[int, str]] = set()
        #: Grants that failed in a way that may have committed: lease -> (the
        #: job's attempts without it, when it failed). Kept for a few syncs.
        self._unsure_grants: dict[str, tuple[int, float]] = {}
        #: Leases whose DONE, answered commit_unknown, a sync found made: a
        #: DONE sent again under one is answered OK (once).
        self._made_dones: OrderedDict[str, int] = OrderedDict()
        self._syncing: task.LoopingCall | None = None
        #: The last (state, accepted) seen of watched jobs that other servers run.
        self._watched_elsewhere: dict[int, tuple[str, int]] = {}
        #: Jobs submitted, records accepted, and jobs ended done/failed/cancelled, for operators.
        self.rates = RateCounter(clock)

    # ------------------------------------------------------------------
    # lifecycle

    async def start(self):
        """Announce this server in the store and load the jobs waiting to run.

        Running jobs are not loaded: their leases belong to whichever server
        granted them (an earlier run of this one, say). A worker that comes
        back holding one takes it over here (``worker_hello``); leases of a
        server that is gone end ``reattach_grace`` seconds after its deadline
        (``_housekeep``).
        """
        now = self.clock.seconds()
        await self.store.beat(now, self.deadline)
        self._last_beat_stored = self.clock.seconds()
        for active in await self.store.load_active():
            if active.state != "running":
                job = self._job_from_store(active)
                self.jobs[job.id] = job
                if job.state == "queued":
                    self._make_runnable(job, now)
        self._housekeeping = task.LoopingCall(self._housekeep)
        self._housekeeping.clock = self.clock
        self._housekeeping.start(self.beat, now=False).addErrback(log.failure, "housekeeping stopped")
        if self.sync_interval:
            self._syncing = task.LoopingCall(self._sync)
            self._syncing.clock = self.clock
            self._syncing.start(self.sync_interval, now=False).addErrback(log.failure, "sync stopped")
        log.info(
            "dispatcher {server} loaded {n} jobs ({q} runnable now){shared}",
            server=self.store.server_id,
            n=len(self.jobs),
            q=len(self._queue),
            shared=f", syncing with other servers every {self.sync_interval:g} s" if self.sync_interval else "",
        )

    def stop(self):
        """Cancel every timer; the dispatcher hands out nothing more."""
        self._stopped = True
        self.dispatching = False
        for loop in (self._housekeeping, self._syncing):
            if loop is not None and loop.running:
                loop.stop()
        for job in self.jobs.values():
            self._cancel_timer(job)
        for worker in self.workers.values():
            if worker.deadline is not None:
                worker.deadline.cancel()

    def timeout_for(self, job_type: str, timeout: float | None) -> float:
        """The run-time limit of one attempt: the job's own, else its type's, else the default."""
        if timeout is not None:
            return timeout
        return self.type_timeouts.get(job_type, self.default_timeout)

    def _job_from_store(self, a: ActiveJob) -> Job:
        return Job(
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
            lease=a.lease if a.state == "running" else None,
            not_before=a.not_before,
            leased_at=a.leased_at if a.state == "running" else None,
        )

    # ------------------------------------------------------------------
    # from the wire: connections

    async def worker_hello(self, conn: IConnection, hello: dict) -> dict:
        """Register a worker; reattach the leases it still holds. Returns kept/lost."""
        self._hellos.add(conn)
        try:
            return await self._worker_hello(conn, hello)
        finally:
            self._hellos.discard(conn)

    async def _worker_hello(self, conn: IConnection, hello: dict) -> dict:
        name = hello["name"]
        holding = {h["lease"]: h["job"] for h in hello.get("holding", [])}
        old = self.workers.get(name)
        if old is not None:
            alive = await old.conn.ping(self.beat)
            if conn not in self._hellos:
                # The newcomer left while we waited: it supersedes nobody.
                raise errors.ShuttingDown("connection closed during the handshake")
            # The world moved while we waited: the old connection may be gone,
            # and another newcomer under this name may have taken its place.
            current = self.workers.get(name)
            if self._stopped:
                raise errors.ShuttingDown()
            if current is not None and current is not old:
                raise errors.NameInUse(f"worker {name!r} has just connected from {current.conn.address}")
            old = current
            if old is not None and alive:
                raise errors.NameInUse(f"worker {name!r} is connected from {old.conn.address}")
            if old is not None:
                log.info("worker {name}: old connection did not answer, superseded", name=name)
                self._worker_gone(old, "superseded", spare=set(holding.items()))
                old.conn.drop("superseded by a new connection")
        if self._stopped:
            raise errors.ShuttingDown()
        kept, lost, taken = [], [], []
        for lease, job_id in holding.items():
            job = self.jobs.get(job_id)
            if job is not None and job.lease == lease and job.worker is None:
                taken.append(job)
            elif job is not None and job.lease is not None:
                lost.append({"job": job_id, "lease": lease, "reason": self._ended.get(lease, "superseded")})
            else:
                # Not a lease this server holds: perhaps another server's (the
                # worker failed over) or an earlier run's of this one.
                try:
                    active = await self.store.take_lease(job_id, lease, name, self.clock.seconds())
                except errors.StaleLease:
                    lost.append({"job": job_id, "lease": lease, "reason": self._ended.get(lease, "expired")})
                    continue
                except errors.UnknownJob:
                    lost.append({"job": job_id, "lease": lease, "reason": "unknown"})
                    continue
                job = self.jobs.pop(job_id, None)
                if job is not None:  # it sat in our queue, stale: the store knows better
                    self._forget(job)
                job = self._job_from_store(active)
                self.jobs[job_id] = job
                taken.append(job)
        if self._stopped:
            raise errors.ShuttingDown()
        now = self.clock.seconds()
        types = hello.get("types", {})
        worker = Worker(
            name=name,
            conn=conn,
            slots=hello.get("slots", 0),
            types={t: parse_version(v) for t, v in types.items()},
            type_versions=dict(types),
            memory=hello.get("memory", 0),
            tags=frozenset(hello.get("tags", ())),
            agent=hello.get("agent", ""),
            connected_at=now,
            last_seen=now,
        )
        for job in taken:
            self._cancel_timer(job)
            if job.leased_at is not None and job.leased_at + job.timeout <= now:
                # Its run-time limit passed while no connection held it: the
                # worker is told now, in ``lost``, and the attempt counts.
                lost.append({"job": job.id, "lease": job.lease, "reason": "timeout"})
                self._end_lease_soon(
                    job, "timeout", error=f"run-time limit of {job.timeout:g} s exceeded", backoff=True
                )
                continue
            self._bind(worker, job)
            kept.append({"job": job.id, "lease": job.lease, "todo": sorted(job.pending)})
        self.workers[name] = worker
        self._worker_by_conn[conn] = worker
        worker.deadline = Deadline(
            self.clock, self.deadline, self.beat, lambda: self._worker_silent(worker), self._say_stalled
        )
        log.info(
            "worker {name} connected from {addr}: {slots} slots, types {types}, kept {k}, lost {l}",
            name=name,
            addr=conn.address,
            slots=worker.slots,
            types=sorted(types),
            k=len(kept),
            l=len(lost),
        )
        self.clock.callLater(0, self._dispatch)
        return {"kept": kept, "lost": lost}

    def client_hello(self, conn: IConnection):
        """A client connected; nothing to do until it watches jobs."""

    def seen(self, conn: IConnection):
        """A line arrived from ``conn``: its heartbeat deadline moves on."""
        worker = self._worker_by_conn.get(conn)
        if worker is not None:
            worker.last_seen = self.clock.seconds()
            if worker.deadline is not None:
                worker.deadline.touch()

    def connection_lost(self, conn: IConnection):
        self._watchers.pop(conn, None)
        self._hellos.discard(conn)
        worker = self._worker_by_conn.get(conn)
        if worker is None:
            return
        if self._stopped:
            # The server is shutting down: its leases outlive it (PROTOCOL.md
            # 6.2), for the worker to reattach after the restart or on
            # another server. Ending them here would cost each job an attempt.
            self._forget_worker(worker)
            return
        self._worker_gone(worker, "disconnected")

    # ------------------------------------------------------------------
    # from the clock

    def _worker_silent(self, worker: Worker):
        """Its deadline passed with nothing read (gridd.deadline: stalls and unread lines are allowed for)."""
        log.warn(
            "worker {name} silent for {d} s: its {n} leases end",
            name=worker.name,
            d=self.deadline,
            n=len(worker.leases),
        )
        self._worker_gone(worker, "expired")
        worker.conn.drop("heartbeat deadline passed")

    def _say_stalled(self, stalled: float):
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

    def _run_time_limit(self, job: Job, lease: str, left: float) -> Deadline:
        """The run-time limit of ``lease``, ``left`` seconds from now, judged as a deadline is."""
        return Deadline(self.clock, left, self.beat, lambda: self._lease_timed_out(job, lease), self._say_stalled)

    def _lease_timed_out(self, job: Job, lease: str):
        """Its run-time limit passed (judged as a deadline is: a DONE sent in time and not yet read is taken)."""
        job.timer = None
        if job.lease != lease or job.closing:
            return
        log.warn(
            "job {job}: lease {lease} passed its run-time limit of {t} s",
            job=job.id,
            lease=lease,
            t=job.timeout,
        )
        self._end_lease_soon(
            job, "timeout", error=f"run-time limit of {job.timeout:g} s exceeded", revoke=True, backoff=True
        )

    async def _housekeep(self):
        """Every beat: say this server is alive; end the leases of servers that are gone.

        A server judges the others by the age of their last beat in the
        store. While the store was out of reach nobody could beat, so right
        after an outage every other server looks long gone: this one waits
        one ``deadline`` of working store before it judges them, time
        enough for the live ones to beat again.
        """
        now = self.clock.seconds()
        try:
            await self.store.beat(now, self.deadline)
        except Exception as e:
            self._housekeeping_trouble.failed(e, self.beat)
            return
        # An outage is a gap of more than a deadline between two beats that
        # the store took: beats that failed, or one that hung (a frozen
        # database) and then went through.
        answered = self.clock.seconds()
        if answered - self._last_beat_stored > self.deadline:
            self._judge_servers_after = answered + self.deadline
            log.info(
                "housekeeping: the store answers again after {s:.1f} s; other servers get {d:g} s to beat"
                " before their leases are judged",
                s=answered - self._last_beat_stored,
                d=self.deadline,
            )
        self._last_beat_stored = answered
        if self.clock.seconds() < self._judge_servers_after:
            self._housekeeping_trouble.ok()
            return
        try:
            ended = await self.store.expire_servers(self.clock.seconds(), self.reattach_grace)
        except Exception as e:
            self._housekeeping_trouble.failed(e, self.beat)
            return
        self._housekeeping_trouble.ok()
        if ended:
            log.info("leases of gone servers ended, jobs re-queued or failed: {ids}", ids=ended)
            await self._reload(*ended)

    async def _sync(self):
        """In a shared store: take in what other servers did since the last look.

        Three things change behind this server's back: jobs submitted or
        re-queued elsewhere become runnable; an operator elsewhere ends a
        lease this server granted, or a worker takes its lease to another
        server; jobs a client here watches progress on other servers.
        """
        try:
            await self._sync_runnable()
            await self._sync_leases()
            await self._sync_watched()
            await self._sync_revocations()
        except Exception as e:
            self._sync_trouble.failed(e, self.sync_interval)
        else:
            self._sync_trouble.ok()

    async def _sync_runnable(self):
        """Take in the head of the shared queue; forget the runnable jobs held here that left it.

        A job submitted here and run by another server's worker would
        otherwise stay in this server's memory until one of its own workers
        tried to claim it: without end on a server that only takes
        submissions. The head is read in queue order, so a job held here
        that sorts within it but is missing from it is no longer queued.
        Only jobs that were runnable here before the read began are judged:
        their queued state was committed before it.
        """
        held = [(job, job.queued_at_push) for job in self.jobs.values() if job in self._queue]
        ids = await self.store.runnable(self.clock.seconds(), self.sync_batch)
        await self._reload(*(i for i in ids if i not in self.jobs))
        head = set(ids)
        horizon = None  # the whole queue was read
        if len(ids) >= self.sync_batch:
            ranks = [(-self.jobs[i].priority, i) for i in ids if i in self.jobs]
            if not ranks:
                return
            horizon = ranks[-1]
        gone = [
            job
            for job, push in held
            if job.id not in head
            and self.jobs.get(job.id) is job
            and job in self._queue
            and job.queued_at_push == push  # the same stay in the queue as before the read
            and (horizon is None or (-job.priority, job.id) <= horizon)
        ]
        for job in gone:
            self._forget(job)
        if gone:
            log.debug("jobs taken or changed by other servers, forgotten here: {ids}", ids=[j.id for j in gone])

    async def _sync_leases(self):
        # Only leases whose grant had committed before the read began, and
        # that no DONE/FAIL/RETURN of ours is ending, can be judged by it.
        settled = [(j, j.lease) for j in self.jobs.values() if j.lease and not j.claiming and not j.closing]
        owned = await self.store.own_leases()
        await self._end_orphans(owned)
        gone = [(j, lease) for j, lease in settled if j.lease == lease and not j.closing and owned.get(j.id) != lease]
        if not gone:
            return
        states = {s["job"]: s["state"] for s in await self.store.job_states([j.id for j, _ in gone])}
        for job, lease in gone:
            if job.lease != lease:
                continue
            if job.unsure_done == lease and states.get(job.id) == "done" and await self._completed_by(job.id, lease):
                if job.lease != lease:
                    continue
                # Its DONE, answered commit_unknown, was made (every record
                # accepted); when the worker sends it again it is answered OK.
                job.pending.clear()
                self._finish(job, "done")
                self._made_dones[lease] = job.id
                while len(self._made_dones) > 10_000:
                    self._made_dones.popitem(last=False)
                continue
            reason = {"cancelled": "cancelled", "paused": "paused", "queued": "requeued"}.get(
                states.get(job.id), "superseded"
            )
            log.info("job {job}: lease {lease} ended elsewhere ({reason})", job=job.id, lease=lease, reason=reason)
            if job.worker is not None:
                job.worker.conn.send("REVOKE", {"job": job.id, "lease": lease, "reason": reason})
            self._detach(job, reason)
            self._forget(job)
        self._dispatch()

    async def _end_orphans(self, owned: dict[int, str]):
        """End leases the store says are ours but no job here holds.

        A grant whose commit was reported failed though it happened (a
        connection lost during COMMIT) leaves one. A lease must look orphaned
        on two looks in a row before it is ended, so that one whose holder is
        still being set up here (a takeover being committed) is left alone.
        """
        known = {j.lease for j in self.jobs.values() if j.lease}
        orphans = {
            (job_id, lease) for job_id, lease in owned.items() if lease not in known and lease not in self._ended
        }
        confirmed, self._orphans = orphans & self._orphans, orphans
        horizon = self.clock.seconds() - ORPHAN_LOOKS_KEPT * (self.sync_interval or 0)
        orphaned = {lease for _, lease in orphans}
        for lease, (_, failed_at) in list(self._unsure_grants.items()):
            if failed_at < horizon and lease not in orphaned:
                del self._unsure_grants[lease]
        for job_id, lease in sorted(confirmed):
            # A grant reported failed never sent its JOB: that attempt did not run.
            attempts = self._unsure_grants.pop(lease, (None, None))[0]
            log.warn(
                "job {job}: lease {lease} is ours in the store but held by no worker; re-queued{uncounted}",
                job=job_id,
                lease=lease,
                uncounted=" (its grant was reported failed: the attempt is not counted)" if attempts is not None else "",
            )
            try:
                await self.store.release(
                    job_id, lease, "queued", self.clock.seconds(), reason="orphaned", attempts=attempts
                )
            except errors.GriddError:
                continue
            await self._reload(job_id)

    async def _sync_revocations(self):
        """Credentials revoked through another server: their connections here close too."""
        if self.on_credential_revoked is None:
            return
        revoked = {c["id"] for c in await self.store.list_credentials() if c.get("revoked") is not None}
        for credential_id in sorted(revoked - self._revoked_seen):
            self.on_credential_revoked(credential_id)
        self._revoked_seen = revoked

    async def _sync_watched(self):
        watched = set()
        for ids in self._watchers.values():
            if ids is not None:
                watched |= ids
        # Only a job leased here is followed in memory; any other may move on
        # another server (even one queued here: another server may claim it).
        self._watched_elsewhere = {i: seen for i, seen in self._watched_elsewhere.items() if i in watched}
        elsewhere = sorted(i for i in watched if i not in self.jobs or self.jobs[i].lease is None)[:1000]
        if not elsewhere:
            return
        for status in await self.store.job_states(elsewhere):
            job = self.jobs.get(status["job"])
            if job is not None and job.lease is None and status["state"] != job.state:
                self._forget(job)  # our copy is stale: it runs, or ended, elsewhere
            key = (status["state"], status["accepted"])
            if self._watched_elsewhere.get(status["job"]) != key:
                self._watched_elsewhere[status["job"]] = key
                self._send_event(status)

    def _backoff_over(self, job: Job):
        job.timer = None
        if job.state == "queued" and job.id in self.jobs and not job.changing:
            job.not_before = None
            self._queue.push(job)
            self._dispatch()

    # ------------------------------------------------------------------
    # from the wire: worker requests

    async def result(self, conn, job_id: int, lease: str, results: list[dict]) -> dict:
        job = self._leased(conn, job_id, lease)
        records = self._check_results(job, results)
        accepted = await self._commit_results(job, records, self.store.add_results)
        self._notify(job)
        return {"accepted": accepted}

    async def progress(self, conn, job_id: int, lease: str, note: str | None) -> dict:
        job = self._leased(conn, job_id, lease)
        job.note = note
        self._notify(job, note=note)
        return {}

    async def done(self, conn, job_id: int, lease: str, results: list[dict]) -> dict:
        try:
            job = self._leased(conn, job_id, lease)
        except errors.StaleLease:
            if self._made_dones.pop(lease, None) is not None:
                return {}  # its DONE answered commit_unknown was made (found by a sync): sent again, it is OK
            raise
        records = self._check_results(job, results)
        missing = len(job.pending) - len(job.in_flight) - len(records)
        if missing:
            raise errors.Incomplete(f"{missing} records have no accepted result", missing=missing)
        job.closing = True
        try:
            await self._commit_results(job, records, functools.partial(self._complete, job))
        except BaseException as e:
            if isinstance(e, errors.CommitUnknown):
                job.unsure_done = lease
            self._closing_failed(job, lease)
            raise
        self._finish(job, "done")
        return {}

    async def _complete(self, job: Job, job_id: int, lease: str, records: list[RecordResult], now: float):
        """The store's ``complete``; a DONE sent again after ``commit_unknown`` that had been made is done."""
        try:
            return await self.store.complete(job_id, lease, records, now)
        except errors.StaleLease:
            if job.unsure_done != lease or not await self._completed_by(job_id, lease):
                raise

    async def _completed_by(self, job_id: int, lease: str) -> bool:
        """Did ``lease`` complete the job (its DONE answered commit_unknown was made, after all)?"""
        history = (await self.store.get_job(job_id))["history"]
        made = any(e["event"] == "completed" and e["lease"] == lease for e in history)
        if made:
            log.info("job {job}: the DONE of lease {lease} answered commit_unknown had been made", job=job_id, lease=lease)
        return made

    async def fail(self, conn, job_id: int, lease: str, error: str, retry: bool) -> dict:
        job = self._leased(conn, job_id, lease)
        state, not_before = await self._close_lease(job, "failed", error=error, retry=retry, backoff=True)
        reply = {"state": state}
        if not_before is not None:
            reply["retry_in"] = max(0.0, not_before - self.clock.seconds())
        return reply

    async def give_back(self, conn, job_id: int, lease: str, reason: str | None) -> dict:
        job = self._leased(conn, job_id, lease)
        await self._close_lease(job, "returned", error=reason, count=False)
        return {}

    async def set_slots(self, conn, slots: int) -> dict:
        worker = self._worker_by_conn.get(conn)
        if worker is not None:
            worker.slots = slots
            self._dispatch()
        return {}

    def _leased(self, conn, job_id: int, lease: str) -> Job:
        """The job ``lease`` names, if it is that job's current lease on ``conn``."""
        worker = self._worker_by_conn.get(conn)
        job = worker.leases.get(lease) if worker is not None else None
        if job is None or job.id != job_id or job.closing:
            if job_id not in self.jobs and lease not in self._ended:
                raise errors.UnknownJob(f"no active job {job_id} with lease {lease}")
            raise errors.StaleLease(f"lease {lease} of job {job_id} is not yours ({self._ended.get(lease, 'unknown')})")
        return job

    def _check_results(self, job: Job, results: list[dict]) -> list[RecordResult]:
        seen, unknown, duplicate = set(), [], []
        for r in results:
            i = r["i"]
            if i >= job.total:
                unknown.append(i)
            elif i not in job.pending or i in job.in_flight or i in seen:
                duplicate.append(i)
            seen.add(i)
        if unknown:
            raise errors.UnknownRecord(f"job {job.id} has records 0..{job.total - 1}", records=unknown)
        if duplicate:
            raise errors.DuplicateResult(records=duplicate)
        return [RecordResult(r["i"], r.get("out"), r.get("error")) for r in results]

    async def _commit_results(self, job: Job, records: list[RecordResult], write) -> int:
        indices = {r.index for r in records}
        lease = job.lease
        job.in_flight |= indices
        try:
            accepted = await write(job.id, lease, records, self.clock.seconds())
        except errors.StaleLease:
            self._ended_elsewhere(job, lease)
            raise
        except errors.DuplicateResult as e:
            # The store already has these results: an earlier write of ours that
            # was reported failed (its COMMIT lost with the connection) had in
            # fact committed. They are accepted; this server stops waiting for
            # them, else DONE would be refused as incomplete on every attempt.
            known = indices.intersection(e.extra.get("records") or ())
            for i in known:
                job.pending.pop(i, None)
            if known:
                self._notify(job)
            raise
        finally:
            job.in_flight -= indices
        for i in indices:
            job.pending.pop(i, None)
        self.rates.add("records", len(indices))
        return accepted

    async def _close_lease(self, job: Job, kind: str, *, error=None, retry=True, backoff=False, count=True):
        """A worker ends its own lease (FAIL, RETURN): commit, then apply."""
        lease = job.lease
        job.closing = True
        state, not_before, attempts = self._next_state(job, kind, retry=retry, backoff=backoff, count=count)
        try:
            await self.store.release(
                job.id,
                lease,
                state,
                self.clock.seconds(),
                reason=kind,
                error=error,
                not_before=not_before,
                attempts=attempts,
            )
        except errors.StaleLease:
            self._ended_elsewhere(job, lease)
            raise
        except BaseException:
            self._closing_failed(job, lease)
            raise
        self._detach(job, kind)
        job.attempts = attempts
        self._enter(job, state, not_before)
        return state, not_before

    def _ended_elsewhere(self, job: Job, lease: str):
        """The store says ``lease`` is over though we hold it: another server ended or took it."""
        if job.lease == lease:
            log.info("job {job}: lease {lease} was ended elsewhere", job=job.id, lease=lease)
            self._detach(job, "superseded")
            self._forget(job)
            self._dispatch()

    def _closing_failed(self, job: Job, lease: str):
        """A DONE/FAIL/RETURN did not commit: the lease goes on, unless its worker left meanwhile."""
        job.closing = False
        if self._stopped:
            return  # the lease stays in the store, for its worker to reattach after the restart
        if job.lease == lease and (job.worker is None or job.worker.conn not in self._worker_by_conn):
            self._end_lease_soon(job, "expired", error="worker lost")

    # ------------------------------------------------------------------
    # from the wire: client requests

    async def submit(self, specs: list[dict], submitter: str | None = None) -> dict:
        if len(specs) > MAX_JOBS_PER_SUBMIT:
            raise errors.TooMany(f"at most {MAX_JOBS_PER_SUBMIT} jobs per SUBMIT", limit=MAX_JOBS_PER_SUBMIT)
        if self._stopped:
            raise errors.ShuttingDown()
        for index, spec in enumerate(specs):
            self._check_fits(index, spec)
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
            self._queue.push(job)
            self._notify(job)
        self.rates.add("submitted", len(ids))
        self._dispatch()
        return {"jobs": ids}

    def _check_fits(self, index: int, spec: dict):
        """Refuse a job whose JOB line, at its largest, would exceed the line limit."""
        records = spec["records"]
        largest = {
            "job": MAX_ID,
            "lease": "x" * 32,
            "type": spec["type"],
            "attempt": 1000,
            "params": spec.get("params", {}),
            "total": len(records),
            "records": [{"i": i, "data": data} for i, data in enumerate(records)],
            "timeout": float(self.timeout_for(spec["type"], spec.get("timeout"))),
        }
        size = len(wire.encode("JOB", largest)) - 1
        if size > self.max_line:
            raise errors.TooLarge(
                f"job {index} of the SUBMIT would need a {size}-byte JOB line; split its records",
                job=index,
                max_line=self.max_line,
            )

    async def show(self, job_id: int) -> dict:
        view = await self.store.get_job(job_id)
        job = self.jobs.get(job_id)
        if job is not None and job.note is not None:
            view["note"] = job.note
        return {"job": view}

    async def list_jobs(self, state=None, type=None, after=0, limit=100) -> dict:
        jobs = await self.store.list_jobs(state=state, type=type, after=after, limit=limit + 1)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return {"jobs": jobs, "next": jobs[-1]["id"] if more else None}

    async def results(self, job_id: int, after: int = -1, limit: int = 1000) -> dict:
        rows = await self.store.get_results(job_id, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"results": rows, "next": rows[-1]["i"] if more else None}

    async def workers_view(self) -> dict:
        return {
            "workers": [
                {
                    "name": w.name,
                    "address": w.conn.address,
                    "slots": w.slots,
                    "running": sorted(j.id for j in w.leases.values()),
                    "types": w.type_versions,
                    "memory": w.memory,
                    "tags": sorted(w.tags),
                    "drained": w.drained,
                    "agent": w.agent,
                    "connected": w.connected_at,
                    "last_seen": w.last_seen,
                }
                for w in self.workers.values()
            ]
        }

    def queue_depth(self) -> dict[tuple[str, int], int]:
        """Queued jobs (runnable or in retry backoff) by (type, priority), highest priority first."""
        depth = Counter((j.type, j.priority) for j in self.jobs.values() if j.state == "queued")
        return dict(sorted(depth.items(), key=lambda item: (-item[0][1], item[0][0])))

    async def stats(self) -> dict:
        counts = await self.store.counts()
        return {
            "jobs": counts,
            "workers": len(self.workers),
            "slots": sum(w.slots for w in self.workers.values()),
            "busy": sum(len(w.leases) for w in self.workers.values()),
            "queued_runnable": len(self._queue),
            "dispatching": self.dispatching,
        }

    async def watch(self, conn: IConnection, job_ids: list[int]) -> dict:
        """Subscribe ``conn`` to the jobs' changes; reply with their states now.

        The store is read first (for the jobs not held here, and to refuse
        unknown ones); the views of held jobs are taken after every read, in
        the same turn as the subscription, so no change falls between the
        reply's views and the first EVENT.
        """
        stored: dict[int, dict] = {}
        last_held: dict[int, dict] = {}
        for _ in range(5):  # a job may leave this server's memory while another is read
            last_held.update((i, self.jobs[i].event_body()) for i in job_ids if i in self.jobs)
            missing = [i for i in dict.fromkeys(job_ids) if i not in self.jobs and i not in stored]
            if not missing:
                break
            for job_id in missing:
                j = await self.store.get_job(job_id)
                stored[job_id] = {"job": job_id, "state": j["state"], "accepted": j["accepted"], "total": j["total"]}
        views = [
            self.jobs[i].event_body() if i in self.jobs else stored.get(i) or last_held[i] for i in job_ids
        ]
        if not job_ids:
            self._watchers[conn] = None
        else:
            current = self._watchers.get(conn, set())
            if current is not None:
                self._watchers[conn] = current | set(job_ids)
        return {"jobs": views}

    async def job_submitter(self, job_id: int) -> str | None:
        """Who submitted the job (the session's ownership check); raises ``UnknownJob``."""
        return (await self.store.get_job(job_id))["submitter"]

    async def cancel(self, job_id: int) -> dict:
        return await self._operator(job_id, "cancelled", allowed=("queued", "running", "paused"))

    async def pause(self, job_id: int) -> dict:
        return await self._operator(job_id, "paused", allowed=("queued", "running"))

    async def resume(self, job_id: int) -> dict:
        return await self._operator(job_id, "queued", allowed=("paused",))

    async def requeue(self, job_id: int) -> dict:
        return await self._operator(
            job_id, "queued", allowed=("running", "failed", "cancelled", "paused"), reset_attempts=True
        )

    async def worker_action(self, name: str, action: str) -> dict:
        worker = self.workers.get(name)
        if worker is None:
            raise errors.UnknownWorker(f"no connected worker {name!r}")
        log.info("worker {name}: {action} by operator", name=name, action=action)
        if action in ("drain", "undrain"):
            worker.drained = action == "drain"
            worker.conn.send("DRAIN", {"drain": worker.drained})
            if not worker.drained:
                self._dispatch()
        else:
            self._worker_gone(worker, "disconnected", count=False)
            worker.conn.drop("disconnected by an operator")
        return {}

    async def set_dispatching(self, enabled: bool) -> dict:
        if enabled != self.dispatching:
            log.info("dispatching {state} by operator", state="enabled" if enabled else "stopped")
        self.dispatching = enabled and not self._stopped
        self._dispatch()
        return {"dispatching": self.dispatching}

    async def _operator(self, job_id: int, target: str, allowed: tuple, reset_attempts=False) -> dict:
        """Pause, resume, cancel or requeue: revoke a running lease, or change a resting job."""
        reason = {"cancelled": "cancelled", "paused": "paused", "queued": "requeued"}[target]
        job = self.jobs.get(job_id)
        if job is not None and job.lease is not None:
            if "running" not in allowed or job.closing:
                raise errors.InvalidState(f"job {job_id} is running", state="running")
            attempts = 0 if reset_attempts else job.attempts - 1
            await self._end_lease(job, reason, state=target, attempts=attempts, revoke=True)
            return {"state": target}
        # No lease: the job rests (queued, paused, terminal), or its lease's
        # end is being committed; the store, which sees that commit first,
        # decides. Until it has, the job is held out of the run queue: a slot
        # freed meanwhile must not hand it out under the change.
        if job is not None:
            job.changing += 1
            self._queue.discard(job)
        try:
            try:
                try:
                    await self.store.set_state(
                        job_id,
                        tuple(s for s in allowed if s != "running"),
                        target,
                        self.clock.seconds(),
                        reason=reason,
                        reset_attempts=reset_attempts,
                    )
                except errors.InvalidState as e:
                    if e.extra.get("state") != "running" or "running" not in allowed:
                        raise
                    # Running under another server's lease: end it in the store; that
                    # server revokes its worker's lease when it next syncs.
                    lease = (await self.store.get_job(job_id))["lease"]
                    await self.store.end_lease(job_id, lease, target, self.clock.seconds(), reason=reason)
            except errors.CommitUnknown:
                # Made or not, the copy here may be wrong either way (a RESUME
                # made would leave it paused here for good): forget it, and the
                # store's view comes back at the next sync, or with a change.
                current = self.jobs.get(job_id)
                if current is not None and current.lease is None:
                    self._forget(current)
                raise
            current = self.jobs.get(job_id)  # the world moved while we waited
            if current is None:
                await self._reload(job_id)  # a terminal job came back (requeue)
            elif current.lease is not None:
                # It came into memory (its SUBMIT's reply) and was handed out
                # after this change committed: the claim, committed after the
                # change, decides (_granted, or _grant_failed with the state).
                pass
            else:
                self._queue.discard(current)
                self._cancel_timer(current)
                if reset_attempts:
                    current.attempts = 0
                current.not_before = None
                self._enter(current, target, None)
        finally:
            if job is not None:
                job.changing -= 1
                if (
                    not job.changing
                    and self.jobs.get(job_id) is job
                    and job.state == "queued"
                    and job.lease is None
                    and job not in self._queue
                    and job.timer is None
                ):
                    self._make_runnable(job, self.clock.seconds())
                    self._dispatch()
        return {"state": target}

    async def _reload(self, *job_ids: int):
        """Take the store's view of these jobs: keep those that wait to run here.

        For a requeue, a disagreement with the store, another server's
        re-queued or new jobs, and leases of gone servers.
        """
        if not job_ids:
            return
        for active in await self.store.load_active(job_ids=list(job_ids)):
            if active.state == "running" or active.id in self.jobs:
                continue  # someone's lease; or it arrived while we read
            job = self._job_from_store(active)
            self.jobs[job.id] = job
            if job.state == "queued":
                self._make_runnable(job, self.clock.seconds())
            self._notify(job)
        self._dispatch()

    # ------------------------------------------------------------------
    # transitions

    def _next_state(self, job: Job, kind: str, *, retry=True, backoff=False, count=True):
        """Where a job goes when a lease ends for ``kind``: (state, not_before, attempts)."""
        attempts = job.attempts if count else job.attempts - 1
        if not retry or attempts >= 1 + job.retries:
            return "failed", None, attempts
        not_before = None
        if backoff:
            delay = min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1))
            not_before = self.clock.seconds() + delay
        return "queued", not_before, attempts

    def _end_lease(self, job: Job, reason: str, *, state=None, attempts=None, error=None, revoke=False, backoff=False):
        """End ``job``'s lease now (server side): stale at once, next state on commit.

        Without ``state`` this is a failed attempt (worker lost, timeout);
        with it, an operator's decision. Returns the Deferred of the write.
        """
        lease = job.lease
        if state is None:
            state, not_before, attempts = self._next_state(job, reason, backoff=backoff)
        else:
            not_before = None
        if revoke and job.worker is not None and not job.claiming:
            job.worker.conn.send("REVOKE", {"job": job.id, "lease": lease, "reason": reason})
        self._detach(job, reason)
        write = dict(state=state, reason=reason, error=error, not_before=not_before, attempts=attempts)
        return defer.Deferred.fromCoroutine(self._write_release(job, lease, **write))

    def _end_lease_soon(self, job: Job, reason: str, **kwargs):
        """End a lease for a reason no request waits on; a failed write is retried."""
        lease = job.lease
        self._end_lease(job, reason, **kwargs).addErrback(self._release_failed, job, lease, reason, kwargs)

    def _release_failed(self, failure, job: Job, lease: str, reason: str, kwargs: dict):
        if failure.check(errors.StaleLease, errors.UnknownJob, errors.InvalidState):
            # The store moved on without us, and the store is the truth.
            log.error(
                "job {job}: the store disagrees about lease {lease}: {f.value}",
                job=job.id,
                lease=lease,
                f=failure,
            )
            self._forget(job)
            defer.Deferred.fromCoroutine(self._reload(job.id)).addErrback(lambda f: log.failure("reload", f))
            return
        if self._stopped:
            # The lease stays in the store: it ends there when its server is
            # found gone (or a worker reattaches it after the restart).
            log.warn(
                "job {job}: the end of lease {lease} was not recorded before shutdown: {f.value}",
                job=job.id,
                lease=lease,
                f=failure,
            )
            return
        log.failure("job {job}: could not record the end of lease {lease}; retrying", failure, job=job.id, lease=lease)

        def retry():
            job.timer = None
            job.lease = lease  # re-detached by _end_lease
            self._end_lease_soon(job, reason, **kwargs)

        job.timer = self.clock.callLater(self.backoff_base, retry)

    async def _write_release(self, job, lease, *, state, reason, error, not_before, attempts):
        await self.store.release(
            job.id,
            lease,
            state,
            self.clock.seconds(),
            reason=reason,
            error=error,
            not_before=not_before,
            attempts=attempts,
        )
        job.attempts = attempts
        self._enter(job, state, not_before)

    def _detach(self, job: Job, reason: str):
        """The lease ends in memory: stale from now on, the worker's slot is free."""
        self._cancel_timer(job)
        if job.lease is not None:
            self._ended[job.lease] = reason
            while len(self._ended) > 100_000:
                self._ended.popitem(last=False)
        if job.worker is not None:
            job.worker.leases.pop(job.lease, None)
        job.lease = None
        job.leased_at = None
        job.worker = None
        job.closing = False

    def _enter(self, job: Job, state: str, not_before: float | None):
        """Apply a committed state to the in-memory job."""
        job.state = state
        if state in ("done", "failed", "cancelled"):
            self._finish(job, state)
            return
        if state == "queued":
            self._make_runnable(job, self.clock.seconds(), not_before)
        self._notify(job)
        self._dispatch()

    def _finish(self, job: Job, state: str):
        self._detach(job, state)
        self._queue.discard(job)
        job.state = state
        self.jobs.pop(job.id, None)
        self.rates.add(state)
        self._notify(job)
        self._dispatch()

    def _forget(self, job: Job):
        self._cancel_timer(job)
        self._queue.discard(job)
        self.jobs.pop(job.id, None)

    def _make_runnable(self, job: Job, now: float, not_before: float | None = None):
        not_before = not_before if not_before is not None else job.not_before
        job.not_before = not_before
        if not_before is not None and not_before > now:
            self._cancel_timer(job)
            job.timer = self.clock.callLater(not_before - now, self._backoff_over, job)
        elif not job.changing:  # else the change's end makes it runnable (_operator)
            job.not_before = None
            self._queue.push(job)

    def _bind(self, worker: Worker, job: Job):
        """Give a reattached lease to ``worker``; its run-time limit still counts from the grant.

        Reconnecting (or a server restart) does not buy a job more time: a
        lease past its limit while nobody held it times out at once.
        """
        job.worker = worker
        worker.leases[job.lease] = job
        now = self.clock.seconds()
        started = job.leased_at if job.leased_at is not None else now
        left = max(0.0, started + job.timeout - now)
        job.timer = self._run_time_limit(job, job.lease, left)

    def _forget_worker(self, worker: Worker):
        """Take ``worker`` out of the tables and stop its heartbeat deadline; its leases are untouched."""
        if self._worker_by_conn.get(worker.conn) is worker:
            del self._worker_by_conn[worker.conn]
        if self.workers.get(worker.name) is worker:
            del self.workers[worker.name]
        if worker.deadline is not None:
            worker.deadline.cancel()

    def _worker_gone(self, worker: Worker, reason: str, spare=frozenset(), count=True):
        """Forget a worker; every lease it held ends, except the (lease, job id) pairs in ``spare``."""
        self._forget_worker(worker)
        for lease, job in list(worker.leases.items()):
            if (lease, job.id) in spare:
                # It moves to the new connection of the same worker.
                self._cancel_timer(job)
                job.worker = None
                del worker.leases[lease]
            elif job.closing:
                continue  # its DONE/FAIL/RETURN decides; see _closing_failed
            elif count:
                self._end_lease_soon(job, reason, error=f"worker {worker.name} lost ({reason})")
            else:
                self._end_lease_soon(job, reason, state="queued", attempts=job.attempts - 1)
        if reason != "superseded":
            log.info("worker {name} gone ({reason})", name=worker.name, reason=reason)

    def _cancel_timer(self, job: Job):
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        job.timer = None

    # ------------------------------------------------------------------
    # pushing work and events

    def _dispatch(self):
        """Push runnable jobs to free matching slots until one of them runs out."""
        if not self.dispatching or self._in_dispatch or not self._queue:
            return
        self._in_dispatch = True
        try:
            progress = True
            while progress and self._queue:
                progress = False
                for worker in list(self.workers.values()):
                    if worker.free <= 0 or worker.drained:
                        continue
                    job_id = self._queue.pop_for(worker)
                    if job_id is not None:
                        self._lease(worker, self.jobs[job_id])
                        progress = True
        finally:
            self._in_dispatch = False

    def _lease(self, worker: Worker, job: Job):
        """Claim ``job`` for ``worker`` in the store; send it once the claim has committed.

        The slot is taken at once, so one dispatch round does not hand a
        worker more jobs than it has slots. The claim is the store's
        ``grant``, which fails if the job is no longer queued there (another
        server claimed it first, when several share a database).
        """
        lease = self.new_lease()
        job.lease = lease
        job.leased_at = self.clock.seconds()
        job.state = "running"
        job.attempts += 1
        job.claiming = True
        job.worker = worker
        worker.leases[lease] = job
        d = self.store.grant(job.id, lease, worker.name, self.clock.seconds())
        d.addCallbacks(self._granted, self._grant_failed, (job, lease), None, (job, lease))

    def _granted(self, claimed: ActiveJob, job: Job, lease: str):
        job.claiming = False
        if self._grants_failing:
            self._grants_failing = False
            log.info("dispatching again: the store records leases")
        if job.lease != lease:
            return  # the lease ended while it was being claimed; its release follows the grant
        # The store's count and records, read in the claim, not this copy's.
        job.attempts, job.pending = claimed.attempts, claimed.pending
        left = max(0.0, job.leased_at + job.timeout - self.clock.seconds())
        job.timer = self._run_time_limit(job, lease, left)
        job.worker.conn.send(
            "JOB",
            {
                "job": job.id,
                "lease": lease,
                "type": job.type,
                "attempt": job.attempts,
                "params": job.params,
                "total": job.total,
                "records": [{"i": i, "data": data} for i, data in sorted(job.pending.items())],
                "timeout": float(job.timeout),
            },
        )
        self._notify(job)

    def _grant_failed(self, failure, job: Job, lease: str):
        job.claiming = False
        if job.lease != lease:
            return
        self._detach(job, "unclaimed")
        # Not a lease that ended: one that (as far as we know) never began. If
        # its grant did commit after all, _end_orphans finds it in the store.
        self._ended.pop(lease, None)
        state = failure.value.extra.get("state") if failure.check(errors.InvalidState) else None
        if state in ("done", "failed", "cancelled", "paused"):
            # An operator's change committed before the claim: take it in.
            log.info("job {job}: not claimed, it is {state}", job=job.id, state=state)
            job.attempts -= 1
            if state == "paused":
                # Said, then forgotten: a copy held here would go stale (with
                # several servers it can be resumed and run elsewhere); a
                # RESUME here reloads it from the store.
                job.state = "paused"
                self._notify(job)
                self._forget(job)
            else:
                self._finish(job, state)
        elif failure.check(errors.InvalidState, errors.UnknownJob):
            # Someone else has it now (another server sharing the store): not ours to run.
            log.info("job {job}: claimed elsewhere ({f.value})", job=job.id, f=failure)
            self._forget(job)
        else:
            if failure.check(errors.Unavailable):
                # Said once per outage, not once per job and second.
                if not self._grants_failing:
                    self._grants_failing = True
                    log.warn(
                        "dispatching held: the store cannot record leases ({f.value}); no job is sent until it can"
                        " (trying again every {s:g} s)",
                        f=failure,
                        s=self.backoff_base,
                    )
            else:
                log.failure("job {job}: could not record lease {lease}", failure, job=job.id, lease=lease)
            job.attempts -= 1
            if failure.check(errors.CommitUnknown):
                # The grant may have committed all the same: if its lease turns
                # up orphaned, the attempt (never sent) is given back.
                self._unsure_grants[lease] = (job.attempts, self.clock.seconds())
            job.state = "queued"
            self._make_runnable(job, self.clock.seconds(), self.clock.seconds() + self.backoff_base)
        self._dispatch()

    def _notify(self, job: Job, **extra):
        if not self._watchers:
            return
        body = job.event_body()
        body.update(extra)
        self._send_event(body)

    def _send_event(self, body: dict):
        sent = False
        for conn, ids in self._watchers.items():
            if ids is None or body["job"] in ids:
                conn.send("EVENT", body)
                sent = True
        if sent and self.sync_interval:
            # What watchers were told last: the sync of watched jobs does not
            # tell them again (a job finished here leaves memory, and the next
            # sync would otherwise announce its end a second time).
            self._watched_elsewhere[body["job"]] = (body["state"], body["accepted"])
