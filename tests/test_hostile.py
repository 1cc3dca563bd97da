"""Hostile connections are bounded (protocols/PROTOCOL.md section 12).

First each limit alone, on StringTransport and task.Clock (the stack of
tests/test_server.py): the deadlines, the line limit before HELLO, the
outstanding requests, the rate, the output a peer does not read, the close
timeout. Then the same on real sockets with the real reactor: a slowloris
handshake and a client that never reads are cut off while a normal worker
keeps working, thousands of connections that never say anything are cut
at the handshake deadline without slowing anyone else, and thousands opened
and abandoned in every state leave nothing behind in the server.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import struct
import time

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from gridd import wire
from gridd.client import connect
from gridd.jobtypes import load_job_types
from gridd.server.protocol import Limits, OutputBound, TokenBucket
from gridd.worker.runner import InlineThreads
from gridd.worker.service import make_worker_service
from tests.controlled import ControlledStore
from tests.live import LiveServer, bounded, turns
from tests.test_server import DEADLINE, HANDSHAKE, Stack

# -- the pieces ----------------------------------------------------------------------


def test_token_bucket_refills_at_rate_up_to_burst():
    """A bucket starts full, each take costs one token, it refills at `rate` per second and never beyond `burst`."""
    clock = task.Clock()
    bucket = TokenBucket(clock, rate=10, burst=3)
    assert [bucket.take() for _ in range(5)] == [2, 1, 0, -1, -2]
    clock.advance(0.25)  # 2.5 tokens back
    assert bucket.take() == pytest.approx(-0.5)
    clock.advance(100)
    assert bucket.take() == 2


def test_output_bound_counts_only_while_the_transport_is_full():
    """Bytes count only between pauseProducing and resumeProducing; repeated pauses do not reset the count."""
    bound = OutputBound(limit=100)
    assert bound.wrote(1000)  # the transport is not full: nothing waits on the peer
    bound.pauseProducing()
    assert bound.wrote(60)
    bound.pauseProducing()  # Twisted's TCP transport says it again on every write while full
    assert not bound.wrote(41)
    bound.resumeProducing()
    assert bound.wrote(1000) and bound.waiting == 0


# -- each limit on the wire adapter ----------------------------------------------------


def limited(**limits) -> Stack:
    stack = Stack(ControlledStore())
    stack.factory.limits = Limits(**limits)
    return stack


@pytest.fixture
def stacks():
    made = []

    def make(**limits):
        made.append(limited(**limits))
        return made[-1]

    yield make
    for stack in made:
        stack.stop()


def test_outstanding_requests_over_limit_refused_with_too_many(stacks):
    """Requests beyond max_outstanding awaiting replies get ERR too_many with the limit; they change nothing."""
    stack = stacks(max_outstanding=2)
    c1 = stack.client()
    stack.submit(c1)
    before = stack.snapshot()
    stack.store.hold("get_job", "submit")
    c1.send("SHOW", {"rid": 10, "job": 1})
    c1.send("SUBMIT", {"rid": 11, "jobs": [{"type": "noop", "records": [1]}]})
    c1.send("BEAT")  # notifications are not requests: never counted, never refused
    c1.send("SUBMIT", {"rid": 12, "jobs": [{"type": "noop", "records": [2]}]})
    err = c1.reply(12)
    assert (err.verb, err.body["code"], err.body["limit"]) == ("ERR", "too_many", 2)
    assert "2 requests await their replies" in err.body["message"]
    assert c1.take_all() == [] and not c1.closed
    stack.store.answer("get_job")
    stack.settle()
    assert c1.reply(10).verb == "OK"
    c1.send("SHOW", {"rid": 13, "job": 1})  # one slot is free again
    assert c1.reply(13) is None and c1.take_all() == []
    stack.store.answer("get_job")
    stack.settle()
    assert c1.reply(13).verb == "OK"
    stack.store.answer("submit")
    stack.settle()
    assert c1.reply(11).body["jobs"] == [2]
    stack.store.clear()
    assert run_counts(stack) == len(before[1]) + 1  # only SUBMIT 11 made a job


def run_counts(stack) -> int:
    return sum(stack.snapshot()[0].values())


def test_outstanding_limit_counts_only_requests_awaiting_a_reply(stacks):
    """Requests answered at once, or refused at once, do not count: many in a row are all served."""
    stack = stacks(max_outstanding=1)
    c1 = stack.client()
    for rid in range(20, 30):
        c1.send("STATS", {"rid": rid})
        c1.send("CANCEL", {"rid": rid + 100, "job": 999})  # refused: unknown_job
    replies = [m for m in c1.take_all() if m.verb in ("OK", "ERR")]
    assert [m.body.get("code") for m in replies] == [None, "unknown_job"] * 10


def test_rate_over_limit_refused_then_recovers(stacks):
    """Lines beyond the token bucket get ERR too_many with the rate as limit; once the peer slows down it is served."""
    stack = stacks(rate=10, burst=5)
    c1 = stack.client()  # the HELLO took one token
    before = stack.snapshot()
    for rid in range(1, 5):
        assert c1.request("STATS", {}).verb == "OK", rid
    err = c1.request("SUBMIT", {"jobs": [{"type": "noop", "records": [1]}]})
    assert (err.verb, err.body["code"], err.body["limit"]) == ("ERR", "too_many", 10)
    assert "more than 10 lines per second; slow down" == err.body["message"]
    c1.send("BEAT")  # over the rate, a line without a rid is answered too (rid null)
    c1.send_raw(b"SUBMIT {not json\n")
    assert [(m.body["code"], m.rid) for m in c1.take_all()] == [("too_many", None), ("too_many", None)]
    assert stack.snapshot() == before and not c1.closed
    stack.advance(0.4)  # 4 tokens: the debt of 3 is paid, one is left
    assert c1.request("STATS", {}).verb == "OK"
    assert c1.request("STATS", {}).body["code"] == "too_many"


def test_rate_flooding_peer_cut_off(stacks):
    """A peer that keeps sending `burst` lines past its allowance gets one last ERR too_many and is closed."""
    stack = stacks(rate=10, burst=5)
    w1 = stack.worker()
    for _ in range(4 + 5):  # 4 within the allowance, 5 refused into a debt of 5
        w1.send("BEAT")
    assert len(w1.take_all()) == 5 and not w1.closed
    w1.send("BEAT")
    [err] = w1.take_all()
    assert (err.body["code"], err.rid, err.body["limit"]) == ("too_many", None, 10)
    assert "for too long; closing" in err.body["message"]
    assert w1.lost
    assert len(stack.dispatcher.workers) == 0


def test_rate_flood_in_one_chunk_stops_at_the_cut(stacks):
    """Lines that arrive in the same chunk after the cut-off line are not acted upon."""
    stack = stacks(rate=10, burst=2)
    c1 = stack.client()
    before = stack.snapshot()
    line = wire.encode("SUBMIT", {"rid": 5, "jobs": [{"type": "noop", "records": [1]}]})
    c1.send_raw(line * 50)
    codes = [m.body.get("code") for m in c1.take_all()]
    assert codes == [None, "too_many", "too_many", "too_many"]  # 1 served, 2 refused into debt, cut
    assert c1.lost
    assert len(stack.snapshot()[1]) == len(before[1]) + 1


def test_peer_that_does_not_read_is_aborted_past_max_output(stacks):
    """Once the transport is full, a peer is aborted when more than max_output bytes wait for it; others go on."""
    stack = stacks(max_output=2000)
    watcher = stack.client("watcher")
    submitter = stack.client("submitter")
    assert watcher.request("WATCH", {"jobs": []}).verb == "OK"
    for _ in range(30):  # the transport is not full: any amount may be written
        stack.submit(submitter)
    assert not watcher.closed and len(watcher.take("EVENT")) == 30
    watcher.transport.producer.pauseProducing()  # the kernel's buffers and the transport's are full
    for _ in range(100):
        stack.submit(submitter)
        if watcher.closed:
            break
    assert watcher.aborted and watcher.lost
    written = sum(len(wire.encode("EVENT", e)) for e in watcher.take("EVENT"))
    assert 2000 < written <= 2000 + 200  # cut at the first line past the bound
    assert stack.submit(submitter) and not submitter.closed


def test_peer_that_reads_again_is_not_cut(stacks):
    """A transport that drains (resumeProducing) starts the count again: a slow reader is not a dead one."""
    stack = stacks(max_output=2000)
    watcher = stack.client("watcher")
    submitter = stack.client("submitter")
    watcher.request("WATCH", {"jobs": []})
    for _ in range(10):
        watcher.transport.producer.pauseProducing()
        for _ in range(10):  # about 500 bytes of EVENTs each round
            stack.submit(submitter)
        watcher.transport.producer.resumeProducing()
    assert not watcher.closed and len(watcher.take("EVENT")) == 100


def test_line_limit_before_hello_is_the_pre_hello_limit():
    """Before HELLO a line may hold 65,536 bytes whatever max_line is; after it, max_line."""
    stack = Stack(max_line=wire.DEFAULT_MAX_LINE)
    try:
        early = stack.connect()
        early.send_raw(b"HELLO " + b"x" * wire.PRE_HELLO_MAX_LINE + b"\n", chunk=8192)
        [err] = early.take_all()
        assert (err.body["code"], err.body["max_line"]) == ("line_too_long", wire.PRE_HELLO_MAX_LINE)
        assert early.lost
        client = stack.client()
        big = b'BEAT {"pad":"' + b"p" * 200_000 + b'"}\n'
        client.send_raw(big, chunk=8192)
        assert client.take_all() == [] and not client.closed
    finally:
        stack.stop()


def test_close_timeout_aborts_a_peer_that_does_not_take_the_last_bytes():
    """After an ERR that closes, a connection that does not go away is aborted at the close timeout, and only then."""
    stack = Stack()
    stack.factory.limits = Limits(close_timeout=5.0)
    proto = stack.factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"BEAT\n")
    assert b"hello_required" in transport.value()
    assert transport.disconnecting and not transport.disconnected
    assert transport.producer is None, "a registered producer would hold the connection open"

    def mine():
        return [c for c in stack.clock.getDelayedCalls() if getattr(c.func, "__self__", None) in (proto, transport)]

    [closer] = mine()  # the close timer, and nothing else: the handshake deadline went with the close
    assert closer.getTime() == 5.0
    stack.clock.advance(4.9)
    assert not transport.disconnected
    stack.clock.advance(0.1)
    assert transport.disconnected
    stack.clock.advance(HANDSHAKE)  # the handshake deadline went with the close: no second ERR
    assert transport.value().count(b"\n") == 1
    proto.connectionLost(None)
    assert mine() == []
    stack.stop()


def test_every_connection_state_has_a_deadline(stacks):
    """Partial lines move no deadline: a trickling peer is cut before HELLO, as a client, and as a worker."""
    stack = stacks()
    early = stack.connect()
    client = stack.client()
    worker = stack.worker()
    for _ in range(int(HANDSHAKE)):
        for peer in (early, client, worker):
            peer.send_raw(b"B")  # one byte a second, never a whole line
        stack.advance(1.0)
    assert early.lost and client.aborted and worker.aborted
    assert [m.body["code"] for m in early.take_all() if m.verb == "ERR"] == ["handshake_timeout"]
    assert DEADLINE < HANDSHAKE


# -- on real sockets ----------------------------------------------------------------------


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


def open_fds() -> list[int]:
    """This process's open file descriptors: the server is in-process, so its sockets are among them."""
    return [int(fd) for fd in os.listdir("/proc/self/fd")]


def open_sockets() -> int:
    """How many of this process's descriptors are sockets."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@contextlib.contextmanager
def files_limit_for(reactor, descriptors: int):
    """Raise the soft RLIMIT_NOFILE so that ``descriptors`` more fit; restore both limits afterwards.

    Both ends of every connection live in this process, so holding N
    connections takes 2N descriptors on top of those already open. When even
    the hard limit is too low and cannot be raised (that takes
    CAP_SYS_RESOURCE, which containers often lack even as root), the test
    fails and says how to fix it. It does not skip: a skip would keep the
    suite green while the claim it checks (docs/security.md, connection
    counts) goes unchecked on that machine, and `-ra` summaries are easy to
    miss.
    """
    if isinstance(reactor, SelectReactor):
        pytest.fail("select() cannot watch descriptors past 1024: run these tests on the default (epoll) reactor")
    needed = max(open_fds()) + 1 + descriptors + 256  # 256: room for pytest, the store, the reactor's own
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        yield soft
        return
    raised_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
    refused = None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, raised_hard))
    except (ValueError, OSError) as e:
        refused = e
    if refused is not None:
        pytest.fail(
            f"this test holds {descriptors} descriptors and needs an open-files limit of {needed}; "
            f"the hard limit is {hard} and cannot be raised from here ({refused}). Raise the hard limit of the "
            f"session that runs pytest to {needed} or more: nofile in /etc/security/limits.conf, LimitNOFILE= "
            f"of a systemd unit, or `docker run --ulimit nofile={needed}:{needed}`.",
            pytrace=False,
        )
    try:
        yield needed
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def files_limit(reactor):
    """``files_limit(n)`` makes room for ``n`` more open descriptors until the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda descriptors: stack.enter_context(files_limit_for(reactor, descriptors))


def test_files_limit_raises_a_low_soft_limit_and_restores_it(reactor):
    """Under a soft limit too low for what is asked, the limit is raised for the block and restored after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = max(open_fds()) + 64
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with files_limit_for(reactor, 5000) as raised:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised >= max(open_fds()) + 5000
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (low, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Recorder(protocol.Protocol):
    """A raw peer: sends what it is told, keeps what it receives, tells when the server has gone."""

    def __init__(self, reactor, trickle: bytes = b"", every: float = 0.05):
        self.reactor = reactor
        self.received = b""
        self.lost = defer.Deferred()
        self.lost_at = None
        self._trickle = trickle
        self._every = every
        self._call = None

    def connectionMade(self):
        if self._trickle:
            self._send_one()

    def _send_one(self):
        self.transport.write(self._trickle[:1])
        self._trickle = self._trickle[1:]
        if self._trickle:
            self._call = self.reactor.callLater(self._every, self._send_one)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.lost_at = time.monotonic()
        self.lost.callback(None)


class NeverReads(Recorder):
    """A client that says HELLO, asks for a lot, and never reads a byte of the answers."""

    def __init__(self, reactor, secret: str, requests: list[bytes]):
        super().__init__(reactor)
        self.secret = secret
        self.requests = requests

    def connectionMade(self):
        self.transport.pauseProducing()  # stop reading from the socket, for good
        hello = {"rid": 1, "proto": 1, "role": "client", "name": "never-reads", "token": self.secret}
        self.transport.write(wire.encode("HELLO", hello) + b"".join(self.requests))


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.ensureDeferred
async def test_real_sockets_slowloris_and_non_reader_cut_while_worker_works(reactor, tmp_path, logged):
    """A byte-a-tick handshake and a client that never reads are cut off; a normal worker keeps working."""
    server = await LiveServer(
        reactor,
        tmp_path,
        "tcp:0:interface=127.0.0.1",
        "--handshake-timeout",
        "1",
        "--max-output",
        "262144",
    ).start()
    worker = make_worker_service(
        reactor,
        [f"tcp:127.0.0.1:{server.port}"],
        name="w1",
        token=server.secret,
        job_types=load_job_types(["noop"]),
        slots=2,
        handlers="threads",
        threads=InlineThreads(),
    )
    worker.startService()
    client = None
    try:
        await bounded(worker.when_connected(), reactor)
        worker_conn = server.dispatcher.workers["w1"].conn
        client = await bounded(connect(reactor, f"tcp:127.0.0.1:{server.port}", server.secret), reactor)
        big = await client.submit([{"type": "noop", "records": [0], "params": {"blob": "b" * 200_000}}])
        await bounded(client.wait(big), reactor)

        hello = wire.encode("HELLO", {"rid": 1, "proto": 1, "role": "client", "name": "slow", "token": server.secret})
        slowloris = Recorder(reactor, trickle=hello, every=0.05)  # about 5 s for the whole line
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        started = time.monotonic()
        await connectProtocol(endpoint, slowloris)
        shows = [wire.encode("SHOW", {"rid": rid, "job": big[0]}) for rid in range(2, 202)]  # 40 MB of answers
        non_reader = NeverReads(reactor, server.secret, shows)
        await connectProtocol(endpoint, non_reader)

        # While they hang on, the worker works.
        ids = await client.submit([{"type": "noop", "records": [i, i + 1]} for i in range(20)])
        await bounded(client.wait(ids), reactor)
        await bounded(slowloris.lost, reactor)
        assert b"handshake_timeout" in slowloris.received and b"OK" not in slowloris.received
        assert slowloris.lost_at - started < 3.0
        # The non-reader does not read, so it cannot notice; the server says why it cut it.
        await turns(reactor, lambda: any("not reading" in str(e.get("reason", "")) for e in logged), what="the cut")
        await turns(
            reactor,
            lambda: all(p.session.name != "never-reads" for p in server.factory.connections),
            what="the server forgetting the non-reader",
        )
        non_reader.transport.abortConnection()

        # ... and after them.
        ids = await client.submit([{"type": "noop", "records": [i]} for i in range(20)])
        final = await bounded(client.wait(ids), reactor)
        assert {s["state"] for s in final.values()} == {"done"}
        assert server.dispatcher.workers["w1"].conn is worker_conn, "the worker was disturbed"
    finally:
        if client is not None:
            await client.close()
        await worker.stopService()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_real_sockets_thousands_of_silent_connections_cut_at_handshake_deadline(reactor, tmp_path, files_limit):
    """2,000 connections that never speak cost the others nothing and are all cut at the handshake deadline."""
    count, handshake = 2000, 3.0
    files_limit(2 * count + 16)  # both ends of each, the listener, the client
    server = await LiveServer(
        reactor,
        tmp_path,
        "tcp:0:interface=127.0.0.1:backlog=4096",
        "--handshake-timeout",
        str(handshake),
    ).start()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
    silent = [Recorder(reactor) for _ in range(count)]
    opened = time.monotonic()
    try:
        for start in range(0, count, 250):
            await bounded(
                defer.gatherResults([connectProtocol(endpoint, p) for p in silent[start : start + 250]]), reactor
            )
        await turns(
            reactor, lambda: len(server.factory.connections) >= count, what="the server seeing every connection"
        )
        assert time.monotonic() - opened < handshake - 1, "too slow to open the connections for this test"

        began = time.monotonic()
        client = await bounded(connect(reactor, f"tcp:127.0.0.1:{server.port}", server.secret), reactor)
        ids = await client.submit([{"type": "noop", "records": [1]}])
        assert (await client.show(ids[0]))["state"] == "queued"
        served_in = time.monotonic() - began
        assert served_in < 0.5, f"a normal client took {served_in:.2f} s among {count} silent connections"
        assert not any(p.lost.called for p in silent)

        await bounded(defer.gatherResults([p.lost for p in silent]), reactor, timeout=handshake + 10)
        assert all(b'"code":"handshake_timeout"' in p.received for p in silent)
        cut_after = sorted(p.lost_at - opened for p in silent)
        assert handshake - 0.1 < cut_after[0] and cut_after[-1] < handshake + 3.0, (cut_after[0], cut_after[-1])
        assert (await client.stats())["jobs"]["queued"] == 1  # the client outlived them all
        await client.close()
    finally:
        for p in silent:
            if p.transport is not None and not p.lost.called:
                p.transport.abortConnection()
        await server.stop()


class Abandons(protocol.Protocol):
    """A peer that connects, maybe says something, and goes away without a word of goodbye.

    ``hello`` (a whole HELLO line) is sent first and its OK awaited; then
    ``partial`` (bytes without a newline) is sent, and the connection ends:
    with a FIN (``reset=False``), or with an RST once the bytes are out
    (``reset=True``: SO_LINGER 0, then the orderly close flushes the buffer
    and the kernel resets the connection instead of lingering).
    """

    def __init__(self, hello: bytes = b"", partial: bytes = b"", reset: bool = False):
        self.hello = hello
        self.partial = partial
        self.reset = reset
        self.received = b""
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.hello:
            self.transport.write(self.hello)
        else:
            self._go()

    def dataReceived(self, data):
        self.received += data
        if self.hello and b"\n" in self.received and not self.transport.disconnecting:
            self._go()

    def _go(self):
        if self.partial:
            self.transport.write(self.partial)
        if self.reset:
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost.callback(None)


def abandoning_peers(secret: str, wave: int, count: int) -> list[Abandons]:
    """``count`` peers of four kinds, in turn, each abandoning its connection in a different state."""
    peers = []
    for i in range(count):
        kind, name = i % 4, f"churn-{wave}-{i}"
        if kind == 0:  # connects and closes at once
            peers.append(Abandons())
        elif kind == 1:  # half a HELLO, then a reset
            peers.append(Abandons(partial=b'HELLO {"rid":1,"proto":1,"role":"cl', reset=True))
        elif kind == 2:  # a client that logs in, watches everything, then closes mid-line
            hello = wire.encode("HELLO", {"rid": 1, "proto": 1, "role": "client", "name": name, "token": secret})
            watch = wire.encode("WATCH", {"rid": 2, "jobs": []})
            peers.append(Abandons(hello, partial=watch + b'STATS {"rid":', reset=False))
        else:  # a worker that logs in (taking no work: slots 0), then resets mid-line
            hello = {"rid": 1, "proto": 1, "role": "worker", "name": name, "token": secret}
            hello |= {"slots": 0, "types": {"noop": "1.0"}}
            peers.append(Abandons(wire.encode("HELLO", hello), partial=b'BEAT {"x":', reset=True))
    return peers


@pytest_twisted.ensureDeferred
async def test_real_sockets_thousands_of_abandoned_connections_leave_nothing_behind(reactor, tmp_path, files_limit):
    """3,000 connections opened and abandoned in waves, in every state, while a worker works: its jobs all complete,
    and the server's connections, workers, watchers and file descriptors come back to what they were."""
    waves, per_wave = 10, 300
    files_limit(2 * per_wave + 16)
    server = await LiveServer(reactor, tmp_path, "tcp:0:interface=127.0.0.1:backlog=1024").start()
    worker = make_worker_service(
        reactor,
        [f"tcp:127.0.0.1:{server.port}"],
        name="w1",
        token=server.secret,
        job_types=load_job_types(["sleep"]),
        slots=2,
        handlers="threads",
        threads=InlineThreads(),
    )
    worker.startService()
    client = None
    peers: list[Abandons] = []
    try:
        await bounded(worker.when_connected(), reactor)
        worker_conn = server.dispatcher.workers["w1"].conn
        client = await bounded(connect(reactor, f"tcp:127.0.0.1:{server.port}", server.secret), reactor)
        await bounded(client.wait(await client.submit([{"type": "sleep", "records": [0]}])), reactor)
        connections = set(server.factory.connections)
        watchers = set(server.dispatcher.watchers)
        sockets, descriptors = open_sockets(), len(open_fds())
        assert len(connections) == 2  # the worker and the client

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port)
        slowest = 0.0
        done: dict[int, dict] = {}
        for wave in range(waves):
            # Work that outlasts the wave (10 jobs of 10 x 10 ms on 2 slots: 0.5 s; a wave takes 0.1-0.3 s) ...
            ids = await client.submit(
                [{"type": "sleep", "records": list(range(10)), "params": {"seconds": 0.01}} for _ in range(10)]
            )
            finished = client.wait(ids)
            # ... while 300 peers connect and abandon their connections.
            peers = abandoning_peers(server.secret, wave, per_wave)
            connecting = defer.gatherResults([connectProtocol(endpoint, p) for p in peers])
            began = time.monotonic()
            await bounded(client.stats(), reactor)
            slowest = max(slowest, time.monotonic() - began)
            await bounded(connecting, reactor)
            await bounded(defer.gatherResults([p.lost for p in peers]), reactor)
            logged_in = [p for p in peers if p.hello]
            assert all(p.received.startswith(b"OK ") for p in logged_in), [p.received for p in logged_in][:3]
            await turns(reactor, lambda: set(server.factory.connections) == connections, what=f"wave {wave} forgotten")
            done |= await bounded(finished, reactor)
        assert len(done) == waves * 10 and {s["state"] for s in done.values()} == {"done"}
        assert slowest < 2.0, f"a STATS took {slowest:.2f} s during a wave of {per_wave} abandoned connections"

        assert server.dispatcher.workers["w1"].conn is worker_conn, "the worker was disturbed"
        assert set(server.dispatcher.workers) == {"w1"} and len(server.dispatcher.workers.by_connection) == 1
        assert set(server.dispatcher.watchers) == watchers
        # Every socket of the 3,000 connections is closed, on both ends (both live in this process).
        assert open_sockets() <= sockets + 2, (sockets, open_sockets())
        assert len(open_fds()) <= descriptors + 4, (descriptors, len(open_fds()))
    finally:
        for p in peers:
            if p.transport is not None and not p.lost.called:
                p.transport.abortConnection()
        if client is not None:
            await client.close()
        await worker.stopService()
        await server.stop()
