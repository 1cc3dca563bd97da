"""An in-process gridd on the real reactor and real sockets, for the TLS and hostile-connection tests.

The server is the one ``twistd gridd`` runs (``gridd.server.tap.makeService``)
with the memory store, started in this process so that a test can look at
its connections. Waits are bounded and event-driven: :func:`turns` runs
reactor turns until a condition holds, it never sleeps for a set time.
"""

from __future__ import annotations

import time

from twisted.internet import defer, task

from gridd.server import tap

WAIT = 20.0


async def turns(reactor, condition, timeout: float = WAIT, what: str = "the condition"):
    """Let the reactor run until ``condition()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come true within {timeout} s")
        await task.deferLater(reactor, 0.001, lambda: None)


def bounded(d: defer.Deferred, reactor, timeout: float = WAIT) -> defer.Deferred:
    """``d``, failing with TimeoutError after ``timeout`` seconds."""
    return d.addTimeout(timeout, reactor)


class RecordingAuthenticator:
    """Wraps the server's authenticator and remembers every token presented to it."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[tuple[str, str]] = []

    def check(self, name, role, token):
        self.seen.append((name, role))
        return self.inner.check(name, role, token)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class LiveServer:
    """``makeService`` on the real reactor with ``--db memory:``, listening on ``listen``."""

    def __init__(self, reactor, tmp_path, listen: str, *extra: str):
        self.reactor = reactor
        options = tap.Options()
        options.parseOptions(["--data", str(tmp_path / "data"), "--db", "memory:", "--listen", listen, *extra])
        self.top = tap.makeService(options, reactor=reactor)
        self.gridd = self.top.getServiceNamed("gridd")
        self.factory = self.gridd.factory
        self.dispatcher = self.gridd.dispatcher
        self.secret = (tmp_path / "data" / "secret").read_text().strip()
        self.auth = self.factory.authenticator = RecordingAuthenticator(self.factory.authenticator)
        self.port = None

    async def start(self) -> LiveServer:
        self.top.startService()
        [port] = await bounded(self.gridd.started, self.reactor)
        self.port = port.getHost().port
        return self

    async def stop(self):
        """Stop the server and wait until every connection it had is gone (none left to its timers)."""
        await bounded(defer.ensureDeferred(self.top.stopService()), self.reactor)
        await turns(self.reactor, lambda: not self.factory.connections, what="every server connection closing")
