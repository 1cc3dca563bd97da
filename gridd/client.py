"""The submitter side of gridd: a Python client API over the line protocol.

:class:`ClientProtocol` speaks the client verbs of protocols/PROTOCOL.md
(section 9) on top of :class:`gridd.peer.PeerProtocol`, which already owns
framing, ``rid`` matching, keepalive and the handshake. Each method returns a
Deferred that fires with the useful part of the ``OK`` reply, or fails with
the ``gridd.errors`` class named by the ``ERR`` code, or with
:class:`~gridd.peer.ConnectionDropped` when the connection goes first.

:func:`connect` opens a connection from an endpoint string and fires once
the server has accepted the handshake. :class:`BlockingClient` offers the
same methods to scripts that do not run a reactor themselves.
"""

from __future__ import annotations

import atexit
import operator
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.threadable import isInIOThread

from gridd import errors, tls, wire
from gridd.peer import ConnectionDropped, PeerProtocol

log = Logger()

__all__ = [
    "TERMINAL_STATES",
    "MAX_JOBS_PER_SUBMIT",
    "ClientProtocol",
    "connect",
    "split_submit",
    "BlockingClient",
    "ConnectionDropped",
]

#: States a job does not leave on its own (only an operator's REQUEUE does).
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})
#: The most jobs one SUBMIT may carry (PROTOCOL.md 9.1).
MAX_JOBS_PER_SUBMIT = 10_000

_MAX_RID = 2**53 - 1
#: Room for one job's status in a WATCH reply: ``{"job":ID,"state":S,"accepted":A,"total":N}``
#: takes at most about 100 bytes; the rest is margin for fields a newer server adds.
_STATUS_BYTES = 256
#: A SUBMIT line with no job in it and the widest possible rid, without its LF.
_SUBMIT_ENVELOPE = len(wire.encode("SUBMIT", {"jobs": [], "rid": _MAX_RID})) - 1

EventCallback = Callable[[dict], Any]


class ClientProtocol(PeerProtocol):
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
        atomically but the whole call does not: when a later one fails, the
        exception's ``submitted`` attribute lists the ids already committed.
        A job too big for any line fails with ``LineTooLong`` before anything
        is sent.
        """
        return Deferred.fromCoroutine(self._submit(list(jobs)))

    async def _submit(self, jobs: list[dict]) -> list[int]:
        chunks = list(split_submit(jobs, self.max_line))
        ids: list[int] = []
        for chunk in chunks:
            try:
                reply = await self.request("SUBMIT", {"jobs": chunk})
            except Exception as e:
                e.submitted = list(ids)
                raise
            ids.extend(reply["jobs"])
        return ids

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

    async def iter_jobs(
        self, state: str | None = None, type: str | None = None, page_size: int | None = None
    ) -> AsyncIterator[dict]:
        """Yield every matching job, one LIST page at a time."""
        after = None
        while True:
            page = await self.list_jobs(state, type, after, page_size)
            for job in page["jobs"]:
                yield job
            after = page.get("next")
            if after is None:
                return

    def all_jobs(self, state: str | None = None, type: str | None = None) -> Deferred[list[dict]]:
        """Fire with the list of every matching job (all LIST pages)."""
        return Deferred.fromCoroutine(_collect(self.iter_jobs(state, type)))

    def results_page(self, job: int, after: int | None = None, limit: int | None = None) -> Deferred[dict]:
        """Fire with one page of a job's results, ``{"results": [...], "next": AFTER_OR_NONE}``."""
        body = _present(job=job, after=after, limit=limit)
        return self.request("RESULTS", body).addCallback(_without_rid)

    async def iter_results(self, job: int, page_size: int | None = None) -> AsyncIterator[dict]:
        """Yield every accepted result of a job, ``{"i", "out" or "error", "worker"}``, in pages."""
        after = None
        while True:
            page = await self.results_page(job, after, page_size)
            for result in page["results"]:
                yield result
            after = page.get("next")
            if after is None:
                return

    def results(self, job: int) -> Deferred[list[dict]]:
        """Fire with every accepted result of a job (all RESULTS pages)."""
        return Deferred.fromCoroutine(_collect(self.iter_results(job)))

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
        Fails with ``ConnectionDropped`` if the connection is lost first;
        cancelling the Deferred stops the watch.
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
        """Queue a running, failed or cancelled job afresh; fire with its new state."""
        return self._ask("REQUEUE", {"job": job}, "state")

    def worker_action(self, name: str, action: str) -> Deferred[None]:
        """``drain``, ``undrain`` or ``disconnect`` a connected worker."""
        return self.request("WORKER", {"worker": name, "action": action}).addCallback(lambda _: None)

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

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self._watches.clear()
        waits, self._waits = self._waits, set()
        for d in waits:
            if not d.called:
                d.errback(ConnectionDropped(f"connection lost: {reason.getErrorMessage()}"))

    def _ask(self, verb: str, body: dict, field: str) -> Deferred:
        return self.request(verb, body).addCallback(operator.itemgetter(field))


def split_submit(jobs: list[dict], max_line: int) -> Iterator[list[dict]]:
    """Split jobs into SUBMIT batches of at most 10,000 jobs whose line fits ``max_line``.

    Sizes are measured with :func:`gridd.wire.encode` itself, with room for
    the widest ``rid``. The reply fits too: an id takes fewer bytes than the
    smallest job. Raises ``LineTooLong`` for a job no line can hold.
    """
    chunk: list[dict] = []
    size = _SUBMIT_ENVELOPE
    for index, job in enumerate(jobs):
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


def connect(
    reactor,
    endpoints: str | Sequence[str],
    token: str,
    name: str = "gridctl",
    handshake_timeout: float = 10.0,
    rounds: int = 3,
) -> Deferred[ClientProtocol]:
    """Connect to a server and fire with the :class:`ClientProtocol` once HELLO is accepted.

    ``endpoints`` is one Twisted client endpoint string (``tcp:HOST:PORT``,
    ``tls:HOST:PORT:trustRoots=DIR``) or several, for several servers that
    share one database: they are tried in order, and the whole list up to
    ``rounds`` times with a growing pause (0.5 s, 1 s, ...) between rounds;
    the first server that accepts the HELLO wins. Endpoints are built by
    :func:`gridd.tls.client_endpoint`: ``ssl:`` fails with ValueError, and a
    server whose certificate does not name HOST counts as unreachable.

    A refused handshake (``auth_failed``, say) fails at once with its
    ``gridd.errors`` class: another server would refuse it too. When no
    server can be reached, the last reason fails the Deferred
    (``ConnectionDropped`` for a server that never answered HELLO within
    ``handshake_timeout`` seconds, or a connection error).
    """
    if isinstance(endpoints, str):
        endpoints = [endpoints]
    return Deferred.fromCoroutine(_connect_any(reactor, list(endpoints), token, name, handshake_timeout, rounds))


async def _connect_any(reactor, endpoints, token, name, handshake_timeout, rounds) -> ClientProtocol:
    if not endpoints:
        raise ValueError("no server endpoint given")
    for spec in endpoints:  # a malformed endpoint fails before any attempt
        try:
            tls.client_endpoint(reactor, spec)
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}") from None
    last: Exception | None = None
    for attempt in range(rounds):
        if attempt:
            await deferLater(reactor, 0.5 * 2 ** (attempt - 1))
        for spec in endpoints:
            try:
                return await _connect(reactor, spec, token, name, handshake_timeout)
            except (errors.ShuttingDown, errors.Unavailable) as e:
                last = e  # this server cannot serve now; another may
            except errors.GriddError:
                raise
            except Exception as e:
                last = e
            if len(endpoints) > 1 or rounds > 1:
                log.info("gridd server {spec} unreachable: {e}", spec=spec, e=last)
    raise last


async def _connect(reactor, endpoint_string, token, name, handshake_timeout) -> ClientProtocol:
    protocol = ClientProtocol(reactor, name, token)
    await connectProtocol(tls.client_endpoint(reactor, endpoint_string), protocol)
    # Aborting (rather than cancelling ``ready``) lets the peer fail the
    # pending HELLO and ``ready`` by the one path it already has.
    timer = reactor.callLater(handshake_timeout, protocol.transport.abortConnection)
    try:
        await protocol.ready
    except ConnectionDropped as e:
        if timer.called:
            raise ConnectionDropped(f"no answer to HELLO within {handshake_timeout:g} s") from e
        raise
    finally:
        if timer.active():
            timer.cancel()
    return protocol


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
    """A BlockingClient method that runs ``ClientProtocol.<name>`` in the reactor thread and waits."""

    def call(self, *args, **kwargs):
        return blockingCallFromThread(self._reactor, getattr(self.protocol, name), *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(ClientProtocol, name).__doc__
    return call


class BlockingClient:
    """The client API for scripts: each method blocks until its reply and returns it.

    The methods are those of :class:`ClientProtocol`, returning results
    instead of Deferreds and raising the same exceptions. The reactor runs
    in a daemon thread started on first use and shared by the process (a
    reactor cannot be restarted, so ``close()`` leaves it running). Watch and
    ``on_event`` callbacks run in that thread. Use as a context manager::

        with BlockingClient("tcp:127.0.0.1:7700", token) as grid:
            ids = grid.submit([{"type": "noop", "records": [1, 2, 3]}])
            grid.wait(ids)

    ``reactor`` is for tests and embedding; the caller then runs it.
    """

    def __init__(self, endpoint_string: str | Sequence[str], token: str, name: str = "gridctl", *, reactor=None):
        if reactor is None:
            from twisted.internet import reactor

            _run_reactor_in_thread(reactor)
        self._reactor = reactor
        self.protocol: ClientProtocol = blockingCallFromThread(reactor, connect, reactor, endpoint_string, token, name)

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
