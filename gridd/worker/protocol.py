"""The worker's end of a connection: wire messages to and from the worker core.

:class:`WorkerProtocol` adds the worker role to :class:`gridd.peer.PeerProtocol`
(framing, replies, keepalive, handshake): it says in its HELLO what the worker
offers and holds, turns each server notification into one call on
:class:`gridd.worker.core.WorkerCore`, and implements the core's
``ServerConnection`` interface by sending requests. It keeps no job state: a
connection comes and goes, the core stays.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import Factory

from gridd import wire
from gridd.peer import PeerProtocol
from gridd.worker.core import WorkerCore
from gridd.worker.runner import Assignment

__all__ = ["WorkerProtocol", "WorkerFactory"]


class WorkerProtocol(PeerProtocol):
    """One connection of a worker to a server, in the "worker" role."""

    role = "worker"

    def __init__(self, clock, name: str, token: str, core: WorkerCore, agent: str | None = None):
        super().__init__(clock, name, token, agent)
        self.core = core

    # -- handshake and connection events ----------------------------------

    def hello_fields(self) -> dict:
        core = self.core
        fields = {
            "slots": core.slots,
            "types": core.type_versions(),
            "memory": core.memory,
            "tags": list(core.tags),
            "holding": core.holding(),
        }
        if core.host_state != "idle":
            # Vacating is said by a STATE after the handshake: HELLO knows only idle and busy.
            fields["state"] = "busy"
        return fields

    def fit_hello(self, body: dict) -> dict:
        """List as many held leases as fit in a HELLO line (PROTOCOL.md 6.2), the oldest first.

        A server takes at most 65,536 bytes before the HELLO is accepted:
        about 1,500 leases. Those left out are not kept, so the worker stops
        them when the reply comes, and the server re-queues them.
        """
        holding = body.get("holding") or []
        # The rid is not known yet; a 16-digit one is as long as any.
        room = wire.PRE_HELLO_MAX_LINE - len(wire.encode("HELLO", {**body, "holding": [], "rid": 10**15}))
        fitted, used = [], 0
        for entry in holding:
            used += len(wire.encode("X", entry)) - 3 + 1  # the entry's JSON ("X " and LF off) and a comma
            if used > room:
                break
            fitted.append(entry)
        if len(fitted) < len(holding):
            self.log.warn(
                "holding {n} leases, of which only {k} fit in a HELLO: the other {d} will be given up",
                n=len(holding),
                k=len(fitted),
                d=len(holding) - len(fitted),
            )
        return {**body, "holding": fitted}

    def connectionMade(self):
        super().connectionMade()
        self.ready.addCallback(self._attach)

    def _attach(self, welcome: dict) -> dict:
        self.core.attach(self, welcome)
        return welcome

    def _abort(self):
        # Detach before aborting: from then on requests fail at once, and a
        # core still attached would send its retries into them in a loop.
        self.core.detach(self)
        super()._abort()

    def connectionLost(self, reason):
        # Detach first, so that requests failing below with ConnectionDropped
        # find no connection to send their retries on.
        self.core.detach(self)
        super().connectionLost(reason)

    # -- from the server --------------------------------------------------

    def notification(self, message: wire.Message):
        body = message.body
        if message.verb == "JOB":
            self.core.start_job(Assignment.from_body(body))
        elif message.verb == "REVOKE":
            self.core.revoke(body["job"], body["lease"], body["reason"])
        elif message.verb == "DRAIN":
            self.core.set_drained(body["drain"])
        elif message.verb == "HOST":
            self.core.host_signal(bool(body["busy"]), str(body.get("reason") or ""))
        else:
            super().notification(message)

    # -- the core's ServerConnection interface ----------------------------

    @property
    def max_line(self) -> int:
        return self.MAX_LENGTH

    def send_results(self, job: int, lease: str, results: list) -> defer.Deferred:
        return self.request("RESULT", {"job": job, "lease": lease, "results": results})

    def send_done(self, job: int, lease: str, results: list) -> defer.Deferred:
        body = {"job": job, "lease": lease}
        if results:
            body["results"] = results
        return self.request("DONE", body)

    def send_fail(self, job: int, lease: str, error: str, retry: bool) -> defer.Deferred:
        return self.request("FAIL", {"job": job, "lease": lease, "error": error, "retry": retry})

    def send_return(self, job: int, lease: str, reason: str, vacate: bool = False) -> defer.Deferred:
        body = {"job": job, "lease": lease, "reason": reason}
        if vacate:
            body["vacate"] = True
        return self.request("RETURN", body)

    def send_state(self, state: str, reason: str) -> defer.Deferred:
        body = {"state": state}
        if reason:
            body["reason"] = reason
        return self.request("STATE", body)

    def send_check(self, holding: list[dict]) -> defer.Deferred:
        return self.request("CHECK", {"holding": holding})

    def drop(self) -> None:
        self._abort()

    def send_progress(self, job: int, lease: str, note: str) -> defer.Deferred:
        return self.request("PROGRESS", {"job": job, "lease": lease, "note": note})


class WorkerFactory(Factory):
    """Builds a :class:`WorkerProtocol` for each connection, all sharing one core."""

    noisy = False

    def __init__(self, clock, name: str, token: str, core: WorkerCore):
        self.clock = clock
        self.name = name
        self.token = token
        self.core = core

    def buildProtocol(self, addr):
        protocol = WorkerProtocol(self.clock, self.name, self.token, self.core)
        protocol.factory = self
        return protocol
