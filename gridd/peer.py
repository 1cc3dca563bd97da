"""The peer side of a gridd connection, shared by workers and clients.

:class:`PeerProtocol` frames lines, matches replies to requests by ``rid``,
keeps the connection alive (section 5 of protocols/PROTOCOL.md) and performs
the handshake. Subclasses add what their role does with notifications:
``gridd.worker.protocol`` runs jobs, ``gridd.client`` follows events.
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from gridd import __version__, errors, wire
from gridd.deadline import Deadline

__all__ = ["PeerProtocol", "ConnectionDropped"]


class ConnectionDropped(Exception):
    """The connection closed before the reply to a request arrived.

    The request may or may not have taken effect (PROTOCOL.md section 2).
    """


class PeerProtocol(LineOnlyReceiver):
    """A worker's or client's connection to a server.

    ``clock`` drives the keepalive; the subclass provides ``hello_fields()``
    (extra HELLO fields) and ``notification(message)``.
    """

    delimiter = b"\n"
    MAX_LENGTH = wire.DEFAULT_MAX_LINE
    role = "client"
    log = Logger()

    def __init__(self, clock, name: str, token: str, agent: str | None = None):
        self.clock = clock
        self.name = name
        self.token = token
        self.agent = agent or f"gridd/{__version__}"
        self._rids = itertools.count(1)
        self._pending: dict[int, defer.Deferred] = {}
        self._beat_call = None
        self._deadline: Deadline | None = None
        self.beat = None
        self.deadline = None
        self.welcome: dict | None = None
        #: Fires with the HELLO reply body once the handshake succeeded.
        self.ready = defer.Deferred()
        #: Fires (with None) when the connection is gone, whatever the reason.
        self.closed = defer.Deferred()
        #: The connection is gone (set first thing in connectionLost).
        self._lost = False
        #: This side aborted the connection: nothing written now would leave.
        self._aborted = False
        self.bye_reason: str | None = None

    # -- connection events ------------------------------------------------

    def connectionMade(self):
        # Small lines must go out at once (Nagle's algorithm would hold them).
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        body = {
            "proto": wire.PROTO,
            "role": self.role,
            "name": self.name,
            "token": self.token,
            "agent": self.agent,
        }
        body.update(self.hello_fields())
        self.request("HELLO", self.fit_hello(body)).addCallbacks(self._welcomed, self._refused)

    def _welcomed(self, reply):
        self.welcome = reply
        self.MAX_LENGTH = reply.get("max_line", wire.DEFAULT_MAX_LINE)
        self.beat = float(reply["beat"])
        self.deadline = float(reply["deadline"])
        self._beat_call = self.clock.callLater(self.beat, self._send_beat)
        self._touch()
        self.ready.callback(reply)

    def _refused(self, failure):
        self.log.warn("server refused HELLO: {f.value}", f=failure)
        self.transport.loseConnection()
        self.ready.errback(failure)

    def _send_beat(self):
        self._beat_call = self.clock.callLater(self.beat, self._send_beat)
        self.send("BEAT")

    def _touch(self):
        """Something arrived: push the server's deadline back."""
        if self.deadline is None:
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.touch()
        else:
            self._deadline = Deadline(self.clock, self.deadline, self.beat, self._server_silent, self._stalled)

    def _stalled(self, late: float):
        self.log.warn("stalled for {s:.1f} s (timers ran late): the server gets {b:g} s more to be heard", s=late, b=self.beat)

    def _server_silent(self):
        self.log.warn("server silent for {d} s: dropping the connection", d=self.deadline)
        self._abort()

    def connectionLost(self, reason):
        self._lost = True  # first: a request made from an errback below must fail too
        for call in (self._beat_call, self._deadline):
            if call is not None and call.active():
                call.cancel()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ConnectionDropped(f"connection lost: {reason.getErrorMessage()}"))
        if not self.ready.called:
            self.ready.errback(ConnectionDropped("connection lost before the handshake"))
        self.closed.callback(None)

    # -- lines ------------------------------------------------------------

    def lineReceived(self, line: bytes):
        self._touch()
        try:
            msg = wire.parse_line(line, wire.SERVER_VERBS)
        except errors.GriddError as e:
            self.log.error("unparseable line from server ({e.code}): {line!r}", e=e, line=line[:200])
            self.transport.loseConnection()
            return
        if msg.verb in ("OK", "ERR"):
            d = self._pending.pop(msg.rid, None)
            if d is None:
                self.log.warn("reply for unknown rid {rid}", rid=msg.rid)
                if msg.rid is None and msg.verb == "ERR":
                    self.log.error("server error: {body}", body=msg.body)
            elif msg.verb == "OK":
                d.callback(msg.body)
            else:
                body = dict(msg.body)
                body.pop("rid", None)
                d.errback(errors.error_for_code(body.pop("code"), body.pop("message", None), **body))
        elif msg.verb == "BEAT":
            pass
        elif msg.verb == "PING":
            self.send("PONG", {"n": msg.body["n"]})
        elif msg.verb == "BYE":
            self.bye_reason = msg.body.get("reason")
            self.log.info("server says goodbye: {reason}", reason=self.bye_reason)
        else:
            self.notification(msg)

    def lineLengthExceeded(self, line):
        self.log.error("server sent a line longer than {n} bytes", n=self.MAX_LENGTH)
        self._abort()

    def _abort(self):
        self._aborted = True
        self.transport.abortConnection()

    # -- sending ----------------------------------------------------------

    def send(self, verb: str, body: dict | None = None):
        self.transport.write(wire.encode(verb, body))

    def request(self, verb: str, body: dict | None = None) -> defer.Deferred:
        """Send a request; the Deferred fires with the OK body or fails with a GriddError."""
        if self._lost or self._aborted:
            # No reply can come on a connection that is gone: say so now
            # rather than wait for ever.
            return defer.fail(ConnectionDropped(f"{verb} not sent: the connection is closed"))
        rid = next(self._rids)
        body = dict(body or {}, rid=rid)
        d = self._pending[rid] = defer.Deferred()
        self.send(verb, body)
        return d

    # -- for subclasses ---------------------------------------------------

    def hello_fields(self) -> dict:
        return {}

    def fit_hello(self, body: dict) -> dict:
        """The HELLO body to send: it must fit in the line a server takes before the HELLO (64 KiB)."""
        return body

    def notification(self, message: wire.Message):
        self.log.warn("ignoring {verb} from server", verb=message.verb)
