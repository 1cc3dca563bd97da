"""``twistd gridd``'s options and service tree, built and started on a MemoryReactorClock: nothing listens for real."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from gridd import errors, wire
from gridd.scheduler import Dispatcher
from gridd.server import tap
from gridd.server.auth import Identity
from gridd.server.protocol import ServerFactory
from gridd.server.service import GriddService, is_loopback_listen
from gridd.store.memory import MemoryStore
from gridd.store.sqlite import SQLiteStore
from tests.controlled import ControlledStore


def parse(tmp_path, *args) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--data", str(tmp_path / "data"), *args])
    return options


def build(tmp_path, *args, reactor=None):
    """Parse ``args``, build the tree on a MemoryReactorClock; return (tree, GriddService, reactor)."""
    reactor = reactor or MemoryReactorClock()
    top = tap.makeService(parse(tmp_path, *args), reactor=reactor)
    return top, top.getServiceNamed("gridd"), reactor


@pytest.fixture
def logged():
    """Every log event emitted during the test."""
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _warnings(events):
    return [e for e in events if e.get("log_level") is not None and e["log_level"].name == "warn"]


# -- options ---------------------------------------------------------------------


def test_options_defaults(tmp_path):
    """Without options gridd listens on loopback port 7700 and keeps its database and secret in the data directory."""
    options = parse(tmp_path)
    data = str(tmp_path / "data")
    assert options["listen"] == ["tcp:7700:interface=127.0.0.1"] == [tap.DEFAULT_LISTEN]
    assert options["db"] == "sqlite:" + os.path.join(data, "gridd.db")
    assert options["secret-file"] == os.path.join(data, "secret")
    assert (options["beat"], options["deadline"], options["handshake-timeout"]) == (2.0, None, 10.0)
    assert options["max-line"] == wire.DEFAULT_MAX_LINE
    assert options["default-timeout"] == 3600.0
    assert options["port-file"] is None


def test_options_listen_repeatable_replaces_default(tmp_path):
    """--listen may be given several times; the listeners are exactly those, in order, without the default."""
    options = parse(tmp_path, "--listen", "tcp:7701:interface=127.0.0.1", "--listen", "unix:/tmp/gridd.sock")
    assert options["listen"] == ["tcp:7701:interface=127.0.0.1", "unix:/tmp/gridd.sock"]


def test_options_explicit_paths_and_numbers(tmp_path):
    """--db and --secret-file override the data directory's defaults, and numeric options are converted."""
    options = parse(
        tmp_path,
        "--db",
        "memory:",
        "--secret-file",
        str(tmp_path / "s"),
        "--beat",
        "0.5",
        "--deadline",
        "4",
        "--max-line",
        "70000",
    )
    assert (options["db"], options["secret-file"]) == ("memory:", str(tmp_path / "s"))
    assert (options["beat"], options["deadline"], options["max-line"]) == (0.5, 4.0, 70000)


@pytest.mark.parametrize(
    "args",
    [
        ["--beat", "x"],
        ["--beat", "0"],
        ["--beat", "-1"],
        ["--beat", "2", "--deadline", "2"],
        ["--handshake-timeout", "0"],
        ["--default-timeout", "0"],
        ["--max-line", "1000"],
        ["--poison-after", "-1"],
        ["--bad-worker-after", "-1"],
        ["--poison-after", "two"],
        ["--no-such-option"],
    ],
)
def test_options_bad_values_refused(tmp_path, args):
    """Values that would break the server (a zero beat spins, a deadline within a beat drops live peers) are refused."""
    with pytest.raises(usage.UsageError):
        parse(tmp_path, *args)


def test_options_help_mentions_every_option():
    """--help names every option and says what the listener default is."""
    text = str(tap.Options())
    names = [p[0] for p in tap.Options.optParameters] + ["listen"]
    for name in names:
        assert f"--{name}" in text, name
    assert tap.DEFAULT_LISTEN in text
    assert "repeatable" in text


# -- building the tree ---------------------------------------------------------------


def test_make_service_builds_tree_without_listening(tmp_path):
    """makeService builds store, dispatcher, factory and listeners, and touches neither the reactor nor the database."""
    top, server, reactor = build(
        tmp_path, "--listen", "tcp:7701:interface=127.0.0.1", "--listen", "tcp:7702:interface=127.0.0.1"
    )
    assert (reactor.tcpServers, reactor.unixServers, reactor.sslServers) == ([], [], [])
    assert reactor.getDelayedCalls() == [] and reactor.triggers == {}
    assert not top.running and not server.running
    assert not (tmp_path / "data" / "gridd.db").exists()

    assert isinstance(server, GriddService)
    assert isinstance(server.store, SQLiteStore)
    assert server.store.path == str(tmp_path / "data" / "gridd.db")
    assert isinstance(server.dispatcher, Dispatcher) and server.dispatcher.store is server.store
    assert isinstance(server.factory, ServerFactory) and server.factory.dispatcher is server.dispatcher
    listeners = list(server.listeners)
    assert all(isinstance(s, StreamServerEndpointService) for s in listeners)
    assert [s.spec for s in listeners] == ["tcp:7701:interface=127.0.0.1", "tcp:7702:interface=127.0.0.1"]
    assert all(s.factory is server.factory for s in listeners)
    assert not server.listeners.running


def test_make_service_passes_settings_through(tmp_path):
    """The timing and size options reach the dispatcher and the wire adapter."""
    _, server, _ = build(
        tmp_path,
        "--db",
        "memory:",
        "--beat",
        "0.5",
        "--deadline",
        "2",
        "--max-line",
        "70000",
        "--handshake-timeout",
        "3",
        "--default-timeout",
        "60",
        "--reattach-grace",
        "9",
    )
    assert isinstance(server.store, MemoryStore)
    d = server.dispatcher
    assert (d.beat, d.deadline, d.default_timeout, d.reattach_grace) == (0.5, 2.0, 60.0, 9.0)
    assert (server.factory.max_line, server.factory.handshake_timeout) == (70000, 3.0)


def test_poison_options_default_three_and_reach_the_dispatcher(tmp_path):
    """--poison-after and --bad-worker-after default to 3; set (0 turns them off), they reach the dispatcher."""
    _, server, _ = build(tmp_path, "--db", "memory:")
    poison = server.dispatcher.poison
    assert (poison.poison_after, poison.bad_worker_after) == (3, 3)
    _, server, _ = build(tmp_path, "--db", "memory:", "--poison-after", "0", "--bad-worker-after", "5")
    poison = server.dispatcher.poison
    assert (poison.poison_after, poison.bad_worker_after) == (0, 5)


def test_gridd_service_listens_only_after_store_and_dispatcher_started(tmp_path, monkeypatch):
    """Starting the tree opens the store, then loads the dispatcher, and only then listens."""
    store = ControlledStore()
    store.hold("start", "load_active", work=False, times=1)
    monkeypatch.setattr(tap, "open_store", lambda uri, reactor=None, server_id=None: store)
    top, server, reactor = build(tmp_path)
    top.startService()
    assert [c.name for c in store.calls] == ["start"] and reactor.tcpServers == []
    store.answer("start")
    assert [c.name for c in store.calls] == ["start", "beat", "load_active"] and reactor.tcpServers == []
    assert not server.started.called
    store.answer("load_active")
    assert reactor.tcpServers == [(7700, server.factory, 50, "127.0.0.1")]
    [port] = server.started.result
    assert port.getHost().port == 7700
    run_stop(top)


def run_stop(top):
    d = top.stopService()
    assert d.called
    return d


def test_gridd_service_memory_store_starts_and_writes_port_file(tmp_path, logged):
    """With --db memory: the tree starts at once, listens on every --listen and writes the port file."""
    port_file = tmp_path / "ports.json"
    top, server, reactor = build(
        tmp_path,
        "--db",
        "memory:",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        "unix:" + str(tmp_path / "gridd.sock"),
        "--port-file",
        str(port_file),
    )
    top.startService()
    assert [(p, f, i) for p, f, _, i in reactor.tcpServers] == [(0, server.factory, "127.0.0.1")]
    assert [(a, f) for a, f, *_ in reactor.unixServers] == [(str(tmp_path / "gridd.sock"), server.factory)]
    assert server.started.called and len(server.started.result) == 2
    assert json.loads(port_file.read_text()) == [
        {"host": "0.0.0.0", "port": 0},  # what MemoryReactor's fake port reports
        {"path": str(tmp_path / "gridd.sock")},
    ]
    listening = {e.get("spec"): e.get("where") for e in logged if "gridd listening on" in e.get("log_format", "")}
    assert listening == {
        "tcp:0:interface=127.0.0.1": "0.0.0.0:0",
        "unix:" + str(tmp_path / "gridd.sock"): str(tmp_path / "gridd.sock"),
    }
    run_stop(top)


def test_gridd_service_stopped_while_store_starts_never_listens(tmp_path, monkeypatch):
    """A tree stopped before its store finished opening never listens, and stops the store it opened."""
    store = ControlledStore()
    store.hold("start", "load_active", work=False, times=1)
    monkeypatch.setattr(tap, "open_store", lambda uri, reactor=None, server_id=None: store)
    top, server, reactor = build(tmp_path)
    top.startService()
    stopped = top.stopService()
    assert stopped.called
    store.answer_all()
    assert reactor.tcpServers == [] and not server.listeners.running
    assert store.calls[-1].name == "stop" and not store.inner._running
    assert reactor.getDelayedCalls() == []


def test_gridd_service_stop_unlistens_flushes_store_then_sends_bye(tmp_path):
    """stopService stops listening, commits the store's writes, sends BYE, and returns once the connections are gone."""
    top, server, reactor = build(tmp_path, "--db", "memory:")
    top.startService()
    [port] = server.started.result
    events = []
    port.stopListening = lambda: events.append("unlisten")
    flushed = defer.Deferred()
    inner_stop = server.store.stop

    def store_stop():
        events.append("store.stop")
        return flushed.addCallback(lambda _: inner_stop())

    server.store.stop = store_stop
    proto = server.factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    secret = (tmp_path / "data" / "secret").read_text().strip()
    proto.dataReceived(wire.encode("HELLO", {"rid": 1, "proto": 1, "role": "client", "name": "c", "token": secret}))
    transport.clear()

    d = top.stopService()
    events.append("after stopService")
    assert events == ["unlisten", "store.stop", "after stopService"]
    assert transport.value() == b"" and not transport.disconnecting, "BYE before the store was flushed"
    assert not d.called, "stopService returned before the store was flushed"
    flushed.callback(None)
    assert not server.store._running
    assert transport.value() == b'BYE {"reason":"shutdown"}\n' and transport.disconnecting
    assert not d.called, "stopService returned before the BYE left (the reactor would drop it)"
    proto.connectionLost(None)
    assert server.factory.connections == set()
    assert d.called


# -- loopback and the warning ------------------------------------------------------

LOOPBACK_CASES = [
    ("tcp:7700", False),
    ("tcp:7700:interface=127.0.0.1", True),
    ("tcp:7700:interface=127.8.9.10", True),
    ("tcp:port=7700:interface=127.0.0.1", True),
    ("tcp:interface=127.0.0.1:port=7700", True),
    (r"tcp6:7700:interface=\:\:1", True),
    (r"tcp6:7700:interface=\:\:", False),
    ("tcp6:7700", False),
    ("tcp:7700:interface=localhost", True),
    ("tcp:7700:interface=0.0.0.0", False),
    ("tcp:7700:interface=192.168.1.10", False),
    ("tcp:7700:interface=gridd.example.com", False),
    ("tcp:7700:backlog=5", False),
    ("unix:/run/gridd.sock", True),
    ("unix:address=/tmp/gridd.sock:mode=600", True),
    ("ssl:7701:interface=127.0.0.1:privateKey=k.pem", True),
    ("ssl:7701:privateKey=k.pem", False),
]


@pytest.mark.parametrize(("spec", "loopback"), LOOPBACK_CASES)
def test_is_loopback_listen_cases(spec, loopback):
    """is_loopback_listen is true only for endpoints bound to a loopback interface, or UNIX sockets."""
    assert is_loopback_listen(spec) is loopback


@pytest.mark.parametrize(("spec", "loopback"), [c for c in LOOPBACK_CASES if c[0].startswith("tcp")])
def test_is_loopback_listen_agrees_with_twisted(spec, loopback):
    """For TCP endpoints, is_loopback_listen agrees with the interface Twisted's own parser binds."""
    reactor = MemoryReactorClock()
    serverFromString(reactor, spec).listen(ServerFactory(None, None, reactor))
    [(_, _, _, interface)] = reactor.tcpServers
    try:
        bound = interface == "localhost" or ipaddress.ip_address(interface).is_loopback
    except ValueError:  # all interfaces (""), or a host name Twisted would resolve
        bound = False
    assert bound is loopback


@pytest.mark.parametrize(
    "spec", ["tcp:7700", "tcp:7700:interface=0.0.0.0", "tcp:7700:interface=192.168.1.10", "tcp6:7700"]
)
def test_options_refuse_plain_tcp_beyond_loopback(tmp_path, spec):
    """A tcp: listener beyond loopback stops the server with one clear error unless --allow-plain-tcp is given."""
    with pytest.raises(
        usage.UsageError, match=r"refusing to listen with plain TCP beyond loopback .*--allow-plain-tcp"
    ):
        parse(tmp_path, "--listen", spec)
    assert parse(tmp_path, "--listen", spec, "--allow-plain-tcp")["listen"] == [spec]


def test_options_loopback_unix_and_ssl_listeners_need_no_flag(tmp_path):
    """Loopback TCP, UNIX sockets and ssl: listeners on any interface start without --allow-plain-tcp."""
    specs = [
        "tcp:7700:interface=127.0.0.1",
        r"tcp6:7700:interface=\:\:1",
        "unix:/tmp/x.sock",
        "ssl:7701:privateKey=k.pem",
    ]
    args = [a for spec in specs for a in ("--listen", spec)]
    assert parse(tmp_path, *args)["listen"] == specs


def test_options_connection_limits(tmp_path):
    """The per-connection limits have their documented defaults, can be set, and must be positive."""
    options = parse(tmp_path)
    assert (options["max-outstanding"], options["max-rate"], options["rate-burst"], options["max-output"]) == (
        256,
        5000.0,
        5000,
        16 * 1024 * 1024,
    )
    args = ["--max-outstanding", "8", "--max-rate", "50", "--rate-burst", "20", "--max-output", "65536"]
    _, server, _ = build(tmp_path, "--db", "memory:", *args)
    limits = server.factory.limits
    assert (limits.max_outstanding, limits.rate, limits.burst, limits.max_output) == (8, 50.0, 20, 65536)
    for name in ("--max-outstanding", "--max-rate", "--rate-burst", "--max-output"):
        with pytest.raises(usage.UsageError):
            parse(tmp_path, name, "0")


def test_make_service_warns_loudly_for_non_loopback_tcp(tmp_path, logged):
    """An allowed plain TCP listener beyond loopback logs a warning naming it; a loopback or UNIX one does not."""
    build(tmp_path, "--db", "memory:", "--listen", "tcp:7700:interface=127.0.0.1", "--listen", "unix:/tmp/x.sock")
    assert _warnings(logged) == []
    build(tmp_path, "--db", "memory:", "--listen", "tcp:7700", "--allow-plain-tcp")
    [warning] = _warnings(logged)
    assert warning["spec"] == "tcp:7700"
    assert "WARNING" in warning["log_format"] and "without TLS" in warning["log_format"]


def test_make_service_no_tls_warning_for_ssl_listener(tmp_path, logged):
    """An ssl: listener on every interface is the production setup and gets no 'without TLS' warning."""
    key, cert = _self_signed(tmp_path)
    top, server, reactor = build(tmp_path, "--db", "memory:", "--listen", f"ssl:7701:privateKey={key}:certKey={cert}")
    assert _warnings(logged) == []
    top.startService()
    assert [(p, f) for p, f, *_ in reactor.sslServers] == [(7701, server.factory)]
    run_stop(top)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gridd.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("gridd.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = tmp_path / "key.pem", tmp_path / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


# -- the secret --------------------------------------------------------------------------


def test_make_service_creates_private_secret_and_reuses_it(tmp_path):
    """The first build creates the secret file with mode 0600; the next build uses the same secret."""
    _, first, _ = build(tmp_path, "--db", "memory:")
    path = tmp_path / "data" / "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 32
    _, second, _ = build(tmp_path, "--db", "memory:")
    assert path.read_text().strip() == secret
    for server in (first, second):
        assert _check(server, "c", "client", secret) == Identity(None, "admin")
        with pytest.raises(errors.AuthFailed):
            _check(server, "c", "client", secret + "x")


def test_make_service_explicit_secret_file_used(tmp_path):
    """--secret-file names an existing secret that peers must present; the data directory gets none."""
    path = tmp_path / "given-secret"
    path.write_text("operator-chosen\n")
    _, server, _ = build(tmp_path, "--db", "memory:", "--secret-file", str(path))
    assert _check(server, "w", "worker", "operator-chosen") == Identity(None, "worker")
    assert not (tmp_path / "data" / "secret").exists()


def test_make_service_no_shared_secret_refuses_it_and_creates_none(tmp_path):
    """--no-shared-secret: no secret file is made, and the shared secret logs nobody in."""
    _, server, _ = build(tmp_path, "--db", "memory:", "--no-shared-secret")
    assert not server.factory.authenticator.shared_secret_enabled
    assert not (tmp_path / "data" / "secret").exists()


def _check(server, name, role, token):
    """The authenticator's answer, with the memory store started (it answers at once)."""
    store = server.factory.authenticator.store
    store.start()
    try:
        out = []
        server.factory.authenticator.check(name, role, token).addBoth(out.append)
        [result] = out
        if isinstance(result, Failure):
            result.raiseException()
        return result
    finally:
        store.stop()


def test_options_type_timeout_repeatable_and_reaches_the_dispatcher(tmp_path):
    """--type-timeout TYPE=SECONDS sets one type's run-time limit; the last one given for a type wins."""
    top, server, _ = build(
        tmp_path,
        "--type-timeout",
        "sleep=30",
        "--type-timeout",
        "render=7200",
        "--type-timeout",
        "sleep=45",
        "--default-timeout",
        "600",
    )
    assert server.dispatcher.type_timeouts == {"sleep": 45.0, "render": 7200.0}
    assert server.dispatcher.timeout_for("sleep", None) == 45.0
    assert server.dispatcher.timeout_for("noop", None) == 600.0
    assert server.dispatcher.timeout_for("sleep", 5.0) == 5.0


@pytest.mark.parametrize("value", ["sleep", "=30", "sleep=", "sleep=0", "sleep=-1", "sleep=x", "sleep=inf"])
def test_options_type_timeout_malformed_is_a_usage_error(tmp_path, value):
    """A --type-timeout that is not TYPE=SECONDS with positive finite seconds is refused with a usage error."""
    with pytest.raises(usage.UsageError, match="--type-timeout"):
        parse(tmp_path, "--type-timeout", value)
