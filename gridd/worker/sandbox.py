"""The sandbox of handler processes and command programs: the bubblewrap command line that starts one.

Rules this module owns:

- A sandboxed process sees a file system made of read-only binds: the
  system (``/usr`` and the top-level links into it, or the directories
  themselves), a short list of ``/etc`` files (``SYSTEM_ETC``: the dynamic
  linker, users and groups, name resolution, time zone, CA certificates;
  never ``/etc/shadow``, host keys or ``/etc/ssl/private``), Python's
  installation and every directory on the worker's ``sys.path``, and the
  paths the caller adds. Then a private ``/tmp`` (an empty tmpfs), a new
  ``/proc`` (its own processes only) and a minimal ``/dev``.
- One directory is writable, the work directory, bound at its own path and
  made the process's current directory and ``HOME``. Work directories are
  made under the worker's data directory (``DATADIR/work``, mode 0700) and
  removed with their attempt.
- The worker's data directory and its credential files are not there: the
  data directory is covered by an empty read-only tmpfs (the work directory
  is then bound inside it), and any other of them that lies under a bound
  path is covered too, a directory the same way, a file by ``/dev/null``.
- Every namespace is new (``--unshare-all``: user where the host allows it,
  mount, PID, network, IPC, UTS, cgroup); the network is shared only with a
  job type that declares that it needs it. No capabilities are kept, even
  for a worker running as root. The sandbox dies with the worker
  (``--die-with-parent``).
- It runs in a session and process group of its own, made by ``setsid``
  before bubblewrap starts (rather than bubblewrap's ``--new-session``, which
  would put the process in a group the worker cannot signal): the worker
  pauses and kills the whole sandbox through that group, and the process
  has no controlling terminal to push input into.
- The environment is cleared to ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and
  what the caller adds: no token, no variable of the worker's reaches it.
- A process with control groups of its own joins them before bubblewrap
  starts (a shell writes its pid into each ``cgroup.procs``, then executes
  bubblewrap), so that everything in the sandbox counts against them.
- What runs inside confines itself further before any job code runs
  (``gridd.worker.confine``: seccomp, Landlock).
- :func:`find_sandbox` refuses, with a message saying what to do, when
  ``bwrap`` or ``setsid`` is not installed, pyseccomp cannot be imported,
  or bubblewrap cannot make its namespaces here (inside a container whose
  seccomp profile forbids them): ``--sandbox`` is never silently off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["SYSTEM_DIRS", "SYSTEM_ETC", "Sandbox", "SandboxUnavailable", "find_sandbox", "python_paths"]

#: Top-level system directories bound read-only (or, when a link into /usr, made the same link).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: What of /etc a program needs to run, resolve names and check certificates; bound read-only where present.
SYSTEM_ETC = (
    "alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group",
    "nsswitch.conf", "host.conf", "hosts", "resolv.conf", "gai.conf", "protocols", "services", "ssl/certs",
    "ssl/openssl.cnf", "ca-certificates", "mime.types", "os-release", "debian_version", "magic", "magic.mime",
)  # fmt: skip
#: The shell's part of starting a sandbox with control groups: join each, then become bubblewrap.
JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
#: The variables a sandboxed process gets, besides those its caller adds.
PATH = "/usr/local/bin:/usr/bin:/bin"
#: Seconds the start-up check may take to run bubblewrap once.
PROBE_TIMEOUT = 10


class SandboxUnavailable(Exception):
    """The sandbox cannot be set up on this host; the message says why and what to do."""


def python_paths() -> list[str]:
    """Python's own installation and every existing directory or file on ``sys.path``."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    paths += [p for p in sys.path if p]
    return [os.path.abspath(p) for p in paths if os.path.exists(p)]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class Sandbox:
    """How to start processes under bubblewrap; see the module's rules.

    ``data_dir`` is the worker's data directory (work directories are made
    in its ``work`` folder); ``hidden`` are files and directories never to
    be seen (the credential files; the data directory always is);
    ``read_only`` are further paths bound read-only (by default Python's, see
    :func:`python_paths`).
    """

    bwrap: str
    setsid: str
    data_dir: str
    hidden: tuple[str, ...] = ()
    read_only: tuple[str, ...] | None = None
    shell: str = "/bin/sh"

    def describe(self) -> str:
        """The sandbox in words, for the worker's start-up log line."""
        from gridd.worker.confine import LandlockUnavailable, landlock_abi

        try:
            landlock = f"Landlock ABI {landlock_abi()}"
        except LandlockUnavailable as e:
            landlock = f"no Landlock ({e}: writes are kept to the work directory by read-only binds alone)"
        return f"sandbox: bubblewrap ({self.bwrap}), seccomp filter, {landlock}; work directories in {self.work_root}"

    @property
    def work_root(self) -> str:
        return os.path.join(self.data_dir, "work")

    def make_work_dir(self, prefix: str) -> str:
        """A new, empty work directory (0700) under the data directory."""
        os.makedirs(self.work_root, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=self.work_root)

    @staticmethod
    def remove_work_dir(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def empty_work_dir(path: str) -> None:
        """Remove everything in ``path``, keeping the directory."""
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return
        for name in names:
            entry = os.path.join(path, name)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    os.unlink(entry)
                except FileNotFoundError:
                    pass

    def environment(self, work_dir: str, extra: Mapping[str, str] = ()) -> dict[str, str]:
        """The whole environment of a sandboxed process."""
        env = {"PATH": PATH, "HOME": work_dir, "TMPDIR": "/tmp", "LANG": os.environ.get("LANG", "C.UTF-8")}
        env.update(extra)
        return env

    def argv(self, command: Sequence[str], *, work_dir: str, network: bool = False, join: Iterable[str] = (),
             read_only: Iterable[str] = ()) -> list[str]:  # fmt: skip
        """The command line that runs ``command`` in the sandbox, from ``setsid`` to ``command``'s last word.

        ``join``: ``cgroup.procs`` files to join first; ``read_only``: paths
        this process alone needs to see (a command's program).
        """
        args = ["--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--hostname", "gridd-sandbox"]
        if network:
            args.append("--share-net")
        args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        bound: list[str] = []
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
                bound.append(path)
        for name in SYSTEM_ETC:
            path = os.path.join("/etc", name)
            if os.path.exists(path):
                args += ["--ro-bind", path, path]
                bound.append(path)
        hidden = self._hidden()
        extra = python_paths() if self.read_only is None else [os.path.abspath(p) for p in self.read_only]
        for path in sorted({*extra, *(os.path.abspath(p) for p in read_only)}):
            if any(_under(path, b) for b in bound) or any(_under(path, h) for h in hidden):
                continue
            args += ["--ro-bind", path, path]
            bound.append(path)
        masked: list[str] = []
        data_dir = os.path.abspath(self.data_dir)
        for path in hidden:
            # The data directory is always covered: the way to the work directory passes through it.
            there = path == data_dir or any(_under(path, b) for b in bound)
            if not there or any(_under(path, m) for m in masked):
                continue  # not there anyway
            if os.path.isdir(path):
                args += ["--perms", "0555", "--tmpfs", path]
                masked.append(path)
            else:
                args += ["--ro-bind", "/dev/null", path]
        args += ["--bind", work_dir, work_dir]
        for path in [*masked, "/"]:  # and the root, where bubblewrap made the mount points: nothing else is writable
            args += ["--remount-ro", path]
        args += ["--chdir", work_dir, "--", *command]
        argv = [self.setsid]
        join = list(join)
        if join:
            argv += [self.shell, "-c", JOIN, "sh", *join, "--"]
        return argv + [self.bwrap, *args]

    def _hidden(self) -> list[str]:
        paths = []
        for path in (self.data_dir, *self.hidden):
            for form in (os.path.abspath(path), os.path.realpath(path)):
                if os.path.exists(form) and form not in paths:
                    paths.append(form)
        return sorted(paths)


def find_sandbox(data_dir: str, hidden: Iterable[str] = (), *, path: str | None = None) -> Sandbox:
    """A :class:`Sandbox` for this host, after checking it works; SandboxUnavailable says why not.

    ``path`` is where to look for ``bwrap`` and ``setsid`` (default: ``$PATH``).
    """
    bwrap = shutil.which("bwrap", path=path)
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed or not on PATH: install it (Debian and Ubuntu: apt-get install "
            "bubblewrap; Fedora: dnf install bubblewrap) or run without --sandbox"
        )
    setsid = shutil.which("setsid", path=path)
    if setsid is None:
        raise SandboxUnavailable("setsid (util-linux) is not installed or not on PATH: install util-linux")
    try:
        from gridd.worker.confine import seccomp_filter

        seccomp_filter()
    except (ImportError, OSError) as e:
        raise SandboxUnavailable(
            f"the seccomp filter cannot be built ({e}): install gridd with its sandbox extra "
            "(pip install 'gridd[sandbox]', which brings pyseccomp) and libseccomp2"
        ) from None
    probe = [bwrap, "--ro-bind", "/", "/", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=PROBE_TIMEOUT, env={"PATH": PATH})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxUnavailable(f"bubblewrap does not run here: {e}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip() or f"exit code {done.returncode}"
        raise SandboxUnavailable(
            f"bubblewrap cannot make its namespaces here ({said}); inside a container, allow it "
            "(for Docker: --security-opt seccomp=unconfined, or a profile that allows unshare and mount)"
        )
    return Sandbox(bwrap=bwrap, setsid=setsid, data_dir=os.path.abspath(data_dir), hidden=tuple(hidden))
