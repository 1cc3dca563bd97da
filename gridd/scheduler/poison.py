"""Poison jobs and bad workers: failures that follow a job, and failures that stay with a worker.

Rules this module owns:

- A failed attempt is one the job itself is to blame for: its handler
  failed (FAIL) or it passed its run-time limit
  (``gridd.store.base.FAILURE_REASONS``). A lost worker, a RETURN, an
  operator's change or a lost server is no failure of the job.
- Poison: when a job's failed attempts since it was last requeued span
  ``poison_after`` distinct workers, the failure that makes it so ends the
  job in state ``poison``, terminal like ``failed``: it is not retried, and
  its error names each worker with its error. Failures on one worker alone
  never make poison (the job's retry limit applies). The failed attempts
  come from the store with each grant (``ActiveJob.failures``), so every
  server sharing a store judges by all of them. An operator's REQUEUE
  starts the count afresh. ``poison_after`` 0: never.
- Bad workers: a worker whose last ``bad_worker_after`` attempts of a type
  (on this server) all failed, while that type succeeded on another
  worker since the first of them, is flagged for that type. A flagged
  worker is given no job of that type (others still flow) until an
  operator clears it; the jobs it holds run on. ``bad_worker_after`` 0:
  never.
- Flags are kept by worker name, so a reconnect keeps them, in this
  server's memory: each server judges the attempts it saw, and a restart
  forgets them (the store keeps every attempt for operators to look at).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from twisted.logger import Logger

from gridd.scheduler.model import Job

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["Poison"]

log = Logger()


class Poison:
    """Judges failed attempts: poison jobs, and flags on workers per job type."""

    def __init__(self, core: Dispatcher, poison_after: int = 3, bad_worker_after: int = 3):
        if poison_after < 0 or bad_worker_after < 0:
            raise ValueError("poison_after and bad_worker_after are 0 (off) or more")
        self.core = core
        self.poison_after = poison_after
        self.bad_worker_after = bad_worker_after
        #: worker name -> job type -> {"type", "reason", "since"}
        self.flags: dict[str, dict[str, dict]] = {}
        #: (worker name, type) -> its latest attempts of the type as (ended at, succeeded), oldest first.
        self._recent: dict[tuple[str, str], deque] = {}
        #: type -> worker name -> when the type last succeeded there.
        self._succeeded: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------
    # poison jobs

    def next_state(self, job: Job, worker: str | None, state: str) -> str:
        """The state a failed attempt of ``job`` on ``worker`` sends it to: ``poison`` if it is, else ``state``.

        ``job.failures`` are its failed attempts before this one, as the
        store gave them with the grant. Changes nothing.
        """
        workers = sorted(({name for name, _ in job.failures} | {worker}) - {None})
        if not self.poison_after or len(workers) < self.poison_after:
            return state
        log.warn(
            "job {job}: poison, failed on {n} workers ({workers}); not retried",
            job=job.id,
            n=len(workers),
            workers=", ".join(workers),
        )
        return "poison"

    # ------------------------------------------------------------------
    # bad workers

    def attempt_ended(self, job: Job, worker: str | None, succeeded: bool):
        """An attempt of ``job`` on ``worker`` ended (committed): done, or failed (as this module counts)."""
        if not self.bad_worker_after or worker is None:
            return
        now = self.core.clock.seconds()
        recent = self._recent.setdefault((worker, job.type), deque(maxlen=self.bad_worker_after))
        recent.append((now, succeeded))
        if not succeeded:
            self._judge(worker, job.type)
            return
        self._succeeded.setdefault(job.type, {})[worker] = now
        # A success here may be the one that shows others failing alone.
        for other, job_type in list(self._recent):
            if job_type == job.type and other != worker:
                self._judge(other, job_type)

    def _judge(self, worker: str, job_type: str):
        if job_type in self.flags.get(worker, {}):
            return
        recent = self._recent[(worker, job_type)]
        if len(recent) < self.bad_worker_after or any(ok for _, ok in recent):
            return
        since = recent[0][0]
        elsewhere = sorted(
            other for other, at in self._succeeded.get(job_type, {}).items() if other != worker and at >= since
        )
        if not elsewhere:
            return  # the type fails everywhere: the jobs' fault, not the worker's
        reason = (
            f"its last {len(recent)} attempts of {job_type} failed while {job_type} succeeded on {', '.join(elsewhere)}"
        )
        now = self.core.clock.seconds()
        self.flags.setdefault(worker, {})[job_type] = {"type": job_type, "reason": reason, "since": now}
        log.warn(
            "worker {worker} flagged for {type}: {reason}; it gets no {type} jobs until an operator clears it",
            worker=worker,
            type=job_type,
            reason=reason,
        )

    def barred(self, worker: str) -> dict:
        """The types ``worker`` is given no job of (a mapping; test membership)."""
        return self.flags.get(worker, {})

    def flags_of(self, worker: str) -> list[dict]:
        """The worker's flags, by type, as WORKERS shows them."""
        return [dict(flag) for _, flag in sorted(self.flags.get(worker, {}).items())]

    def clear(self, worker: str) -> list[str]:
        """An operator clears the worker's flags; its counts start afresh. Returns the types cleared."""
        cleared = sorted(self.flags.pop(worker, {}))
        for job_type in cleared:
            self._recent.pop((worker, job_type), None)
        if cleared:
            log.info("worker {worker}: flags for {types} cleared by operator", worker=worker, types=", ".join(cleared))
            self.core.dispatch()
        return cleared
