"""What a sandboxed process does to itself before it runs any job code: a seccomp filter, then Landlock.

Rules this module owns:

- The seccomp filter (pyseccomp, over libseccomp) allows every system call
  but those a batch handler never needs, which fail with EPERM: tracing and
  reading other processes (``ptrace``, ``process_vm_*``, ``pidfd_getfd``,
  ``kcmp``), mounting (``mount``, ``umount2``, ``pivot_root``, the new mount
  API), namespaces (``unshare``, ``setns``, ``clone`` with a ``CLONE_NEW*``
  flag), kernel modules and ``kexec``, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring``, keyrings, ``reboot``, swap, clocks,
  accounting, quotas, ``open_by_handle_at``, raw and packet sockets, and
  the terminal ioctls that push input into a terminal (``TIOCSTI``,
  ``TIOCLINUX``). ``clone3``, whose flags a filter cannot read, fails with
  ENOSYS, so that the C library falls back to ``clone``. A call made for
  another architecture (32-bit calls from a 64-bit process) kills the
  process: libseccomp's default.
- Landlock, where the kernel has it (ABI 1 and later): the whole file
  system may be read, listed and executed, and written only in the work
  directory, ``/tmp`` and ``/dev/shm`` (``/dev`` only to write to the
  devices there, like ``/dev/null``). With ABI 4 and later, a process
  without network may neither bind nor connect a TCP socket; with ABI 6,
  it may neither signal nor reach through an abstract Unix socket any
  process outside its sandbox. Without Landlock the process goes on, under
  bubblewrap's read-only binds and the seccomp filter, and says so.
- Both last for the process and everything it starts (``no_new_privs``).
- Two ways in: the handler process calls :func:`confine` before it loads
  its job type, and a command program is started as
  ``python -m gridd.worker.confine SPEC -- PROGRAM``, which confines itself
  and then executes PROGRAM in its place. SPEC is ``{"work": DIR,
  "network": BOOL}``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys

__all__ = ["DENIED", "LandlockUnavailable", "confine", "landlock_abi", "landlock", "seccomp_filter", "main"]

#: System calls that fail with EPERM under the filter, whatever their arguments.
DENIED = (
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # mounts and namespaces
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "unshare", "setns",
    # the kernel itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "lookup_dcookie", "iopl", "ioperm",
    "syslog", "uselib", "nfsservctl", "vhangup",
    # keyrings
    "keyctl", "add_key", "request_key",
    # the machine
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "settimeofday", "clock_settime",
    "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    # files by handle, around every path check
    "open_by_handle_at", "name_to_handle_at",
)  # fmt: skip

AF_PACKET = 17
SOCK_TYPE_MASK = 0xF
SOCK_RAW, SOCK_PACKET = 3, 10
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
#: clone's flags that make a new namespace.
CLONE_NEW = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
#: An int argument: the kernel reads only its low 32 bits, so compare only those.
INT = 0xFFFFFFFF


def seccomp_filter():
    """The filter, built and not loaded (``.load()`` loads it into this process)."""
    import pyseccomp as seccomp

    deny = seccomp.ERRNO(errno.EPERM)
    masked = seccomp.MASKED_EQ
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED:
        rules.add_rule(deny, name)
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NEW.values():
        rules.add_rule(deny, "clone", seccomp.Arg(0, masked, flag, flag))
    rules.add_rule(deny, "socket", seccomp.Arg(0, masked, INT, AF_PACKET))
    for kind in (SOCK_RAW, SOCK_PACKET):
        rules.add_rule(deny, "socket", seccomp.Arg(1, masked, SOCK_TYPE_MASK, kind))
    for request in (TIOCSTI, TIOCLINUX):
        rules.add_rule(deny, "ioctl", seccomp.Arg(1, masked, INT, request))
    return rules


# -- Landlock (ctypes over the three system calls; their numbers are the same on every architecture) --

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

#: File-system rights, by the ABI that brought them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
ABI_1_FS = (1 << 13) - 1  # the above, removing and making files, directories, devices, sockets, pipes, links
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

READ = EXECUTE | READ_FILE | READ_DIR


class LandlockUnavailable(Exception):
    """The kernel has no Landlock, or it is turned off."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]  # fmt: skip


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _call(libc, number: int, *args) -> int:
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; LandlockUnavailable says why there is none."""
    try:
        return _call(_libc(), SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                     ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))  # fmt: skip
    except OSError as e:
        reasons = {errno.ENOSYS: "the kernel has no Landlock", errno.EOPNOTSUPP: "Landlock is turned off at boot"}
        raise LandlockUnavailable(reasons.get(e.errno, f"Landlock: {e}")) from None


def landlock(work: str, *, network: bool, abi: int | None = None) -> int:
    """Restrict this process with Landlock as the module says; returns the ABI used."""
    abi = landlock_abi() if abi is None else abi
    fs = ABI_1_FS | (REFER if abi >= 2 else 0) | (TRUNCATE if abi >= 3 else 0) | (IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(handled_access_fs=fs)
    size = 8
    if abi >= 4:
        attr.handled_access_net = 0 if network else NET_BIND_TCP | NET_CONNECT_TCP
        size = 16
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size = 24
    libc = _libc()
    ruleset = _call(libc, SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    devices = READ | WRITE_FILE | (fs & (TRUNCATE | IOCTL_DEV))
    try:
        for path, allowed in (("/", READ), ("/dev", devices), ("/dev/shm", fs), ("/tmp", fs), (work, fs)):
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
                _call(libc, SYS_LANDLOCK_ADD_RULE, ctypes.c_long(ruleset), ctypes.c_uint(LANDLOCK_RULE_PATH_BENEATH),
                      ctypes.byref(rule), ctypes.c_uint32(0))  # fmt: skip
            finally:
                os.close(fd)
        _no_new_privs(libc)
        _call(libc, SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_long(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return abi


def _no_new_privs(libc) -> None:
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(code)}")


def confine(work: str, *, network: bool = False) -> str:
    """Apply Landlock (where the kernel has it), then the seccomp filter; returns what applied, in words."""
    try:
        applied = f"Landlock ABI {landlock(work, network=network)}"
    except LandlockUnavailable as e:
        applied = f"no Landlock ({e})"
    seccomp_filter().load()
    return f"seccomp filter, {applied}"


def main(argv: list[str]) -> int:
    """``confine SPEC -- PROGRAM [ARG...]``: confine this process, then become PROGRAM."""
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m gridd.worker.confine SPEC -- PROGRAM [ARG...]", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    confine(spec["work"], network=bool(spec.get("network")))
    program = argv[3:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this launcher's, not the program's
    try:
        os.execve(program[0], program, env)
    except OSError as e:
        print(f"cannot execute {program[0]}: {e}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
