"""Handler processes (gridd.worker.pool, gridd.worker.child): real child processes, each misbehaving on purpose."""

from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, protocol

from gridd.worker.cgroups import Cgroups
from gridd.worker.pool import HandlerPool, ProcessRunner
from gridd.worker.runner import Assignment, AttemptFailed
from tests import handlers
from tests.live import bounded, turns


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def pool(reactor):
    made = HandlerPool(reactor, size=2, limits={"memory": 512})
    yield made
    pytest_twisted.blockon(bounded(made.stop(), reactor))


def assignment(records, timeout=30.0, job=1) -> Assignment:
    return Assignment(
        job=job, lease=f"L{job}", type="t", attempt=1, params={}, total=len(records),
        records=tuple({"i": i, "data": d} for i, d in enumerate(records)), timeout=timeout,
    )  # fmt: skip


class Attempt:
    """One attempt in the pool, with what it streamed."""

    def __init__(self, pool, reactor, job_type, records, **kwargs):
        self.results, self.notes = [], []
        self.runner = ProcessRunner(
            pool, job_type, assignment(records, **kwargs), clock=reactor,
            on_result=self.results.append, on_progress=self.notes.append,
        )  # fmt: skip
        self.done = bounded(self.runner.run(), reactor)

    async def failure(self) -> str:
        with pytest.raises(AttemptFailed) as caught:
            await self.done
        return str(caught.value)


@pytest_twisted.ensureDeferred
async def test_records_streamed_from_a_child_process_reused_for_the_next_attempt(pool, reactor):
    """Results, error results and progress come back in order; the next attempt of the type reuses the process."""
    first = Attempt(pool, reactor, handlers.Upper(), ["a", "bad", "c"])
    assert await first.done is True
    assert [r["i"] for r in first.results] == [0, 1, 2]
    assert first.results[1] == {"i": 1, "error": "bad record"}
    assert first.results[0]["out"]["text"] == "A" and first.notes == ["record 0", "record 2"]
    pid = first.results[0]["out"]["pid"]
    assert pid != os.getpid()
    second = Attempt(pool, reactor, handlers.Upper(), ["d"], job=2)
    assert await second.done is True
    assert second.results[0]["out"]["pid"] == pid  # start-up paid once


@pytest_twisted.ensureDeferred
async def test_handler_on_the_childs_reactor(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Waits(), [1, 2])
    assert await attempt.done is True
    assert attempt.results == [{"i": 0, "out": 1}, {"i": 1, "out": 2}]


@pytest_twisted.ensureDeferred
async def test_handler_that_exits_fails_its_attempt_with_the_exit_code_and_keeps_earlier_results(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Exits(), ["a", "exit", "c"])
    assert "exit code 3" in await attempt.failure()
    assert attempt.results == [{"i": 0, "out": "a"}]
    again = Attempt(pool, reactor, handlers.Exits(), ["a"], job=2)  # the pool starts a new one
    assert await again.done is True


@pytest_twisted.ensureDeferred
async def test_handler_that_segfaults_fails_its_attempt_naming_the_signal(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Segfaults(), ["a"])
    assert "killed by SIGSEGV" in await attempt.failure()


@pytest_twisted.ensureDeferred
async def test_handler_that_hangs_is_killed_at_the_run_time_limit(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Hangs(), ["a"], timeout=1.0)
    assert await attempt.failure() == "run-time limit 1 s"
    process = attempt.runner.started.result
    await bounded(process.ended, reactor)  # killed, not left running
    assert not process.alive


@pytest_twisted.ensureDeferred
async def test_handler_past_its_memory_limit_fails_naming_the_limit(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Hogs(), ["a"])
    assert "memory limit 512 MiB" in await attempt.failure()


@pytest_twisted.ensureDeferred
async def test_handler_that_raises_fails_its_attempt_with_its_exception(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Raises(), ["x"])
    assert await attempt.failure() == "ValueError: cannot handle 'x'"


@pytest_twisted.ensureDeferred
async def test_cancel_kills_the_process_at_once(pool, reactor):
    attempt = Attempt(pool, reactor, handlers.Hangs(), ["a"])
    process = await bounded(attempt.runner.started, reactor)
    attempt.runner.cancel()
    assert await attempt.done is False
    await bounded(process.ended, reactor)
    assert not process.alive


@pytest_twisted.ensureDeferred
async def test_one_attempt_failing_leaves_another_running_in_its_own_process(pool, reactor):
    good = Attempt(pool, reactor, handlers.Waits(), list(range(20)))
    bad = Attempt(pool, reactor, handlers.Exits(), ["exit"], job=2)
    assert "exit code 3" in await bad.failure()
    assert await good.done is True and len(good.results) == 20


def process_state(pid: int) -> str:
    """The one-letter state of a process (R, S, T for stopped, ...), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def grouped(reactor):
    cgroups = Cgroups()
    assert {"memory", "pids"} <= set(cgroups.bases), cgroups.describe()  # this host offers both
    made = HandlerPool(reactor, size=2, cgroups=cgroups)
    yield made
    pytest_twisted.blockon(bounded(made.stop(), reactor))
    assert made._unremoved == []


@pytest_twisted.ensureDeferred
async def test_handler_past_its_control_group_memory_fails_naming_the_limit(grouped, reactor):
    """Memory really used past the group's limit gets the process killed, and the error names the limit."""
    runner = ProcessRunner(grouped, handlers.Fills(), assignment(["a"]), clock=reactor,
                           on_result=lambda r: None, on_progress=lambda n: None, limits={"memory": 200})  # fmt: skip
    with pytest.raises(AttemptFailed) as caught:
        await bounded(runner.run(), reactor)
    assert "memory limit 200 MiB (control group)" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_fork_bomb_fails_its_attempt_at_the_process_limit_and_leaves_nothing_behind(grouped, reactor):
    """A handler forking without end is stopped by its group's process limit; killing the group ends every fork."""
    runner = ProcessRunner(grouped, handlers.ForkBomb(), assignment(["a"]), clock=reactor,
                           on_result=lambda r: None, on_progress=lambda n: None, limits={"processes": 20})  # fmt: skip
    outcome = bounded(runner.run(), reactor)
    process = await bounded(runner.started, reactor)
    pids_dir = process.group.paths["pids"]
    with pytest.raises(AttemptFailed) as caught:
        await outcome
    assert "process limit 20" in str(caught.value)
    await bounded(process.ended, reactor)
    await turns(reactor, lambda: not pids_dir.exists(), what="the control group removed")


@pytest_twisted.ensureDeferred
async def test_cpu_limit_is_per_attempt_in_a_reused_process(reactor):
    """Each attempt may use the CPU limit afresh in a reused process; an attempt past it is killed, naming it."""
    pool = HandlerPool(reactor, size=1, limits={"cpu": 2})
    try:
        pids = []
        for job in (1, 2):  # 3 s of CPU in all: more than 2 s, but not in one attempt
            attempt = Attempt(pool, reactor, handlers.Burns(), [1.5], job=job)
            assert await attempt.done is True
            pids.append(attempt.results[0]["out"])
        assert pids[0] == pids[1]
        forever = Attempt(pool, reactor, handlers.Burns(), [None], job=3)
        assert "CPU limit 2 s" in await forever.failure()
    finally:
        await bounded(pool.stop(), reactor)


@pytest_twisted.ensureDeferred
async def test_attempts_with_other_limits_get_a_process_of_their_own(pool, reactor):
    """A process is reused only by attempts with the same limits."""
    first = Attempt(pool, reactor, handlers.Upper(), ["a"])
    assert await first.done is True
    other = ProcessRunner(pool, handlers.Upper(), assignment(["b"], job=2), clock=reactor,
                          on_result=first.results.append, on_progress=first.notes.append,
                          limits={"memory": 600})  # fmt: skip
    assert await bounded(other.run(), reactor) is True
    again = Attempt(pool, reactor, handlers.Upper(), ["c"], job=3)
    assert await again.done is True
    assert first.results[1]["out"]["pid"] != first.results[0]["out"]["pid"]
    assert again.results[0]["out"]["pid"] == first.results[0]["out"]["pid"]


@pytest_twisted.ensureDeferred
async def test_pause_stops_the_handler_process_and_resume_lets_it_finish(pool, reactor):
    """Paused, the attempt's process is stopped (state T); resumed, it completes every record."""
    attempt = Attempt(pool, reactor, handlers.Counts(), list(range(50)))
    process = await bounded(attempt.runner.started, reactor)
    attempt.runner.pause()
    await turns(reactor, lambda: process_state(process.pid) == "T", what="the process stopped")
    assert not attempt.done.called
    attempt.runner.resume()
    assert await attempt.done is True
    assert [r["i"] for r in attempt.results] == list(range(50))


@pytest_twisted.ensureDeferred
async def test_a_process_released_while_paused_is_continued_for_the_next_attempt(pool, reactor):
    """An attempt can end paused (its last lines were read after SIGSTOP): its process must not serve the next stopped."""
    process = await bounded(pool.acquire(handlers.Counts()), reactor)
    process.pause()
    await turns(reactor, lambda: process_state(process.pid) == "T", what="the process stopped")
    pool.release(process)
    await turns(reactor, lambda: process_state(process.pid) != "T", what="the released process continued")
    again = Attempt(pool, reactor, handlers.Counts(), [1, 2])
    assert await again.done is True
    assert (await bounded(again.runner.started, reactor)) is process


@pytest_twisted.ensureDeferred
async def test_cancel_after_the_attempt_completed_leaves_the_reused_process_alone(pool, reactor):
    """The worker cancels a runner when its lease is dropped after DONE; the process, reused meanwhile, lives on."""
    first = Attempt(pool, reactor, handlers.Counts(), [1])
    assert await first.done is True
    second = Attempt(pool, reactor, handlers.Counts(), list(range(20)), job=2)
    process = await bounded(second.runner.started, reactor)
    first.runner.cancel()
    first.runner.pause()
    assert await second.done is True and process.alive


WORKER_THAT_DIES = """
import sys
from twisted.internet import reactor
from gridd.worker.pool import HandlerPool, ProcessRunner
from tests import handlers
from tests.test_pool import assignment

runner = ProcessRunner(HandlerPool(reactor), handlers.Hangs(), assignment(["a"]), clock=reactor,
                       on_result=print, on_progress=print)
runner.run()
runner.started.addCallback(lambda process: print("handler", process.pid, flush=True))
reactor.run()
"""


class Script(protocol.ProcessProtocol):
    """A Python program run by a test: its output lines, and its end."""

    def __init__(self):
        self.lines: list[str] = []
        self.ended = defer.Deferred()
        self._buffer = b""

    def outReceived(self, data: bytes):
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        self.lines += [line.decode() for line in lines]

    def processEnded(self, reason):
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_handler_process_dies_with_a_worker_killed_by_sigkill(reactor):
    """A worker that is SIGKILLed leaves no handler process running: each asked to die with its parent."""
    script = Script()
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    transport = reactor.spawnProcess(script, sys.executable, [sys.executable, "-c", WORKER_THAT_DIES], env=env)
    await turns(reactor, lambda: any(line.startswith("handler ") for line in script.lines), what="the handler started")
    pid = int(next(line for line in script.lines if line.startswith("handler ")).split()[1])
    transport.signalProcess("KILL")
    await bounded(script.ended, reactor)
    await turns(reactor, lambda: not os.path.exists(f"/proc/{pid}"), what="the handler gone")
