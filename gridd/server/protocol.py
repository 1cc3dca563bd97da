"""The wire adapter: bytes in, one session call per line, bytes out.

``ServerProtocol`` frames lines, parses them with ``gridd.wire``, hands each
message to its ``Session`` and writes the reply. It also implements the
scheduler's connection interface (its actions rendered as lines by
``gridd.server.actions``, ``drop`` and ``ping``) and the
connection-level limits of protocols/PROTOCOL.md section 12, which bound what
any one connection, however hostile, can cost the server:

- **time**: every connection is always under one deadline. Before its HELLO
  is accepted, the handshake deadline (counted from the connect, not moved
  by lines); a client, the idle deadline (``deadline``, moved by every
  line); a worker, the dispatcher's heartbeat deadline (its leases hang on
  it, so it is the dispatcher's business); a connection the server is
  closing, the close timeout (a peer that does not take the last bytes is
  aborted). Partial lines move no deadline: a slow trickle of bytes is cut.
- **memory in**: a partial line is at most 65,536 bytes before the HELLO is
  accepted and ``max_line`` after (``LineOnlyReceiver`` cuts longer ones).
- **work**: at most ``max_outstanding`` requests per connection whose reply
  has not been sent (more get ``ERR too_many``), and a token bucket of
  ``rate`` lines per second with room for ``burst`` (lines beyond it get
  ``ERR too_many``; a peer ``burst`` lines in debt is cut off).
- **memory out**: see :class:`OutputBound`: a peer that does not read what
  the server writes is aborted once ``max_output`` bytes wait for it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from gridd import errors, wire
from gridd.deadline import Deadline
from gridd.server.actions import WireActions
from gridd.server.session import Session

__all__ = ["ServerProtocol", "ServerFactory", "OutputBound", "TokenBucket", "Limits"]

log = Logger()


@dataclass(frozen=True)
class Limits:
    """Per-connection limits (PROTOCOL.md section 12); the defaults are the server's."""

    #: Requests whose reply has not been sent yet.
    max_outstanding: int = 256
    #: Lines per second a connection may send, sustained ...
    rate: float = 5000.0
    #: ... and in a burst; a connection this many lines beyond its allowance is cut off.
    burst: int = 5000
    #: Bytes written to a peer that does not read them, before it is aborted.
    max_output: int = 16 * 1024 * 1024
    #: Seconds a peer has to take the last bytes once the server closes on purpose.
    close_timeout: float = 10.0


class TokenBucket:
    """``rate`` tokens per second on ``clock``, holding at most ``burst``; each line takes one.

    :meth:`take` returns the tokens left: negative means the line is over the
    rate. Refused lines take a token too, so a peer that keeps sending runs
    into debt, and one that slows down to the rate works its way out of it.
    """

    def __init__(self, clock, rate: float, burst: int):
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._stamp = clock.seconds()

    def take(self) -> float:
        now = self.clock.seconds()
        self.tokens = min(float(self.burst), self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self.tokens -= 1
        return self.tokens


@implementer(IPushProducer)
class OutputBound:
    """Notices a peer that does not read: the transport's back-pressure, counted.

    A transport buffers what it cannot send at once, without limit. Reading
    the size of that buffer is not part of any Twisted interface
    (``dataBuffer`` and ``_tempDataLen`` are private, and a TLS transport
    buffers in two places), but back-pressure is: registered as a streaming
    producer, this object is told ``pauseProducing`` when the transport's
    buffer is full (64 KiB for TCP, after the kernel's buffers filled) and
    ``resumeProducing`` when it has drained. Every byte written in between
    waits in memory for the peer, so the protocol counts them and aborts the
    connection when more than ``limit`` wait. That works the same over TCP,
    TLS and UNIX sockets, and a test can pause it by hand.

    The server does not stop reading a paused peer: its heartbeats must still
    be heard, and its requests are bounded by the other limits.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.paused = False
        #: Bytes written since the transport last said its buffer was full.
        self.waiting = 0

    def pauseProducing(self):
        # Twisted's TCP transport says so again on every write while full.
        if not self.paused:
            self.paused = True
            self.waiting = 0

    def resumeProducing(self):
        self.paused = False
        self.waiting = 0

    def stopProducing(self):
        pass

    def wrote(self, size: int) -> bool:
        """Count ``size`` bytes just written; False once more than ``limit`` wait."""
        if self.paused:
            self.waiting += size
        return self.waiting <= self.limit


class ServerProtocol(WireActions, LineOnlyReceiver):
    delimiter = b"\n"

    def __init__(self, factory: ServerFactory):
        self.factory = factory
        self.clock = factory.clock
        self.limits = factory.limits
        # Until the HELLO is accepted, a line may hold only what a peer may send then.
        self.MAX_LENGTH = min(factory.max_line, wire.PRE_HELLO_MAX_LINE)
        self.session = Session(
            self,
            factory.dispatcher,
            factory.authenticator,
            max_line=factory.max_line,
            on_revoke=factory.close_credential,
        )
        self.address = "?"
        self._timers: dict[str, object] = {}
        self._pings: dict[int, defer.Deferred] = {}
        self._ping_ids = itertools.count(1)
        self._outstanding = 0
        self._bucket = TokenBucket(self.clock, self.limits.rate, self.limits.burst)
        self._output = OutputBound(self.limits.max_output)
        #: None while open; "closing" (the server closes after the last bytes), "aborted", or "lost".
        self._ending: str | None = None

    # -- connection events ------------------------------------------------

    def connectionMade(self):
        _no_delay(self.transport)
        peer = self.transport.getPeer()
        self.address = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.factory.connections.add(self)
        self._timers["handshake"] = self.clock.callLater(self.factory.handshake_timeout, self._handshake_expired)
        self.transport.registerProducer(self._output, True)

    def connectionLost(self, reason):
        self._ending = "lost"
        try:
            for call in self._timers.values():
                if call.active():
                    call.cancel()
            self._timers.clear()
            pings, self._pings = self._pings, {}
            for d in pings.values():
                d.callback(False)
            self.session.closed()
        finally:
            # Last, and whatever happened: it may fire the shutdown's wait,
            # which must find this connection done.
            self.factory.connection_gone(self)

    # -- lines in ---------------------------------------------------------

    def dataReceived(self, data: bytes):
        if self._ending:
            # Closing: nothing more is acted upon, so nothing more is kept.
            # (Over TLS the transport reads on until the peer's close_notify;
            # without this a peer could grow the partial-line buffer at will
            # until the close timeout.)
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes):
        if self.session.state == "closed" or self._ending:
            return
        self.session.heard()
        idle = self._timers.get("idle")
        if idle is not None:
            idle.touch()
        tokens = self._bucket.take()
        if tokens < -self.limits.burst:
            self._refuse(self._too_many_lines(" for too long; closing"), None, close=True)
            return
        try:
            msg = wire.parse_line(line)
        except errors.GriddError as e:
            self._refuse(self._too_many_lines("; slow down") if tokens < 0 else e, e.rid)
            return
        if tokens < 0:
            self._refuse(self._too_many_lines("; slow down"), msg.rid)
            return
        if msg.rid is not None and self._outstanding >= self.limits.max_outstanding:
            limit = self.limits.max_outstanding
            self._refuse(errors.TooMany(f"more than {limit} requests await their replies", limit=limit), msg.rid)
            return
        try:
            result = self.session.receive(msg)
        except errors.GriddError as e:
            self._refuse(e, msg.rid)
            return
        if result is not None:
            self._outstanding += 1
            result.addCallbacks(self._reply_ok, self._reply_err, callbackArgs=(msg,), errbackArgs=(msg,))

    def _too_many_lines(self, what: str) -> errors.TooMany:
        rate = self.limits.rate
        limit = int(rate) if float(rate).is_integer() else rate
        return errors.TooMany(f"more than {rate:g} lines per second{what}", limit=limit)

    def lineLengthExceeded(self, line):
        self._refuse(errors.LineTooLong(max_line=self.MAX_LENGTH), None)

    def _reply_ok(self, body: dict, msg: wire.Message):
        self._outstanding -= 1
        if msg.verb == "HELLO":
            self.MAX_LENGTH = self.factory.max_line
        self.send("OK", {"rid": msg.rid, **body})
        if msg.verb == "HELLO":
            self._became_ready()

    def _reply_err(self, failure, msg: wire.Message):
        self._outstanding -= 1
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
        # Until its HELLO is accepted a connection gets one chance: any refusal ends it.
        if err.close or close or self.session.state == "connected":
            log.info("closing {addr}: {code}", addr=self.address, code=err.code)
            self._close()

    def _close(self):
        """Close after the last bytes are sent; abort a peer that will not take them in time.

        For the dispatcher the connection is gone at once: a worker's leases
        end now, not when a peer that does not read (or never sends TLS's
        close_notify) finally lets go, and nothing more is sent to it.
        """
        if self._ending:
            return
        self._ending = "closing"
        self._buffer = b""
        self.session.closed()
        # A registered producer would hold the connection open (and TLS would never shut down).
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        for name in list(self._timers):
            self._cancel(name)
        self._timers["close"] = self.clock.callLater(self.limits.close_timeout, self.transport.abortConnection)

    # -- keepalive --------------------------------------------------------

    def _became_ready(self):
        self._cancel("handshake")
        self._timers["beat"] = self.clock.callLater(self.factory.dispatcher.beat, self._beat)
        if self.session.state == "client":
            dispatcher = self.factory.dispatcher
            self._timers["idle"] = Deadline(self.clock, dispatcher.deadline, dispatcher.beat, self._idle_expired)

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

    # -- the scheduler's connection interface ----------------------------

    def send(self, verb: str, body: dict | None = None):
        if self.transport is None or self._ending or self.transport.disconnecting:
            return
        data = wire.encode(verb, body)
        self.transport.write(data)
        if not self._output.wrote(len(data)):
            self.drop(f"not reading: more than {self.limits.max_output} bytes wait to be sent")

    def drop(self, reason: str):
        if self._ending in ("aborted", "lost"):
            return
        log.info("dropping {addr} ({name}): {reason}", addr=self.address, name=self.session.name, reason=reason)
        self._ending = "aborted"
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
        self._close()


def _no_delay(transport):
    """Send small lines at once: replies and pushes are latency-bound, not bandwidth-bound."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


class ServerFactory(Factory):
    """Builds a ServerProtocol per connection and keeps track of them."""

    noisy = False

    def __init__(
        self,
        dispatcher,
        authenticator,
        clock,
        *,
        max_line=wire.DEFAULT_MAX_LINE,
        handshake_timeout=10.0,
        limits: Limits | None = None,
    ):
        self.dispatcher = dispatcher
        self.authenticator = authenticator
        self.clock = clock
        self.max_line = max_line
        self.handshake_timeout = handshake_timeout
        self.limits = limits if limits is not None else Limits()
        self.connections: set[ServerProtocol] = set()
        self._all_closed: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        return ServerProtocol(self)

    def connection_gone(self, proto: ServerProtocol):
        self.connections.discard(proto)
        if not self.connections:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def when_all_closed(self) -> defer.Deferred:
        """Fires once no connection is left: each has taken its last bytes, or was aborted at its close timeout."""
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._all_closed.append(d)
        return d

    def close_all(self, reason: str = "shutdown"):
        for proto in list(self.connections):
            proto.bye(reason)

    def close_credential(self, credential_id: str):
        """Close every connection that authenticated with this (just revoked) credential, at once.

        Includes connections whose HELLO is still being handled: their
        identity is set as soon as the token is checked. From the BYE on, the
        server acts on nothing more from them; a worker's leases end when
        the connection is gone, as for a lost worker.
        """
        closing = [
            proto
            for proto in self.connections
            if proto.session.identity is not None and proto.session.identity.id == credential_id
        ]
        log.info(
            "credential {id} revoked: closing its {n} connections",
            id=credential_id,
            n=len(closing),
        )
        for proto in closing:
            proto.bye("credential revoked")
