"""The store in memory: the fake behind the dispatcher's tests, and ``--db memory:``.

A fake is only worth having if it is honest: code that passes against it must
behave the same on a real database. So ``MemoryStore`` keeps the contract of
``gridd.store.base`` to the letter, and ``tests/test_store_contract.py`` runs
the same assertions on it and on SQLite:

- every call answers with an already-fired Deferred;
- a call that fails changes nothing (all checks come before any change);
- values are kept as JSON text, as a database keeps them, so a caller never
  shares an object with the store and non-JSON values fail the same way.

Several servers on one database are several ``MemoryStore`` objects on one
``_Data``: ``sibling(server_id)`` makes another store object over the same
jobs and servers, as a second server on the same MySQL database would be.

Nothing survives the process.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from itertools import islice

from twisted.internet.defer import fail, maybeDeferred, succeed

from gridd.errors import (
    AlreadyExists,
    DuplicateResult,
    Incomplete,
    InvalidState,
    StaleLease,
    Unavailable,
    UnknownCredential,
    UnknownJob,
    UnknownRecord,
)
from gridd.store.base import (
    ACTIVE_STATES,
    END_LEASE_STATES,
    JOB_STATES,
    SETTABLE_STATES,
    ActiveJob,
    attempts_from_history,
    dump_json,
    encode_results,
    failures_since_reset,
    job_error,
    server_id_for,
)

__all__ = ["MemoryStore"]


def _load(text: str | None):
    return None if text is None else json.loads(text)


def _repeats(record, lease, output, error) -> bool:
    """Was this very result (value and error) accepted for ``record`` under ``lease``?"""
    return (
        lease is not None
        and record.accepted_at is not None
        and (record.lease, record.output, record.error) == (lease, output, error)
    )


def _has_event(job, event, lease, detail=None) -> bool:
    """Does the job's history have ``event`` naming ``lease`` (with ``detail``, if given)?"""
    encoded = None if detail is None else dump_json(detail)
    return lease is not None and any(
        e["event"] == event and e["lease"] == lease and (detail is None or e["detail"] == encoded) for e in job.history
    )


def _stale(job_id, lease) -> StaleLease:
    return StaleLease(f"lease {lease!r} is not the current lease of job {job_id}")


def _leased_at(job) -> float | None:
    """When a running job's current lease was granted, from its history."""
    if job.state != "running" or job.lease is None:
        return None
    times = [e["at"] for e in job.history if e["event"] == "leased" and e["lease"] == job.lease]
    return max(times) if times else None


@dataclass
class _Record:
    data: str
    #: Set when a result is accepted: output (JSON text) or error, and who sent it.
    accepted_at: float | None = None
    output: str | None = None
    error: str | None = None
    lease: str | None = None
    worker: str | None = None


@dataclass
class _Job:
    id: int
    name: str | None
    type: str
    priority: int
    requires: str
    params: str
    retries: int
    timeout: float | None
    submitter: str | None
    created: float
    updated: float
    records: list[_Record]
    state: str = "queued"
    accepted: int = 0
    attempts: int = 0
    lease: str | None = None
    worker: str | None = None
    #: The server that owns the lease, exactly while the job is running.
    server: str | None = None
    not_before: float | None = None
    #: Events as get_job shows them, with ``detail`` as JSON text.
    history: list[dict] = field(default_factory=list)

    def add_event(self, at, event, attempt=None, lease=None, worker=None, detail=None):
        encoded = None if detail is None else dump_json(detail)
        self.history.append(
            {"at": at, "event": event, "attempt": attempt, "lease": lease, "worker": worker, "detail": encoded}
        )


@dataclass
class _Data:
    """What a database would hold, shared by sibling store objects."""

    jobs: dict[int, _Job] = field(default_factory=dict)
    last_id: int = 0
    #: server id -> (last beat, deadline)
    servers: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: credential id -> its row, as ``get_credential`` gives it
    credentials: dict[str, dict] = field(default_factory=dict)


def _answer(method):
    """Run ``method`` at once and answer with a fired Deferred, as every store does."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if not self._running:
            return fail(Unavailable("the store is not running"))
        return maybeDeferred(method, self, *args, **kwargs)

    return call


class MemoryStore:
    """``gridd.store.base.IStore`` in a dict."""

    def __init__(self, server_id: str | None = None):
        #: The server this store object writes as (``IStore.server_id``).
        self.server_id = server_id_for(server_id)
        self._data = _Data()
        self._jobs = self._data.jobs
        self._running = False

    def sibling(self, server_id: str) -> MemoryStore:
        """Another store object on the same data, as another server on the same database.

        It writes as ``server_id`` and is started and stopped on its own.
        """
        other = type(self)(server_id)
        other._data = self._data
        other._jobs = self._data.jobs
        return other

    def start(self):
        self._running = True
        return succeed(None)

    def stop(self):
        self._running = False
        return succeed(None)

    # -- writes ----------------------------------------------------------

    @_answer
    def submit(self, specs, now):
        # Encode everything first: a value that is not JSON fails the call
        # before any job is stored.
        encoded = [
            (
                spec,
                dump_json(spec.requires),
                dump_json(spec.params),
                [_Record(dump_json(data)) for data in spec.records],
            )
            for spec in specs
        ]
        ids = []
        for spec, requires, params, records in encoded:
            self._data.last_id += 1
            job = _Job(
                id=self._data.last_id,
                name=spec.name,
                type=spec.type,
                priority=spec.priority,
                requires=requires,
                params=params,
                retries=spec.retries,
                timeout=spec.timeout,
                submitter=spec.submitter,
                created=now,
                updated=now,
                records=records,
            )
            job.add_event(now, "submitted")
            self._jobs[job.id] = job
            ids.append(job.id)
        return ids

    @_answer
    def grant(self, job_id, lease, worker, now):
        job = self._job(job_id)
        if lease is not None and job.lease == lease:
            return self._active(job)  # this claim, made before: sent again
        if _has_event(job, "leased", lease):
            raise StaleLease(f"lease {lease!r} of job {job_id} has ended; a lease is granted once")
        if job.state != "queued":
            raise InvalidState(f"job {job_id} is {job.state}, not queued", state=job.state)
        if job.not_before is not None and job.not_before > now:
            raise InvalidState(
                f"job {job_id} waits out its retry backoff for {job.not_before - now:g} s more", state="queued"
            )
        job.state, job.lease, job.worker, job.attempts = "running", lease, worker, job.attempts + 1
        job.server, job.not_before, job.updated = self.server_id, None, now
        job.add_event(now, "leased", job.attempts, lease, worker)
        return self._active(job)

    @_answer
    def add_results(self, job_id, lease, results, now):
        job = self._job(job_id)
        encoded = encode_results(results)
        if not self._owns(job, lease):
            if encoded and self._all_repeats(job, lease, encoded):
                return job.accepted
            raise _stale(job_id, lease)
        self._accept(job, self._checked(job, lease, encoded), now)
        return job.accepted

    @_answer
    def complete(self, job_id, lease, results, now):
        job = self._job(job_id)
        encoded = encode_results(results)
        if not self._owns(job, lease):
            if job.state == "done" and _has_event(job, "completed", lease):
                return None  # this completion, made before: sent again
            raise _stale(job_id, lease)
        accepted = self._checked(job, lease, encoded)
        missing = len(job.records) - job.accepted - len(accepted)
        if missing:
            raise Incomplete(f"job {job_id} lacks {missing} results", missing=missing)
        self._accept(job, accepted, now)
        job.add_event(now, "completed", job.attempts, lease, job.worker)
        job.state, job.lease, job.worker, job.server, job.updated = "done", None, None, None, now

    @_answer
    def release(self, job_id, lease, state, now, *, reason, error=None, not_before=None, attempts=None):
        if state not in SETTABLE_STATES:
            raise ValueError(f"cannot release a job to {state!r}")
        detail = {"to": state, "reason": reason, "error": error}
        job = self._job(job_id)
        if not self._owns(job, lease):
            if job.lease != lease and _has_event(job, "released", lease, detail):
                return None  # this release, made before: sent again
            raise _stale(job_id, lease)
        job.add_event(now, "released", job.attempts, lease, job.worker, detail)
        job.state, job.not_before, job.updated = state, not_before, now
        job.lease = job.worker = job.server = None
        if attempts is not None:
            job.attempts = attempts

    @_answer
    def set_state(self, job_id, allowed, state, now, *, reason, reset_attempts=False):
        if state not in SETTABLE_STATES:
            raise ValueError(f"cannot set a job to {state!r}")
        job = self._job(job_id)
        if job.state not in allowed or job.lease is not None:
            raise InvalidState(f"job {job_id} is {job.state}", state=job.state)
        job.add_event(now, "state", detail={"from": job.state, "to": state, "reason": reason})
        job.state, job.not_before, job.updated = state, None, now
        if reset_attempts:
            job.attempts = 0

    @_answer
    def beat(self, now, deadline):
        self._data.servers[self.server_id] = (now, deadline)

    @_answer
    def expire_servers(self, now, grace):
        servers = self._data.servers
        gone = {
            server
            for server, (last_beat, deadline) in servers.items()
            if server != self.server_id and now > last_beat + deadline + grace
        }
        for server in gone:
            del servers[server]
        ended = []
        for job in sorted(self._jobs.values(), key=lambda job: job.id):
            if job.state != "running" or job.server == self.server_id:
                continue
            # An owner without a row counts as gone grace seconds after it
            # last changed the job; see gridd.store.sql.thd_expire_servers.
            if job.server in gone or (job.server not in servers and now > job.updated + grace):
                state = "queued" if job.attempts < 1 + job.retries else "failed"
                detail = {"to": state, "reason": "server lost", "error": f"server {job.server} lost"}
                job.add_event(now, "released", job.attempts, job.lease, job.worker, detail)
                job.state, job.not_before, job.updated = state, None, now
                job.lease = job.worker = job.server = None
                ended.append(job.id)
        return ended

    @_answer
    def take_lease(self, job_id, lease, worker, now):
        job = self._job(job_id)
        if lease is None or job.lease != lease:
            raise _stale(job_id, lease)
        if (job.server, job.worker) == (self.server_id, worker):
            return self._active(job)  # taken over by this server already: sent again
        job.add_event(now, "reattached", job.attempts, lease, worker, {"from": job.server})
        job.server, job.worker, job.updated = self.server_id, worker, now
        return self._active(job)

    @_answer
    def end_lease(self, job_id, lease, state, now, *, reason):
        if state not in END_LEASE_STATES:
            raise ValueError(f"cannot end a lease to {state!r}")
        detail = {"to": state, "reason": reason}
        job = self._job(job_id)
        if lease is None or job.state != "running" or job.lease != lease:
            if job.lease != lease and _has_event(job, "released", lease, detail):
                return None  # this end, made before: sent again
            raise InvalidState(f"job {job_id} is {job.state}, not running under lease {lease!r}", state=job.state)
        job.add_event(now, "released", job.attempts, lease, job.worker, detail)
        job.state, job.not_before, job.updated = state, None, now
        job.attempts = 0 if state == "queued" else max(job.attempts - 1, 0)
        job.lease = job.worker = job.server = None

    @_answer
    def add_credential(self, credential_id, role, secret_hash, now, note=None):
        if credential_id in self._data.credentials:
            raise AlreadyExists(f"a credential {credential_id!r} already exists")
        self._data.credentials[credential_id] = {
            "id": credential_id,
            "role": role,
            "created": now,
            "revoked": None,
            "note": note,
            "secret_hash": secret_hash,
        }

    @_answer
    def revoke_credential(self, credential_id, now):
        credential = self._data.credentials.get(credential_id)
        if credential is None:
            raise UnknownCredential(f"no credential {credential_id!r}")
        if credential["revoked"] is None:
            credential["revoked"] = now

    # -- reads -----------------------------------------------------------

    @_answer
    def get_credential(self, credential_id):
        credential = self._data.credentials.get(credential_id)
        return None if credential is None else dict(credential)

    @_answer
    def list_credentials(self):
        return [
            {key: value for key, value in self._data.credentials[i].items() if key != "secret_hash"}
            for i in sorted(self._data.credentials)
        ]

    @_answer
    def runnable(self, now, limit):
        ready = [
            job
            for job in self._jobs.values()
            if job.state == "queued" and (job.not_before is None or job.not_before <= now)
        ]
        ready.sort(key=lambda job: (-job.priority, job.id))
        return [job.id for job in ready[:limit]]

    @_answer
    def own_leases(self):
        return {
            job.id: job.lease
            for job in sorted(self._jobs.values(), key=lambda job: job.id)
            if job.state == "running" and job.server == self.server_id
        }

    @_answer
    def job_states(self, job_ids):
        return [
            {"job": job.id, "state": job.state, "accepted": job.accepted, "total": len(job.records)}
            for job in (self._jobs[job_id] for job_id in sorted(set(job_ids)) if job_id in self._jobs)
        ]

    @_answer
    def load_active(self, job_ids=None):
        return [
            self._active(job)
            for job in self._jobs.values()
            if job.state in ACTIVE_STATES and (job_ids is None or job.id in job_ids)
        ]

    @_answer
    def get_job(self, job_id):
        job = self._job(job_id)
        history = self._history(job)
        return {
            **self._summary(job),
            "requires": _load(job.requires),
            "params": _load(job.params),
            "failed_records": sum(r.error is not None for r in job.records),
            "retries": job.retries,
            "timeout": job.timeout,
            "lease": job.lease,
            "not_before": job.not_before,
            "submitter": job.submitter,
            "history": history,
            "attempt_history": attempts_from_history(history),
            "error": job_error(job.state, history),
        }

    @_answer
    def list_jobs(self, state=None, type=None, after=0, limit=100):
        found = (
            job
            for job in self._jobs.values()
            if job.id > after and (state is None or job.state == state) and (type is None or job.type == type)
        )
        return [self._summary(job) for job in islice(found, limit)]

    @_answer
    def get_results(self, job_id, after=-1, limit=1000):
        job = self._job(job_id)
        found = ((i, r) for i, r in enumerate(job.records) if i > after and r.accepted_at is not None)
        return [
            ({"i": i, "error": r.error} if r.error is not None else {"i": i, "out": _load(r.output)})
            | {"worker": r.worker, "lease": r.lease}
            for i, r in islice(found, limit)
        ]

    @_answer
    def counts(self):
        counts = dict.fromkeys(JOB_STATES, 0)
        for job in self._jobs.values():
            counts[job.state] += 1
        return counts

    # -- helpers ---------------------------------------------------------

    def _job(self, job_id) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise UnknownJob(f"no job {job_id}") from None

    def _active(self, job) -> ActiveJob:
        """The job as ``load_active`` gives it."""
        return ActiveJob(
            id=job.id,
            type=job.type,
            priority=job.priority,
            requires=_load(job.requires),
            params=_load(job.params),
            total=len(job.records),
            state=job.state,
            attempts=job.attempts,
            retries=job.retries,
            timeout=job.timeout,
            lease=job.lease,
            worker=job.worker,
            not_before=job.not_before,
            name=job.name,
            submitter=job.submitter,
            created=job.created,
            pending={i: _load(r.data) for i, r in enumerate(job.records) if r.accepted_at is None},
            leased_at=_leased_at(job),
            failures=failures_since_reset(self._history(job)),
        )

    @staticmethod
    def _history(job) -> list[dict]:
        """The job's events as ``get_job`` gives them (details decoded)."""
        return [{**event, "detail": _load(event["detail"])} for event in job.history]

    def _owns(self, job, lease) -> bool:
        """Is ``lease`` the job's current lease, owned by this server?"""
        return lease is not None and job.lease == lease and job.server == self.server_id

    @staticmethod
    def _all_repeats(job, lease, encoded) -> bool:
        """Is every one of ``encoded`` (distinct indices) a result already accepted under ``lease``, unchanged?"""
        indices = [index for index, _, _ in encoded]
        return len(set(indices)) == len(indices) and all(
            0 <= index < len(job.records) and _repeats(job.records[index], lease, output, error)
            for index, output, error in encoded
        )

    def _checked(self, job, lease, encoded) -> list[tuple[int, str | None, str | None]]:
        """The results of ``encoded`` to accept: each names a pending record of ``job`` once; change nothing.

        Results already accepted under ``lease`` with the same value are
        left out (a repeat); any other result for an accepted record, or a
        record named twice, raises ``DuplicateResult``.
        """
        unknown = sorted({index for index, _, _ in encoded if not 0 <= index < len(job.records)})
        if unknown:
            raise UnknownRecord(f"job {job.id} has no records {unknown}", records=unknown)
        seen, duplicates, fresh = set(), set(), []
        for index, output, error in encoded:
            record = job.records[index]
            if index in seen:
                duplicates.add(index)
            elif record.accepted_at is None:
                fresh.append((index, output, error))
            elif not _repeats(record, lease, output, error):
                duplicates.add(index)
            seen.add(index)
        if duplicates:
            raise DuplicateResult(f"job {job.id} already has results {sorted(duplicates)}", records=sorted(duplicates))
        return fresh

    def _accept(self, job, encoded, now) -> None:
        for index, output, error in encoded:
            record = job.records[index]
            record.accepted_at, record.output, record.error = now, output, error
            record.lease, record.worker = job.lease, job.worker
        if encoded:
            job.accepted += len(encoded)
            job.updated = now

    @staticmethod
    def _summary(job) -> dict:
        return {
            "id": job.id,
            "name": job.name,
            "type": job.type,
            "state": job.state,
            "priority": job.priority,
            "total": len(job.records),
            "accepted": job.accepted,
            "attempts": job.attempts,
            "worker": job.worker,
            "created": job.created,
            "updated": job.updated,
        }
