"""The scheduler's nouns: a job, the lease it runs under, and a connected worker.

Rules this module owns:

- A job's ``state`` is the state the store has committed (queued, running,
  paused, done, failed, cancelled, poison; protocols/PROTOCOL.md, "Job lifecycle"),
  except between a grant being sent to the store and its answer, when the
  job already counts as running here.
- A job runs under at most one lease at a time (``Job.lease``). A lease is
  in exactly one of the :class:`LeaseState` states; the transitions between
  them are made in ``gridd.scheduler.leases`` and ``gridd.scheduler.results``
  only.
- A lease is stale the moment it leaves its job (``Job.lease`` no longer
  names it), whatever the store has committed yet.
- A job without a lease rests: in the run queue, waiting out a backoff
  (``Job.timer``), held out of the queue while operators' changes of it
  commit (``Job.changes``), or paused.
- A job remembers the names of the workers that gave it up here (RETURN),
  each with the time until which it is kept from that worker
  (``Job.given_up``); at most ``GIVEN_UP_KEPT`` of them: when one more gives
  it up, the name whose time ends first is forgotten.
- A worker is quiet (``Worker.quiet``) from the moment it has been silent
  for more than one beat until a line from it arrives
  (``gridd.scheduler.workers`` judges it).
- A worker is in the state it last said of its host (``Worker.state``):
  idle, busy or vacating; busy and vacating workers get no new job.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from gridd.scheduler.connection import IConnection, JobStatus

__all__ = ["Bucket", "GIVEN_UP_KEPT", "Job", "Lease", "LeaseState", "Worker", "parse_version"]

#: How many names of workers that gave it up a job remembers at most.
GIVEN_UP_KEPT = 8


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
class Bucket:
    """Jobs that any one worker either can or cannot all run, at one priority."""

    priority: int
    type: str
    version: tuple[int, ...]
    memory: int
    tags: frozenset


class LeaseState(enum.Enum):
    """Where a lease stands between its grant and its end."""

    #: Its grant is being committed; the worker has not been sent the job.
    CLAIMING = "claiming"
    #: Granted and sent (or reattached): the worker runs the job under it.
    HELD = "held"
    #: The worker's DONE, FAIL or RETURN under it is being committed; nothing
    #: else may end it meanwhile (that write decides).
    CLOSING = "closing"
    #: A DONE, FAIL or RETURN under it was answered "commit unknown": it may
    #: have ended in the store. It is held as before, and the worker sends
    #: the same write again, which settles it; a look at the store does not
    #: take its absence there as an end made elsewhere.
    IN_DOUBT = "in doubt"


@dataclass(eq=False)
class Lease:
    """One attempt of one job, granted to one worker."""

    token: str
    #: When it was granted, on the server's clock: its run-time limit counts
    #: from then, across reattaches.
    granted_at: float
    state: LeaseState = LeaseState.CLAIMING
    #: Its holder; None while no connection holds it (after a restart or a
    #: failover, until its worker reattaches).
    worker: Worker | None = None
    #: Its one timer: the next try of its grant while ``CLAIMING``, then its
    #: run-time limit (a ``gridd.deadline.Deadline``) while a worker holds it.
    timer: Any = None
    #: Fires with whether its grant was made, once the store has said so.
    claim: Any = None
    #: Record indices whose results are being committed under it.
    in_flight: set[int] = field(default_factory=set)

    def __str__(self):
        return self.token


@dataclass(eq=False)
class Job:
    """A queued, running or paused job as the scheduler holds it."""

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
    lease: Lease | None = None
    not_before: float | None = None
    note: str | None = None
    #: The timer of a resting job: its retry backoff, or the retry of a
    #: lease's end that the store could not record.
    timer: Any = None
    #: Operators' changes of this resting job being committed: it is held
    #: out of the run queue meanwhile, so no slot hands it out under them.
    changes: int = 0
    #: Workers that gave it up here, by name: until when it is kept from each
    #: (on the server's clock), oldest first; at most ``GIVEN_UP_KEPT``.
    given_up: dict[str, float] = field(default_factory=dict)
    #: (worker, error) of its failed attempts since its last requeue, as the
    #: store gave them with its latest grant (``gridd.scheduler.poison``).
    failures: list = field(default_factory=list)

    @property
    def worker(self) -> Worker | None:
        return self.lease.worker if self.lease is not None else None

    @property
    def token(self) -> str | None:
        """The current lease's token, or None."""
        return self.lease.token if self.lease is not None else None

    @property
    def accepted(self) -> int:
        return self.total - len(self.pending)

    @property
    def bucket(self) -> Bucket:
        return Bucket(
            self.priority,
            self.type,
            parse_version(self.requires.get("version", "")),
            int(self.requires.get("memory", 0)),
            frozenset(self.requires.get("tags", ())),
        )

    def status(self, note: str | None = None) -> JobStatus:
        return JobStatus(self.id, self.state, self.accepted, self.total, note)

    def give_up(self, name: str, until: float):
        """Worker ``name`` gave this job up: it is kept from that worker until ``until``."""
        self.given_up.pop(name, None)
        self.given_up[name] = until
        while len(self.given_up) > GIVEN_UP_KEPT:
            # Every entry is kept for the same delay: the first ends first.
            del self.given_up[next(iter(self.given_up))]

    def kept_from(self, name: str, now: float) -> bool:
        """Is this job still kept from worker ``name`` at ``now``? Entries whose time is over are forgotten."""
        given_up = self.given_up
        while given_up:
            first = next(iter(given_up))
            if given_up[first] > now:
                break
            del given_up[first]
        until = given_up.get(name)
        return until is not None and until > now


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
    #: Its leases by token.
    leases: dict[str, Job] = field(default_factory=dict)
    #: Its heartbeat deadline (gridd.deadline.Deadline), from its HELLO on.
    deadline: Any = None
    #: Silent for more than one beat: it gets no new job until it is heard.
    quiet: bool = False
    #: The one-beat deadline that makes it quiet (a gridd.deadline.Deadline),
    #: while it is not quiet.
    quiet_timer: Any = None
    #: A dispatch passed it over, free slots and all, while it was quiet.
    passed_over: bool = False
    #: What it says of its host (HELLO ``state``, ``STATE``): "idle", "busy"
    #: or "vacating"; only an idle worker gets new jobs.
    state: str = "idle"
    #: Why, as it said (empty when it gave no reason).
    state_reason: str = ""
    #: When it entered that state (on the server's clock).
    state_since: float = 0.0

    @property
    def free(self) -> int:
        return self.slots - len(self.leases)

    def can_run(self, bucket: Bucket) -> bool:
        version = self.types.get(bucket.type)
        return (
            version is not None
            and version >= bucket.version
            and self.memory >= bucket.memory
            and bucket.tags <= self.tags
        )
