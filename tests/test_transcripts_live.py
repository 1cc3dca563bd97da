"""The transcripts again, against a live ``twistd gridd`` over real TCP.

A live server draws random lease tokens and reads a real clock, so two
things are normalised before comparing: a lease token is matched to the
transcript's ``L1``, ``L2``… the first time it appears, and the same mapping
must hold afterwards; time fields (``at``, ``created``, ``updated``,
``connected``, ``last_seen``) and peer addresses only have to be present.
Transcripts that move the clock (``-- advance``) or set server options
(``-- option``: a live server refuses a ``max_line`` below 65,536, the size
every peer may assume before HELLO) are left to the StringTransport replay.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

from gridd.launch import WAIT, LocalGrid
from tests.transcript import SECRET, TRANSCRIPTS, parse

pytestmark = pytest.mark.e2e

LIVE = [p for p in sorted(TRANSCRIPTS.glob("*.txt")) if not any(s.kind in ("advance", "option") for s in parse(p)[1])]
TIME_FIELDS = {"at", "created", "updated", "connected", "last_seen", "address"}


class LineClient(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 24

    def __init__(self):
        self.lines: list[str] = []
        self.waiting: defer.Deferred | None = None
        self.closed = defer.Deferred()

    def lineReceived(self, line):
        self.lines.append(line.decode("utf-8"))
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(None)

    def connectionLost(self, reason=protocol.connectionDone):
        self.closed.callback(None)
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(None)

    async def next_line(self, index: int, reactor) -> str | None:
        while len(self.lines) <= index and not self.closed.called:
            self.waiting = defer.Deferred()
            await self.waiting.addTimeout(WAIT, reactor)
        return self.lines[index] if index < len(self.lines) else None


class Normaliser:
    """Maps live lease tokens onto the transcript's, and blanks time fields."""

    def __init__(self):
        self.live_to_script: dict[str, str] = {}

    def expected(self, text: str):
        return _split(text)

    def actual(self, text: str, script_text: str):
        verb, body = _split(text)
        _, script_body = _split(script_text)
        return verb, self._walk(body, script_body)

    def _walk(self, live, script):
        if isinstance(live, dict) and isinstance(script, dict):
            out = {}
            for key, value in live.items():
                if key in TIME_FIELDS and key in script:
                    out[key] = script[key]
                elif key == "lease" and isinstance(value, str) and isinstance(script.get(key), str):
                    out[key] = self.live_to_script.setdefault(value, script[key])
                else:
                    out[key] = self._walk(value, script.get(key))
            return out
        if isinstance(live, list) and isinstance(script, list):
            return [self._walk(v, script[i] if i < len(script) else None) for i, v in enumerate(live)]
        if isinstance(live, str) and isinstance(script, str) and live in self.live_to_script:
            return self.live_to_script[live]
        return live

    def script_to_live(self, text: str) -> str:
        for live, script in self.live_to_script.items():
            text = text.replace(f'"{script}"', f'"{live}"')
        return text


def _split(text: str):
    verb, _, body = text.partition(" ")
    return verb, json.loads(body) if body else None


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.mark.parametrize("path", LIVE, ids=[p.stem for p in LIVE])
@pytest_twisted.ensureDeferred
async def test_transcript_replays_against_a_live_server(path, reactor, tmp_path):
    """A real server over TCP answers each transcript's peer lines with its server lines."""
    _, steps = parse(path)
    grid = LocalGrid(reactor, tmp_path, beat=2.0)
    grid.data.mkdir(parents=True)
    (grid.data / "secret").write_text(SECRET + "\n")
    conns: dict[str, LineClient] = {}
    cursor: dict[str, int] = {}
    norm = Normaliser()
    try:
        await grid.start_server("--db", "memory:")
        for step in steps:
            if step.kind == "C":
                if step.conn not in conns:
                    conns[step.conn] = LineClient()
                    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", grid.port), conns[step.conn])
                if not conns[step.conn].closed.called:
                    conns[step.conn].transport.write(norm.script_to_live(step.text).encode("utf-8") + b"\n")
            elif step.kind == "S":
                conn = conns[step.conn]
                index = cursor.get(step.conn, 0)
                line = await conn.next_line(index, reactor)
                assert line is not None, f"{path.name}:{step.number}: connection closed, expected {step.text}"
                cursor[step.conn] = index + 1
                got = norm.actual(line, step.text)
                assert got == norm.expected(step.text), f"{path.name}:{step.number}:\n  {step.text}\n  {line}"
            elif step.kind == "closed":
                await conns[step.conn].closed.addTimeout(WAIT, reactor)
    finally:
        for conn in conns.values():
            if not conn.closed.called:
                conn.transport.loseConnection()
                await conn.closed
        await grid.stop_all()
