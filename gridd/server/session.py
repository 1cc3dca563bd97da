"""One connection's protocol state: handshake, identity, roles, and routing to the dispatcher.

States (protocols/PROTOCOL.md section 4): ``connected`` until a HELLO is
accepted, then ``worker`` or ``client``, then ``closed``. The session checks
that each verb is allowed in the current state and for the connection's
identity (section 13: the roles ``worker``, ``submitter`` and ``admin``), and
calls the one dispatcher method that handles it. It knows nothing of bytes
(``gridd.server.protocol`` does) nor of scheduling (``gridd.scheduler``
does), beyond the size of a job offer it checks a SUBMIT against; the
scheduler knows nothing of roles.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from gridd import __version__, errors, wire
from gridd.scheduler.connection import JobOffer
from gridd.server.actions import job_body
from gridd.server.auth import Identity

__all__ = ["Session", "WORKER_REQUESTS", "CLIENT_REQUESTS", "ROLE_VERBS", "OWN_JOB_VERBS", "HELLO_ROLE"]

log = Logger()


def _job_lease(b):
    return b["job"], b["lease"]


#: Worker verbs: how each maps onto a dispatcher call (conn, body).
WORKER_REQUESTS = {
    "RESULT": lambda d, c, b: d.result(c, *_job_lease(b), b["results"]),
    "PROGRESS": lambda d, c, b: d.progress(c, *_job_lease(b), b.get("note")),
    "DONE": lambda d, c, b: d.done(c, *_job_lease(b), b.get("results", [])),
    "FAIL": lambda d, c, b: d.fail(c, *_job_lease(b), b["error"], b.get("retry", True)),
    "RETURN": lambda d, c, b: d.give_back(c, *_job_lease(b), b.get("reason"), b.get("vacate", False)),
    "SLOTS": lambda d, c, b: d.set_slots(c, b["slots"]),
    "STATE": lambda d, c, b: d.set_state(c, b["state"], b.get("reason")),
    "CHECK": lambda d, c, b: d.check_leases(c, b["holding"]),
}

#: Client verbs.
CLIENT_REQUESTS = {
    "SUBMIT": lambda d, c, b: d.submit(b["jobs"], submitter=c.session.submitter, check=c.session.check_fits),
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
    "WORKER": lambda d, c, b: d.worker_action(b["worker"], b["action"], b.get("reason")),
    "DISPATCH": lambda d, c, b: d.set_dispatching(b["enabled"]),
}

_NOTIFICATIONS = ("BEAT", "PONG")

#: The largest job id, as the largest JOB line would carry it.
MAX_ID = 2**53 - 1

#: What each role may send once its HELLO is accepted (PROTOCOL.md section 13).
#: A submitter's job control is further limited to the jobs it submitted.
ROLE_VERBS = {
    "worker": frozenset(WORKER_REQUESTS),
    "submitter": frozenset(
        {"SUBMIT", "SHOW", "LIST", "RESULTS", "WORKERS", "STATS", "WATCH", "CANCEL", "PAUSE", "RESUME", "REQUEUE"}
    ),
    "admin": frozenset(CLIENT_REQUESTS) | {"CREDENTIAL"},
}
#: Verbs that act on one job: a submitter may send them only for its own jobs.
OWN_JOB_VERBS = frozenset({"CANCEL", "PAUSE", "RESUME", "REQUEUE"})
#: The HELLO role each credential role may take.
HELLO_ROLE = {"worker": "worker", "submitter": "client", "admin": "client"}


class Session:
    """The state of one connection, between the wire adapter and the dispatcher."""

    def __init__(
        self,
        conn,
        dispatcher,
        authenticator,
        *,
        max_line: int = wire.DEFAULT_MAX_LINE,
        on_revoke: Callable[[str], None] | None = None,
    ):
        self.conn = conn
        self.dispatcher = dispatcher
        self.authenticator = authenticator
        self.max_line = max_line
        #: Called with a credential's id once it is revoked: close its live connections.
        self.on_revoke = on_revoke
        self.state = "connected"
        self.name: str | None = None
        #: Who the connection acts as, once its token is checked.
        self.identity: Identity | None = None
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
        if not (msg.verb in table or msg.verb == "CREDENTIAL" and self.state == "client"):
            raise errors.Forbidden(f"a {self.state} may not send {msg.verb}")
        role = self.identity.role
        if msg.verb not in ROLE_VERBS[role]:
            raise errors.Forbidden(f"a {role} may not send {msg.verb}")
        if msg.verb == "CREDENTIAL":
            return defer.Deferred.fromCoroutine(self._credential(msg.body))
        call = table[msg.verb](self.dispatcher, self.conn, msg.body)
        if role == "submitter" and msg.verb in OWN_JOB_VERBS:
            return defer.Deferred.fromCoroutine(self._own_job(msg, call))
        return defer.Deferred.fromCoroutine(call)

    def check_fits(self, index: int, spec: dict, timeout: float):
        """Refuse a job whose JOB line, at its largest, would exceed the line limit."""
        records = spec["records"]
        largest = JobOffer(
            job=MAX_ID,
            lease="x" * 32,
            type=spec["type"],
            attempt=1000,
            params=spec.get("params", {}),
            total=len(records),
            records=list(enumerate(records)),
            timeout=float(timeout),
            memory=int(spec.get("requires", {}).get("memory", 0)),
        )
        size = len(wire.encode("JOB", job_body(largest))) - 1
        if size > self.max_line:
            raise errors.TooLarge(
                f"job {index} of the SUBMIT would need a {size}-byte JOB line; split its records",
                job=index,
                max_line=self.max_line,
            )

    @property
    def submitter(self) -> str | None:
        """What a job submitted here records as its submitter: the credential, or the HELLO name."""
        return self.identity.id if self.identity is not None and self.identity.id is not None else self.name

    async def _own_job(self, msg: wire.Message, call):
        """Run ``call`` only if the job was submitted with this connection's credential."""
        try:
            owner = await self.dispatcher.job_submitter(msg.body["job"])
            if owner != self.identity.id:
                raise errors.Forbidden(f"a submitter may only {msg.verb} its own jobs; job {msg.body['job']} is not")
        except BaseException:
            call.close()  # the coroutine never ran: nothing was changed
            raise
        return await call

    async def _credential(self, body: dict) -> dict:
        action = body["action"]
        if action != "list" and "id" not in body:
            raise errors.BadRequest(f"CREDENTIAL {action} needs an id")
        if action == "add":
            if "role" not in body:
                raise errors.BadRequest("CREDENTIAL add needs a role")
            token = await self.authenticator.add(body["id"], body["role"], body.get("note"))
            return {"token": token}
        if action == "list":
            return {"credentials": await self.authenticator.list()}
        if body["id"] == self.identity.id:
            # Its reply could not be delivered on a connection closed by the revocation.
            raise errors.Forbidden("a connection may not revoke its own credential; use another one")
        await self.authenticator.revoke(body["id"])
        log.info("credential {id} revoked by {who}", id=body["id"], who=self.identity.describe())
        if self.on_revoke is not None:
            self.on_revoke(body["id"])
        return {}

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
        identity = await self.authenticator.check(hello["name"], role, hello["token"])
        if self.state == "closed":  # the connection went away while we waited
            raise errors.ShuttingDown("connection closed during the handshake")
        if HELLO_ROLE[identity.role] != role:
            article = "an" if identity.role == "admin" else "a"
            raise errors.Forbidden(f"{article} {identity.role} credential may not connect as a {role}")
        if identity.role == "worker" and identity.id is not None and hello["name"] != identity.id:
            raise errors.Forbidden(f"worker credential {identity.id} may only connect as worker {identity.id}")
        self.identity = identity
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
            "{role} {name} ready as {identity} ({agent}, {addr})",
            role=role,
            name=self.name,
            identity=self.identity.describe(),
            agent=hello.get("agent", "?"),
            addr=self.conn.address,
        )
        return reply

    def closed(self):
        """The connection is gone, or being closed by the server: tell the dispatcher, once."""
        if self.state == "closed":
            return
        was_ready = self.ready
        self.state = "closed"
        if was_ready or self.name is not None:
            self.dispatcher.connection_lost(self.conn)
