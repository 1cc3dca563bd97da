"""Noticing a suspend (gridd.worker.suspend): three clocks the test moves by hand, and a real SIGSTOP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from twisted.internet import task

from gridd.worker.suspend import SuspendWatch, boottime, duration_in_words


class Clocks:
    """The reactor's clock and the two kernel clocks, moved together or apart by the test."""

    def __init__(self):
        self.reactor = task.Clock()
        self.monotonic = 1000.0
        self.boottime = 1000.0
        self.resumes: list[tuple[float, str]] = []
        self.watch = SuspendWatch(
            self.reactor, lambda gap, how: self.resumes.append((gap, how)), interval=1.0, threshold=3.0,
            monotonic=lambda: self.monotonic, boottime=lambda: self.boottime,
        )  # fmt: skip
        self.watch.startService()

    def run(self, seconds: float) -> None:
        """Time passes normally: every clock moves together, the watch turns each second."""
        for _ in range(int(seconds)):
            self.monotonic += 1
            self.boottime += 1
            self.reactor.advance(1)


def test_nothing_is_reported_while_time_passes_normally():
    clocks = Clocks()
    clocks.run(100)
    assert clocks.resumes == [] and clocks.watch.events == 0


def test_a_host_suspend_is_the_gap_between_boottime_and_monotonic():
    clocks = Clocks()
    clocks.run(5)
    # Slept 2 h 03 min: the monotonic clock stood still, boot time and the wall clock went on.
    clocks.boottime += 7380 + 1
    clocks.monotonic += 1
    clocks.reactor.advance(7380 + 1)
    [(gap, how)] = clocks.resumes
    assert gap == pytest.approx(7380)
    assert how == "the host was suspended for 2 h 03 min"


def test_a_stopped_process_is_a_turn_that_came_late():
    clocks = Clocks()
    clocks.run(2)
    # SIGSTOP for 40 s: every clock went on, the watch did not turn.
    clocks.monotonic += 40
    clocks.boottime += 40
    clocks.reactor.advance(40)
    [(gap, how)] = clocks.resumes
    assert gap == pytest.approx(39)
    assert how == "this process did not run for 39 s (stopped, paused or starved)"


def test_a_wall_clock_step_forward_is_reported_as_such_and_only_once():
    clocks = Clocks()
    clocks.run(2)
    clocks.reactor.advance(3 * 3600 + 600)  # the wall clock jumped; the kernel's clocks moved 1 s
    clocks.monotonic += 1
    clocks.boottime += 1
    clocks.reactor.advance(0)
    clocks.run(10)
    assert len(clocks.resumes) == 1
    assert clocks.resumes[0][1] == "the wall clock jumped forward by 3 h 10 min"


def test_a_step_back_is_not_also_counted_as_a_stop():
    clocks = Clocks()
    assert clocks.watch.judge(301.0, 301.0, 1.0) == (
        300.0,
        "the wall clock was set back by 5 min: the reactor's timers waited for it",
    )


def test_a_small_delay_below_the_threshold_is_not_an_event():
    clocks = Clocks()
    assert clocks.watch.judge(3.5, 3.5, 3.5) == (0.0, None)


@pytest.mark.expected_log_errors
def test_a_failing_callback_is_logged_and_the_watch_goes_on():
    reactor = task.Clock()
    now = [0.0]

    def broken(gap, how):
        raise RuntimeError("boom")

    watch = SuspendWatch(reactor, broken, monotonic=lambda: now[0], boottime=lambda: now[0])
    watch.startService()
    errors = []
    from twisted.logger import globalLogPublisher

    def observe(event):
        if event.get("log_failure") is not None:
            errors.append(event["log_failure"])
            event["log_failure"].cleanFailure()

    globalLogPublisher.addObserver(observe)
    try:
        now[0] += 50
        reactor.advance(50)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert watch.events == 1 and len(errors) == 1
    watch.stopService()
    assert reactor.getDelayedCalls() == []


def test_duration_in_words():
    assert [duration_in_words(s) for s in (0.4, 3, 12, 425, 600, 7380, -90)] == [
        "0.4 s", "3 s", "12 s", "7 min 05 s", "10 min", "2 h 03 min", "1 min 30 s",
    ]  # fmt: skip


def test_boottime_runs_with_the_monotonic_clock_on_an_awake_host():
    assert abs((boottime() - time.monotonic()) - (boottime() - time.monotonic())) < 0.1


PROGRAM = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from gridd.worker.suspend import SuspendWatch

    def resumed(gap, how):
        print(how, flush=True)
        reactor.stop()

    watch = SuspendWatch(reactor, resumed, interval=0.2, threshold=1.0)
    reactor.callWhenRunning(watch.start)
    reactor.callWhenRunning(lambda: print("watching", flush=True))
    reactor.run()
    """
)


def test_a_real_process_stopped_and_continued_notices_on_its_first_turn():
    child = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "watching"
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(2)  # what is tested is a stop lasting real time, past the watch's 1 s threshold
        os.kill(child.pid, signal.SIGCONT)
        line = child.stdout.readline().strip()
        assert line.startswith("this process did not run for "), line
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.parametrize("phase", [0.0, 0.1, 0.2, 0.3, 0.37])
def test_a_stop_as_long_as_the_servers_deadline_is_noticed_whenever_it_starts(phase):
    """With a 1.5 s deadline the watch turns every 0.375 s and reports 0.75 s late: a 1.5 s stop never slips by."""
    reactor, now, resumes = task.Clock(), [0.0], []
    watch = SuspendWatch(
        reactor, lambda gap, how: resumes.append(how), monotonic=lambda: now[0], boottime=lambda: now[0],
        deadline=lambda: 1.5,
    )  # fmt: skip
    watch.startService()
    assert (watch.turn_interval, watch.threshold) == (0.375, 0.75)

    def run(seconds, step=0.01):
        for _ in range(round(seconds / step)):
            now[0] += step
            reactor.advance(step)

    run(1.0)
    run(phase)
    now[0] += 1.5  # stopped: the clocks go on, the watch does not turn
    reactor.advance(1.5)
    assert len(resumes) == 1 and resumes[0].startswith("this process did not run for"), resumes
    watch.stopService()
