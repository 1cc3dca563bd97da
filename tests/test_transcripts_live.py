"""The transcripts again, against a live ``twistd gridd`` over real TCP, on its SQLite store.

Each transcript gets a fresh server with the default store (``sqlite:`` in a
temporary data directory) and the ``twistd gridd`` options its ``-- option``
lines name (``LIVE_OPTIONS``); seeded credentials (``credentials=``) are
written into that database before the server starts. A live server differs
from the StringTransport replay in four ways, all normalised here:

- it draws random lease tokens and credential secrets: each is matched to the
  transcript's ``L1``, ``S1``… the first time it appears, the same mapping
  must hold afterwards, and the transcript's own lines are sent with the
  live values;
- it reads a real clock: time fields (``TIME_FIELDS``) only have to be
  numbers where the transcript has numbers (and null where it has null), a
  ``retry_in`` may be up to the transcript's, peer addresses and ports only
  have to be there; server ``BEAT`` lines the transcript does not expect are
  skipped;
- its store commits in a thread, so a reply may overtake a notification on
  the same connection (a ``JOB`` sent once its grant commits, an ``EVENT``):
  within a run of consecutive ``S`` lines, each connection's lines may
  arrive in any order (PROTOCOL.md section 2: replies are matched by rid);
- ``-- advance N`` cannot make time pass: one below 1 s that is followed by
  the ``S`` line it brings waits for that line; ``-- shutdown`` sends the
  server SIGTERM.

What cannot run live is skipped with its reason (``live_blockers``):
protocols/transcripts/README.md lists which transcripts run where.
"""

from __future__ import annotations

import json
import re
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

from gridd import wire
from gridd.launch import WAIT, LocalGrid
from gridd.server.auth import hash_secret
from gridd.store.sqlite import SQLiteStore
from tests.transcript import SECRET, TRANSCRIPTS, Step, parse

pytestmark = pytest.mark.e2e

PATHS = sorted(TRANSCRIPTS.glob("*.txt"))
#: Transcript options and the ``twistd gridd`` option each becomes.
LIVE_OPTIONS = {
    "beat": "--beat",
    "max_line": "--max-line",
    "handshake_timeout": "--handshake-timeout",
    "max_outstanding": "--max-outstanding",
    "backoff_base": "--backoff-base",
}
#: Fields holding a time on the server's clock.
TIME_FIELDS = {
    "at", "created", "updated", "connected", "last_seen", "not_before", "revoked", "state_since", "start", "end",
    "since",
}  # fmt: skip
#: Fields holding a random token the live server drew.
TOKEN_FIELDS = {"lease", "token"}
_ADDRESS = re.compile(r"127\.0\.0\.1:\d+")


def live_blockers(steps: list[Step]) -> list[str]:
    """Why a transcript cannot run against a live server (empty: it can)."""
    reasons = []
    for i, step in enumerate(steps):
        if step.kind == "advance":
            following = steps[i + 1] if i + 1 < len(steps) else None
            if float(step.text) >= 1.0:
                reasons.append(f"-- advance {step.text}: a live server would have to be waited for in real time")
            elif following is None or following.kind != "S":
                reasons.append(f"-- advance {step.text} is not followed by the S line it brings, to wait for")
        elif step.kind == "store":
            reasons.append("-- store: a live store cannot be made to fail on cue")
        elif step.kind == "option":
            key, _, value = step.text.partition("=")
            if key == "max_line" and int(value) < wire.PRE_HELLO_MAX_LINE:
                reasons.append(f"max_line={value}: twistd gridd refuses one below {wire.PRE_HELLO_MAX_LINE}")
            elif key in ("max_rate", "rate_burst"):
                reasons.append(f"{key}: a live token bucket refills on the real clock, between any two lines")
            elif key not in LIVE_OPTIONS and key not in ("credentials", "shared_secret"):
                reasons.append(f"option {key} has no twistd gridd counterpart here")
    return list(dict.fromkeys(reasons))


#: Transcripts a live server is known to contradict, with why: a strict xfail,
#: so that the fix turns into a failure until the mark is removed.
LIVE_KNOWN_FAILURES: dict[str, str] = {}
_LIVE_PARAMS = [
    pytest.param(
        p,
        id=p.stem,
        marks=[pytest.mark.xfail(reason=LIVE_KNOWN_FAILURES[p.stem], raises=AssertionError, strict=True)],
    )
    if p.stem in LIVE_KNOWN_FAILURES
    else pytest.param(p, id=p.stem)
    for p in PATHS
]


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
    """Matches live lines to the transcript's: tokens mapped, times and addresses relaxed."""

    def __init__(self):
        self.live_to_script: dict[str, str] = {}

    def match(self, line: str, script_text: str) -> bool:
        """True if the live ``line`` is the transcript's line; a match fixes new token mappings."""
        verb, _, body = line.partition(" ")
        script_verb, _, script_body = script_text.partition(" ")
        if verb != script_verb:
            return False
        mapping = dict(self.live_to_script)
        if not _same(json.loads(body) if body else {}, json.loads(script_body) if script_body else {}, mapping):
            return False
        self.live_to_script = mapping
        return True

    def script_to_live(self, text: str) -> str:
        for live, script in self.live_to_script.items():
            text = text.replace(f'"{script}"', f'"{live}"')
        return text


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(live, script, mapping: dict[str, str], key: str | None = None) -> bool:
    if key in TIME_FIELDS and script is not None:
        return _is_number(live) == _is_number(script) and (_is_number(live) or live == script)
    if key == "address":
        return isinstance(live, str) and isinstance(script, str)
    if key == "retry_in":
        return _is_number(live) and 0 <= live <= script
    if key in TOKEN_FIELDS and isinstance(live, str) and isinstance(script, str):
        if live in mapping:
            return mapping[live] == script
        if script in mapping.values():
            return False
        mapping[live] = script
        return True
    if isinstance(script, dict):
        return (
            isinstance(live, dict)
            and live.keys() == script.keys()
            and all(_same(live[k], script[k], mapping, k) for k in script)
        )
    if isinstance(script, list):
        return (
            isinstance(live, list)
            and len(live) == len(script)
            and all(_same(a, b, mapping) for a, b in zip(live, script, strict=True))
        )
    if isinstance(script, str) and isinstance(live, str):
        for live_token, script_token in mapping.items():
            live = live.replace(live_token, script_token)
        return _ADDRESS.sub("127.0.0.1:PORT", live) == _ADDRESS.sub("127.0.0.1:PORT", script)
    if isinstance(live, bool) or isinstance(script, bool):
        return live is script
    return live == script


def _blocks(steps: list[Step]):
    """Group the steps: runs of consecutive S and closed steps become one list."""
    block: list[Step] = []
    for step in steps:
        if step.kind in ("S", "closed"):
            block.append(step)
            continue
        if block:
            yield block
            block = []
        yield step
    if block:
        yield block


async def _seed_credentials(reactor, grid: LocalGrid, seeds: str):
    """Write the ``credentials=ID:ROLE,...`` of a transcript into the server's database."""
    store = SQLiteStore(str(grid.data / "gridd.db"), reactor=reactor)
    await store.start()
    try:
        for seed in filter(None, seeds.split(",")):
            credential_id, role = seed.split(":")
            await store.add_credential(credential_id, role, hash_secret(f"secret-{credential_id}"), reactor.seconds())
    finally:
        await store.stop()


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


def test_live_blockers_name_what_cannot_run_live():
    """Real-time waits, store outages and options a live server cannot take keep a transcript off the live run."""
    steps = [Step("option", text="max_line=100"), Step("advance", text="2"), Step("store", text="down")]
    assert len(live_blockers(steps)) == 3
    assert live_blockers([Step("advance", text="0.25"), Step("S", "w1", "JOB {}")]) == []
    assert live_blockers([Step("advance", text="0.25"), Step("C", "w1", "BEAT")]) != []


def test_normaliser_maps_tokens_one_to_one():
    """A live lease token stands for one transcript token throughout, and two live tokens never for the same one."""
    norm = Normaliser()
    assert norm.match('OK {"rid":1,"lease":"ab12"}', 'OK {"rid":1,"lease":"L1"}')
    assert not norm.match('OK {"rid":2,"lease":"cd34"}', 'OK {"rid":2,"lease":"L1"}')
    script = 'ERR {"rid":3,"message":"lease L1 of job 1"}'
    assert not norm.match('ERR {"rid":3,"message":"lease ab12 of job 2"}', script)
    assert norm.match('ERR {"rid":3,"message":"lease ab12 of job 1"}', script)
    assert norm.script_to_live('RESULT {"lease":"L1"}') == 'RESULT {"lease":"ab12"}'


def test_normaliser_relaxes_times_but_not_nulls():
    """A time only has to be a number where the transcript has one; a null must stay null."""
    norm = Normaliser()
    assert norm.match('OK {"at":1700000000.5}', 'OK {"at":0.0}')
    assert not norm.match('OK {"not_before":1700000000.5}', 'OK {"not_before":null}')
    assert norm.match('OK {"retry_in":0.2481}', 'OK {"retry_in":0.25}')
    assert not norm.match('OK {"retry_in":0.3}', 'OK {"retry_in":0.25}')


@pytest.mark.parametrize("path", _LIVE_PARAMS)
@pytest_twisted.ensureDeferred
async def test_transcript_replays_against_a_live_server(path, reactor, tmp_path):
    """A real server over TCP, on SQLite, answers each transcript's peer lines with its server lines."""
    _, steps = parse(path)
    blockers = live_blockers(steps)
    if blockers:
        pytest.skip("StringTransport only: " + "; ".join(blockers))
    options = dict(s.text.split("=", 1) for s in steps if s.kind == "option")
    grid = LocalGrid(reactor, tmp_path, beat=float(options.get("beat", 2.0)))
    grid.data.mkdir(parents=True)
    extra = []
    for key, flag in LIVE_OPTIONS.items():
        if key != "beat" and key in options:  # LocalGrid passes --beat itself
            extra += [flag, options[key]]
    if options.get("shared_secret") == "off":
        extra.append("--no-shared-secret")
    else:
        (grid.data / "secret").write_text(SECRET + "\n")
    if options.get("credentials"):
        await _seed_credentials(reactor, grid, options["credentials"])
    conns: dict[str, LineClient] = {}
    cursor: dict[str, int] = {}
    norm = Normaliser()
    try:
        await grid.start_server(*extra)
        for item in _blocks(steps):
            if isinstance(item, list):
                await _expect(item, conns, cursor, norm, reactor, path.name)
            elif item.kind == "connect":
                conns[item.conn] = LineClient()
                await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", grid.port), conns[item.conn])
            elif item.kind == "C":
                if item.conn not in conns:
                    conns[item.conn] = LineClient()
                    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", grid.port), conns[item.conn])
                if not conns[item.conn].closed.called:
                    conns[item.conn].transport.write(norm.script_to_live(item.text).encode("utf-8") + b"\n")
            elif item.kind == "shutdown":
                grid.server.send_signal(signal.SIGTERM)
        for name, conn in conns.items():
            rest = [line for line in conn.lines[cursor.get(name, 0) :] if line != "BEAT"]
            assert not rest, f"{path.name}: unexpected lines to {name} at the end: {rest}"
    finally:
        for conn in conns.values():
            if not conn.closed.called:
                conn.transport.loseConnection()
                await conn.closed
        await grid.stop_all()


async def _expect(block: list[Step], conns, cursor, norm: Normaliser, reactor, name: str):
    """Receive every line a run of S steps expects, each connection's in any order; then the closes."""
    for conn_name in dict.fromkeys(s.conn for s in block if s.kind == "S"):
        conn = conns[conn_name]
        wanted = [s for s in block if s.kind == "S" and s.conn == conn_name]
        while wanted:
            index = cursor.get(conn_name, 0)
            line = await conn.next_line(index, reactor)
            expected = "\n  ".join(f"{s.number}: {s.text}" for s in wanted)
            assert line is not None, f"{name}: {conn_name} closed; still expected\n  {expected}"
            cursor[conn_name] = index + 1
            if line == "BEAT" and not any(s.text == "BEAT" for s in wanted):
                continue  # the live server beats on its own clock
            found = next((s for s in wanted if norm.match(line, s.text)), None)
            assert found is not None, f"{name}: {conn_name} got\n  {line}\nexpected one of\n  {expected}"
            wanted.remove(found)
    for step in block:
        if step.kind == "closed":
            await conns[step.conn].closed.addTimeout(WAIT, reactor)
