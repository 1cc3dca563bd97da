"""The server stack (wire adapter, session, dispatcher, memory store) on StringTransport and task.Clock.

No reactor, no sockets, no sleeps: each connection is a ServerProtocol on a
StringTransport, time is a task.Clock, and the memory store answers at once
(a wrapper delays or fails its answers where a test needs that). Everything
the server writes is parsed with ``gridd.wire`` as a peer would, so a line the
server should never send fails the test.
"""

from __future__ import annotations

import itertools
import sqlite3
from dataclasses import dataclass

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from gridd import wire
from gridd.scheduler import Dispatcher
from gridd.server.auth import Authenticator
from gridd.server.protocol import ServerFactory
from gridd.store.memory import MemoryStore
from tests.controlled import ControlledStore

SECRET = "s3cret"
MAX_LINE = 4096
BEAT = 2.0
DEADLINE = 6.0
HANDSHAKE = 10.0


def run(d: defer.Deferred):
    """The result of a Deferred that has already fired (the memory store answers at once)."""
    out = []
    d.addBoth(out.append)
    assert out, "did not fire synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class Peer:
    """One connection to the server under test, seen from the peer's side."""

    def __init__(self, stack: Stack, proto, transport: StringTransport):
        self.stack = stack
        self.proto = proto
        self.transport = transport
        self.inbox: list[wire.Message] = []
        self.lost = False
        #: A peer that does not let go: the server's close is never completed by connectionLost
        #: (a peer that does not read, or over TLS never sends its close_notify).
        self.holds_open = False
        self._buffer = b""
        self._rids = itertools.count(100)

    # -- sending

    def send_raw(self, data: bytes, chunk: int | None = None):
        size = chunk or max(1, len(data))
        for i in range(0, len(data), size):
            self.proto.dataReceived(data[i : i + size])
        self.stack.settle()

    def send(self, verb: str, body: dict | None = None, chunk: int | None = None):
        self.send_raw(wire.encode(verb, body), chunk)

    def request(self, verb: str, body: dict | None = None) -> wire.Message | None:
        """Send a request with a fresh rid; return its reply if one arrived at once."""
        rid = next(self._rids)
        self.send(verb, {"rid": rid, **(body or {})})
        return self.reply(rid)

    # -- receiving

    def drain(self):
        data = self.transport.value()
        self.transport.clear()
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        # Parsing as a peer does: the server must never send a line a peer refuses.
        self.inbox.extend(wire.parse_line(line, wire.SERVER_VERBS) for line in lines)

    def reply(self, rid: int) -> wire.Message | None:
        for msg in self.inbox:
            if msg.verb in ("OK", "ERR") and msg.rid == rid:
                self.inbox.remove(msg)
                return msg
        return None

    def take(self, verb: str) -> list[dict]:
        """Return and forget the bodies of every ``verb`` received so far."""
        found = [m.body for m in self.inbox if m.verb == verb]
        self.inbox = [m for m in self.inbox if m.verb != verb]
        return found

    def take_all(self) -> list[wire.Message]:
        found, self.inbox = self.inbox, []
        return found

    @property
    def closed(self) -> bool:
        """The server closed (or aborted) this connection."""
        return self.transport.disconnecting

    @property
    def aborted(self) -> bool:
        """The server cut this connection at once (abortConnection), as for a dead peer."""
        return self.transport.disconnected


class Stack:
    """A server on a task.Clock and a memory store, with peers on StringTransports."""

    def __init__(self, store=None, *, max_line=MAX_LINE, beat=BEAT, handshake_timeout=HANDSHAKE):
        self.clock = task.Clock()
        self.store = store if store is not None else MemoryStore()
        leases = itertools.count(1)
        self.dispatcher = Dispatcher(self.store, self.clock, beat=beat, new_lease=lambda: f"L{next(leases)}")
        self.factory = ServerFactory(
            self.dispatcher,
            Authenticator(self.store, self.clock, shared_secret=SECRET),
            self.clock,
            max_line=max_line,
            handshake_timeout=handshake_timeout,
        )
        self.peers: list[Peer] = []
        self._ports = itertools.count(40001)
        run(self.store.start())
        run(defer.Deferred.fromCoroutine(self.dispatcher.start()))

    def connect(self) -> Peer:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", next(self._ports)))
        proto.makeConnection(transport)
        peer = Peer(self, proto, transport)
        self.peers.append(peer)
        return peer

    def settle(self):
        """Run zero-delay calls, collect what the server wrote, deliver the closes it asked for."""
        self.clock.advance(0)
        for peer in self.peers:
            peer.drain()
            if peer.transport.disconnecting and not peer.lost and not peer.holds_open:
                peer.lost = True
                peer.proto.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(0)
        for peer in self.peers:
            peer.drain()

    def advance(self, seconds: float):
        self.clock.advance(seconds)
        self.settle()

    def hello(self, peer: Peer, role: str, name: str, **extra) -> wire.Message:
        body = {"rid": 1, "proto": 1, "role": role, "name": name, "token": SECRET, **extra}
        peer.send("HELLO", body)
        return peer.reply(1)

    def worker(self, name="w1", slots=1, types=None, **extra) -> Peer:
        peer = self.connect()
        reply = self.hello(peer, "worker", name, slots=slots, types=types or {"noop": "1.0"}, **extra)
        assert reply is not None and reply.verb == "OK", reply
        peer.welcome = reply.body
        return peer

    def client(self, name="c1") -> Peer:
        peer = self.connect()
        reply = self.hello(peer, "client", name)
        assert reply is not None and reply.verb == "OK", reply
        return peer

    def submit(self, client: Peer, **spec) -> int:
        spec.setdefault("type", "noop")
        spec.setdefault("records", ["a"])
        reply = client.request("SUBMIT", {"jobs": [spec]})
        assert reply.verb == "OK", reply
        [job_id] = reply.body["jobs"]
        return job_id

    def snapshot(self) -> tuple:
        """Everything the store holds that a request could change: counts, every job's view and results."""
        summaries = run(self.store.list_jobs(limit=1000))
        ids = [s["id"] for s in summaries]
        return (
            run(self.store.counts()),
            [run(self.store.get_job(i)) for i in ids],
            [run(self.store.get_results(i)) for i in ids],
        )

    def stop(self):
        self.dispatcher.stop()
        for peer in self.peers:
            if not peer.lost:
                peer.lost = True
                peer.proto.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def stack():
    s = Stack()
    yield s
    s.stop()


# -- a world with a running job, for the bad-input table ----------------------


@dataclass
class World:
    """Worker w1 runs job 1 (three records, record 0 accepted) under lease L1; w2 idles; c1 is a client."""

    stack: Stack
    w1: Peer
    w2: Peer
    c1: Peer
    job: int = 1
    lease: str = "L1"


@pytest.fixture
def world(stack):
    c1 = stack.client("c1")
    w1 = stack.worker("w1")
    w2 = stack.worker("w2", types={"other": "1.0"})
    job = stack.submit(c1, records=["a", "b", "c"])
    [pushed] = w1.take("JOB")
    assert (pushed["job"], pushed["lease"]) == (job, "L1")
    reply = w1.request("RESULT", {"job": job, "lease": "L1", "results": [{"i": 0, "out": "A"}]})
    assert reply.body == {"rid": reply.rid, "accepted": 1}
    for peer in (c1, w1, w2):
        peer.take_all()
    return World(stack, w1, w2, c1, job)


def _line(verb, body):
    return wire.encode(verb, body)


_RESULT_1 = {"job": 1, "lease": "L1", "results": [{"i": 1, "out": "B"}]}
_ALL_REST = {"job": 1, "lease": "L1", "results": [{"i": 1, "out": "B"}, {"i": 2, "out": "C"}]}
_HELLO = {"rid": 1, "proto": 1, "name": "x", "token": SECRET}


@dataclass
class Bad:
    """One piece of bad input: who sends which bytes, and the spec's answer."""

    who: str  # "w1", "w2", "c1", or "new" (a fresh connection, before HELLO)
    data: bytes
    code: str
    rid: int | None
    close: bool
    extra: dict | None = None
    chunk: int | None = None


BAD_INPUT = {
    "oversized-line-client": Bad(
        "c1",
        b'SUBMIT {"rid":5,"jobs":[{"type":"noop","records":["' + b"x" * MAX_LINE + b'"]}]}\n',
        "line_too_long",
        None,
        True,
        {"max_line": MAX_LINE},
        chunk=1000,
    ),
    "oversized-line-no-lf": Bad("new", b"HELLO " + b"y" * MAX_LINE, "line_too_long", None, True, chunk=512),
    "not-utf8": Bad(
        "w1", b'RESULT {"rid":5,"job":1,"lease":"L1","results":[{"i":1,"out":"\xff"}]}\n', "bad_line", None, False
    ),
    "unknown-verb": Bad("c1", b'FROB {"rid":6,"job":1}\n', "unknown_verb", 6, False),
    "server-verb-from-worker": Bad("w1", _line("JOB", {"rid": 7, "job": 1, "lease": "L1"}), "unknown_verb", 7, False),
    "malformed-json": Bad(
        "w1", b'RESULT {"rid":8,"job":1,"lease":"L1","results":[{"i":1,"out":1}]\n', "bad_json", None, False
    ),
    "json-not-object": Bad("c1", b'SUBMIT [{"type":"noop","records":[1]}]\n', "bad_json", None, False),
    "bad-request": Bad(
        "w1", _line("RESULT", {"rid": 9, "job": 1, "results": [{"i": 1, "out": 1}]}), "bad_request", 9, False
    ),
    "submit-before-hello": Bad(
        "new", _line("SUBMIT", {"rid": 1, "jobs": [{"type": "noop", "records": [1]}]}), "hello_required", 1, True
    ),
    "result-before-hello": Bad("new", _line("RESULT", {"rid": 2, **_RESULT_1}), "hello_required", 2, True),
    "beat-before-hello": Bad("new", b"BEAT\n", "hello_required", None, True),
    "worker-submit": Bad(
        "w1", _line("SUBMIT", {"rid": 10, "jobs": [{"type": "noop", "records": [1]}]}), "forbidden", 10, False
    ),
    "worker-cancel": Bad("w1", _line("CANCEL", {"rid": 11, "job": 1}), "forbidden", 11, False),
    "client-result": Bad("c1", _line("RESULT", {"rid": 12, **_RESULT_1}), "forbidden", 12, False),
    "client-done": Bad("c1", _line("DONE", {"rid": 13, **_ALL_REST}), "forbidden", 13, False),
    "wrong-secret": Bad(
        "new",
        _line("HELLO", {**_HELLO, "role": "worker", "name": "w1", "token": "guess", "slots": 1, "types": {}}),
        "auth_failed",
        1,
        True,
    ),
    "unsupported-proto": Bad(
        "new", _line("HELLO", {**_HELLO, "role": "client", "proto": 2}), "unsupported_proto", 1, True, {"protos": [1]}
    ),
    "worker-hello-without-slots": Bad("new", _line("HELLO", {**_HELLO, "role": "worker"}), "bad_request", 1, True),
    "second-hello": Bad("c1", _line("HELLO", {**_HELLO, "rid": 14, "role": "client"}), "already_ready", 14, False),
    "stale-lease": Bad("w1", _line("RESULT", {"rid": 15, **_RESULT_1, "lease": "L9"}), "stale_lease", 15, False),
    "someone-elses-lease": Bad("w2", _line("RESULT", {"rid": 16, **_RESULT_1}), "stale_lease", 16, False),
    "someone-elses-done": Bad("w2", _line("DONE", {"rid": 17, **_ALL_REST}), "stale_lease", 17, False),
    "unknown-job": Bad(
        "w1", _line("RESULT", {"rid": 18, **_RESULT_1, "job": 42, "lease": "L42"}), "unknown_job", 18, False
    ),
    "unknown-record": Bad(
        "w1",
        _line("RESULT", {"rid": 19, "job": 1, "lease": "L1", "results": [{"i": 1, "out": 1}, {"i": 99, "out": 1}]}),
        "unknown_record",
        19,
        False,
        {"records": [99]},
    ),
    "record-already-accepted": Bad(
        "w1",
        _line("RESULT", {"rid": 20, "job": 1, "lease": "L1", "results": [{"i": 1, "out": 1}, {"i": 0, "out": 1}]}),
        "duplicate_result",
        20,
        False,
        {"records": [0]},
    ),
    "record-twice-in-one-result": Bad(
        "w1",
        _line("RESULT", {"rid": 21, "job": 1, "lease": "L1", "results": [{"i": 2, "out": 1}, {"i": 2, "out": 2}]}),
        "duplicate_result",
        21,
        False,
        {"records": [2]},
    ),
    "done-before-all-records": Bad(
        "w1", _line("DONE", {"rid": 22, **_RESULT_1}), "incomplete", 22, False, {"missing": 1}
    ),
    "done-with-duplicate": Bad(
        "w1",
        _line("DONE", {"rid": 23, "job": 1, "lease": "L1", "results": [{"i": 0, "out": 1}, {"i": 1, "out": 1}]}),
        "duplicate_result",
        23,
        False,
        {"records": [0]},
    ),
    "fail-stale-lease": Bad(
        "w1", _line("FAIL", {"rid": 24, "job": 1, "lease": "L0", "error": "x"}), "stale_lease", 24, False
    ),
    "return-someone-elses": Bad("w2", _line("RETURN", {"rid": 25, "job": 1, "lease": "L1"}), "stale_lease", 25, False),
    # Values JSON can spell but no store or encoder can take back.
    "submit-infinite-timeout": Bad(
        "c1", b'SUBMIT {"rid":26,"jobs":[{"type":"noop","records":[1],"timeout":1e400}]}\n', "bad_json", None, False
    ),
    "submit-huge-int-timeout": Bad(
        "c1",
        b'SUBMIT {"rid":27,"jobs":[{"type":"noop","records":[1],"timeout":1' + b"0" * 400 + b"}]}\n",
        "bad_request",
        27,
        False,
    ),
    "result-lone-surrogate": Bad(
        "w1", b'RESULT {"rid":28,"job":1,"lease":"L1","results":[{"i":1,"out":"\\ud800"}]}\n', "bad_json", None, False
    ),
    "hello-lone-surrogate-token": Bad(
        "new", b'HELLO {"rid":1,"proto":1,"role":"client","name":"x","token":"\\udc00"}\n', "bad_json", None, True
    ),
    # Before the HELLO is accepted, any refused line ends the connection.
    "garbage-before-hello": Bad("new", b"\x16\x03\x01\x02\x00\x01\n", "bad_line", None, True),
    "bad-json-hello": Bad("new", b'HELLO {"rid":1,\n', "bad_json", None, True),
    "hello-without-name": Bad(
        "new", _line("HELLO", {"rid": 1, "proto": 1, "role": "client", "token": "s3cret"}), "bad_request", 1, True
    ),
    "unknown-verb-before-hello": Bad("new", b'FROB {"rid":3}\n', "unknown_verb", 3, True),
}


@pytest.mark.parametrize("case", list(BAD_INPUT.values()), ids=list(BAD_INPUT))
def test_server_bad_input_spec_answer_and_store_unchanged(world, case):
    """Bad input gets exactly the spec's ERR (code, rid, close) and changes nothing in the store or the running job."""
    stack = world.stack
    before = stack.snapshot()
    peer = stack.connect() if case.who == "new" else getattr(world, case.who)
    peer.send_raw(case.data, case.chunk)

    [err] = peer.take_all()
    assert err.verb == "ERR"
    assert err.body["code"] == case.code
    assert err.body["rid"] == case.rid
    assert isinstance(err.body["message"], str) and err.body["message"]
    for key, value in (case.extra or {}).items():
        assert err.body[key] == value
    assert peer.closed is case.close
    assert peer.lost is case.close  # a close was delivered, and the stack went on
    assert stack.snapshot() == before

    # Nothing else was disturbed: the other peers heard nothing, and w1 still
    # owns its lease and can finish the job.
    for other in (world.w1, world.w2, world.c1):
        if other is not peer:
            assert other.take_all() == [] and not other.closed
    done = world.w1.request("DONE", _ALL_REST)
    assert done.verb == "OK", done
    assert run(stack.store.get_job(1))["state"] == "done"


def test_server_exact_max_line_accepted_one_more_refused(stack):
    """A line of exactly max_line bytes is accepted; one byte more gets line_too_long and a close."""
    c1 = stack.client()

    def beat_of(size):
        head = b'BEAT {"pad":"'
        return head + b"p" * (size - len(head) - 2) + b'"}\n'

    c1.send_raw(beat_of(MAX_LINE), chunk=100)
    assert c1.take_all() == [] and not c1.closed
    c1.send_raw(beat_of(MAX_LINE + 1), chunk=100)
    [err] = c1.take_all()
    assert (err.body["code"], err.body["max_line"]) == ("line_too_long", MAX_LINE)
    assert c1.lost


def test_server_lines_after_fatal_error_in_same_chunk_ignored(stack):
    """Lines that arrive in the same chunk after a line that closes the connection are not acted upon."""
    c1 = stack.connect()
    before = stack.snapshot()
    hello = _line("HELLO", {**_HELLO, "role": "client", "token": "wrong"})
    submit = _line("SUBMIT", {"rid": 2, "jobs": [{"type": "noop", "records": [1]}]})
    c1.send_raw(hello + submit)
    assert [m.body["code"] for m in c1.take_all()] == ["auth_failed"]
    assert stack.snapshot() == before


# -- the handshake -------------------------------------------------------------


def test_server_hello_reply_announces_limits(stack):
    """The HELLO reply announces protocol, server version, beat, deadline and max_line; a worker's also kept/lost."""
    client = stack.connect()
    reply = stack.hello(client, "client", "c1")
    assert reply.body == {
        "rid": 1,
        "proto": 1,
        "server": "gridd/0.1.0",
        "beat": BEAT,
        "deadline": DEADLINE,
        "max_line": MAX_LINE,
    }
    w1 = stack.worker()
    assert (w1.welcome["kept"], w1.welcome["lost"]) == ([], [])


def test_server_handshake_deadline_closes_silent_connection(stack):
    """A connection without a HELLO within handshake_timeout gets ERR handshake_timeout and is closed."""
    peer = stack.connect()
    stack.advance(HANDSHAKE - 0.01)
    assert peer.take_all() == [] and not peer.closed
    stack.advance(0.01)
    [err] = peer.take_all()
    assert (err.verb, err.body["code"], err.body["rid"]) == ("ERR", "handshake_timeout", None)
    assert peer.lost


def test_server_handshake_deadline_counts_from_connect_not_last_bytes(stack):
    """Bytes of a HELLO still being sent do not extend the handshake deadline."""
    peer = stack.connect()
    stack.advance(HANDSHAKE - 1)
    peer.send_raw(b'HELLO {"rid":1,"proto":1,')
    assert peer.take_all() == []
    stack.advance(1)
    assert peer.take("ERR")[0]["code"] == "handshake_timeout"
    assert peer.lost


def test_server_handshake_deadline_cancelled_by_hello(stack):
    """A connection that completed its HELLO is not cut at the handshake deadline."""
    client = stack.client()
    stack.advance(HANDSHAKE / 2)
    client.send("BEAT")
    stack.advance(HANDSHAKE / 2 + 0.1)
    assert not client.closed
    assert all(m.verb == "BEAT" for m in client.take_all())


# -- keepalive -----------------------------------------------------------------


def test_server_sends_beat_every_beat_once_ready(stack):
    """The server sends BEAT every `beat` seconds to a ready connection, and none before its HELLO."""
    waiting = stack.connect()
    client = stack.client()
    worker = stack.worker()
    stack.advance(BEAT - 0.01)
    assert client.take("BEAT") == [] and worker.take("BEAT") == []
    stack.advance(0.01)
    assert client.take("BEAT") == [{}] and worker.take("BEAT") == [{}]
    client.send("BEAT")
    worker.send("BEAT")
    stack.advance(BEAT)
    assert len(client.take("BEAT")) == 1 and len(worker.take("BEAT")) == 1
    assert waiting.take_all() == []


def test_server_client_silent_past_deadline_dropped(stack):
    """A client from which nothing arrives for `deadline` seconds is cut; any line resets the deadline."""
    client = stack.client()
    stack.advance(DEADLINE - 0.1)
    assert not client.closed
    client.send_raw(b"not a line a server accepts\n")  # any line shows the peer is alive
    stack.advance(DEADLINE - 0.1)
    assert not client.closed
    stack.advance(0.1)
    assert client.aborted and client.lost


def test_server_client_deadline_after_a_stall_waits_one_beat(stack):
    """A client's idle deadline that passed while the server was stalled waits one beat for its lines."""
    client = stack.client()
    stack.advance(DEADLINE * 3)  # one step: the timer runs late
    assert not client.closed
    client.send("BEAT")
    stack.advance(DEADLINE - 0.1)
    assert not client.closed
    stack.advance(0.1)
    assert client.aborted and client.lost
    late = stack.client()
    stack.advance(DEADLINE * 3)
    stack.advance(BEAT)
    assert late.aborted and late.lost


def test_server_worker_silent_past_deadline_dropped_and_job_moves(world):
    """A worker silent past the deadline is cut; its job goes to another worker, accepted results kept."""
    stack = world.stack
    w3 = stack.worker("w3")
    for _ in range(5):
        stack.advance(1.0)
        w3.send("BEAT")
        world.c1.send("BEAT")
    assert not world.w1.closed and w3.take("JOB") == []
    stack.advance(1.0)
    assert world.w1.aborted and world.w1.lost
    [job] = w3.take("JOB")
    assert (job["job"], job["lease"], job["attempt"]) == (1, "L2", 2)
    assert job["records"] == [{"i": 1, "data": "b"}, {"i": 2, "data": "c"}]
    view = run(stack.store.get_job(1))
    assert (view["state"], view["lease"], view["worker"], view["accepted"]) == ("running", "L2", "w3", 1)
    released = [e for e in view["history"] if e["event"] == "released"]
    assert [(e["lease"], e["detail"]["reason"]) for e in released] == [("L1", "expired")]
    # The old lease is stale now, even from a new connection of the same worker.
    w1_again = stack.worker("w1")
    err = w1_again.request("RESULT", _RESULT_1)
    assert err.body["code"] == "stale_lease"


def test_server_worker_beats_keep_it_alive(world):
    """A worker that beats within every deadline keeps its connection and its lease."""
    stack = world.stack
    for _ in range(10):
        stack.advance(DEADLINE - 0.5)
        world.w1.send("BEAT", {"load": 0.5})
    assert not world.w1.closed
    assert run(stack.store.get_job(1))["lease"] == "L1"


# -- name arbitration over the wire ---------------------------------------------


def _reconnect_w1(stack, **extra) -> Peer:
    new = stack.connect()
    body = {**_HELLO, "role": "worker", "name": "w1", "slots": 1, "types": {"noop": "1.0"}, **extra}
    new.send("HELLO", body)
    return new


def test_server_name_arbitration_old_answers_pong_new_refused(world):
    """A HELLO with a live worker's name PINGs the old connection; a PONG within beat refuses the new one."""
    stack = world.stack
    before = stack.snapshot()
    new = _reconnect_w1(stack, holding=[{"job": 1, "lease": "L1"}])
    [ping] = world.w1.take("PING")
    assert new.take_all() == []
    stack.advance(BEAT / 2)
    world.w1.send("PONG", {"n": ping["n"]})
    [err] = new.take_all()
    assert (err.verb, err.body["code"], err.body["rid"]) == ("ERR", "name_in_use", 1)
    assert new.lost
    assert not world.w1.closed
    stack.advance(BEAT)  # the PING's timeout must not fire later
    assert not world.w1.closed and stack.snapshot() == before
    assert world.w1.request("DONE", _ALL_REST).verb == "OK"


def test_server_name_arbitration_no_pong_old_aborted_new_keeps_holding(world):
    """Without a PONG within beat the old connection is aborted and the new one accepted with the leases it holds."""
    stack = world.stack
    before = stack.snapshot()
    new = _reconnect_w1(stack, holding=[{"job": 1, "lease": "L1"}, {"job": 7, "lease": "L7"}])
    assert len(world.w1.take("PING")) == 1
    stack.advance(BEAT - 0.01)
    assert new.take_all() == [] and not world.w1.closed
    stack.advance(0.01)
    assert world.w1.aborted and world.w1.lost
    reply = new.reply(1)
    assert reply.verb == "OK"
    assert reply.body["kept"] == [{"job": 1, "lease": "L1", "todo": [1, 2]}]
    assert reply.body["lost"] == [{"job": 7, "lease": "L7", "reason": "unknown"}]
    assert stack.snapshot() == before  # the lease moved without a write: same job, same lease
    workers = world.c1.request("WORKERS").body["workers"]
    assert [(w["name"], w["address"], w["running"]) for w in workers if w["name"] == "w1"] == [
        ("w1", new.proto.address, [1])
    ]
    assert new.request("DONE", _ALL_REST).verb == "OK"


def test_server_name_arbitration_unheld_lease_of_old_connection_ends(world):
    """A lease the old connection held but the new HELLO does not list ends when the old one is superseded."""
    stack = world.stack
    new = _reconnect_w1(stack)  # holds nothing
    stack.advance(BEAT)
    assert world.w1.aborted
    assert new.reply(1).body["kept"] == []
    view = run(stack.store.get_job(1))
    assert [(e["lease"], e["detail"]["reason"]) for e in view["history"] if e["event"] == "released"] == [
        ("L1", "superseded")
    ]
    # The job, with its accepted result kept, is handed out afresh: here to the new connection.
    [job] = new.take("JOB")
    assert (job["lease"], job["attempt"], [r["i"] for r in job["records"]]) == ("L2", 2, [1, 2])
    assert (view["state"], view["lease"], view["accepted"]) == ("running", "L2", 1)


def test_server_second_hello_during_arbitration_refused_and_closed(world):
    """A second HELLO while the first is still pending gets already_ready and ends the connection; w1 keeps its lease."""
    stack = world.stack
    new = _reconnect_w1(stack, holding=[{"job": 1, "lease": "L1"}])
    new.send("HELLO", {**_HELLO, "rid": 2, "role": "worker", "name": "w9", "slots": 1, "types": {"noop": "1"}})
    err = new.reply(2)
    assert (err.verb, err.body["code"]) == ("ERR", "already_ready") and new.lost
    stack.advance(BEAT)  # the PING goes unanswered, but the newcomer is gone: it supersedes nobody
    assert new.reply(1) is None
    assert not world.w1.lost
    workers = {w["name"]: w for w in world.c1.request("WORKERS").body["workers"]}
    assert sorted(workers) == ["w1", "w2"] and workers["w1"]["running"] == [1]


# -- shutdown --------------------------------------------------------------------


def test_server_close_all_sends_bye_and_closes(world):
    """close_all sends BYE {"reason": "shutdown"} on every connection, even handshaking ones, and closes it."""
    stack = world.stack
    waiting = stack.connect()
    stack.factory.close_all()
    stack.settle()
    for peer in (world.w1, world.w2, world.c1, waiting):
        assert [(m.verb, m.body) for m in peer.take_all()] == [("BYE", {"reason": "shutdown"})]
        assert peer.closed and not peer.aborted and peer.lost
    assert stack.factory.connections == set()


# -- asynchronous replies ------------------------------------------------------------


def test_server_async_replies_carry_their_rid():
    """Replies that complete out of order each carry the rid of the request they answer."""
    store = ControlledStore()
    stack = Stack(store)
    try:
        c1 = stack.client()
        w1 = stack.worker()
        stack.submit(c1, records=["a", "b"])
        [job] = w1.take("JOB")
        store.hold("get_job", "add_results")

        c1.send("SHOW", {"rid": 10, "job": 1})
        c1.send("SHOW", {"rid": 11, "job": 99})
        c1.send("STATS", {"rid": 12})
        w1.send("RESULT", {"rid": 20, "job": 1, "lease": job["lease"], "results": [{"i": 0, "out": 0}]})
        w1.send("PROGRESS", {"rid": 21, "job": 1, "lease": job["lease"], "note": "n"})
        assert [m.rid for m in c1.inbox] == [12] and [m.rid for m in w1.inbox] == [21]

        store.answer("add_results")
        store.answer("get_job")  # SHOW 99 is still held
        stack.settle()
        assert w1.reply(20).body == {"rid": 20, "accepted": 1}
        assert c1.reply(10).body["job"]["id"] == 1
        assert c1.reply(11) is None
        store.answer("get_job")
        stack.settle()
        err = c1.reply(11)
        assert (err.verb, err.body["code"]) == ("ERR", "unknown_job")
    finally:
        stack.stop()


def test_server_reply_after_connection_lost_is_dropped_quietly():
    """A request whose answer comes after its connection closed is completed without writing or logging errors."""
    store = ControlledStore()
    stack = Stack(store)
    try:
        c1 = stack.client()
        store.hold("submit")
        c1.send("SUBMIT", {"rid": 5, "jobs": [{"type": "noop", "records": [1]}]})
        c1.transport.loseConnection()  # the peer went away: the transport is closed, then the protocol told
        stack.settle()
        assert c1.lost
        store.answer("submit")
        stack.settle()
        assert c1.take_all() == []
        assert run(store.counts())["queued"] == 1  # committed: the client will find out with LIST
    finally:
        stack.stop()


# -- store failures ------------------------------------------------------------------


@pytest.mark.expected_log_errors
@pytest.mark.parametrize(
    ("verb", "method"),
    [("RESULT", "add_results"), ("DONE", "complete"), ("FAIL", "release"), ("SUBMIT", "submit")],
)
def test_server_store_non_gridd_failure_is_internal_and_changes_nothing(verb, method):
    """A store write failing with a non-gridd exception gives a logged ERR internal and changes nothing."""
    store = ControlledStore()
    stack = Stack(store)
    logged = []
    globalLogPublisher.addObserver(logged.append)
    try:
        c1 = stack.client()
        w1 = stack.worker()
        stack.submit(c1, records=["a", "b"])
        [job] = w1.take("JOB")
        before = stack.snapshot()
        store.fail(method, sqlite3.OperationalError("disk I/O error"))
        bodies = {
            "RESULT": {"job": 1, "lease": job["lease"], "results": [{"i": 0, "out": 0}]},
            "DONE": {"job": 1, "lease": job["lease"], "results": [{"i": 0, "out": 0}, {"i": 1, "out": 1}]},
            "FAIL": {"job": 1, "lease": job["lease"], "error": "boom"},
            "SUBMIT": {"jobs": [{"type": "noop", "records": [1]}]},
        }
        peer = c1 if verb == "SUBMIT" else w1
        err = peer.request(verb, bodies[verb])
        assert err.verb == "ERR"
        assert err.body["code"] == "internal"
        assert err.rid is not None and not peer.closed
        [failure] = [e for e in logged if e.get("log_failure") is not None]
        assert failure["log_failure"].check(sqlite3.OperationalError) and failure["verb"] == verb
        store.clear(method)
        assert stack.snapshot() == before
        # The lease goes on: once the store recovers, the same request succeeds.
        assert peer.request(verb, bodies[verb]).verb == "OK"
    finally:
        globalLogPublisher.removeObserver(logged.append)
        stack.stop()


def test_server_store_unavailable_is_unavailable_and_changes_nothing(world):
    """A store that cannot serve gives ERR unavailable (no error logged), and the job's lease survives it."""
    stack = world.stack
    before = stack.snapshot()
    run(stack.store.stop())
    err = world.w1.request("DONE", _ALL_REST)
    assert (err.verb, err.body["code"]) == ("ERR", "unavailable")
    err = world.c1.request("SUBMIT", {"jobs": [{"type": "noop", "records": [1]}]})
    assert (err.verb, err.body["code"]) == ("ERR", "unavailable")
    run(stack.store.start())
    assert stack.snapshot() == before
    assert world.w1.request("DONE", _ALL_REST).verb == "OK"


def test_server_worker_any_line_counts_as_alive(world):
    """Even a line the server cannot parse shows the worker is alive: its lease survives past the deadline."""
    stack = world.stack
    for _ in range(3):
        stack.advance(DEADLINE - 0.5)
        world.w1.send_raw(b"\xff not protocol\n")
        world.c1.send("BEAT")
    assert not world.w1.closed
    assert run(stack.store.get_job(1))["lease"] == "L1"


def test_server_closing_connection_keeps_nothing_more_it_is_sent(stack):
    """Once the server closes a connection, bytes that still arrive are neither acted upon nor kept."""
    peer = stack.connect()
    peer.holds_open = True
    peer.send_raw(b"X" * (MAX_LINE + 1))
    assert [m.body["code"] for m in peer.take_all()] == ["line_too_long"] and peer.closed
    for _ in range(200):  # 12.5 MiB with no newline, as TLS would still hand it over
        peer.send_raw(b"Y" * 65536)
    assert peer.proto._buffer == b""
    peer.send_raw(b'\nSTATS {"rid":5}\n')
    assert peer.take_all() == []
    stack.advance(stack.factory.limits.close_timeout)
    assert peer.aborted
