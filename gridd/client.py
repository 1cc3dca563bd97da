"""The submitter side of gridd: a Python client API over the line protocol.

Two layers:

- :class:`ClientProtocol` is one connection. It speaks the client verbs of
  protocols/PROTOCOL.md (section 9) on top of :class:`gridd.peer.PeerProtocol`,
  which already owns framing, ``rid`` matching, keepalive and the handshake.
  Each method returns a Deferred that fires with the useful part of the ``OK``
  reply, or fails with the ``gridd.errors`` class named by the ``ERR`` code,
  or with :class:`~gridd.peer.ConnectionDropped` when the connection goes
  first. It never reconnects.
- :class:`Client`, what :func:`connect` fires with, has the same methods over
  whichever connection is live, and outlives its connections: it knows every
  server endpoint, and after a loss it reconnects (with backoff, within a
  bound) to any of them when it next needs a connection. ``wait()`` carries on
  across a reconnect; requests that only read are sent again; a request that
  changes state and lost its connection after it was written and before the
  reply is never sent again (its outcome is unknown, PROTOCOL.md section 2)
  and fails with :class:`OutcomeUnknown`, while one that could not be written
  at all (:class:`NotSent`) is sent once the client has reconnected.

:class:`BlockingClient` offers the methods of :class:`Client` to scripts that
do not run a reactor themselves.
"""

from __future__ import annotations

import atexit
import copy
import inspect
import operator
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread

from gridd import errors, tls, wire
from gridd.peer import ConnectionDropped, PeerProtocol

log = Logger()

__all__ = [
    "TERMINAL_STATES",
    "MAX_JOBS_PER_SUBMIT",
    "ClientProtocol",
    "Client",
    "connect",
    "split_submit",
    "BlockingClient",
    "ConnectionDropped",
    "NotSent",
    "OutcomeUnknown",
    "ReconnectFailed",
]

#: States a job does not leave on its own (only an operator's REQUEUE does).
TERMINAL_STATES = frozenset({"done", "failed", "cancelled", "poison"})
#: The most jobs one SUBMIT may carry (PROTOCOL.md 9.1).
MAX_JOBS_PER_SUBMIT = 10_000

_MAX_RID = 2**53 - 1
#: Room for one job's status in a WATCH reply: ``{"job":ID,"state":S,"accepted":A,"total":N}``
#: takes at most about 100 bytes; the rest is margin for fields a newer server adds.
_STATUS_BYTES = 256
#: A SUBMIT line with no job in it and the widest possible rid, without its LF.
_SUBMIT_ENVELOPE = len(wire.encode("SUBMIT", {"jobs": [], "rid": _MAX_RID})) - 1

EventCallback = Callable[[dict], Any]


class _Pages:
    """Walking LIST and RESULTS page by page, over a class's ``list_jobs`` and ``results_page``.

    On a :class:`Client` a page lost with its connection is asked for again.
    """

    async def iter_jobs(
        self, state: str | None = None, type: str | None = None, page_size: int | None = None
    ) -> AsyncIterator[dict]:
        """Yield every matching job, one LIST page at a time."""
        async for job in _walk(lambda after: self.list_jobs(state, type, after, page_size), "jobs"):
            yield job

    def all_jobs(self, state: str | None = None, type: str | None = None) -> Deferred[list[dict]]:
        """Fire with the list of every matching job (all LIST pages)."""
        return Deferred.fromCoroutine(_collect(self.iter_jobs(state, type)))

    async def iter_results(self, job: int, page_size: int | None = None) -> AsyncIterator[dict]:
        """Yield every accepted result of a job, ``{"i", "out" or "error", "worker"}``, in pages."""
        async for result in _walk(lambda after: self.results_page(job, after, page_size), "results"):
            yield result

    def results(self, job: int) -> Deferred[list[dict]]:
        """Fire with every accepted result of a job (all RESULTS pages)."""
        return Deferred.fromCoroutine(_collect(self.iter_results(job)))


class ClientProtocol(_Pages, PeerProtocol):
    """A submitter's connection: one method per client verb of the protocol.

    Watch callbacks and ``wait``'s ``on_event`` receive status dicts
    ``{"job", "state", "accepted", "total"}``; an exception they raise is
    logged and does not disturb the connection.
    """

    role = "client"

    def __init__(self, clock, name: str, token: str, agent: str | None = None):
        super().__init__(clock, name, token, agent)
        self._watches: list[tuple[frozenset[int] | None, EventCallback]] = []
        self._waits: set[Deferred] = set()
        #: True from the moment the connection is lost, before any pending request fails.
        self.lost = False

    @property
    def max_line(self) -> int:
        """The longest line the server accepts: announced by HELLO, 64 KiB before it."""
        if self.welcome is None:
            return wire.PRE_HELLO_MAX_LINE
        return self.welcome.get("max_line", wire.DEFAULT_MAX_LINE)

    # -- submitting -------------------------------------------------------

    def submit(self, jobs: Iterable[dict]) -> Deferred[list[int]]:
        """Submit JOBSPEC dicts (PROTOCOL.md 9.1); fire with their ids, in order.

        The jobs go out in as few SUBMITs as the limits allow (10,000 jobs and
        ``max_line`` bytes each), one after the other. Each SUBMIT commits
        atomically but the whole call does not, so whatever it fails with
        says what became of every job, in ranges of indexes into ``jobs``:

        - ``submitted``: the ids the SUBMITs answered OK committed, those of
          ``jobs[:len(submitted)]``;
        - ``unknown``: the jobs of the SUBMIT that was written and got no
          reply (``ConnectionDropped``), or was answered ``commit_unknown``
          (``gridd.errors.CommitUnknown``): they may or may not exist;
        - ``refused``: the jobs of the SUBMIT the server refused (a
          ``gridd.errors`` class): none of them exists;
        - ``not_sent``: the jobs after those; when a SUBMIT could not be
          written (:class:`NotSent`), its jobs and all later ones: none of
          them exists.

        A job too big for the server's lines fails with ``LineTooLong``: before
        anything is sent, or — after failing over to a server with shorter
        lines — once the SUBMITs before it committed, which the ranges say.
        """
        return Deferred.fromCoroutine(self._submit(list(jobs)))

    async def _submit(self, jobs: list[dict]) -> list[int]:
        submission = _Submission(jobs)
        try:
            chunks = list(split_submit(jobs, self.max_line))
        except errors.GriddError as e:
            submission.failed(e)
            raise
        for chunk in chunks:
            try:
                reply = await self.request("SUBMIT", {"jobs": chunk})
            except NotSent as e:
                submission.failed(e)
                raise
            except errors.CommitUnknown as e:
                submission.failed(e, chunk, "unknown")
                raise
            except errors.GriddError as e:
                submission.failed(e, chunk, "refused")
                raise
            except Exception as e:
                submission.failed(e, chunk, "unknown")
                raise
            submission.committed(chunk, reply["jobs"])
        return submission.ids

    # -- reading ----------------------------------------------------------

    def show(self, job: int) -> Deferred[dict]:
        """Fire with the job's details, including its ``history``."""
        return self._ask("SHOW", {"job": job}, "job")

    def list_jobs(
        self,
        state: str | None = None,
        type: str | None = None,
        after: int | None = None,
        limit: int | None = None,
    ) -> Deferred[dict]:
        """Fire with one page of jobs, ``{"jobs": [...], "next": AFTER_OR_NONE}``.

        Pass ``next`` as ``after`` to get the following page; see
        :meth:`iter_jobs` to walk all of them.
        """
        body = _present(state=state, type=type, after=after, limit=limit)
        return self.request("LIST", body).addCallback(_without_rid)

    def results_page(self, job: int, after: int | None = None, limit: int | None = None) -> Deferred[dict]:
        """Fire with one page of a job's results, ``{"results": [...], "next": AFTER_OR_NONE}``."""
        body = _present(job=job, after=after, limit=limit)
        return self.request("RESULTS", body).addCallback(_without_rid)

    def workers(self) -> Deferred[list[dict]]:
        """Fire with the connected workers."""
        return self._ask("WORKERS", {}, "workers")

    def stats(self) -> Deferred[dict]:
        """Fire with the server's counters: ``jobs`` by state, workers, slots, busy, dispatching."""
        return self.request("STATS").addCallback(_without_rid)

    # -- watching ---------------------------------------------------------

    def watch(self, job_ids: Iterable[int], callback: EventCallback) -> Deferred[list[dict]]:
        """Have ``callback`` called with every EVENT about these jobs (all jobs if empty).

        Fires with the jobs' current status. The callback is registered
        before WATCH is sent, so no event slips between the reply and the
        first EVENT; it stays registered until :meth:`unwatch` or until the
        connection is lost, and is dropped at once if the server refuses.
        Long lists go out in several WATCHes so that each reply, one status
        per job, fits in ``max_line``.
        """
        jobs = list(job_ids)
        entry = (frozenset(jobs) or None, callback)
        self._watches.append(entry)
        return Deferred.fromCoroutine(self._watch(jobs, entry))

    async def _watch(self, jobs: list[int], entry) -> list[dict]:
        per_request = max(1, self.max_line // _STATUS_BYTES)
        batches = [jobs[start : start + per_request] for start in range(0, len(jobs), per_request)] or [[]]
        statuses = []
        try:
            for batch in batches:
                statuses.extend((await self.request("WATCH", {"jobs": batch}))["jobs"])
        except Exception:
            if entry in self._watches:
                self._watches.remove(entry)
            raise
        return statuses

    def unwatch(self, callback: EventCallback) -> None:
        """Stop calling ``callback``. The protocol has no UNWATCH: the server keeps sending."""
        self._watches = [entry for entry in self._watches if entry[1] != callback]

    def wait(self, job_ids: Iterable[int], on_event: EventCallback | None = None) -> Deferred[dict[int, dict]]:
        """Fire when every one of these jobs is done, failed or cancelled, with their statuses.

        Driven by WATCH and its EVENTs, never by polling. ``on_event`` sees
        the status of each job from the WATCH reply and then every EVENT,
        which is what a progress display needs. An empty list fires at once.
        Fails with ``ConnectionDropped`` if the connection is lost first
        (:meth:`Client.wait` reconnects and carries on instead); cancelling
        the Deferred stops the watch.
        """
        return Deferred.fromCoroutine(self._wait(list(job_ids), on_event))

    async def _wait(self, job_ids: list[int], on_event: EventCallback | None) -> dict[int, dict]:
        statuses: dict[int, dict] = {}
        unfinished = set(job_ids)
        all_final: Deferred[None] = Deferred()

        def seen(status):
            job = status["job"]
            statuses[job] = status
            if status["state"] in TERMINAL_STATES:
                unfinished.discard(job)
            else:
                unfinished.add(job)
            if on_event is not None:
                self._call_safely(on_event, status)
            if not unfinished and not all_final.called:
                all_final.callback(None)

        if not unfinished:
            return statuses
        self._waits.add(all_final)
        try:
            for status in await self.watch(job_ids, seen):
                # An EVENT that overtook the reply is newer than the snapshot.
                if status["job"] not in statuses:
                    seen(status)
            await all_final
        finally:
            self._waits.discard(all_final)
            self.unwatch(seen)
        return statuses

    def notification(self, message: wire.Message):
        if message.verb != "EVENT":
            super().notification(message)
            return
        job = message.body["job"]
        for jobs, callback in list(self._watches):
            if jobs is None or job in jobs:
                self._call_safely(callback, dict(message.body))

    def _call_safely(self, callback: EventCallback, status: dict) -> None:
        try:
            callback(status)
        except Exception:
            self.log.failure("watch callback {callback!r} failed", callback=callback)

    # -- control ----------------------------------------------------------

    def cancel(self, job: int) -> Deferred[str]:
        """Cancel a queued, running or paused job; fire with its new state."""
        return self._ask("CANCEL", {"job": job}, "state")

    def pause(self, job: int) -> Deferred[str]:
        """Pause a queued or running job; fire with its new state."""
        return self._ask("PAUSE", {"job": job}, "state")

    def resume(self, job: int) -> Deferred[str]:
        """Queue a paused job again; fire with its new state."""
        return self._ask("RESUME", {"job": job}, "state")

    def requeue(self, job: int) -> Deferred[str]:
        """Queue a running, failed, cancelled or poison job afresh; fire with its new state."""
        return self._ask("REQUEUE", {"job": job}, "state")

    def worker_action(self, name: str, action: str) -> Deferred[None]:
        """``drain``, ``undrain`` or ``disconnect`` a connected worker."""
        return self.request("WORKER", {"worker": name, "action": action}).addCallback(lambda _: None)

    def worker_host(self, name: str, busy: bool, reason: str | None = None) -> Deferred[bool]:
        """Say that worker ``name``'s host is busy (or idle again); fire with whether it is connected there.

        The server relays it to the worker (``HOST``) now if it is connected,
        and again after its next HELLO.
        """
        body = {"worker": name, "action": "busy" if busy else "idle"}
        if reason:
            body["reason"] = reason
        return self._ask("WORKER", body, "connected")

    def clear_worker(self, name: str) -> Deferred[list[str]]:
        """Lift a worker's flags (the job types it is given none of); fire with the types cleared."""
        return self._ask("WORKER", {"worker": name, "action": "clear"}, "cleared")

    def dispatch(self, enabled: bool) -> Deferred[bool]:
        """Turn the global stop switch; fire with whether the server now dispatches."""
        return self._ask("DISPATCH", {"enabled": enabled}, "dispatching")

    # -- credentials (admin only) ----------------------------------------

    def add_credential(self, credential_id: str, role: str, note: str | None = None) -> Deferred[str]:
        """Create a credential (``worker``, ``submitter`` or ``admin``); fire with its token ``ID.SECRET``.

        The token is shown this once: the server keeps only a hash of it.
        """
        body = _present(action="add", id=credential_id, role=role, note=note)
        return self._ask("CREDENTIAL", body, "token")

    def list_credentials(self) -> Deferred[list[dict]]:
        """Fire with every credential: ``{"id", "role", "created", "revoked", "note"}`` (never a secret)."""
        return self._ask("CREDENTIAL", {"action": "list"}, "credentials")

    def revoke_credential(self, credential_id: str) -> Deferred[None]:
        """Revoke a credential: it cannot log in again, and its live connections are closed."""
        return self.request("CREDENTIAL", {"action": "revoke", "id": credential_id}).addCallback(lambda _: None)

    # -- connection -------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Close the connection; fire once it is closed."""
        closed: Deferred[None] = Deferred()

        def fire(result):
            closed.callback(None)
            return result

        self.closed.addBoth(fire)
        self.transport.loseConnection()
        return closed

    @property
    def usable(self) -> bool:
        """Whether a request made now would be written to an open connection: not lost, nor closing."""
        return not (self.lost or self._lost or self._aborted or getattr(self.transport, "disconnecting", False))

    def request(self, verb: str, body: dict | None = None) -> Deferred:
        """Send a request; on a connection lost or closing, write nothing and fail at once with :class:`NotSent`.

        A connection whose transport says it is closing (``disconnecting``:
        after ``loseConnection``, and over TLS after ``abortConnection`` too,
        as when the server fell silent past its deadline) might still carry
        the line out, or might drop it: writing nothing keeps "not sent"
        certain. So does a connection this side aborted (the server fell
        silent past its deadline, or sent an over-long line), over TCP too.
        """
        if not self.usable:
            state = "lost" if self.lost or self._lost else "closing"
            return fail(NotSent(f"{verb} not sent: the connection is {state}"))
        return super().request(verb, body)

    def connectionLost(self, reason):
        self.lost = True
        super().connectionLost(reason)
        self._watches.clear()
        waits, self._waits = self._waits, set()
        for d in waits:
            if not d.called:
                d.errback(ConnectionDropped(f"connection lost: {reason.getErrorMessage()}"))

    def _ask(self, verb: str, body: dict, field: str) -> Deferred:
        return self.request(verb, body).addCallback(operator.itemgetter(field))


def split_submit(jobs: list[dict], max_line: int, start: int = 0) -> Iterator[list[dict]]:
    """Split ``jobs[start:]`` into SUBMIT batches of at most 10,000 jobs whose line fits ``max_line``.

    Sizes are measured with :func:`gridd.wire.encode` itself, with room for
    the widest ``rid``. The reply fits too: an id takes fewer bytes than the
    smallest job. Raises ``LineTooLong`` for a job no line can hold, naming
    its index in ``jobs``.
    """
    chunk: list[dict] = []
    size = _SUBMIT_ENVELOPE
    for index in range(start, len(jobs)):
        job = jobs[index]
        job_size = len(wire.encode("SUBMIT", {"jobs": [job], "rid": _MAX_RID})) - 1 - _SUBMIT_ENVELOPE
        if _SUBMIT_ENVELOPE + job_size > max_line:
            raise errors.LineTooLong(
                f"job {index} needs {job_size} bytes but a line holds at most {max_line}:"
                " split its records into more jobs",
                max_line=max_line,
            )
        if chunk and (len(chunk) == MAX_JOBS_PER_SUBMIT or size + 1 + job_size > max_line):
            yield chunk
            chunk, size = [], _SUBMIT_ENVELOPE
        size += job_size + (1 if chunk else 0)
        chunk.append(job)
    if chunk:
        yield chunk


class NotSent(ConnectionDropped):
    """A request was not written: its connection was already lost, or closing.

    No server saw it, so sending it again cannot make it happen twice: the
    :class:`Client` does, once it has reconnected. Only a
    :class:`ClientProtocol`, which never reconnects, fails a call with it.
    """


class OutcomeUnknown(ConnectionDropped):
    """A request that changes state lost its connection after it was written and before its reply.

    The server may or may not have carried it out (PROTOCOL.md section 2), so
    the client does not send it again: look (``show``, ``list_jobs``) before
    repeating it. ``verb`` names the request and ``endpoint`` the server it
    went to. For a ``submit`` the ranges of indexes into its ``jobs`` say
    what became of each job (see :meth:`ClientProtocol.submit`):
    ``submitted`` lists the ids that earlier SUBMITs committed, ``unknown`` is
    the range of the lost SUBMIT, ``not_sent`` that of the jobs after it;
    ``refused`` is empty. For any other verb all of them are empty. The
    :class:`Client` stays usable: its next call reconnects.
    """

    def __init__(
        self,
        message: str,
        verb: str,
        submitted: list[int] | None = None,
        *,
        unknown: range = range(0),
        not_sent: range = range(0),
        endpoint: str | None = None,
    ):
        super().__init__(message)
        self.verb = verb
        self.endpoint = endpoint
        self.submitted = list(submitted or [])
        self.unknown = unknown
        self.refused = range(unknown.start, unknown.start)
        self.not_sent = not_sent

    def __reduce__(self):
        return _rebuilt, (type(self), self.args, self.__dict__)


class ReconnectFailed(ConnectionDropped):
    """The connection was lost and no server took the client back within its bound.

    ``rounds`` is how many rounds over the endpoints were tried since the
    client was last served, and ``last_error`` why the last attempt failed
    (or why the connection was lost, when no round was allowed). A request
    that changes state and fails with this was not sent; from a ``submit``
    it carries ``submitted`` (the ids of the SUBMITs committed before) and
    ``not_sent``, like :class:`OutcomeUnknown`.
    """

    def __init__(self, message: str, rounds: int, last_error: Exception | None):
        super().__init__(message)
        self.rounds = rounds
        self.last_error = last_error

    def __reduce__(self):
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls, args, state):
    """Unpickle (or copy) an exception whose ``__init__`` takes more than its message."""
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class _Submission:
    """A submit under way: its jobs, the ids committed so far, and what became of each job when it fails."""

    def __init__(self, jobs: list[dict]):
        self.jobs = jobs
        self.ids: list[int] = []
        #: ``jobs[:done]`` are committed.
        self.done = 0

    def committed(self, chunk: list[dict], ids: list[int]) -> None:
        self.ids.extend(ids)
        self.done += len(chunk)

    def fates(self, chunk: list[dict] | None = None, fate: str | None = None) -> dict:
        """Each job's fate, in ranges of indexes: ``chunk``, the next jobs, is ``fate`` or, without one, not sent."""
        end = self.done + (len(chunk) if chunk is not None else 0)
        none = range(self.done, self.done)
        return {
            "submitted": list(self.ids),
            "unknown": range(self.done, end) if fate == "unknown" else none,
            "refused": range(self.done, end) if fate == "refused" else none,
            "not_sent": range(end, len(self.jobs)),
        }

    def failed(self, error: Exception, chunk: list[dict] | None = None, fate: str | None = None) -> Exception:
        """Give the exception a failed submit raises the fate of each job (see :meth:`ClientProtocol.submit`)."""
        for name, value in self.fates(chunk, fate).items():
            setattr(error, name, value)
        return error

    def outcome_unknown(self, chunk: list[dict], spec: str | None, cause: ConnectionDropped) -> OutcomeUnknown:
        """The OutcomeUnknown of a SUBMIT (of ``chunk``) that lost its connection after it was written."""
        fates = self.fates(chunk, "unknown")
        message = _unknown_message(spec, "SUBMIT", cause)
        unknown, not_sent = fates["unknown"], fates["not_sent"]
        if self.ids or not_sent:  # more than one SUBMIT: say which jobs exist
            parts = [f"jobs[:{self.done}] were committed (ids in .submitted)"] if self.ids else []
            parts.append(f"jobs[{unknown.start}:{unknown.stop}] may or may not have been (.unknown)")
            if not_sent:
                parts.append(f"jobs[{not_sent.start}:{not_sent.stop}] were not sent (.not_sent)")
            message += f". Of {len(self.jobs)} jobs, " + ", ".join(parts)
        return OutcomeUnknown(message, "SUBMIT", fates["submitted"], unknown=unknown, not_sent=not_sent, endpoint=spec)


def _unknown_message(spec: str | None, verb: str, cause: ConnectionDropped) -> str:
    return (
        f"the connection to {spec} was lost before the reply to {verb} ({cause}): the server may or may"
        " not have carried it out, so it was not sent again; look before repeating it"
    )


def _own(error: Exception) -> Exception:
    """A copy of an exception that several calls may share (a failed reconnection), to annotate safely."""
    try:
        return copy.copy(error)
    except Exception:
        return error


class _GaveUp(Exception):
    """Internal: every round allowed was tried; ``last`` is the last attempt's error."""

    def __init__(self, last: Exception | None, rounds: int):
        super().__init__(last)
        self.last = last
        self.rounds = rounds


#: Pauses between rounds of connection attempts: 0.5 s doubling up to 10 s,
#: plus Twisted's default jitter (up to 1 s) so that clients cut off together
#: do not all come back at the same instant.
DEFAULT_RETRY_POLICY = backoffPolicy(initialDelay=0.5, maxDelay=10.0, factor=2.0)

#: A connector opens a transport to one endpoint for a protocol and fires when
#: it is connected (``connectProtocol`` over an endpoint does exactly this).
Connector = Callable[[str, ClientProtocol], Deferred]


def _resent(name: str):
    """A Client method that only reads: run on the live connection, and again after a reconnect."""

    def call(self, *args, **kwargs):
        return Deferred.fromCoroutine(self._read(lambda protocol: getattr(protocol, name)(*args, **kwargs)))

    return _described(
        call,
        name,
        "Only reads: if the connection is lost before the reply, the request is sent again"
        " once the client has reconnected.",
    )


def _sent_once(name: str, verb: str):
    """A Client method that changes state: never sent again after its connection dropped."""

    def call(self, *args, **kwargs):
        return Deferred.fromCoroutine(self._change(verb, lambda protocol: getattr(protocol, name)(*args, **kwargs)))

    return _described(
        call,
        name,
        f"Changes state: if the connection is lost after {verb} was written and before its reply,"
        " fails with OutcomeUnknown and is not sent again. A connection found lost or closing"
        f" before {verb} was written is replaced first: the client reconnects, then sends it once.",
    )


def _described(call, name: str, note: str):
    call.__name__ = name
    call.__qualname__ = f"Client.{name}"
    call.__doc__ = inspect.cleandoc(getattr(ClientProtocol, name).__doc__) + "\n\n" + note
    return call


class Client(_Pages):
    """A submitter's session with the grid: the methods of :class:`ClientProtocol`, over connections that come and go.

    :func:`connect` makes one and opens its first connection. When that
    connection is lost (its server died, restarted or said BYE, the network
    failed, or the server fell silent past its keepalive deadline) nothing
    happens until the client next needs a connection. Then it reconnects:

    - the endpoints are tried in turn, starting with the one after the lost
      server's, in rounds: the first round at once, each next one after a
      pause from ``retry_policy`` (:data:`DEFAULT_RETRY_POLICY`);
    - within a bound: no round starts later than ``reconnect_deadline``
      seconds (default 60) after the client was last *served* (a reply or an
      EVENT arrived), nor after ``reconnect_rounds`` rounds (default: only
      the deadline bounds). Past it the call fails with
      :class:`ReconnectFailed`. A server that accepts the HELLO and then
      drops every request does not reset the bound, so no call retries for
      ever; ``None`` for both does mean for ever. ``reconnect_rounds=0``
      turns reconnecting off;
    - a refused HELLO (``auth_failed`` after the credential was revoked, say)
      fails the call at once with its ``gridd.errors`` class, as another
      server would refuse it too; ``shutting_down`` and ``unavailable`` move
      on to the next server;
    - calls that need a connection at the same time share one reconnection.

    What each call does when its connection is lost:

    - :meth:`wait` reconnects, sends HELLO and WATCH again for the jobs not
      yet finished, takes their states from the WATCH reply (``on_event``
      sees them, so a progress display catches up) and carries on. A job it
      has seen finish is not watched again.
    - ``show``, ``list_jobs``, ``results_page``, ``workers``, ``stats``,
      ``list_credentials`` and ``watch`` only read: they are sent again on
      the new connection; ``iter_jobs``, ``all_jobs``, ``iter_results`` and
      ``results`` go on from the page that was lost.
    - ``submit``, ``cancel``, ``pause``, ``resume``, ``requeue``,
      ``worker_action``, ``clear_worker``, ``dispatch``, ``add_credential`` and
      ``revoke_credential`` change state, and are never written twice. A
      connection lost after the request was written and before its reply
      fails the call with :class:`OutcomeUnknown`, and the request is not
      sent again. A request that could not be written, because its
      connection was found lost or closing first (:class:`NotSent`), is sent
      once the client has reconnected, like a call that starts with no
      connection: nothing reached any server, so this cannot make it happen
      twice, and failing instead would leave a submit of several SUBMITs
      half done for its caller to finish. The client stays usable.
    - a :meth:`watch` callback lives as long as the connection that
      registered it (``closed`` fires when that connection is lost): use
      :meth:`wait` to follow jobs across reconnects.

    After :meth:`close`, every call fails with ``ConnectionDropped``.

    Not ``ClientService``: it reconnects at once and for ever in the
    background (an idle script would keep connecting to a server it no longer
    needs) and has no deadline; a client needs a connection only while a
    call runs.
    """

    def __init__(
        self,
        reactor,
        endpoints: str | Sequence[str],
        token: str,
        name: str = "gridctl",
        *,
        handshake_timeout: float = 10.0,
        reconnect_deadline: float | None = 60.0,
        reconnect_rounds: int | None = None,
        retry_policy: Callable[[int], float] | None = None,
        connector: Connector | None = None,
    ):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.endpoints: list[str] = list(endpoints)
        if not self.endpoints:
            raise ValueError("no server endpoint given")
        for spec in self.endpoints:  # a malformed endpoint fails before any attempt
            try:
                tls.client_endpoint(reactor, spec)
            except ValueError as e:
                raise ValueError(f"{spec!r}: {e}") from None
        self._reactor = reactor
        self._token = token
        self._name = name
        self._handshake_timeout = handshake_timeout
        self.reconnect_deadline = reconnect_deadline
        self.reconnect_rounds = reconnect_rounds
        self._retry_policy = retry_policy or DEFAULT_RETRY_POLICY
        self._connector = connector or self._connect_endpoint
        self._protocol: ClientProtocol | None = None
        self._index: int | None = None
        self._reconnecting: Deferred[ClientProtocol] | None = None
        self._waiters: list[Deferred[ClientProtocol]] = []
        self._closed = False
        # The bound of the current reconnection: since when nothing was served, and rounds tried since.
        self._unserved_since: float | None = None
        self._unserved_rounds = 0
        self._loss: Exception | None = None

    # -- the current connection --------------------------------------------

    @property
    def protocol(self) -> ClientProtocol | None:
        """The current (or last) connection."""
        return self._protocol

    @property
    def endpoint(self) -> str | None:
        """The endpoint of the current (or last) connection."""
        return None if self._index is None else self.endpoints[self._index]

    @property
    def closed(self) -> Deferred[None]:
        """Fires when the current connection is lost, whatever the reason (the client may reconnect later)."""
        return self._protocol.closed

    @property
    def bye_reason(self) -> str | None:
        """The reason of the BYE the current connection's server sent, if any."""
        return self._protocol.bye_reason

    @property
    def welcome(self) -> dict | None:
        """The HELLO reply of the current connection."""
        return self._protocol.welcome

    @property
    def max_line(self) -> int:
        """The longest line the current connection's server accepts."""
        return self._protocol.max_line

    # -- the calls ---------------------------------------------------------

    def submit(self, jobs: Iterable[dict]) -> Deferred[list[int]]:
        """Submit JOBSPEC dicts (PROTOCOL.md 9.1); fire with their ids, in order.

        As :meth:`ClientProtocol.submit`: as few SUBMITs as the limits allow,
        one after the other, each committed atomically; whatever the call
        fails with carries ``submitted``, ``unknown``, ``refused`` and
        ``not_sent``, which say what became of each job.

        Changes state, so no SUBMIT is written twice. One whose connection is
        lost after it was written and before its reply fails the call with
        :class:`OutcomeUnknown`: its jobs are ``unknown``, the later ones
        ``not_sent``, and nothing more is sent. One that could not be written
        (its connection was found lost or closing first) reached no server:
        the client reconnects and sends it and the rest there, split anew if
        the new server's ``max_line`` differs. When no server takes the
        client back, :class:`ReconnectFailed` carries the same attributes.
        """
        return Deferred.fromCoroutine(self._submit(list(jobs)))

    show = _resent("show")
    list_jobs = _resent("list_jobs")
    results_page = _resent("results_page")
    workers = _resent("workers")
    stats = _resent("stats")
    cancel = _sent_once("cancel", "CANCEL")
    pause = _sent_once("pause", "PAUSE")
    resume = _sent_once("resume", "RESUME")
    requeue = _sent_once("requeue", "REQUEUE")
    worker_action = _sent_once("worker_action", "WORKER")
    worker_host = _sent_once("worker_host", "WORKER")
    clear_worker = _sent_once("clear_worker", "WORKER clear")
    dispatch = _sent_once("dispatch", "DISPATCH")
    add_credential = _sent_once("add_credential", "CREDENTIAL add")
    list_credentials = _resent("list_credentials")
    revoke_credential = _sent_once("revoke_credential", "CREDENTIAL revoke")

    def watch(self, job_ids: Iterable[int], callback: EventCallback) -> Deferred[list[dict]]:
        """Have ``callback`` called with every EVENT about these jobs (all jobs if empty), on the current connection.

        Fires with the jobs' current status. WATCH only reads, so it is sent
        again if the connection is lost before the reply; once it is
        answered, the callback lasts as long as that connection (or until
        :meth:`unwatch`): after a loss nothing watches again. :meth:`wait`
        follows jobs across reconnects.
        """
        jobs = list(job_ids)
        return Deferred.fromCoroutine(self._read(lambda protocol: protocol.watch(jobs, callback)))

    def unwatch(self, callback: EventCallback) -> None:
        """Stop calling ``callback``. The protocol has no UNWATCH: the server keeps sending."""
        if self._protocol is not None:
            self._protocol.unwatch(callback)

    def wait(self, job_ids: Iterable[int], on_event: EventCallback | None = None) -> Deferred[dict[int, dict]]:
        """Fire when every one of these jobs is done, failed or cancelled, with their statuses.

        Driven by WATCH and its EVENTs, never by polling. ``on_event`` sees
        the status of each job from the WATCH reply and then every EVENT,
        which is what a progress display needs. An empty list fires at once.

        When the connection is lost the client reconnects (see
        :class:`Client`), sends WATCH for the jobs not yet finished and
        carries on; ``on_event`` then sees their states from the new WATCH
        reply. Fails with :class:`ReconnectFailed` when no server takes the
        client back within its bound, and with the ``gridd.errors`` class of
        a refused HELLO or WATCH. Cancelling the Deferred stops the watch
        (and a reconnection nobody else waits for).
        """
        return Deferred.fromCoroutine(self._wait(list(job_ids), on_event))

    async def _wait(self, job_ids: list[int], on_event: EventCallback | None) -> dict[int, dict]:
        statuses: dict[int, dict] = {}
        jobs = list(dict.fromkeys(job_ids))

        def seen(status):
            self._served()
            statuses[status["job"]] = status
            if on_event is not None:
                on_event(status)

        while True:
            unfinished = [job for job in jobs if statuses.get(job, {}).get("state") not in TERMINAL_STATES]
            if not unfinished:
                return statuses
            protocol = await self._live()
            try:
                await protocol.wait(unfinished, seen)
            except ConnectionDropped as e:
                self._dropped(e, "WATCH")
            except errors.GriddError:
                self._served()
                raise

    def close(self) -> Deferred[None]:
        """Close the connection and stop any reconnection; fire once closed. Later calls fail."""
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        protocol = self._protocol
        if protocol is None or protocol.lost:
            return succeed(None)
        return protocol.close()

    # -- running a call ------------------------------------------------------

    async def _read(self, call: Callable[[ClientProtocol], Deferred]):
        """Run a request that only reads, on a new connection again if its own is lost first."""
        while True:
            protocol = await self._live()
            try:
                result = await call(protocol)
            except ConnectionDropped as e:
                self._dropped(e, "a read")
                continue
            except errors.GriddError:
                self._served()
                raise
            self._served()
            return result

    async def _change(self, verb: str, call: Callable[[ClientProtocol], Deferred]):
        """Run a request that changes state: never sent again once it was written.

        A request that was not written (NotSent) is sent on the next
        connection: no server saw it.
        """
        while True:
            protocol = await self._live()
            spec = self.endpoint
            try:
                result = await call(protocol)
            except NotSent as e:
                self._dropped(e, verb)
                continue
            except ConnectionDropped as e:
                raise OutcomeUnknown(_unknown_message(spec, verb, e), verb, endpoint=spec) from e
            except errors.GriddError:
                self._served()
                raise
            self._served()
            return result

    async def _submit(self, jobs: list[dict]) -> list[int]:
        """Send the SUBMITs one after the other, each SUBMIT not written again on the next connection."""
        submission = _Submission(jobs)
        if self._closed:
            raise submission.failed(ConnectionDropped("the client was closed"))
        chunks: list[list[dict]] = []
        max_line = None
        while submission.done < len(jobs):
            try:
                protocol = await self._live()
            except Exception as e:
                raise submission.failed(_own(e)) from e.__cause__
            spec = self.endpoint
            if protocol.max_line != max_line:  # a new server may take shorter lines
                max_line = protocol.max_line
                try:
                    chunks = list(split_submit(jobs, max_line, submission.done))
                except errors.GriddError as e:
                    submission.failed(e)
                    raise
            chunk = chunks[0]
            try:
                reply = await protocol.request("SUBMIT", {"jobs": chunk})
            except NotSent as e:
                try:
                    self._dropped(e, "SUBMIT")
                except ConnectionDropped as closed:
                    raise submission.failed(closed) from e
                continue
            except ConnectionDropped as e:
                raise submission.outcome_unknown(chunk, spec, e) from e
            except errors.CommitUnknown as e:
                self._served()
                submission.failed(e, chunk, "unknown")
                raise
            except errors.GriddError as e:
                self._served()
                submission.failed(e, chunk, "refused")
                raise
            except Exception as e:
                submission.failed(e, chunk, "unknown")
                raise
            self._served()
            submission.committed(chunk, reply["jobs"])
            chunks.pop(0)
        return submission.ids

    def _served(self) -> None:
        """A reply or an EVENT arrived: the next loss gets a fresh reconnection bound."""
        self._unserved_since = None
        self._unserved_rounds = 0

    def _dropped(self, error: ConnectionDropped, what: str) -> None:
        """A call's connection was lost under it: raise if the client is closed, else note why."""
        if self._closed:
            raise ConnectionDropped("the client was closed") from error
        self._loss = error
        log.info("lost the connection to {spec} during {what}: {e}", spec=self.endpoint, what=what, e=error)

    # -- connecting ----------------------------------------------------------

    async def _open(self, rounds: int) -> None:
        """The first connection: up to ``rounds`` rounds; fails with the last attempt's error."""
        try:
            index, protocol = await self._dial(0, rounds=rounds, deadline=None, since=self._reactor.seconds(), done=0)
        except _GaveUp as e:
            raise (e.last or ValueError(f"rounds must be at least 1, not {rounds}")) from None
        self._adopt(index, protocol)
        self._served()

    async def _live(self) -> ClientProtocol:
        """The live connection, reconnecting first if it was lost."""
        if self._closed:
            raise ConnectionDropped("the client was closed")
        protocol = self._protocol
        if protocol is not None and protocol.usable:
            return protocol
        waiter: Deferred[ClientProtocol] = Deferred(self._forget)
        self._waiters.append(waiter)
        if self._reconnecting is None:
            self._reconnecting = Deferred.fromCoroutine(self._reconnect())
            self._reconnecting.addBoth(self._reconnect_ended)
        return await waiter

    def _forget(self, waiter: Deferred) -> None:
        """A waiter was cancelled: stop reconnecting if nobody else waits."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        if not self._waiters and self._reconnecting is not None:
            self._reconnecting.cancel()

    def _reconnect_ended(self, result) -> None:
        self._reconnecting = None
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure) and self._closed and result.check(CancelledError):
            result = Failure(ConnectionDropped("the client was closed"))
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _reconnect(self) -> ClientProtocol:
        now = self._reactor.seconds()
        if self._unserved_since is None:
            self._unserved_since = now
        lost = self.endpoint
        first = 0 if self._index is None else (self._index + 1) % len(self.endpoints)
        log.info("reconnecting after losing {spec}", spec=lost)
        try:
            index, protocol = await self._dial(
                first,
                rounds=self.reconnect_rounds,
                deadline=self.reconnect_deadline,
                since=self._unserved_since,
                done=self._unserved_rounds,
            )
        except _GaveUp as e:
            last = e.last or self._loss
            why = f"{str(last) or type(last).__name__}" if last is not None else "no reason given"
            if self.reconnect_rounds == 0:
                message = f"lost the connection to {lost}, and reconnecting is off (reconnect_rounds=0): {why}"
            else:
                bounds = [f"{self.reconnect_deadline:g} s" if self.reconnect_deadline is not None else None]
                bounds.append(f"{self.reconnect_rounds} rounds" if self.reconnect_rounds is not None else None)
                elapsed = self._reactor.seconds() - self._unserved_since
                message = (
                    f"lost the connection to {lost} and could not reconnect to {' or '.join(self.endpoints)}"
                    f" within {' or '.join(b for b in bounds if b)} ({e.rounds} rounds over {elapsed:.1f} s): {why}"
                )
            raise ReconnectFailed(message, e.rounds, last) from last
        if self._closed:  # closed while the last attempt was settling
            protocol.transport.loseConnection()
            raise ConnectionDropped("the client was closed")
        self._adopt(index, protocol)
        log.info("reconnected to {spec}", spec=self.endpoint)
        return protocol

    def _adopt(self, index: int, protocol: ClientProtocol) -> None:
        self._index, self._protocol = index, protocol
        spec = self.endpoints[index]

        def lost(_):
            if not self._closed:
                reason = f" (BYE {protocol.bye_reason})" if protocol.bye_reason else ""
                log.warn("connection to gridd server {spec} lost{reason}", spec=spec, reason=reason)

        protocol.closed.addCallback(lost)

    async def _dial(
        self, first: int, *, rounds: int | None, deadline: float | None, since: float, done: int
    ) -> tuple[int, ClientProtocol]:
        """Try every endpoint from ``first`` on, round after round, until one accepts the HELLO.

        ``done`` rounds were tried already since ``since``. No round starts
        after ``rounds`` rounds or later than ``since + deadline``; then
        ``_GaveUp``. A refused HELLO other than ``shutting_down`` or
        ``unavailable`` is raised at once.
        """
        order = [(first + k) % len(self.endpoints) for k in range(len(self.endpoints))]
        last: Exception | None = None
        while True:
            if self._closed:
                raise CancelledError("the client was closed")
            delay = self._retry_policy(done - 1) if done else 0.0
            if rounds is not None and done >= rounds:
                raise _GaveUp(last, done)
            if deadline is not None and self._reactor.seconds() + delay > since + deadline:
                raise _GaveUp(last, done)
            if delay:
                await deferLater(self._reactor, delay)
                if self._closed:
                    raise CancelledError("the client was closed")
            done += 1
            self._unserved_rounds = done
            for index in order:
                spec = self.endpoints[index]
                try:
                    protocol = await _connect(
                        self._reactor, self._connector, spec, self._token, self._name, self._handshake_timeout
                    )
                except (CancelledError, ConnectingCancelledError):
                    # A cancelled connect fails with ConnectingCancelledError,
                    # which is no CancelledError: without this the loop went on.
                    raise CancelledError("reconnecting was cancelled") from None
                except (errors.ShuttingDown, errors.Unavailable) as e:
                    last = e  # this server cannot serve now; another may
                except errors.GriddError:
                    raise
                except Exception as e:
                    last = e
                else:
                    return index, protocol
                if len(self.endpoints) > 1 or rounds != 1:
                    log.info("gridd server {spec} unreachable: {e}", spec=spec, e=last)

    def _connect_endpoint(self, spec: str, protocol: ClientProtocol) -> Deferred:
        return connectProtocol(tls.client_endpoint(self._reactor, spec), protocol)


def connect(
    reactor,
    endpoints: str | Sequence[str],
    token: str,
    name: str = "gridctl",
    handshake_timeout: float = 10.0,
    rounds: int = 3,
    *,
    reconnect_deadline: float | None = 60.0,
    reconnect_rounds: int | None = None,
    retry_policy: Callable[[int], float] | None = None,
    connector: Connector | None = None,
) -> Deferred[Client]:
    """Connect to a server and fire with a :class:`Client` once HELLO is accepted.

    ``endpoints`` is one Twisted client endpoint string (``tcp:HOST:PORT``,
    ``tls:HOST:PORT:trustRoots=DIR``) or several, for several servers that
    share one database: they are tried in order, and the whole list up to
    ``rounds`` times with a pause from ``retry_policy`` between rounds
    (:data:`DEFAULT_RETRY_POLICY`: 0.5 s, 1 s, ... plus jitter); the first
    server that accepts the HELLO wins. Endpoints are built by
    :func:`gridd.tls.client_endpoint`: ``ssl:`` fails with ValueError, and a
    server whose certificate does not name HOST counts as unreachable.

    A refused handshake (``auth_failed``, say) fails at once with its
    ``gridd.errors`` class: another server would refuse it too. When no
    server can be reached, the last reason fails the Deferred
    (``ConnectionDropped`` for a server that never answered HELLO within
    ``handshake_timeout`` seconds, or a connection error).

    Later losses are the client's business: it reconnects to any of the
    endpoints, bounded by ``reconnect_deadline`` seconds and
    ``reconnect_rounds`` rounds (see :class:`Client`). ``connector(spec,
    protocol)`` opens the transport; tests and embedders may pass their own.
    """
    return Deferred.fromCoroutine(
        _open(
            reactor,
            endpoints,
            token,
            name,
            rounds,
            handshake_timeout=handshake_timeout,
            reconnect_deadline=reconnect_deadline,
            reconnect_rounds=reconnect_rounds,
            retry_policy=retry_policy,
            connector=connector,
        )
    )


async def _open(reactor, endpoints, token, name, rounds, **options) -> Client:
    client = Client(reactor, endpoints, token, name, **options)
    await client._open(rounds)
    return client


async def _connect(reactor, connector: Connector, spec: str, token, name, handshake_timeout) -> ClientProtocol:
    """One connection attempt: fires with the protocol once its HELLO is accepted.

    Cancelling it while the handshake runs aborts the connection.
    """
    protocol = ClientProtocol(reactor, name, token)
    await connector(spec, protocol)
    # Aborting (rather than failing ``ready``) lets the peer fail the pending
    # HELLO and ``ready`` by the one path it already has.
    handshake: Deferred[dict] = Deferred(lambda _: protocol.transport.abortConnection())

    def settled(result):
        if not handshake.called:
            (handshake.errback if isinstance(result, Failure) else handshake.callback)(result)
        return None if isinstance(result, Failure) else result

    protocol.ready.addBoth(settled)
    timer = reactor.callLater(handshake_timeout, protocol.transport.abortConnection)
    try:
        await handshake
    except ConnectionDropped as e:
        if timer.called:
            raise ConnectionDropped(f"no answer to HELLO within {handshake_timeout:g} s") from e
        raise
    finally:
        if timer.active():
            timer.cancel()
    return protocol


async def _walk(fetch: Callable[[int | None], Deferred[dict]], field: str) -> AsyncIterator[dict]:
    """Yield the ``field`` items of every page, asking for each next one with ``after=next``."""
    after = None
    while True:
        page = await fetch(after)
        for item in page[field]:
            yield item
        after = page.get("next")
        if after is None:
            return


async def _collect(items: AsyncIterator) -> list:
    return [item async for item in items]


def _present(**fields) -> dict:
    """The fields that were given: optional request fields are left out, not sent as null."""
    return {key: value for key, value in fields.items() if value is not None}


def _without_rid(reply: dict) -> dict:
    return {key: value for key, value in reply.items() if key != "rid"}


# -- the blocking wrapper ------------------------------------------------------

_reactor_thread: threading.Thread | None = None
_reactor_thread_lock = threading.Lock()


def _run_reactor_in_thread(reactor) -> None:
    """Start the reactor in a daemon thread, once per process, and stop it at exit."""
    global _reactor_thread
    with _reactor_thread_lock:
        if _reactor_thread is not None:
            return
        if reactor.running:
            if isInIOThread():
                raise RuntimeError("BlockingClient would deadlock the reactor thread: use connect() there")
            return
        _reactor_thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, name="gridd-reactor", daemon=True
        )
        _reactor_thread.start()
        atexit.register(_stop_reactor, reactor, _reactor_thread)


def _stop_reactor(reactor, thread: threading.Thread) -> None:
    if thread.is_alive():
        reactor.callFromThread(reactor.stop)
        thread.join(timeout=5)


def _blocking(name: str):
    """A BlockingClient method that runs ``Client.<name>`` in the reactor thread and waits."""

    def call(self, *args, **kwargs):
        return blockingCallFromThread(self._reactor, getattr(self.client, name), *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(Client, name).__doc__
    return call


class BlockingClient:
    """The client API for scripts: each method blocks until its reply and returns it.

    The methods are those of :class:`Client`, returning results instead of
    Deferreds and raising the same exceptions; like it, a BlockingClient
    reconnects after a lost connection (``options`` are those of
    :func:`connect`: ``reconnect_deadline``, ``reconnect_rounds``, ...). The reactor runs
    in a daemon thread started on first use and shared by the process (a
    reactor cannot be restarted, so ``close()`` leaves it running). Watch and
    ``on_event`` callbacks run in that thread. Use as a context manager::

        with BlockingClient("tcp:127.0.0.1:7700", token) as grid:
            ids = grid.submit([{"type": "noop", "records": [1, 2, 3]}])
            grid.wait(ids)

    ``reactor`` is for tests and embedding; the caller then runs it.
    """

    def __init__(
        self, endpoint_string: str | Sequence[str], token: str, name: str = "gridctl", *, reactor=None, **options
    ):
        if reactor is None:
            from twisted.internet import reactor

            _run_reactor_in_thread(reactor)
        self._reactor = reactor
        self.client: Client = blockingCallFromThread(reactor, connect, reactor, endpoint_string, token, name, **options)

    @property
    def protocol(self) -> ClientProtocol | None:
        """The current (or last) connection."""
        return self.client.protocol

    submit = _blocking("submit")
    show = _blocking("show")
    list_jobs = _blocking("list_jobs")
    all_jobs = _blocking("all_jobs")
    results_page = _blocking("results_page")
    results = _blocking("results")
    workers = _blocking("workers")
    stats = _blocking("stats")
    watch = _blocking("watch")
    unwatch = _blocking("unwatch")
    wait = _blocking("wait")
    cancel = _blocking("cancel")
    pause = _blocking("pause")
    resume = _blocking("resume")
    requeue = _blocking("requeue")
    worker_action = _blocking("worker_action")
    worker_host = _blocking("worker_host")
    clear_worker = _blocking("clear_worker")
    dispatch = _blocking("dispatch")
    add_credential = _blocking("add_credential")
    list_credentials = _blocking("list_credentials")
    revoke_credential = _blocking("revoke_credential")
    close = _blocking("close")

    def iter_jobs(
        self, state: str | None = None, type: str | None = None, page_size: int | None = None
    ) -> Iterator[dict]:
        """Yield every matching job, fetching one LIST page at a time."""
        return _pages(lambda after: self.list_jobs(state, type, after, page_size), "jobs")

    def iter_results(self, job: int, page_size: int | None = None) -> Iterator[dict]:
        """Yield every accepted result of a job, fetching one RESULTS page at a time."""
        return _pages(lambda after: self.results_page(job, after, page_size), "results")

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _pages(fetch: Callable[[int | None], dict], field: str) -> Iterator[dict]:
    after = None
    while True:
        page = fetch(after)
        yield from page[field]
        after = page.get("next")
        if after is None:
            return
