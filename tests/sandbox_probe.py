"""What the sandbox's tests try from inside a sandboxed process; standard library only.

Used by the ``Probes`` handler (tests/handlers.py) and, as a program, by the
sandbox's command jobs: ``python sandbox_probe.py`` reads one JSON record per
line and writes ``{"out": RESULT}`` for each, as a command must.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import sys

PTRACE_TRACEME = 0


def _ptrace():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(PTRACE_TRACEME, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return "traced"


def _write(path):
    with open(path, "w") as f:
        f.write("written from the sandbox")
    return sorted(os.listdir(os.path.dirname(path) or "."))


def _connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        return "connected"


PROBES = {
    "read": lambda arg: open(arg).read(),
    "list": lambda arg: sorted(os.listdir(arg)),
    "write": _write,
    "connect": _connect,
    "ptrace": lambda arg: _ptrace(),
    "raw": lambda arg: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close(),
    "packet": lambda arg: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close(),
    "cwd": lambda arg: os.getcwd(),
    "env": lambda arg: dict(os.environ),
}


def probe(record: dict) -> dict:
    """``{"ok": VALUE}`` or ``{"refused": ERRNO NAME, "error": TEXT}``."""
    try:
        return {"ok": PROBES[record["probe"]](record.get("arg"))}
    except OSError as e:
        return {"refused": errno.errorcode.get(e.errno, str(e.errno)), "error": str(e)}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps({"out": probe(json.loads(line))}), flush=True)


if __name__ == "__main__":
    main()
