"""Read-only answers for clients and operators: jobs, results, workers, queue depth and figures.

Rules this module owns:

- A job's view, its listing and its results come from the store (the
  durable truth); only a running job's latest progress note, which is never
  stored, comes from memory.
- Workers, slots and queue depth are this server's own, from memory.
- A page holds at most ``limit`` entries and says where the next one starts.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["Views"]


class Views:
    """What clients and operators may look at."""

    def __init__(self, core: Dispatcher):
        self.core = core

    async def show(self, job_id: int) -> dict:
        view = await self.core.store.get_job(job_id)
        job = self.core.jobs.get(job_id)
        if job is not None and job.note is not None:
            view["note"] = job.note
        return {"job": view}

    async def list_jobs(self, state=None, type=None, after=0, limit=100) -> dict:
        jobs = await self.core.store.list_jobs(state=state, type=type, after=after, limit=limit + 1)
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return {"jobs": jobs, "next": jobs[-1]["id"] if more else None}

    async def results(self, job_id: int, after: int = -1, limit: int = 1000) -> dict:
        rows = await self.core.store.get_results(job_id, after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"results": rows, "next": rows[-1]["i"] if more else None}

    async def job_submitter(self, job_id: int) -> str | None:
        """Who submitted the job (the session's ownership check); raises ``UnknownJob``."""
        return (await self.core.store.get_job(job_id))["submitter"]

    async def workers_view(self) -> dict:
        return {
            "workers": [
                {
                    "name": w.name,
                    "address": w.conn.address,
                    "slots": w.slots,
                    "running": sorted(j.id for j in w.leases.values()),
                    "types": w.type_versions,
                    "memory": w.memory,
                    "tags": sorted(w.tags),
                    "drained": w.drained,
                    "state": w.state,
                    "state_reason": w.state_reason,
                    "state_since": w.state_since,
                    "silent": w.quiet,
                    "flags": self.core.poison.flags_of(w.name),
                    "agent": w.agent,
                    "connected": w.connected_at,
                    "last_seen": w.last_seen,
                }
                for w in self.core.workers.values()
            ]
        }

    def queue_depth(self) -> dict[tuple[str, int], int]:
        """Queued jobs (runnable or in retry backoff) by (type, priority), highest priority first."""
        depth = Counter((j.type, j.priority) for j in self.core.jobs.values() if j.state == "queued")
        return dict(sorted(depth.items(), key=lambda item: (-item[0][1], item[0][0])))

    async def stats(self) -> dict:
        core = self.core
        counts = await core.store.counts()
        workers = core.workers.values()
        return {
            "jobs": counts,
            "workers": len(workers),
            "slots": sum(w.slots for w in workers),
            "busy": sum(len(w.leases) for w in workers),
            "queued_runnable": len(core.queue),
            "dispatching": core.dispatching,
            "vacates": core.vacates,
        }
