"""Replay protocols/transcripts/*.txt against the server on StringTransport.

A transcript is executable data (protocols/transcripts/README.md has the
format). Each ``C(name):`` line is fed to connection ``name`` in chunks of a
chosen size; each ``S(name):`` line must be the next line that connection
received, byte for byte; ``-- advance N`` moves the clock; ``-- connect name`` opens a
connection that sends nothing; ``-- closed name`` expects the server to have closed that connection; ``-- store down``
and ``-- store up`` stop and restart the (memory) store under the running
server, as a database outage would; ``-- store lose-commit`` makes its next
write commit and then fail with ``commit_unknown``; ``-- shutdown`` stops the server as
twistd does (``GriddService.stopService``). At the end no connection may
hold output the transcript did not expect.

With ``GRIDD_RECORD_TRANSCRIPTS=1`` the replay rewrites the ``S`` and
``-- closed`` lines from what the server actually said: review the diff
before committing it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gridd.scheduler import Dispatcher
from gridd.server.auth import Authenticator, hash_secret
from gridd.server.protocol import Limits, ServerFactory
from gridd.server.service import GriddService
from tests.controlled import ControlledStore

TRANSCRIPTS = Path(__file__).resolve().parent.parent / "protocols" / "transcripts"
SECRET = "s3cret"

#: The ``-- `` lines a transcript may hold (protocols/transcripts/README.md).
DIRECTIVES = ("advance", "closed", "connect", "option", "store", "shutdown")

_LINE = re.compile(r"(?P<who>[CS])\((?P<conn>[\w-]+)\): (?P<text>.*)\Z")


@dataclass
class Step:
    kind: str  # "C", "S", "advance", "closed", "connect", "option", "store", "shutdown"
    conn: str = ""
    text: str = ""
    number: int = 0


def parse(path: Path) -> tuple[list[str], list[Step]]:
    """Return the transcript's raw lines and its steps."""
    raw = path.read_text(encoding="utf-8").splitlines()
    steps = []
    for number, line in enumerate(raw, 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m:
            steps.append(Step(m["who"], m["conn"], m["text"], number))
        elif line.startswith("-- "):
            verb, _, arg = line[3:].partition(" ")
            if verb not in DIRECTIVES:
                raise ValueError(f"{path.name}:{number}: unknown directive {verb!r}")
            steps.append(Step(verb, arg if verb in ("closed", "connect") else "", arg, number))
        else:
            raise ValueError(f"{path.name}:{number}: not a transcript line: {line!r}")
    return raw, steps


@dataclass
class Connection:
    proto: object
    transport: StringTransport
    received: list[bytes] = field(default_factory=list)
    buffer: bytes = b""
    lost: bool = False

    def drain(self):
        data = self.transport.value()
        self.transport.clear()
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        self.received.extend(lines)


class Server:
    """A server stack on a task.Clock and a memory store, reached through StringTransports."""

    def __init__(self, options: dict):
        self.clock = task.Clock()
        self.store = ControlledStore()
        leases = itertools.count(1)
        self.dispatcher = Dispatcher(
            self.store,
            self.clock,
            beat=float(options.get("beat", 2.0)),
            backoff_base=float(options.get("backoff_base", 1.0)),
            new_lease=lambda: f"L{next(leases)}",
        )
        # Credentials: seeded ones (``-- option credentials=ID:ROLE,...``) have the
        # token ``ID.secret-ID``; those made with CREDENTIAL add get the secrets
        # S1, S2, ... in turn (a real server draws random ones).
        secrets = itertools.count(1)
        self.authenticator = Authenticator(
            self.store,
            self.clock,
            shared_secret=None if options.get("shared_secret") == "off" else SECRET,
            new_secret=lambda: f"S{next(secrets)}",
        )
        self.factory = ServerFactory(
            self.dispatcher,
            self.authenticator,
            self.clock,
            max_line=int(options.get("max_line", 1_048_576)),
            handshake_timeout=float(options.get("handshake_timeout", 10.0)),
            limits=Limits(
                max_outstanding=int(options.get("max_outstanding", Limits.max_outstanding)),
                rate=float(options.get("max_rate", Limits.rate)),
                burst=int(options.get("rate_burst", Limits.burst)),
            ),
        )
        self.connections: dict[str, Connection] = {}
        self.ports = itertools.count(40001)
        assert self.store.start().called
        for seed in filter(None, options.get("credentials", "").split(",")):
            credential_id, role = seed.split(":")
            secret = f"secret-{credential_id}"
            assert self.store.add_credential(credential_id, role, hash_secret(secret), 0.0).called
        assert defer.Deferred.fromCoroutine(self.dispatcher.start()).called
        # The real service, for ``-- shutdown``; it never listens here.
        self.service = GriddService(
            self.store, self.dispatcher, self.factory, service.MultiService(), reactor=self.clock
        )

    def connection(self, name: str) -> Connection:
        if name not in self.connections:
            proto = self.factory.buildProtocol(None)
            transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", next(self.ports)))
            proto.makeConnection(transport)
            self.connections[name] = Connection(proto, transport)
        return self.connections[name]

    def settle(self):
        """Let zero-delay calls run, collect output, deliver closes."""
        self.clock.advance(0)
        for conn in self.connections.values():
            conn.drain()
            if conn.transport.disconnecting and not conn.lost:
                conn.lost = True
                conn.proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0)

    def stop(self):
        self.dispatcher.stop()
        for conn in self.connections.values():
            if not conn.lost:
                conn.lost = True
                conn.proto.connectionLost(Failure(ConnectionDone()))
        for call in self.clock.getDelayedCalls():
            call.cancel()


def replay(path: Path, chunk: int | None = None, record: bool = False) -> list[str]:
    """Replay one transcript and return its lines.

    When replaying, a mismatch fails an assertion naming the transcript line.
    When recording, the returned lines are the transcript with its ``S`` and
    ``-- closed`` lines replaced by what the server actually did.
    """
    raw, steps = parse(path)
    options = dict(s.text.split("=", 1) for s in steps if s.kind == "option")
    server = Server(options)
    expectations = {s.number for s in steps if s.kind in ("S", "closed")}
    cursor: dict[str, int] = {}  # connection -> index of its next unread line
    reported_closed: set[str] = set()
    observed: dict[int, list[str]] = {}  # transcript line -> what happened just before it

    def observe(before: int):
        for name, conn in server.connections.items():
            start = cursor.get(name, 0)
            observed.setdefault(before, []).extend(
                f"S({name}): {line.decode('utf-8')}" for line in conn.received[start:]
            )
            cursor[name] = len(conn.received)
            if conn.lost and name not in reported_closed:
                reported_closed.add(name)
                observed[before].append(f"-- closed {name}")

    try:
        for step in steps:
            if step.kind in ("C", "advance", "connect", "store", "shutdown") and record:
                observe(step.number)
            if step.kind == "connect":
                server.connection(step.conn)
                server.settle()
            elif step.kind == "C":
                conn = server.connection(step.conn)
                data = step.text.encode("utf-8") + b"\n"
                size = chunk or len(data)
                for i in range(0, len(data), size):
                    conn.proto.dataReceived(data[i : i + size])
                server.settle()
            elif step.kind == "advance":
                server.clock.advance(float(step.text))
                server.settle()
            elif step.kind == "store":
                assert step.text in ("down", "up", "lose-commit"), f"{path.name}:{step.number}: -- store down|up|lose-commit"
                if step.text == "lose-commit":
                    server.store.lose()  # the next request's write: made, then lost during its COMMIT
                else:
                    stopped = server.store.stop() if step.text == "down" else server.store.start()
                    assert stopped.called
                    server.settle()
            elif step.kind == "shutdown":
                stopping = server.service.stopService()
                server.settle()  # the peers take the BYE and the connections close
                assert stopping.called
            elif step.kind == "S" and not record:
                conn = server.connection(step.conn)
                i = cursor.get(step.conn, 0)
                got = conn.received[i].decode("utf-8") if i < len(conn.received) else "<nothing>"
                assert got == step.text, f"{path.name}:{step.number}: expected\n  {step.text}\ngot\n  {got}"
                cursor[step.conn] = i + 1
            elif step.kind == "closed" and not record:
                assert server.connection(step.conn).lost, (
                    f"{path.name}:{step.number}: expected the server to close {step.conn}"
                )
        if record:
            observe(len(raw) + 1)
        else:
            for name, conn in server.connections.items():
                rest = conn.received[cursor.get(name, 0) :]
                assert not rest, f"{path.name}: unexpected lines to {name} at the end: {rest}"
    finally:
        server.stop()
    if not record:
        return raw
    result = []
    for number, line in enumerate(raw, 1):
        result.extend(observed.get(number, []))
        if number not in expectations:
            result.append(line)
    result.extend(observed.get(len(raw) + 1, []))
    return result
