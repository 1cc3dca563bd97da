"""Group commit: many writes, one transaction, one sync to disk.

A commit costs a disk sync, and a database commits only a few thousand times a
second however small the transaction; rows inside one transaction are almost
free (measured on SQLite: about 4k single-row commits a second in WAL mode,
over a million rows a second in one transaction). So writes that arrive while a transaction is running
wait and then share the next one, and the write rate is bounded by the rows
the database can take, not by its commits.

Sharing a transaction must not make writes depend on each other: each runs in
its own savepoint, so a write that raises (a stale lease, say) is rolled back
alone and only its own Deferred fails. Every Deferred still waits for the
COMMIT, because an acknowledged write must be durable.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

__all__ = ["GroupCommitter"]


class GroupCommitter:
    """Run writes on an adbapi ``ConnectionPool``, as many to a transaction as are waiting.

    A write is a thread function ``thd_fn(txn, *args)``: it runs in the pool's
    thread, takes the transaction, returns plain data and never touches the
    reactor. Writes run in the order they were given, so each sees the
    effects of those before it.

    The first write starts a transaction at once; writes given while it runs
    queue up and run together in the next one, at most ``max_batch`` to a
    transaction. ``begin``, if given, is the statement that opens each
    transaction (SQLite needs ``BEGIN IMMEDIATE``; see ``gridd.store.sqlite``).

    ``writes`` and ``transactions`` count what was given and how many
    transactions ran them; their ratio is the batching achieved.
    """

    def __init__(self, pool, *, begin: str | None = None, max_batch: int = 1000):
        self._pool = pool
        self._begin = begin
        self._max_batch = max_batch
        self._queue: deque[tuple[Callable[..., Any], tuple, Deferred]] = deque()
        self._running = False
        #: (number of writes that must be settled, Deferred) for each flush().
        self._flushes: deque[tuple[int, Deferred]] = deque()
        self._settled = 0
        self.writes = 0
        self.transactions = 0

    def write(self, thd_fn: Callable[..., Any], *args) -> Deferred:
        """Run ``thd_fn(txn, *args)`` in a coming transaction.

        The Deferred fires with its result after that transaction committed,
        or fails with what it raised (having changed nothing), or, if the
        transaction as a whole fails, with that failure.
        """
        d = Deferred()
        self._queue.append((thd_fn, args, d))
        self.writes += 1
        if not self._running:
            self._run_batch()
        return d

    def flush(self) -> Deferred:
        """Fire when every write given so far has been settled: committed, or failed."""
        if self._settled == self.writes:
            return succeed(None)
        d = Deferred()
        self._flushes.append((self.writes, d))
        return d

    def _run_batch(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._max_batch))]
        self._running = True
        self.transactions += 1
        d = self._pool.runInteraction(_thd_run_batch, self._begin, [(fn, args) for fn, args, _ in batch])
        d.addBoth(self._batch_done, [waiting for _, _, waiting in batch])

    def _batch_done(self, outcome: list[tuple[bool, Any]] | Failure, waiting: list[Deferred]) -> None:
        self._running = False
        self._settled += len(waiting)
        # Start the next transaction before running callbacks, so the
        # database works while the reactor delivers these results; writes the
        # callbacks give queue up behind it.
        if self._queue:
            self._run_batch()
        if isinstance(outcome, Failure):
            for d in waiting:
                d.errback(outcome)
        else:
            for d, (ok, value) in zip(waiting, outcome, strict=True):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)
        while self._flushes and self._flushes[0][0] <= self._settled:
            self._flushes.popleft()[1].callback(None)


def _thd_run_batch(txn, begin: str | None, writes: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[bool, Any]]:
    """Run ``writes`` in one transaction, each in its own savepoint.

    Returns ``(True, result)`` or ``(False, Failure)`` per write. A write that
    raises is rolled back to its savepoint and the rest go on; an error the
    savepoint cannot contain (the database failing under us) propagates, and
    adbapi rolls the whole transaction back.
    """
    if begin is not None:
        txn.execute(begin)
    outcomes = []
    for thd_fn, args in writes:
        txn.execute("SAVEPOINT gridd_write")
        try:
            outcomes.append((True, thd_fn(txn, *args)))
        except Exception:
            outcomes.append((False, Failure()))
            txn.execute("ROLLBACK TO SAVEPOINT gridd_write")
        txn.execute("RELEASE SAVEPOINT gridd_write")
    return outcomes
