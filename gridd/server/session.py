"""One connection's protocol state: handshake, role, and routing to the dispatcher.

States (protocols/PROTOCOL.md section 4): ``connected`` until a HELLO is
accepted, then ``worker`` or ``client``, then ``closed``. The session checks
that each verb is allowed in the current state and calls the one dispatcher
method that handles it. It knows nothing of bytes (``gridd.server.protocol``
does) nor of scheduling (``gridd.dispatcher`` does).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from gridd import __version__, errors, wire

__all__ = ["Session", "WORKER_REQUESTS", "CLIENT_REQUESTS"]

log = Logger()


def _job_lease(b):
    return b["job"], b["lease"]


#: Worker verbs: how each maps onto a dispatcher call (conn, body).
WORKER_REQUESTS = {
    "RESULT": lambda d, c, b: d.result(c, *_job_lease(b), b["results"]),
    "PROGRESS": lambda d, c, b: d.progress(c, *_job_lease(b), b.get("note")),
    "DONE": lambda d, c, b: d.done(c, *_job_lease(b), b.get("results", [])),
    "FAIL": lambda d, c, b: d.fail(c, *_job_lease(b), b["error"], b.get("retry", True)),
    "RETURN": lambda d, c, b: d.give_back(c, *_job_lease(b), b.get("reason")),
    "SLOTS": lambda d, c, b: d.set_slots(c, b["slots"]),
}

#: Client verbs.
CLIENT_REQUESTS = {
    "SUBMIT": lambda d, c, b: d.submit(b["jobs"], submitter=c.session.name),
    "SHOW": lambda d, c, b: d.show(b["job"]),
    "LIST": lambda d, c, b: d.list_jobs(b.get("state"), b.get("type"), b.get("after", 0), b.get("limit", 100)),
    "RESULTS": lambda d, c, b: d.results(b["job"], b.get("after", -1), b.get("limit", 1000)),
    "WORKERS": lambda d, c, b: d.workers_view(),
    "STATS": lambda d, c, b: d.stats(),
    "WATCH": lambda d, c, b: d.watch(c, b["jobs"]),
    "CANCEL": lambda d, c, b: d.cancel(b["job"]),
    "PAUSE": lambda d, c, b: d.pause(b["job"]),
    "RESUME": lambda d, c, b: d.resume(b["job"]),
    "REQUEUE": lambda d, c, b: d.requeue(b["job"]),
    "WORKER": lambda d, c, b: d.worker_action(b["worker"], b["action"]),
    "DISPATCH": lambda d, c, b: d.set_dispatching(b["enabled"]),
}

_NOTIFICATIONS = ("BEAT", "PONG")


class Session:
    """The state of one connection, between the wire adapter and the dispatcher."""

    def __init__(self, conn, dispatcher, authenticator, *, max_line: int = wire.DEFAULT_MAX_LINE):
        self.conn = conn
        self.dispatcher = dispatcher
        self.authenticator = authenticator
        self.max_line = max_line
        self.state = "connected"
        self.name: str | None = None
        self.identity: str | None = None
        #: A HELLO is being handled (a worker's may wait for name arbitration).
        self._hello_pending = False

    @property
    def ready(self) -> bool:
        return self.state in ("worker", "client")

    def heard(self):
        """A line arrived, parseable or not: a worker's heartbeat deadline moves on."""
        if self.state == "worker":
            self.dispatcher.seen(self.conn)

    def receive(self, msg: wire.Message) -> defer.Deferred | None:
        """Handle one message; a request's Deferred fires with its reply body.

        Raises (or fails with) a ``gridd.errors`` exception for an ``ERR``.
        Notifications return None.
        """
        if self.state == "connected" and msg.verb != "HELLO":
            raise errors.HelloRequired()
        if msg.verb == "HELLO":
            if self.ready or self._hello_pending:
                raise errors.AlreadyReady()
            self._hello_pending = True
            return defer.Deferred.fromCoroutine(self._hello(msg.body))
        if msg.verb in _NOTIFICATIONS:
            if msg.verb == "PONG":
                self.conn.pong(msg.body.get("n"))
            return None
        table = WORKER_REQUESTS if self.state == "worker" else CLIENT_REQUESTS
        handler = table.get(msg.verb)
        if handler is None:
            raise errors.Forbidden(f"a {self.state} may not send {msg.verb}")
        return defer.Deferred.fromCoroutine(handler(self.dispatcher, self.conn, msg.body))

    async def _hello(self, hello: dict) -> dict:
        try:
            return await self._handshake(hello)
        finally:
            self._hello_pending = False

    async def _handshake(self, hello: dict) -> dict:
        if hello["proto"] != wire.PROTO:
            raise errors.UnsupportedProto(protos=[wire.PROTO])
        role = hello["role"]
        if role == "worker" and not ("slots" in hello and "types" in hello):
            raise errors.BadRequest("a worker's HELLO needs slots and types")
        self.identity = self.authenticator.check(hello["name"], role, hello["token"])
        self.name = hello["name"]
        reply = {
            "proto": wire.PROTO,
            "server": f"gridd/{__version__}",
            "beat": float(self.dispatcher.beat),
            "deadline": float(self.dispatcher.deadline),
            "max_line": self.max_line,
        }
        if role == "worker":
            reply.update(await self.dispatcher.worker_hello(self.conn, hello))
        else:
            self.dispatcher.client_hello(self.conn)
        if self.state == "closed":  # the connection went away while we waited
            self.dispatcher.connection_lost(self.conn)
            raise errors.ShuttingDown("connection closed during the handshake")
        self.state = role
        log.info(
            "{role} {name} ready ({agent}, {addr})",
            role=role,
            name=self.name,
            agent=hello.get("agent", "?"),
            addr=self.conn.address,
        )
        return reply

    def closed(self):
        was_ready = self.ready
        self.state = "closed"
        if was_ready or self.name is not None:
            self.dispatcher.connection_lost(self.conn)
