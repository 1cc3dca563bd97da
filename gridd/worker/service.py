"""The worker's service tree: its handler processes (or threads) and one reconnecting connection.

::

    WorkerService "gridworker"      returns running jobs on stop, then stops its children
     ├── HandlerPoolService "handlers"  handler processes (the default); started first, stopped last
     │   or ThreadPoolService "threads" runs threaded job types in threads (``handlers="threads"``)
     ├── GuestService "guest"           watches the host (idle or busy) and notices suspends
     └── ClientService "connection"     connects, waits for the handshake, reconnects with backoff

:func:`make_worker_service` builds the tree without starting it; starting it
connects. Build a worker in-process (end-to-end tests, the demo) with::

    service = make_worker_service(reactor, ["tcp:127.0.0.1:7700"], name="w1",
                                  token=secret, job_types=load_job_types(), slots=2,
                                  handlers="threads")   # or "processes", the default
    service.startService()
    protocol = await service.when_connected()   # after the handshake
    ...
    await service.stopService()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gridd import tls
from gridd.worker.cgroups import Cgroups
from gridd.worker.command import CommandType
from gridd.worker.core import WorkerCore
from gridd.worker.guest import GuestOptions, GuestService
from gridd.worker.limits import AttemptLimits
from gridd.worker.pool import HandlerPool, ProcessRunner
from gridd.worker.protocol import WorkerFactory
from gridd.worker.runner import InlineThreads, PoolThreads
from gridd.worker.sandbox import Sandbox

__all__ = [
    "HANDLER_MODES",
    "HANDSHAKE_TIMEOUT",
    "HandlerPoolService",
    "STOP_TIMEOUT",
    "RoundRobinEndpoint",
    "ThreadPoolService",
    "WorkerService",
    "wait_for_handshake",
    "make_worker_service",
]

#: Seconds a server may take to answer HELLO before the connection is cut.
HANDSHAKE_TIMEOUT = 30.0
#: Seconds ``stopService`` waits for the server to acknowledge returned jobs.
STOP_TIMEOUT = 10.0
#: Where job types' records are processed: child processes (the default), or the worker's threads.
HANDLER_MODES = ("processes", "threads")

log = Logger()


@implementer(IStreamClientEndpoint)
class RoundRobinEndpoint:
    """Tries the next of several server endpoints on each connection attempt.

    This is the seam for multi-server failover: with ``ClientService``'s
    backoff, a worker that loses its server tries the others in turn.
    """

    def __init__(self, endpoints: Sequence[IStreamClientEndpoint]):
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self._endpoints = list(endpoints)
        self._next = 0

    def connect(self, protocolFactory):
        endpoint = self._endpoints[self._next]
        self._next = (self._next + 1) % len(self._endpoints)
        return endpoint.connect(protocolFactory)


class ThreadPoolService(Service):
    """Owns the thread pool of threaded job types, so it lives as long as the worker.

    Stopping joins the pool's threads: a threaded record that is running
    finishes first (its result is then dropped), since Python threads cannot
    be interrupted.
    """

    def __init__(self, pool: ThreadPool):
        self.pool = pool

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


class HandlerPoolService(Service):
    """Owns the handler processes: stopping kills every one of them, with what they started."""

    def __init__(self, pool: HandlerPool, limits: AttemptLimits):
        self.pool = pool
        self.limits = limits

    def startService(self):
        super().startService()
        log.info(
            "handlers run in child processes; limits: {limits}; {cgroups}; {sandbox}",
            limits=self.limits.describe(),
            cgroups=self.pool.cgroups.describe() if self.pool.cgroups else "no control groups",
            sandbox=self.pool.sandbox.describe() if self.pool.sandbox else "no sandbox",
        )

    def stopService(self):
        super().stopService()
        return self.pool.stop().addCallback(lambda _: None)


class WorkerService(MultiService):
    """The gridworker: its core, and the services that feed it.

    Stopping gives running jobs back to the server with ``RETURN`` rather
    than waiting for them: a job may take hours, RETURN does not count an
    attempt, and the results already accepted are kept, so another worker
    resumes at the first unfinished record. ``stopService`` waits up to
    ``stop_timeout`` seconds for the server's replies, then disconnects.
    """

    def __init__(self, clock, core: WorkerCore, connection: ClientService, stop_timeout: float = STOP_TIMEOUT):
        super().__init__()
        self.setName("gridworker")
        self.clock = clock
        self.core = core
        self.connection = connection
        self.stop_timeout = stop_timeout

    def when_connected(self, failAfterFailures: int | None = None) -> defer.Deferred:
        """Fires with the current protocol once its handshake succeeded."""
        return self.connection.whenConnected(failAfterFailures=failAfterFailures)

    def stopService(self):
        d = self.core.return_all("worker is shutting down")
        d.addTimeout(self.stop_timeout, self.clock)
        d.addErrback(self._unsettled)
        d.addCallback(lambda _: MultiService.stopService(self))
        d.addCallback(lambda _: None)
        return d

    def _unsettled(self, failure):
        failure.trap(defer.TimeoutError)
        log.warn(
            "{n} leases not settled after {t} s; the server will expire them",
            n=len(self.core.holdings),
            t=self.stop_timeout,
        )


def wait_for_handshake(clock, timeout: float = HANDSHAKE_TIMEOUT) -> Callable:
    """A ``prepareConnection`` for ``ClientService``: the connection counts once HELLO is answered.

    A server that never answers would otherwise hold the worker forever on a
    connection that does nothing; past ``timeout`` it is aborted, and
    ``ClientService`` tries again with backoff.
    """

    def prepare(protocol):
        timer = clock.callLater(timeout, protocol.transport.abortConnection)

        def settled(result):
            if timer.active():
                timer.cancel()
            return result

        return protocol.ready.addBoth(settled)

    return prepare


def make_worker_service(
    reactor,
    servers: Iterable[str | IStreamClientEndpoint],
    *,
    name: str,
    token: str,
    job_types: dict[str, Any],
    slots: int,
    memory: int = 0,
    tags: Iterable[str] = (),
    commands: Mapping[str, str] | None = None,
    exit_when_drained: bool = False,
    handlers: str = "processes",
    limits: AttemptLimits | None = None,
    sandbox: Sandbox | None = None,
    command_network: Iterable[str] = (),
    threads: PoolThreads | InlineThreads | None = None,
    guest: GuestOptions | None = GuestOptions(),
    stop_timeout: float = STOP_TIMEOUT,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> WorkerService:
    """Build (without starting) a worker's service tree.

    ``servers`` are endpoint strings (or endpoints), tried in turn; strings go
    through :func:`gridd.tls.client_endpoint` (``ssl:`` is refused, ``tls:``
    checks the server's name strictly). ``threads`` replaces the thread pool
    (``InlineThreads()`` in tests). ``commands`` (NAME to absolute PATH, from
    ``--command``) adds the ``command`` job type running those programs.
    ``handlers`` is where records are processed: ``"processes"`` (a pool of
    handler processes, each attempt under ``limits``, the operator's
    ``--limits`` and the job's memory) or ``"threads"`` (in this process, for
    tests and embedding; limits do not apply). ``guest`` says how the worker
    watches its host (``--when-idle`` and its options); None leaves the host
    unwatched and suspends unnoticed (tests on a fake clock). ``sandbox``
    (processes only) starts handler processes and command programs in it,
    the commands named in ``command_network`` with the network.
    """
    if handlers not in HANDLER_MODES:
        raise ValueError(f"handlers must be one of {', '.join(HANDLER_MODES)}, not {handlers!r}")
    if sandbox is not None and handlers != "processes":
        raise ValueError("a sandbox needs handlers in processes")
    if commands:
        command_type = CommandType(commands, reactor=reactor, sandbox=sandbox, network=command_network)
        job_types = {**job_types, "command": command_type}
    endpoints = []
    for server in servers:
        if isinstance(server, str):
            warn_if_plaintext(server)
            server = tls.client_endpoint(reactor, server)
        endpoints.append(server)
    endpoint = endpoints[0] if len(endpoints) == 1 else RoundRobinEndpoint(endpoints)

    pool_service = make_runner = None
    if handlers == "processes":
        limits = limits or AttemptLimits(offered_memory=memory)
        cgroups = Cgroups()
        handler_pool = HandlerPool(reactor, size=max(1, slots), cgroups=cgroups, sandbox=sandbox)
        pool_service = HandlerPoolService(handler_pool, limits)
        pool_service.setName("handlers")

        def make_runner(job_type, assignment, **report):
            attempt_limits = limits.for_attempt(assignment.type, assignment.memory)
            return ProcessRunner(handler_pool, job_type, assignment, clock=reactor, limits=attempt_limits, **report)

    elif threads is None:
        pool = ThreadPool(minthreads=0, maxthreads=max(1, slots), name="gridworker-jobs")
        pool_service = ThreadPoolService(pool)
        pool_service.setName("threads")
        threads = PoolThreads(reactor, pool)

    core = WorkerCore(
        reactor,
        job_types,
        slots,
        memory=memory,
        tags=tags,
        threads=threads,
        make_runner=make_runner,
        on_drained_idle=reactor.stop if exit_when_drained else None,
    )
    connection = ClientService(
        endpoint,
        WorkerFactory(reactor, name, token, core),
        # Quick first retries (a restarted server is back in a second or two),
        # and never more than 10 s between attempts.
        retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0),
        clock=reactor,
        prepareConnection=wait_for_handshake(reactor, handshake_timeout),
    )
    connection.setName("connection")

    worker = WorkerService(reactor, core, connection, stop_timeout)
    # Children start in this order and stop in the reverse one: the pool
    # outlives the connection, so no running record loses its process or
    # thread; the host is watched before the first HELLO says its state.
    if pool_service is not None:
        pool_service.setServiceParent(worker)
    if guest is not None:
        GuestService(reactor, core, guest).setServiceParent(worker)
    connection.setServiceParent(worker)
    return worker


_LOOPBACK_NAMES = {"localhost", "::1"}


def warn_if_plaintext(spec: str) -> None:
    """Warn loudly about an unencrypted connection that leaves this host."""
    kind, _, rest = spec.partition(":")
    if kind not in ("tcp", "tcp6"):
        return
    args = [a.replace("\0", ":") for a in rest.replace("\\:", "\0").split(":")]
    host = next((a[len("host=") :] for a in args if a.startswith("host=")), args[0])
    if host in _LOOPBACK_NAMES or host.startswith("127."):
        return
    log.warn(
        "connecting to {spec} over plain TCP: the shared secret and all job data travel unencrypted. "
        "Use a tls: endpoint for anything but a demo on one host.",
        spec=spec,
    )
