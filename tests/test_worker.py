"""The worker side (gridd.worker): protocol, core, runner, service and tap.

Every test drives a WorkerProtocol over a StringTransport with a task.Clock:
it feeds the server's lines as PROTOCOL.md writes them and asserts the exact
lines the worker sends. No reactor, no sockets, no sleeps.
"""

from __future__ import annotations

import json

import pytest
from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure

from gridd import config, wire
from gridd.jobtypes import Fail, JobType, Noop, RecordError, Sleep, TextStats
from gridd.peer import ConnectionDropped
from gridd.worker import tap
from gridd.worker.core import RESULT_WINDOW, WorkerCore
from gridd.worker.protocol import WorkerProtocol
from gridd.worker.runner import InlineThreads
from gridd.worker.service import RoundRobinEndpoint, WorkerService, make_worker_service, wait_for_handshake


class Picky(JobType):
    """Upper-cases its records, and refuses the record "bad"."""

    name = "picky"
    version = "2.0"

    def process(self, record, params, context):
        if record == "bad":
            raise RecordError("bad record")
        return record.upper()


class Chatty(JobType):
    """Reports progress twice per record, then waits a second."""

    name = "chatty"
    version = "1.0"

    def process(self, record, params, context):
        context.progress(f"starting {context.index}")
        context.progress(f"half-way {context.index}")
        return task.deferLater(context.clock, 1, lambda: context.index)


TYPES = {t.name: t for t in (Noop(), Sleep(), TextStats(), Fail(), Picky(), Chatty())}


class Harness:
    """A worker core and its current connection, on a StringTransport and a Clock."""

    def __init__(self, types=None, slots=2, **core_options):
        self.clock = task.Clock()
        self.drained_idle = []
        self.core = WorkerCore(
            self.clock,
            types or TYPES,
            slots,
            threads=InlineThreads(),
            on_drained_idle=lambda: self.drained_idle.append(True),
            **core_options,
        )
        self.protocol = None
        self.transport = None

    def connect(self):
        """Open a new connection: the worker sends its HELLO."""
        self.protocol = WorkerProtocol(self.clock, "w1", "s3cret", self.core)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        return self

    def welcome(self, beat=30.0, deadline=90.0, kept=(), lost=(), max_line=1048576):
        """Connect, and answer the HELLO (rid 1) as the server does."""
        self.connect()
        self.receive(
            "OK "
            + json.dumps(
                {
                    "rid": 1,
                    "proto": 1,
                    "server": "gridd/0.1.0",
                    "beat": beat,
                    "deadline": deadline,
                    "max_line": max_line,
                    "kept": list(kept),
                    "lost": list(lost),
                },
                separators=(",", ":"),
            )
        )
        self.sent()
        return self

    def receive(self, *lines):
        for line in lines:
            self.protocol.dataReceived(line.encode() + b"\n")

    def sent(self):
        """The lines sent since the last call."""
        lines = self.transport.value().decode().splitlines()
        self.transport.clear()
        return lines

    def disconnect(self):
        self.protocol.connectionLost(Failure(ConnectionDone()))


def job_line(job=1, lease="L1", type="sleep", records=("a", "b", "c"), params=None, attempt=1):
    body = {
        "job": job,
        "lease": lease,
        "type": type,
        "attempt": attempt,
        "params": params or {},
        "total": len(records),
        "records": [{"i": i, "data": data} for i, data in enumerate(records)],
        "timeout": 3600.0,
    }
    return "JOB " + json.dumps(body, separators=(",", ":"))


def timers(clock):
    """Delayed calls on the clock other than the keepalive's."""
    return [c for c in clock.getDelayedCalls() if c.func.__name__ not in ("_send_beat", "_fired")]


# -- handshake and keepalive -------------------------------------------------


def test_hello_lists_slots_types_memory_tags():
    """The HELLO says what the worker offers and that it holds no lease yet."""
    w = Harness(types={"noop": Noop(), "picky": Picky()}, slots=3, memory=512, tags=["gpu", "linux"]).connect()
    assert w.sent() == [
        'HELLO {"proto":1,"role":"worker","name":"w1","token":"s3cret","agent":"gridd/0.1.0",'
        '"slots":3,"types":{"noop":"1.0","picky":"2.0"},"memory":512,"tags":["gpu","linux"],'
        '"holding":[],"rid":1}'
    ]


def test_hello_lists_holding_after_reconnect():
    """A reconnecting worker lists the leases it still holds."""
    w = Harness(types={"sleep": Sleep()}).welcome()
    w.receive(job_line(job=4, lease="L4"), job_line(job=5, lease="L5"))
    w.disconnect()
    w.connect()
    assert w.sent() == [
        'HELLO {"proto":1,"role":"worker","name":"w1","token":"s3cret","agent":"gridd/0.1.0",'
        '"slots":2,"types":{"sleep":"1.0"},"memory":0,"tags":[],'
        '"holding":[{"job":4,"lease":"L4"},{"job":5,"lease":"L5"}],"rid":1}'
    ]


def test_keepalive_beats_every_beat_interval():
    """After the handshake the worker sends BEAT every `beat` seconds."""
    w = Harness().welcome(beat=2.0, deadline=6.0)
    w.clock.advance(1.9)
    assert w.sent() == []
    w.clock.advance(0.1)
    assert w.sent() == ["BEAT"]
    w.receive("BEAT")
    w.clock.advance(2)
    assert w.sent() == ["BEAT"]


def test_keepalive_server_silent_past_deadline_aborts():
    """A server silent for `deadline` seconds gets its connection aborted."""
    w = Harness().welcome(beat=2.0, deadline=6.0)
    w.clock.advance(5)
    w.receive("BEAT")
    w.clock.advance(5.9)
    assert not w.transport.disconnected
    w.clock.advance(0.1)
    assert w.transport.disconnected


def test_keepalive_deadline_judged_late_after_a_stall_waits_one_beat():
    """A deadline timer that ran late (the worker was stalled) gives the server one beat to be heard."""
    w = Harness().welcome(beat=2.0, deadline=6.0)
    w.clock.advance(20)  # one step: the worker process was not running
    assert not w.transport.disconnected
    w.receive("BEAT")  # what the server sent meanwhile, read now
    w.clock.advance(5.9)
    assert not w.transport.disconnected
    w.clock.advance(0.1)
    assert w.transport.disconnected


def test_keepalive_stall_then_nothing_from_the_server_aborts_one_beat_later():
    """After a stall, a server that stays silent is dropped one beat later."""
    w = Harness().welcome(beat=2.0, deadline=6.0)
    w.clock.advance(20)
    w.clock.advance(1.9)
    assert not w.transport.disconnected
    w.clock.advance(0.1)
    assert w.transport.disconnected


def test_request_after_this_side_aborted_is_not_written():
    """Once the worker aborted a silent server's connection, a request fails at once and writes nothing."""
    w = Harness().welcome(beat=2.0, deadline=6.0)
    w.clock.advance(6.0)
    assert w.transport.disconnected and not w.protocol._lost
    w.sent()  # the beats before the abort
    failures = []
    w.protocol.request("SLOTS", {"slots": 1}).addErrback(failures.append)
    assert failures and failures[0].check(ConnectionDropped)
    assert w.sent() == []


def test_request_after_the_connection_is_lost_fails_at_once():
    """A request made on a connection that is gone fails with ConnectionDropped instead of waiting for ever."""
    w = Harness().welcome()
    w.disconnect()
    failures = []
    w.protocol.request("SLOTS", {"slots": 1}).addErrback(failures.append)
    [failure] = failures
    assert failure.check(ConnectionDropped)
    assert w.sent() == [] and w.protocol._pending == {}


def test_ping_is_answered_with_pong():
    """PING from the server is answered at once with PONG and the same n."""
    w = Harness().welcome()
    w.receive('PING {"n":7}')
    assert w.sent() == ['PONG {"n":7}']


# -- running jobs ------------------------------------------------------------


def test_job_sleep_streams_one_result_per_record():
    """Each record's result is sent as it is produced; the last rides in DONE."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    assert w.sent() == []
    w.clock.advance(1)
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    w.receive('OK {"rid":2,"accepted":1}')
    w.clock.advance(1)
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":1,"out":null}],"rid":3}']
    w.receive('OK {"rid":3,"accepted":2}')
    w.clock.advance(1)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":2,"out":null}],"rid":4}']
    w.receive('OK {"rid":4}')
    assert w.core.holdings == {}


def test_job_noop_single_record_sends_one_done():
    """A one-record noop job is answered with a single DONE carrying its result."""
    w = Harness().welcome()
    w.receive(job_line(type="noop", records=["a"]))
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    assert timers(w.clock) == []


def test_job_results_of_one_turn_are_coalesced():
    """Results produced in the same reactor turn go out in one message."""
    w = Harness().welcome()
    w.receive(job_line(type="picky", records=["x", "y", "z"]))
    assert w.sent() == [
        'DONE {"job":1,"lease":"L1","results":[{"i":0,"out":"X"},{"i":1,"out":"Y"},{"i":2,"out":"Z"}],"rid":2}'
    ]


def test_job_done_waits_for_results_in_flight():
    """DONE is sent only once earlier RESULTs are acknowledged, carrying the rest."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.clock.advance(1)
    w.clock.advance(1)
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    w.clock.advance(1)
    assert w.sent() == []
    w.receive('OK {"rid":2,"accepted":1}')
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":1,"out":null},{"i":2,"out":null}],"rid":3}']


def test_job_results_that_trickle_in_wait_for_the_reply_in_flight_and_go_together():
    """A few small results do not each make a request: they wait for the RESULT in flight, then go in one."""
    w = Harness().welcome()
    w.receive(job_line(records=["r"] * 6, params={"seconds": 1}))
    for _ in range(4):
        w.clock.advance(1)
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    w.receive('OK {"rid":2,"accepted":1}')
    assert w.sent() == [
        'RESULT {"job":1,"lease":"L1","results":[{"i":1,"out":null},{"i":2,"out":null},{"i":3,"out":null}],"rid":3}'
    ]


def test_job_results_fill_the_window_once_each_request_would_carry_a_share_of_the_line():
    """Past the first request, one goes for each budget / RESULT_WINDOW bytes waiting, up to RESULT_WINDOW."""
    from gridd.worker.core import ENVELOPE_BYTES

    share = 400
    w = Harness().welcome(max_line=ENVELOPE_BYTES + share * RESULT_WINDOW)
    w.receive(job_line(records=["r"] * 80, params={"seconds": 1}))
    sent = []
    for _ in range(79):
        w.clock.advance(1)
        sent += [line for line in w.sent() if line != "BEAT"]
    assert len(sent) == RESULT_WINDOW, "never more than RESULT_WINDOW unanswered"
    sizes = [len(json.loads(line.split(" ", 1)[1])["results"]) for line in sent]
    assert sizes[0] == 1, "the first goes at once"
    each = len('{"i":10,"out":null}') + 1
    assert all(n * each > share for n in sizes[1:]), sizes
    for n in range(RESULT_WINDOW):
        w.receive(f'OK {{"rid":{2 + n},"accepted":1}}')
    lines = [line for line in w.sent() if line != "BEAT"]
    assert lines and json.loads(lines[0].split(" ", 1)[1])["results"][0]["i"] == sum(sizes), "the rest follow"


def test_job_record_error_is_an_error_result():
    """RecordError gives that record an error result and the job goes on."""
    w = Harness().welcome()
    w.receive(job_line(type="picky", records=["ok", "bad", "fine"]))
    assert w.sent() == [
        'DONE {"job":1,"lease":"L1","results":[{"i":0,"out":"OK"},{"i":1,"error":"bad record"},'
        '{"i":2,"out":"FINE"}],"rid":2}'
    ]


def test_job_handler_exception_sends_fail_with_retry():
    """Any other exception fails the attempt: results so far are sent, then FAIL with retry."""
    w = Harness().welcome()
    w.receive(job_line(type="fail", records=["a", "b", "c"], params={"at": 1}))
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    w.receive('OK {"rid":2,"accepted":1}')
    assert w.sent() == [
        'FAIL {"job":1,"lease":"L1","error":"DeliberateFailure: attempt 1 fails at record 1, as asked",'
        '"retry":true,"rid":3}'
    ]
    w.receive('OK {"rid":3,"state":"queued","retry_in":1.0}')
    assert w.core.holdings == {}


def test_job_output_not_json_fails_the_attempt():
    """A handler output that is not a JSON value fails the attempt."""

    class Bad(JobType):
        name = "bad"

        def process(self, record, params, context):
            return {1, 2}

    w = Harness(types={"bad": Bad()}).welcome()
    w.receive(job_line(type="bad", records=["a"]))
    (line,) = w.sent()
    assert line.startswith('FAIL {"job":1,"lease":"L1","error":"TypeError: the job type\'s output is not a JSON value')


def test_job_output_over_the_line_limit_becomes_an_error_result():
    """An output too large for the server's line limit is reported as that record's error."""

    class Big(JobType):
        name = "big"

        def process(self, record, params, context):
            return "x" * record

    w = Harness(types={"big": Big()}).connect()
    w.receive('OK {"rid":1,"proto":1,"beat":30.0,"deadline":90.0,"max_line":2048,"kept":[],"lost":[]}')
    w.sent()
    w.receive(job_line(type="big", records=[10, 5000]))
    assert w.sent() == [
        'DONE {"job":1,"lease":"L1","results":[{"i":0,"out":"xxxxxxxxxx"},'
        '{"i":1,"error":"output of 5017 bytes exceeds the server\'s line limit"}],"rid":2}'
    ]


def test_job_threaded_type_runs_through_the_injected_threads():
    """A threaded type runs through the worker's thread runner and reports its output."""
    w = Harness().welcome()
    w.receive(job_line(type="textstats", records=[{"text": "to be or not to be", "id": 9}]))
    (line,) = w.sent()
    assert line.startswith('DONE {"job":1,"lease":"L1","results":[{"i":0,"out":{"words":6,"lines":1,')
    assert '"top":[["be",2],["to",2],["not",1],["or",1]]' in line and '"id":9' in line


def test_job_unknown_type_fails_the_attempt():
    """A job of a type this worker does not have is failed with retry, for another worker."""
    w = Harness().welcome()
    w.receive(job_line(type="resize", records=["a"]))
    assert w.sent() == ['FAIL {"job":1,"lease":"L1","error":"worker has no job type \'resize\'","retry":true,"rid":2}']


def test_job_progress_is_sent_one_at_a_time():
    """PROGRESS notes go out one request at a time; the latest note waits for the reply."""
    w = Harness().welcome()
    w.receive(job_line(type="chatty", records=["a"]))
    assert w.sent() == ['PROGRESS {"job":1,"lease":"L1","note":"starting 0","rid":2}']
    w.receive('OK {"rid":2}')
    assert w.sent() == ['PROGRESS {"job":1,"lease":"L1","note":"half-way 0","rid":3}']
    w.clock.advance(1)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":0,"out":0}],"rid":4}']


# -- the server ends leases ----------------------------------------------------


def test_revoke_stops_the_job_and_drops_its_results():
    """After REVOKE the job stops and none of its results is ever sent."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.clock.advance(1)
    w.sent()
    w.receive('REVOKE {"job":1,"lease":"L1","reason":"cancelled"}')
    assert w.core.holdings == {} and timers(w.clock) == []
    w.receive('OK {"rid":2,"accepted":1}')
    w.clock.advance(10)
    assert w.sent() == []


def test_revoke_of_unknown_lease_is_ignored():
    """A REVOKE naming a lease the worker does not hold changes nothing."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.receive('REVOKE {"job":1,"lease":"L0","reason":"cancelled"}')
    assert list(w.core.holdings) == ["L1"]


def test_stale_lease_reply_stops_the_job_and_logs():
    """ERR stale_lease on a RESULT stops the job, drops its results and logs why."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.clock.advance(1)
    w.sent()
    with capturedLogs() as events:
        w.receive('ERR {"rid":2,"code":"stale_lease","message":"lease is expired, revoked or not yours"}')
    assert "lease L1 of job 1 refused by server: stale_lease" in [formatEvent(e) for e in events]
    assert w.core.holdings == {} and timers(w.clock) == []
    w.clock.advance(10)
    assert w.sent() == []


def test_stale_lease_reply_to_done_drops_the_lease():
    """ERR stale_lease on DONE drops the lease; nothing more is sent for it."""
    w = Harness().welcome()
    w.receive(job_line(type="noop", records=["a"]))
    w.sent()
    w.receive('ERR {"rid":2,"code":"stale_lease","message":"no"}')
    assert w.core.holdings == {}
    assert w.sent() == []


def test_duplicate_result_reply_resends_the_others():
    """ERR duplicate_result drops the named records and sends the rest again."""
    w = Harness().welcome()
    w.receive(job_line(type="picky", records=["x", "y"]))
    w.sent()
    w.receive('ERR {"rid":2,"code":"duplicate_result","message":"dup","records":[0]}')
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":1,"out":"Y"}],"rid":3}']


@pytest.mark.parametrize(
    "err",
    [
        '{"rid":2,"code":"unavailable","message":"store down"}',
        '{"rid":2,"code":"too_many","message":"more than 256 requests await their replies","limit":256}',
    ],
)
def test_unavailable_reply_retries_later(err):
    """ERR unavailable or too_many (a connection limit) means nothing was stored: the results are sent again later."""
    w = Harness().welcome()
    w.receive(job_line(type="picky", records=["x"]))
    w.sent()
    w.receive("ERR " + err)
    assert w.sent() == []
    w.clock.advance(1)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":0,"out":"X"}],"rid":3}']


def test_commit_unknown_reply_sends_again_and_a_duplicate_then_drops_what_was_stored():
    """ERR commit_unknown: the results may be stored; sent again later, duplicate_result says which were."""
    w = Harness().welcome()
    w.receive(job_line(type="picky", records=["x", "y"]))
    w.sent()
    w.receive('ERR {"rid":2,"code":"commit_unknown","message":"lost during COMMIT"}')
    assert w.sent() == []
    w.clock.advance(1)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":0,"out":"X"},{"i":1,"out":"Y"}],"rid":3}']
    w.receive('ERR {"rid":3,"code":"duplicate_result","message":"dup","records":[0,1]}')
    assert w.sent() == ['DONE {"job":1,"lease":"L1","rid":4}']


# -- reconnecting ----------------------------------------------------------------


def test_reconnect_resends_only_todo_results():
    """After the HELLO reply keeps a lease, only the results it lists in todo are sent."""
    w = Harness().welcome()
    w.receive(job_line(records=["a", "b", "c", "d"], params={"seconds": 1}))
    w.clock.advance(1)
    w.sent()
    w.disconnect()
    w.clock.advance(1)
    w.clock.advance(1)
    w.connect()
    assert json.loads(w.sent()[0][len("HELLO ") :])["holding"] == [{"job": 1, "lease": "L1"}]
    w.receive(
        'OK {"rid":1,"proto":1,"server":"gridd/0.1.0","beat":30.0,"deadline":90.0,"max_line":1048576,'
        '"kept":[{"job":1,"lease":"L1","todo":[1,2,3]}],"lost":[]}'
    )
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":1,"out":null},{"i":2,"out":null}],"rid":2}']
    w.receive('OK {"rid":2,"accepted":3}')
    w.clock.advance(1)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":3,"out":null}],"rid":3}']


def test_reconnect_todo_excludes_results_the_server_has():
    """A result the server accepted before the drop (not in todo) is discarded, not resent."""
    w = Harness().welcome()
    w.receive(job_line(type="picky", records=["x", "y"]))
    w.sent()
    w.disconnect()
    w.connect()
    w.sent()
    w.receive(
        'OK {"rid":1,"proto":1,"server":"gridd/0.1.0","beat":30.0,"deadline":90.0,"max_line":1048576,'
        '"kept":[{"job":1,"lease":"L1","todo":[1]}],"lost":[]}'
    )
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":1,"out":"Y"}],"rid":2}']


def test_reconnect_lost_lease_stops_the_job():
    """A lease the HELLO reply lists in `lost` is stopped and its results dropped."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.clock.advance(1)
    w.disconnect()
    w.welcome(lost=[{"job": 1, "lease": "L1", "reason": "expired"}])
    assert w.core.holdings == {} and timers(w.clock) == []
    w.clock.advance(10)
    assert w.sent() == []


def test_reconnect_resends_done_whose_reply_was_lost():
    """A DONE whose reply never came is sent again when the lease is kept."""
    w = Harness().welcome()
    w.receive(job_line(type="noop", records=["a"]))
    w.sent()
    w.disconnect()
    w.connect()
    w.sent()
    w.receive(
        'OK {"rid":1,"proto":1,"server":"gridd/0.1.0","beat":30.0,"deadline":90.0,"max_line":1048576,'
        '"kept":[{"job":1,"lease":"L1","todo":[]}],"lost":[]}'
    )
    assert w.sent() == ['DONE {"job":1,"lease":"L1","rid":2}']


# -- drain and shutdown ----------------------------------------------------------


def test_drain_exits_once_running_jobs_are_done():
    """DRAIN with jobs running waits for their DONE to be acknowledged, then reports idle."""
    w = Harness().welcome()
    w.receive(job_line(records=["a"], params={"seconds": 1}))
    w.receive('DRAIN {"drain":true}')
    assert w.core.drained and w.drained_idle == []
    w.clock.advance(1)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    assert w.drained_idle == []
    w.receive('OK {"rid":2}')
    assert w.drained_idle == [True]


def test_drain_when_idle_reports_at_once_and_undrain_clears():
    """DRAIN on an idle worker reports idle at once; DRAIN false undoes the drain."""
    w = Harness().welcome()
    w.receive('DRAIN {"drain":true}')
    assert w.drained_idle == [True]
    w.receive('DRAIN {"drain":false}')
    assert not w.core.drained


def test_return_all_returns_running_jobs_after_their_results():
    """Shutting down sends the results made so far, then RETURN, and fires once acknowledged."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.clock.advance(1)
    assert len(w.sent()) == 1
    d = w.core.return_all("worker is shutting down")
    assert timers(w.clock) == [] and not d.called
    w.receive('OK {"rid":2,"accepted":1}')
    assert w.sent() == ['RETURN {"job":1,"lease":"L1","reason":"worker is shutting down","rid":3}']
    w.receive('OK {"rid":3}')
    assert d.called and w.core.holdings == {}


def test_return_all_of_a_drained_worker_does_not_exit_again():
    """A drained worker that is being stopped does not report idle a second time."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}), 'DRAIN {"drain":true}')
    w.core.return_all("worker is shutting down")
    w.receive('OK {"rid":2}')
    assert w.core.holdings == {} and w.drained_idle == []


def test_return_all_while_disconnected_fires_at_once():
    """Without a connection nothing can be returned: return_all fires at once."""
    w = Harness().welcome()
    w.receive(job_line(params={"seconds": 1}))
    w.disconnect()
    assert w.core.return_all("worker is shutting down").called


def test_job_while_returning_is_returned_at_once():
    """A JOB arriving while the worker shuts down is given back without running."""
    w = Harness().welcome()
    w.core.return_all("worker is shutting down")
    w.receive(job_line(type="noop", records=["a"]))
    assert w.sent() == ['RETURN {"job":1,"lease":"L1","reason":"worker is shutting down","rid":2}']


# -- service and tap ---------------------------------------------------------------


class FakeEndpoint:
    """Connects a protocol to a StringTransport at once, keeping both."""

    def __init__(self):
        self.connections = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


def test_round_robin_endpoint_tries_each_in_turn():
    """Each connection attempt goes to the next endpoint."""
    a, b = FakeEndpoint(), FakeEndpoint()
    endpoint = RoundRobinEndpoint([a, b])
    for _ in range(3):
        endpoint.connect(Factory.forProtocol(Protocol))
    assert (len(a.connections), len(b.connections)) == (2, 1)


def test_make_worker_service_builds_tree_without_connecting():
    """The service tree is built in order and nothing connects or waits until it starts."""
    clock = task.Clock()
    service = make_worker_service(clock, ["tcp:127.0.0.1:7700"], name="w1", token="t", job_types=TYPES, slots=2)
    assert isinstance(service, WorkerService) and not service.running
    assert [child.name for child in service] == ["handlers", "guest", "connection"]
    assert isinstance(service.getServiceNamed("connection"), ClientService)
    assert clock.getDelayedCalls() == []


def test_make_worker_service_in_thread_mode_runs_handlers_in_a_thread_pool():
    """``handlers="threads"`` puts a thread pool where the handler processes would be."""
    service = make_worker_service(
        task.Clock(), ["tcp:127.0.0.1:7700"], name="w1", token="t", job_types=TYPES, slots=2, handlers="threads"
    )
    assert [child.name for child in service] == ["threads", "guest", "connection"]


def test_make_worker_service_refuses_an_unknown_handler_mode():
    with pytest.raises(ValueError, match="handlers must be one of processes, threads"):
        make_worker_service(task.Clock(), ["tcp:127.0.0.1:7700"], name="w1", token="t", job_types=TYPES, slots=2,
                            handlers="fibres")  # fmt: skip


def test_worker_service_connected_only_after_handshake():
    """when_connected fires once the HELLO is answered; stopping disconnects."""
    clock, endpoint = task.Clock(), FakeEndpoint()
    service = make_worker_service(
        clock, [endpoint], name="w1", token="t", job_types={"noop": Noop()}, slots=1,
        handlers="threads", threads=InlineThreads(),
    )
    service.startService()
    connected = service.when_connected()
    ((proxy, transport),) = endpoint.connections
    assert transport.value().startswith(b"HELLO ")
    assert not connected.called
    proxy.dataReceived(b'OK {"rid":1,"proto":1,"beat":2.0,"deadline":6.0,"max_line":1048576,"kept":[],"lost":[]}\n')
    assert connected.called and connected.result.core is service.core
    stopped = []
    service.stopService().addBoth(stopped.append)
    assert transport.disconnecting and stopped == []
    proxy.connectionLost(Failure(ConnectionDone()))
    assert stopped == [None] and not service.running


def test_wait_for_handshake_aborts_a_server_that_never_answers():
    """A connection whose HELLO gets no reply within the timeout is aborted."""
    clock, w = task.Clock(), Harness().connect()
    ready = wait_for_handshake(clock, timeout=30)(w.protocol)
    clock.advance(29)
    assert not w.transport.disconnected
    clock.advance(1)
    assert w.transport.disconnected
    failures = []
    ready.addErrback(failures.append)
    w.disconnect()
    assert len(failures) == 1


def test_tap_options_defaults(tmp_path):
    """Without options the worker connects to the local server, named after the host."""
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    options = tap.Options()
    options.parseOptions(["--secret-file", str(secret)])
    assert options["servers"] == [config.DEFAULT_SERVER]
    assert options["token"] == "s3cret"
    assert options["slots"] >= 1 and options["name"]
    assert {"noop", "sleep", "textstats", "fail"} <= set(options["job_types"])


def test_tap_options_repeatable_server_and_lists(tmp_path):
    """--server repeats; --types and --tags are comma lists."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    options = tap.Options()
    options.parseOptions(
        ["--secret-file", str(secret), "--server", "tcp:127.0.0.1:1", "--server", "tcp:127.0.0.1:2"]
        + ["--types", "noop, sleep", "--tags", "gpu,,linux", "--slots", "0", "--exit-when-drained"]
    )
    assert options["servers"] == ["tcp:127.0.0.1:1", "tcp:127.0.0.1:2"]
    assert sorted(options["job_types"]) == ["noop", "sleep"]
    assert options["tags"] == ["gpu", "linux"] and options["slots"] == 0 and options["exit-when-drained"]


def test_tap_options_refuse_bad_values(tmp_path):
    """Unknown types, a missing secret or negative slots are usage errors."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    for argv in (
        ["--secret-file", str(secret), "--types", "resize"],
        ["--secret-file", str(tmp_path / "missing")],
        ["--secret-file", str(secret), "--slots", "-1"],
    ):
        with pytest.raises(usage.UsageError):
            tap.Options().parseOptions(argv)


def test_tap_handlers_and_limits_reach_the_service(tmp_path):
    """--handlers picks processes or threads; --limits, per type and worker-wide, shape each attempt's limits."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    options = tap.Options()
    options.parseOptions(
        ["--secret-file", str(secret), "--memory", "800", "--limits", "cpu=60", "--limits", "noop:memory=100,files=32"]
    )
    assert options["handlers"] == "processes"
    assert options["limits"].for_attempt("noop") == {"cpu": 60, "memory": 100, "files": 32}
    assert options["limits"].for_attempt("other") == {"cpu": 60, "memory": 800}
    assert [child.name for child in tap.makeService(options, reactor=task.Clock())] == ["handlers", "guest", "connection"]
    threaded = tap.Options()
    threaded.parseOptions(["--secret-file", str(secret), "--handlers", "threads"])
    assert [child.name for child in tap.makeService(threaded, reactor=task.Clock())] == ["threads", "guest", "connection"]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--handlers", "fibres"], "--handlers must be one of processes, threads"),
        (["--limits", "disk=3"], "--limits: unknown limit 'disk'"),
        (["--limits", "cpu=1", "--limits", "cpu=2"], "--limits: limit 'cpu' for every type is given twice"),
    ],
)
def test_tap_refuses_bad_handlers_or_limits_saying_why(tmp_path, argv, words):
    secret = tmp_path / "secret"
    secret.write_text("x")
    with pytest.raises(usage.UsageError, match=words):
        tap.Options().parseOptions(["--secret-file", str(secret), *argv])


def test_tap_make_service_does_not_connect(tmp_path):
    """makeService returns the worker tree, not started."""
    secret = tmp_path / "secret"
    secret.write_text("x")
    options = tap.Options()
    options.parseOptions(["--secret-file", str(secret), "--server", "tcp:127.0.0.1:7700"])
    clock = task.Clock()
    service = tap.makeService(options, reactor=clock)
    assert isinstance(service, WorkerService) and not service.running
    assert clock.getDelayedCalls() == []


def test_make_worker_service_warns_about_remote_plain_tcp():
    """A plain TCP server beyond loopback is warned about; loopback is not."""
    with capturedLogs() as events:
        make_worker_service(task.Clock(), ["tcp:127.0.0.1:7700"], name="w", token="t", job_types=TYPES, slots=1)
    assert events == []
    with capturedLogs() as events:
        make_worker_service(task.Clock(), ["tcp:10.0.0.5:7700"], name="w", token="t", job_types=TYPES, slots=1)
    assert "unencrypted" in formatEvent(events[0])


def test_default_secret_file_prefers_local_data_dir(tmp_path, monkeypatch):
    """./gridd-data/secret is used when it exists, else ~/.gridd/secret, unless GRIDD_DATA is set."""
    monkeypatch.delenv("GRIDD_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert config.default_secret_file() == tmp_path / "home" / ".gridd" / "secret"
    (tmp_path / "gridd-data").mkdir()
    (tmp_path / "gridd-data" / "secret").write_text("x")
    assert config.default_secret_file().resolve() == tmp_path / "gridd-data" / "secret"
    monkeypatch.setenv("GRIDD_DATA", str(tmp_path / "elsewhere"))
    assert config.default_secret_file() == tmp_path / "elsewhere" / "secret"


def test_hello_lists_as_many_held_leases_as_fit_the_pre_hello_line_limit():
    """A worker holding more leases than a HELLO line can carry lists the oldest that fit, and its HELLO fits."""
    w = Harness()
    protocol = WorkerProtocol(w.clock, "w1", "s3cret", w.core)
    body = {"proto": 1, "role": "worker", "name": "w1", "token": "s3cret", "agent": "gridd/0.1.0", "slots": 4000,
            "types": {"noop": "1.0"}, "memory": 0, "tags": []}  # fmt: skip
    holding = [{"job": 10**9 + n, "lease": f"{n:016x}"} for n in range(4000)]
    fitted = protocol.fit_hello({**body, "holding": holding})
    line = wire.encode("HELLO", {**fitted, "rid": 1})
    assert len(line) - 1 <= wire.PRE_HELLO_MAX_LINE
    assert 1000 < len(fitted["holding"]) < 4000 and fitted["holding"] == holding[: len(fitted["holding"])]
    few = holding[:10]
    assert protocol.fit_hello({**body, "holding": few})["holding"] == few


def test_abort_detaches_the_core_at_once():
    """Aborting a silent server's connection detaches the core before connectionLost, so it sends nothing more there."""
    w = Harness().welcome(beat=2.0, deadline=6.0)
    assert w.core.connected
    w.clock.advance(6.0)
    assert w.transport.disconnected and not w.protocol._lost
    assert not w.core.connected
