"""Per-record results: checking them, committing them, and completing a job.

Rules this module owns:

- A result is taken only under the job's current lease (``Leases.leased``).
- Each record's result is accepted at most once: a result for a record
  that already has one, that is being committed, or that a request names
  twice is refused as a duplicate, and the request changes nothing; a
  result for an index outside the job is refused as unknown.
- Results are applied in memory once the store has committed them; one the
  store says it already holds counts as accepted here too (an earlier write
  of it was answered "commit unknown" and had been made).
- A DONE completes the job only if every record then has an accepted
  result; its trailing results are committed with the completion, in one
  write, or not at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gridd import errors
from gridd.scheduler.model import Job, LeaseState
from gridd.store.base import RecordResult

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["Results"]


class Results:
    """The worker requests that carry results: RESULT, PROGRESS and DONE."""

    def __init__(self, core: Dispatcher):
        self.core = core

    async def result(self, conn, job_id: int, token: str, results: list[dict]) -> dict:
        job = self.core.leases.leased(conn, job_id, token)
        records = self._check(job, results)
        accepted = await self._commit(job, records, self.core.store.add_results)
        self.core.watchers.notify(job)
        return {"accepted": accepted}

    async def progress(self, conn, job_id: int, token: str, note: str | None) -> dict:
        job = self.core.leases.leased(conn, job_id, token)
        job.note = note
        self.core.watchers.notify(job, note=note)
        return {}

    async def done(self, conn, job_id: int, token: str, results: list[dict]) -> dict:
        leases = self.core.leases
        job = leases.leased(conn, job_id, token)
        lease = job.lease
        records = self._check(job, results)
        missing = len(job.pending) - len(lease.in_flight) - len(records)
        if missing:
            raise errors.Incomplete(f"{missing} records have no accepted result", missing=missing)
        lease.state = LeaseState.CLOSING
        try:
            await self._commit(job, records, self.core.store.complete)
        except BaseException as e:
            leases.closing_failed(job, lease, e)
            raise
        self.core.poison.attempt_ended(job, lease.worker.name if lease.worker is not None else None, succeeded=True)
        self.core.finish(job, "done")
        return {}

    def _check(self, job: Job, results: list[dict]) -> list[RecordResult]:
        in_flight = job.lease.in_flight
        seen, unknown, duplicate = set(), [], []
        for r in results:
            i = r["i"]
            if i >= job.total:
                unknown.append(i)
            elif i not in job.pending or i in in_flight or i in seen:
                duplicate.append(i)
            seen.add(i)
        if unknown:
            raise errors.UnknownRecord(f"job {job.id} has records 0..{job.total - 1}", records=unknown)
        if duplicate:
            raise errors.DuplicateResult(records=duplicate)
        return [RecordResult(r["i"], r.get("out"), r.get("error")) for r in results]

    async def _commit(self, job: Job, records: list[RecordResult], write) -> int:
        core = self.core
        indices = {r.index for r in records}
        lease = job.lease
        lease.in_flight |= indices
        try:
            accepted = await write(job.id, lease.token, records, core.clock.seconds())
        except errors.StaleLease:
            core.leases.ended_elsewhere(job, lease)
            raise
        except errors.DuplicateResult as e:
            # The store already has these results (under another lease, or
            # another value): this server stops waiting for them, else every
            # DONE would be refused as incomplete.
            known = indices.intersection(e.extra.get("records") or ())
            for i in known:
                job.pending.pop(i, None)
            if known:
                core.watchers.notify(job)
            raise
        finally:
            lease.in_flight -= indices
        for i in indices:
            job.pending.pop(i, None)
        core.rates.add("records", len(indices))
        return accepted
