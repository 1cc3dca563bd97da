"""Control groups for handler processes: a memory and a process-count limit the kernel enforces.

Rules this module owns:

- Where the host offers them, each limited handler process runs in a control
  group of its own, created under the worker's own group: ``memory`` limits
  its resident memory (with everything it starts), ``pids`` the number of
  processes and threads it may have (what ``RLIMIT_NPROC`` cannot do for
  root, or for a user with other processes). cgroup v2 is used where its
  controller is enabled, else cgroup v1; a controller the host lacks is
  simply not used, and :meth:`Cgroups.describe` says which are.
- The process joins its groups itself, first thing, before any handler code
  runs: nothing it starts can escape them (``gridd.worker.child``).
- A group is removed once its process has ended; a process that the kernel
  killed for passing its memory limit is told apart from any other SIGKILL by
  the group's ``oom_kill`` count.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

__all__ = ["Cgroups", "Group"]

log = Logger()

ROOT = Path("/sys/fs/cgroup")
_serial = itertools.count(1)


@dataclass
class Group:
    """One handler process's groups: a directory per controller used."""

    #: Controller ("memory", "pids") to the group's directory.
    paths: dict[str, Path] = field(default_factory=dict)
    #: Controller to its cgroup version, 1 or 2.
    version: dict[str, int] = field(default_factory=dict)

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the process writes its pid to, to join."""
        return [str(path / "cgroup.procs") for path in self.paths.values()]

    def killed_for_memory(self) -> bool:
        """Whether the kernel killed a process of this group for passing its memory limit."""
        path = self.paths.get("memory")
        if path is None:
            return False
        name = "memory.events" if self.version["memory"] == 2 else "memory.oom_control"
        try:
            for line in (path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value) > 0
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self) -> None:
        """SIGKILL every process still in the group: what a fork racing the group's kill left behind."""
        for path in self.paths.values():
            try:
                pids = (path / "cgroup.procs").read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass

    def remove(self) -> bool:
        """Remove the group's directories; False while some process is still in one (try again later)."""
        for controller, path in list(self.paths.items()):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno == errno.EBUSY:
                    continue
                log.warn("could not remove control group {path}: {e}", path=str(path), e=e)
            del self.paths[controller]
        return not self.paths


class Cgroups:
    """The controllers this host lets the worker use, and a factory of groups in them."""

    def __init__(self, root: Path = ROOT, own: Path = Path("/proc/self/cgroup")):
        #: Controller to (version, directory under which groups are made).
        self.bases: dict[str, tuple[int, Path]] = {}
        self._find(root, own)

    def _find(self, root: Path, own: Path) -> None:
        try:
            lines = own.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            _, controllers, where = line.split(":", 2)
            where = where.lstrip("/")
            if controllers == "":
                base = (root / "unified" if (root / "unified").is_dir() else root) / where
                try:
                    enabled = (base / "cgroup.subtree_control").read_text().split()
                except OSError:
                    enabled = []
                for name in ("memory", "pids"):
                    if name in enabled:
                        self.bases.setdefault(name, (2, base))
            else:
                for name in controllers.split(","):
                    if name in ("memory", "pids") and (root / name).is_dir():
                        self.bases[name] = (1, root / name / where)  # v1 first: v2 only where v1 lacks it
        for name, (_, base) in list(self.bases.items()):
            if not os.access(base, os.W_OK):
                del self.bases[name]

    def describe(self) -> str:
        if not self.bases:
            return "no control groups (limits are rlimits only)"
        return ", ".join(f"{name} (cgroup v{version})" for name, (version, _) in sorted(self.bases.items()))

    def make(self, *, memory: int | None = None, processes: int | None = None) -> Group:
        """A new group limited to ``memory`` MiB and ``processes`` tasks, for controllers the host has."""
        group = Group()
        wanted = {"memory": memory, "pids": processes}
        name = f"gridd-{os.getpid()}-{next(_serial)}"
        for controller, amount in wanted.items():
            if amount is None or controller not in self.bases:
                continue
            version, base = self.bases[controller]
            path = base / name
            try:
                path.mkdir()
                _write_limit(path, controller, version, amount)
            except OSError as e:
                log.warn("could not set up control group {path}: {e}", path=str(path), e=e)
                try:
                    path.rmdir()
                except OSError:
                    pass
                continue
            group.paths[controller] = path
            group.version[controller] = version
        return group


def _write_limit(path: Path, controller: str, version: int, amount: int) -> None:
    if controller == "memory":
        value = str(amount * 1024 * 1024)
        if version == 2:
            (path / "memory.max").write_text(value)
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")  # no escaping to swap
        else:
            (path / "memory.limit_in_bytes").write_text(value)
            swap = path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(value)  # memory and swap together: no escaping to swap
    else:
        (path / "pids.max").write_text(str(amount))
