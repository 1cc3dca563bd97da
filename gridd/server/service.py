"""The server's service: open the store, load the dispatcher, then listen.

Start-up order matters: a listener must not accept a connection before the
dispatcher knows the jobs the store holds, so the listeners are children of
a ``MultiService`` that is started only once the store is open and the
dispatcher loaded. ``stopService`` reverses it and returns when the store has
committed every write already accepted.
"""

from __future__ import annotations

import ipaddress
import json
import os

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from gridd.store.base import SchemaTooNew, StoreUnavailable

__all__ = ["GriddService", "is_loopback_listen", "is_plain_tcp"]

log = Logger()


def is_loopback_listen(spec: str) -> bool:
    """True if an endpoint string listens on loopback only (or is a UNIX socket)."""
    kind, *parts = _endpoint_fields(spec)
    if kind == "unix":
        return True
    interface = None
    for part in parts:
        if part.startswith("interface="):
            interface = part[len("interface=") :]
    if interface is None:
        return False
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False


def is_plain_tcp(spec: str) -> bool:
    """True if an endpoint string listens with unencrypted TCP (``tcp:``, ``tcp6:``)."""
    return _endpoint_fields(spec)[0].strip().lower() in ("tcp", "tcp6")


def _endpoint_fields(spec: str) -> list[str]:
    """Split an endpoint string at its unescaped colons (``tcp6:7700:interface=\\:\\:1``)."""
    fields, current, chars = [], [], iter(spec)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _address(addr) -> dict:
    """A listening address as JSON: ``{"host", "port"}`` for TCP, ``{"path"}`` for a UNIX socket."""
    if hasattr(addr, "port"):
        return {"host": addr.host, "port": addr.port}
    name = getattr(addr, "name", None)
    return {"path": os.fsdecode(name) if name is not None else str(addr)}


class GriddService(service.Service):
    """Owns the store, the dispatcher and the listeners, and starts them in order."""

    name = "gridd"

    def __init__(self, store, dispatcher, factory, listeners: service.MultiService, *, reactor, port_file=None):
        self.store = store
        self.dispatcher = dispatcher
        self.factory = factory
        self.listeners = listeners
        self.reactor = reactor
        self.port_file = port_file
        #: Fires with the listening ports once the server accepts connections.
        self.started = defer.Deferred()

    def startService(self):
        # A store that cannot be opened (unreachable, wrong credentials, an
        # unwritable path, a schema newer than this code) ends start-up here,
        # before the reactor runs and anything listens: one critical line
        # saying why, and exit status 1. twistd offers no way to exit
        # non-zero once its reactor runs (Twisted issues #4762, #11335), and
        # ends on its own start-up errors with SystemExit too. (The line is
        # logged rather than put in SystemExit: twistd -n logs stderr, which
        # would print it twice.)
        check = getattr(self.store, "check", None)
        if check is not None:
            try:
                check()
            except (StoreUnavailable, SchemaTooNew) as error:
                log.critical("gridd: {error}", error=error)
                raise SystemExit(1) from None
        super().startService()
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._start_failed)

    async def _start(self):
        await self.store.start()
        if self.running:
            await self.dispatcher.start()
        if not self.running:
            # stopService ran while we waited and found nothing to stop:
            # undo what started since, and never listen.
            self.dispatcher.stop()
            await self.store.stop()
            return
        self.listeners.startService()
        ports = []
        for listener in self.listeners:
            ports.append(await listener._waitingForPort)
        addresses = [_address(p.getHost()) for p in ports]
        for listener, addr in zip(self.listeners, addresses, strict=True):
            where = addr["path"] if "path" in addr else f"{addr['host']}:{addr['port']}"
            log.info("gridd listening on {spec} ({where})", spec=listener.spec, where=where)
        if self.port_file:
            with open(self.port_file, "w") as f:
                json.dump(addresses, f)
        self.started.callback(ports)

    def _start_failed(self, failure):
        if failure.check(StoreUnavailable, SchemaTooNew):
            log.critical("gridd: {error}", error=failure.value)
        else:
            log.failure("gridd could not start", failure)
        if not self.started.called:
            self.started.errback(failure)
            self.started.addErrback(lambda _: None)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self):
        if self.listeners.running:
            await self.listeners.stopService()
        self.dispatcher.stop()
        # Commit what was accepted first, so that its replies still reach the
        # peers; then say goodbye.
        await self.store.stop()
        self.factory.close_all("shutdown")
        # Wait for the BYEs to leave: the reactor drops what is still
        # buffered once stopService returns. Bounded by the close timeout.
        await self.factory.when_all_closed()
        log.info("gridd stopped: every accepted write is committed")

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())
