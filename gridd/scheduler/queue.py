"""The run queue: runnable jobs, and which of them a worker gets next.

Rules this module owns:

- Matching: a worker may run a job only if it has the job's type at the
  version the job requires or higher, at least the memory it requires, and
  every tag it requires (``Worker.can_run``).
- Order: of the jobs a worker can run, the highest priority goes first, and
  within a priority the lowest id (first in, first out).
- A job a worker gave up is kept from that worker (by name) until the time
  its ``Job.given_up`` says, and from nobody else: the worker gets the next
  job it may have instead, and the job stays where it is in the queue for
  the others. What a job is kept from is read when it is pushed.
- A job is in the queue at most once. Each stay in the queue is numbered
  (``stay``), so that a judgement made from a read that began during one
  stay is not applied to the next.
"""

from __future__ import annotations

import heapq

from gridd.scheduler.model import Bucket, Job, Worker

__all__ = ["RunQueue"]


class RunQueue:
    """Runnable jobs: per bucket a heap of job ids, so the lowest id comes first.

    Removal is lazy: a job leaves the member set and its heap entry is skipped
    when it reaches the top; the heaps are compacted once most of what they
    hold is stale.

    A job kept from some workers is also held in ``_kept`` while it is
    queued. Only when a heap's top is such a job, kept from the very worker
    asking, is it lifted off (with any more such jobs under it) and put back
    once the worker's job is chosen: a worker that gave up nothing pays one
    lookup per bucket, and one that did pays for the jobs it gave up that lie
    ahead of the first it may have.
    """

    def __init__(self):
        self._heaps: dict[Bucket, list[int]] = {}
        #: Job id -> the number of its current stay in the queue.
        self._members: dict[int, int] = {}
        #: Discards since the heaps were last compacted.
        self._stale = 0
        #: Pushes so far: the number of the latest stay.
        self._pushes = 0
        #: Queued jobs that are kept from some worker, by id.
        self._kept: dict[int, Job] = {}

    def __len__(self):
        return len(self._members)

    def __contains__(self, job: Job):
        return job.id in self._members

    def stay(self, job: Job) -> int | None:
        """The number of ``job``'s current stay in the queue, or None if it is not in it."""
        return self._members.get(job.id)

    def push(self, job: Job):
        """Queue ``job`` (a job already queued starts a new stay)."""
        if job.id not in self._members:
            heapq.heappush(self._heaps.setdefault(job.bucket, []), job.id)
        self._pushes += 1
        self._members[job.id] = self._pushes
        if job.given_up:
            self._kept[job.id] = job
        else:
            self._kept.pop(job.id, None)

    def discard(self, job: Job):
        if self._members.pop(job.id, None) is None:
            return
        self._kept.pop(job.id, None)
        self._stale += 1
        if self._stale > 1000 and self._stale > len(self._members):
            # Lazy removal leaves ids in the heaps until they reach a top: a
            # server whose jobs run elsewhere would keep them all.
            self._heaps = {bucket: [i for i in heap if i in self._members] for bucket, heap in self._heaps.items()}
            self._heaps = {bucket: heap for bucket, heap in self._heaps.items() if heap}
            for heap in self._heaps.values():
                heapq.heapify(heap)
            self._stale = 0

    def pop_for(self, worker: Worker, now: float, barred=()) -> int | None:
        """Remove and return the best job id ``worker`` can run and may have at ``now``, or None.

        None of a type in ``barred`` (the worker is flagged for it: ``gridd.scheduler.poison``).
        """
        best = None
        #: (heap, ids lifted off it): jobs kept from this worker, put back below.
        lifted: list[tuple[list[int], list[int]]] = []
        try:
            for bucket in list(self._heaps):
                heap = self._heaps[bucket]
                runs = worker.can_run(bucket) and bucket.type not in barred
                kept: list[int] = []
                while heap:
                    top = heap[0]
                    if top not in self._members:
                        heapq.heappop(heap)
                    elif runs and self._kept and self._kept_from(top, worker.name, now):
                        kept.append(heapq.heappop(heap))
                    else:
                        break
                if kept:
                    lifted.append((heap, kept))
                elif not heap:
                    del self._heaps[bucket]
                    continue
                if runs and heap:
                    rank = (-bucket.priority, heap[0])
                    if best is None or rank < best[0]:
                        best = (rank, bucket)
            if best is None:
                return None
            job_id = heapq.heappop(self._heaps[best[1]])
            del self._members[job_id]
            self._kept.pop(job_id, None)
            return job_id
        finally:
            for heap, kept in lifted:
                for job_id in kept:
                    heapq.heappush(heap, job_id)

    def _kept_from(self, job_id: int, name: str, now: float) -> bool:
        job = self._kept.get(job_id)
        if job is None:
            return False
        if job.kept_from(name, now):
            return True
        if not job.given_up:  # every worker's time is over: an ordinary job again
            del self._kept[job_id]
        return False
