"""What the worker's child processes have in common: how one ended, in words; killing one; its kept log.

Handler processes (``gridd.worker.pool``) and command programs
(``gridd.worker.command``) each run in a process group of their own, so
that killing the group kills whatever they started; both keep the last part
of their standard error as the attempt's log.
"""

from __future__ import annotations

import os
import signal

from twisted.internet import error

__all__ = ["KeptOutput", "end_of", "kill", "pause", "resume"]


def end_of(reason, *, sandboxed: bool = False) -> tuple[int | None, str | None]:
    """How a process ended (a ``processEnded`` reason): (exit code, or None; signal name, or None).

    ``sandboxed``: the process was bubblewrap, which exits with 128 + N
    when what it ran was killed by signal N; that is read as the signal.
    """
    value = reason.value
    number = getattr(value, "signal", None)
    code = getattr(value, "exitCode", None) or 0
    if not number and sandboxed and 128 < code < 128 + 65:
        number = code - 128
    if number:
        try:
            return None, signal.Signals(number).name
        except ValueError:
            return None, f"signal {number}"
    return code, None


def kill(transport, pid: int, *, group: bool) -> bool:
    """SIGKILL child process ``pid``, with its whole group when it leads one; False if that failed (it was gone).

    The group outlives its leader: it can be killed after the process has
    exited, while what it started still runs.
    """
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        else:
            transport.signalProcess("KILL")
    except (OSError, error.ProcessExitedAlready):
        return False
    return True


def pause(pid: int, *, group: bool) -> bool:
    """Stop process ``pid`` (SIGSTOP), with its whole group when it leads one; False if it was gone."""
    return _send(pid, signal.SIGSTOP, group)


def resume(pid: int, *, group: bool) -> bool:
    """Continue a process :func:`pause` stopped (SIGCONT)."""
    return _send(pid, signal.SIGCONT, group)


def _send(pid: int, number: int, group: bool) -> bool:
    try:
        if group:
            os.killpg(pid, number)
        else:
            os.kill(pid, number)
    except OSError:
        return False
    return True


class KeptOutput:
    """The last ``limit`` bytes a process wrote to a stream."""

    def __init__(self, limit: int):
        self.limit = limit
        self._kept = bytearray()

    def add(self, data: bytes) -> None:
        self._kept += data
        del self._kept[: -self.limit]

    def __bool__(self) -> bool:
        return bool(self._kept)

    def text(self) -> str:
        return self._kept.decode("utf-8", "replace")

    def tail(self, lines: int = 5) -> str:
        """Its last ``lines`` lines, joined on one line."""
        return " | ".join(self.text().strip().splitlines()[-lines:])
