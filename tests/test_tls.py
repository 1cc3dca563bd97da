"""TLS: the office CA, and clients that refuse every server that cannot prove its name.

Real TLS over loopback on the real reactor: an in-process server
(``tests/live.py``) on ``ssl:0:interface=127.0.0.1:...``, and for the whole
path a real ``twistd gridd`` and ``twistd gridworker`` (``gridd.launch``).
The refusals are checked from both sides: the client fails with a message
that says why, and the server's authenticator never saw a HELLO, so the
token did not leave the client.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import socket
import ssl
import stat
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, threads
from twisted.internet.endpoints import _parse, clientFromString, connectProtocol, serverFromString
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from gridd import errors, tls
from gridd.cli import gridctl
from gridd.client import connect
from gridd.launch import LocalGrid, free_port
from gridd.peer import ConnectionDropped
from gridd.worker import tap as worker_tap
from gridd.worker.service import make_worker_service
from tests.live import LiveServer, bounded, turns

NAME = "gridhost.test"


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


# -- the certificates --------------------------------------------------------------


def _no_san_cert(ca_dir: Path, out: Path, common_name: str) -> Path:
    """A certificate signed by the CA in ``ca_dir`` with the right CN but no subjectAltName at all."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True)
    (out / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The office CA with a server certificate for gridhost.test and 127.0.0.1; a no-SAN one; a second CA."""
    base = tmp_path_factory.mktemp("pki")
    trust = tls.make_ca(base / "ca", "Test office CA")
    good = tls.make_server_cert(base / "ca", base / "ca" / "servers" / NAME, [NAME, "127.0.0.1"])
    no_san = _no_san_cert(base / "ca", base / "no-san", NAME)
    other_trust = tls.make_ca(base / "other", "Someone else's CA")
    return {
        "trust": trust,
        "good": good.cert.parent,
        "no_san": no_san,
        "other_trust": other_trust,
    }


def _listen(certdir: Path, port: int = 0) -> str:
    key, cert = (tls.escape_endpoint_value(str(certdir / f)) for f in ("key.pem", "cert.pem"))
    return f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"


def _tls(name: str, port: int, trust: Path) -> str:
    """Check ``name`` while connecting to 127.0.0.1 (the tls: endpoint's endpoint= form)."""
    return f"tls:{name}:{port}:trustRoots={tls.escape_endpoint_value(str(trust))}:endpoint=tcp\\:127.0.0.1\\:{port}"


def test_make_ca_layout_modes_and_key_type(tmp_path):
    """make_ca writes ca.pem, ca.key (0600, EC P-256) and a trust directory holding the CA under its fingerprint."""
    trust = tls.make_ca(tmp_path / "ca", "Office grid CA")
    assert trust == (tmp_path / "ca" / "trust").absolute()
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    [trusted] = trust.iterdir()
    assert trusted.name.startswith("gridd-ca-") and trusted.suffix == ".pem"
    assert trusted.read_bytes() == (tmp_path / "ca" / "ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(trusted.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Office grid CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key((tmp_path / "ca" / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    with pytest.raises(FileExistsError):
        tls.make_ca(tmp_path / "ca", "again")


def test_make_server_cert_sans_validity_and_renewal(tmp_path):
    """A server certificate names every host as a SAN (DNS or IP), is for servers only, and renewing replaces it."""
    tls.make_ca(tmp_path / "ca", "CA")
    made = tls.make_server_cert(tmp_path / "ca", tmp_path / "srv", ["Grid.Office.lan", "192.168.1.10", "::1"])
    cert = x509.load_pem_x509_certificate(made.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["grid.office.lan"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.1.10"),
        ipaddress.ip_address("::1"),
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=365) < lifetime < datetime.timedelta(days=tls.SERVER_DAYS + 1)
    assert stat.S_IMODE(made.key.stat().st_mode) == 0o600
    assert tls.check_certificate_names(cert, "grid.office.lan") is None
    assert tls.check_certificate_names(cert, "192.168.1.10") is None
    assert "does not name" in tls.check_certificate_names(cert, "other.office.lan")
    first = made.cert.read_bytes()
    again = tls.make_server_cert(tmp_path / "ca", tmp_path / "srv", ["grid.office.lan"])
    assert again.cert == made.cert and again.cert.read_bytes() != first
    assert sorted(p.name for p in (tmp_path / "srv").iterdir()) == ["cert.pem", "key.pem"]
    with pytest.raises(ValueError):
        tls.make_server_cert(tmp_path / "ca", tmp_path / "x", ["not a name"])
    with pytest.raises(ValueError):
        tls.make_server_cert(tmp_path / "ca", tmp_path / "x", [])


def test_check_certificate_names_refuses_certificate_without_san(pki):
    """A certificate without subjectAltName names no host, not even the one in its common name."""
    cert = x509.load_pem_x509_certificate((pki["no_san"] / "cert.pem").read_bytes())
    assert "no subjectAltName" in tls.check_certificate_names(cert, NAME)


@pytest.mark.parametrize(
    "spec",
    [
        r"tls:h:7701:trustRoots=c\:\\d:endpoint=tcp\:127.0.0.1\:55",
        "tls:host=a:port=5:x=y=z",
        r"ssl:1:privateKey=/a\:b\=c\\d",
        "tcp:127.0.0.1:7700",
        "unix:/tmp/x.sock:timeout=3",
    ],
)
def test_split_endpoint_agrees_with_twisted(spec):
    """gridd splits endpoint strings exactly as Twisted's own parser does, escapes included."""
    assert tls.split_endpoint(spec) == _parse(spec)


def test_escape_endpoint_value_round_trips():
    """A path with colons, equals signs and backslashes survives a trip through an endpoint string."""
    path = r"C:\certs\a=b:c.pem"
    assert tls.split_endpoint("ssl:1:privateKey=" + tls.escape_endpoint_value(path))[1] == {"privateKey": path}


# -- refusing ssl: and bad trust roots, before any connection ----------------------------


def test_ssl_client_spec_refused_everywhere(tmp_path):
    """A client ssl: endpoint verifies nothing: connect, the worker and gridctl refuse it before connecting."""
    reactor = MemoryReactorClock()
    with pytest.raises(ValueError, match="^ssl: client endpoints do not verify the server; use tls:HOST:PORT"):
        tls.client_endpoint(reactor, "ssl:gridhost:7701")
    failures = []
    connect(reactor, "ssl:gridhost:7701", "token").addErrback(failures.append)
    [failure] = failures
    assert failure.check(ValueError) and str(failure.value) == f"'ssl:gridhost:7701': {tls.SSL_CLIENT_REFUSED}"
    with pytest.raises(ValueError, match="ssl: client endpoints"):
        make_worker_service(reactor, ["SSL:gridhost:7701"], name="w", token="t", job_types={}, slots=1)
    assert (reactor.tcpClients, reactor.sslClients) == ([], [])
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    with pytest.raises(usage.UsageError, match="--server ssl:gridhost:7701: ssl: client endpoints"):
        worker_tap.Options().parseOptions(["--secret-file", str(secret), "--server", "ssl:gridhost:7701"])


def test_gridctl_ssl_server_refused_with_exit_2(tmp_path):
    """gridctl --server ssl:... exits 2 with the one-line reason, having connected to nothing."""
    (tmp_path / "secret").write_text("s\n")
    args = gridctl.build_parser().parse_args(
        ["--server", "ssl:gridhost:7701", "--secret-file", str(tmp_path / "secret"), "stats"]
    )
    gridctl.prepare(args)
    err, reactor = io.StringIO(), MemoryReactorClock()
    codes = []
    defer.ensureDeferred(gridctl.run(reactor, args, out=io.StringIO(), err=err)).addBoth(codes.append)
    assert codes == [gridctl.EXIT_USAGE]
    assert err.getvalue() == (
        "gridctl: error: bad --server endpoint 'ssl:gridhost:7701': ssl: client endpoints do not verify the server;"
        " use tls:HOST:PORT:trustRoots=DIR\n"
    )
    assert (reactor.tcpClients, reactor.sslClients) == ([], [])


def test_trust_roots_must_be_a_directory_of_pem_files(tmp_path, pki):
    """trustRoots naming a file, or a directory without certificates, is a clear ValueError."""
    reactor = MemoryReactorClock()
    ca_pem = next(pki["trust"].iterdir())
    with pytest.raises(ValueError, match="must be a directory"):
        tls.client_endpoint(reactor, f"tls:{NAME}:7701:trustRoots={ca_pem}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .pem certificates"):
        tls.client_endpoint(reactor, f"tls:{NAME}:7701:trustRoots={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="unknown tls: endpoint options"):
        tls.client_endpoint(reactor, f"tls:{NAME}:7701:trustRoot={pki['trust']}")
    tls.client_endpoint(reactor, f"tls:{NAME}:7701:trustRoots={pki['trust']}").connect(protocol.Factory())
    [(host, port, *_)] = reactor.tcpClients
    assert port == 7701


# -- real TLS over loopback ------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def good_server(reactor, tmp_path, pki):
    server = await LiveServer(reactor, tmp_path, _listen(pki["good"])).start()
    yield server
    await server.stop()


async def _refused(reactor, spec: str, secret: str) -> str:
    with pytest.raises(ConnectionDropped) as refused:
        await bounded(connect(reactor, spec, secret), reactor)
    return str(refused.value)


@pytest_twisted.ensureDeferred
async def test_tls_right_ca_and_name_connects(reactor, good_server, pki):
    """A client that trusts the office CA connects by host name and by IP address, and is served."""
    port, secret = good_server.port, good_server.secret
    for spec in (_tls(NAME, port, pki["trust"]), f"tls:127.0.0.1:{port}:trustRoots={pki['trust']}"):
        client = await bounded(connect(reactor, spec, secret), reactor)
        assert (await client.stats())["workers"] == 0
        await client.close()
    assert [role for _, role in good_server.auth.seen] == ["client", "client"]


@pytest_twisted.ensureDeferred
async def test_tls_server_closes_cleanly_after_refusal_and_on_shutdown(reactor, tmp_path, pki):
    """Over TLS the server's closes complete at once: after a refused HELLO, and with BYE when it stops."""
    server = await LiveServer(reactor, tmp_path, _listen(pki["good"])).start()
    spec = _tls(NAME, server.port, pki["trust"])
    with pytest.raises(errors.AuthFailed):
        await bounded(connect(reactor, spec, "wrong secret"), reactor)
    await turns(reactor, lambda: not server.factory.connections, timeout=5, what="the refused connection closing")
    client = await bounded(connect(reactor, spec, server.secret), reactor)
    await server.stop()  # waits until the server's side of every connection is gone, well within the close timeout
    await bounded(client.closed, reactor, timeout=5)
    assert client.bye_reason == "shutdown"


def _hostile_tls_peer(port: int, chunks: int, chunk: bytes) -> socket.socket:
    """Over TLS: an over-long line, then ``chunks`` more bytes with no newline, never answering close_notify.

    Python's ``ssl`` (unlike Twisted's TLS) leaves a received close_notify
    unanswered unless told to, as a hostile peer would. Runs in a thread;
    returns the open socket for the test to close.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the attacker does not care who the server is
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20))
    sock.sendall(b"X" * 70_000)  # past the pre-HELLO line limit
    received = b""
    while b"line_too_long" not in received:
        data = sock.recv(4096)
        if not data:
            raise AssertionError(f"closed before ERR line_too_long: {received!r}")
        received += data
    for _ in range(chunks):
        sock.sendall(chunk)
    return sock


@pytest_twisted.ensureDeferred
async def test_tls_peer_sending_on_after_the_server_closes_grows_no_buffer(reactor, good_server, pki):
    """Over TLS (read on until close_notify), bytes a peer sends after an over-long line are dropped, not kept."""
    heard, built = [], []
    build = good_server.factory.buildProtocol

    def counting(addr):  # count the bytes the server's protocol is handed, from the first
        proto = build(addr)
        original = proto.dataReceived
        proto.dataReceived = lambda data: (heard.append(len(data)), original(data))
        built.append(proto)
        return proto

    good_server.factory.buildProtocol = counting
    chunk, chunks = b"Y" * 65536, 64  # 4 MiB after the refusal
    sock = await bounded(threads.deferToThread(_hostile_tls_peer, good_server.port, chunks, chunk), reactor)
    [server_side] = built
    try:
        await turns(reactor, lambda: sum(heard) >= 70_000 + chunks * len(chunk), what="the server reading every byte")
        assert server_side._ending == "closing"
        assert server_side._buffer == b""
    finally:
        sock.close()
    await turns(reactor, lambda: not good_server.factory.connections, what="the server's side closing")


@pytest_twisted.ensureDeferred
async def test_tls_mismatched_host_name_refused(reactor, good_server, pki):
    """A trusted certificate for another name is refused during the handshake: no HELLO, no token, is sent."""
    message = await _refused(reactor, _tls("other.test", good_server.port, pki["trust"]), good_server.secret)
    assert "does not name 'other.test'" in message
    message = await _refused(
        reactor,
        f"tls:127.0.0.2:{good_server.port}:trustRoots={pki['trust']}:endpoint=tcp\\:127.0.0.1\\:{good_server.port}",
        good_server.secret,
    )
    assert "does not name '127.0.0.2'" in message
    assert good_server.auth.seen == []


@pytest_twisted.ensureDeferred
async def test_tls_wrong_ca_refused(reactor, good_server, pki):
    """A client that trusts another CA refuses the server's certificate, whatever its names."""
    message = await _refused(reactor, _tls(NAME, good_server.port, pki["other_trust"]), good_server.secret)
    assert "not issued by a trusted CA" in message
    assert good_server.auth.seen == []


@pytest_twisted.ensureDeferred
async def test_tls_certificate_without_san_refused(reactor, tmp_path, pki):
    """A certificate from the trusted CA whose CN is the host name but which has no SAN is refused."""
    server = await LiveServer(reactor, tmp_path, _listen(pki["no_san"])).start()
    try:
        message = await _refused(reactor, _tls(NAME, server.port, pki["trust"]), server.secret)
        assert "has no subjectAltName" in message
        message = await _refused(reactor, f"tls:127.0.0.1:{server.port}:trustRoots={pki['trust']}", server.secret)
        assert "has no subjectAltName" in message
        assert server.auth.seen == []
    finally:
        await server.stop()


class _Hello(protocol.Protocol):
    """Sends nothing; records whether the TLS handshake completed and what came back."""

    def __init__(self):
        self.done = defer.Deferred()
        self.shaken = False

    def handshakeCompleted(self):
        self.shaken = True
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.shaken)


@pytest.mark.expected_log_errors
@pytest_twisted.ensureDeferred
async def test_twisted_tls_endpoint_alone_accepts_certificate_without_san(reactor, tmp_path, pki):
    """The trap gridd guards against: Twisted's plain tls: endpoint accepts a no-SAN certificate."""
    from twisted.internet.interfaces import IHandshakeListener
    from zope.interface import directlyProvides

    server = await LiveServer(reactor, tmp_path, _listen(pki["no_san"])).start()
    try:
        probe = _Hello()
        directlyProvides(probe, IHandshakeListener)
        await bounded(connectProtocol(clientFromString(reactor, _tls(NAME, server.port, pki["trust"])), probe), reactor)
        accepted = await bounded(probe.done, reactor)
    finally:
        await server.stop()
    if not accepted:
        pytest.skip("this Twisted refuses certificates without SAN itself; gridd's guard stays regardless")
    assert accepted


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_tls_e2e_worker_and_client_over_tls(reactor, tmp_path, pki):
    """twistd gridd on ssl: and twistd gridworker and a client on tls: run jobs end to end."""
    port = free_port()
    grid = LocalGrid(
        reactor, tmp_path, port=port, listen=_listen(pki["good"], port), connect=_tls(NAME, port, pki["trust"])
    )
    try:
        await grid.start_server()
        await grid.start_worker("w1", 2)
        client = await bounded(connect(reactor, grid.endpoint, grid.secret, name="tls-e2e"), reactor)
        ids = await client.submit([{"type": "textstats", "records": [f"text {i}"]} for i in range(10)])
        final = await bounded(client.wait(ids), reactor)
        assert {status["state"] for status in final.values()} == {"done"}
        [worker] = await client.workers()
        assert worker["name"] == "w1"
        await client.close()
    finally:
        await grid.stop_all()


# -- gridctl certs -----------------------------------------------------------------------


def test_gridctl_certs_init_and_server_print_working_endpoints(tmp_path, capsys):
    """gridctl certs init and server make the files and print --listen and --server lines that parse and verify."""
    directory = tmp_path / "office"
    with pytest.raises(SystemExit) as exit:
        gridctl.main(["certs", "init", str(directory), "--name", "Office grid CA"])
    assert exit.value.code == 0
    assert "trust" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        gridctl.main(["certs", "server", str(directory), "--host", "gridhost.office.lan", "--host", "192.168.1.10"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    [listen] = [line.split("--listen ", 1)[1] for line in out.splitlines() if "--listen " in line]
    [server] = [line.split("gridworker --server ", 1)[1] for line in out.splitlines() if "gridworker --server" in line]
    assert listen.startswith("ssl:7701:privateKey=") and server.startswith("tls:gridhost.office.lan:7701:trustRoots=")
    memory = MemoryReactorClock()
    serverFromString(memory, listen).listen(protocol.Factory())  # loads the key and the certificate
    assert [port for port, *_ in memory.sslServers] == [7701]
    tls.client_endpoint(memory, server)  # loads the trust directory
    cert = x509.load_pem_x509_certificate((directory / "servers" / "gridhost.office.lan" / "cert.pem").read_bytes())
    assert tls.check_certificate_names(cert, "gridhost.office.lan") is None
    assert tls.check_certificate_names(cert, "192.168.1.10") is None


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["certs", "server", "{dir}/none", "--host", "h"], "run gridctl certs init first"),
        (["certs", "server", "{dir}/ca", "--host", "bad name"], "neither a DNS name nor an IP address"),
        (["certs", "init", "{dir}/ca"], "already holds a CA"),
    ],
)
def test_gridctl_certs_errors_exit_2(tmp_path, capsys, argv, complaint):
    """A missing CA, a bad host name or an existing CA is one line on stderr and exit status 2."""
    tls.make_ca(tmp_path / "ca", "CA")
    with pytest.raises(SystemExit) as exit:
        gridctl.main([a.format(dir=tmp_path) for a in argv])
    assert exit.value.code == gridctl.EXIT_USAGE
    assert complaint in capsys.readouterr().err
