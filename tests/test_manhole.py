"""The operators' SSH manhole.

Unit tests build the pieces without sockets: host key and authorized keys
files, options and the service tree on a MemoryReactorClock, and the manhole
prompt on a StringTransport terminal. The end-to-end tests run a real
``twistd gridd --manhole`` with real workers and drive the real OpenSSH client
through a PTY with pexpect (in a thread, so the reactor keeps reading the
processes' logs); they wait on the prompt or on log lines, never on time.
"""

from __future__ import annotations

import ast
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from gridd import errors
from gridd.server import tap
from gridd.server.manhole import (
    AUTHORIZED_KEYS_NAME,
    HOST_KEY_NAME,
    AuthorizedKeysFile,
    Login,
    ManholeService,
    OperatorManhole,
    _Help,
    fingerprint,
    load_or_create_host_key,
)
from tests.test_operator import Console

SSH = shutil.which("ssh")
SSH_KEYGEN = shutil.which("ssh-keygen")


def new_public_key(comment: str = "") -> bytes:
    """An OpenSSH public key line for a fresh ed25519 key."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
    return key.toString("openssh") + (b" " + comment.encode() if comment else b"")


# -- host key and authorized keys ---------------------------------------------------


def test_host_key_made_on_first_start_with_mode_0600_and_reused(tmp_path):
    """The first start makes an ed25519 host key only its owner may read; later starts load the same key."""
    path = tmp_path / "data" / HOST_KEY_NAME
    key = load_or_create_host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.type() == "Ed25519" and not key.isPublic()
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert load_or_create_host_key(path) == key


def test_host_key_readable_by_others_is_refused(tmp_path):
    """A host key file others may read is refused, as sshd refuses one, with the fix in the message."""
    path = tmp_path / HOST_KEY_NAME
    load_or_create_host_key(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_or_create_host_key(path)


def test_fingerprint_is_the_one_openssh_prints(tmp_path):
    """A key's fingerprint in the logs is the SHA256 one that ssh-keygen -l shows for it."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    shown = subprocess.run([SSH_KEYGEN, "-l", "-f", str(tmp_path / "k.pub")], capture_output=True, text=True)
    blob = keys.Key.fromFile(str(tmp_path / "k.pub")).blob()
    assert fingerprint(blob) == shown.stdout.split()[1]


def test_authorized_keys_read_again_when_changed_and_option_lines_skipped(tmp_path):
    """Keys are read from the file as it is now; lines with options are skipped with a warning, comments ignored."""
    path = tmp_path / AUTHORIZED_KEYS_NAME
    db = AuthorizedKeysFile(path)
    assert db.keys() == []
    alice, bob = new_public_key("alice@desk"), new_public_key()
    path.write_bytes(b"# operators\n\n" + alice + b"\n" + b'from="10.0.0.1" ' + bob + b"\n")
    with capturedLogs() as events:
        assert [k.toString("openssh") for k in db.getAuthorizedKeys(b"anyone")] == [alice.rsplit(b" ", 1)[0]]
    [warning] = [formatEvent(e) for e in events if e.get("log_namespace") == "gridd.server.manhole"]
    assert "line 4 has options" in warning
    path.write_bytes(alice + b"\n" + bob + b"\n")
    assert len(db.keys()) == 2
    path.unlink()
    assert db.keys() == []


# -- options and the service tree ---------------------------------------------------


def parse(tmp_path, *args) -> tap.Options:
    options = tap.Options()
    options.parseOptions(["--data", str(tmp_path / "data"), "--db", "memory:", *args])
    return options


def test_manhole_is_off_by_default(tmp_path):
    """Without --manhole there is no manhole service and no host key."""
    options = parse(tmp_path)
    assert options["manhole"] is None
    assert options["manhole-keys"] == str(tmp_path / "data" / AUTHORIZED_KEYS_NAME)
    top = tap.makeService(options, reactor=MemoryReactorClock())
    assert [s.name for s in top] == ["gridd"]
    assert not (tmp_path / "data" / HOST_KEY_NAME).exists()


@pytest.mark.parametrize(
    ("given", "spec"),
    [
        ("7722", "tcp:7722:interface=127.0.0.1"),
        ("tcp:7722:interface=127.0.0.1", "tcp:7722:interface=127.0.0.1"),
        ("tcp6:7722:interface=\\:\\:1", "tcp6:7722:interface=\\:\\:1"),
    ],
)
def test_manhole_option_bare_port_means_loopback(tmp_path, given, spec):
    """--manhole takes an endpoint string; a bare port number listens on 127.0.0.1 only."""
    assert parse(tmp_path, "--manhole", given)["manhole"] == spec


def test_manhole_tree_listens_after_the_server_and_stops_first(tmp_path):
    """The manhole is built but not listening; started, it listens once gridd listens, and it stops first."""
    keys_file = tmp_path / "ops.keys"
    keys_file.write_bytes(new_public_key() + b"\n")
    reactor = MemoryReactorClock()
    top = tap.makeService(
        parse(
            tmp_path, "--listen", "tcp:7700:interface=127.0.0.1", "--manhole", "7722", "--manhole-keys", str(keys_file)
        ),
        reactor=reactor,
    )
    manhole = top.getServiceNamed("manhole")
    assert isinstance(manhole, ManholeService) and [s.name for s in top] == ["gridd", "manhole"]
    assert manhole.spec == "tcp:7722:interface=127.0.0.1" and manhole.factory.keys_path == str(keys_file)
    assert stat.S_IMODE((tmp_path / "data" / HOST_KEY_NAME).stat().st_mode) == 0o600
    assert reactor.tcpServers == []
    # New dicts per factory: ConchFactory's class attributes are shared.
    assert manhole.factory.publicKeys is not type(manhole.factory).publicKeys
    assert list(manhole.factory.privateKeys) == [b"ssh-ed25519"]

    top.startService()
    assert [(port, iface) for port, _, _, iface in reactor.tcpServers] == [(7700, "127.0.0.1"), (7722, "127.0.0.1")]
    assert reactor.tcpServers[1][1] is manhole.factory
    d = top.stopService()
    assert d.called and not manhole.listener.running


@pytest.mark.expected_log_errors
def test_manhole_never_listens_when_the_server_fails_to_start(tmp_path, monkeypatch):
    """If the store cannot open, gridd does not listen, and neither does its manhole."""
    from gridd.store.memory import MemoryStore

    class BrokenStore(MemoryStore):
        def start(self):
            return defer.fail(errors.Unavailable("disk full"))

    monkeypatch.setattr(tap, "open_store", lambda uri, reactor=None, server_id=None: BrokenStore())
    reactor = MemoryReactorClock()
    keys_file = tmp_path / "ops.keys"
    keys_file.write_bytes(new_public_key() + b"\n")
    top = tap.makeService(parse(tmp_path, "--manhole", "7722", "--manhole-keys", str(keys_file)), reactor=reactor)
    top.startService()
    assert reactor.tcpServers == []
    assert not top.getServiceNamed("manhole").listener.running


def test_manhole_beyond_loopback_warns_loudly(tmp_path):
    """A manhole asked to listen beyond loopback logs a loud warning; on loopback it does not."""
    with capturedLogs() as events:
        tap.makeService(parse(tmp_path, "--manhole", "tcp:7722:interface=0.0.0.0"), reactor=MemoryReactorClock())
        tap.makeService(parse(tmp_path, "--manhole", "7723"), reactor=MemoryReactorClock())
    warnings = [formatEvent(e) for e in events if e.get("log_level") and e["log_level"].name == "warn"]
    beyond = [w for w in warnings if "beyond loopback" in w]
    assert len(beyond) == 1 and beyond[0].startswith("WARNING: the manhole tcp:7722:interface=0.0.0.0")
    assert sum("no usable keys" in w for w in warnings) == 2


# -- the prompt, on a StringTransport terminal --------------------------------------

ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")


class Terminal:
    """An OperatorManhole behind insults' terminal protocol, with keys in and text out."""

    def __init__(self, **namespace):
        self.console = Console()
        self.grid = self.console.grid
        self.sessions = set()
        namespace = {"grid": self.grid, "dispatcher": self.console.dispatcher, "help": _Help(self.grid), **namespace}
        self.login = Login("alice", "SHA256:abc", "127.0.0.1:5000", 0.0)
        self.protocol = insults.ServerProtocol(OperatorManhole, namespace, self.login, self.grid, self.sessions)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.manhole = self.protocol.terminalProtocol
        self.namespace = self.manhole.namespace
        self.read()

    def type(self, text: str) -> str:
        """Type ``text`` and return what the terminal shows in answer."""
        self.protocol.dataReceived(text.encode())
        return self.read()

    def read(self) -> str:
        out = ANSI.sub("", self.transport.value().decode()).replace("\r\n", "\n")
        self.transport.clear()
        return out


def test_prompt_waits_for_a_deferred_and_shows_what_it_fires_with():
    """A Deferred typed at the prompt holds the prompt until it fires; then its result is shown and is ``_``."""
    d = defer.Deferred()
    t = Terminal(d=d)
    assert t.type("d\r") == "d\n"
    d.callback({"jobs": 3})
    assert t.read() == "{'jobs': 3}\n>>> "
    assert t.namespace["_"] == {"jobs": 3}
    assert t.type("1+1\r") == "1+1\n2\n>>> "


def test_keys_typed_while_waiting_are_kept_for_the_prompt():
    """Keys typed while a call runs are not lost: they run, in order, once the prompt is back."""
    d = defer.Deferred()
    t = Terminal(d=d)
    t.type("d\r")
    assert t.type("6*7\r") == ""
    d.callback("first")
    assert t.read() == "'first'\n>>> 6*7\n42\n>>> "


def test_ctrl_c_stops_waiting_and_the_result_is_shown_when_it_arrives():
    """Ctrl-C gives the prompt back at once; the call goes on and its result appears above the prompt."""
    d = defer.Deferred()
    t = Terminal(d=d)
    t.type("d\r")
    assert "(not waiting: [1] goes on" in t.type("\x03")
    assert t.type("2+2\r") == "2+2\n4\n>>> "
    d.callback("late")
    assert t.read() == "[1] 'late'\n>>> "


def test_coroutines_and_already_fired_deferreds_show_their_results():
    """A coroutine (the dispatcher's async methods) is run and its result shown, like a Deferred that already fired."""

    async def answer():
        return 42

    t = Terminal(answer=answer, done=defer.succeed("ready"))
    assert t.type("answer()\r") == "answer()\n42\n>>> "
    assert t.type("done\r") == "done\n'ready'\n>>> "
    assert t.type("grid.stop_dispatching()\r").splitlines()[1] == "dispatching is OFF"


def test_failures_shown_short_for_refusals_and_as_tracebacks_for_bugs():
    """A refused action shows its error code and message; any other exception a traceback; neither is logged."""
    refused, broken = defer.Deferred(), defer.Deferred()
    t = Terminal(refused=refused, broken=broken)
    t.type("refused\r")
    refused.errback(errors.UnknownJob("no job 9"))
    assert t.read() == "error: unknown_job: no job 9\n>>> "
    t.type("broken\r")
    broken.errback(Failure(KeyError("slots")))
    shown = t.read()
    assert "Traceback" in shown and "KeyError: 'slots'" in shown and shown.endswith(">>> ")
    assert t.type("grid.pause(99)\r").splitlines()[1] == "error: unknown_job: no job 99"


def test_result_whose_repr_fails_shows_a_traceback():
    """A result that cannot be shown gives a traceback in the session, nothing in the server's log."""

    class Broken:
        def __repr__(self):
            raise RuntimeError("no repr for you")

    later = defer.Deferred()
    t = Terminal(later=later, now=Broken())
    assert "RuntimeError: no repr for you" in t.type("now\r")
    t.type("later\r")
    later.callback(Broken())
    shown = t.read()
    assert "RuntimeError: no repr for you" in shown and shown.endswith(">>> ")


def test_exception_typed_shows_a_traceback_and_the_session_goes_on():
    """An exception, a syntax error or a blocking input() show an error in the session; the next line works."""
    t = Terminal()
    shown = t.type("1/0\r")
    assert "Traceback (most recent call last)" in shown and "ZeroDivisionError: division by zero" in shown
    assert "SyntaxError" in t.type("def (\r")
    assert "NameError" in t.type("no_such_name\r")
    assert t.type("1+1\r") == "1+1\n2\n>>> "


def test_exit_ends_the_session_and_not_the_server():
    """exit(), quit() and SystemExit close this session's terminal only."""
    for line in ("exit()", "quit()", "raise SystemExit(3)"):
        t = Terminal()
        t.type(line + "\r")
        assert t.transport.disconnecting, line


def test_help_is_plain_text_in_the_session():
    """help(grid) and help() print the operator's guide in the session, never through a pager."""
    t = Terminal()
    shown = t.type("help(grid)\r")
    assert "grid.overview()" in shown and "grid.stop_dispatching()" in shown and "grid.drain(" in shown
    assert "grid.overview()" in t.type("help()\r")


def test_connection_closed_mid_call_leaves_nothing_behind():
    """A session closed while a wait runs: the wait is cancelled, the watch, session and namespace are gone."""
    late = defer.Deferred()
    t = Terminal(late=late)
    [job_id] = t.console.submit({})
    t.type(f"grid.wait({job_id})\r")
    assert t.sessions == {t.manhole} and len(t.console.dispatcher.watchers) == 1
    with capturedLogs() as events:
        t.protocol.connectionLost(Failure(ConnectionError("gone")))
    t.console.clock.advance(0)
    assert t.sessions == set()
    assert len(t.console.dispatcher.watchers) == 0
    assert t.grid._waits == set()
    assert t.namespace == {}
    closed = [formatEvent(e) for e in events if "closed" in e.get("log_format", "")]
    assert closed == ["manhole: session of alice [SHA256:abc] from 127.0.0.1:5000 closed (1 calls still running)"]
    # A call that was left running ends later without a terminal, and quietly.
    t.manhole.show_when_fired(late)
    late.errback(Failure(errors.Unavailable("store gone")))
    assert t.read() == ""


# -- end to end: a real twistd gridd, real workers, real OpenSSH --------------------

PROMPT = ">>> "
WAIT = 30


class SSHConsole:
    """One real OpenSSH client logged in to the manhole, through a PTY (pexpect), each wait in a thread."""

    def __init__(self, port: int, key: Path, user: str = "operator"):
        self.port, self.key, self.user = port, key, user
        self.child = None

    def argv(self, *options: str) -> list[str]:
        return [
            "-p",
            str(self.port),
            "-i",
            str(self.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            *options,
            f"{self.user}@127.0.0.1",
        ]

    async def open(self) -> str:
        import pexpect

        def start():
            self.child = pexpect.spawn(
                SSH,
                self.argv("-o", "PasswordAuthentication=no"),
                encoding="utf-8",
                timeout=WAIT,
                dimensions=(50, 200),
            )
            self.child.expect_exact(PROMPT)
            return self.child.before

        return _clean(await deferToThread(start))

    async def run(self, line: str) -> str:
        """Type ``line``; return what the manhole answered before its next prompt."""

        def blocking():
            self.child.sendline(line)
            self.child.expect_exact(PROMPT)
            return self.child.before

        echoed_and_output = _clean(await deferToThread(blocking))
        return echoed_and_output.split("\n", 1)[1] if "\n" in echoed_and_output else ""

    def send(self, line: str):
        """Type ``line`` without waiting for an answer."""
        self.child.sendline(line)

    async def close(self):
        def blocking():
            import pexpect

            if self.child.isalive():
                self.child.sendcontrol("d")
                self.child.expect(pexpect.EOF)
            self.child.close()
            return self.child.exitstatus

        return await deferToThread(blocking)


def _clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "")


def ssh_keygen(path: Path) -> str:
    """Make an ed25519 key pair at ``path``; return its public key's fingerprint."""
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    shown = subprocess.run([SSH_KEYGEN, "-l", "-f", f"{path}.pub"], capture_output=True, text=True, check=True)
    return shown.stdout.split()[1]


@pytest_twisted.async_yield_fixture(scope="module")
async def manhole_grid(tmp_path_factory):
    """One real server with a manhole and two workers (w1, w2; 2 slots), shared by the end-to-end tests here."""
    from twisted.internet import reactor

    from gridd.launch import LocalGrid, free_port

    assert SSH and SSH_KEYGEN, "the manhole tests need the OpenSSH client; ./dev installs it"
    tmp = tmp_path_factory.mktemp("manhole")
    key, stranger = tmp / "operator_key", tmp / "stranger_key"
    fingerprints = {"operator": ssh_keygen(key), "stranger": ssh_keygen(stranger)}
    authorized = tmp / "authorized_keys"
    authorized.write_text(Path(f"{key}.pub").read_text())
    grid = LocalGrid(reactor, tmp)
    port = free_port()
    try:
        await grid.start_server("--manhole", f"tcp:{port}:interface=127.0.0.1", "--manhole-keys", str(authorized))
        await grid.server.wait_for(r"manhole listening on")
        for name in ("w1", "w2"):
            await grid.start_worker(name, 2)
        grid.manhole = {"port": port, "key": key, "stranger": stranger, "fingerprints": fingerprints}
        yield grid
    finally:
        await grid.stop_all()


@pytest_twisted.async_yield_fixture
async def client(manhole_grid):
    """A client of the shared server for one test (its heartbeats must not outlive the test)."""
    from twisted.internet import reactor

    from gridd.client import connect

    client = await connect(reactor, manhole_grid.endpoint, manhole_grid.secret, name="manhole-tests")
    try:
        yield client
    finally:
        await client.close()


async def console(grid) -> SSHConsole:
    c = SSHConsole(grid.manhole["port"], grid.manhole["key"])
    await c.open()
    return c


def sleep_jobs(n: int, seconds: float = 0.01, records: int = 3, **extra) -> list[dict]:
    return [
        {"type": "sleep", "records": list(range(records)), "params": {"seconds": seconds}, **extra} for _ in range(n)
    ]


def assert_no_server_errors(grid):
    bad = [line for line in grid.server.lines if re.search(r"#(error|critical)\]|Unhandled|Traceback", line)]
    assert bad == []


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_known_key_logs_in_evaluates_and_is_logged(manhole_grid):
    """A listed key logs in and evaluates; the login is logged with user, key fingerprint and address."""
    grid = manhole_grid
    since = len(grid.server.lines)
    c = SSHConsole(grid.manhole["port"], grid.manhole["key"])
    banner = await c.open()
    assert "gridd manhole: operator" in banner
    assert await c.run("1+1") == "2\n"
    workers = await c.run("grid.workers()")
    assert [line.split()[0] for line in workers.splitlines()[1:]] == ["w1", "w2"]
    assert "grid.overview()" in await c.run("help(grid)")
    assert await c.run("sorted(k for k in globals() if not k.startswith('_'))") == (
        "['dispatcher', 'exit', 'grid', 'help', 'input', 'quit', 'reactor', 'server', 'store']\n"
    )
    assert await c.close() == 0
    fp = grid.manhole["fingerprints"]["operator"]
    login = await grid.server.wait_for(
        rf"manhole: operator logged in with key {re.escape(fp)} from 127\.0\.0\.1:\d+", since
    )
    assert "#info" in login
    await grid.server.wait_for(r"manhole: operator .* typed: 1\+1", since)
    await grid.server.wait_for(r"manhole: session of operator .* closed", since)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_exception_shows_traceback_and_harms_nothing(manhole_grid, client):
    """An exception typed in the manhole shows a traceback there; the session and the server go on."""
    grid = manhole_grid
    c = await console(grid)
    shown = await c.run("1/0")
    assert "Traceback (most recent call last)" in shown and "ZeroDivisionError: division by zero" in shown
    assert "NameError" in await c.run("no_such_thing.pause(1)")
    assert await c.run("grid.pause(10**9)") == f"error: unknown_job: no job {10**9}\n"
    assert await c.run("6*7") == "42\n"
    await c.close()
    stats = await client.stats()
    assert stats["workers"] == 2
    assert_no_server_errors(grid)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_unknown_key_is_refused(manhole_grid):
    """A key not in the authorized keys file is refused, and the refusal is logged with its fingerprint."""
    grid = manhole_grid
    since = len(grid.server.lines)
    stranger = SSHConsole(grid.manhole["port"], grid.manhole["stranger"])
    argv = [SSH, "-o", "BatchMode=yes", *stranger.argv(), "true"]
    result = await deferToThread(subprocess.run, argv, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr
    fp = re.escape(grid.manhole["fingerprints"]["stranger"])
    await grid.server.wait_for(
        rf"manhole: refused publickey login as operator from 127\.0\.0\.1:\d+ with key {fp}", since
    )
    assert not grid.server.matching(rf"logged in with key {fp}")


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_password_login_is_refused(manhole_grid):
    """No password (or keyboard-interactive) login is offered: the client never gets a password prompt."""
    grid = manhole_grid
    nobody = SSHConsole(grid.manhole["port"], grid.manhole["stranger"])
    options = ("-o", "PreferredAuthentications=password,keyboard-interactive", "-o", "PubkeyAuthentication=no")

    def attempt():
        import pexpect

        child = pexpect.spawn(SSH, nobody.argv(*options), encoding="utf-8", timeout=WAIT)
        index = child.expect([r"(?i)password:", r"Permission denied \((.*)\)", pexpect.EOF])
        offered = child.match.group(1) if index == 1 else None
        child.expect(pexpect.EOF)
        child.close()
        return index, offered, child.exitstatus

    index, offered, status = await deferToThread(attempt)
    assert (index, offered, status) == (1, "publickey", 255)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_refuses_commands_and_sessions_without_a_terminal(manhole_grid):
    """``ssh host CMD`` and ``ssh -T`` get a one-line explanation and exit status 1, and log no error."""
    grid = manhole_grid
    c = SSHConsole(grid.manhole["port"], grid.manhole["key"])
    for extra, args, expected in (
        ((), ("grid.overview()",), "runs no commands"),
        (("-T",), (), "needs a terminal"),
    ):
        argv = [SSH, *extra, "-o", "BatchMode=yes", *c.argv(), *args]
        result = await deferToThread(
            subprocess.run, argv, capture_output=True, text=True, timeout=WAIT, stdin=subprocess.DEVNULL
        )
        assert (result.returncode, expected in result.stdout) == (1, True), result
    assert_no_server_errors(grid)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_paused_job_is_not_dispatched_while_others_run(manhole_grid, client):
    """A job paused in the manhole stays queued-and-paused while every other job runs; resumed, it runs."""
    grid = manhole_grid
    c = await console(grid)
    try:
        assert await c.run("grid.stop_dispatching()") == "dispatching is OFF\n"
        ids = await client.submit(sleep_jobs(6))
        paused = ids[2]
        assert await c.run(f"grid.pause({paused})") == f"job {paused} is paused\n"
        assert await c.run("grid.start_dispatching()") == "dispatching is on\n"
        others = [i for i in ids if i != paused]
        final = await client.wait(others)
        assert {s["state"] for s in final.values()} == {"done"}
        view = await client.show(paused)
        assert view["state"] == "paused"
        assert [h["event"] for h in view["history"]] == ["submitted", "state"]
        shown = await c.run(f"grid.job({paused})")
        assert shown.splitlines()[0].split()[5] == "paused"
        assert "queued -> paused (paused)" in shown
        assert await c.run(f"grid.resume({paused})") == f"job {paused} is queued\n"
        assert (await client.wait([paused]))[paused]["state"] == "done"
    finally:
        await c.run("grid.start_dispatching()")
        await c.close()
    fp = re.escape(grid.manhole["fingerprints"]["operator"])
    await grid.server.wait_for(
        rf"manhole: operator \[{fp}\] from 127\.0\.0\.1:\d+: pause job {paused}: job {paused} is paused"
    )


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_drained_worker_gets_no_new_job(manhole_grid, client):
    """A worker drained in the manhole is shown drained and is handed no new job; undrained, it works again."""
    grid = manhole_grid
    c = await console(grid)
    try:
        assert await c.run('grid.drain("w1")') == "worker w1 drained\n"
        assert {w["name"]: w["drained"] for w in await client.workers()} == {"w1": True, "w2": False}
        assert "w1 (drained)" in await c.run("grid.workers()")
        ids = await client.submit(sleep_jobs(8))
        await client.wait(ids)
        for job in ids:
            leased = [h["worker"] for h in (await client.show(job))["history"] if h["event"] == "leased"]
            assert leased == ["w2"], (job, leased)
        assert await c.run('grid.undrain("w1")') == "worker w1 undrained\n"
        ids = await client.submit(sleep_jobs(8, seconds=0.05))
        await client.wait(ids)
        workers = set()
        for job in ids:
            workers.update(h["worker"] for h in (await client.show(job))["history"] if h["event"] == "leased")
        assert "w1" in workers
    finally:
        await c.run('grid.undrain("w1")')
        await c.close()


#: The job states, as the schema's CHECK constraint lists them.
STATES = ("queued", "running", "paused", "done", "failed", "cancelled", "poison")


def parse_overview(shown: str) -> dict:
    """The figures printed by ``grid.overview()``: dispatching, jobs by state, workers, queue depth, rates."""
    lines = shown.splitlines()

    def line(label: str) -> str:
        [found] = [text for text in lines if text.split(" ", 1)[0] == label]
        return found[len(label) :].strip()

    def number(text: str) -> int | float:
        text = text.replace(",", "")
        return float(text) if "." in text else int(text)

    def table(title: str) -> tuple[list[str], list[list[str]]]:
        at = lines.index(title)
        rows = []
        for text in lines[at + 2 :]:
            if not text.strip():
                break
            rows.append(text.split())
        return lines[at + 1].split(), rows

    jobs = re.findall(r"([a-z]+) ([\d,]+)", line("jobs"))
    assert "  ".join(f"{state} {n}" for state, n in jobs) == line("jobs"), line("jobs")
    workers = re.fullmatch(r"([\d,]+) connected +([\d,]+) slots +([\d,]+) busy +([\d,]+) drained", line("workers"))
    assert workers, line("workers")
    queue = []
    if "queued by type and priority: none" not in lines:
        header, rows = table("queued by type and priority")
        assert header == ["type", "priority", "queued"]
        queue = [(t, int(p), number(n)) for t, p, n in rows]
    header, rows = table("per minute, over the last")
    assert header[1::2] == ["min"] * len(header[::2]), header
    windows = [int(m) for m in header[::2]]
    return {
        "dispatching": line("dispatching").split()[0],
        "jobs": {state: number(n) for state, n in jobs},
        "workers": dict(zip(("connected", "slots", "busy", "drained"), map(number, workers.groups()), strict=True)),
        "queue": queue,
        "per_minute": {kind: dict(zip(windows, map(number, values), strict=True)) for kind, *values in rows},
    }


def read_store(db: Path) -> dict:
    """The figures an overview should show, read with SQL from the server's SQLite file (read only, beside the
    running server: WAL lets a reader in while it writes)."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)) as conn:
        by_state = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        queue = conn.execute(
            "SELECT type, priority, COUNT(*) FROM jobs WHERE state = 'queued' GROUP BY type, priority"
        ).fetchall()
        ended = dict(
            conn.execute(
                "SELECT json_extract(detail, '$.to'), COUNT(*) FROM job_events"
                " WHERE event IN ('released', 'state') AND json_extract(detail, '$.to') IN ('failed', 'cancelled')"
                " GROUP BY 1"
            ).fetchall()
        )
        [(submitted, done, first)] = conn.execute(
            "SELECT SUM(event = 'submitted'), SUM(event = 'completed'), MIN(at) FROM job_events"
        ).fetchall()
        [(records,)] = conn.execute("SELECT COUNT(*) FROM records WHERE accepted_at IS NOT NULL").fetchall()
    return {
        "jobs": {state: by_state.pop(state, 0) for state in STATES} | by_state,
        "queue": {(t, p): n for t, p, n in queue},
        # Every event of this server so far: the 15-minute window's counts, if it began less than 15 minutes ago.
        "events": {
            "submitted": submitted,
            "records": records,
            "done": done,
            "failed": ended.get("failed", 0),
            "cancelled": ended.get("cancelled", 0),
        },
        "first_event": first,
    }


async def all_running(client, job_ids: list[int]):
    """Fire once the server has said (WATCH reply or EVENT) that each of these jobs runs."""
    from twisted.internet import reactor

    waiting = set(job_ids)
    running = defer.Deferred()

    def seen(status):
        if running.called:
            return
        if status["state"] not in ("queued", "running"):
            running.errback(AssertionError(f"job {status['job']} is {status['state']}: it will not run"))
            return
        if status["state"] == "running":
            waiting.discard(status["job"])
        if not waiting:
            running.callback(None)

    try:
        for status in await client.watch(job_ids, seen):
            seen(status)
        await running.addTimeout(WAIT, reactor)
    finally:
        client.unwatch(seen)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_overview_figures_match_the_store(manhole_grid, client):
    """The overview's jobs by state, queue by type and priority, workers and recent counts are those read
    with SQL from the database file and those of the workers this test runs."""
    grid = manhole_grid
    c = await console(grid)
    ending: list[int] = []  # this test's jobs that have not ended, cancelled when it is over
    try:
        # Jobs that end: one fails (no retry), one is done.
        [failed] = await client.submit([{"type": "fail", "records": [0], "retries": 0}])
        [done] = await client.submit([{"type": "noop", "records": [0, 1]}])
        ended = await client.wait([failed, done])
        assert (ended[failed]["state"], ended[done]["state"]) == ("failed", "done")
        # Three that run until cancelled, in 3 of the 4 slots.
        running = await client.submit(sleep_jobs(3, seconds=3600, records=1))
        ending += running
        await all_running(client, running)
        # With the stop switch on nothing more starts, and the running jobs go on: the state holds still.
        assert await c.run("grid.stop_dispatching()") == "dispatching is OFF\n"
        queued = await client.submit(
            sleep_jobs(3, priority=5)
            + [{"type": "noop", "records": [0], "priority": 5}]
            + [{"type": "noop", "records": [0], "priority": -2} for _ in range(3)]
        )
        ending += queued
        paused, cancelled = queued[4], queued[0]
        assert await c.run(f"grid.pause({paused})") == f"job {paused} is paused\n"
        assert await client.cancel(cancelled) == "cancelled"

        db = grid.data / "gridd.db"
        expected = read_store(db)
        shown = await c.run("grid.overview()")
        recent = await c.run("{kind: counts[15] for kind, counts in _.data['recent'].items()}")
        assert read_store(db) == expected, "the state moved while the overview was taken"
        figures = parse_overview(shown)

        # The set-up is in the store as this test made it (the module's other tests leave no job unfinished).
        assert expected["queue"] == {("sleep", 5): 2, ("noop", 5): 1, ("noop", -2): 2}
        assert (expected["jobs"]["running"], expected["jobs"]["paused"]) == (3, 1)
        assert min(expected["jobs"][s] for s in ("done", "failed", "cancelled")) >= 1

        assert figures["dispatching"] == "OFF"
        assert figures["jobs"] == expected["jobs"]
        assert {(t, p): n for t, p, n in figures["queue"]} == expected["queue"]
        assert [p for _, p, _ in figures["queue"]] == sorted((p for _, p, _ in figures["queue"]), reverse=True)
        # Two workers of 2 slots each (the fixture), busy with this test's 3 running jobs.
        assert figures["workers"] == {"connected": 2, "slots": 4, "busy": 3, "drained": 0}

        # Rates: this server's whole life fits in the last 15 minutes, so that window counts every event.
        assert expected["first_event"] > grid.reactor.seconds() - 14 * 60
        assert ast.literal_eval(recent) == expected["events"]
        assert set(figures["per_minute"]) == set(expected["events"])
        for kind, count in expected["events"].items():
            assert figures["per_minute"][kind][15] == pytest.approx(count / 15, abs=0.05 + 1e-9), kind
    finally:
        for job in ending:
            try:
                await client.cancel(job)
            except errors.InvalidState:
                pass  # it ended already
        await c.run("grid.start_dispatching()")
        await c.close()
    await client.wait(ending)
    assert_no_server_errors(grid)


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_manhole_connection_closed_mid_call_leaks_nothing(manhole_grid, client):
    """An SSH client killed while its manhole waits on a job: the server drops the session and its watch, no error."""
    grid = manhole_grid
    watching = "[type(c).__name__ for c in dispatcher.watchers].count('_Watcher')"
    a, b = await console(grid), await console(grid)
    try:
        await b.run("grid.stop_dispatching()")
        [job] = await client.submit(sleep_jobs(1))
        since = len(grid.server.lines)
        a.send(f"grid.wait({job})")
        await grid.server.wait_for(rf"typed: grid\.wait\({job}\)", since)
        assert await b.run(watching) == "1\n"
        assert len((await b.run("grid.sessions()")).splitlines()) == 3
        a.child.kill(signal.SIGKILL)
        await grid.server.wait_for(r"manhole: session of operator .* closed \(1 calls still running\)", since)
        await b.run("from twisted.internet import task")
        await b.run("task.deferLater(reactor, 0, lambda: None)")  # one reactor turn: the watch is dropped
        assert await b.run(watching) == "0\n"
        assert len((await b.run("grid.sessions()")).splitlines()) == 2
    finally:
        await b.run("grid.start_dispatching()")
        await b.close()
        await deferToThread(a.child.close)
    await client.wait([job])
    assert_no_server_errors(grid)
