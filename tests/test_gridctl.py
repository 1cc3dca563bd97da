"""Tests of gridctl: arguments, input checking, and what each command prints.

Commands run the real ``gridd.client.Client``, whose connections are
``iosim`` pairs with a small fake server: a line receiver that checks every
client line against the spec's field table (``gridd.wire``) and answers from
a table of handlers. No reactor, no sockets, no sleeps: ``Grid.flush()``
moves the bytes, and the command's Deferred has fired by the time we look.
"""

from __future__ import annotations

import io
import json

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.test import iosim

from gridd import client, errors, wire
from gridd.cli import gridctl

WELCOME = {"proto": 1, "server": "gridd/0.1.0", "beat": 2.0, "deadline": 6.0, "max_line": 1_048_576}


class FakeServer(LineOnlyReceiver):
    """The server end of the protocol, reduced to: check the line, answer from a handler.

    A handler returns the OK body, raises a GriddError for ERR, or returns
    None to leave the request unanswered.
    """

    delimiter = b"\n"
    MAX_LENGTH = WELCOME["max_line"]

    def __init__(self, handlers, endpoint: str):
        self.handlers = handlers
        self.endpoint = endpoint
        self.received: list[wire.Message] = []

    def lineReceived(self, line):
        message = wire.parse_line(line)  # raises, failing the test, if the client broke the spec
        self.received.append(message)
        try:
            answer = self.handlers[message.verb](message.body)
        except errors.GriddError as e:
            self.push("ERR", e.to_body(message.rid))
        else:
            if answer is not None:
                self.push("OK", dict(answer, rid=message.rid))

    def push(self, verb, body):
        self.transport.write(wire.encode(verb, body))

    def requests(self, verb):
        return [message.body for message in self.received if message.verb == verb]


class Grid:
    """What gridctl connects to in these tests: ``connect`` makes a real Client whose every
    connection is an iosim pair with a new FakeServer answering from the shared ``handlers``.
    Endpoints in ``down`` refuse connections."""

    def __init__(self, **handlers):
        self.handlers = {"HELLO": lambda body: WELCOME, **handlers}
        self.servers: list[FakeServer] = []
        self.pumps: list[iosim.IOPump] = []
        self.down: set[str] = set()
        self.clock = Clock()
        self.connected_as = None

    @property
    def server(self) -> FakeServer:
        """The server end of the newest connection."""
        return self.servers[-1]

    def connect(self, reactor, endpoints, token, name):
        self.connected_as = (endpoints, token, name)
        return client.connect(self.clock, endpoints, token, name, connector=self._connector)

    def _connector(self, endpoint: str, protocol: client.ClientProtocol) -> defer.Deferred:
        if endpoint in self.down:
            return defer.fail(ConnectionRefusedError(endpoint))
        server = FakeServer(self.handlers, endpoint)
        self.servers.append(server)
        server_io, client_io = iosim.FakeTransport(server, isServer=True), iosim.FakeTransport(protocol, isServer=False)
        self.pumps.append(iosim.connect(server, server_io, protocol, client_io, clock=self.clock))
        assert protocol.welcome is not None  # the greeting flush carried the handshake
        return defer.succeed(protocol)

    def flush(self):
        while any([pump.flush() for pump in list(self.pumps)]):
            pass  # a connection lost in one pump may open another


class Outcome:
    """A gridctl command started against a Grid: its Deferred and what it printed."""

    def __init__(self, grid, argv, tmp_path, stdin=b""):
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        self.args = gridctl.build_parser().parse_args(["--secret-file", str(secret), *argv])
        gridctl.prepare(self.args, io.BytesIO(stdin))
        self.out, self.err = io.StringIO(), io.StringIO()
        self.grid = grid
        self.done = defer.ensureDeferred(gridctl.run(None, self.args, connect=grid.connect, out=self.out, err=self.err))
        grid.flush()

    @property
    def code(self) -> int:
        results = []
        self.done.addBoth(results.append)
        assert results, "the command has not finished"
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()

    def json_lines(self) -> list:
        return [json.loads(line) for line in self.lines()]


def records_file(tmp_path, text: str):
    path = tmp_path / "records.jsonl"
    path.write_text(text)
    return str(path)


def submitted_ids(body):
    return {"jobs": list(range(1, len(body["jobs"]) + 1))}


# -- main(): checks before any connection ----------------------------------------------


def forbid_react(monkeypatch):
    def react(*args):
        raise AssertionError("gridctl started the reactor")

    monkeypatch.setattr(gridctl, "react", react)


def test_main_bad_records_line_exits_2_naming_the_line(tmp_path, monkeypatch, capsys):
    """A line that is not JSON stops gridctl with status 2, its line number, and no connection."""
    forbid_react(monkeypatch)
    (tmp_path / "secret").write_text("s3cret")
    path = records_file(tmp_path, '{"a": 1}\n\n[2, 3]\n{"broken": \n')
    with pytest.raises(SystemExit) as exit:
        gridctl.main(["--secret-file", str(tmp_path / "secret"), "submit", "--type", "noop", path])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (f"gridctl: error: {path}, line 4: not valid JSON: Expecting value (column 11)\n")


def test_main_missing_secret_file_exits_2(tmp_path, monkeypatch, capsys):
    """An unreadable secret file is reported in one line with status 2, before connecting."""
    forbid_react(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        gridctl.main(["--secret-file", str(tmp_path / "nope"), "stats"])
    assert exit.value.code == 2
    assert (
        capsys.readouterr().err
        == f"gridctl: error: cannot read the secret file {tmp_path / 'nope'}: No such file or directory\n"
    )


@pytest.mark.parametrize(
    "argv, complaint",
    [
        ([], "required: COMMAND"),
        (["show", "seven"], "'seven' is not a job id"),
        (["submit", "-", "--type", "t", "--params", "[1]"], "must be a JSON object"),
        (["submit", "-", "--type", "t", "--records-per-job", "0"], "'0' is not a whole number >= 1"),
        (["submit", "-", "--type", "t", "--timeout", "nan"], "'nan' is not a positive number"),
        (["dispatch", "maybe"], "invalid choice: 'maybe'"),
        (["list", "--server", "tcp:x:1"], "unrecognized arguments: --server"),
    ],
)
def test_main_bad_arguments_exit_2(argv, complaint, monkeypatch, capsys):
    """Arguments argparse cannot accept exit with status 2 and say what is wrong."""
    forbid_react(monkeypatch)
    with pytest.raises(SystemExit) as exit:
        gridctl.main(argv)
    assert exit.value.code == 2
    assert complaint in capsys.readouterr().err


def test_parser_server_defaults_to_environment(monkeypatch):
    """--server (repeatable) wins; else $GRIDD_SERVER, space-separated; else tcp:127.0.0.1:7700."""

    def servers(*argv):
        return gridctl.server_endpoints(gridctl.build_parser().parse_args([*argv, "stats"]))

    monkeypatch.delenv("GRIDD_SERVER", raising=False)
    assert servers() == ["tcp:127.0.0.1:7700"]
    monkeypatch.setenv("GRIDD_SERVER", "tls:grid:7701:trustRoots=/etc/gridd/ca tls:grid2:7701:trustRoots=/etc/gridd/ca")
    assert servers() == ["tls:grid:7701:trustRoots=/etc/gridd/ca", "tls:grid2:7701:trustRoots=/etc/gridd/ca"]
    assert servers("--server", "tcp:a:1", "--server", "tcp:b:2") == ["tcp:a:1", "tcp:b:2"]


# -- records and job specs --------------------------------------------------------------


def test_read_records_skips_blank_lines():
    """Each non-blank line is one record, of any JSON type."""
    lines = io.BytesIO(b'{"name": "Ada"}\n\n"text"\r\n42\nnull\n')
    assert gridctl.read_records(lines, "in") == [{"name": "Ada"}, "text", 42, None]


@pytest.mark.parametrize(
    "data, complaint",
    [
        (b"1\nNaN\n", "stdin, line 2: not valid JSON: NaN is not JSON"),
        (b'"caf\xe9"\n', "stdin, line 1: not UTF-8 text"),
        (b"\n  \n", "stdin: no records"),
    ],
)
def test_read_records_bad_input_names_the_problem(data, complaint):
    """Non-JSON constants, non-UTF-8 bytes and empty input are refused with a precise message."""
    with pytest.raises(gridctl.InputError, match=complaint):
        gridctl.read_records(io.BytesIO(data), "stdin")


def test_build_jobs_splits_records_and_carries_options():
    """--records-per-job splits the records into numbered jobs that share every option."""
    args = gridctl.build_parser().parse_args(
        ["submit", "/data/names.jsonl", "--type", "match", "--priority", "5", "--requires-memory", "512",
         "--tag", "gpu", "--tag", "linux", "--min-version", "1.2", "--retries", "0", "--timeout", "60",
         "--params", '{"threshold": 0.9}', "--records-per-job", "2"]
    )  # fmt: skip
    jobs = gridctl.build_jobs(args, ["a", "b", "c"])
    shared = {
        "type": "match",
        "priority": 5,
        "requires": {"memory": 512, "tags": ["gpu", "linux"], "version": "1.2"},
        "retries": 0,
        "timeout": 60.0,
        "params": {"threshold": 0.9},
    }
    assert jobs == [
        dict(shared, records=["a", "b"], name="names.jsonl [1/2]"),
        dict(shared, records=["c"], name="names.jsonl [2/2]"),
    ]


def test_build_jobs_defaults_to_one_job_with_only_required_fields():
    """Without options, all records from stdin make one job with just type and records."""
    args = gridctl.build_parser().parse_args(["submit", "-", "--type", "noop"])
    assert gridctl.build_jobs(args, [1, 2, 3]) == [{"type": "noop", "records": [1, 2, 3]}]


# -- submit ----------------------------------------------------------------------------


def test_submit_prints_ids_one_per_line(tmp_path):
    """submit sends the jobs in one SUBMIT and prints the new ids, one per line."""
    grid = Grid(SUBMIT=submitted_ids)
    path = records_file(tmp_path, "1\n2\n3\n")
    outcome = Outcome(grid, ["--name", "cron", "submit", path, "--type", "noop", "--records-per-job", "2"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == ["1", "2"]
    [submit] = grid.server.requests("SUBMIT")
    assert [job["records"] for job in submit["jobs"]] == [[1, 2], [3]]
    assert grid.connected_as == (["tcp:127.0.0.1:7700"], "s3cret", "cron")


def test_submit_json_prints_json_lines(tmp_path):
    """submit --json prints one JSON object per job: id, name and number of records."""
    grid = Grid(SUBMIT=submitted_ids)
    outcome = Outcome(grid, ["submit", "-", "--type", "noop", "--name", "batch", "--json"], tmp_path, stdin=b"1\n2\n")
    assert outcome.code == 0
    assert outcome.json_lines() == [{"job": 1, "name": "batch", "records": 2}]


def test_submit_wait_shows_progress_until_all_terminal(tmp_path):
    """submit --wait follows EVENTs, draws accepted records over total on stderr, and ends when all are done."""
    grid = Grid(
        SUBMIT=submitted_ids,
        WATCH=lambda body: {"jobs": [{"job": j, "state": "queued", "accepted": 0, "total": 2} for j in body["jobs"]]},
    )
    path = records_file(tmp_path, "1\n2\n3\n4\n")
    outcome = Outcome(grid, ["submit", path, "--type", "noop", "--records-per-job", "2", "--wait"], tmp_path)
    assert outcome.lines() == ["1", "2"]
    assert grid.server.requests("WATCH")[0]["jobs"] == [1, 2]
    grid.server.push("EVENT", {"job": 1, "state": "done", "accepted": 2, "total": 2})
    grid.server.push("EVENT", {"job": 2, "state": "running", "accepted": 1, "total": 2})
    grid.flush()
    assert not outcome.done.called
    grid.server.push("EVENT", {"job": 2, "state": "done", "accepted": 2, "total": 2})
    grid.flush()
    assert outcome.code == 0
    assert "2/2 jobs finished" in outcome.err.getvalue()
    assert "4/4 records" in outcome.err.getvalue()


def test_submit_wait_unfinished_job_exits_1(tmp_path):
    """submit --wait exits 1 and names each job that ended failed or cancelled."""
    grid = Grid(
        SUBMIT=submitted_ids,
        WATCH=lambda body: {"jobs": [{"job": 1, "state": "failed", "accepted": 0, "total": 1}]},
    )
    outcome = Outcome(grid, ["submit", "-", "--type", "noop", "--wait"], tmp_path, stdin=b"1\n")
    assert outcome.code == 1
    assert "gridctl: job 1 failed\n" in outcome.err.getvalue()


def test_submit_refused_prints_code_and_message(tmp_path):
    """A refused SUBMIT prints 'gridctl: error: CODE: MESSAGE' and exits 1."""

    def refuse(body):
        raise errors.BadRequest("SUBMIT: invalid field 'jobs'")

    outcome = Outcome(Grid(SUBMIT=refuse), ["submit", "-", "--type", "noop"], tmp_path, stdin=b"1\n")
    assert outcome.code == 1
    assert outcome.err.getvalue() == "gridctl: error: bad_request: SUBMIT: invalid field 'jobs'\n"
    assert outcome.lines() == []


def test_submit_later_batch_refused_still_prints_committed_ids(tmp_path):
    """When a later SUBMIT is refused, the ids already committed are printed before the error."""

    def submit(body):
        if len(grid.server.requests("SUBMIT")) > 1:
            raise errors.Unavailable("store down")
        return submitted_ids(body)

    grid = Grid(SUBMIT=submit)
    records = b"".join(b"%d\n" % n for n in range(10_001))
    outcome = Outcome(grid, ["submit", "-", "--type", "noop", "--records-per-job", "1"], tmp_path, stdin=records)
    assert outcome.code == 1
    assert len(outcome.lines()) == 10_000
    assert outcome.err.getvalue() == (
        "gridctl: error: unavailable: store down\n"
        "gridctl: of 10001 jobs: jobs 1-10000 submitted (ids on stdout); job 10001 refused\n"
    )


def test_submit_answered_commit_unknown_says_its_jobs_may_exist(tmp_path):
    """A SUBMIT answered commit_unknown: its jobs may or may not exist, and gridctl says to look before repeating."""

    def submit(body):
        raise errors.CommitUnknown("lost during COMMIT")

    outcome = Outcome(Grid(SUBMIT=submit), ["submit", "-", "--type", "noop"], tmp_path, stdin=b"1\n")
    assert outcome.code == 1
    assert outcome.err.getvalue() == (
        "gridctl: error: commit_unknown: lost during COMMIT\n"
        "gridctl: of 1 job: job 1 may or may not have been submitted: look (gridctl list) before submitting it again\n"
    )
    assert outcome.lines() == []


# -- reading commands ----------------------------------------------------------------------

JOBS = [
    {"id": n, "name": f"batch {n}", "type": "noop", "state": "queued", "priority": 0, "accepted": 0, "total": 3}
    for n in range(1, 6)
]


def list_pages(body):
    after = body.get("after", 0)
    page = [job for job in JOBS if job["id"] > after][: body.get("limit", 2)]
    return {"jobs": page, "next": page[-1]["id"] if page and page[-1]["id"] < JOBS[-1]["id"] else None}


def test_list_json_pages_through_all_jobs(tmp_path):
    """list --json follows the LIST pages and prints every job as one JSON line."""
    grid = Grid(LIST=list_pages)
    outcome = Outcome(grid, ["list", "--state", "queued", "--json"], tmp_path)
    assert outcome.code == 0
    assert outcome.json_lines() == JOBS
    assert all(body["state"] == "queued" for body in grid.server.requests("LIST"))


def test_list_limit_stops_early_in_a_table(tmp_path):
    """list --limit N shows N jobs in a table and asks for no more than it needs."""
    grid = Grid(LIST=list_pages)
    outcome = Outcome(grid, ["list", "--limit", "2"], tmp_path)
    assert outcome.code == 0
    table = outcome.out.getvalue()
    assert "batch 1" in table and "batch 2" in table and "batch 3" not in table
    assert grid.server.requests("LIST") == [{"rid": 2, "limit": 2}]


def test_show_prints_details_and_history(tmp_path):
    """show prints the job's fields and a row per history entry."""
    job = dict(
        JOBS[0],
        state="failed",
        history=[
            {"at": 1.7e9, "event": "dispatched", "attempt": 1, "lease": "L1", "worker": "w1", "detail": None},
            {"at": 1.7e9 + 5, "event": "failed", "attempt": 1, "lease": "L1", "worker": "w1", "detail": "boom"},
        ],
    )
    outcome = Outcome(Grid(SHOW=lambda body: {"job": job}), ["show", "1"], tmp_path)
    assert outcome.code == 0
    text = outcome.out.getvalue()
    assert "batch 1" in text and "failed" in text
    assert "dispatched" in text and "boom" in text


def test_show_unknown_job_exits_1(tmp_path):
    """show of an unknown job prints the server's code and message and exits 1."""

    def unknown(body):
        raise errors.UnknownJob("no job 404")

    outcome = Outcome(Grid(SHOW=unknown), ["show", "404"], tmp_path)
    assert outcome.code == 1
    assert outcome.err.getvalue() == "gridctl: error: unknown_job: no job 404\n"


def test_workers_table_shows_busy_slots_and_types(tmp_path):
    """workers prints one row per worker with busy/slots and its handler versions."""
    worker = {"name": "desk-7", "address": "10.0.0.7", "slots": 4, "running": [1, 2], "types": {"noop": "1.0"},
              "memory": 2048, "tags": ["linux"], "drained": False, "agent": "gridd/0.1.0", "connected": 1.7e9,
              "last_seen": 1.7e9}  # fmt: skip
    outcome = Outcome(Grid(WORKERS=lambda body: {"workers": [worker]}), ["workers"], tmp_path)
    assert outcome.code == 0
    text = outcome.out.getvalue()
    assert "desk-7" in text and "2/4" in text and "noop=1.0" in text


def test_show_poison_job_prints_error_and_each_attempt(tmp_path):
    """show prints a poison job's error and a row per attempt: its worker, outcome and error."""
    attempts = [
        {"attempt": i, "lease": f"L{i}", "worker": f"w{i}", "start": 1.7e9 + i, "end": 1.7e9 + i + 1,
         "outcome": "failed", "error": f"crash {i}"}
        for i in (1, 2, 3)
    ]  # fmt: skip
    job = dict(JOBS[0], state="poison", attempt_history=attempts, error="poison: failed on 3 workers: w1: crash 1")
    outcome = Outcome(Grid(SHOW=lambda body: {"job": job}), ["show", "1"], tmp_path)
    assert outcome.code == 0
    text = outcome.out.getvalue()
    assert "poison: failed on 3 workers" in text
    for i in (1, 2, 3):
        assert f"w{i}" in text and f"crash {i}" in text
    assert text.count("failed") >= 3


def test_workers_table_shows_flags_and_their_reasons(tmp_path):
    """workers shows a flagged worker's types, and a table of why, with a hint to clear it."""
    flag = {"type": "resize", "reason": "its last 3 attempts of resize failed while resize succeeded on desk-2",
            "since": 1.7e9}  # fmt: skip
    worker = {"name": "desk-7", "address": "10.0.0.7", "slots": 4, "running": [], "types": {"resize": "1.0"},
              "memory": 2048, "tags": [], "drained": False, "flags": [flag], "agent": "gridd/0.1.0",
              "connected": 1.7e9, "last_seen": 1.7e9}  # fmt: skip
    outcome = Outcome(Grid(WORKERS=lambda body: {"workers": [worker]}), ["workers"], tmp_path)
    assert outcome.code == 0
    text = outcome.out.getvalue()
    assert "FLAGGED" in text and "succeeded on desk-2" in text
    assert "gridctl worker clear" in outcome.err.getvalue()
    outcome = Outcome(Grid(WORKERS=lambda body: {"workers": [dict(worker, flags=[])]}), ["workers"], tmp_path)
    assert "WHY" not in outcome.out.getvalue() and outcome.err.getvalue() == ""


def test_stats_json_prints_one_line_without_rid(tmp_path):
    """stats --json prints the STATS reply, minus its rid, as one JSON line."""
    stats = {"jobs": {"queued": 3, "done": 9}, "workers": 2, "slots": 8, "busy": 3, "dispatching": True}
    outcome = Outcome(Grid(STATS=lambda body: stats), ["stats", "--json"], tmp_path)
    assert outcome.code == 0
    assert outcome.json_lines() == [stats]


def results_pages(body):
    start = body.get("after", -1) + 1
    results = [{"i": i, "out": i * 10, "worker": "w1"} for i in range(start, min(start + 2, 5))]
    return {"results": results, "next": results[-1]["i"] if results[-1]["i"] < 4 else None}


def test_results_writes_every_page_to_file(tmp_path):
    """results -o FILE writes every result of every page as JSON Lines, in record order."""
    target = tmp_path / "out.jsonl"
    outcome = Outcome(Grid(RESULTS=results_pages), ["results", "7", "-o", str(target)], tmp_path)
    assert outcome.code == 0
    assert [json.loads(line)["out"] for line in target.read_text().splitlines()] == [0, 10, 20, 30, 40]
    assert outcome.out.getvalue() == ""


def test_results_default_to_stdout(tmp_path):
    """results without -o prints the JSON Lines on stdout."""
    outcome = Outcome(Grid(RESULTS=results_pages), ["results", "7"], tmp_path)
    assert outcome.code == 0
    assert [result["i"] for result in outcome.json_lines()] == [0, 1, 2, 3, 4]


def test_results_unknown_job_creates_no_file(tmp_path):
    """results of an unknown job exits 1 and leaves no empty output file behind."""

    def unknown(body):
        raise errors.UnknownJob()

    target = tmp_path / "out.jsonl"
    outcome = Outcome(Grid(RESULTS=unknown), ["results", "7", "-o", str(target)], tmp_path)
    assert outcome.code == 1
    assert not target.exists()


# -- control commands -----------------------------------------------------------------------


def test_cancel_reports_each_job_and_exits_1_if_any_refused(tmp_path):
    """cancel acts on every job given, prints each new state, and reports refusals without stopping."""

    def cancel(body):
        if body["job"] == 2:
            raise errors.InvalidState("job is done", state="done")
        return {"state": "cancelled"}

    outcome = Outcome(Grid(CANCEL=cancel), ["cancel", "1", "2", "3"], tmp_path)
    assert outcome.code == 1
    assert outcome.lines() == ["1 cancelled", "3 cancelled"]
    assert outcome.err.getvalue() == "gridctl: error: invalid_state: job 2: job is done\n"


@pytest.mark.parametrize(
    "action, printed", [("drain", "drained"), ("undrain", "undrained"), ("disconnect", "disconnected")]
)
def test_worker_actions_send_worker_request(tmp_path, action, printed):
    """drain, undrain and disconnect send WORKER with that action and confirm it."""
    grid = Grid(WORKER=lambda body: {})
    outcome = Outcome(grid, [action, "desk-7"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == [f"desk-7 {printed}"]
    assert grid.server.requests("WORKER") == [{"rid": 2, "worker": "desk-7", "action": action}]


@pytest.mark.parametrize("action, busy", [("busy", True), ("idle", False)])
def test_worker_busy_or_idle_sends_worker_request_with_reason(tmp_path, action, busy):
    """worker busy|idle NAME --reason sends WORKER busy|idle with the reason and confirms it."""
    grid = Grid(WORKER=lambda body: {"connected": True})
    outcome = Outcome(grid, ["worker", action, "vm-3", "--reason", "desk in use"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == [f"vm-3 host {action}"]
    assert grid.server.requests("WORKER") == [{"rid": 2, "worker": "vm-3", "action": action, "reason": "desk in use"}]


def test_worker_busy_for_a_worker_not_connected_says_when_it_is_told(tmp_path):
    """worker busy NAME for a worker not connected: the server remembers it; gridctl says it is told at its HELLO."""
    grid = Grid(WORKER=lambda body: {"connected": False})
    outcome = Outcome(grid, ["worker", "busy", "vm-3"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == ["vm-3 host busy (not connected: it is told at its next HELLO)"]
    assert grid.server.requests("WORKER") == [{"rid": 2, "worker": "vm-3", "action": "busy"}]


def test_worker_with_an_unknown_action_is_a_usage_error(monkeypatch, capsys):
    """worker asleep NAME: exit 2 naming the choices; nothing is sent."""
    forbid_react(monkeypatch)
    with pytest.raises(SystemExit) as e:
        gridctl.main(["worker", "asleep", "vm-3"])
    assert e.value.code == 2
    assert "invalid choice: 'asleep'" in capsys.readouterr().err


def test_workers_table_shows_each_workers_host_state_and_silence(tmp_path):
    """workers shows the STATE column: idle, busy with its reason, vacating, and silent workers marked."""
    base = {"address": "10.0.0.7", "slots": 1, "running": [], "types": {}, "memory": 0, "tags": [], "drained": False,
            "agent": "", "connected": 1.7e9, "last_seen": 1.7e9, "state_since": 1.7e9}  # fmt: skip
    workers = [
        {**base, "name": "a", "state": "idle", "state_reason": "", "silent": False},
        {**base, "name": "b", "state": "busy", "state_reason": "cpu 80%", "silent": False},
        {**base, "name": "c", "state": "vacating", "state_reason": "", "silent": True},
    ]
    outcome = Outcome(Grid(WORKERS=lambda body: {"workers": workers}), ["workers"], tmp_path)
    assert outcome.code == 0
    text = outcome.out.getvalue()
    assert "STATE" in text and "busy (cpu 80%)" in text and "vacating, silent" in text
    assert "idle" in text


def test_worker_clear_sends_clear_and_prints_types_cleared(tmp_path):
    """worker clear NAME sends WORKER clear and prints the types the worker gets again."""
    grid = Grid(WORKER=lambda body: {"cleared": ["noop", "resize"]})
    outcome = Outcome(grid, ["worker", "clear", "desk-7"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == ["desk-7 cleared: noop resize"]
    assert grid.server.requests("WORKER") == [{"rid": 2, "worker": "desk-7", "action": "clear"}]
    outcome = Outcome(Grid(WORKER=lambda body: {"cleared": []}), ["worker", "clear", "desk-7"], tmp_path)
    assert outcome.lines() == ["desk-7 had no flags"]


def test_worker_clear_unknown_worker_exits_1(tmp_path):
    """worker clear of a worker neither connected nor flagged prints the server's refusal and exits 1."""

    def unknown(body):
        raise errors.UnknownWorker("no connected or flagged worker 'desk-9'")

    outcome = Outcome(Grid(WORKER=unknown), ["worker", "clear", "desk-9"], tmp_path)
    assert outcome.code == 1
    assert outcome.err.getvalue() == "gridctl: error: unknown_worker: no connected or flagged worker 'desk-9'\n"


def test_dispatch_off_sends_enabled_false(tmp_path):
    """dispatch off turns the stop switch with enabled false and prints the server's answer."""
    grid = Grid(DISPATCH=lambda body: {"dispatching": body["enabled"]})
    outcome = Outcome(grid, ["dispatch", "off"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == ["dispatching off"]
    assert grid.server.requests("DISPATCH")[0]["enabled"] is False


def test_credentials_add_prints_token_once_with_a_hint(tmp_path):
    """credentials add sends CREDENTIAL add and prints the token on stdout, the hint on stderr."""
    grid = Grid(CREDENTIAL=lambda body: {"token": f"{body['id']}.SECRET"})
    outcome = Outcome(grid, ["credentials", "add", "desk-7", "--role", "worker", "--note", "Anna"], tmp_path)
    assert outcome.code == 0
    assert outcome.lines() == ["desk-7.SECRET"]
    assert "secret file" in outcome.err.getvalue() and "--name desk-7" in outcome.err.getvalue()
    assert grid.server.requests("CREDENTIAL") == [
        {"rid": 2, "action": "add", "id": "desk-7", "role": "worker", "note": "Anna"}
    ]


def test_credentials_list_json_and_revoke(tmp_path):
    """credentials list --json prints one line per credential; revoke sends the id and confirms."""
    row = {"id": "cron", "role": "submitter", "created": 1.0, "revoked": None, "note": None}
    grid = Grid(CREDENTIAL=lambda body: {"credentials": [row]} if body["action"] == "list" else {})
    assert Outcome(grid, ["credentials", "list", "--json"], tmp_path).json_lines() == [row]
    outcome = Outcome(grid, ["credentials", "revoke", "cron"], tmp_path)
    assert (outcome.code, outcome.lines()) == (0, ["cron revoked"])
    assert grid.server.requests("CREDENTIAL")[-1] == {"rid": 2, "action": "revoke", "id": "cron"}


def test_credentials_bad_id_is_a_usage_error(capsys):
    """An id with characters a credential id may not have is refused before connecting."""
    with pytest.raises(SystemExit) as info:
        gridctl.build_parser().parse_args(["credentials", "add", "desk.7", "--role", "worker"])
    assert info.value.code == 2 and "credential id" in capsys.readouterr().err


# -- connection trouble ---------------------------------------------------------------------


def run_with(connect, tmp_path, argv=("stats",)):
    (tmp_path / "secret").write_text("s3cret")
    args = gridctl.build_parser().parse_args(["--secret-file", str(tmp_path / "secret"), *argv])
    gridctl.prepare(args)
    err = io.StringIO()
    d = defer.ensureDeferred(gridctl.run(MemoryReactorClock(), args, connect=connect, out=io.StringIO(), err=err))
    codes = []
    d.addBoth(codes.append)
    return codes[0], err.getvalue()


def test_run_cannot_connect_exits_3_in_one_line(tmp_path):
    """A refused connection prints one line naming the server and exits 3."""
    code, err = run_with(lambda *args: defer.fail(ConnectionRefusedError()), tmp_path)
    assert code == 3
    assert err.startswith("gridctl: cannot connect to tcp:127.0.0.1:7700: Connection was refused")
    assert err.count("\n") == 1


def test_run_refused_handshake_exits_1(tmp_path):
    """A HELLO refused with auth_failed is a server error: status 1 with code and message."""
    code, err = run_with(lambda *args: defer.fail(errors.AuthFailed()), tmp_path)
    assert (code, err) == (1, "gridctl: error: auth_failed: authentication failed\n")


def test_run_bad_endpoint_exits_2(tmp_path):
    """An endpoint string Twisted cannot parse is a usage error."""
    code, err = run_with(gridctl.client.connect, tmp_path, ["--server", "carrier-pigeon:7700", "stats"])
    assert code == 2
    assert err.startswith("gridctl: error: bad --server endpoint 'carrier-pigeon:7700'")


SERVER_A, SERVER_B = "tcp:127.0.0.1:7700", "tcp:127.0.0.1:7701"


def drop(grid: Grid, endpoint: str | None = None):
    """Cut the newest connection from the server's end; with ``endpoint``, that server stays down."""
    if endpoint is not None:
        grid.down.add(endpoint)
    grid.server.transport.loseConnection()


def test_run_read_lost_mid_command_is_sent_again_after_reconnect(tmp_path):
    """A STATS whose connection drops before the reply is asked again of the next server, and the command succeeds."""
    grid = Grid(STATS=lambda body: drop(grid, SERVER_A) if grid.server.endpoint == SERVER_A else STATS)
    outcome = Outcome(grid, ["--server", SERVER_A, "--server", SERVER_B, "stats", "--json"], tmp_path)
    assert outcome.code == 0
    assert outcome.json_lines() == [STATS]
    assert [server.endpoint for server in grid.servers] == [SERVER_A, SERVER_B]
    assert outcome.err.getvalue() == ""


def test_run_connection_lost_for_good_exits_3_in_one_line(tmp_path):
    """When the only server goes away and does not come back within 60 s, gridctl says so in one line and exits 3."""
    grid = Grid(STATS=lambda body: drop(grid, SERVER_A))
    outcome = Outcome(grid, ["stats"], tmp_path)
    for _ in range(30):
        grid.clock.advance(1)
    assert not outcome.done.called  # still backing off between rounds
    for _ in range(31):
        grid.clock.advance(1)
    assert outcome.code == 3
    assert outcome.err.getvalue().startswith(
        f"gridctl: lost the connection to {SERVER_A} and could not reconnect to {SERVER_A} within 60 s ("
    )
    assert outcome.err.getvalue().count("\n") == 1
    assert grid.clock.getDelayedCalls() == []


LOST = "connection lost: Connection was closed cleanly: Connection done."


def test_submit_lost_before_reply_exits_3_and_is_not_sent_again(tmp_path):
    """A SUBMIT lost before its reply is not repeated: two lines saying so and that its job may exist, and exit 3."""
    grid = Grid(SUBMIT=lambda body: drop(grid))
    outcome = Outcome(grid, ["--server", SERVER_A, "--server", SERVER_B, "submit", "-", "--type", "noop"], tmp_path,
                      stdin=b"1\n")  # fmt: skip
    assert outcome.code == 3
    assert outcome.err.getvalue() == (
        f"gridctl: lost the connection to {SERVER_A} before the reply to a SUBMIT ({LOST}); it was not sent again\n"
        "gridctl: of 1 job: job 1 may or may not have been submitted: look (gridctl list) before submitting it again\n"
    )
    assert sum(len(server.requests("SUBMIT")) for server in grid.servers) == 1
    assert outcome.lines() == []


def six_jobs_two_per_submit(tmp_path, extra_argv: list[str]):
    """gridctl submit of six one-record jobs to a server whose max_line holds two per SUBMIT, the second SUBMIT lost."""
    argv = ["submit", "-", "--type", "noop", "--name", "batch", "--records-per-job", "1", *extra_argv]
    jobs = gridctl.build_jobs(gridctl.build_parser().parse_args(argv), [1, 2, 3, 4, 5, 6])
    max_line = len(wire.encode("SUBMIT", {"jobs": jobs[:2], "rid": 2**53 - 1})) - 1
    assert [len(chunk) for chunk in client.split_submit(jobs, max_line)] == [2, 2, 2]

    def submit(body):
        if sum(len(server.requests("SUBMIT")) for server in grid.servers) == 2:
            return drop(grid)
        return submitted_ids(body)

    grid = Grid(HELLO=lambda body: dict(WELCOME, max_line=max_line), SUBMIT=submit)
    outcome = Outcome(grid, ["--server", SERVER_A, "--server", SERVER_B, *argv], tmp_path, stdin=b"1\n2\n3\n4\n5\n6\n")
    assert [len(body["jobs"]) for server in grid.servers for body in server.requests("SUBMIT")] == [2, 2]
    return outcome


def test_submit_lost_in_a_later_batch_says_which_jobs_exist(tmp_path):
    """Lost after SUBMIT 1's OK, before SUBMIT 2's reply: 1's ids on stdout; stderr: submitted, unknown, not sent."""
    outcome = six_jobs_two_per_submit(tmp_path, [])
    assert outcome.code == 3
    assert outcome.lines() == ["1", "2"]
    assert outcome.err.getvalue() == (
        f"gridctl: lost the connection to {SERVER_A} before the reply to a SUBMIT ({LOST}); it was not sent again\n"
        "gridctl: of 6 jobs: jobs 1-2 submitted (ids on stdout); jobs 3-4 may or may not have been submitted:"
        " look (gridctl list) before submitting them again; jobs 5-6 not sent\n"
    )


def test_submit_json_lost_in_a_later_batch_ends_with_an_error_line(tmp_path):
    """With --json, the committed jobs' lines are followed by one error line whose ranges a script can act on."""
    outcome = six_jobs_two_per_submit(tmp_path, ["--json"])
    assert outcome.code == 3
    *jobs, error = outcome.json_lines()
    assert jobs == [{"job": 1, "name": "batch [1/6]", "records": 1}, {"job": 2, "name": "batch [2/6]", "records": 1}]
    assert error.pop("message") == (
        f"lost the connection to {SERVER_A} before the reply to a SUBMIT ({LOST}); it was not sent again"
    )
    assert error == {
        "error": "outcome_unknown",
        "submitted": [1, 2],
        "unknown": [3, 4],
        "refused": None,
        "not_sent": [5, 6],
    }
    assert outcome.err.getvalue().count("\n") == 2


def test_submit_json_refused_ends_with_an_error_line(tmp_path):
    """With --json, a SUBMIT refused outright prints no job and one error line naming every job refused."""

    def refuse(body):
        raise errors.BadRequest("SUBMIT: invalid field 'jobs'")

    outcome = Outcome(Grid(SUBMIT=refuse), ["submit", "-", "--type", "noop", "--json"], tmp_path, stdin=b"1\n")
    assert outcome.code == 1
    assert outcome.json_lines() == [
        {"error": "bad_request", "message": "SUBMIT: invalid field 'jobs'", "submitted": None, "unknown": None,
         "refused": [1, 1], "not_sent": None}
    ]  # fmt: skip
    assert outcome.err.getvalue() == "gridctl: error: bad_request: SUBMIT: invalid field 'jobs'\n"


def test_submit_wait_fails_over_and_the_progress_bar_carries_on(tmp_path):
    """submit --wait whose server dies reconnects to the other, takes fresh states from WATCH, ends at 4/4 records."""
    grid = Grid(
        SUBMIT=submitted_ids,
        WATCH=lambda body: {"jobs": [{"job": j, "state": "running", "accepted": 1, "total": 2} for j in body["jobs"]]},
    )
    path = records_file(tmp_path, "1\n2\n3\n4\n")
    argv = ["--server", SERVER_A, "--server", SERVER_B, "submit", path, "--type", "noop", "--records-per-job", "2",
            "--wait"]  # fmt: skip
    outcome = Outcome(grid, argv, tmp_path)
    assert outcome.lines() == ["1", "2"]
    grid.server.push("EVENT", {"job": 1, "state": "done", "accepted": 2, "total": 2})
    grid.flush()
    drop(grid, SERVER_A)
    grid.flush()
    assert not outcome.done.called
    assert grid.server.endpoint == SERVER_B
    assert grid.server.requests("WATCH") == [{"rid": 2, "jobs": [2]}]  # only the unfinished job, after a new HELLO
    grid.server.push("EVENT", {"job": 2, "state": "done", "accepted": 2, "total": 2})
    grid.flush()
    assert outcome.code == 0
    assert "2/2 jobs finished" in outcome.err.getvalue()
    assert "4/4 records" in outcome.err.getvalue()
    assert "gridctl:" not in outcome.err.getvalue()


STATS = {"jobs": {"queued": 1}, "workers": 0, "slots": 0, "busy": 0, "queued_runnable": 1, "dispatching": True}
