"""The store interface every implementation honours.

The dispatcher keeps the live scheduling state in memory and the store keeps
the durable truth. Every method returns a Deferred. Writes are acknowledged
(their Deferred fires) only after the transaction holding them has committed;
implementations batch writes that arrive together into one transaction
(group commit), so the Deferred of one write may fire together with many
others'.

The store enforces fencing and once-only results itself, independently of
the dispatcher's in-memory checks: a write that names a lease which is not
the job's current lease raises ``StaleLease``; a result for a record that was
already accepted raises ``DuplicateResult``. A write that raises changes
nothing (each write runs in its own savepoint inside the batch).

Every write a lease makes (``grant``, ``add_results``, ``complete``,
``release``, ``end_lease``, ``take_lease``) is idempotent per job and lease:
the same write sent again after it committed changes nothing and gives the
answer it gave the first time. A write whose outcome is unknown (it failed
with ``gridd.errors.CommitUnknown``: the database connection was lost during
COMMIT) is therefore settled by sending it again, unchanged. This rests on
lease tokens being single-use: a token that once named a lease of a job is
never granted for that job again. What counts as "the same write" is said
per method below; a write that differs (another value, another target
state) is refused as before.

Times are POSIX seconds (floats) passed in by the caller, so the store never
reads a clock of its own.

Records, outputs, params and requires are JSON values. A store keeps them as
JSON text, so what it gives back is an equal copy, never the caller's object;
a value that is not JSON (NaN included) fails the call with ``TypeError`` or
``ValueError``. A store that is not started, or whose database cannot serve
(locked, full, gone), fails calls with ``Unavailable``.

``tests/test_store_contract.py`` runs the same assertions on every
implementation.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "JOB_STATES",
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "SETTABLE_STATES",
    "END_LEASE_STATES",
    "FAILURE_REASONS",
    "JobSpec",
    "RecordResult",
    "ActiveJob",
    "IStore",
    "SchemaTooNew",
    "StoreUnavailable",
    "CommitOutcomeUnknown",
    "attempts_from_history",
    "check_store_uri",
    "failures_since_reset",
    "job_error",
    "poison_error",
    "open_store",
    "server_id_for",
]

#: Every state a job can be in; see protocols/PROTOCOL.md, "Job lifecycle".
JOB_STATES = ("queued", "running", "paused", "done", "failed", "cancelled", "poison")
ACTIVE_STATES = ("queued", "running", "paused")
#: ``poison``: failed on several different workers (``gridd.scheduler.poison``);
#: terminal like ``failed``, and told apart from it.
TERMINAL_STATES = ("done", "failed", "cancelled", "poison")
#: The states ``release`` and ``set_state`` may move a job to: a job becomes
#: running only through ``grant`` and done only through ``complete``.
SETTABLE_STATES = ("queued", "paused", "failed", "cancelled", "poison")
#: The states ``end_lease`` may move a running job to: an operator's
#: requeue, pause or cancel.
END_LEASE_STATES = ("queued", "paused", "cancelled")


class SchemaTooNew(Exception):
    """The database was migrated by a newer gridd than this one.

    Running older code on it could misread or damage data written under the
    newer schema, so ``start()`` refuses instead.
    """

    def __init__(self, found: int, known: int):
        self.found = found
        self.known = known
        super().__init__(
            f"database schema version {found} is newer than this gridd knows "
            f"({known}); run a gridd at least as new as the one that migrated it"
        )


class CommitOutcomeUnknown(Exception):
    """The connection was lost while COMMIT was under way (raised by a driver's connection wrapper).

    The database may have committed the transaction before the connection
    died, or not: nobody can tell from here. Such a batch is never retried
    (it might apply twice) and never acknowledged (it might not have
    applied): its writes fail as ``gridd.errors.CommitUnknown``.
    """


class StoreUnavailable(Exception):
    """The store cannot be opened: no database there, or not one it may use.

    Raised by ``start()`` (and by an SQL store's ``check()``) when the
    database is unreachable, refuses the credentials, does not exist or
    cannot be written. The message is one line meant for the operator, and
    names the store without its password.
    """

    def __init__(self, store: str, reason: str):
        self.store = store
        self.reason = reason
        super().__init__(f"cannot open the store {store}: {reason}")


@dataclass(frozen=True)
class JobSpec:
    """A job as submitted, before it has an id."""

    type: str
    records: list[Any]
    params: dict = field(default_factory=dict)
    priority: int = 0
    #: {"memory": MiB, "tags": [..], "version": "1.2"}; keys optional.
    requires: dict = field(default_factory=dict)
    retries: int = 3
    #: Run-time limit of one attempt in seconds; None means the server default.
    timeout: float | None = None
    name: str | None = None
    submitter: str | None = None


@dataclass(frozen=True)
class RecordResult:
    """One record's result as a worker reports it: a value, or an error text."""

    index: int
    output: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def dump_json(value) -> str:
    """The stores' one JSON form of a value: compact, UTF-8, no NaN (which JSON has not)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_results(results: list[RecordResult]) -> list[tuple[int, str | None, str | None]]:
    """(index, output as JSON or None, error) per result, as every store keeps them; an error has no output.

    Two results are the same result when these are equal: that is how a
    repeated write is recognised.
    """
    return [(r.index, None if r.error is not None else dump_json(r.output), r.error) for r in results]


@dataclass
class ActiveJob:
    """A non-terminal job as the dispatcher needs it after a (re)start."""

    id: int
    type: str
    priority: int
    requires: dict
    params: dict
    total: int
    state: str  # one of ACTIVE_STATES
    attempts: int
    retries: int
    timeout: float | None
    lease: str | None
    worker: str | None
    not_before: float | None
    name: str | None
    submitter: str | None
    created: float
    #: Records without an accepted result, index -> data, in index order.
    pending: dict[int, Any]
    #: When a running job's current lease was granted (its run-time limit counts from then).
    leased_at: float | None = None
    #: (worker, error) of each of its failed attempts since it was last
    #: requeued, oldest first (``failures_since_reset``).
    failures: list[tuple[str | None, str | None]] = field(default_factory=list)


class IStore(Protocol):
    """What the dispatcher and the services need from durable storage.

    Every method returns a ``Deferred``; the types named are what it fires
    with. Errors are ``gridd.errors`` classes unless said otherwise.
    """

    def start(self):
        """Open, create or migrate the schema.

        Fails with ``SchemaTooNew`` on a schema newer than the code, and with
        ``StoreUnavailable`` on a database it cannot open or use.
        """

    def stop(self):
        """Commit every write already accepted, then close."""

    # -- writes (group-committed) -----------------------------------------

    def submit(self, specs: list[JobSpec], now: float):
        """Insert jobs in state ``queued``; fires with their ids, in order."""

    def grant(self, job_id: int, lease: str, worker: str, now: float):
        """Claim a queued job under a new lease; fire with the job as ``ActiveJob``.

        The claim makes the job ``running`` under ``lease`` and ``worker``,
        owned by this server, counts an attempt (``attempts`` becomes the
        stored count plus one) and clears ``not_before``; history event
        ``leased``. The ``ActiveJob`` is read in the claiming transaction:
        state running, the lease, worker, the new attempt count,
        ``leased_at`` = ``now``, and ``pending`` the records that have no
        accepted result yet. Take both from it, never from an earlier copy
        of the job: another server may have accepted results or used
        attempts since.

        Granting again a lease that is the job's current lease is the same
        claim repeated: it fires with the job as it is now (its current
        ``pending``) and changes nothing. A token that was a lease of this
        job before but has ended raises ``StaleLease``: a token is granted
        at most once. Otherwise a job that is not queued raises
        ``InvalidState`` (extra ``state=...``, the job's state), and so does a
        queued job whose retry backoff lasts past ``now`` (``not_before``,
        which another server may have set since this one read the job:
        extra ``state="queued"``); one that does not exist, ``UnknownJob``.
        """

    def add_results(self, job_id: int, lease: str, results: list[RecordResult], now: float):
        """Accept per-record results, all or none; fires with the job's accepted count.

        A result for a record already accepted under this same ``lease``
        with the same value (the same output, as JSON text, and the same
        error) is this write repeated: it is not accepted again, not counted
        again, and not an error. A call of one or more results that are all
        such repeats fires with the job's accepted count even if ``lease``
        is no longer current.

        Otherwise raises ``UnknownJob``; ``StaleLease`` if ``lease`` is not
        the job's current lease or this server is not its owner;
        ``UnknownRecord`` (extra ``records=[...]``) for an index outside the
        job; ``DuplicateResult`` (extra ``records=[...]``) for a record
        accepted under another lease or with another value, or given twice
        in the call. ``updated`` moves only when a result is accepted.
        """

    def complete(self, job_id: int, lease: str, results: list[RecordResult], now: float):
        """Accept trailing results (as add_results), then mark the job ``done``.

        Raises ``Incomplete`` (extra ``missing=n``) unless every record then
        has an accepted result; in that case the trailing results are not
        accepted either. Trailing results that repeat ones accepted under
        ``lease`` count as accepted, as in ``add_results``.

        A job that is ``done`` and whose ``completed`` event names ``lease``
        was completed by this write: sent again, it fires with None and
        changes nothing, whatever ``results`` it carries. Under any other
        lease that is not current it raises ``StaleLease``, done or not.
        """

    def release(
        self,
        job_id: int,
        lease: str,
        state: str,
        now: float,
        *,
        reason: str,
        error: str | None = None,
        not_before: float | None = None,
        attempts: int | None = None,
    ):
        """End a lease: the job moves to ``state`` (queued, paused, failed, cancelled).

        ``reason`` and ``error`` go into the job's history (a ``released``
        event with detail ``{"to": state, "reason", "error"}``).
        ``not_before`` delays a re-queued job (backoff); ``attempts``
        overrides the attempt count (a returned job does not use an attempt).

        If ``lease`` is no longer current and the job's history has a
        ``released`` event naming it with this same detail, the lease was
        ended by this write: sent again, it fires with None and changes
        nothing. Otherwise raises ``UnknownJob``, or ``StaleLease`` (a lease
        ended by anyone else, or for another target, stays stale);
        ``state`` must be one of ``SETTABLE_STATES``.
        """

    def set_state(
        self,
        job_id: int,
        allowed: tuple[str, ...],
        state: str,
        now: float,
        *,
        reason: str,
        reset_attempts: bool = False,
    ):
        """Move a job that holds no lease from one of ``allowed`` to ``state``.

        An operator's move overrides any backoff: ``not_before`` is cleared.
        Raises ``UnknownJob``, or ``InvalidState`` (extra ``state=...``, the
        job's current state); ``state`` must be one of ``SETTABLE_STATES``.
        """

    # -- reads -----------------------------------------------------------

    def load_active(self, job_ids: list[int] | None = None):
        """Fire with every queued, running and paused job as ``ActiveJob``, by id.

        With ``job_ids``, only those of these jobs that are active.
        """

    def get_job(self, job_id: int):
        """Fire with a dict describing the job and its history; see ``job_view``.

        Keys: id, name, type, state, priority, requires, params, total,
        accepted, failed_records, attempts, retries, timeout, lease, worker,
        not_before, submitter, created, updated, history (list of dicts with
        at, event, attempt, lease, worker, detail). Raises ``UnknownJob``.

        ``lease`` and ``worker`` are set exactly while the job is running.
        The history holds, oldest first: ``submitted``; ``leased`` (attempt,
        lease, worker); ``completed`` and ``released`` (the lease's attempt,
        lease and worker; a release's detail is ``{"to", "reason", "error"}``);
        ``state`` for ``set_state`` (detail ``{"from", "to", "reason"}``).
        Results are not events. ``detail`` is None where not given here.

        Two more keys are read from the history (``attempts_from_history``,
        ``job_error``): ``attempt_history``, one dict per lease granted,
        oldest first, with attempt, lease, worker, start, end, outcome and
        error (``attempts`` stays the count, as in ``list_jobs``); and
        ``error``, why a failed or poison job ended (None otherwise).
        """

    def list_jobs(self, state: str | None = None, type: str | None = None, after: int = 0, limit: int = 100):
        """Fire with up to ``limit`` job summaries with id > ``after``, by id.

        A summary has id, name, type, state, priority, total, accepted,
        attempts, worker, created, updated.
        """

    def get_results(self, job_id: int, after: int = -1, limit: int = 1000):
        """Fire with accepted results with index > ``after``, by index.

        Each is ``{"i": index, "out": value}`` or ``{"i": index, "error": text}``,
        plus ``"worker"`` and ``"lease"`` that produced it. Raises ``UnknownJob``.
        """

    def counts(self):
        """Fire with ``{state: number of jobs}`` for every state in JOB_STATES."""

    # -- several servers on one database --------------------------------
    #
    # Every store object belongs to one server: ``server_id`` (a string,
    # unique per running server process, set before ``start``). ``grant``
    # records it as the lease's owner, and the lease-fenced writes
    # (``add_results``, ``complete``, ``release``) check the owner as well as
    # the token: a lease another server took over is stale here
    # (``StaleLease``), except for a write repeated as said for each.

    server_id: str

    def beat(self, now: float, deadline: float):
        """Record that this server is alive (upsert its row in ``servers``).

        ``deadline``: seconds after ``now`` past which, without another
        beat, the server counts as gone.
        """

    def expire_servers(self, now: float, grace: float):
        """End the leases of every other server gone for more than ``grace`` seconds.

        A server is gone once ``now`` > its last beat + its deadline. Each of
        its running jobs ends as if its worker were lost: re-queued at once
        (``not_before`` NULL) if it has attempts left (attempts < 1 +
        retries), else ``failed``; history event ``released`` with detail
        ``{"to", "reason": "server lost", "error": "server S lost"}``. The
        gone server's row is deleted. Fires with the ids of the jobs it
        ended. Several servers may run this at once; each job ends once.

        A running job whose owner has no row at all (it never beat, or it
        granted after its row was deleted and then died) ends the same way
        once ``now`` > the job's ``updated`` + ``grace``: its owner counts as
        gone with its last beat then and no deadline.
        """

    def take_lease(self, job_id: int, lease: str, worker: str, now: float):
        """Make this server the owner of a running job's lease (a worker reattaching here).

        Fires with the job as ``ActiveJob`` (its ``pending`` records are the
        ones still without a result). Raises ``UnknownJob``, or
        ``StaleLease`` if ``lease`` is not the job's current lease. History
        event ``reattached`` (attempt, lease, worker, detail ``{"from": old
        server}``).

        Taking again a lease this server already owns for the same
        ``worker`` is the same write repeated: it fires with the job as it
        is now and changes nothing (no second event).
        """

    def runnable(self, now: float, limit: int):
        """Fire with the ids of up to ``limit`` queued jobs runnable at ``now``.

        Runnable: ``not_before`` NULL or <= ``now``. Highest priority first,
        then lowest id. (A server learns from it what others submitted or
        re-queued.)
        """

    def own_leases(self):
        """Fire with ``{job_id: lease}`` for every running job this server owns."""

    def job_states(self, job_ids: list[int]):
        """Fire with ``{"job", "state", "accepted", "total"}`` for those ids that exist, by id."""

    def end_lease(self, job_id: int, lease: str, state: str, now: float, *, reason: str):
        """End a running job's ``lease`` whoever owns it: an operator on another server acts.

        Fenced by the token, not the owner: moves a job running under
        ``lease`` to ``state`` (queued with attempts reset to 0 for a
        requeue — ``reason`` "requeued" —, paused or cancelled; the lease's
        attempt is not counted: attempts - 1), clearing lease, worker and
        owner; history event ``released`` (detail ``{"to", "reason"}``).

        If ``lease`` is no longer current and a ``released`` event names it
        with this same detail, the lease was ended by this write: sent
        again, it fires with None and changes nothing. Otherwise raises
        ``UnknownJob``, or ``InvalidState`` (extra ``state=...``, the job's
        state) if the job is not running under ``lease``; ``state`` must be
        one of ``END_LEASE_STATES``.
        """

    # -- credentials (gridd.server.auth) ----------------------------------
    #
    # A credential is a dict {"id", "role", "secret_hash", "created",
    # "revoked", "note"}: ``role`` one of worker, submitter, admin;
    # ``secret_hash`` the hex sha256 of the token's secret (the secret itself
    # is never stored); ``revoked`` None or when it was revoked. Writes are
    # group-committed like the others.

    def add_credential(self, credential_id: str, role: str, secret_hash: str, now: float, note: str | None = None):
        """Insert a credential. Raises ``AlreadyExists`` if the id is taken (revoked ones too)."""

    def get_credential(self, credential_id: str):
        """Fire with the credential's dict (``secret_hash`` included), or None."""

    def list_credentials(self):
        """Fire with every credential's dict without ``secret_hash``, by id."""

    def revoke_credential(self, credential_id: str, now: float):
        """Mark a credential revoked at ``now``; revoking it again keeps the first time.

        Raises ``UnknownCredential`` if there is no such credential.
        """


#: Why a lease ended, when the job itself is to blame: its handler failed
#: (FAIL) or it passed its run-time limit. Only these count towards poison.
FAILURE_REASONS = ("failed", "timeout")

#: An attempt's outcome by the reason its lease was released; a reason not
#: named here is its own outcome.
_OUTCOMES = {"disconnected": "expired", "server lost": "expired"}


def attempts_from_history(history: list[dict]) -> list[dict]:
    """The job's attempts, one per ``leased`` event, oldest first, as ``get_job`` gives them.

    Each is ``{"attempt", "lease", "worker", "start", "end", "outcome",
    "error"}``: ``outcome`` is ``running`` until the lease ends, then
    ``done``, ``failed``, ``timeout``, ``returned``, ``expired`` (the worker
    or its server was lost), or the operator's ``requeued``, ``paused``,
    ``cancelled``; ``error`` is the release's. ``worker`` is the one that
    last held the lease (a reattach moves it). ``history`` is decoded, as
    ``get_job`` gives it.
    """
    attempts, open_ = [], {}
    for event in history:
        kind, lease = event["event"], event["lease"]
        if kind == "leased":
            attempt = {
                "attempt": event["attempt"],
                "lease": lease,
                "worker": event["worker"],
                "start": event["at"],
                "end": None,
                "outcome": "running",
                "error": None,
            }
            attempts.append(attempt)
            open_[lease] = attempt
        elif lease in open_ and kind == "reattached":
            open_[lease]["worker"] = event["worker"]
        elif lease in open_ and kind in ("completed", "released"):
            attempt = open_.pop(lease)
            detail = event["detail"] or {}
            reason = detail.get("reason")
            attempt["end"] = event["at"]
            attempt["outcome"] = "done" if kind == "completed" else _OUTCOMES.get(reason, reason)
            attempt["error"] = detail.get("error")
    return attempts


def failures_since_reset(history: list[dict]) -> list[tuple[str | None, str | None]]:
    """(worker, error) of each attempt that failed (``FAILURE_REASONS``) since the job was last requeued.

    An operator's requeue (a ``requeued`` release or state change) starts
    the count afresh: it is what takes a job out of poison.
    """
    failures = []
    for event in history:
        detail = event["detail"] or {}
        if detail.get("reason") == "requeued":
            failures = []
        elif event["event"] == "released" and detail.get("reason") in FAILURE_REASONS:
            failures.append((event["worker"], detail.get("error")))
    return failures


def poison_error(failures: list[tuple[str | None, str | None]]) -> str:
    """``poison: failed on N workers: W1: ERROR, W2: ERROR, ...``: each worker once, with its latest error."""
    last = {}
    for worker, error in failures:
        last.pop(worker, None)
        last[worker] = error
    named = ", ".join(f"{worker}: {error}" for worker, error in last.items())
    return f"poison: failed on {len(last)} workers: {named}"


def job_error(state: str, history: list[dict]) -> str | None:
    """Why a job ended failed (its last release's error) or poison (``poison_error``); else None."""
    if state == "poison":
        return poison_error(failures_since_reset(history))
    if state == "failed":
        for event in reversed(history):
            if event["event"] == "released":
                return (event["detail"] or {}).get("error")
    return None


#: The longest server id a store keeps (MySQL's ``VARCHAR(255)``).
MAX_SERVER_ID = 255


def server_id_for(server_id: str | None) -> str:
    """``server_id`` checked, or a new unique one: ``HOST-PID-RANDOM``.

    The random part keeps two runs of one process id apart (a restart in a
    container that always gets PID 1, say). Raises ``ValueError`` for an
    empty id or one longer than ``MAX_SERVER_ID``.
    """
    if server_id is None:
        return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"[-MAX_SERVER_ID:]
    if not isinstance(server_id, str) or not 0 < len(server_id) <= MAX_SERVER_ID:
        raise ValueError(f"a server id is a string of 1 to {MAX_SERVER_ID} characters, not {server_id!r}")
    return server_id


def open_store(uri: str, reactor=None, server_id: str | None = None) -> IStore:
    """Build (not start) the store an URI names.

    - ``sqlite:PATH`` (or a bare path ending in .db/.sqlite/.sqlite3): the
      embedded store;
    - ``mysql://USER@HOST[:PORT]/DB`` or ``mysql://USER@unix:/SOCKET/PATH/DB``:
      MariaDB or MySQL. The password comes from the file named by
      ``?password_file=PATH`` or else from ``$GRIDD_DB_PASSWORD``, and is read
      when the store starts. A password in the URI itself is refused: command
      lines are visible to every user of the host (``ps``) and end up in logs;
    - ``memory:``: nothing kept.

    ``server_id`` names the server the store object belongs to (see
    ``IStore.server_id``); None makes a new unique one.

    Raises ``ValueError`` for an URI it cannot use.
    """
    if uri == "memory:":
        from gridd.store.memory import MemoryStore

        return MemoryStore(server_id=server_id)
    if uri.startswith("mysql:"):
        from gridd.store.mysql import MySQLStore, parse_mysql_uri

        return MySQLStore(parse_mysql_uri(uri), reactor=reactor, server_id=server_id)
    if uri.startswith("sqlite:") or uri.endswith((".db", ".sqlite", ".sqlite3")):
        from gridd.store.sqlite import SQLiteStore

        path = uri[len("sqlite:") :] if uri.startswith("sqlite:") else uri
        return SQLiteStore(path, reactor=reactor, server_id=server_id)
    raise ValueError(f"unknown store URI {uri!r}: expected sqlite:PATH, mysql://USER@HOST:PORT/DB or memory:")


def check_store_uri(uri: str) -> str:
    """Return ``uri`` if ``open_store`` can use it, else raise ``ValueError`` saying why.

    A ``usage.Options`` coerce function: a wrong ``--db`` is then a usage
    error at once. Builds the store and drops it; nothing is opened.
    """
    open_store(uri)
    return uri
