"""The operators' SSH manhole: a Python prompt inside the running server.

``twistd gridd --manhole 7722`` lets an operator ``ssh -p 7722 you@127.0.0.1``
into the live process and use ``grid`` (``gridd.server.operator.Operator``)
to look and act, or the raw ``dispatcher``, ``store`` and ``server`` to dig.
Twisted's ``manhole_tap`` offers passwords only and writes a world-readable
RSA host key, so the pieces are put together here:

- ``load_or_create_host_key``: an ed25519 host key made on first start in
  the data directory with mode 0600, never shipped, reused afterwards;
- ``AuthorizedKeysFile``: OpenSSH's authorized_keys format, read again when
  the file changes, so keys are added and removed without a restart; public
  keys are the only credentials the portal knows, so no password login is
  ever offered;
- ``_UserAuth``: Twisted's ssh-userauth that logs every login and refusal
  with the user name, key fingerprint and address;
- ``_Realm`` and ``_Session``: one fresh namespace per session, a PTY
  required, a clear refusal otherwise;
- ``OperatorManhole``: plain ``manhole.Manhole`` (the coloured one sends
  escapes on every key), whose prompt waits for a Deferred or coroutine
  typed at it and shows its result, and which leaves nothing behind when the
  connection closes mid-call;
- ``ManholeService``: listens once the gridd server listens, and stops first.

It follows buildbot's ``master/buildbot/manhole.py``: a service bound to
loopback, host keys from a directory, a namespace built per session around a
small curated operator object.
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import itertools
import os
import pydoc
import stat
from dataclasses import dataclass
from pathlib import Path

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.conch import error as conch_error
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser, ISession
from twisted.conch.ssh import keys, transport, userauth
from twisted.conch.ssh.common import getNS
from twisted.cred import portal
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.python import components
from twisted.python.failure import Failure
from zope.interface import implementer

from gridd import errors
from gridd.server.operator import Operator
from gridd.server.service import is_loopback_listen

__all__ = [
    "AUTHORIZED_KEYS_NAME",
    "HOST_KEY_NAME",
    "AuthorizedKeysFile",
    "ManholeService",
    "OperatorManhole",
    "fingerprint",
    "load_or_create_host_key",
    "make_factory",
    "make_manhole_service",
]

log = Logger()

#: File names in the data directory.
HOST_KEY_NAME = "manhole_host_key"
AUTHORIZED_KEYS_NAME = "manhole_authorized_keys"

#: The key types an authorized_keys line may start with (anything else is options).
_KEY_TYPES = (b"ssh-", b"ecdsa-sha2-", b"sk-")


# ----------------------------------------------------------------------
# keys


def load_or_create_host_key(path: str | os.PathLike) -> keys.Key:
    """The manhole's private host key at ``path``, made (ed25519, mode 0600) if missing.

    Refuses a key file that others than its owner may read, as sshd does:
    whoever has it can pose as this server to operators.
    """
    path = Path(path)
    if not path.exists():
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        key = keys.Key.fromString(pem)
        log.info(
            "manhole: new host key {path}, fingerprint {fingerprint}",
            path=str(path),
            fingerprint=fingerprint(key.public().blob()),
        )
        return key
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"manhole host key {path} has mode {mode:04o}: others may read it. "
            f"Run 'chmod 600 {path}' (or delete it to make a new one)."
        )
    return keys.Key.fromString(path.read_bytes())


def fingerprint(blob: bytes) -> str:
    """A public key's fingerprint as OpenSSH prints it (``SHA256:…``)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """The public keys in an OpenSSH authorized_keys file, for any user name.

    The file is read again whenever its modification time or size changes,
    so adding or removing an operator needs no restart. A missing file means
    no keys. Lines with options (``from="…" ssh-ed25519 …``) are skipped with
    a warning: gridd would not enforce the options, and silently ignoring a
    ``from=`` restriction would be worse than refusing the key.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._seen = None
        self._keys: list[keys.Key] = []

    def getAuthorizedKeys(self, username: bytes) -> list[keys.Key]:
        return self.keys()

    def keys(self) -> list[keys.Key]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._keys = None, []
            return []
        seen = (st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            self._keys = self._read()
            self._seen = seen
        return list(self._keys)

    def _read(self) -> list[keys.Key]:
        usable = []
        for number, line in enumerate(self.path.read_bytes().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            if not line.startswith(_KEY_TYPES):
                log.warn(
                    "manhole: {path} line {number} has options, which the manhole does not enforce: line skipped",
                    path=str(self.path),
                    number=number,
                )
                continue
            usable.append(line)
        return list(readAuthorizedKeyFile(usable))


# ----------------------------------------------------------------------
# logging in


@dataclass(frozen=True)
class Login:
    """Who logged in: what every log line of their session names."""

    user: str
    fingerprint: str
    address: str
    since: float


class _UserAuth(userauth.SSHUserAuthServer):
    """ssh-userauth that logs each login and each refused attempt, with its address.

    A connection that has not logged in after two minutes or six refused
    attempts is cut (sshd's LoginGraceTime and MaxAuthTries; Twisted's
    defaults are ten hours and twenty).
    """

    loginTimeout = 120
    attemptsBeforeDisconnect = 6

    def tryAuth(self, kind, user, data):
        d = super().tryAuth(kind, user, data)
        if kind == b"none":  # clients ask which methods exist this way
            return d
        name = user.decode("utf-8", "replace")
        address = _address(self.transport.transport.getPeer())
        key = _offered_key(kind, data)

        def logged_in(result):
            _, avatar, _ = result
            avatar.login = Login(name, key, address, self.clock.seconds())
            log.info(
                "manhole: {user} logged in with key {fingerprint} from {address}",
                user=name,
                fingerprint=key,
                address=address,
            )
            return result

        def refused(failure):
            if not failure.check(conch_error.IgnoreAuthentication):  # a key query, not an attempt
                log.info(
                    "manhole: refused {method} login as {user} from {address}{key}: {why}",
                    method=kind.decode("ascii", "replace"),
                    user=name,
                    address=address,
                    key=f" with key {key}" if key else "",
                    why=failure.getErrorMessage(),
                )
            return failure

        return d.addCallbacks(logged_in, refused)


class _Transport(transport.SSHServerTransport):
    """The SSH server transport, for which a client saying goodbye is not an error."""

    def receiveError(self, reasonCode, description):
        if reasonCode == transport.DISCONNECT_BY_APPLICATION:
            log.debug("manhole: client disconnected: {why}", why=description)
        else:
            super().receiveError(reasonCode, description)


def _offered_key(kind: bytes, data: bytes) -> str:
    if kind != b"publickey":
        return ""
    try:
        _, blob, _ = getNS(data[1:], 2)
        return fingerprint(blob)
    except Exception:
        return "(unreadable key)"


def _address(peer) -> str:
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    return f"{host}:{port}" if host is not None else str(peer)


@implementer(portal.IRealm)
class _Realm:
    """Gives each login an avatar whose shell is an ``OperatorManhole`` on a fresh namespace."""

    def __init__(self, make_namespace, sessions: set):
        self.make_namespace = make_namespace
        self.sessions = sessions

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IConchUser not in interfaces:
            raise NotImplementedError("the manhole only offers SSH sessions")
        comp = components.Componentized()
        user = manhole_ssh.TerminalUser(comp, avatarId)
        user.login = None  # set by _UserAuth once the login succeeds
        session = _Session(comp)
        session.realm = self
        comp.setComponent(IConchUser, user)
        comp.setComponent(ISession, session)
        return IConchUser, user, lambda: None


class _Session(manhole_ssh.TerminalSession):
    """One SSH session channel: a terminal with the manhole in it, or a polite refusal."""

    width = height = None
    realm: _Realm
    _terminal: insults.ServerProtocol | None = None

    def openShell(self, proto):
        if self.width is None:
            _refuse(proto, "the gridd manhole needs a terminal: connect with plain ssh (or ssh -t), not ssh -T")
            return
        avatar = IConchUser(self.original)
        login = avatar.login or Login(str(avatar.avatarId), "?", _address(proto.getPeer()), 0.0)
        namespace, operator = self.realm.make_namespace(login)
        terminal = insults.ServerProtocol(OperatorManhole, namespace, login, operator, self.realm.sessions)
        self._terminal = terminal
        # Keys from the channel go to the terminal; its output goes to the channel. When
        # the manhole leaves, the client gets exit status 0; when the channel goes, the
        # manhole hears of it (Twisted's TerminalSessionTransport does neither).
        proto.makeConnection(_Pipe(terminal.dataReceived, self._channel_gone))
        terminal.makeConnection(_Pipe(proto.write, lambda: proto.processEnded(Failure(ProcessDone(0)))))
        terminal.terminalProtocol.terminalSize(self.width, self.height)

    def execCommand(self, proto, cmd):
        _refuse(proto, "the gridd manhole runs no commands: connect without one and type at the prompt")

    def windowChanged(self, newWindowSize):
        self.height, self.width = newWindowSize[:2]
        if self._terminal is not None and self._terminal.terminalProtocol is not None:
            self._terminal.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self):
        if self._terminal is not None and self._terminal.terminalProtocol is not None:
            self._terminal.terminalProtocol.leave()

    def closed(self):
        self._channel_gone()

    def _channel_gone(self):
        if self._terminal is not None:
            terminal, self._terminal = self._terminal, None
            terminal.connectionLost(Failure(conch_error.ConchError("session closed")))


class _Pipe:
    """A minimal transport: ``write`` goes to one callable, ``loseConnection`` to another."""

    def __init__(self, write, close):
        self.write = write
        self._close = close

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        self._close()


def _refuse(proto, message: str):
    proto.write(b"gridd: " + message.encode("utf-8") + b"\r\n")
    proto.processEnded(Failure(ProcessTerminated(exitCode=1)))


# ----------------------------------------------------------------------
# the prompt


@dataclass(eq=False)
class _Call:
    """A Deferred typed at the prompt that had not fired at once."""

    number: int
    deferred: defer.Deferred
    done: bool = False


class _Interpreter(manhole.ManholeInterpreter):
    """Shows what a Deferred or coroutine fires with, not the Deferred; ``exit()`` leaves."""

    def displayhook(self, obj):
        if inspect.iscoroutine(obj):
            obj = defer.Deferred.fromCoroutine(obj)
        if isinstance(obj, defer.Deferred):
            self.handler.show_when_fired(obj)
        else:
            super().displayhook(obj)

    def runcode(self, *args, **kwargs):
        try:
            super().runcode(*args, **kwargs)
        except SystemExit:
            # exit() or sys.exit() typed at the prompt ends the session, not the server.
            self.handler.leave()


class _Exit:
    """``exit`` and ``quit`` in the manhole: leave the session (the server runs on)."""

    def __init__(self, leave):
        self._leave = leave

    def __repr__(self):
        return "Use exit() or Ctrl-D to leave the manhole; the server keeps running."

    def __call__(self, code=None):
        self._leave()


class _Help:
    """``help`` in the manhole: plain text, never a pager or an interactive loop in the server."""

    def __init__(self, operator):
        self._operator = operator

    def __repr__(self):
        return "Type help(grid) for the operator's guide, or help(object) for help about object."

    def __call__(self, request=None):
        target = self._operator if request is None else request
        print(pydoc.render_doc(target, "Help on %s:", renderer=pydoc.plaintext))


def _no_input(*args, **kwargs):
    raise RuntimeError("the manhole cannot read input(): it would stop the whole server while it waits")


class OperatorManhole(manhole.Manhole):
    """The manhole prompt of one SSH session.

    A Deferred (or coroutine) shown at the prompt is waited for: its result
    (or a short error, or a traceback for a bug) is printed when it fires,
    then the prompt comes back. A failure shown is handled there: it is not
    passed on down the Deferred's chain, nor logged as unhandled. Keys typed meanwhile are kept for then.
    Ctrl-C stops waiting; the result is printed above the prompt when it
    arrives. When the connection closes, whatever is still running finishes
    in the server without a terminal, waits are cancelled, the namespace is
    dropped, and the session is logged out.
    """

    def __init__(self, namespace: dict, login: Login, operator: Operator, sessions: set):
        super().__init__(namespace)
        self.login = login
        self.operator = operator
        self.sessions = sessions
        self._numbers = itertools.count(1)
        self._calls: set[_Call] = set()
        self._waiting: _Call | None = None
        self._typeahead: list[tuple] = []
        self._in_line = False
        self._closed = False

    def connectionMade(self):
        super().connectionMade()
        self.interpreter = _Interpreter(self, self.namespace)
        self.namespace.update(exit=_Exit(self.leave), quit=_Exit(self.leave))
        self.sessions.add(self)
        log.info(
            "manhole: session of {user} [{fingerprint}] from {address} opened",
            user=self.login.user,
            fingerprint=self.login.fingerprint,
            address=self.login.address,
        )

    def initializeScreen(self):
        # Unlike Twisted's, no terminal reset: the operator's scrollback stays.
        self.terminal.write(
            f"gridd manhole: {self.login.user} [{self.login.fingerprint}] inside the live server.\n"
            "grid.overview(), grid.workers(), grid.job(ID); help(grid) explains all. Ctrl-D leaves.\n"
        )
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def terminalSize(self, width, height):
        # Twisted's clears the screen (and our banner) on every size change.
        self.width, self.height = width, height

    def leave(self):
        """End the session: the server runs on; the terminal is left as it was found."""
        if not self._closed:
            self.terminal.resetModes([insults.modes.IRM])
            self.terminal.nextLine()
            self.terminal.transport.loseConnection()

    def handle_QUIT(self):
        self.leave()

    # -- input -----------------------------------------------------------

    def keystrokeReceived(self, keyID, modifier):
        if self._waiting is not None and keyID not in (manhole.CTRL_C, manhole.CTRL_D, manhole.CTRL_BACKSLASH):
            self._typeahead.append((keyID, modifier))
            return
        super().keystrokeReceived(keyID, modifier)

    def lineReceived(self, line):
        if line.strip():
            log.info(
                "manhole: {user} [{fingerprint}] from {address} typed: {source}",
                user=self.login.user,
                fingerprint=self.login.fingerprint,
                address=self.login.address,
                source=line.decode("utf-8", "replace"),
            )
        self._in_line = True
        try:
            more = self.interpreter.push(line)
        finally:
            self._in_line = False
        self.pn = bool(more)
        if self._waiting is None and not self._closed:
            self._prompt()

    def handle_INT(self):
        if self._waiting is None:
            return super().handle_INT()
        call, self._waiting = self._waiting, None
        self.terminal.nextLine()
        self.terminal.write(f"(not waiting: [{call.number}] goes on; its result is shown when it arrives)")
        self._prompt()
        self._replay_typeahead()

    def _prompt(self):
        if self._needsNewline():
            self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])

    def _replay_typeahead(self):
        keys_, self._typeahead = self._typeahead, []
        for keyID, modifier in keys_:
            self.keystrokeReceived(keyID, modifier)

    # -- results ----------------------------------------------------------

    def show_when_fired(self, d: defer.Deferred):
        """Print what ``d`` fires with; until then, the prompt waits."""
        call = _Call(next(self._numbers), d)
        self._calls.add(call)
        d.addBoth(self._fired, call)
        if not call.done:
            self._waiting = call

    def _fired(self, result, call: _Call):
        call.done = True
        self._calls.discard(call)
        failed = isinstance(result, Failure)
        if self._closed:
            if failed and not result.check(defer.CancelledError):
                log.info(
                    "manhole: a call of {user}'s failed after the session closed: {why}",
                    user=self.login.user,
                    why=result.getErrorMessage(),
                )
            return None if failed else result
        if failed:
            text = _describe_failure(result)
        else:
            self.namespace["_"] = result
            try:
                text = None if result is None else repr(result)
            except Exception:
                text = Failure().getTraceback().rstrip()
        try:
            self._show(call, text)
        except Exception:
            log.failure("manhole: could not show a result to {user}", user=self.login.user)
        # A failure shown is handled: do not let it be logged as unhandled too.
        return None if failed else result

    def _show(self, call: _Call, text: str | None):
        if call is self._waiting:  # the prompt waited for this one
            self._waiting = None
            if text is not None:
                self.terminal.write(text)
            self._prompt()
            self._replay_typeahead()
        elif self._in_line:  # it fired at once, while its line ran
            if text is not None:
                self.terminal.write(text)
        else:  # one the operator stopped waiting for: above the prompt
            self.addOutput(f"[{call.number}] {text}", isAsync=True)

    def connectionLost(self, reason):
        if self._closed:
            return
        self._closed = True
        self.sessions.discard(self)
        left = sum(1 for c in self._calls if not c.done)
        self.operator.close()
        self._waiting = None
        self._typeahead = []
        self.namespace.clear()
        log.info(
            "manhole: session of {user} [{fingerprint}] from {address} closed ({n} calls still running)",
            user=self.login.user,
            fingerprint=self.login.fingerprint,
            address=self.login.address,
            n=left,
        )


def _describe_failure(failure: Failure) -> str:
    if failure.check(errors.GriddError):
        return f"error: {failure.value.code}: {failure.value.message}"
    if failure.check(defer.CancelledError):
        return "cancelled"
    return failure.getTraceback().rstrip()


# ----------------------------------------------------------------------
# assembling it


def make_factory(host_key: keys.Key, keydb, make_namespace) -> manhole_ssh.ConchFactory:
    """An SSH server factory: public keys from ``keydb`` only, a manhole per session.

    ``make_namespace(login)`` returns ``(namespace, operator)`` for a new
    session. The factory's ``sessions`` is the set of open sessions.
    """
    sessions: set[OperatorManhole] = set()
    factory = manhole_ssh.ConchFactory(portal.Portal(_Realm(make_namespace, sessions), [SSHPublicKeyChecker(keydb)]))
    # New dicts: ConchFactory's class attributes are shared by every instance.
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}
    factory.services = {**factory.services, b"ssh-userauth": _UserAuth}
    factory.protocol = _Transport
    factory.sessions = sessions
    return factory


class ManholeService(service.Service):
    """The manhole listener: it listens once the gridd server does, and closes first."""

    name = "manhole"

    def __init__(self, reactor, spec: str, factory, server):
        self.reactor = reactor
        self.spec = spec
        self.factory = factory
        self.server = server
        self.listener = StreamServerEndpointService(serverFromString(reactor, spec), factory)
        self.listener._raiseSynchronously = True

    def startService(self):
        super().startService()
        self.server.started.addCallback(self._server_listening)

    def _server_listening(self, ports):
        # The server's own listeners run only once it really serves (not after a failed start).
        if self.running and self.server.listeners.running:
            try:
                self.listener.startService()
            except Exception:
                log.failure("manhole: cannot listen on {spec}; stopping", spec=self.spec)
                if self.reactor.running:
                    self.reactor.stop()
            else:
                self.listener._waitingForPort.addCallback(self._listening)
        return ports

    def _listening(self, port):
        addr = port.getHost()
        log.info(
            "manhole listening on {spec} ({host}:{port_number}), keys from {keys}",
            spec=self.spec,
            host=addr.host,
            port_number=addr.port,
            keys=str(getattr(self.factory, "keys_path", "?")),
        )
        return port

    def stopService(self):
        super().stopService()
        for session in list(self.factory.sessions):
            session.leave()
        if self.listener.running:
            return self.listener.stopService()
        return defer.succeed(None)


def make_manhole_service(
    reactor, spec: str, *, server, authorized_keys: str | os.PathLike, host_key: str | os.PathLike
) -> ManholeService:
    """The manhole for the gridd ``server`` (a ``GriddService``): built, not listening.

    Makes the host key on first use, and warns loudly when ``spec`` listens
    beyond loopback or no key may log in yet.
    """
    if not is_loopback_listen(spec):
        log.warn(
            "WARNING: the manhole {spec} listens beyond loopback: it is a Python prompt inside the server, "
            "guarded only by the keys in {keys}. Listen on 127.0.0.1 and use an SSH tunnel instead.",
            spec=spec,
            keys=str(authorized_keys),
        )
    key = load_or_create_host_key(host_key)
    keydb = AuthorizedKeysFile(authorized_keys)
    if not keydb.keys():
        log.warn(
            "manhole: no usable keys in {keys} yet: nobody can log in until an OpenSSH public key "
            "(e.g. ~/.ssh/id_ed25519.pub) is added there; no restart needed",
            keys=str(authorized_keys),
        )

    def make_namespace(login: Login):
        factory_sessions = factory.sessions
        operator = Operator(
            server.dispatcher,
            server.store,
            clock=reactor,
            who=login,
            sessions=lambda: sorted((s.login for s in factory_sessions), key=lambda s: s.since),
        )
        namespace = {
            "grid": operator,
            "dispatcher": server.dispatcher,
            "store": server.store,
            "server": server,
            "reactor": reactor,
            "help": _Help(operator),
            "input": _no_input,
            "__name__": "__manhole__",
        }
        return namespace, operator

    factory = make_factory(key, keydb, make_namespace)
    factory.keys_path = authorized_keys
    return ManholeService(reactor, spec, factory, server)
