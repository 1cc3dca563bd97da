"""Is the host idle? (gridd.worker.idle): the watch's rules on a clock, the sources on real files and processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, task

from gridd.worker.idle import (
    HostWatch,
    OtherProcessesCPU,
    Signal,
    SignalFile,
    UserIdleTime,
    parse_logind,
    run_command,
    terminal_idle,
)
from tests.live import bounded, turns


@pytest.fixture
def caplog_events():
    """Every event logged during the test."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


class Measured:
    """A measured source whose readings the test sets."""

    name = "measured"
    settles = True

    def __init__(self, busy=False, words="quiet"):
        self.reading = (busy, words)
        self.asked = 0
        self.answer: defer.Deferred | None = None
        self.fails: Exception | None = None

    def check(self):
        self.asked += 1
        if self.fails is not None:
            raise self.fails
        if self.answer is not None:
            return self.answer
        return self.reading

    def watch(self, changed):
        pass

    def unwatch(self, changed):
        pass


class Watched:
    """A started HostWatch on a clock, with every change it reported."""

    def __init__(self, *sources, interval=5.0, idle_after=60.0, timeout=10.0, **kwargs):
        self.clock = task.Clock()
        self.changes: list[tuple[bool, str]] = []
        self.watch = HostWatch(
            self.clock, sources, lambda busy, reason: self.changes.append((busy, reason)),
            interval=interval, idle_after=idle_after, timeout=timeout, **kwargs,
        )  # fmt: skip
        self.watch.startService()

    def advance(self, seconds, step=1.0):
        while seconds > 0:
            self.clock.advance(min(step, seconds))
            seconds -= step


# -- the watch's rules ---------------------------------------------------------


def test_watch_starts_busy_and_turns_idle_only_after_every_measured_source_read_idle_for_idle_after():
    w = Watched(Measured(), Measured())
    assert w.watch.busy and w.watch.reason == "the host has not been watched yet"
    w.advance(55)
    assert w.changes == [] and w.watch.busy
    w.advance(5)
    assert w.changes == [(False, "")]
    assert not w.watch.busy


def test_a_busy_reading_makes_the_host_busy_at_that_poll_with_every_busy_sources_words():
    cpu, person = Measured(), Measured()
    w = Watched(cpu, person, idle_after=10)
    w.advance(10)
    assert w.changes == [(False, "")]
    cpu.reading = (True, "other processes use 80 % of the CPU")
    person.reading = (True, "a person used the desk 3 s ago")
    w.advance(5)
    assert w.changes[-1] == (True, "other processes use 80 % of the CPU; a person used the desk 3 s ago")


def test_a_desk_that_flickers_between_busy_and_idle_stays_busy():
    cpu = Measured()
    w = Watched(cpu, idle_after=60)
    for n in range(20):
        cpu.reading = (n % 2 == 0, "flicker")
        w.advance(25)
    assert w.changes == []
    assert w.watch.busy and w.watch.reason == "flicker"
    cpu.reading = (False, "quiet")
    w.advance(60)
    assert w.changes == [(False, "")]


def test_a_watch_told_to_start_idle_reports_only_a_change_to_busy():
    cpu = Measured()
    w = Watched(cpu, busy=False)
    w.advance(120)
    assert w.changes == []
    cpu.reading = (True, "busy")
    w.advance(5)
    assert w.changes == [(True, "busy")]


def test_a_signal_is_heard_the_moment_it_is_set_and_its_idle_needs_no_wait():
    signal = Signal()
    w = Watched(signal, busy=False)
    signal.set(True, "operator alice")
    assert w.changes == [(True, "an operator asked for the desk (operator alice)")]
    signal.set(False)
    assert w.changes[-1] == (False, "")


def test_a_signals_idle_never_cuts_short_the_measured_sources_wait():
    signal, cpu = Signal(), Measured()
    w = Watched(signal, cpu, idle_after=60)
    signal.set(True)
    w.advance(30)
    signal.set(False)
    assert w.changes == [] and w.watch.busy
    w.advance(30)
    assert w.changes == [(False, "")]


def test_a_source_that_raises_is_read_as_idle_and_the_watch_goes_on(caplog_events):
    broken, cpu = Measured(), Measured()
    broken.fails = OSError("no /proc here")
    w = Watched(broken, cpu, idle_after=10)
    w.advance(30)
    assert w.changes == [(False, "")]
    warnings = [e for e in caplog_events if "cannot tell" in e.get("log_format", "")]
    assert len(warnings) == 1, "logged once, not at every poll"
    broken.fails = None
    broken.reading = (True, "back and busy")
    w.advance(5)
    assert w.changes[-1] == (True, "back and busy")


def test_a_source_that_does_not_answer_in_time_is_read_as_idle_and_not_asked_again_while_it_answers():
    slow, cancelled = Measured(), []
    slow.answer = defer.Deferred(cancelled.append)
    w = Watched(slow, interval=5, idle_after=10, timeout=12)
    w.advance(11)
    assert slow.asked == 1, "still answering: not asked again"
    w.advance(1)
    assert len(cancelled) == 1, "timed out and cancelled"
    slow.answer = None
    w.advance(13)  # idle since the timeout (12 s): judged idle at the poll at 25 s
    assert w.changes == [(False, "")]


def test_stopping_the_watch_cancels_a_pending_answer_and_reports_nothing_after():
    slow = Measured()
    slow.answer = defer.Deferred()
    slow.answer.addErrback(lambda f: None)
    w = Watched(slow)
    w.watch.stopService()
    assert slow.answer.called
    w.advance(100)
    assert w.changes == [] and w.clock.getDelayedCalls() == []


# -- the sources ------------------------------------------------------------------


def test_signal_file_missing_is_idle_and_says_busy_or_idle_with_the_hosts_reason(tmp_path):
    path = tmp_path / "state"
    source = SignalFile(path)
    assert source.check() == (True, f"{path} is missing: the host has not said idle")
    path.write_text("busy Alice logged in\n")
    assert source.check() == (True, "the host says busy (Alice logged in)")
    path.write_text("IDLE")
    assert source.check() == (False, "the host says idle")
    path.write_text("maybe?")
    with pytest.raises(ValueError, match="should start with busy or idle"):
        source.check()


def test_a_garbled_signal_file_leaves_the_watch_going_as_idle(tmp_path, caplog_events):
    path = tmp_path / "state"
    path.write_text("busy")
    w = Watched(SignalFile(path), busy=False)
    assert w.changes == [(True, "the host says busy")]
    path.write_bytes(b"\xff\xfe garbage")
    w.advance(5)
    assert w.changes[-1] == (False, "")
    assert any("cannot tell" in e.get("log_format", "") for e in caplog_events)


def test_user_idle_time_takes_the_shortest_answer_and_leaves_out_probes_that_fail_or_cannot_tell():
    def broken():
        raise OSError("no bus")

    source = UserIdleTime(task.Clock(), min_idle=300, probes=[lambda: None, broken, lambda: 1000.0, lambda: 12.0])
    d = source.check()
    assert d.result == (True, "a person used the desk 12 s ago")
    source = UserIdleTime(task.Clock(), min_idle=300, probes=[lambda: defer.succeed(301.0)])
    assert source.check().result == (False, "nobody used the desk for 5 min 01 s")


def test_a_failing_user_idle_probe_is_logged_once_and_rests_before_it_is_asked_again(caplog_events):
    clock, asked = task.Clock(), []

    def broken():
        asked.append(clock.seconds())
        raise RuntimeError("loginctl ended with exit code 1: Failed to connect to bus")

    source = UserIdleTime(clock, probes=[broken, lambda: 400.0], rest=600)
    for _ in range(200):  # 1,000 s of polls every 5 s
        assert source.check().result == (False, "nobody used the desk for 6 min 40 s")
        clock.advance(5)
    assert asked == [0.0, 600.0], "asked again only after resting"
    told = [e for e in caplog_events if "user idle probe failed" in e.get("log_format", "")]
    assert len(told) == 1 and "Failed to connect to bus" in told[0]["error"]


def test_user_idle_time_without_any_answer_reads_idle_and_says_so():
    source = UserIdleTime(task.Clock(), probes=[lambda: None])
    assert source.check().result == (False, "no user idle time available")
    assert source.idle is None


def test_terminal_idle_is_the_time_since_the_last_input_on_any_terminal(tmp_path):
    (tmp_path / "pts").mkdir()
    for name, atime in (("tty1", 1000.0), ("tty7", 4000.0), ("pts/0", 3000.0), ("ttyS0", 9999.0)):
        path = tmp_path / name
        path.write_text("")
        os.utime(path, (atime, atime))
    # ttyS0 is a serial line, not matched by tty[0-9]*
    assert terminal_idle(tmp_path, now=lambda: 4100.0) == 100.0
    assert terminal_idle(tmp_path / "none", now=lambda: 0.0) is None


def test_parse_logind_counts_user_sessions_only_and_a_session_in_use_as_used_now():
    shown = (
        "Class=greeter\nIdleHint=no\nIdleSinceHint=0\n\n"
        "Class=user\nIdleHint=yes\nIdleSinceHint=1000000000\n\n"
        "Class=user\nIdleHint=yes\nIdleSinceHint=1500000000\n"
    )
    assert parse_logind(shown, now=lambda: 1600.0) == 100.0
    assert parse_logind(shown + "\nClass=user\nIdleHint=no\nIdleSinceHint=1590000000\n", now=lambda: 1600.0) == 0.0
    # A hint that never changed (a desktop that does not tell logind) cannot tell.
    assert parse_logind(shown + "\nClass=user\nIdleHint=no\nIdleSinceHint=0\n", now=lambda: 1600.0) == 100.0
    assert parse_logind("Class=greeter\nIdleHint=no\n") is None


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest_twisted.ensureDeferred
async def test_run_command_gives_the_output_fails_on_an_exit_code_and_a_cancel_kills_the_command(reactor):
    assert await bounded(run_command(reactor, ["echo", "hello"]), reactor) == b"hello\n"
    with pytest.raises(RuntimeError, match="false ended with exit code 1"):
        await bounded(run_command(reactor, ["false"]), reactor)
    with pytest.raises(RuntimeError, match="sh ended with exit code 3: no bus here"):
        await bounded(run_command(reactor, ["sh", "-c", "echo noise >&2; echo no bus here >&2; exit 3"]), reactor)
    with pytest.raises(FileNotFoundError):
        await run_command(reactor, ["no-such-command-gridd"])
    d = run_command(reactor, ["sleep", "60"])
    failed = []
    d.addErrback(failed.append)
    d.cancel()
    assert failed and failed[0].check(defer.CancelledError)
    await turns(reactor, lambda: not os.path.exists(f"/proc/{d.pid}"), what="the cancelled command to be killed")


def _burn(seconds: float) -> subprocess.Popen:
    """A real CPU load: a process that spins for ``seconds``."""
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _measure_until(source, enough, tries=60):
    """Poll ``source`` every 0.1 s of real time until ``enough()`` or ``tries`` polls; the last reading."""
    import time

    reading = source.check()
    for _ in range(tries):
        time.sleep(0.1)  # the source measures real CPU time between polls
        reading = source.check()
        if enough():
            break
    return reading


def test_cpu_of_other_processes_counts_a_real_load_outside_the_worker_and_not_inside_it():
    """One spinning process per CPU: all of the host's CPU. Outside the worker's tree it is other; inside, its own."""
    cpus = os.cpu_count() or 1
    burners = [_burn(20) for _ in range(cpus)]
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        theirs = OtherProcessesCPU(threshold=0.25, pid=sleeper.pid)
        busy, words = _measure_until(theirs, lambda: (theirs.share or 0) > 0.5)
        assert busy and theirs.share > 0.5, words
        assert words.startswith("other processes use ")
        ours = OtherProcessesCPU(threshold=0.25)  # this process: the burners are its children
        _measure_until(ours, lambda: (ours.own_share or 0) > 0.5)
        assert ours.own_share > 0.5, "the worker's own children count as its own"
    finally:
        for process in (*burners, sleeper):
            process.kill()
            process.wait()


def test_cpu_of_other_processes_reads_idle_before_it_has_measured():
    source = OtherProcessesCPU()
    assert source.check() == (False, "CPU use not measured yet")
