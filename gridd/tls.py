"""TLS for gridd: the small office's certificate authority, and clients that really check the server.

Two halves, each kept small:

- **Certificates** (on ``cryptography``): :func:`make_ca` creates a CA,
  :func:`make_server_cert` issues a server certificate whose
  subjectAltNames name every DNS name and IP address the server is reached
  by. ``gridctl certs`` drives both. The layout of a CA directory::

      DIR/ca.pem                  the CA certificate
      DIR/ca.key                  its private key (mode 0600): keep it on one safe host
      DIR/trust/gridd-ca-*.pem    the trust directory: copy it to every worker and client host
      DIR/servers/NAME/cert.pem   a server certificate ...
      DIR/servers/NAME/key.pem    ... and its private key (mode 0600)

  The server listens with ``ssl:7701:privateKey=DIR/servers/NAME/key.pem:certKey=DIR/servers/NAME/cert.pem``;
  workers and clients connect with ``tls:NAME:7701:trustRoots=DIR/trust``
  (``trustRoots`` must be a directory of ``.pem`` files). The trust file is
  named after the CA's fingerprint, so a trust directory can hold the old and
  the new CA side by side while certificates are rotated.

- **Client endpoints**: :func:`client_endpoint` is how every gridd worker and
  client turns an endpoint string into an endpoint. It refuses ``ssl:``
  (a client ``ssl:`` endpoint verifies nothing) and builds ``tls:``
  endpoints whose host-name check cannot be skipped. Twisted's own ``tls:``
  check lets through a trusted certificate without any subjectAltName (from
  Twisted 26.4 the service_identity error is only logged): gridd's check runs
  in the TLS verify callback, so such a certificate fails the handshake and
  nothing, least of all the HELLO with its token, is sent to that server.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "SSL_CLIENT_REFUSED",
    "CertificateRefused",
    "ServerCert",
    "make_ca",
    "make_server_cert",
    "client_endpoint",
    "check_client_spec",
    "split_endpoint",
    "escape_endpoint_value",
]

#: Why a client ``ssl:`` endpoint string is refused.
SSL_CLIENT_REFUSED = "ssl: client endpoints do not verify the server; use tls:HOST:PORT:trustRoots=DIR"

CA_DAYS = 3650
SERVER_DAYS = 825
#: Certificates start this long before they are made, for hosts whose clocks run a little behind.
_BACKDATE = datetime.timedelta(hours=1)


class CertificateRefused(Exception):
    """The server's certificate does not prove it is the host the endpoint names."""


# -- the certificate authority ---------------------------------------------------


def make_ca(directory: str | os.PathLike, name: str, *, days: int = CA_DAYS) -> Path:
    """Create a CA in ``directory`` (``ca.pem``, ``ca.key``, ``trust/``); return the trust directory.

    Refuses to overwrite an existing CA: replacing it would break every
    certificate it issued. To rotate, make a new CA in a new directory.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    if (directory / "ca.key").exists() or (directory / "ca.pem").exists():
        raise FileExistsError(f"{directory} already holds a CA (ca.pem, ca.key); use a new directory to rotate")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write(directory / "ca.key", _key_pem(key), 0o600)
    pem = _cert_pem(cert)
    _write(directory / "ca.pem", pem, 0o644)
    trust = directory / "trust"
    trust.mkdir(exist_ok=True)
    _write(trust / f"gridd-ca-{hashlib.sha256(pem).hexdigest()[:16]}.pem", pem, 0o644)
    return trust.absolute()


@dataclass(frozen=True)
class ServerCert:
    """Where :func:`make_server_cert` wrote a server's certificate and key."""

    cert: Path
    key: Path
    names: tuple[str, ...]
    not_after: datetime.datetime

    def listen_spec(self, port: int = 7701) -> str:
        """The server's ``--listen`` endpoint string for this certificate."""
        key, cert = escape_endpoint_value(str(self.key)), escape_endpoint_value(str(self.cert))
        return f"ssl:{port}:privateKey={key}:certKey={cert}"


def make_server_cert(
    ca_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: Iterable[str],
    *,
    days: int = SERVER_DAYS,
) -> ServerCert:
    """Issue a server certificate for ``names`` (DNS names and IP addresses) signed by the CA in ``ca_dir``.

    Every name becomes a subjectAltName, which is what clients check. Writes
    ``out_dir/cert.pem`` and ``out_dir/key.pem`` (mode 0600), replacing an
    older pair atomically (that is how a server certificate is renewed).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not names:
        raise ValueError("a server certificate needs at least one host name or IP address")
    alt_names = [_alt_name(n) for n in names]
    ca_dir = Path(ca_dir)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out_dir / "key.pem", out_dir / "cert.pem"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, _cert_pem(cert), 0o644)
    return ServerCert(cert_path.absolute(), key_path.absolute(), names, not_after)


def _alt_name(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name):
        raise ValueError(f"{name!r} is neither a DNS name nor an IP address")
    return x509.DNSName(name.lower())


def _key_usage(cert_sign: bool):
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, the file having ``mode`` from its first byte."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# -- client endpoints ----------------------------------------------------------------


def split_endpoint(spec: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string as Twisted does: positional fields and ``key=value`` fields.

    ``\\`` escapes the next character; after a ``=`` only ``:`` separates.
    ``split_endpoint("tls:h:7701:trustRoots=c\\:\\\\d")`` is
    ``(["tls", "h", "7701"], {"trustRoots": "c:\\\\d"})``.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    fields: list[str] = []
    current: list[str] = []
    chars = iter(spec)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":" or (char == "=" and not fields):
            fields.append("".join(current))
            current = []
            if char == ":":
                _add_field(fields, args, kwargs)
                fields = []
        else:
            current.append(char)
    fields.append("".join(current))
    _add_field(fields, args, kwargs)
    return args, kwargs


def _add_field(fields, args, kwargs):
    if len(fields) == 1:
        args.append(fields[0])
    else:
        kwargs[fields[0]] = fields[1]


def escape_endpoint_value(value: str) -> str:
    """Escape a value (a file path) for use inside an endpoint string."""
    return re.sub(r"([\\:=])", r"\\\1", value)


def check_client_spec(spec: str) -> None:
    """Raise ValueError for an endpoint string gridd's peers must not connect with (``ssl:``)."""
    kind = split_endpoint(spec)[0][0].strip().lower()
    if kind == "ssl":
        raise ValueError(SSL_CLIENT_REFUSED)


_TLS_KEYS = {"host", "port", "timeout", "bindAddress", "trustRoots", "endpoint", "certificate", "privateKey"}


def client_endpoint(reactor, spec: str) -> IStreamClientEndpoint:
    """The endpoint a worker or client connects with: ``clientFromString``, with TLS made strict.

    - ``ssl:`` is refused with ValueError (it verifies nothing);
    - ``tls:HOST:PORT[:trustRoots=DIR][:endpoint=...][:timeout=S][:bindAddress=A]``
      checks the server's certificate against the CAs in ``DIR`` (a directory
      of ``.pem`` files; the system's CAs without it) and requires a
      subjectAltName naming ``HOST``. With ``endpoint=`` the connection goes
      there and ``HOST`` is only the name checked;
    - anything else (``tcp:``, ``unix:``) goes to ``clientFromString``.
    """
    check_client_spec(spec)
    args, kwargs = split_endpoint(spec)
    if args[0].strip().lower() != "tls":
        return clientFromString(reactor, spec)
    unknown = set(kwargs) - _TLS_KEYS
    if unknown:
        raise ValueError(f"unknown tls: endpoint options {sorted(unknown)}")
    positional = dict(zip(["host", "port", "timeout", "bindAddress"], args[1:], strict=False))
    options = {**positional, **kwargs}
    host = options.get("host", "")
    if not host:
        raise ValueError("a tls: endpoint needs a host: tls:HOST:PORT:trustRoots=DIR")
    try:
        port = int(options.get("port", ""))
        timeout = float(options.get("timeout", 30))
    except ValueError:
        raise ValueError(f"bad port or timeout in {spec!r}") from None
    trust = _trust_root(options["trustRoots"]) if "trustRoots" in options else ssl.platformTrust()
    client_cert = None
    if "certificate" in options:
        pem = Path(options["certificate"]).read_bytes()
        pem += Path(options.get("privateKey", options["certificate"])).read_bytes()
        client_cert = ssl.PrivateCertificate.loadPEM(pem)
    if "endpoint" in options:
        wrapped = client_endpoint(reactor, options["endpoint"])
    else:
        bind = options.get("bindAddress")
        wrapped = HostnameEndpoint(reactor, host, port, timeout, None if bind is None else (bind, 0))
    return wrapClientTLS(StrictClientTLS(host, trust, client_cert), wrapped)


def _trust_root(directory: str):
    """The CAs in a directory of ``.pem`` files, as Twisted's ``trustRoots=`` reads them."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"trustRoots must be a directory of .pem files (made by gridctl certs init): {directory}")
    certificates = []
    for child in sorted(path.iterdir()):
        if child.suffix.lower() == ".pem" and child.is_file():
            try:
                certificates.append(ssl.Certificate.loadPEM(child.read_bytes()))
            except Exception as e:
                raise ValueError(f"{child} is not a PEM certificate: {e}") from None
    if not certificates:
        raise ValueError(f"no .pem certificates in the trustRoots directory {directory}")
    return ssl.trustRootFromCertificates(certificates)


#: Common OpenSSL verification errors, for a message people can act on.
_VERIFY_ERRORS = {
    9: "the server's certificate is not valid yet (check the clocks)",
    10: "the server's certificate has expired",
    18: "the server's certificate is self-signed and not trusted",
    19: "the server's certificate chain ends in a CA that is not trusted",
    20: "the server's certificate was not issued by a trusted CA (wrong trustRoots?)",
    21: "the server's certificate was not issued by a trusted CA (wrong trustRoots?)",
}


@implementer(IOpenSSLClientConnectionCreator)
class StrictClientTLS:
    """``optionsForClientTLS`` whose host-name check refuses what Twisted's lets through.

    Twisted's creator sets a verify callback that checks the host name with
    service_identity but only logs a ``CertificateError`` (a certificate
    without subjectAltName), and so accepts the certificate. This creator
    keeps everything else of Twisted's (trust roots, SNI, protocol versions,
    ciphers) and replaces that callback with one that fails the handshake
    unless the chain is trusted *and* a subjectAltName matches the host.
    """

    def __init__(self, hostname: str, trust_root, client_certificate=None):
        self.hostname = hostname
        self._options = ssl.optionsForClientTLS(hostname, trustRoot=trust_root, clientCertificate=client_certificate)

    def clientConnectionForTLS(self, tls_protocol):
        from OpenSSL import SSL

        connection = self._options.clientConnectionForTLS(tls_protocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tls_protocol))
        return connection

    def _verifier(self, tls_protocol):
        hostname = self.hostname

        def verify(connection, cert, errno, depth, ok) -> bool:
            if not ok:
                problem = _VERIFY_ERRORS.get(errno, f"the server's certificate failed verification (OpenSSL {errno})")
                tls_protocol.failVerification(Failure(CertificateRefused(f"{problem}: {_subject(cert)}")))
                return False
            if depth != 0:
                return True
            problem = check_certificate_names(cert.to_cryptography(), hostname)
            if problem is not None:
                tls_protocol.failVerification(Failure(CertificateRefused(problem)))
                return False
            return True

        return verify


def check_certificate_names(certificate, hostname: str) -> str | None:
    """None if a subjectAltName of ``certificate`` (cryptography) names ``hostname``, else why not."""
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address

    try:
        address = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        address = None
    try:
        if address is not None:
            verify_certificate_ip_address(certificate, str(address))
        else:
            verify_certificate_hostname(certificate, hostname)
    except CertificateError:
        return (
            f"the server's certificate has no subjectAltName, so it names no host; gridd requires one "
            f"naming {hostname!r} (issue it with gridctl certs server)"
        )
    except VerificationError:
        return f"the server's certificate does not name {hostname!r} among its subjectAltNames"
    return None


def _subject(cert) -> str:
    try:
        return cert.to_cryptography().subject.rfc4514_string()
    except Exception:
        return "?"
