"""One lease a worker holds: its runner, the results the server has not acknowledged, its outcome.

Rules this module owns:

- Results wait until acknowledged, in index order, and are sent in batches
  of at most a line's budget; one result too big for any line becomes an
  error result rather than never leaving.
- After a reconnect, or a lease check after a suspend, only the records the
  server still lists in ``todo`` are offered; any others are discarded.
- The first outcome of an attempt (DONE, FAIL, RETURN) is the one reported.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable

from gridd.worker.runner import Assignment, JobRunner

__all__ = ["Holding"]


class Holding:
    """One lease this worker holds: its runner, its results, its outcome.

    Results wait in ``unacked`` (index to result and encoded size) until the
    server acknowledges them; ``unsent`` lists, in index order, those not yet
    sent on the current connection, and ``unsent_bytes`` their size.
    """

    def __init__(self, assignment: Assignment, started: float = 0.0):
        self.assignment = assignment
        #: When the worker got the lease (its clock): the run-time limit counts from about then.
        self.started = started
        self.runner: JobRunner | None = None
        #: None while running, then "DONE", "FAIL" or "RETURN".
        self.outcome: str | None = None
        #: The error text of FAIL or the reason of RETURN.
        self.detail = ""
        #: A RETURN because the host became busy (RETURN vacate).
        self.vacate = False
        self.unacked: dict[int, tuple[dict, int]] = {}
        self.unsent: deque[int] = deque()
        self.unsent_bytes = 0
        #: After a reconnect: the records the server still wants.
        self.todo: set[int] | None = None
        self.in_flight = 0
        self.final_in_flight = False
        self.flush_call = None
        self.retry_call = None
        self.progress_in_flight = False
        self.progress_note: str | None = None

    @property
    def job(self) -> int:
        return self.assignment.job

    @property
    def lease(self) -> str:
        return self.assignment.lease

    def limit_left(self, now: float) -> float:
        """Seconds before the attempt's run-time limit passes."""
        return self.started + self.assignment.timeout - now

    def finish(self, outcome: str, detail: str = "") -> bool:
        """Record the attempt's outcome; the first one wins."""
        if self.outcome is not None:
            return False
        self.outcome, self.detail = outcome, detail
        return True

    def add_result(self, result: dict, limit: int) -> None:
        """Keep a new result until acknowledged; one over ``limit`` bytes becomes an error."""
        index = result["i"]
        if self.todo is not None and index not in self.todo:
            return
        size = _size(result)
        if size > limit:
            result = {"i": index, "error": f"output of {size} bytes exceeds the server's line limit"}
            size = _size(result)
        if index in self.unacked:
            return  # a runner gives each record one result
        self.unacked[index] = (result, size)
        self.unsent.append(index)
        self.unsent_bytes += size

    def unsent_fit(self, budget: int) -> bool:
        return self.unsent_bytes <= budget

    def _set_unsent(self, indices: Iterable[int]) -> None:
        self.unsent = deque(sorted(i for i in indices if i in self.unacked))
        self.unsent_bytes = sum(self.unacked[i][1] for i in self.unsent)

    def pop_batch(self, budget: int) -> list[dict]:
        """Take unsent results, in index order, up to ``budget`` bytes (at least one)."""
        batch, used = [], 0
        while self.unsent:
            result, size = self.unacked[self.unsent[0]]
            if batch and used + size > budget:
                break
            batch.append(result)
            used += size
            self.unsent.popleft()
        self.unsent_bytes -= used
        return batch

    def unsend(self, results: Iterable[dict]) -> None:
        """Results whose sending came to nothing: send them again."""
        self._set_unsent({r["i"] for r in results}.union(self.unsent))

    def acknowledge(self, results: Iterable[dict]) -> None:
        for result in results:
            self.unacked.pop(result["i"], None)

    def forget(self, indices: Iterable[int]) -> None:
        """The server already has (or never had) these records: stop offering them."""
        for index in indices:
            self.unacked.pop(index, None)
        self._set_unsent(self.unsent)

    def reattach(self, todo: Iterable[int]) -> None:
        """A new connection kept this lease: offer again what the server lacks."""
        self.todo = set(todo)
        self.forget([i for i in self.unacked if i not in self.todo])
        self._set_unsent(self.unacked)
        self.in_flight = 0
        self.final_in_flight = False
        self.progress_in_flight = False

    def recheck(self, todo: Iterable[int]) -> None:
        """A lease check on the same connection kept this lease: offer only what the server lacks.

        Requests still in flight stay counted: their answers come later.
        """
        self.todo = set(todo)
        self.forget([i for i in self.unacked if i not in self.todo])

    def stop(self) -> None:
        """Stop the runner and every timer: the holding is being dropped."""
        if self.runner is not None:
            self.runner.cancel()
        for call in (self.flush_call, self.retry_call):
            if call is not None and call.active():
                call.cancel()
        self.flush_call = self.retry_call = None


def _size(result: dict) -> int:
    """Bytes ``result`` takes in a message, separator included."""
    return len(json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8")) + 1
