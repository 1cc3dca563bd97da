"""The sandbox (gridd.worker.sandbox, gridd.worker.confine): its bubblewrap command line, and tried from inside.

The tests from inside run real handler processes and real command programs
under the real bubblewrap (``./dev`` installs it), each trying what a
sandboxed job must not do (tests/sandbox_probe.py), on the real reactor;
waits are bounded Deferreds, no test sleeps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.python import usage

from gridd.worker import tap
from gridd.worker.cgroups import Cgroups
from gridd.worker.command import CommandType
from gridd.worker.confine import DENIED, LandlockUnavailable, landlock_abi
from gridd.worker.pool import HandlerPool, ProcessRunner
from gridd.worker.runner import Assignment, AttemptFailed
from gridd.worker.sandbox import JOIN, Sandbox, find_sandbox, python_paths
from tests import handlers
from tests.live import bounded, turns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "w1.the-workers-secret-token"


@pytest.fixture
def reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def site(tmp_path):
    """A directory the sandbox binds read-only (as it binds /usr or sys.path), holding the worker's secrets.

    ``site/data`` is the worker's data directory, with the worker's token
    in ``site/data/secret``; ``site/token`` is a credential file outside it;
    ``site/visible`` is a file anyone in the sandbox may read.
    """
    top = tmp_path / "site"
    (top / "data").mkdir(parents=True)
    for name in ("data/secret", "token"):
        (top / name).write_text(TOKEN)
    (top / "visible").write_text("for everyone")
    return top


@pytest.fixture
def sandbox(site) -> Sandbox:
    found = find_sandbox(str(site / "data"), [str(site / "token")])
    return dataclasses.replace(found, read_only=(*python_paths(), str(site)))


@pytest.fixture
def listener():
    """A TCP port listening on 127.0.0.1 (connections wait in its backlog)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def assignment(records, job_type="probes", params=None, job=1) -> Assignment:
    return Assignment(
        job=job, lease=f"L{job}", type=job_type, attempt=1, params=params or {}, total=len(records),
        records=tuple({"i": i, "data": d} for i, d in enumerate(records)), timeout=30.0,
    )  # fmt: skip


def probes(site, port) -> list[dict]:
    return [
        {"probe": "read", "arg": str(site / "visible")},
        {"probe": "read", "arg": str(site / "data" / "secret")},
        {"probe": "read", "arg": str(site / "token")},
        {"probe": "list", "arg": str(site / "data")},
        {"probe": "connect", "arg": port},
        {"probe": "write", "arg": str(site / "data" / "planted")},
        {"probe": "write", "arg": str(site / "planted")},
        {"probe": "write", "arg": "/etc/planted"},
        {"probe": "write", "arg": "/usr/planted"},
        {"probe": "write", "arg": "here"},
        {"probe": "write", "arg": "/tmp/private"},
        {"probe": "ptrace"},
        {"probe": "raw"},
        {"probe": "packet"},
        {"probe": "cwd"},
        {"probe": "env"},
    ]


def check_refused(site, outs: list[dict], work_root: str) -> None:
    """Every probe of :func:`probes` went as the sandbox promises."""
    visible, secret, token, listing, connect, *writes, ptrace, raw, packet, cwd, env = outs
    assert visible == {"ok": "for everyone"}  # the bound tree is there...
    assert secret["refused"] == "ENOENT"  # ...its secrets are not: under the data dir, absent;
    assert token.get("refused") == "EACCES" or token == {"ok": ""}  # beside it, /dev/null that may not be opened
    assert TOKEN not in json.dumps(outs)
    assert listing == {"ok": ["work"]}  # the data directory shows only the way to the work directory
    assert connect["refused"] in ("EACCES", "ECONNREFUSED", "ENETUNREACH")
    data_dir, beside, etc, usr, here, tmp = writes
    for refused in (data_dir, beside, etc, usr):
        assert refused.get("refused") in ("EACCES", "EROFS", "EPERM"), refused
    assert here == {"ok": ["here"]} and "private" in tmp["ok"]  # (its /tmp also holds the way to tmp_path's binds)
    assert ptrace["refused"] == "EPERM"
    assert raw["refused"] == "EPERM" and packet["refused"] == "EPERM"
    assert os.path.dirname(os.path.dirname(cwd["ok"])) == work_root or os.path.dirname(cwd["ok"]) == work_root
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "PWD", "PYTHONPATH", "GRIDD_PARAMS", "GRIDD_JOB", "GRIDD_ATTEMPT"}
    assert TOKEN not in json.dumps(env) and set(env["ok"]) <= allowed
    assert not (site / "data" / "planted").exists() and not (site / "planted").exists()
    assert not os.path.exists("/etc/planted") and not os.path.exists("/usr/planted")
    assert not os.path.exists("/tmp/private")


# -- from inside a handler process ------------------------------------------------


@pytest.fixture
def pool(reactor, sandbox):
    made = HandlerPool(reactor, size=1, sandbox=sandbox)
    yield made
    pytest_twisted.blockon(bounded(made.stop(), reactor))


async def run_in_pool(pool, reactor, job_type, records) -> list:
    results = []
    runner = ProcessRunner(pool, job_type, assignment(records), clock=reactor, on_result=results.append,
                           on_progress=lambda note: None)  # fmt: skip
    assert await bounded(runner.run(), reactor) is True
    return [r["out"] for r in results]


@pytest_twisted.ensureDeferred
async def test_sandboxed_handler_cannot_read_credentials_connect_write_outside_ptrace_or_open_raw_sockets(
    pool, reactor, site, listener, sandbox
):
    """From a sandboxed handler: no token; TCP, writes outside its work dir, ptrace and raw sockets refused."""
    outs = await run_in_pool(pool, reactor, handlers.Probes(), probes(site, listener))
    check_refused(site, outs, sandbox.work_root)
    # The attempt's directory is gone, the process's is empty, until the process ends with it.
    (process,) = pool._idle[next(iter(pool._idle))]
    assert os.listdir(process.work_dir) == []
    await bounded(pool.stop(), reactor)
    assert os.listdir(sandbox.work_root) == []


@pytest_twisted.ensureDeferred
async def test_handler_type_that_needs_the_network_can_connect(pool, reactor, listener):
    """needs_network = True: the type's processes share the worker's network, and connect."""
    outs = await run_in_pool(pool, reactor, handlers.NetworkProbes(), [{"probe": "connect", "arg": listener}])
    assert outs == [{"ok": "connected"}]


@pytest_twisted.ensureDeferred
async def test_each_attempt_in_a_reused_sandboxed_process_starts_in_an_empty_directory(pool, reactor):
    """What an attempt wrote is gone when the next attempt of the same process starts."""
    first = await run_in_pool(pool, reactor, handlers.Probes(), [{"probe": "write", "arg": "left"}, {"probe": "cwd"}])
    second = await run_in_pool(pool, reactor, handlers.Probes(), [{"probe": "list", "arg": "."}, {"probe": "cwd"}])
    assert first[0] == {"ok": ["left"]} and second[0] == {"ok": []}
    assert os.path.dirname(first[1]["ok"]) == os.path.dirname(second[1]["ok"])  # the same process


def group_members(pgid: int) -> dict[int, str]:
    """The processes of process group ``pgid`` and their one-letter states, from /proc."""
    members = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:
            members[int(name)] = fields[0]
    return members


@pytest_twisted.ensureDeferred
async def test_sandboxed_process_in_control_groups_is_held_to_their_memory_limit(reactor, sandbox):
    """The groups are joined before bubblewrap starts: memory used inside the sandbox counts, and the error says so."""
    cgroups = Cgroups()
    assert "memory" in cgroups.bases, cgroups.describe()  # this host offers it
    pool = HandlerPool(reactor, size=1, cgroups=cgroups, sandbox=sandbox)
    try:
        runner = ProcessRunner(pool, handlers.Fills(), assignment(["a"]), clock=reactor, on_result=lambda r: None,
                               on_progress=lambda n: None, limits={"memory": 200})  # fmt: skip
        with pytest.raises(AttemptFailed) as caught:
            await bounded(runner.run(), reactor)
        assert "memory limit 200 MiB (control group)" in str(caught.value)
    finally:
        await bounded(pool.stop(), reactor)


@pytest_twisted.ensureDeferred
async def test_sandboxed_handler_killed_by_a_signal_is_named_by_it(pool, reactor):
    """bubblewrap exits with 128 + N when its process dies of signal N: the error still names the signal."""
    runner = ProcessRunner(pool, handlers.Segfaults(), assignment(["a"]), clock=reactor, on_result=lambda r: None,
                           on_progress=lambda n: None)  # fmt: skip
    with pytest.raises(AttemptFailed, match=r"died \(killed by SIGSEGV\)"):
        await bounded(runner.run(), reactor)


@pytest_twisted.ensureDeferred
async def test_pause_stops_the_whole_sandbox_and_cancel_kills_it(pool, reactor):
    """The sandbox is one process group: SIGSTOP reaches bubblewrap and the handler, SIGKILL ends them all."""
    runner = ProcessRunner(pool, handlers.Hangs(), assignment(["a"]), clock=reactor, on_result=lambda r: None,
                           on_progress=lambda n: None)  # fmt: skip
    outcome = bounded(runner.run(), reactor)
    process = await bounded(runner.started, reactor)
    assert len(group_members(process.pid)) >= 3  # bubblewrap, its init in the sandbox, the handler
    runner.pause()
    await turns(reactor, lambda: set(group_members(process.pid).values()) == {"T"}, what="every process stopped")
    runner.cancel()
    assert await outcome is False
    await bounded(process.ended, reactor)
    await turns(reactor, lambda: not group_members(process.pid), what="every process gone")
    assert not os.path.exists(process.work_dir)


# -- from inside a command program ------------------------------------------------


@pytest.fixture
def probe_command(tmp_path):
    """A command program (outside the bound tree) that runs the probes, with the worker's Python."""
    path = tmp_path / "probe"
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {ROOT!r})\n"
                    "from tests.sandbox_probe import main\nmain()\n")  # fmt: skip
    path.chmod(0o755)
    return str(path)


async def run_command(reactor, sandbox, command, records, network=()) -> list:
    job_type = CommandType({"probe": command}, reactor=reactor, sandbox=sandbox, network=network)
    results = []
    runner = job_type.runner(assignment(records, "command", {"command": "probe"}), clock=reactor,
                             on_result=results.append)  # fmt: skip
    try:
        assert await bounded(runner.run(), reactor) is True, runner.stderr
    finally:
        await bounded(runner.ended, reactor)
    return [r["out"] for r in results]


@pytest_twisted.ensureDeferred
async def test_sandboxed_command_cannot_read_credentials_connect_write_outside_ptrace_or_open_raw_sockets(
    reactor, sandbox, site, listener, probe_command
):
    """The same from a command program: each refused; its work directory is removed when it ends."""
    outs = await run_command(reactor, sandbox, probe_command, probes(site, listener))
    check_refused(site, outs, sandbox.work_root)
    assert outs[-1]["ok"]["GRIDD_JOB"] == "1" and "PYTHONPATH" not in outs[-1]["ok"]
    assert os.listdir(sandbox.work_root) == []


@pytest_twisted.ensureDeferred
async def test_command_the_operator_lets_use_the_network_can_connect(reactor, sandbox, listener, probe_command):
    records = [{"probe": "connect", "arg": listener}]
    assert await run_command(reactor, sandbox, probe_command, records) != [{"ok": "connected"}]
    assert await run_command(reactor, sandbox, probe_command, records, network=["probe"]) == [{"ok": "connected"}]


# -- the command line -------------------------------------------------------------


def sample(tmp_path, **kwargs) -> Sandbox:
    fields = {"bwrap": "/usr/bin/bwrap", "setsid": "/usr/bin/setsid", "data_dir": str(tmp_path / "data"),
              "read_only": (str(tmp_path),)}  # fmt: skip
    return Sandbox(**{**fields, **kwargs})


def after(argv: list[str], *words: str) -> int:
    """The index of ``words`` as consecutive items of ``argv``."""
    for i in range(len(argv)):
        if argv[i : i + len(words)] == list(words):
            return i
    raise AssertionError(f"{' '.join(words)} not in {argv}")


def test_argv_unshares_everything_drops_capabilities_and_shares_the_network_only_when_asked(tmp_path):
    sandbox = sample(tmp_path)
    work = str(tmp_path / "data" / "work" / "w")
    argv = sandbox.argv(["prog", "arg"], work_dir=work)
    assert argv[:2] == ["/usr/bin/setsid", "/usr/bin/bwrap"] and argv[-3:] == ["--", "prog", "arg"]
    for words in (["--unshare-all"], ["--cap-drop", "ALL"], ["--die-with-parent"], ["--tmpfs", "/tmp"],
                  ["--proc", "/proc"], ["--dev", "/dev"], ["--bind", work, work], ["--chdir", work]):  # fmt: skip
        after(argv, *words)
    assert "--share-net" not in argv and "--new-session" not in argv
    assert after(argv, "--bind", work, work) < after(argv, "--remount-ro", "/")
    assert "--share-net" in sandbox.argv(["prog"], work_dir=work, network=True)


def test_argv_binds_the_system_read_only_and_never_the_whole_root_or_etc(tmp_path):
    argv = sample(tmp_path).argv(["prog"], work_dir=str(tmp_path / "w"))
    after(argv, "--ro-bind", "/usr", "/usr")
    after(argv, "--ro-bind", "/etc/passwd", "/etc/passwd")
    after(argv, "--ro-bind", str(tmp_path), str(tmp_path))
    binds = [argv[i + 1] for i, word in enumerate(argv) if word in ("--bind", "--ro-bind")]
    assert "/" not in binds and "/etc" not in binds and "/etc/shadow" not in binds and "/root" not in binds
    assert "/etc/ssl/private" not in binds
    # Binds come after the private /tmp, so that a bound path under /tmp stays.
    assert after(argv, "--tmpfs", "/tmp") < after(argv, "--ro-bind", str(tmp_path), str(tmp_path))


def test_argv_hides_the_data_dir_and_credentials_under_a_bound_path_and_binds_the_work_dir_inside(tmp_path):
    """The data dir under a bound path: an empty tmpfs, the work dir bound in it, then read-only; a file: /dev/null."""
    (tmp_path / "data").mkdir()
    (tmp_path / "token").write_text("t")
    (tmp_path / "data" / "secret").write_text("t")
    data, token = str(tmp_path / "data"), str(tmp_path / "token")
    sandbox = sample(tmp_path, hidden=(token, data + "/secret"))
    work = os.path.join(data, "work", "w")
    argv = sandbox.argv(["prog"], work_dir=work)
    masked = after(argv, "--perms", "0555", "--tmpfs", data)
    assert masked < after(argv, "--bind", work, work) < after(argv, "--remount-ro", data)
    after(argv, "--ro-bind", "/dev/null", token)
    assert (data + "/secret") not in argv  # inside the hidden directory already


def test_argv_leaves_out_what_is_not_bound_anyway_but_always_covers_the_data_dir(tmp_path):
    """A token file outside every bound path is absent anyway; the data dir, on the way to the work dir, is covered."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "token").write_text("t")
    data = str(elsewhere / "data")
    sandbox = sample(tmp_path / "bound", data_dir=data, hidden=(str(elsewhere / "token"),))
    work = str(elsewhere / "data" / "work" / "w")
    argv = sandbox.argv(["prog"], work_dir=work)
    assert str(elsewhere / "token") not in argv
    assert after(argv, "--tmpfs", data) < after(argv, "--bind", work, work) < after(argv, "--remount-ro", data)


def test_argv_skips_a_read_only_path_inside_a_hidden_one(tmp_path):
    (tmp_path / "data" / "lib").mkdir(parents=True)
    sandbox = sample(tmp_path / "other", read_only=(str(tmp_path / "data" / "lib"),), data_dir=str(tmp_path / "data"))
    assert str(tmp_path / "data" / "lib") not in sandbox.argv(["prog"], work_dir=str(tmp_path / "w"))


def test_argv_with_control_groups_joins_them_in_a_shell_before_bubblewrap(tmp_path):
    argv = sample(tmp_path).argv(
        ["prog"], work_dir=str(tmp_path / "w"), join=["/cg/a/cgroup.procs", "/cg/b/cgroup.procs"]
    )
    assert argv[:8] == ["/usr/bin/setsid", "/bin/sh", "-c", JOIN, "sh", "/cg/a/cgroup.procs", "/cg/b/cgroup.procs",
                        "--"]  # fmt: skip
    assert argv[8] == "/usr/bin/bwrap"


def test_environment_is_cleared_to_a_small_set(tmp_path, monkeypatch):
    monkeypatch.setenv("GRIDD_TOKEN", TOKEN)
    env = sample(tmp_path).environment("/w", {"GRIDD_JOB": "3"})
    assert env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/w", "TMPDIR": "/tmp",
                   "LANG": os.environ.get("LANG", "C.UTF-8"), "GRIDD_JOB": "3"}  # fmt: skip


def test_work_dirs_are_made_private_under_the_data_dir_and_removed(tmp_path):
    sandbox = sample(tmp_path)
    work = sandbox.make_work_dir("x-")
    assert os.path.dirname(work) == str(tmp_path / "data" / "work") and os.stat(work).st_mode & 0o777 == 0o700
    os.makedirs(os.path.join(work, "a", "b"))
    open(os.path.join(work, "f"), "w").close()
    Sandbox.empty_work_dir(work)
    assert os.listdir(work) == []
    Sandbox.remove_work_dir(work)
    assert not os.path.exists(work)


# -- confinement ------------------------------------------------------------------


def test_landlock_is_there_on_this_kernel_and_the_start_up_line_says_so(tmp_path):
    """The machines the tests run on have Landlock; the sandbox then uses it, and says so in its log line."""
    try:
        abi = landlock_abi()
    except LandlockUnavailable as e:
        pytest.fail(f"no Landlock here: {e}")
    assert abi >= 1 and f"seccomp filter, Landlock ABI {abi}" in sample(tmp_path).describe()


CONFINED = """
import ctypes, json, os, socket, sys
from gridd.worker.confine import confine
work, outside, port = sys.argv[1:]
said = {"confined": confine(work)}
def attempt(name, do):
    try:
        do()
        said[name] = "done"
    except OSError as e:
        said[name] = e.errno
attempt("write inside", lambda: open(os.path.join(work, "f"), "w").close())
attempt("write outside", lambda: open(os.path.join(outside, "f"), "w").close())
attempt("connect", lambda: socket.create_connection(("127.0.0.1", int(port)), timeout=5).close())
libc = ctypes.CDLL(None, use_errno=True)
said["ptrace"] = libc.ptrace(0, 0, 0, 0) == 0 or ctypes.get_errno()
threads = __import__("threading").Thread(target=lambda: None)
threads.start()
threads.join()
pid = os.fork()
if pid == 0:
    os._exit(0)
said["fork"] = os.waitpid(pid, 0)[1]
print(json.dumps(said))
"""


def test_confine_alone_keeps_writes_to_the_work_dir_and_denies_tcp_and_ptrace_but_not_threads_or_fork(listener):
    """Without bubblewrap around it, confine() alone: Landlock refuses writes elsewhere and TCP, seccomp ptrace."""
    import errno
    import subprocess
    import tempfile

    outside = tempfile.mkdtemp(dir="/var/tmp")  # outside /tmp, where Landlock lets a process write
    work = tempfile.mkdtemp()
    try:
        done = subprocess.run([sys.executable, "-c", CONFINED, work, outside, str(listener)], capture_output=True,
                              text=True, timeout=30, env=dict(os.environ, PYTHONPATH=ROOT))  # fmt: skip
        assert done.returncode == 0, done.stderr
        said = json.loads(done.stdout)
        assert os.listdir(outside) == [] and os.listdir(work) == ["f"]
    finally:
        for path in (outside, work):
            Sandbox.remove_work_dir(path)
    assert said["confined"].startswith("seccomp filter, Landlock ABI")
    assert said["write inside"] == "done" and said["write outside"] == errno.EACCES
    assert said["connect"] == errno.EACCES and said["ptrace"] == errno.EPERM and said["fork"] == 0


def test_start_up_line_says_when_there_is_no_landlock(tmp_path, monkeypatch):
    def unavailable():
        raise LandlockUnavailable("the kernel has no Landlock")

    monkeypatch.setattr("gridd.worker.confine.landlock_abi", unavailable)
    said = sample(tmp_path).describe()
    assert "seccomp filter, no Landlock (the kernel has no Landlock: writes are kept to the work directory" in said


def test_seccomp_deny_list_names_what_a_batch_handler_never_needs():
    for name in ("ptrace", "mount", "umount2", "kexec_load", "init_module", "finit_module", "delete_module",
                 "bpf", "perf_event_open", "reboot", "swapon", "keyctl", "unshare", "setns",
                 "process_vm_readv", "process_vm_writev"):  # fmt: skip
        assert name in DENIED


# -- the options ------------------------------------------------------------------


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_text(TOKEN)
    return str(path)


def test_sandbox_option_without_bwrap_on_path_refuses_to_start(tmp_path, secret, monkeypatch):
    """No bwrap on PATH: a usage error that says to install bubblewrap, never an unsandboxed worker."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(usage.UsageError, match=r"--sandbox: bubblewrap \(bwrap\) is not installed.*apt-get install"):
        tap.Options().parseOptions(["--secret-file", secret, "--sandbox"])


def test_sandbox_option_where_bwrap_cannot_make_namespaces_refuses_to_start(tmp_path, secret, monkeypatch):
    """A bwrap that fails (as inside Docker's default seccomp profile): a usage error quoting it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    with pytest.raises(
        usage.UsageError, match="cannot make its namespaces here.*No permissions to create new namespace"
    ):
        tap.Options().parseOptions(["--secret-file", secret, "--sandbox"])


def test_sandbox_option_with_threads_is_a_usage_error(secret):
    with pytest.raises(usage.UsageError, match="--sandbox needs --handlers processes"):
        tap.Options().parseOptions(["--secret-file", secret, "--sandbox", "--handlers", "threads"])


def test_command_network_must_name_a_command(secret):
    with pytest.raises(usage.UsageError, match="--command-network fetch: no such --command"):
        tap.Options().parseOptions(["--secret-file", secret, "--command", "a=/bin/true", "--command-network", "fetch"])


def test_sandbox_option_reaches_the_handler_pool_and_the_command_type(tmp_path, secret):
    """--sandbox: the pool and the command type share one sandbox that hides the secret file and DATADIR."""
    options = tap.Options()
    options.parseOptions(["--secret-file", secret, "--sandbox", "--data-dir", str(tmp_path / "d"), "--command",
                          "a=/bin/true", "--command", "b=/bin/false", "--command-network", "b"])  # fmt: skip
    sandbox = options["sandbox"]
    assert sandbox.data_dir == str(tmp_path / "d") and secret in sandbox.hidden
    service = tap.makeService(options, reactor=task.Clock())
    assert service.getServiceNamed("handlers").pool.sandbox is sandbox
    command = service.core.job_types["command"]
    assert command.sandbox is sandbox and command.network == {"b"}
    plain = tap.Options()
    plain.parseOptions(["--secret-file", secret])
    assert plain["sandbox"] is None
    assert tap.makeService(plain, reactor=task.Clock()).getServiceNamed("handlers").pool.sandbox is None


# -- end to end: twistd gridworker --sandbox ----------------------------------------


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_e2e_sandboxed_worker_runs_jobs_and_its_command_cannot_reach_token_server_or_data(
    reactor, tmp_path, probe_command
):
    """A real ``twistd gridworker --sandbox``: a built-in type's job completes in the sandbox, and a probing
    command cannot read the worker's secret file, connect to the gridd server, write to the worker's data
    directory or ptrace."""
    from gridd.client import connect
    from gridd.launch import LocalGrid

    grid = LocalGrid(reactor, tmp_path / "grid")
    data_dir = tmp_path / "worker-data"
    try:
        await grid.start_server()
        options = ["--sandbox", "--data-dir", str(data_dir), "--types", "command,textstats"]
        worker = await grid.start_worker("sandboxed", 2, *options, "--command", f"probe={probe_command}")
        assert worker.matching(r"sandbox: bubblewrap .*seccomp filter, Landlock ABI \d+")
        client = await connect(reactor, grid.endpoint, grid.secret, name="e2e")
        try:
            records = [
                {"probe": "read", "arg": str(grid.data / "secret")},
                {"probe": "connect", "arg": grid.port},
                {"probe": "write", "arg": str(data_dir / "planted")},
                {"probe": "ptrace"},
                {"probe": "cwd"},
            ]
            ids = await client.submit([
                {"type": "textstats", "records": ["one two two"]},
                {"type": "command", "records": records, "params": {"command": "probe"}},
            ])  # fmt: skip
            states = await bounded(client.wait(ids), reactor, 60)
            assert {s["state"] for s in states.values()} == {"done"}, states
            (stats,) = await client.results(ids[0])
            probed = [r["out"] for r in await client.results(ids[1])]
        finally:
            await client.close()
    finally:
        await grid.stop_all()
    assert stats["out"]["words"] == 3
    secret, connected, planted, ptrace, cwd = probed
    assert secret["refused"] == "ENOENT" and connected["refused"] in ("EACCES", "ECONNREFUSED")
    assert planted["refused"] in ("EACCES", "EROFS") and ptrace["refused"] == "EPERM"
    assert cwd["ok"].startswith(str(data_dir / "work") + "/")
    assert not (data_dir / "planted").exists() and os.listdir(data_dir / "work") == []
