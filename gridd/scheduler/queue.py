"""The run queue: runnable jobs, and which of them a worker gets next.

Rules this module owns:

- Matching: a worker may run a job only if it has the job's type at the
  version the job requires or higher, at least the memory it requires, and
  every tag it requires (``Worker.can_run``).
- Order: of the jobs a worker can run, the highest priority goes first, and
  within a priority the lowest id (first in, first out).
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
    """

    def __init__(self):
        self._heaps: dict[Bucket, list[int]] = {}
        #: Job id -> the number of its current stay in the queue.
        self._members: dict[int, int] = {}
        #: Discards since the heaps were last compacted.
        self._stale = 0
        #: Pushes so far: the number of the latest stay.
        self._pushes = 0

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

    def discard(self, job: Job):
        if self._members.pop(job.id, None) is None:
            return
        self._stale += 1
        if self._stale > 1000 and self._stale > len(self._members):
            # Lazy removal leaves ids in the heaps until they reach a top: a
            # server whose jobs run elsewhere would keep them all.
            self._heaps = {bucket: [i for i in heap if i in self._members] for bucket, heap in self._heaps.items()}
            self._heaps = {bucket: heap for bucket, heap in self._heaps.items() if heap}
            for heap in self._heaps.values():
                heapq.heapify(heap)
            self._stale = 0

    def pop_for(self, worker: Worker, barred=()) -> int | None:
        """Remove and return the best job id ``worker`` can run, or None; none of a type in ``barred``."""
        best = None
        for bucket in list(self._heaps):
            heap = self._heaps[bucket]
            while heap and heap[0] not in self._members:
                heapq.heappop(heap)
            if not heap:
                del self._heaps[bucket]
                continue
            if worker.can_run(bucket) and bucket.type not in barred:
                rank = (-bucket.priority, heap[0])
                if best is None or rank < best[0]:
                    best = (rank, bucket)
        if best is None:
            return None
        job_id = heapq.heappop(self._heaps[best[1]])
        del self._members[job_id]
        return job_id
