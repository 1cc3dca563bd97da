"""Connected workers: their handshake, their heartbeat deadlines, and what their going ends.

Rules this module owns:

- A worker's name is held by one connection at a time. A HELLO under a name
  already connected pings the old connection (one beat): if it answers the
  newcomer is refused (``name_in_use``); if not, the newcomer supersedes it
  and takes over the leases it says it holds. The old connection's going is
  always made final, and a newcomer that left while it waited supersedes
  nobody.
- A HELLO lists the leases the worker holds. Each is kept if it is the
  job's current lease here and unheld, or if the store lets this server take
  it over (the worker failed over, or this server restarted); otherwise it
  is reported lost with the reason it ended. A lease whose run-time limit
  passed while nobody held it is reported lost (timeout) and its attempt
  counts.
- Every line from a worker moves its heartbeat deadline on; a worker whose
  deadline passes (``gridd.deadline`` allows for stalls and unread lines)
  is dropped and every lease it held ends at once, each a failed attempt.
- A worker silent for more than one beat is quiet: it gets no new job (it
  keeps its leases) until a line from it arrives; then its free slots are
  filled at once if a dispatch passed it over meanwhile. Its silence is
  judged as a deadline is, by a one-beat ``gridd.deadline.Deadline``: lines
  already arrived are read first, and a server that was itself stalled
  gives it one more beat, so a stall of this server does not make every
  worker quiet.
- A worker is in the host state it says (HELLO ``state``, ``STATE``): idle,
  busy or vacating. Only an idle one gets new jobs; busy and vacating ones
  keep their leases; ``STATE idle`` fills free slots at once.
- ``CHECK`` (after a suspend) answers as a HELLO's reattach does, for the
  leases listed: kept, with the records still to do, while the lease is the
  job's and this connection's; otherwise lost with the reason it ended.
- A worker that disconnects loses its leases the same way; one an operator
  disconnects gives them back without using an attempt. When the server is
  shutting down, leases outlive their connections: workers reattach them
  after the restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from gridd import errors
from gridd.deadline import Deadline
from gridd.scheduler.connection import IConnection
from gridd.scheduler.model import LeaseState, Worker, parse_version

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["Workers"]

log = Logger()


class Workers:
    """The workers connected to this server, by name and by connection."""

    def __init__(self, core: Dispatcher):
        self.core = core
        self.by_name: dict[str, Worker] = {}
        self.by_connection: dict[IConnection, Worker] = {}
        #: Connections whose HELLO is being handled (and that are still there).
        self._hellos: set[IConnection] = set()

    def holds(self, worker: Worker) -> bool:
        """Is ``worker`` still the connected worker of its connection?"""
        return self.by_connection.get(worker.conn) is worker

    # A read-only mapping of name -> Worker; ``values()`` is a copy, so that
    # whoever walks it may change the table meanwhile.
    def __iter__(self):
        return iter(list(self.by_name))

    def __len__(self):
        return len(self.by_name)

    def __getitem__(self, name: str) -> Worker:
        return self.by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get(self, name: str) -> Worker | None:
        return self.by_name.get(name)

    def values(self):
        return list(self.by_name.values())

    def items(self):
        return list(self.by_name.items())

    # ------------------------------------------------------------------
    # from the wire

    async def hello(self, conn: IConnection, hello: dict) -> dict:
        """Register a worker; reattach the leases it still holds. Returns kept/lost."""
        self._hellos.add(conn)
        try:
            return await self._hello(conn, hello)
        finally:
            self._hellos.discard(conn)

    async def _hello(self, conn: IConnection, hello: dict) -> dict:
        core = self.core
        name = hello["name"]
        holding = {h["lease"]: h["job"] for h in hello.get("holding", [])}
        old = self.by_name.get(name)
        if old is not None:
            alive = await old.conn.ping(core.beat)
            if conn not in self._hellos:
                # The newcomer left while we waited: it supersedes nobody.
                raise errors.ShuttingDown("connection closed during the handshake")
            # The world moved while we waited: the old connection may be gone,
            # and another newcomer under this name may have taken its place.
            current = self.by_name.get(name)
            if core.stopped:
                raise errors.ShuttingDown()
            if current is not None and current is not old:
                raise errors.NameInUse(f"worker {name!r} has just connected from {current.conn.address}")
            old = current
            if old is not None and alive:
                raise errors.NameInUse(f"worker {name!r} is connected from {old.conn.address}")
            if old is not None:
                log.info("worker {name}: old connection did not answer, superseded", name=name)
                self.gone(old, "superseded", spare=set(holding.items()))
                old.conn.drop("superseded by a new connection")
        if core.stopped:
            raise errors.ShuttingDown()
        _, lost, taken = await self._sort_holding(name, holding, None)  # no worker yet: nothing is held by it
        if core.stopped:
            raise errors.ShuttingDown()
        now = core.clock.seconds()
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
            state=hello.get("state", "idle"),
            state_since=now,
        )
        kept = self._take(worker, taken, lost)
        self.by_name[name] = worker
        self.by_connection[conn] = worker
        worker.deadline = Deadline(core.clock, core.deadline, core.beat, lambda: self._silent(worker), core.say_stalled)
        worker.quiet_timer = self._quiet_timer(worker)
        log.info(
            "worker {name} connected from {addr}: {slots} slots, types {types}, {state}, kept {k}, lost {l}",
            name=name,
            addr=conn.address,
            slots=worker.slots,
            types=sorted(types),
            state=worker.state,
            k=len(kept),
            l=len(lost),
        )
        setting = core.control.host_settings.get(name)
        if setting is not None:
            # What an operator last said of this worker's host, after the HELLO reply and before any JOB.
            core.clock.callLater(0, self._tell_host, worker, *setting)
        core.clock.callLater(0, core.dispatch)
        return {"kept": kept, "lost": lost}

    def _tell_host(self, worker: Worker, busy: bool, reason: str):
        if self.holds(worker):
            worker.conn.host(busy, reason)

    async def _sort_holding(self, name: str, holding: dict[str, int], worker: Worker | None):
        """Sort the leases a worker says it holds (token -> job id): (held, lost, taken).

        ``held``: (token, job) of the jobs whose current lease it is and that ``worker`` (the
        connected worker asking, or None in a HELLO) holds here; ``lost``:
        entries of the reply for the leases no longer its own, with their
        reason; ``taken``: jobs whose current lease it is and that nobody
        holds here (the store let this server take those over), to be bound
        by :meth:`_take`.
        """
        core = self.core
        held, lost, taken = [], [], []
        for token, job_id in holding.items():
            job = core.jobs.get(job_id)
            if job is not None and job.token == token and worker is not None and job.worker is worker:
                held.append((token, job))
            elif job is not None and job.token == token and job.worker is None:
                taken.append(job)
            elif job is not None and job.lease is not None:
                lost.append({"job": job_id, "lease": token, "reason": core.leases.ended.get(token, "superseded")})
            else:
                # Not a lease this server holds: perhaps another server's (the
                # worker failed over) or an earlier run's of this one.
                try:
                    active = await core.store.take_lease(job_id, token, name, core.clock.seconds())
                except errors.StaleLease:
                    lost.append({"job": job_id, "lease": token, "reason": core.leases.ended.get(token, "expired")})
                    continue
                except errors.UnknownJob:
                    lost.append({"job": job_id, "lease": token, "reason": "unknown"})
                    continue
                job = core.jobs.pop(job_id, None)
                if job is not None:  # it sat in our queue, stale: the store knows better
                    core.forget(job)
                job = core.job_from_store(active)
                core.jobs[job_id] = job
                taken.append(job)
        return held, lost, taken

    def _take(self, worker: Worker, taken: list, lost: list) -> list[dict]:
        """Bind the ``taken`` jobs to ``worker``; returns the reply's ``kept`` entries (and adds to ``lost``)."""
        core = self.core
        now = core.clock.seconds()
        kept = []
        for job in taken:
            core.leases.stop(job)
            if job.lease.granted_at + job.timeout <= now:
                # Its run-time limit passed while no connection held it: the
                # worker is told now, in ``lost``, and the attempt counts.
                lost.append({"job": job.id, "lease": job.token, "reason": "timeout"})
                core.leases.end_soon(
                    job, "timeout", error=f"run-time limit of {job.timeout:g} s exceeded", backoff=True
                )
                continue
            core.leases.bind(worker, job)
            kept.append({"job": job.id, "lease": job.token, "todo": sorted(job.pending)})
        return kept

    async def check(self, conn: IConnection, holding: list[dict]) -> dict:
        """``CHECK``: which of the leases a connected worker lists are still its own, as a HELLO's reply says.

        A lease it holds here is kept, with the records still without an
        accepted result; one that ended (expired, superseded, timed out) is
        lost, with the reason it ended. Leases it does not list are untouched.
        """
        core = self.core
        worker = self.by_connection.get(conn)
        if worker is None:
            raise errors.ShuttingDown("the connection is closing")
        name = worker.name
        listed = {h["lease"]: h["job"] for h in holding}
        held, lost, taken = await self._sort_holding(name, listed, worker)
        if not self.holds(worker):
            # It left while the store was asked: what it took over ends as its other leases did.
            for job in taken:
                core.leases.end_soon(job, "disconnected", error=f"worker {name} lost (disconnected)")
            raise errors.ShuttingDown("connection closed during the lease check")
        kept = []
        for token, job in held:
            if job.token == token and job.worker is worker:
                kept.append({"job": job.id, "lease": token, "todo": sorted(job.pending)})
            else:  # it ended while the store was asked about another
                lost.append({"job": job.id, "lease": token, "reason": core.leases.ended.get(token, "superseded")})
        kept += self._take(worker, taken, lost)
        log.info(
            "worker {name} checked its leases (after a suspend): kept {k}, lost {l}",
            name=name,
            k=len(kept),
            l=len(lost),
        )
        return {"kept": kept, "lost": lost}

    async def set_state(self, conn: IConnection, state: str, reason: str | None) -> dict:
        """``STATE``: the worker's host is idle, busy or vacating; only an idle worker gets new jobs."""
        worker = self.by_connection.get(conn)
        if worker is None:
            return {}
        reason = reason or ""
        if (state, reason) != (worker.state, worker.state_reason):
            log.info(
                "worker {name} is {state}{why}", name=worker.name, state=state, why=f" ({reason})" if reason else ""
            )
        if state != worker.state:
            worker.state_since = self.core.clock.seconds()
        worker.state, worker.state_reason = state, reason
        if state == "idle":
            self.core.dispatch()
        return {}

    def seen(self, conn: IConnection):
        """A line arrived from ``conn``: its heartbeat deadline moves on; a quiet worker is heard again."""
        worker = self.by_connection.get(conn)
        if worker is not None:
            worker.last_seen = self.core.clock.seconds()
            if worker.deadline is not None:
                worker.deadline.touch()
            if not worker.quiet:
                if worker.quiet_timer is not None:
                    worker.quiet_timer.touch()
                return
            worker.quiet = False
            worker.quiet_timer = self._quiet_timer(worker)
            if worker.passed_over:
                self.core.dispatch(only=worker)

    def _quiet_timer(self, worker: Worker) -> Deadline:
        """The one-beat deadline after which ``worker`` is quiet (stalls of this server allowed for)."""
        core = self.core
        return Deadline(core.clock, core.beat, core.beat, lambda: self._quiet(worker))

    def _quiet(self, worker: Worker):
        """Silent for more than one beat: no new job until it is heard."""
        worker.quiet_timer = None
        if self.holds(worker):
            worker.quiet = True
            log.debug("worker {name} quiet for a beat: no new job until it is heard", name=worker.name)

    def connection_lost(self, conn: IConnection):
        self._hellos.discard(conn)
        worker = self.by_connection.get(conn)
        if worker is None:
            return
        if self.core.stopped:
            # The server is shutting down: its leases outlive it (PROTOCOL.md
            # 6.2), for the worker to reattach after the restart or on
            # another server. Ending them here would cost each job an attempt.
            self.forget(worker)
            return
        self.gone(worker, "disconnected")

    async def set_slots(self, conn: IConnection, slots: int) -> dict:
        worker = self.by_connection.get(conn)
        if worker is not None:
            worker.slots = slots
            self.core.dispatch()
        return {}

    # ------------------------------------------------------------------
    # going

    def _silent(self, worker: Worker):
        """Its deadline passed with nothing read."""
        log.warn(
            "worker {name} silent for {d} s: its {n} leases end",
            name=worker.name,
            d=self.core.deadline,
            n=len(worker.leases),
        )
        self.gone(worker, "expired")
        worker.conn.drop("heartbeat deadline passed")

    def forget(self, worker: Worker):
        """Take ``worker`` out of the tables and stop its heartbeat deadline; its leases are untouched."""
        if self.by_connection.get(worker.conn) is worker:
            del self.by_connection[worker.conn]
        if self.by_name.get(worker.name) is worker:
            del self.by_name[worker.name]
        if worker.deadline is not None:
            worker.deadline.cancel()
        if worker.quiet_timer is not None:
            worker.quiet_timer.cancel()

    def gone(self, worker: Worker, reason: str, spare=frozenset(), count=True):
        """Forget a worker; every lease it held ends, except the (lease, job id) pairs in ``spare``."""
        leases = self.core.leases
        self.forget(worker)
        for token, job in list(worker.leases.items()):
            if (token, job.id) in spare:
                leases.unbind(job)  # it moves to the new connection of the same worker
            elif job.lease.state is LeaseState.CLOSING:
                continue  # its DONE/FAIL/RETURN decides; see Leases.closing_failed
            elif count:
                leases.end_soon(job, reason, error=f"worker {worker.name} lost ({reason})")
            else:
                leases.end_soon(job, reason, count=False)
        if reason != "superseded":
            log.info("worker {name} gone ({reason})", name=worker.name, reason=reason)

    def stop(self):
        for worker in self.by_name.values():
            if worker.deadline is not None:
                worker.deadline.cancel()
            if worker.quiet_timer is not None:
                worker.quiet_timer.cancel()
