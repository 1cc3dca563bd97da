"""What the scheduler needs of a connection: a small interface of actions in its own words.

A connection is whatever carries a worker or a client to the scheduler:
the server's line protocol (``gridd.server.actions`` renders each action
as a wire line), an in-process connection for tests and embedding
(``gridd.scheduler.inprocess``), or a test's fake. The scheduler never
names a verb or a field of the wire; it offers jobs, revokes leases, tells
watchers of changes, says whether a worker is drained, relays what an
operator says of a worker's host, asks a peer whether it is alive and drops
it.

Requests are answered by the return values of the scheduler's request
methods (plain dicts and lists); the connection's owner renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer

__all__ = ["IConnection", "JobOffer", "JobStatus"]


@dataclass(frozen=True)
class JobOffer:
    """A job handed to a worker under a lease: what it needs to run this attempt."""

    job: int
    lease: str
    type: str
    attempt: int
    params: dict
    total: int
    #: The records still without an accepted result, as (index, data), by index.
    records: list[tuple[int, Any]]
    #: The attempt's run-time limit in seconds, counted from the grant.
    timeout: float
    #: The memory the job requires, in MiB (0: it names none).
    memory: int = 0


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands, for those watching it."""

    job: int
    state: str
    accepted: int
    total: int
    #: The worker's latest progress note, when this status reports one.
    note: str | None = None

    def view(self) -> dict:
        """The status as plain data (the ``note`` only when there is one)."""
        view = {"job": self.job, "state": self.state, "accepted": self.accepted, "total": self.total}
        if self.note is not None:
            view["note"] = self.note
        return view


class IConnection(Protocol):
    """A worker's or a client's connection, as the scheduler acts on it."""

    #: A printable peer address, for operators.
    address: str

    def offer(self, offer: JobOffer) -> None:
        """Hand the worker a job under a lease that has committed."""

    def revoke(self, job: int, lease: str, reason: str) -> None:
        """Tell the worker that ``lease`` is no longer its own: it stops work on it."""

    def tell(self, status: JobStatus) -> None:
        """Tell a watcher that a job it watches changed."""

    def drain(self, drained: bool) -> None:
        """Tell the worker whether it is drained (it gets no new jobs while it is)."""

    def host(self, busy: bool, reason: str) -> None:
        """Relay the host-side signal an operator set: the worker's host is busy, or idle again."""

    def drop(self, reason: str) -> None:
        """Close the connection now; the scheduler's ``connection_lost`` follows (perhaps later)."""

    def ping(self, timeout: float) -> defer.Deferred:
        """Fire with True if the peer answers within ``timeout`` seconds, else False."""
