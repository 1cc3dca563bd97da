"""The ``command`` job type (gridd.worker.command): real programs, each a small shell script misbehaving on purpose.

Every attempt runs on the real reactor and is awaited through the Deferreds
of its runner, each bounded by a timeout; no test sleeps.
"""

from __future__ import annotations

import os
import shutil

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from gridd.jobtypes import Noop
from gridd.worker import tap
from gridd.worker.command import STDERR_KEPT, CommandRunner, CommandType, parse_command
from gridd.worker.runner import Assignment, AttemptFailed
from gridd.worker.service import make_worker_service
from tests.live import bounded, turns

#: Upper-cases each record (a JSON string), and gives the record "bad" an error result.
UPPER = r"""
while IFS= read -r line; do
  case "$line" in
    '"bad"') printf '{"error": "bad record"}\n' ;;
    *) printf '{"out": %s}\n' "$(printf '%s' "$line" | tr a-z A-Z)" ;;
  esac
done
"""


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def script(tmp_path):
    """Writes an executable ``#!/bin/sh`` script; returns its path."""

    def write(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return str(path)

    return write


def assignment(records, command="it", timeout=30.0, params=None) -> Assignment:
    return Assignment(
        job=7, lease="L7", type="command", attempt=2, params={"command": command, **(params or {})},
        total=len(records), records=tuple({"i": i, "data": d} for i, d in enumerate(records)), timeout=timeout,
    )  # fmt: skip


class Attempt:
    """One attempt of a command, with the results it streamed."""

    def __init__(self, reactor, commands: dict, records, group=True, **kwargs):
        self.results = []
        self.reactor = reactor
        #: Fires with the first result, as it arrives.
        self.first = defer.Deferred()
        job_type = CommandType(commands, reactor=reactor, group=group)
        self.runner: CommandRunner = job_type.runner(
            assignment(records, **kwargs), clock=reactor, on_result=self._result, on_progress=None
        )
        self.done = bounded(self.runner.run(), reactor)

    def _result(self, result: dict) -> None:
        self.results.append(result)
        if not self.first.called:
            self.first.callback(result)

    async def outcome(self):
        """What run() gave, once the process is gone too."""
        try:
            return await self.done
        finally:
            await bounded(self.runner.ended, self.reactor)

    async def failure(self) -> str:
        with pytest.raises(AttemptFailed) as caught:
            await self.outcome()
        return str(caught.value)


@pytest_twisted.ensureDeferred
async def test_results_stream_in_order_with_error_results(reactor, script):
    """Each record's line gets its result, in index order; {"error": ...} is an error result."""
    attempt = Attempt(reactor, {"it": script("upper", UPPER)}, ["a", "bad", "c d", "x-1"])
    assert await attempt.outcome() is True
    assert attempt.results == [
        {"i": 0, "out": "A"},
        {"i": 1, "error": "bad record"},
        {"i": 2, "out": "C D"},
        {"i": 3, "out": "X-1"},
    ]


@pytest_twisted.ensureDeferred
async def test_program_gets_params_job_and_attempt_in_its_environment_and_only_its_path_as_argv(reactor, script):
    """GRIDD_PARAMS, GRIDD_JOB, GRIDD_ATTEMPT are set; argv is [PATH]; with setsid it leads its own group."""
    path = script(
        "env",
        "read -r line\n"
        'printf \'{"out": {"params": %s, "job": %s, "attempt": %s, "argv0": "%s", "argc": %s, '
        '"pid": %s, "pgid": %s}}\\n\' "$GRIDD_PARAMS" "$GRIDD_JOB" "$GRIDD_ATTEMPT" "$0" $# $$ '
        '"$(cut -d" " -f5 /proc/$$/stat)"\n',
    )
    attempt = Attempt(reactor, {"it": path}, [1], params={"n": [1, "x"]})
    assert await attempt.outcome() is True
    out = attempt.results[0]["out"]
    assert out["params"] == {"command": "it", "n": [1, "x"]}
    assert (out["job"], out["attempt"], out["argv0"], out["argc"]) == (7, 2, path, 0)
    if shutil.which("setsid"):
        assert out["pgid"] == out["pid"]


@pytest_twisted.ensureDeferred
async def test_results_are_streamed_while_the_program_runs_and_cancel_kills_its_group(reactor, script):
    """A result goes out as its line comes; cancel fires False at once and kills what the program started."""
    path = script("slow", "read -r line\nprintf '{\"out\": 1}\\n'\nsleep 1000\nprintf '{\"out\": 2}\\n'\n")
    attempt = Attempt(reactor, {"it": path}, ["a", "b"])
    assert await bounded(attempt.first, reactor) == {"i": 0, "out": 1}
    assert not attempt.done.called
    attempt.runner.cancel()
    assert attempt.done.called
    # The sleep holds the program's output open: the process ends only because its whole group was killed.
    assert await attempt.outcome() is False
    assert attempt.results == [{"i": 0, "out": 1}]


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid")
@pytest_twisted.ensureDeferred
async def test_what_the_program_leaves_running_is_killed_when_it_exits(reactor, script):
    """A background child holding the output open does not keep a finished attempt alive."""
    path = script("leaves", "sleep 1000 &\nwhile read -r line; do printf '{\"out\": null}\\n'; done\n")
    attempt = Attempt(reactor, {"it": path}, ["a", "b"])
    assert await attempt.outcome() is True
    assert attempt.results == [{"i": 0, "out": None}, {"i": 1, "out": None}]


@pytest_twisted.ensureDeferred
async def test_nonzero_exit_fails_naming_the_code_and_the_end_of_stderr_and_keeps_results(reactor, script):
    """Exit code 3: the attempt fails with the code and stderr's last lines; the result given stays given."""
    path = script("three", 'read -r line\nprintf \'{"out": "ok"}\\n\'\necho "first" >&2\necho "it broke" >&2\nexit 3\n')
    attempt = Attempt(reactor, {"it": path}, ["a", "b"])
    assert await attempt.failure() == "command it exited with code 3: first | it broke"
    assert attempt.results == [{"i": 0, "out": "ok"}]


@pytest_twisted.ensureDeferred
async def test_killed_by_a_signal(reactor, script):
    """A program killed by SIGSEGV fails its attempt, saying so."""
    attempt = Attempt(reactor, {"it": script("segv", "kill -SEGV $$\n")}, ["a"])
    assert await attempt.failure() == "command it was killed by SIGSEGV"


@pytest.mark.parametrize(
    "line",
    ["hello", "42", '"text"', '{"out": 1, "more": 2}', '{"error": 5}', '{"result": 1}', "[1]", '{"out": NaN}'],
)
@pytest_twisted.ensureDeferred
async def test_a_line_that_is_not_a_result_fails_at_once_and_kills_the_program(reactor, script, line):
    """Garbage, bare values, other keys: the attempt fails as the line arrives, the program is killed."""
    path = script("garbage", f"printf '%s\\n' '{line}'\nsleep 1000\n")
    attempt = Attempt(reactor, {"it": path}, ["a"])
    assert await attempt.failure() == f"command it wrote a line that is not a result: {line}"
    assert attempt.results == []


@pytest_twisted.ensureDeferred
async def test_a_long_bad_line_is_clipped_in_the_message(reactor, script):
    """The message quotes the start of a bad line only."""
    path = script("long", "printf '%0500d\\n' 0\n")
    message = await Attempt(reactor, {"it": path}, ["a"]).failure()
    assert message.startswith("command it wrote a line that is not a result: 000") and message.endswith("…")
    assert len(message) < 300


@pytest_twisted.ensureDeferred
async def test_too_few_results(reactor, script):
    """Exit 0 with 2 results for 5 records fails; the 2 stay given."""
    path = script("few", 'cat >/dev/null\nprintf \'{"out": 0}\\n{"out": 1}\\n\'\n')
    attempt = Attempt(reactor, {"it": path}, list("abcde"))
    assert await attempt.failure() == "command it gave 2 results for 5 records"
    assert [r["i"] for r in attempt.results] == [0, 1]


@pytest_twisted.ensureDeferred
async def test_more_results_than_records(reactor, script):
    """A result beyond the last record fails the attempt; those before stay given."""
    path = script("many", 'cat >/dev/null\nprintf \'{"out": 0}\\n{"out": 1}\\n{"out": 2}\\n\'\n')
    attempt = Attempt(reactor, {"it": path}, ["a", "b"])
    assert await attempt.failure() == "command it gave more results than its 2 records"
    assert [r["i"] for r in attempt.results] == [0, 1]


@pytest_twisted.ensureDeferred
async def test_last_line_without_newline_and_blank_lines(reactor, script):
    """Blank lines are not results; a last line without its newline still is one."""
    path = script("blank", 'cat >/dev/null\nprintf \'\\n{"out": 0}\\n\\n  \\n{"error": "no"}\'\n')
    attempt = Attempt(reactor, {"it": path}, ["a", "b"])
    assert await attempt.outcome() is True
    assert attempt.results == [{"i": 0, "out": 0}, {"i": 1, "error": "no"}]


BIG = ["x" * 100_000] * 3  # far more than a pipe holds


@pytest_twisted.ensureDeferred
async def test_a_program_that_never_reads_its_input_does_not_hold_the_worker(reactor, script):
    """Input the program never reads is dropped when it exits; its results decide the attempt."""
    path = script("deaf", 'printf \'{"out": null}\\n{"out": null}\\n{"out": null}\\n\'\n')
    attempt = Attempt(reactor, {"it": path}, BIG)
    assert await attempt.outcome() is True
    assert len(attempt.results) == 3


@pytest_twisted.ensureDeferred
async def test_a_program_that_exits_at_once_without_reading(reactor, script):
    """Exiting 0 without reading or writing fails with the count of results."""
    attempt = Attempt(reactor, {"it": script("quits", "exit 0\n")}, BIG)
    assert await attempt.failure() == "command it gave 0 results for 3 records"


@pytest_twisted.ensureDeferred
async def test_run_time_limit_kills_the_program(reactor, script):
    """Past the attempt's run-time limit the program is killed and the attempt fails."""
    attempt = Attempt(reactor, {"it": script("hangs", "sleep 1000\n")}, ["a"], timeout=0.2)
    assert await attempt.failure() == "command it passed the run-time limit of 0.2 s"


@pytest_twisted.ensureDeferred
async def test_without_a_group_cancel_kills_the_program(reactor, script):
    """Without setsid only the program is killed: enough for one that started nothing."""
    attempt = Attempt(reactor, {"it": script("hangs", "exec sleep 1000\n")}, ["a"], group=False)
    attempt.runner.cancel()
    assert await attempt.outcome() is False


@pytest_twisted.ensureDeferred
async def test_stderr_is_kept_bounded_and_logged_with_the_attempts_end(reactor, script):
    """Only the last STDERR_KEPT bytes are kept; they are logged when the process ends."""
    noise = 'i=0\nwhile [ $i -lt 6000 ]; do echo "line $i of noise" >&2; i=$((i+1)); done\n'
    path = script("noisy", "cat >/dev/null\n" + noise + "echo '{\"out\": 1}'\n")
    with capturedLogs() as events:
        attempt = Attempt(reactor, {"it": path}, ["a"])
        assert await attempt.outcome() is True
    kept = attempt.runner.stderr
    assert len(kept.encode()) <= STDERR_KEPT and kept.endswith("line 5999 of noise\n")
    assert "line 0 of noise" not in kept
    (logged,) = [formatEvent(e) for e in events if "attempt 2" in formatEvent(e)]
    assert logged.startswith("command it of job 7 attempt 2 exited with code 0; its standard error:\n")
    assert logged.endswith("line 5999 of noise\n")


class NoSpawn:
    """A reactor that must not be asked to start anything."""

    def spawnProcess(self, *args, **kwargs):
        raise AssertionError("nothing may be started")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"command": "other"}, "no command 'other' on this worker; it has: a, b"),
        ({}, "the job names no command (params.command); this worker has: a, b"),
        ({"command": 3}, "the job names no command (params.command); this worker has: a, b"),
        ({"command": "/bin/sh"}, "no command '/bin/sh' on this worker; it has: a, b"),
    ],
)
def test_unconfigured_or_missing_command_fails_and_starts_nothing(params, message):
    """Only the operator's names run: anything else fails the attempt before anything starts."""
    job_type = CommandType({"b": "/bin/true", "a": "/bin/true"}, reactor=NoSpawn())
    a = Assignment(job=1, lease="L", type="command", attempt=1, params=params, total=1,
                   records=({"i": 0, "data": 1},), timeout=5.0)  # fmt: skip
    failures = []
    job_type.runner(a, clock=task.Clock(), on_result=None, on_progress=None).run().addErrback(failures.append)
    (failure,) = failures
    assert failure.check(AttemptFailed) and str(failure.value) == message


def test_make_worker_service_offers_command_only_when_commands_are_given():
    """With commands the HELLO's types list 'command' 1.0; without, it is absent."""
    clock = task.Clock()
    plain = make_worker_service(clock, ["tcp:127.0.0.1:7700"], name="w", token="t", job_types={"noop": Noop()}, slots=1)
    assert plain.core.type_versions() == {"noop": "1.0"}
    with_commands = make_worker_service(
        clock, ["tcp:127.0.0.1:7700"], name="w", token="t", job_types={"noop": Noop()}, slots=1,
        commands={"report": "/bin/true"},
    )  # fmt: skip
    assert with_commands.core.type_versions() == {"noop": "1.0", "command": "1.0"}
    assert with_commands.core.job_types["command"].commands == {"report": "/bin/true"}


# -- --command -------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_text("x")
    return str(path)


def test_command_option_repeats_and_makes_paths_absolute(tmp_path, script, secret, monkeypatch):
    """Each --command adds a name; a relative PATH is made absolute; the worker then offers 'command'."""
    a, b = script("a.sh", "exit 0\n"), script("b.sh", "exit 0\n")
    monkeypatch.chdir(tmp_path)
    options = tap.Options()
    options.parseOptions(["--secret-file", secret, "--command", f"a={a}", "--command", "b-2.x=b.sh", "--slots", "1"])
    assert options["commands"] == {"a": a, "b-2.x": b}
    service = tap.makeService(options, reactor=task.Clock())
    assert service.core.job_types["command"].commands == {"a": a, "b-2.x": b}


def test_without_command_option_no_command_type(secret):
    options = tap.Options()
    options.parseOptions(["--secret-file", secret])
    assert options["commands"] == {} and "command" not in options["job_types"]
    assert "command" not in tap.makeService(options, reactor=task.Clock()).core.job_types


def test_types_may_list_command_when_commands_are_given(script, secret):
    """--types command,noop offers noop plus the commands; --types command alone needs --command."""
    options = tap.Options()
    options.parseOptions(["--secret-file", secret, "--types", "command,noop", "--command", f"a={script('a', '')}"])
    assert sorted(options["job_types"]) == ["noop"]
    assert sorted(tap.makeService(options, reactor=task.Clock()).core.job_types) == ["command", "noop"]
    with pytest.raises(usage.UsageError, match="--types command needs at least one --command"):
        tap.Options().parseOptions(["--secret-file", secret, "--types", "command"])


def test_command_option_refuses_bad_specs(tmp_path, script, secret):
    """No '=', a bad name, a missing, non-executable or non-file path, a name given twice: usage errors."""
    good = script("good", "exit 0\n")
    plain = tmp_path / "plain"
    plain.write_text("echo hi\n")
    os.chmod(plain, 0o644)
    for spec, says in (
        ([good], "expected NAME=PATH"),
        (["a="], "expected NAME=PATH"),
        ([f"bad name={good}"], "the name 'bad name' is not"),
        ([f"-x={good}"], "the name '-x' is not"),
        ([f"{'n' * 65}={good}"], "is not 1 to 64"),
        ([f"a={tmp_path / 'missing'}"], "does not exist"),
        ([f"a={plain}"], "is not executable"),
        ([f"a={tmp_path}"], "is not a file"),
        ([f"a={good}", f"a={good}"], "--command a is given twice"),
    ):
        argv = ["--secret-file", secret]
        for one in spec:
            argv += ["--command", one]
        with pytest.raises(usage.UsageError, match=says.replace("(", r"\(")):
            tap.Options().parseOptions(argv)


def test_parse_command_keeps_equals_signs_in_the_path(tmp_path):
    """Only the first '=' separates NAME from PATH."""
    folder = tmp_path / "x=y"
    folder.mkdir()
    path = folder / "run"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    assert parse_command(f"run={path}") == ("run", str(path))


@pytest_twisted.ensureDeferred
async def test_pause_stops_the_program_and_what_it_started_and_resume_lets_it_finish(reactor, script):
    """Paused, the program's whole group is stopped (state T, a child of it too); resumed, it gives every result."""
    path = script(
        "pausable",
        "read -r line\nsleep 1000 &\nprintf '{\"out\": %s}\\n' $!\n"
        'read -r go < "$0.go"\n'
        "while IFS= read -r line; do printf '{\"out\": 1}\\n'; done\nkill $!\n",
    )
    os.mkfifo(path + ".go")
    go = os.open(path + ".go", os.O_RDWR)  # a FIFO the program waits on: it reads a line only once written
    attempt = Attempt(reactor, {"it": path}, ["a", "b", "c"])
    first = await bounded(attempt.first, reactor)
    child = first["out"]
    attempt.runner.pause()

    def stopped(pid):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    await turns(reactor, lambda: stopped(attempt.runner._pid) and stopped(child), what="the group stopped")
    os.write(go, b"go\n")  # a stopped program cannot read it: only a resumed one goes on
    attempt.runner.resume()
    try:
        assert await attempt.outcome() is True
    finally:
        os.close(go)
    assert [r["i"] for r in attempt.results] == [0, 1, 2]
