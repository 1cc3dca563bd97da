"""Who watches which jobs, and telling them of each change.

Rules this module owns:

- A watcher watches a set of job ids, or every job. It is told a job's
  status each time the job changes here, in the order the changes were
  applied (which is the store's commit order).
- A WATCH's reply and its first notification leave no gap: the views of the
  jobs held here are taken after every store read, in the same turn as the
  subscription.
- With several servers on one store, a watched job that is not running
  under a lease of this server may move on another one: each sync reads
  the store's status of such jobs and tells watchers of what changed, and
  never tells them a status they were told already (a job that finished
  here and left memory is not announced a second time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gridd.scheduler.connection import IConnection, JobStatus

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher
    from gridd.scheduler.model import Job

__all__ = ["Watchers"]

#: How many watched jobs held elsewhere one sync reads at most.
SYNC_BATCH = 1000


class Watchers:
    """The subscriptions of connections to jobs' changes."""

    def __init__(self, core: Dispatcher):
        self.core = core
        #: Connection -> the job ids it watches, or None for every job.
        self._subscriptions: dict[IConnection, set[int] | None] = {}
        #: The last (state, accepted) told of watched jobs: a sync does not tell it again.
        self._told: dict[int, tuple[str, int]] = {}

    def __len__(self):
        return len(self._subscriptions)

    def __contains__(self, conn: IConnection):
        return conn in self._subscriptions

    def __iter__(self):
        return iter(list(self._subscriptions))

    def items(self):
        """(connection, the job ids it watches or None for every job), for operators and tests."""
        return list(self._subscriptions.items())

    def notify(self, job: Job, note: str | None = None):
        """Tell the watchers of ``job`` where it stands now."""
        if self._subscriptions:
            self.tell(job.status(note))

    def tell(self, status: JobStatus):
        told = False
        for conn, ids in list(self._subscriptions.items()):
            if ids is None or status.job in ids:
                conn.tell(status)
                told = True
        if told and self.core.sync_interval:
            self._told[status.job] = (status.state, status.accepted)

    def forget(self, conn: IConnection):
        self._subscriptions.pop(conn, None)

    async def watch(self, conn: IConnection, job_ids: list[int]) -> dict:
        """Subscribe ``conn`` to the jobs' changes (every job's, for an empty list); reply with their views now.

        The store is read first, for the jobs not held here and to refuse
        unknown ones (``UnknownJob``).
        """
        jobs = self.core.jobs
        stored: dict[int, dict] = {}
        last_held: dict[int, dict] = {}
        for _ in range(5):  # a job may leave this server's memory while another is read
            last_held.update((i, jobs[i].status().view()) for i in job_ids if i in jobs)
            missing = [i for i in dict.fromkeys(job_ids) if i not in jobs and i not in stored]
            if not missing:
                break
            for job_id in missing:
                j = await self.core.store.get_job(job_id)
                stored[job_id] = {"job": job_id, "state": j["state"], "accepted": j["accepted"], "total": j["total"]}
        views = [jobs[i].status().view() if i in jobs else stored.get(i) or last_held[i] for i in job_ids]
        if not job_ids:
            self._subscriptions[conn] = None
        else:
            current = self._subscriptions.get(conn, set())
            if current is not None:
                self._subscriptions[conn] = current | set(job_ids)
        return {"jobs": views}

    async def look_elsewhere(self):
        """Tell watchers what changed of watched jobs that may run on other servers (a sync's part)."""
        watched: set[int] = set()
        for ids in self._subscriptions.values():
            if ids is not None:
                watched |= ids
        self._told = {i: seen for i, seen in self._told.items() if i in watched}
        jobs = self.core.jobs
        # Only a job leased here is followed in memory; any other may move on
        # another server (even one queued here: another server may claim it).
        elsewhere = sorted(i for i in watched if i not in jobs or jobs[i].lease is None)[:SYNC_BATCH]
        if not elsewhere:
            return
        for status in await self.core.store.job_states(elsewhere):
            job = jobs.get(status["job"])
            if job is not None and job.lease is None and status["state"] != job.state:
                self.core.forget(job)  # our copy is stale: it runs, or ended, elsewhere
            key = (status["state"], status["accepted"])
            if self._told.get(status["job"]) != key:
                self._told[status["job"]] = key
                self.tell(JobStatus(status["job"], status["state"], status["accepted"], status["total"]))
