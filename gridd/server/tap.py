"""``twistd gridd``: options and the service tree, nothing else.

``makeService`` builds the tree and never listens by itself; starting the
tree (twistd does) opens the store, loads the dispatcher and then listens.
"""

from __future__ import annotations

import os
from pathlib import Path

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from gridd import config, wire
from gridd.scheduler import Dispatcher
from gridd.server.auth import Authenticator, load_or_create_secret
from gridd.server.protocol import Limits, ServerFactory
from gridd.server.service import GriddService, is_loopback_listen, is_plain_tcp
from gridd.store import open_store
from gridd.store.base import check_store_uri

__all__ = ["Options", "makeService"]

log = Logger()

DEFAULT_LISTEN = "tcp:7700:interface=127.0.0.1"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the gridd job server: workers (twistd gridworker) and clients (gridctl) connect to it, "
        "jobs are kept in the store and pushed to matching workers the moment they are runnable. "
        "See protocols/PROTOCOL.md for the wire protocol."
    )
    optParameters = [
        ["data", "d", str(config.default_data_dir()), "Data directory for the database and the secret ($GRIDD_DATA)."],
        [
            "db",
            None,
            None,
            "Store URI: sqlite:PATH (default: sqlite:DATA/gridd.db), memory: (nothing kept), or "
            "mysql://USER@HOST:PORT/DB for MariaDB/MySQL, with the password in the file that "
            "?password_file=PATH names or in $GRIDD_DB_PASSWORD, never in the URI (docs/mariadb.md).",
            check_store_uri,
        ],
        [
            "secret-file",
            None,
            None,
            "File with the shared secret, the bootstrap credential: it logs in clients as admin and workers "
            "under any name (default: DATA/secret, created). Per-peer credentials: gridctl credentials.",
        ],
        ["beat", None, 2.0, "Heartbeat interval in seconds announced to peers.", float],
        ["deadline", None, None, "Seconds of silence after which a peer is dropped (default: 3 x beat).", float],
        ["default-timeout", None, 3600.0, "Run-time limit of one attempt for jobs that name none (seconds).", float],
        ["backoff-base", None, 1.0, "Retry backoff after a failed attempt: base x 2^(attempt-1) seconds...", float],
        ["backoff-max", None, 300.0, "... capped at this many seconds.", float],
        ["return-delay", None, 30.0, "Seconds a job given back (RETURN) is kept from the worker that gave it.", float],
        ["reattach-grace", None, None, "Seconds leases await workers after a restart [max(30, 2 x deadline)].", float],
        # Poison jobs and bad workers (gridd.scheduler.poison, PROTOCOL.md section 8.1).
        [
            "poison-after",
            None,
            3,
            "A job whose attempts fail on this many different workers is poison (0: never).",
            int,
        ],
        [
            "bad-worker-after",
            None,
            3,
            "A worker whose last N attempts of a type failed while the type succeeded on another worker gets no "
            "more of that type until `gridctl worker clear` (0: never).",
            int,
        ],
        ["handshake-timeout", None, 10.0, "Seconds a new connection has to complete its HELLO.", float],
        ["max-line", None, wire.DEFAULT_MAX_LINE, "Maximum line length in bytes.", int],
        # Per-connection limits (protocols/PROTOCOL.md section 12).
        ["max-outstanding", None, Limits.max_outstanding, "Requests per connection awaiting their reply.", int],
        ["max-rate", None, Limits.rate, "Lines per second a connection may send (sustained).", float],
        ["rate-burst", None, Limits.burst, "Lines a connection may send in a burst beyond --max-rate.", int],
        ["max-output", None, Limits.max_output, "Bytes waiting for a peer that does not read before it is cut.", int],
        ["port-file", None, None, "Write the listening addresses here as JSON once listening (for scripts)."],
        # Several servers on one MySQL/MariaDB database (docs/mariadb.md).
        ["server-id", None, None, "This server's name in the shared store [host-pid-random, new each start]."],
        ["sync-interval", None, 0.5, "With mysql://, seconds between looks at what other servers did.", float],
        # The operators' SSH manhole (gridd.server.manhole).
        ["manhole", None, None, "Operators' SSH manhole endpoint; a bare port N is tcp:N:interface=127.0.0.1 [off]."],
        ["manhole-keys", None, None, "Operators' SSH public keys (authorized_keys) [DATA/manhole_authorized_keys]."],
    ]
    optFlags = [
        [
            "no-shared-secret",
            None,
            "Refuse the shared secret: only credentials made with gridctl credentials log in "
            "(make an admin credential first). The secret file is then neither read nor created.",
        ],
        [
            "allow-plain-tcp",
            None,
            "Allow tcp: listeners beyond loopback (unencrypted: anyone on the network reads the secret "
            "and the jobs). Without it gridd refuses to start with one; use ssl: endpoints instead.",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["listen"] = []
        self["type-timeout"] = {}

    def opt_type_timeout(self, value):
        """Run-time limit of one attempt of a job type, for its jobs that name none, as TYPE=SECONDS
        (repeatable; overrides --default-timeout for that type). Give servers sharing a store the same."""
        job_type, sep, seconds = value.partition("=")
        try:
            limit = float(seconds)
        except ValueError:
            limit = 0.0
        if not (sep and job_type and limit > 0 and limit != float("inf")):
            raise usage.UsageError(f"--type-timeout wants TYPE=SECONDS with SECONDS > 0, not {value!r}")
        self["type-timeout"][job_type] = limit

    def opt_listen(self, spec):
        """Endpoint to listen on (repeatable): tcp:7700:interface=127.0.0.1 [default], or TLS with
        ssl:7701:privateKey=KEY.pem:certKey=CERT.pem (gridctl certs makes them)."""
        self["listen"].append(spec)

    def postOptions(self):
        # A zero beat would make the server send BEATs in a busy loop; a
        # deadline within one beat drops peers that beat on time; a max-line
        # below the pre-HELLO limit refuses HELLOs that peers may send.
        if self["beat"] <= 0:
            raise usage.UsageError("--beat must be positive")
        if self["deadline"] is not None and self["deadline"] <= self["beat"]:
            raise usage.UsageError("--deadline must be longer than --beat")
        if self["handshake-timeout"] <= 0 or self["default-timeout"] <= 0:
            raise usage.UsageError("--handshake-timeout and --default-timeout must be positive")
        if self["max-line"] < wire.PRE_HELLO_MAX_LINE:
            raise usage.UsageError(f"--max-line must be at least {wire.PRE_HELLO_MAX_LINE}")
        if min(self["max-outstanding"], self["max-rate"], self["rate-burst"], self["max-output"]) <= 0:
            raise usage.UsageError("--max-outstanding, --max-rate, --rate-burst and --max-output must be positive")
        if self["sync-interval"] <= 0:
            raise usage.UsageError("--sync-interval must be positive")
        if not 0 <= self["return-delay"] < float("inf"):
            raise usage.UsageError("--return-delay must be 0 or more seconds")
        if self["poison-after"] < 0 or self["bad-worker-after"] < 0:
            raise usage.UsageError("--poison-after and --bad-worker-after must be 0 (off) or more")
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for spec in self["listen"]:
            if is_plain_tcp(spec) and not is_loopback_listen(spec) and not self["allow-plain-tcp"]:
                raise usage.UsageError(
                    f"refusing to listen with plain TCP beyond loopback ({spec}): use an ssl: endpoint "
                    "(gridctl certs makes the certificates), or pass --allow-plain-tcp if this is intended"
                )
        if self["db"] is None:
            self["db"] = "sqlite:" + os.path.join(self["data"], "gridd.db")
        if self["secret-file"] is None:
            self["secret-file"] = os.path.join(self["data"], "secret")
        # The manhole: a bare port listens on loopback only.
        if self["manhole"] is not None and self["manhole"].isdigit():
            self["manhole"] = f"tcp:{self['manhole']}:interface=127.0.0.1"
        if self["manhole-keys"] is None:
            self["manhole-keys"] = os.path.join(self["data"], "manhole_authorized_keys")


def makeService(options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    Path(options["data"]).mkdir(parents=True, exist_ok=True)
    top = service.MultiService()

    # 1. Durable state and the scheduler over it.
    store = open_store(options["db"], reactor=reactor, server_id=options["server-id"])
    # Only a MySQL/MariaDB store can be shared by several servers.
    shared = options["db"].startswith("mysql:")
    dispatcher = Dispatcher(
        store,
        reactor,
        beat=options["beat"],
        deadline=options["deadline"],
        default_timeout=options["default-timeout"],
        type_timeouts=options["type-timeout"],
        backoff_base=options["backoff-base"],
        backoff_max=options["backoff-max"],
        return_delay=options["return-delay"],
        reattach_grace=options["reattach-grace"],
        sync_interval=options["sync-interval"] if shared else None,
        poison_after=options["poison-after"],
        bad_worker_after=options["bad-worker-after"],
    )
    # 2. Who may connect (credentials in the store, and the shared secret unless
    #    turned off), and the wire adapter.
    shared_secret = None if options["no-shared-secret"] else load_or_create_secret(options["secret-file"])
    authenticator = Authenticator(store, reactor, shared_secret=shared_secret)
    factory = ServerFactory(
        dispatcher,
        authenticator,
        reactor,
        max_line=options["max-line"],
        handshake_timeout=options["handshake-timeout"],
        limits=Limits(
            max_outstanding=options["max-outstanding"],
            rate=options["max-rate"],
            burst=options["rate-burst"],
            max_output=options["max-output"],
        ),
    )
    # A credential revoked through another server sharing the store closes its connections here too.
    dispatcher.on_credential_revoked = factory.close_credential
    # 3. Listeners, started by GriddService once the store is loaded.
    listeners = service.MultiService()
    for spec in options["listen"]:
        if not is_loopback_listen(spec) and not spec.startswith("ssl:"):
            # A tcp: listener gets here only with --allow-plain-tcp (Options refuses it otherwise).
            log.warn(
                "WARNING: {spec} listens beyond loopback without TLS: anyone on the network can "
                "read the shared secret and all job data. Use ssl: endpoints for anything but a demo.",
                spec=spec,
            )
        _listener(reactor, spec, factory).setServiceParent(listeners)
    server = GriddService(store, dispatcher, factory, listeners, reactor=reactor, port_file=options["port-file"])
    server.setServiceParent(top)
    # 4. The operators' SSH manhole (off by default): it listens once the server does, and
    #    stops first. Its host key is made in DATA on first start; it warns beyond loopback.
    if options["manhole"]:
        from gridd.server.manhole import HOST_KEY_NAME, make_manhole_service

        make_manhole_service(
            reactor,
            options["manhole"],
            server=server,
            authorized_keys=options["manhole-keys"],
            host_key=os.path.join(options["data"], HOST_KEY_NAME),
        ).setServiceParent(top)
    return top


def _listener(reactor, spec, factory):
    listener = StreamServerEndpointService(serverFromString(reactor, spec), factory)
    listener.spec = spec
    # Fail start-up loudly when the port cannot be bound, rather than log later.
    listener._raiseSynchronously = True
    return listener
