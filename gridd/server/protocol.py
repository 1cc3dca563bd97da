"""The wire adapter: bytes in, one session call per line, bytes out.

``ServerProtocol`` frames lines, parses them with ``gridd.wire``, hands each
message to its ``Session`` and writes the reply. It also implements the
dispatcher's connection interface (``send``, ``drop``, ``ping``) and the
connection-level deadlines: the handshake deadline, the server's own
heartbeat, and a client's idle deadline (a worker's liveness is the
dispatcher's business, because its leases depend on it).
"""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

from gridd import errors, wire
from gridd.server.session import Session

__all__ = ["ServerProtocol", "ServerFactory"]

log = Logger()


class ServerProtocol(LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self, factory: ServerFactory):
        self.factory = factory
        self.clock = factory.clock
        self.MAX_LENGTH = factory.max_line
        self.session = Session(self, factory.dispatcher, factory.authenticator, max_line=factory.max_line)
        self.address = "?"
        self._timers: dict[str, object] = {}
        self._pings: dict[int, defer.Deferred] = {}
        self._ping_ids = itertools.count(1)

    # -- connection events ------------------------------------------------

    def connectionMade(self):
        _no_delay(self.transport)
        peer = self.transport.getPeer()
        self.address = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.factory.connections.add(self)
        self._timers["handshake"] = self.clock.callLater(self.factory.handshake_timeout, self._handshake_expired)

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        for d in self._pings.values():
            d.callback(False)
        self._pings.clear()
        self.session.closed()

    # -- lines in ---------------------------------------------------------

    def lineReceived(self, line: bytes):
        if self.session.state == "closed":
            return
        self.session.heard()
        idle = self._timers.get("idle")
        if idle is not None and idle.active():
            idle.reset(self.factory.dispatcher.deadline)
        try:
            msg = wire.parse_line(line)
        except errors.GriddError as e:
            self._refuse(e, e.rid)
            return
        try:
            result = self.session.receive(msg)
        except errors.GriddError as e:
            self._refuse(e, msg.rid)
            return
        if result is not None:
            result.addCallbacks(self._reply_ok, self._reply_err, callbackArgs=(msg,), errbackArgs=(msg,))

    def lineLengthExceeded(self, line):
        self._refuse(errors.LineTooLong(max_line=self.MAX_LENGTH), None)

    def _reply_ok(self, body: dict, msg: wire.Message):
        self.send("OK", {"rid": msg.rid, **body})
        if msg.verb == "HELLO":
            self._became_ready()

    def _reply_err(self, failure, msg: wire.Message):
        # A refused HELLO always ends the connection (PROTOCOL.md 6.1).
        close = msg.verb == "HELLO" and not self.session.ready
        if failure.check(errors.GriddError):
            self._refuse(failure.value, msg.rid, close)
        else:
            log.failure("{verb} from {addr} failed", failure, verb=msg.verb, addr=self.address)
            self._refuse(errors.GriddError(), msg.rid, close)

    def _refuse(self, err: errors.GriddError, rid, close: bool = False):
        if self.transport is None or self.session.state == "closed":
            return
        self.send("ERR", err.to_body(rid))
        if err.close or close:
            log.info("closing {addr}: {code}", addr=self.address, code=err.code)
            self.transport.loseConnection()

    # -- keepalive --------------------------------------------------------

    def _became_ready(self):
        self._cancel("handshake")
        self._timers["beat"] = self.clock.callLater(self.factory.dispatcher.beat, self._beat)
        if self.session.state == "client":
            self._timers["idle"] = self.clock.callLater(self.factory.dispatcher.deadline, self._idle_expired)

    def _beat(self):
        self._timers["beat"] = self.clock.callLater(self.factory.dispatcher.beat, self._beat)
        self.send("BEAT")

    def _handshake_expired(self):
        self._refuse(errors.HandshakeTimeout(), None)

    def _idle_expired(self):
        self.drop("silent past the deadline")

    def _cancel(self, name):
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # -- the dispatcher's connection interface ---------------------------

    def send(self, verb: str, body: dict | None = None):
        if self.transport is not None and not self.transport.disconnecting:
            self.transport.write(wire.encode(verb, body))

    def drop(self, reason: str):
        log.info("dropping {addr} ({name}): {reason}", addr=self.address, name=self.session.name, reason=reason)
        self.transport.abortConnection()

    def ping(self, timeout: float) -> defer.Deferred:
        n = next(self._ping_ids)
        d = self._pings[n] = defer.Deferred(canceller=lambda _: self._pings.pop(n, None))
        self.send("PING", {"n": n})
        return d.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, timeout: False)

    def pong(self, n):
        d = self._pings.pop(n, None)
        if d is not None:
            d.callback(True)

    def bye(self, reason: str):
        """Tell the peer why, then close (server shutdown)."""
        self.send("BYE", {"reason": reason})
        self.transport.loseConnection()


def _no_delay(transport):
    """Send small lines at once: replies and pushes are latency-bound, not bandwidth-bound."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class ServerFactory(Factory):
    """Builds a ServerProtocol per connection and keeps track of them."""

    noisy = False

    def __init__(self, dispatcher, authenticator, clock, *, max_line=wire.DEFAULT_MAX_LINE, handshake_timeout=10.0):
        self.dispatcher = dispatcher
        self.authenticator = authenticator
        self.clock = clock
        self.max_line = max_line
        self.handshake_timeout = handshake_timeout
        self.connections: set[ServerProtocol] = set()

    def buildProtocol(self, addr):
        return ServerProtocol(self)

    def close_all(self, reason: str = "shutdown"):
        for proto in list(self.connections):
            proto.bye(reason)
