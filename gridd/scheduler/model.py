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
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from gridd.scheduler.connection import IConnection, JobStatus

__all__ = ["Bucket", "Job", "Lease", "LeaseState", "Worker", "parse_version"]


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
