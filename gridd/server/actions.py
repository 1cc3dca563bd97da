"""How the scheduler's actions look on the wire.

The scheduler acts on a connection in its own words
(``gridd.scheduler.connection.IConnection``): offer a job, revoke a lease,
tell a watcher, say whether a worker is drained, relay what an operator says
of a worker's host. :class:`WireActions` renders each as the line
protocols/PROTOCOL.md defines (``JOB``, ``REVOKE``, ``EVENT``, ``DRAIN``,
``HOST``) through the connection's ``send(verb, body)``; the
server's line protocol and the tests' fake connections mix it in.
"""

from __future__ import annotations

from gridd.scheduler.connection import JobOffer, JobStatus

__all__ = ["WireActions", "job_body"]


def job_body(offer: JobOffer) -> dict:
    """The body of the ``JOB`` line that hands ``offer`` to a worker."""
    body = {
        "job": offer.job,
        "lease": offer.lease,
        "type": offer.type,
        "attempt": offer.attempt,
        "params": offer.params,
        "total": offer.total,
        "records": [{"i": i, "data": data} for i, data in offer.records],
        "timeout": float(offer.timeout),
    }
    if offer.memory:
        body["memory"] = offer.memory
    return body


class WireActions:
    """The scheduler's actions as wire lines, for a class that has ``send(verb, body)``."""

    def send(self, verb: str, body: dict | None = None) -> None:
        raise NotImplementedError

    def offer(self, offer: JobOffer) -> None:
        self.send("JOB", job_body(offer))

    def revoke(self, job: int, lease: str, reason: str) -> None:
        self.send("REVOKE", {"job": job, "lease": lease, "reason": reason})

    def tell(self, status: JobStatus) -> None:
        self.send("EVENT", status.view())

    def drain(self, drained: bool) -> None:
        self.send("DRAIN", {"drain": drained})

    def host(self, busy: bool, reason: str) -> None:
        body = {"busy": busy}
        if reason:
            body["reason"] = reason
        self.send("HOST", body)
