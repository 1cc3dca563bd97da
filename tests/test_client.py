"""Unit tests of gridd.client against the wire contract (protocols/PROTOCOL.md, sections 2 and 9).

No reactor, no sockets, no sleeps: the protocol talks to a StringTransport
and a task.Clock, and every Deferred here has fired (or not) by the time we
look, so the tests check results synchronously.
"""

from __future__ import annotations

import pytest
from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gridd import errors, wire
from gridd.client import (
    BlockingClient,
    Client,
    ClientProtocol,
    NotSent,
    OutcomeUnknown,
    ReconnectFailed,
    connect,
    split_submit,
)
from gridd.peer import ConnectionDropped

WELCOME = {"proto": 1, "server": "gridd/0.1.0", "beat": 2.0, "deadline": 6.0, "max_line": 1_048_576}
#: The default backoff without its jitter: rounds 0.5 s, 1 s, 2 s, 4 s ... apart.
STEADY = backoffPolicy(initialDelay=0.5, maxDelay=10.0, factor=2.0, jitter=lambda: 0)


# -- helpers ---------------------------------------------------------------------


def result_of(d: defer.Deferred):
    """The result of a Deferred that must already have succeeded."""
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def failure_of(d: defer.Deferred) -> Exception:
    """The exception of a Deferred that must already have failed."""
    outcome = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    assert isinstance(outcome[0], Failure), f"the Deferred succeeded with {outcome[0]!r}"
    return outcome[0].value


def sent(transport: StringTransport) -> list[wire.Message]:
    """The messages written since the last call, each checked against the spec's fields."""
    data = transport.value()
    transport.clear()
    assert data == b"" or data.endswith(b"\n")
    return [wire.parse_line(line) for line in data.split(b"\n")[:-1]]


def reply(protocol: ClientProtocol, verb: str, body: dict, chunk: int | None = None) -> None:
    """Feed one server line, whole or in chunks of ``chunk`` bytes."""
    data = wire.encode(verb, body)
    step = chunk or len(data)
    for start in range(0, len(data), step):
        protocol.dataReceived(data[start : start + step])


def handshake(**welcome) -> tuple[ClientProtocol, StringTransport, Clock]:
    """A ClientProtocol whose HELLO has been accepted, with nothing left to read."""
    clock = Clock()
    protocol = ClientProtocol(clock, "tester", "s3cret")
    transport = StringTransport()
    protocol.makeConnection(transport)
    [hello] = sent(transport)
    reply(protocol, "OK", dict(WELCOME, rid=hello.rid, **welcome))
    assert result_of(protocol.ready)["server"] == "gridd/0.1.0"
    return protocol, transport, clock


def lose(protocol: ClientProtocol) -> None:
    protocol.connectionLost(Failure(ConnectionLost("cable cut")))


# -- the handshake and connect() -----------------------------------------------------


def test_client_protocol_hello_names_client_role():
    """The first line is a HELLO with proto 1, role client, the name and the token."""
    protocol = ClientProtocol(Clock(), "cron", "s3cret")
    transport = StringTransport()
    protocol.makeConnection(transport)
    [hello] = sent(transport)
    assert hello.verb == "HELLO"
    assert {k: hello.body[k] for k in ("proto", "role", "name", "token")} == {
        "proto": 1,
        "role": "client",
        "name": "cron",
        "token": "s3cret",
    }
    reply(protocol, "OK", dict(WELCOME, rid=hello.rid))
    lose(protocol)


def test_connect_fires_with_client_after_handshake():
    """connect() fires with a Client over the ClientProtocol only once the HELLO reply arrived."""
    reactor = MemoryReactorClock()
    d = connect(reactor, "tcp:grid.example:7700", "s3cret", name="cron")
    host, port, factory, _, _ = reactor.tcpClients[0]
    assert (host, port) == ("grid.example", 7700)
    transport = StringTransport()
    wrapper = factory.buildProtocol(None)
    wrapper.makeConnection(transport)
    [hello] = sent(transport)
    assert not d.called
    reply(wrapper, "OK", dict(WELCOME, rid=hello.rid))
    client = result_of(d)
    assert isinstance(client, Client)
    assert isinstance(client.protocol, ClientProtocol)
    assert (client.max_line, client.endpoint) == (1_048_576, "tcp:grid.example:7700")
    # Only the keepalive is left (beat 2 s, deadline 6 s): the 10 s handshake timer is gone.
    assert sorted(call.getTime() for call in reactor.getDelayedCalls()) == [2.0, 6.0]
    lose(client.protocol)


def test_connect_refused_hello_fails_with_gridd_error():
    """A HELLO answered with ERR auth_failed fails connect() with AuthFailed."""
    reactor = MemoryReactorClock()
    d = connect(reactor, "tcp:127.0.0.1:7700", "wrong")
    wrapper = reactor.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    wrapper.makeConnection(transport)
    [hello] = sent(transport)
    reply(wrapper, "ERR", {"rid": hello.rid, "code": "auth_failed", "message": "authentication failed"})
    assert isinstance(failure_of(d), errors.AuthFailed)
    assert transport.disconnecting
    assert not reactor.getDelayedCalls()


def test_connect_silent_server_fails_with_connection_dropped():
    """A server that never answers HELLO is cut after the handshake timeout."""
    reactor = MemoryReactorClock()
    d = connect(reactor, "tcp:127.0.0.1:7700", "s3cret", handshake_timeout=10, rounds=1)
    wrapper = reactor.tcpClients[0][2].buildProtocol(None)
    transport = StringTransport()
    wrapper.makeConnection(transport)
    reactor.advance(9.9)
    assert not d.called
    reactor.advance(0.1)
    assert transport.disconnected
    wrapper.connectionLost(Failure(ConnectionLost("aborted")))
    assert "no answer to HELLO within 10 s" in str(failure_of(d))


def test_connect_fails_over_to_the_next_server():
    """With several endpoints, a refused connection moves on to the next server, which is used."""
    reactor = MemoryReactorClock()
    d = connect(reactor, ["tcp:127.0.0.1:7700", "tcp:127.0.0.1:7701"], "s3cret")
    [(_, port, factory, _, _)] = reactor.tcpClients
    assert port == 7700
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
    assert [c[1] for c in reactor.tcpClients] == [7700, 7701]
    wrapper = reactor.tcpClients[1][2].buildProtocol(None)
    transport = StringTransport()
    wrapper.makeConnection(transport)
    hello = wire.parse_line(transport.value().rstrip(b"\n"), wire.PEER_VERBS)
    wrapper.dataReceived(wire.encode("OK", {"rid": hello.rid, "proto": 1, "beat": 2.0, "deadline": 6.0}))
    client = result_of(d)
    assert (client.welcome["deadline"], client.endpoint) == (6.0, "tcp:127.0.0.1:7701")
    client.protocol.transport.loseConnection()
    wrapper.connectionLost(Failure(ConnectionLost("closed")))


def test_connect_tries_every_server_for_some_rounds_then_gives_up():
    """When no server answers, each is tried once per round, with a pause between rounds, then the last error."""
    reactor = MemoryReactorClock()
    d = connect(reactor, ["tcp:127.0.0.1:7700", "tcp:127.0.0.1:7701"], "s3cret", rounds=2, retry_policy=STEADY)
    for expected in (1, 2):
        assert len(reactor.tcpClients) == expected
        reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
    assert not d.called
    reactor.advance(0.5)
    for _ in range(2):
        reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError("refused")))
    assert len(reactor.tcpClients) == 4
    assert isinstance(failure_of(d), ConnectionRefusedError)


# -- one line per method, one result per reply -------------------------------------------

JOB = {"id": 7, "type": "noop", "state": "running", "history": []}

CALLS = [
    # (method, args, kwargs, verb sent, body sent without rid, OK body without rid, result)
    ("submit", ([{"type": "noop", "records": [1, 2]}],), {}, "SUBMIT", {"jobs": [{"type": "noop", "records": [1, 2]}]},
     {"jobs": [41]}, [41]),
    ("show", (7,), {}, "SHOW", {"job": 7}, {"job": JOB}, JOB),
    ("list_jobs", (), {}, "LIST", {}, {"jobs": [JOB], "next": None}, {"jobs": [JOB], "next": None}),
    ("list_jobs", (), {"state": "queued", "type": "noop", "after": 5, "limit": 2}, "LIST",
     {"state": "queued", "type": "noop", "after": 5, "limit": 2}, {"jobs": [], "next": None},
     {"jobs": [], "next": None}),
    ("results_page", (7,), {"after": 9, "limit": 10}, "RESULTS", {"job": 7, "after": 9, "limit": 10},
     {"results": [{"i": 10, "out": 1, "worker": "w1"}], "next": None},
     {"results": [{"i": 10, "out": 1, "worker": "w1"}], "next": None}),
    ("results", (7,), {}, "RESULTS", {"job": 7}, {"results": [{"i": 0, "error": "bad"}], "next": None},
     [{"i": 0, "error": "bad"}]),
    ("workers", (), {}, "WORKERS", {}, {"workers": [{"name": "w1"}]}, [{"name": "w1"}]),
    ("stats", (), {}, "STATS", {}, {"jobs": {"queued": 1}, "workers": 2, "slots": 4, "busy": 1, "dispatching": True},
     {"jobs": {"queued": 1}, "workers": 2, "slots": 4, "busy": 1, "dispatching": True}),
    ("all_jobs", (), {"state": "failed"}, "LIST", {"state": "failed"}, {"jobs": [JOB], "next": None}, [JOB]),
    ("cancel", (7,), {}, "CANCEL", {"job": 7}, {"state": "cancelled"}, "cancelled"),
    ("pause", (7,), {}, "PAUSE", {"job": 7}, {"state": "paused"}, "paused"),
    ("resume", (7,), {}, "RESUME", {"job": 7}, {"state": "queued"}, "queued"),
    ("requeue", (7,), {}, "REQUEUE", {"job": 7}, {"state": "queued"}, "queued"),
    ("worker_action", ("w1", "drain"), {}, "WORKER", {"worker": "w1", "action": "drain"}, {}, None),
    ("dispatch", (False,), {}, "DISPATCH", {"enabled": False}, {"dispatching": False}, False),
    ("add_credential", ("cron", "submitter"), {}, "CREDENTIAL", {"action": "add", "id": "cron", "role": "submitter"},
     {"token": "cron.X"}, "cron.X"),
    ("list_credentials", (), {}, "CREDENTIAL", {"action": "list"}, {"credentials": [{"id": "cron"}]}, [{"id": "cron"}]),
    ("revoke_credential", ("cron",), {}, "CREDENTIAL", {"action": "revoke", "id": "cron"}, {}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, args, kwargs, verb, body, answer, expected", CALLS, ids=[f"{c[0]}-{c[3]}" for c in CALLS]
)
def test_client_methods_send_spec_line_and_resolve_reply(method, args, kwargs, verb, body, answer, expected):
    """Each method sends exactly one spec-conforming line and fires with the reply's payload."""
    protocol, transport, _ = handshake()
    d = getattr(protocol, method)(*args, **kwargs)
    [request] = sent(transport)
    assert request.verb == verb
    assert request.body == dict(body, rid=request.rid)
    assert not d.called
    reply(protocol, "OK", dict(answer, rid=request.rid))
    assert result_of(d) == expected
    assert sent(transport) == []
    lose(protocol)


@pytest.mark.parametrize(
    "code, extra, cls",
    [
        ("unknown_job", {}, errors.UnknownJob),
        ("invalid_state", {"state": "done"}, errors.InvalidState),
        ("too_many", {"limit": 10000}, errors.TooMany),
        ("forbidden", {}, errors.Forbidden),
        ("unavailable", {}, errors.Unavailable),
        ("from_the_future", {}, errors.GriddError),
    ],
)
def test_client_error_reply_raises_matching_gridd_error(code, extra, cls):
    """ERR fails the request with the gridd.errors class of its code, carrying message and extra fields."""
    protocol, transport, _ = handshake()
    d = protocol.cancel(7)
    [request] = sent(transport)
    reply(protocol, "ERR", {"rid": request.rid, "code": code, "message": "no way", **extra})
    error = failure_of(d)
    assert type(error) is cls
    assert (error.code, error.message, error.extra) == (code, "no way", extra)
    lose(protocol)


def test_client_replies_out_of_order_matched_by_rid():
    """Replies fire the request with the same rid, whatever order they come in."""
    protocol, transport, _ = handshake()
    first, second = protocol.show(1), protocol.stats()
    show, stats = sent(transport)
    reply(protocol, "OK", {"rid": stats.rid, "jobs": {}, "workers": 0, "slots": 0, "busy": 0, "dispatching": True})
    assert not first.called
    assert result_of(second)["workers"] == 0
    reply(protocol, "OK", {"rid": show.rid, "job": {"id": 1}})
    assert result_of(first) == {"id": 1}
    lose(protocol)


def test_client_reply_fed_byte_by_byte_resolves():
    """A reply that arrives one byte at a time still resolves its request once, at its LF."""
    protocol, transport, _ = handshake()
    d = protocol.show(7)
    [request] = sent(transport)
    line = wire.encode("OK", {"rid": request.rid, "job": JOB})
    for index in range(len(line) - 1):
        protocol.dataReceived(line[index : index + 1])
    assert not d.called
    protocol.dataReceived(line[-1:])
    assert result_of(d) == JOB
    lose(protocol)


def test_client_lost_connection_fails_pending_with_connection_dropped():
    """Requests still awaiting their reply fail with ConnectionDropped when the connection goes."""
    protocol, transport, clock = handshake()
    pending = [protocol.show(7), protocol.submit([{"type": "noop", "records": [1]}])]
    lose(protocol)
    for d in pending:
        assert isinstance(failure_of(d), ConnectionDropped)
    assert result_of(protocol.closed) is None
    assert clock.getDelayedCalls() == []


def test_client_close_fires_once_closed():
    """close() asks the transport to close and fires when the connection is gone."""
    protocol, transport, _ = handshake()
    d = protocol.close()
    assert transport.disconnecting
    assert not d.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert result_of(d) is None


def test_client_keepalive_beats_on_the_clock():
    """An idle client sends BEAT every announced interval (PROTOCOL.md section 5)."""
    protocol, transport, clock = handshake(beat=2.0, deadline=600.0)
    clock.advance(2.0)
    assert [m.verb for m in sent(transport)] == ["BEAT"]
    lose(protocol)


# -- SUBMIT chunking ---------------------------------------------------------------


def test_client_submit_splits_into_10000_job_batches():
    """25,000 jobs go out as SUBMITs of 10,000, 10,000 and 5,000, one after the other, ids in order."""
    protocol, transport, _ = handshake()
    jobs = [{"type": "noop", "records": [n]} for n in range(25_000)]
    d = protocol.submit(jobs)
    next_id = 1
    sizes = []
    for _ in range(3):
        [request] = sent(transport)
        batch = request.body["jobs"]
        sizes.append(len(batch))
        assert batch[0] == jobs[next_id - 1]
        reply(protocol, "OK", {"rid": request.rid, "jobs": list(range(next_id, next_id + len(batch)))})
        next_id += len(batch)
    assert sizes == [10_000, 10_000, 5_000]
    assert result_of(d) == list(range(1, 25_001))
    lose(protocol)


def test_client_submit_splits_to_fit_announced_max_line():
    """Every SUBMIT line fits the max_line the server announced, and every job is sent once."""
    protocol, transport, _ = handshake(max_line=300)
    jobs = [{"type": "noop", "records": ["x" * 40], "name": f"job {n}"} for n in range(10)]
    d = protocol.submit(jobs)
    seen = []
    while not d.called:
        data = transport.value()
        assert len(data) - 1 <= 300
        [request] = sent(transport)
        seen.extend(request.body["jobs"])
        reply(protocol, "OK", {"rid": request.rid, "jobs": [len(seen) - i for i in range(len(request.body["jobs"]))]})
    assert seen == jobs
    assert len(result_of(d)) == 10
    lose(protocol)


def test_split_submit_fills_line_exactly_to_the_limit():
    """A batch whose line is exactly max_line bytes (widest rid) is allowed; one byte less splits it."""
    jobs = [{"type": "t", "records": [1]}] * 3
    line = wire.encode("SUBMIT", {"jobs": jobs, "rid": 2**53 - 1})
    exact = len(line) - 1
    assert [len(chunk) for chunk in split_submit(jobs, exact)] == [3]
    assert [len(chunk) for chunk in split_submit(jobs, exact - 1)] == [2, 1]


def test_client_submit_too_big_job_sends_nothing():
    """A job no line can hold fails with LineTooLong before any SUBMIT is sent."""
    protocol, transport, _ = handshake(max_line=200)
    d = protocol.submit([{"type": "noop", "records": [1]}, {"type": "noop", "records": ["x" * 300]}])
    error = failure_of(d)
    assert isinstance(error, errors.LineTooLong)
    assert "job 1" in error.message
    assert sent(transport) == []
    lose(protocol)


@pytest.mark.parametrize(
    "code, cls, fates",
    [
        # Refused: the second SUBMIT's job does not exist.
        ("unavailable", errors.Unavailable, (range(0), range(10_000, 10_001), range(0))),
        # Its COMMIT's outcome lost: the job may or may not exist.
        ("commit_unknown", errors.CommitUnknown, (range(10_000, 10_001), range(0), range(0))),
    ],
)
def test_client_submit_later_batch_error_lists_submitted_ids(code, cls, fates):
    """When a later SUBMIT fails, the error carries the ids the earlier ones committed, and its own jobs' fate."""
    protocol, transport, _ = handshake()
    d = protocol.submit([{"type": "noop", "records": [n]} for n in range(10_001)])
    [first] = sent(transport)
    reply(protocol, "OK", {"rid": first.rid, "jobs": list(range(1, 10_001))})
    [second] = sent(transport)
    reply(protocol, "ERR", {"rid": second.rid, "code": code, "message": "store down"})
    error = failure_of(d)
    assert type(error) is cls
    assert error.submitted == list(range(1, 10_001))
    assert (error.unknown, error.refused, error.not_sent) == fates
    lose(protocol)


def test_reconnecting_client_submit_answered_commit_unknown_is_not_sent_again():
    """The reconnecting Client: commit_unknown fails the submit with the jobs unknown, and sends nothing more."""
    _, _, a, d, _, second = six_jobs_submitted_up_to_the_second_submit()
    reply(a.protocol, "ERR", {"rid": second.rid, "code": "commit_unknown", "message": "lost during COMMIT"})
    error = failure_of(d)
    assert isinstance(error, errors.CommitUnknown)
    assert error.submitted == [11, 12]
    assert (error.unknown, error.refused, error.not_sent) == (range(2, 4), range(0), range(4, 6))
    assert a.sent() == []


def test_client_protocol_submit_on_a_lost_connection_fails_not_sent():
    """A ClientProtocol (it never reconnects) fails a submit on its lost connection with NotSent, no job sent."""
    protocol, transport, _ = handshake()
    lose(protocol)
    error = failure_of(protocol.submit([{"type": "noop", "records": [n]} for n in range(3)]))
    assert isinstance(error, NotSent) and isinstance(error, ConnectionDropped)
    assert (error.submitted, error.unknown, error.refused, error.not_sent) == ([], range(0), range(0), range(0, 3))
    assert sent(transport) == []


def test_client_protocol_request_on_a_closing_connection_writes_nothing():
    """Once the connection is closing (loseConnection called), a request writes nothing and fails with NotSent."""
    protocol, transport, _ = handshake()
    transport.loseConnection()
    error = failure_of(protocol.cancel(7))
    assert isinstance(error, NotSent) and "CANCEL not sent: the connection is closing" in str(error)
    assert sent(transport) == []
    lose(protocol)


def test_client_submit_nothing_sends_nothing():
    """Submitting an empty list fires with no ids and sends no line (SUBMIT needs a job)."""
    protocol, transport, _ = handshake()
    assert result_of(protocol.submit([])) == []
    assert sent(transport) == []
    lose(protocol)


# -- paging ----------------------------------------------------------------------


def test_client_results_follow_next_through_all_pages():
    """results() asks for each following page with after=next until next is null."""
    protocol, transport, _ = handshake()
    d = protocol.results(7)
    pages = [([0, 1], 1), ([2, 3], 3), ([4], None)]
    for indices, next_after in pages:
        [request] = sent(transport)
        results = [{"i": i, "out": i * i, "worker": "w1"} for i in indices]
        reply(protocol, "OK", {"rid": request.rid, "results": results, "next": next_after})
    assert [r["out"] for r in result_of(d)] == [0, 1, 4, 9, 16]
    lose(protocol)


def test_client_iter_jobs_pages_with_filters():
    """all_jobs() keeps the filters and page size on every LIST and passes next as after."""
    protocol, transport, _ = handshake()
    d = defer.Deferred.fromCoroutine(_take(protocol.iter_jobs(state="queued", page_size=2)))
    [first] = sent(transport)
    assert first.body == {"rid": first.rid, "state": "queued", "limit": 2}
    reply(protocol, "OK", {"rid": first.rid, "jobs": [{"id": 1}, {"id": 2}], "next": 2})
    [second] = sent(transport)
    assert second.body == {"rid": second.rid, "state": "queued", "limit": 2, "after": 2}
    reply(protocol, "OK", {"rid": second.rid, "jobs": [{"id": 3}], "next": None})
    assert result_of(d) == [1, 2, 3]
    lose(protocol)


async def _take(jobs):
    return [job["id"] async for job in jobs]


# -- WATCH, EVENT and wait() -----------------------------------------------------------


def event(protocol, job, state, accepted=0, total=3):
    reply(protocol, "EVENT", {"job": job, "state": state, "accepted": accepted, "total": total})


def status(job, state, accepted=0, total=3):
    return {"job": job, "state": state, "accepted": accepted, "total": total}


def test_client_watch_delivers_events_of_watched_jobs_only():
    """watch() fires with the current states; EVENTs of its jobs then reach the callback, others do not."""
    protocol, transport, _ = handshake()
    seen = []
    d = protocol.watch([1, 2], seen.append)
    [request] = sent(transport)
    assert (request.verb, request.body["jobs"]) == ("WATCH", [1, 2])
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "queued"), status(2, "running")]})
    assert result_of(d) == [status(1, "queued"), status(2, "running")]
    event(protocol, 2, "running", accepted=1)
    event(protocol, 3, "done", accepted=3)
    assert seen == [status(2, "running", accepted=1)]
    protocol.unwatch(seen.append)
    event(protocol, 1, "running")
    assert len(seen) == 1
    lose(protocol)


def test_client_watch_empty_list_means_all_jobs():
    """watch([]) sends an empty list and hands every EVENT to the callback."""
    protocol, transport, _ = handshake()
    seen = []
    d = protocol.watch([], seen.append)
    [request] = sent(transport)
    assert request.body["jobs"] == []
    reply(protocol, "OK", {"rid": request.rid, "jobs": []})
    result_of(d)
    event(protocol, 99, "queued")
    assert [s["job"] for s in seen] == [99]
    lose(protocol)


def test_client_watch_refused_drops_callback():
    """A WATCH answered with unknown_job fails and leaves no callback behind."""
    protocol, transport, _ = handshake()
    seen = []
    d = protocol.watch([404], seen.append)
    [request] = sent(transport)
    reply(protocol, "ERR", {"rid": request.rid, "code": "unknown_job", "message": "no such job"})
    assert isinstance(failure_of(d), errors.UnknownJob)
    event(protocol, 404, "queued")
    assert seen == []
    lose(protocol)


def test_client_watch_long_list_splits_so_replies_fit_max_line():
    """A long WATCH list goes out in batches small enough for each reply (one status per job) to fit."""
    protocol, transport, _ = handshake(max_line=3 * 256)
    d = protocol.watch(range(1, 8), lambda status: None)
    batches = []
    while not d.called:
        [request] = sent(transport)
        batches.append(request.body["jobs"])
        reply(protocol, "OK", {"rid": request.rid, "jobs": [status(job, "queued") for job in request.body["jobs"]]})
    assert batches == [[1, 2, 3], [4, 5, 6], [7]]
    assert [s["job"] for s in result_of(d)] == list(range(1, 8))
    lose(protocol)


def test_client_watch_refused_later_batch_drops_callback():
    """When a later WATCH batch is refused, the whole watch fails and its callback is gone."""
    protocol, transport, _ = handshake(max_line=256)
    seen = []
    d = protocol.watch([1, 404], seen.append)
    [first] = sent(transport)
    reply(protocol, "OK", {"rid": first.rid, "jobs": [status(1, "queued")]})
    [second] = sent(transport)
    reply(protocol, "ERR", {"rid": second.rid, "code": "unknown_job", "message": "no such job"})
    assert isinstance(failure_of(d), errors.UnknownJob)
    event(protocol, 1, "running")
    assert seen == []
    lose(protocol)


def test_client_wait_fires_only_when_every_job_is_terminal():
    """wait() fires after the EVENT that makes the last watched job done, failed or cancelled."""
    protocol, transport, _ = handshake()
    seen = []
    d = protocol.wait([1, 2, 3], on_event=seen.append)
    [request] = sent(transport)
    assert (request.verb, request.body["jobs"]) == ("WATCH", [1, 2, 3])
    reply(
        protocol,
        "OK",
        {"rid": request.rid, "jobs": [status(1, "queued"), status(2, "running"), status(3, "paused")]},
    )
    event(protocol, 1, "done", accepted=3)
    event(protocol, 2, "failed", accepted=1)
    assert not d.called
    event(protocol, 3, "queued")
    event(protocol, 3, "cancelled")
    assert result_of(d) == {1: status(1, "done", 3), 2: status(2, "failed", 1), 3: status(3, "cancelled")}
    assert len(seen) == 3 + 4
    assert protocol._watches == []
    lose(protocol)


def test_client_wait_counts_requeued_job_as_unfinished_again():
    """A job that leaves a terminal state (REQUEUE) is waited for again."""
    protocol, transport, _ = handshake()
    d = protocol.wait([1, 2])
    [request] = sent(transport)
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "failed"), status(2, "running")]})
    event(protocol, 1, "queued")
    event(protocol, 2, "done", accepted=3)
    assert not d.called
    event(protocol, 1, "done", accepted=3)
    assert result_of(d)[1]["state"] == "done"
    lose(protocol)


def test_client_wait_jobs_already_terminal_in_watch_reply_fire_at_once():
    """Jobs that are already terminal in the WATCH reply fire wait() without any EVENT."""
    protocol, transport, _ = handshake()
    seen = []
    d = protocol.wait([1, 2], on_event=seen.append)
    [request] = sent(transport)
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "done", 3), status(2, "cancelled")]})
    assert result_of(d) == {1: status(1, "done", 3), 2: status(2, "cancelled")}
    assert seen == [status(1, "done", 3), status(2, "cancelled")]
    lose(protocol)


def test_client_wait_event_before_watch_reply_is_kept():
    """An EVENT that overtakes the WATCH reply is newer than the reply's snapshot of that job."""
    protocol, transport, _ = handshake()
    d = protocol.wait([1])
    [request] = sent(transport)
    event(protocol, 1, "done", accepted=3)
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "running", 2)]})
    assert result_of(d) == {1: status(1, "done", 3)}
    lose(protocol)


def test_client_wait_empty_list_fires_without_watching():
    """Waiting for no job fires at once and sends nothing."""
    protocol, transport, _ = handshake()
    assert result_of(protocol.wait([])) == {}
    assert sent(transport) == []
    lose(protocol)


def test_client_wait_lost_connection_fails_with_connection_dropped():
    """A connection lost while jobs are unfinished fails wait() with ConnectionDropped."""
    protocol, transport, _ = handshake()
    d = protocol.wait([1])
    [request] = sent(transport)
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "running")]})
    lose(protocol)
    assert isinstance(failure_of(d), ConnectionDropped)


def test_client_wait_cancelled_stops_watching():
    """Cancelling wait() fails it with CancelledError and unregisters its callback."""
    protocol, transport, _ = handshake()
    d = protocol.wait([1])
    [request] = sent(transport)
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "running")]})
    d.cancel()
    assert isinstance(failure_of(d), defer.CancelledError)
    assert protocol._watches == []
    lose(protocol)


@pytest.mark.expected_log_errors
def test_client_wait_callback_error_is_logged_not_fatal():
    """An on_event callback that raises is logged; the connection and the wait carry on."""
    protocol, transport, _ = handshake()

    def broken(status):
        raise RuntimeError("progress bar fell over")

    d = protocol.wait([1], on_event=broken)
    [request] = sent(transport)
    reply(protocol, "OK", {"rid": request.rid, "jobs": [status(1, "running")]})
    event(protocol, 1, "done", accepted=3)
    assert result_of(d)[1]["state"] == "done"
    assert not transport.disconnecting
    lose(protocol)


# -- Client: surviving a lost connection ---------------------------------------------

A, B = "tcp:a.example:7700", "tcp:b.example:7700"


class Line:
    """One connection a Client opened, seen from the server's end: read what it sent, answer, cut it."""

    def __init__(self, spec: str, protocol: ClientProtocol):
        self.spec = spec
        self.protocol = protocol
        self.transport = StringTransport()
        #: Every message this connection carried to the server, read or not yet.
        self.seen: list[wire.Message] = []

    def sent(self) -> list[wire.Message]:
        messages = sent(self.transport)
        self.seen.extend(messages)
        return messages

    def answer(self, request: wire.Message, **body) -> None:
        reply(self.protocol, "OK", dict(body, rid=request.rid))

    def greet(self, **welcome) -> None:
        """Answer the HELLO this connection opened with (WELCOME, with these fields changed)."""
        [hello] = self.sent()
        assert (hello.verb, hello.body["role"]) == ("HELLO", "client")
        self.answer(hello, **dict(WELCOME, **welcome))

    def event(self, job, state, accepted=0, total=3) -> None:
        event(self.protocol, job, state, accepted, total)

    def cut(self) -> None:
        lose(self.protocol)


class Network:
    """A Client's connector: endpoints in ``down`` refuse at once; the others connect and wait for their HELLO reply."""

    def __init__(self):
        self.down: set[str] = set()
        #: Endpoints whose connect neither succeeds nor fails until cancelled (a host that drops SYNs).
        self.hanging: set[str] = set()
        self.attempts: list[str] = []
        self.lines: list[Line] = []

    def __call__(self, spec: str, protocol: ClientProtocol) -> defer.Deferred:
        self.attempts.append(spec)
        if spec in self.down:
            return defer.fail(ConnectionRefusedError(spec))
        if spec in self.hanging:
            # As Twisted's endpoints do: a cancelled connect fails with ConnectingCancelledError.
            return defer.Deferred(lambda d: d.errback(ConnectingCancelledError(spec)))
        line = Line(spec, protocol)
        self.lines.append(line)
        protocol.makeConnection(line.transport)
        return defer.succeed(protocol)

    @property
    def last(self) -> Line:
        return self.lines[-1]

    def seen(self, verb: str) -> list[tuple[str, wire.Message]]:
        """Every ``verb`` line any server was sent, with its endpoint, in order."""
        for line in self.lines:
            line.sent()
        return [(line.spec, message) for line in self.lines for message in line.seen if message.verb == verb]


def connected(endpoints=(A, B), **options) -> tuple[Client, Network, Clock]:
    """A Client connected to the first endpoint over a Network, with the jitter-free backoff."""
    clock, network = Clock(), Network()
    d = connect(clock, list(endpoints), "s3cret", "tester", connector=network, retry_policy=STEADY, **options)
    network.last.greet()
    return result_of(d), network, clock


def keepalive_only(clock: Clock) -> bool:
    """Nothing but one connection's beat and deadline timers is scheduled (no reconnection pending)."""
    return len(clock.getDelayedCalls()) == 2


def test_client_wait_reconnects_to_the_next_server_and_completes_there():
    """A wait() whose server dies reconnects to the second endpoint, WATCHes the unfinished jobs, ends on its EVENT."""
    client, network, clock = connected()
    a = network.last
    seen = []
    d = client.wait([1, 2], on_event=seen.append)
    [watch] = a.sent()
    a.answer(watch, jobs=[status(1, "running"), status(2, "queued")])
    a.event(1, "done", accepted=3)
    network.down.add(A)  # the server is gone for good
    a.cut()
    assert not d.called
    b = network.last
    assert (b.spec, network.attempts) == (B, [A, B])
    b.greet()
    [again] = b.sent()
    assert (again.verb, again.body["jobs"]) == ("WATCH", [2])
    b.answer(again, jobs=[status(2, "running", accepted=2)])
    assert not d.called
    b.event(2, "done", accepted=3)
    assert result_of(d) == {1: status(1, "done", 3), 2: status(2, "done", 3)}
    assert seen == [
        status(1, "running"),
        status(2, "queued"),
        status(1, "done", 3),
        status(2, "running", 2),  # the fresh state from the new WATCH reply reaches the progress callback
        status(2, "done", 3),
    ]
    assert client.endpoint == B and keepalive_only(clock)
    b.cut()


def test_client_wait_rides_out_a_restart_of_its_only_server():
    """With one endpoint, wait() retries with backoff while the server restarts, then watches again there."""
    client, network, clock = connected([A])
    a = network.last
    d = client.wait([5])
    [watch] = a.sent()
    a.answer(watch, jobs=[status(5, "running")])
    network.down.add(A)
    a.cut()
    assert network.attempts == [A, A]  # the first round goes at once
    clock.advance(0.5)
    assert network.attempts == [A, A, A]
    network.down.clear()  # the restarted server listens again
    clock.advance(0.5)
    assert len(network.attempts) == 3
    clock.advance(0.5)  # round 3, 1 s after round 2
    restarted = network.last
    assert restarted is not a
    restarted.greet()
    [again] = restarted.sent()
    restarted.answer(again, jobs=[status(5, "done", 3)])
    assert result_of(d) == {5: status(5, "done", 3)}
    restarted.cut()


def test_client_read_request_is_sent_again_after_reconnect():
    """A SHOW whose connection drops before the reply is sent again on the new connection and fires with its reply."""
    client, network, _ = connected()
    a = network.last
    d = client.show(7)
    [first] = a.sent()
    a.cut()
    b = network.last
    b.greet()
    [again] = b.sent()
    assert (again.verb, again.body) == ("SHOW", {"job": 7, "rid": again.rid})
    b.answer(again, job=JOB)
    assert result_of(d) == JOB
    b.cut()


def test_client_pages_go_on_from_the_lost_page_after_reconnect():
    """results() whose second RESULTS page is lost asks the new connection for that page, not the first."""
    client, network, _ = connected()
    a = network.last
    d = client.results(7)
    [first] = a.sent()
    a.answer(first, results=[{"i": 0, "out": 0}], next=0)
    [second] = a.sent()
    assert second.body["after"] == 0
    a.cut()
    b = network.last
    b.greet()
    [again] = b.sent()
    assert (again.verb, again.body["after"]) == ("RESULTS", 0)
    b.answer(again, results=[{"i": 1, "out": 1}], next=None)
    assert [r["i"] for r in result_of(d)] == [0, 1]
    b.cut()


def test_client_submit_lost_before_reply_raises_outcome_unknown_and_is_not_resent():
    """A SUBMIT lost before its reply fails with OutcomeUnknown and is not sent again; the next call reconnects."""
    client, network, _ = connected()
    a = network.last
    d = client.submit([{"type": "noop", "records": [1]}])
    [submit] = a.sent()
    assert submit.verb == "SUBMIT"
    a.cut()
    error = failure_of(d)
    assert isinstance(error, OutcomeUnknown) and isinstance(error, ConnectionDropped)
    assert error.verb == "SUBMIT" and error.submitted == []
    assert "may or may not have carried it out, so it was not sent again" in str(error)
    assert network.attempts == [A]  # no reconnection, so nothing could be sent again
    stats = client.stats()
    b = network.last
    b.greet()
    [request] = b.sent()
    assert request.verb == "STATS"
    b.answer(request, jobs={}, workers=0, slots=0, busy=0, dispatching=True)
    assert result_of(stats)["workers"] == 0
    assert b.sent() == []
    b.cut()


#: Six jobs of one size, and the max_line that holds exactly two of them per SUBMIT: three SUBMITs.
SIX_JOBS = [{"type": "noop", "records": [f"record {n}"]} for n in range(6)]
TWO_PER_LINE = len(wire.encode("SUBMIT", {"jobs": SIX_JOBS[:2], "rid": 2**53 - 1})) - 1


def six_jobs_submitted_up_to_the_second_submit():
    """A Client submitting SIX_JOBS in three SUBMITs: the first answered (ids 11, 12), the second sent.

    Returns (network, client, connection, the submit's Deferred, first SUBMIT, second SUBMIT).
    """
    clock, network = Clock(), Network()
    d = connect(clock, [A, B], "s3cret", "tester", connector=network, retry_policy=STEADY)
    network.last.greet(max_line=TWO_PER_LINE)
    client, a = result_of(d), network.last
    d = client.submit(SIX_JOBS)
    [first] = a.sent()
    a.answer(first, jobs=[11, 12])
    [second] = a.sent()
    return network, client, a, d, first, second


def test_client_submit_lost_in_a_later_batch_names_committed_unknown_and_unsent_jobs():
    """Lost after SUBMIT 1's OK, before SUBMIT 2's reply: 1's ids submitted, 2 unknown, 3 not sent, nothing re-sent."""
    assert [len(chunk) for chunk in split_submit(SIX_JOBS, TWO_PER_LINE)] == [2, 2, 2]
    network, client, a, d, first, second = six_jobs_submitted_up_to_the_second_submit()
    assert first.body["jobs"] == SIX_JOBS[0:2]
    assert second.body["jobs"] == SIX_JOBS[2:4]
    a.cut()
    error = failure_of(d)
    assert isinstance(error, OutcomeUnknown) and error.verb == "SUBMIT" and error.endpoint == A
    assert error.submitted == [11, 12]
    assert (error.unknown, error.refused, error.not_sent) == (range(2, 4), range(0), range(4, 6))
    assert str(error).endswith(
        "Of 6 jobs, jobs[:2] were committed (ids in .submitted), jobs[2:4] may or may not have been (.unknown),"
        " jobs[4:6] were not sent (.not_sent)"
    )
    assert network.attempts == [A]  # no reconnection: nothing could be sent again
    stats = client.stats()
    network.last.greet()
    [request] = network.last.sent()
    network.last.answer(request, jobs={}, workers=0, slots=0, busy=0, dispatching=True)
    assert result_of(stats)["workers"] == 0
    assert [(spec, m.body["jobs"]) for spec, m in network.seen("SUBMIT")] == [(A, SIX_JOBS[0:2]), (A, SIX_JOBS[2:4])]
    network.last.cut()


def test_client_submit_batch_not_written_is_sent_on_the_next_connection():
    """A SUBMIT that finds its connection closing after the first OK goes on a new connection: each batch once."""
    clock, network = Clock(), Network()
    d = connect(clock, [A, B], "s3cret", "tester", connector=network, retry_policy=STEADY)
    network.last.greet(max_line=TWO_PER_LINE)
    client, a = result_of(d), network.last
    d = client.submit(SIX_JOBS)
    [first] = a.sent()
    a.transport.loseConnection()  # the connection starts closing...
    # ...and the first OK is handled in that same turn (a LineOnlyReceiver would drop the lines after
    # the close, so hand the line over directly).
    a.protocol.lineReceived(wire.encode("OK", {"rid": first.rid, "jobs": [11, 12]}).rstrip(b"\n"))
    assert a.sent() == [] and network.attempts == [A, B]
    b = network.last
    b.greet(max_line=TWO_PER_LINE)
    [second] = b.sent()
    b.answer(second, jobs=[13, 14])
    [third] = b.sent()
    b.answer(third, jobs=[15, 16])
    assert result_of(d) == [11, 12, 13, 14, 15, 16]
    assert [(spec, m.body["jobs"]) for spec, m in network.seen("SUBMIT")] == [
        (A, SIX_JOBS[0:2]),
        (B, SIX_JOBS[2:4]),
        (B, SIX_JOBS[4:6]),
    ]
    a.cut()
    b.cut()


def test_client_submit_unwritten_batch_with_no_server_back_carries_the_committed_ids():
    """A SUBMIT not written that finds no server to go to: ReconnectFailed names the jobs committed and not sent."""
    clock, network = Clock(), Network()
    d = connect(clock, [A, B], "s3cret", "tester", connector=network, reconnect_rounds=1)
    network.last.greet(max_line=TWO_PER_LINE)
    client, a = result_of(d), network.last
    d = client.submit(SIX_JOBS)
    [first] = a.sent()
    network.down.update({A, B})
    a.transport.loseConnection()
    a.protocol.lineReceived(wire.encode("OK", {"rid": first.rid, "jobs": [11, 12]}).rstrip(b"\n"))
    error = failure_of(d)
    assert isinstance(error, ReconnectFailed)
    assert error.submitted == [11, 12]
    assert (error.unknown, error.refused, error.not_sent) == (range(0), range(0), range(2, 6))
    assert len(network.seen("SUBMIT")) == 1
    a.cut()


def test_client_write_on_a_connection_lost_while_idle_reconnects_before_sending():
    """A CANCEL asked for after the connection went away is sent once, on the new connection."""
    client, network, _ = connected()
    network.last.cut()
    d = client.cancel(7)
    b = network.last
    b.greet()
    [cancel] = b.sent()
    assert (cancel.verb, cancel.body["job"]) == ("CANCEL", 7)
    b.answer(cancel, state="cancelled")
    assert result_of(d) == "cancelled"
    assert [spec for spec, _ in network.seen("CANCEL")] == [B]
    b.cut()


def test_client_cancel_on_a_closing_connection_is_sent_once_after_reconnecting():
    """A CANCEL made after the client aborted a silent server, before that loss is reported, goes to the next only."""
    client, network, clock = connected()
    a = network.last
    clock.advance(WELCOME["deadline"])  # silent past its deadline: the client aborts the connection
    assert a.transport.disconnecting and not a.protocol.lost
    d = client.cancel(7)
    assert network.attempts == [A, B]
    b = network.last
    b.greet()
    a.cut()  # the aborted connection is reported gone only now
    [cancel] = b.sent()
    b.answer(cancel, state="cancelled")
    assert result_of(d) == "cancelled"
    assert [(spec, m.body["job"]) for spec, m in network.seen("CANCEL")] == [(B, 7)]
    b.cut()


def test_client_reconnect_gives_up_after_its_deadline_with_a_clear_error():
    """With every server down, rounds go 0.5, 1 and 2 s apart until the next would start past the deadline."""
    client, network, clock = connected(reconnect_deadline=5.0)
    a = network.last
    d = client.wait([1])
    [watch] = a.sent()
    a.answer(watch, jobs=[status(1, "running")])
    network.down.update({A, B})
    a.cut()
    for at in (0.5, 1.5, 3.5):  # rounds 2, 3 and 4; round 5 would start at 7.5 s
        assert not d.called
        clock.advance(at - clock.seconds())
    assert len(network.attempts) == 1 + 4 * 2
    error = failure_of(d)
    assert isinstance(error, ReconnectFailed) and isinstance(error, ConnectionDropped)
    assert error.rounds == 4 and isinstance(error.last_error, ConnectionRefusedError)
    assert str(error).startswith(
        f"lost the connection to {A} and could not reconnect to {A} or {B} within 5 s (4 rounds over 3.5 s)"
    )
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "rounds, said", [(2, "within 2 rounds (2 rounds"), (0, "reconnecting is off (reconnect_rounds=0)")]
)
def test_client_reconnect_gives_up_after_its_rounds(rounds, said):
    """reconnect_rounds bounds the rounds after a loss; with 0 a lost connection fails wait() at once."""
    client, network, clock = connected(reconnect_rounds=rounds, reconnect_deadline=None)
    d = client.wait([1])
    network.last.sent()
    network.down.update({A, B})
    network.last.cut()
    clock.advance(0.5)
    error = failure_of(d)
    assert isinstance(error, ReconnectFailed) and error.rounds == rounds
    assert said in str(error)
    assert len(network.attempts) == 1 + 2 * rounds
    assert clock.getDelayedCalls() == []


def test_client_server_that_drops_every_request_does_not_reset_the_bound():
    """A server that accepts HELLO but drops each SHOW before its reply wears out one deadline: no retrying for ever."""
    client, network, clock = connected([A], reconnect_deadline=2.0)
    d = client.show(7)
    for at in (0.0, 0.5, 1.5):  # the reconnections: at once, then 0.5 s and 1 s apart
        [show] = network.last.sent()
        assert show.verb == "SHOW"
        network.last.cut()
        clock.advance(at - clock.seconds())
        assert not d.called
        network.last.greet()
    [show] = network.last.sent()
    network.last.cut()  # the next round would start at 3.5 s, past the 2 s deadline
    error = failure_of(d)
    assert isinstance(error, ReconnectFailed)
    assert "within 2 s (3 rounds over 1.5 s)" in str(error)
    assert len(network.lines) == 4
    assert clock.getDelayedCalls() == []


def test_client_reconnect_refused_hello_fails_wait_at_once():
    """A HELLO refused on reconnect (a revoked credential) fails wait() with its error, with no further rounds."""
    client, network, clock = connected()
    d = client.wait([1])
    [watch] = network.last.sent()
    network.last.cut()
    b = network.last
    [hello] = b.sent()
    reply(b.protocol, "ERR", {"rid": hello.rid, "code": "auth_failed", "message": "authentication failed"})
    assert isinstance(failure_of(d), errors.AuthFailed)
    b.cut()
    assert network.attempts == [A, B]
    assert clock.getDelayedCalls() == []


def test_client_calls_share_one_reconnection():
    """Two reads that lose their connection together reconnect once and are both sent again there."""
    client, network, _ = connected()
    show, stats = client.show(7), client.stats()
    network.last.sent()
    network.last.cut()
    assert len(network.lines) == 2
    b = network.last
    b.greet()
    again = {message.verb: message for message in b.sent()}
    assert set(again) == {"SHOW", "STATS"}
    b.answer(again["SHOW"], job=JOB)
    b.answer(again["STATS"], jobs={}, workers=3, slots=0, busy=0, dispatching=True)
    assert result_of(show) == JOB and result_of(stats)["workers"] == 3
    b.cut()


def test_client_close_during_backoff_stops_reconnecting():
    """close() while a wait() backs off between rounds fails the wait with ConnectionDropped and leaves no timer."""
    client, network, clock = connected()
    d = client.wait([1])
    network.last.sent()
    network.down.update({A, B})
    network.last.cut()
    assert not d.called and clock.getDelayedCalls()
    assert result_of(client.close()) is None
    error = failure_of(d)
    assert type(error) is ConnectionDropped and "closed" in str(error)
    assert clock.getDelayedCalls() == []
    assert isinstance(failure_of(client.stats()), ConnectionDropped)
    assert len(network.attempts) == 3


def test_client_close_during_a_pending_connect_stops_reconnecting():
    """close() while a reconnection's TCP connect hangs cancels it and tries no other endpoint."""
    client, network, clock = connected()
    d = client.wait([1])
    network.last.sent()
    network.hanging.add(B)
    network.last.cut()  # the reconnection dials B, which hangs
    assert network.attempts == [A, B] and not d.called
    assert result_of(client.close()) is None
    assert isinstance(failure_of(d), ConnectionDropped)
    clock.advance(60)
    assert network.attempts == [A, B]
    assert clock.getDelayedCalls() == []


def test_client_wait_cancelled_while_reconnecting_stops_the_reconnection():
    """Cancelling the only wait() during backoff fails it with CancelledError and cancels the pending round."""
    client, network, clock = connected()
    d = client.wait([1])
    network.last.sent()
    network.down.update({A, B})
    network.last.cut()
    d.cancel()
    assert isinstance(failure_of(d), defer.CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert len(network.attempts) == 3


# -- the blocking wrapper ---------------------------------------------------------------


class ServingReactor(MemoryReactorClock):
    """Stands in for the reactor thread: runs callFromThread calls at once, then lets a small
    scripted server answer every line on every connection (an answer of None drops the
    connection instead), and reports closed connections."""

    running = True

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.connections = []

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)
        self.serve()

    def serve(self):
        busy = True
        while busy:
            busy = False
            for _, _, factory, _, _ in self.tcpClients[len(self.connections) :]:
                protocol, transport = factory.buildProtocol(None), StringTransport()
                self.connections.append((protocol, transport))
                protocol.makeConnection(transport)
            for protocol, transport in self.connections:
                if not transport.connected:
                    continue
                for message in sent(transport):
                    busy = True
                    answer = self.answer(message)
                    if answer is None:
                        transport.loseConnection()
                        break
                    verb, body = answer
                    reply(protocol, verb, dict(body, rid=message.rid))
                if transport.disconnecting:
                    busy = True
                    transport.connected = False
                    protocol.connectionLost(Failure(ConnectionDone()))


def scripted(message: wire.Message):
    answers = {
        "HELLO": WELCOME,
        "SUBMIT": {"jobs": [10 + n for n in range(len(message.body.get("jobs", [])))]},
        "WATCH": {"jobs": [status(job, "done", 3) for job in message.body.get("jobs", [])]},
        "LIST": {"jobs": [{"id": 10}, {"id": 11}], "next": None},
        "RESULTS": (
            {"results": [{"i": 0, "out": 0}, {"i": 1, "out": 1}], "next": 1}
            if "after" not in message.body
            else {"results": [{"i": 2, "out": 4}], "next": None}
        ),
    }
    if message.verb == "SHOW":
        return "ERR", {"code": "unknown_job", "message": "no such job"}
    return "OK", answers[message.verb]


def test_blocking_client_returns_results_and_raises_errors():
    """BlockingClient returns each reply's payload, raises gridd errors, and closes as a context manager."""
    reactor = ServingReactor(scripted)
    with BlockingClient("tcp:127.0.0.1:7700", "s3cret", reactor=reactor) as grid:
        ids = grid.submit([{"type": "noop", "records": [1]}, {"type": "noop", "records": [2]}])
        assert ids == [10, 11]
        assert grid.wait(ids) == {10: status(10, "done", 3), 11: status(11, "done", 3)}
        assert [job["id"] for job in grid.iter_jobs()] == [10, 11]
        with pytest.raises(errors.UnknownJob):
            grid.show(99)
    [(protocol, transport)] = reactor.connections
    assert not transport.connected
    assert reactor.getDelayedCalls() == []


def test_blocking_client_iter_results_fetches_page_by_page():
    """BlockingClient.iter_results() is a plain generator that asks for the next page with after=next."""
    reactor = ServingReactor(scripted)
    grid = BlockingClient("tcp:127.0.0.1:7700", "s3cret", name="script", reactor=reactor)
    assert [result["i"] for result in grid.iter_results(10)] == [0, 1, 2]
    grid.close()


def test_blocking_client_reconnects_and_resends_reads_but_not_writes():
    """A BlockingClient resends a read after its connection dropped, raises OutcomeUnknown for a write, and goes on."""
    dropped = []

    def flaky(message):
        if message.verb in ("LIST", "SUBMIT") and message.verb not in dropped:
            dropped.append(message.verb)
            return None
        return scripted(message)

    reactor = ServingReactor(flaky)
    with BlockingClient("tcp:127.0.0.1:7700", "s3cret", reactor=reactor) as grid:
        assert [job["id"] for job in grid.iter_jobs()] == [10, 11]
        with pytest.raises(OutcomeUnknown):
            grid.submit([{"type": "noop", "records": [1]}])
        assert grid.wait([10]) == {10: status(10, "done", 3)}
    assert dropped == ["LIST", "SUBMIT"]
    assert len(reactor.connections) == 3
    assert not any(transport.connected for _, transport in reactor.connections)
    assert reactor.getDelayedCalls() == []
