"""The whole server stack fed hostile bytes: framing, session, dispatcher and memory store.

tests/test_wire.py fuzzes ``gridd.wire.parse_line`` alone and
tests/test_dispatcher_fuzz.py the dispatcher with valid messages. Here
hypothesis feeds arbitrary byte streams, in arbitrary chunks, to one
connection of a whole server (tests/test_server.py's Stack: ServerProtocol on
a StringTransport, Session, Dispatcher, MemoryStore, task.Clock; no reactor,
no sockets, no sleeps) while other connections hold a lease and watch, and
checks what protocols/PROTOCOL.md promises for any input:

- nothing raises out of ``dataReceived``, nothing logs an error, and every
  line the server writes parses as a server line (``SERVER_VERBS``);
- before its HELLO is accepted, a connection's first line gets exactly one
  ``ERR`` and the connection is closed (section 3); the store is unchanged;
- once ready, every line gets the answer sections 1, 4 and 12 give it:
  exactly one reply per request, carrying its ``rid``; ``rid`` null for a
  line whose ``rid`` cannot be read; the framing, rate and role errors the
  line calls for; and a close only after ``line_too_long`` or a flood
  (``too_many``, 12.4), never after any other error;
- a worker's messages are never accepted for a lease it does not hold, and
  the other connections are undisturbed: the worker holding a lease still
  finishes its job, the other client's ``STATS`` is answered.

An oracle (:func:`expected_answers`) derives from the bytes alone, with
``gridd.wire.parse_line`` and a copy of the section 12.4 token bucket, what
the server must answer to each line; the replies the server wrote are
matched against it by ``rid``, not by order (section 2).
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from gridd import errors, wire
from gridd.server.protocol import Limits
from tests.test_server import MAX_LINE, SECRET, Peer, SlowStore, Stack, run


def fuzz(examples: int) -> settings:
    """Hypothesis settings for one fuzz test: ``examples`` of them (the file runs in about 10 s on 2 cores)."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


#: Limits small enough for a fuzzed stream to flood (PROTOCOL.md 12.4): 3 lines at once, 10 a second.
TIGHT = Limits(rate=10.0, burst=3)
#: One stream in four meets them: with them, few lines reach the session.
TIGHT_SOMETIMES = st.integers(0, 3).map(lambda k: k == 3)


def _error_codes() -> dict[str, str]:
    """The ERR codes of PROTOCOL.md section 3, each with its "close" column."""
    spec = (Path(__file__).parent.parent / "protocols" / "PROTOCOL.md").read_text()
    section = spec.split("## 3. Errors", 1)[1].split("## 4.", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \|.*\|([^|]*)\|\s*$", section, re.M)
    return {code: close.strip() for code, close in rows}


#: Every code the spec defines, and those it marks plain "close" (in every state).
ERR_CODES = _error_codes()
ALWAYS_CLOSE = frozenset(code for code, close in ERR_CODES.items() if close == "close")
#: What a HELLO refused before the handshake may get, when its token is not the secret.
HELLO_REFUSALS = frozenset({"unsupported_proto", "bad_request", "auth_failed", "forbidden"})
#: Worker requests that name a lease (section 7).
LEASE_VERBS = frozenset({"RESULT", "PROGRESS", "DONE", "FAIL", "RETURN"})
#: What each role may send once ready (section 4's table; HELLO gets already_ready).
ROLE_MAY_SEND = {
    "worker": frozenset(LEASE_VERBS | {"SLOTS", "BEAT", "PONG"}),
    "submitter": frozenset(
        {"SUBMIT", "SHOW", "LIST", "RESULTS", "WORKERS", "STATS", "WATCH"}
        | {"CANCEL", "PAUSE", "RESUME", "REQUEUE", "BEAT", "PONG"}
    ),
    "admin": frozenset(
        {"SUBMIT", "SHOW", "LIST", "RESULTS", "WORKERS", "STATS", "WATCH", "CANCEL", "PAUSE", "RESUME"}
        | {"REQUEUE", "WORKER", "DISPATCH", "CREDENTIAL", "BEAT", "PONG"}
    ),
}


def test_protocol_spec_error_table_read_with_close_rules():
    """The spec's error table is found and read: the codes the oracle relies on, and which always close."""
    assert {"bad_line", "bad_json", "line_too_long", "too_many", "forbidden", "already_ready"} <= set(ERR_CODES)
    assert {"line_too_long", "hello_required", "auth_failed"} <= ALWAYS_CLOSE
    assert not ALWAYS_CLOSE & {"bad_request", "too_many", "forbidden", "already_ready", "stale_lease"}


# -- strategies ------------------------------------------------------------------

#: A valid body (without rid) for each verb a peer sends, aimed at the world below:
#: job 1 runs on w1 under L1, job 2 (type "fz") on wf under L2.
TEMPLATES: dict[str, dict] = {
    "HELLO": {"proto": 1, "role": "client", "name": "x", "token": "guess", "slots": 1, "types": {"noop": "1.0"}},
    "BEAT": {"load": 0.5},
    "PONG": {"n": 1},
    "RESULT": {"job": 2, "lease": "L2", "results": [{"i": 0, "out": "P"}]},
    "PROGRESS": {"job": 2, "lease": "L2", "note": "half way"},
    "DONE": {"job": 2, "lease": "L2", "results": [{"i": 0, "out": 0}, {"i": 1, "out": 1}]},
    "FAIL": {"job": 2, "lease": "L2", "error": "boom", "retry": True},
    "RETURN": {"job": 2, "lease": "L2", "reason": "host busy"},
    "SLOTS": {"slots": 2},
    "SUBMIT": {"jobs": [{"type": "noop", "records": ["a"]}]},
    "SHOW": {"job": 1},
    "LIST": {"state": "queued", "type": "noop", "after": 0, "limit": 10},
    "RESULTS": {"job": 1, "after": -1, "limit": 10},
    "WORKERS": {},
    "STATS": {},
    "WATCH": {"jobs": [1]},
    "CANCEL": {"job": 1},
    "PAUSE": {"job": 1},
    "RESUME": {"job": 1},
    "REQUEUE": {"job": 1},
    "WORKER": {"worker": "w1", "action": "drain"},
    "DISPATCH": {"enabled": True},
    "CREDENTIAL": {"action": "add", "id": "k1", "role": "submitter", "note": "n"},
}
NOTIFICATIONS = ("BEAT", "PONG")
assert set(TEMPLATES) == set(wire.PEER_VERBS), "a template for every peer verb"

#: Values worth trying per field name: valid ones for the world, boundaries, wrong types.
#: Tokens never include the shared secret, so no fuzzed HELLO can be accepted.
POOLS: dict[str, list] = {
    "rid": [0, 1, 2**53 - 1, 2**53, -1, 1.5, "7", None, True, [1], {}],
    "job": [0, 1, 2, 3, 99, 2**53 - 1, 2**53, -1, 1.0, "1", True, None, [1]],
    "lease": ["L1", "L2", "L3", "L9", "", "x" * 128, "x" * 129, 1, None],
    "results": [
        [],
        [{"i": 0, "out": 1}],
        [{"i": 1, "out": "B"}, {"i": 2, "out": "C"}],
        [{"i": 0, "out": 1}, {"i": 1, "error": "unreadable"}],
        [{"i": 0, "out": 1, "error": "e"}],
        [{"i": 9, "out": 1}],
        [{"i": -1, "out": 1}],
        [{"i": 0}],
        [{"i": 0, "error": 5}],
        [{"i": 1, "out": 1}, {"i": 1, "out": 2}],
        [{"i": 2**53, "out": 1}],
        "x",
    ],
    "slots": [0, 1, 2, 100_000, 100_001, -1, 1.5],
    "records": [[], [1], ["a", "b", "c"], [None], "abc", [[[]]], ["x" * 3000]],
    "type": ["noop", "other", "fz", "", "x" * 128, "x" * 129, 7],
    "state": ["queued", "running", "done", "bogus", "", "x" * 33],
    "worker": ["w1", "w2", "wf", "fz", "nobody", "", "x" * 129],
    "action": ["drain", "undrain", "disconnect", "add", "list", "revoke", "frob"],
    "id": ["k1", "k2", "fz", "bad id", "", "x" * 65],
    "role": ["worker", "submitter", "admin", "client", "root"],
    "enabled": [True, False, 1, None],
    "jobs": [
        [],
        [1],
        [1, 2, 99],
        [{"type": "noop", "records": [1]}],
        [{"type": "fz", "records": [1, 2]}],
        [{"type": "other", "records": [1]}],
        [{"type": "noop", "records": [1], "timeout": 0.0001}],
        [{"type": "noop", "records": [1], "timeout": 0.001, "retries": 0}],
        [{"type": "noop", "records": [1], "requires": {"memory": -1}}],
        [{"type": "noop", "records": [1], "requires": {"version": "9", "tags": ["gpu"]}}],
        [{"type": "noop", "records": [1], "priority": 1_000_001}],
        [{"type": "noop", "records": [1], "retries": 1001}],
        [{"type": "noop", "records": ["y" * 1500, "z" * 1500]}],
        [{"type": "noop", "records": [1]}] * 3,
    ],
    "proto": [1, 2, 0, "1", 1.0],
    "token": ["guess", "s3cre", SECRET + " ", SECRET.upper(), "fz.wrong", "k1.x", "", ".", "x" * 4097],
    "name": ["w1", "w2", "wf", "x", "", "x" * 129],
    "after": [0, -1, -2, 1, 2**53],
    "limit": [0, 1, 1000, 1001, 10_000, 10_001],
    "n": [0, 1, -1, "1"],
    "load": [0, 0.5, -1, 2**53, "x"],
    "note": ["", "n", "x" * 1025, None],
    "error": ["e", "", 5, None],
    "retry": [True, False, 0, "yes"],
    "reason": ["busy", "", 5],
    "holding": [[], [{"job": 1, "lease": "L1"}], [{"job": 1}]],
    "types": [{}, {"noop": "1.0"}, {"fz": "1.0"}, {"": "1"}, {"noop": 1}],
    "tags": [[], ["gpu"], [""], "gpu"],
    "memory": [0, -1, 2**53],
    "agent": ["a", "x" * 257],
}
FIELD_NAMES = sorted({name for spec in wire.PEER_VERBS.values() for name in spec} | set(POOLS) | {"i", "out"})

_KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6))
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 2, -1, 2**53 - 1, 2**53]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
#: Any JSON value, nested a few levels.
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=12,
)

#: Pieces of lines: valid fragments, JSON punctuation, huge numbers, deep nesting,
#: non-UTF-8, CR, NUL, surrogate escapes, non-JSON constants, server verbs.
FRAGMENTS = [
    b"HELLO ", b"BEAT", b"PONG ", b"RESULT ", b"DONE ", b"FAIL ", b"SUBMIT ", b"STATS ", b"CREDENTIAL ",
    b"OK ", b"ERR ", b"JOB ", b"hello ", b"ABCDEFGHIJKLMNOPQ ",
    b'{"rid":', b'{"rid":1}', b'"rid":7,', b'"proto":1,', b'"role":"worker",', b'"role":"client",',
    b'"name":"w1",', b'"token":"guess",', b'"slots":1,', b'"types":{"noop":"1.0"},', b'"job":1,',
    b'"job":2,', b'"lease":"L1",', b'"lease":"L2",', b'"results":[{"i":1,"out":"B"}]', b'"jobs":[',
    b'{"type":"noop","records":[1]}', b'"n":1',
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b" ", b"\t", b"1", b"-", b".", b"e",
    b"1" + b"0" * 400, b"1e400", b"-1e400", b"2E308", b"9007199254740993", b"-0", b"0.0",
    b"NaN", b"Infinity", b"-Infinity", b"null", b"true", b"false",
    b"[" * 70, b"]" * 70, b'{"a":' * 70, b"}" * 70,
    b"\\ud800", b'"\\udc00"', b'"\\u0000"', b"\\u", b"\\x",
    b"\xff", b"\xfe", b"\xc3", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xef\xbb\xbf",
    b"\r", b"\x00", b"\n", b"\r\n",
    b"\x16\x03\x01\x02\x00\x01",
]  # fmt: skip

#: Requests first: hypothesis shrinks towards the first element.
_PEER_VERBS = sorted(wire.PEER_VERBS, key=lambda verb: (verb in NOTIFICATIONS or verb == "HELLO", verb))
_VERBS = st.one_of(
    st.sampled_from(_PEER_VERBS),
    st.sampled_from(_PEER_VERBS),
    st.sampled_from(["OK", "ERR", "JOB", "REVOKE", "PING", "BYE", "FROB", "hello", "A" * 17]),
)
#: The verbs each kind of connection is fuzzed with most.
CLIENT_FOCUS = ("SUBMIT", "SHOW", "LIST", "RESULTS", "WORKERS", "STATS", "WATCH", "CANCEL", "PAUSE", "RESUME")
CLIENT_FOCUS += ("REQUEUE", "WORKER", "DISPATCH", "CREDENTIAL")
WORKER_FOCUS = ("RESULT", "DONE", "FAIL", "RETURN", "PROGRESS", "SLOTS")
HELLO_FOCUS = ("HELLO",)


@st.composite
def messages(draw, focus: tuple[str, ...]) -> bytes:
    """A verb with a body near a valid one: a template, mutated a few times, encoded in varied ways."""
    verb = draw(st.sampled_from(focus) if draw(st.integers(0, 2)) else _VERBS)
    template = verb if verb in TEMPLATES and draw(st.integers(0, 4)) else draw(st.sampled_from(sorted(TEMPLATES)))
    body = copy.deepcopy(TEMPLATES[template])
    if template not in NOTIFICATIONS or draw(st.integers(0, 5)) == 5:
        odd = draw(st.integers(0, 5)) == 5
        body["rid"] = draw(st.sampled_from(POOLS["rid"]) if odd else st.integers(10, 10**6))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]))):
        name = draw(st.sampled_from(sorted(body)) if body and draw(st.booleans()) else st.sampled_from(FIELD_NAMES))
        how = draw(st.integers(0, 5))
        if how == 0:
            body.pop(name, None)
        elif how <= 3 and name in POOLS:
            body[name] = copy.deepcopy(draw(st.sampled_from(POOLS[name])))
        else:
            body[name] = draw(JSON_VALUES)
    if not body and draw(st.booleans()):
        return verb.encode()
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()), separators=separators)
    return verb.encode() + b" " + text.encode("utf-8", "surrogatepass")


@st.composite
def long_lines(draw) -> bytes:
    """A valid BEAT near the line limit: exactly at it, a little under, or just over."""
    head = b'BEAT {"pad":"'
    size = MAX_LINE + draw(st.integers(-3, 2))
    return head + b"p" * (size - len(head) - 2) + b'"}'


@st.composite
def lines(draw, focus: tuple[str, ...]) -> bytes:
    """One line's worth of bytes (it may hold an LF, and so be several lines): mostly near-valid messages."""
    kind = draw(st.integers(0, 19))
    if kind < 14:
        return draw(messages(focus))
    if kind < 16:
        return draw(st.binary(max_size=200))
    if kind < 17:
        return b"".join(draw(st.lists(st.sampled_from(FRAGMENTS), max_size=24)))
    if kind < 19:
        verb, value = draw(_VERBS), draw(JSON_VALUES)
        return verb.encode() + b" " + json.dumps(value).encode()
    return draw(long_lines())


@st.composite
def line_streams(draw, focus: tuple[str, ...], max_lines=30) -> bytes:
    """Lines ended by LF or CR LF, perhaps followed by a partial line (rarely one past the limit)."""
    body = draw(st.lists(lines(focus), min_size=1, max_size=max_lines))
    ends = draw(st.lists(st.sampled_from([b"\n", b"\n", b"\r\n"]), min_size=1, max_size=4))
    tail = draw(st.sampled_from([b""] * 6 + [b"partial", b"T" * (MAX_LINE + 1)]) | st.binary(max_size=40))
    return b"".join(line + ends[k % len(ends)] for k, line in enumerate(body)) + tail


def byte_streams(focus: tuple[str, ...]):
    """Any bytes at all: lines as above (mostly), plain binary of a few KB, binary mixed with line ends."""
    return st.one_of(
        line_streams(focus),
        line_streams(focus),
        line_streams(focus),
        st.binary(max_size=6000),
        st.lists(
            st.one_of(st.binary(max_size=300), st.sampled_from([b"\n", b"\r\n", b"\r", b"\x00", b"x" * 2500])),
            min_size=1,
            max_size=30,
        ).map(b"".join),
    )


#: Chunk sizes, used in turn: the transport may split a stream anywhere.
CHUNKS = st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=6)
#: Seconds the clock moves before each chunk, used in turn (capped, see Schedule).
PAUSES = st.lists(st.sampled_from([0.0, 0.0, 0.05, 0.1, 0.3, 1.0]), max_size=4)


# -- the server, and what it must answer ------------------------------------------


class FuzzPeer(Peer):
    """A Peer that keeps every message the server wrote and names a line no peer could parse."""

    def __init__(self, *args):
        super().__init__(*args)
        self.heard: list[wire.Message] = []

    def drain(self):
        data = self.transport.value()
        self.transport.clear()
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                msg = wire.parse_line(line, wire.SERVER_VERBS)
            except errors.GriddError as e:
                raise AssertionError(f"the server wrote a line no peer can parse ({e.message}): {line!r}") from None
            self.heard.append(msg)
            self.inbox.append(msg)

    def others(self) -> list[wire.Message]:
        """What arrived since the last take, apart from the server's BEATs."""
        return [m for m in self.take_all() if m.verb != "BEAT"]


class FuzzStack(Stack):
    """A Stack whose peers are FuzzPeers."""

    def connect(self) -> FuzzPeer:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", next(self._ports)))
        proto.makeConnection(transport)
        peer = FuzzPeer(self, proto, transport)
        self.peers.append(peer)
        return peer


@dataclass
class World:
    """c1 (admin) submitted job 1 (records a, b, c); w1 runs it under L1, record 0 accepted."""

    stack: FuzzStack
    c1: FuzzPeer
    w1: FuzzPeer
    #: Peers that must hear nothing but BEATs while another connection is fuzzed.
    bystanders: list[FuzzPeer] = field(default_factory=list)
    #: The worker world's wf, and the oracle's copy of its token bucket.
    wf: FuzzPeer | None = None
    wf_bucket: Bucket | None = None

    def store_state(self) -> tuple:
        return self.stack.snapshot(), run(self.stack.store.list_credentials())

    def job_state(self, job: int) -> tuple:
        return run(self.stack.store.get_job(job)), run(self.stack.store.get_results(job))

    def w1_finishes_job_1(self):
        rest = [{"i": 1, "out": "B"}, {"i": 2, "out": "C"}]
        done = self.w1.request("DONE", {"job": 1, "lease": "L1", "results": rest})
        assert done is not None and done.verb == "OK", f"w1 could not finish its job: {done}"
        assert run(self.stack.store.get_job(1))["state"] == "done"

    def c1_stats_answered(self):
        stats = self.c1.request("STATS")
        assert stats is not None and stats.verb == "OK", f"the other client's STATS: {stats}"


def make_world(stack: FuzzStack | None = None) -> World:
    stack = stack if stack is not None else FuzzStack()
    c1 = stack.client("c1")
    w1 = stack.worker("w1")
    assert stack.submit(c1, records=["a", "b", "c"]) == 1
    [job] = w1.take("JOB")
    assert job["lease"] == "L1"
    accepted = w1.request("RESULT", {"job": 1, "lease": "L1", "results": [{"i": 0, "out": "A"}]})
    assert accepted.verb == "OK"
    for peer in (c1, w1):
        peer.take_all()
    return World(stack, c1, w1, [c1, w1])


@contextmanager
def server(world_maker=make_world):
    """A fresh world per hypothesis example, stopped afterwards; an error logged meanwhile fails the example."""
    logged = []

    def observe(event):
        level = event.get("log_level")
        if event.get("isError") or (level is not None and level.name in ("error", "critical")):
            logged.append(event)

    globalLogPublisher.addObserver(observe)
    world = world_maker()
    try:
        yield world
    finally:
        world.stack.stop()
        globalLogPublisher.removeObserver(observe)
    assert not logged, "errors were logged:\n" + "\n".join(formatEvent(e) for e in logged)


@dataclass
class Schedule:
    """When each chunk of a stream is delivered: (pause before it, clock time, start, end)."""

    steps: list[tuple[float, float, int, int]]

    @classmethod
    def make(cls, size: int, chunks: list[int], pauses: list[float], now: float, cap: float = 4.0):
        # The cap keeps every other connection inside its keepalive deadline (6 s).
        steps, start, k, waited = [], 0, 0, 0.0
        while start < size:
            pause = pauses[k % len(pauses)] if pauses else 0.0
            if waited + pause > cap:
                pause = 0.0
            waited += pause
            now += pause  # as task.Clock.advance adds it
            end = min(size, start + chunks[k % len(chunks)])
            steps.append((pause, now, start, end))
            start, k = end, k + 1
        return cls(steps)

    def time_of(self, offset: int) -> float:
        """The clock when the byte at ``offset`` is delivered."""
        for _, now, start, end in self.steps:
            if start <= offset < end:
                return now
        raise AssertionError(offset)


def feed(world: World, peer: FuzzPeer, data: bytes, schedule: Schedule):
    """Deliver ``data`` as scheduled; stop once the server's close has reached the peer."""
    stack = world.stack
    for pause, _, start, end in schedule.steps:
        if peer.lost:
            break
        if pause:
            stack.advance(pause)
            for bystander in world.bystanders:
                bystander.send("BEAT")  # they keep their side of the keepalive
        try:
            peer.proto.dataReceived(data[start:end])
        except Exception as e:
            raise AssertionError(f"dataReceived raised on bytes {start}..{end}: {e!r}") from e
        if peer.transport.value() or peer.transport.disconnecting:
            stack.settle()
    stack.settle()


class Bucket:
    """PROTOCOL.md 12.4's token bucket, as the oracle's own copy."""

    def __init__(self, limits: Limits, now: float):
        self.rate, self.burst = limits.rate, limits.burst
        self.tokens, self.stamp = float(limits.burst), now

    def take(self, now: float) -> float:
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return self.tokens


@dataclass
class Expected:
    """What the server must answer to a stream."""

    #: One entry per reply: (rid, the codes its ERR must have, or None for any OK or non-closing ERR).
    replies: list[tuple[object, frozenset | None]] = field(default_factory=list)
    #: The code of the ERR after which the server must close, or None: it must stay open.
    close: str | None = None
    #: The requests that reach the session, for checks on what they did.
    requests: list[wire.Message] = field(default_factory=list)


def expected_answers(data: bytes, schedule: Schedule, *, ready_as: str | None, bucket: Bucket) -> Expected:
    """What the server must answer to ``data``, line by line, from the spec (sections 1, 3, 4, 12).

    ``ready_as`` is the connection's role once its HELLO was accepted, or None
    before (when no line of ``data`` can be an accepted HELLO).
    """
    out = Expected()
    *lines, partial = data.split(b"\n")
    offset = 0
    for line in lines:
        now = schedule.time_of(offset + len(line))  # when its LF arrives
        offset += len(line) + 1
        if len(line) > MAX_LINE:
            out.replies.append((None, frozenset({"line_too_long"})))
            out.close = "line_too_long"
            return out
        tokens = bucket.take(now)
        if ready_as is None:
            return _refused_before_hello(out, line)
        if tokens < -bucket.burst:
            out.replies.append((None, frozenset({"too_many"})))
            out.close = "too_many"
            return out
        try:
            msg = wire.parse_line(line)
        except errors.GriddError as e:
            out.replies.append((e.rid, frozenset({"too_many" if tokens < 0 else e.code})))
            continue
        if tokens < 0:
            out.replies.append((msg.rid, frozenset({"too_many"})))
            continue
        if msg.verb == "HELLO":
            out.replies.append((msg.rid, frozenset({"already_ready"})))
        elif msg.verb not in ROLE_MAY_SEND[ready_as]:
            out.replies.append((msg.rid, frozenset({"forbidden"})))
        elif msg.verb not in NOTIFICATIONS:
            out.replies.append((msg.rid, None))
            out.requests.append(msg)
    if len(partial) > MAX_LINE:
        out.replies.append((None, frozenset({"line_too_long"})))
        out.close = "line_too_long"
    return out


def _refused_before_hello(out: Expected, line: bytes) -> Expected:
    """The first line before the HELLO is accepted: its one ERR, then the close (section 3)."""
    try:
        msg = wire.parse_line(line)
    except errors.GriddError as e:
        out.replies.append((e.rid, frozenset({e.code})))
        out.close = e.code
        return out
    codes = HELLO_REFUSALS if msg.verb == "HELLO" else frozenset({"hello_required"})
    out.replies.append((msg.rid, codes))
    out.close = "any"  # whatever the code: the one ERR closes
    return out


def check_answers(peer: FuzzPeer, expected: Expected, *, holds_open: bool = False):
    """The replies the server wrote match ``expected`` one to one, and it closed exactly when it had to."""
    replies = [m for m in peer.heard if m.verb in ("OK", "ERR")]
    for m in replies:
        if m.verb == "ERR":
            code = m.body["code"]
            assert code in ERR_CODES, f"an ERR code the spec does not define: {m.body}"
            assert code != "internal", f"the server hit a bug: {m.body}"
            assert isinstance(m.body.get("message"), str) and m.body["message"], m.body
    left = list(replies)
    # Entries with known codes first, so an entry that takes any reply does not steal theirs.
    for rid, codes in sorted(expected.replies, key=lambda e: e[1] is None):
        for k, m in enumerate(left):
            if type(m.rid) is not type(rid) or m.rid != rid:
                continue
            if codes is None:
                fits = m.verb == "OK" or m.body["code"] not in ALWAYS_CLOSE
            else:
                fits = m.verb == "ERR" and m.body["code"] in codes
            if fits:
                del left[k]
                break
        else:
            got = [(m.verb, m.body) for m in replies if m.rid == rid]
            raise AssertionError(f"no fitting reply for rid {rid!r} (expected {codes}); replies with it: {got}")
    assert not left, f"replies no line called for: {[(m.verb, m.body) for m in left]}"
    if expected.close is None:
        assert not peer.closed and not peer.lost, "the server closed a connection the spec keeps open"
    else:
        assert peer.closed, f"the server did not close after ERR {expected.close}"
        last = peer.heard[-1]
        assert last.verb == "ERR", f"the server wrote after its closing ERR: {last}"
        if expected.close != "any":
            assert last.body["code"] == expected.close, last.body
        if not holds_open:
            assert peer.lost


# -- 1. a fresh connection ---------------------------------------------------------


@fuzz(300)
@given(data=byte_streams(HELLO_FOCUS), chunks=CHUNKS, holds_open=st.booleans())
def test_server_fresh_connection_any_bytes_one_err_then_close(data, chunks, holds_open):
    """Any bytes before the HELLO get at most one ERR, for the first line, then the close; nothing else changes."""
    with server() as world:
        before = world.store_state()
        peer = world.stack.connect()
        peer.holds_open = holds_open  # a peer that goes on sending after the close
        schedule = Schedule.make(len(data), chunks, [], world.stack.clock.seconds())
        expected = expected_answers(data, schedule, ready_as=None, bucket=Bucket(Limits(), 0.0))
        feed(world, peer, data, schedule)

        assert len(peer.heard) == len(expected.replies) <= 1, [(m.verb, m.body) for m in peer.heard]
        check_answers(peer, expected, holds_open=holds_open)
        if not expected.replies:
            assert peer.proto.session.state == "connected"
        assert world.store_state() == before
        for other in world.bystanders:
            assert other.others() == [] and not other.closed
        world.w1_finishes_job_1()
        world.c1_stats_answered()


# -- 2. an authenticated client ---------------------------------------------------


def _ready_peer(world: World, limits: Limits, hello: dict) -> tuple[FuzzPeer, Bucket]:
    """Connect with ``limits`` and send ``hello``; the oracle's bucket has seen that line too."""
    stack = world.stack
    stack.factory.limits = limits
    try:
        peer = stack.connect()
    finally:
        stack.factory.limits = Limits()
    bucket = Bucket(limits, stack.clock.seconds())
    bucket.take(stack.clock.seconds())
    peer.send("HELLO", {"rid": 1, "proto": 1, **hello})
    reply = peer.reply(1)
    assert reply is not None and reply.verb == "OK", reply
    peer.heard.clear()
    peer.take_all()
    return peer, bucket


@fuzz(400)
@given(
    role=st.sampled_from(["submitter", "admin"]),
    data=byte_streams(CLIENT_FOCUS),
    chunks=CHUNKS,
    pauses=PAUSES,
    tight=TIGHT_SOMETIMES,
)
def test_server_client_any_lines_one_reply_per_request_others_undisturbed(role, data, chunks, pauses, tight):
    """A ready client fed any lines gets one fitting reply per request, closed only as the spec says; others go on."""
    with server() as world:
        stack = world.stack
        if role == "submitter":
            token = run(defer.Deferred.fromCoroutine(stack.factory.authenticator.add("fz", "submitter")))
        else:
            token = SECRET  # the shared secret logs a client in as admin
        limits = TIGHT if tight else Limits()
        peer, bucket = _ready_peer(world, limits, {"role": "client", "name": "fz", "token": token})
        schedule = Schedule.make(len(data), chunks, pauses, stack.clock.seconds())
        expected = expected_answers(data, schedule, ready_as=role, bucket=bucket)
        job_1 = world.job_state(1)
        feed(world, peer, data, schedule)

        check_answers(peer, expected)
        assert world.c1.others() == [] and not world.c1.closed
        world.c1_stats_answered()
        if role == "submitter":
            # A submitter may not touch c1's job nor w1: both are exactly as they were.
            assert world.job_state(1) == job_1
            assert world.w1.others() == [] and not world.w1.closed
            world.w1_finishes_job_1()
        elif not world.w1.lost and run(stack.store.get_job(1))["lease"] == "L1":
            world.w1_finishes_job_1()  # an admin may have drained w1 or stopped dispatching; not more


# -- 3. an authenticated worker ---------------------------------------------------


def make_worker_world(limits: Limits) -> World:
    """The world, plus wf (with ``limits``): a worker of type "fz" that runs job 2 (records p, q) under L2."""
    world = make_world()
    hello = {"role": "worker", "name": "wf", "token": SECRET, "slots": 1, "types": {"fz": "1.0"}}
    wf, bucket = _ready_peer(world, limits, hello)
    assert world.stack.submit(world.c1, type="fz", records=["p", "q"]) == 2
    [job] = wf.take("JOB")
    assert (job["job"], job["lease"]) == (2, "L2")
    wf.heard.clear()
    world.c1.take_all()
    world.wf, world.wf_bucket = wf, bucket
    return world


@fuzz(400)
@given(
    data=byte_streams(WORKER_FOCUS),
    chunks=CHUNKS,
    pauses=PAUSES,
    tight=TIGHT_SOMETIMES,
)
def test_server_worker_any_lines_only_own_leases_others_undisturbed(data, chunks, pauses, tight):
    """A ready worker fed any lines is answered as the spec says, only for leases it holds; w1's job is untouched."""
    with server(lambda: make_worker_world(TIGHT if tight else Limits())) as world:
        stack, peer, bucket = world.stack, world.wf, world.wf_bucket
        schedule = Schedule.make(len(data), chunks, pauses, stack.clock.seconds())
        expected = expected_answers(data, schedule, ready_as="worker", bucket=bucket)
        job_1 = world.job_state(1)
        feed(world, peer, data, schedule)

        check_answers(peer, expected)
        # Every lease the server accepted a message about was handed to this connection.
        held = {(2, "L2")} | {(m.body["job"], m.body["lease"]) for m in peer.heard if m.verb == "JOB"}
        by_rid: dict[object, list[wire.Message]] = {}
        for msg in expected.requests:
            by_rid.setdefault(msg.rid, []).append(msg)
        for reply in peer.heard:
            sent = by_rid.get(reply.rid, []) if reply.verb == "OK" else []
            if len(sent) == 1 and sent[0].verb in LEASE_VERBS:
                assert (sent[0].body["job"], sent[0].body["lease"]) in held, (sent[0], reply)
        for job in run(stack.store.list_jobs(limit=1000)):
            if job["id"] != 1:
                for result in run(stack.store.get_results(job["id"])):
                    assert (job["id"], result["lease"]) in held, result
        assert world.job_state(1) == job_1
        for other in world.bystanders:
            assert other.others() == [] and not other.closed
        world.w1_finishes_job_1()
        world.c1_stats_answered()


# -- what the fuzzing found, fixed: a notification's "rid" is no rid ---------------------
#
# ServerProtocol used to echo the body's raw "rid" of a notification (BEAT,
# PONG) it refused, and to count such a line against max_outstanding. A
# notification has no rid (PROTOCOL.md 2, 12.3): gridd.wire.Message.rid says
# None for it, and a request's rid only when it is a valid one.


def test_server_notification_with_unreadable_rid_before_hello_gets_null_rid():
    """A BEAT with "rid": "x" in its body, before the HELLO, gets ERR hello_required with rid null, then the close."""
    with server() as world:
        peer = world.stack.connect()
        peer.send_raw(b'BEAT {"rid":"x"}\n')
        [err] = peer.heard
        assert (err.verb, err.body["code"], err.body["rid"]) == ("ERR", "hello_required", None)
        assert peer.lost


def test_server_rate_limited_notification_with_unreadable_rid_gets_null_rid():
    """A ready client's BEAT with "rid": "x" that finds the token bucket empty gets ERR too_many with rid null."""
    with server() as world:
        peer, _ = _ready_peer(world, Limits(rate=10.0, burst=1), {"role": "client", "name": "fz", "token": SECRET})
        peer.send_raw(b'BEAT {"rid":"x"}\n')  # the HELLO took the one token
        [err] = peer.heard
        assert (err.verb, err.body["code"], err.body["rid"]) == ("ERR", "too_many", None)
        assert not peer.closed


def test_server_notification_with_rid_not_refused_at_outstanding_limit():
    """A BEAT (with an unknown "rid" field) while max_outstanding requests await replies is taken, not refused."""

    def world_with_slow_stats():
        store = SlowStore()
        world = make_world(FuzzStack(store))
        store.slow.add("counts")
        return world

    with server(world_with_slow_stats) as world:
        for rid in range(10, 10 + Limits().max_outstanding):
            world.c1.send("STATS", {"rid": rid})  # each waits for the store
        world.c1.heard.clear()
        world.c1.send_raw(b'BEAT {"rid":5}\n')
        assert world.c1.heard == []
