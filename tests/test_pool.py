"""Handler processes (gridd.worker.pool, gridd.worker.child): real child processes, each misbehaving on purpose."""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from gridd.worker.pool import HandlerPool, ProcessRunner
from gridd.worker.runner import Assignment, AttemptFailed
from tests import handlers
from tests.live import bounded


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
