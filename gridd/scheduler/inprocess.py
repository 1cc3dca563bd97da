"""A connection inside the process: the scheduler's actions as calls, with no framing at all.

For embedding the scheduler (an operator's console that waits on a job, a
program that runs a worker in its own process) and for tests that drive
the scheduler directly. Each action is recorded in order and, if a
callback was given for it, passed on at once. The owner says when the
connection is gone by calling the dispatcher's ``connection_lost``; ``drop``
only records the scheduler's wish and calls ``on_drop``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from gridd.scheduler.connection import JobOffer, JobStatus

__all__ = ["InProcessConnection"]


class InProcessConnection:
    """``IConnection`` for a peer in the same process."""

    def __init__(
        self,
        address: str = "in-process",
        *,
        on_offer: Callable[[JobOffer], Any] | None = None,
        on_revoke: Callable[[int, str, str], Any] | None = None,
        on_status: Callable[[JobStatus], Any] | None = None,
        on_drain: Callable[[bool], Any] | None = None,
        on_host: Callable[[bool, str], Any] | None = None,
        on_drop: Callable[[str], Any] | None = None,
        alive: bool = True,
    ):
        self.address = address
        self._on_offer = on_offer
        self._on_revoke = on_revoke
        self._on_status = on_status
        self._on_drain = on_drain
        self._on_host = on_host
        self._on_drop = on_drop
        #: What ``ping`` answers.
        self.alive = alive
        #: Every action so far, in order: ("offer", JobOffer), ("revoke", (job, lease, reason)),
        #: ("tell", JobStatus), ("drain", bool), ("host", (busy, reason)), ("drop", reason).
        self.actions: list[tuple[str, Any]] = []
        #: Why the scheduler dropped this connection, once it has.
        self.dropped: str | None = None

    def of(self, kind: str) -> list:
        """The actions of one kind so far, in order."""
        return [what for k, what in self.actions if k == kind]

    def offer(self, offer: JobOffer) -> None:
        self.actions.append(("offer", offer))
        if self._on_offer is not None:
            self._on_offer(offer)

    def revoke(self, job: int, lease: str, reason: str) -> None:
        self.actions.append(("revoke", (job, lease, reason)))
        if self._on_revoke is not None:
            self._on_revoke(job, lease, reason)

    def tell(self, status: JobStatus) -> None:
        self.actions.append(("tell", status))
        if self._on_status is not None:
            self._on_status(status)

    def drain(self, drained: bool) -> None:
        self.actions.append(("drain", drained))
        if self._on_drain is not None:
            self._on_drain(drained)

    def host(self, busy: bool, reason: str) -> None:
        self.actions.append(("host", (busy, reason)))
        if self._on_host is not None:
            self._on_host(busy, reason)

    def drop(self, reason: str) -> None:
        self.actions.append(("drop", reason))
        self.dropped = reason
        if self._on_drop is not None:
            self._on_drop(reason)

    def ping(self, timeout: float) -> defer.Deferred:
        return defer.succeed(self.alive)
