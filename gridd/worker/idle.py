"""Is the worker's host idle? Sources that each say busy or idle, and the watch that combines them.

A *source* answers ``check()`` with a reading ``(busy, words)``, or a
Deferred of one, ``words`` saying why in a sentence fragment. The sources:

- :class:`OtherProcessesCPU`: the share of the host's CPU that processes
  other than the worker's own used since the last poll (``/proc``); busy
  above ``threshold`` (default 25 %).
- :class:`UserIdleTime`: how long ago a person used the desk, from logind
  and from the X screensaver (``xprintidle``); busy within ``min_idle``
  (default 5 min). Where neither answers, it says so once and counts idle.
- :class:`SignalFile`: a file the host writes, for workers inside VMs; a
  missing file is busy.
- :class:`Signal`: set from outside (the server's word, an operator's).

:class:`HostWatch` polls them every ``interval`` seconds. Its rules:

- **Busy at once.** A reading of busy from any source makes the host busy
  as soon as it arrives; the reason is that source's words (every busy
  source's, joined with ``; ``).
- **Idle after a wait.** The host turns idle only when every source's last
  reading is idle and every *measured* source (CPU, user idle time) has
  read idle, without a break, for ``idle_after`` seconds (default 60 s):
  a desk that flickers between busy and idle stays busy. The *said*
  sources (:class:`Signal`, :class:`SignalFile`, ``settles = False``) are
  a decision already made elsewhere, so their idle counts as soon as it is
  read (a :class:`SignalFile` at the next poll, a :class:`Signal` the
  moment it is set); they still never cut short the measured sources' wait.
- **The watch starts busy** ("the host has not been watched yet") and
  turns idle only by these rules; ``on_change(busy, reason)`` is called on
  each change of ``busy`` only, never for the initial state.
- **A failing source never stops the watch.** A source that raises, or
  whose Deferred fails or gives no answer within ``timeout`` seconds, is
  logged once (a warning, and a note when it answers again) and read as
  idle until it answers. A source still answering an earlier poll is not
  asked again.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.application import service
from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from gridd.worker.processes import end_of
from gridd.worker.suspend import duration_in_words

__all__ = [
    "HostWatch",
    "OtherProcessesCPU",
    "Signal",
    "SignalFile",
    "Source",
    "UserIdleTime",
    "logind_idle",
    "run_command",
    "terminal_idle",
    "xprintidle_idle",
]

log = Logger()

Reading = tuple[bool, str]


class Source:
    """What :class:`HostWatch` asks of a source; a source need not inherit from it.

    ``name`` names it in logs; ``settles`` is True for a measured source,
    whose idle must last ``idle_after`` seconds. A source that changes from
    outside calls the callbacks it was given by ``watch(changed)``.
    """

    name = "a source"
    settles = True

    def check(self) -> Reading | defer.Deferred:
        raise NotImplementedError

    def watch(self, changed: Callable[[], object]) -> None:
        """``changed()`` is to be called whenever this source's reading changes by itself."""

    def unwatch(self, changed: Callable[[], object]) -> None:
        """Stop calling ``changed``."""

    def __str__(self) -> str:
        return self.name


# -- CPU used by other processes -------------------------------------------


@dataclass(frozen=True)
class _Process:
    pid: int
    ppid: int
    started: int  # clock ticks after boot: with the pid, names one process across polls
    ticks: int  # CPU used by it and by the children it has waited for (utime+stime+cutime+cstime)


def _read_process(proc: Path, pid: int) -> _Process | None:
    """``/proc/PID/stat``, or None if that process is gone."""
    try:
        fd = os.open(f"{proc}/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # "PID (COMM) STATE PPID ..." where COMM may hold spaces and parentheses.
    fields = text[text.rindex(b")") + 2 :].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return _Process(pid, int(fields[1]), int(fields[19]), utime + stime + cutime + cstime)


def _read_cpu(proc: Path) -> tuple[int, int, int]:
    """From ``/proc/stat``'s first line: (all time, time not idle, CPUs), in clock ticks."""
    lines = (proc / "stat").read_text().splitlines()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in (lines[0].split()[1:9] + ["0"] * 8)[:8])
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    # guest and guest_nice are already counted in user and nice.
    return (
        user + nice + system + idle + iowait + irq + softirq + steal,
        user + nice + system + irq + softirq + steal,
        cpus,
    )


class OtherProcessesCPU(Source):
    """Busy when processes other than the worker's own used more than ``threshold`` of the host's CPU.

    Measured between two polls from ``proc`` (``/proc``): all CPU time not
    idle (``/proc/stat``: user, nice, system, irq, softirq and steal, the
    time a hypervisor gave to others, which inside a VM is the host's own
    load) less the CPU the worker's own processes used. The worker's own
    are the process ``pid`` (this one by default) and all its descendants,
    found over every process's parent (``/proc/PID/stat``), and any process
    once found among them while it lives on (a program that daemonized
    stays the worker's). Each counts with the children it has waited for,
    so a handler that ended between two polls is counted once, in its
    parent. A process that left the tree and was reaped by another loses
    its last interval's CPU to "other".

    The share is of all the host's CPUs: one busy process on a 2-CPU host
    is 50 %. The first poll has nothing to compare with and reads idle.
    ``share`` and ``own_share`` hold the last measurement (None before one).
    """

    name = "CPU of other processes"

    def __init__(self, threshold: float = 0.25, *, pid: int | None = None, proc: str | os.PathLike = "/proc"):
        self.threshold = threshold
        self.pid = os.getpid() if pid is None else pid
        self.proc = Path(proc)
        self.share: float | None = None
        self.own_share: float | None = None
        self.cpus = 0
        self._last: tuple[int, int, dict[tuple[int, int], _Process]] | None = None

    def check(self) -> Reading:
        total, used, self.cpus = _read_cpu(self.proc)
        members = self._members()
        last, self._last = self._last, (total, used, members)
        if last is None:
            return False, "CPU use not measured yet"
        if total <= last[0]:  # no clock tick since the last poll
            self._last = last
            return self._reading()
        elapsed = total - last[0]
        own = self._own_ticks(last[2], members)
        self.own_share = min(1.0, own / elapsed)
        self.share = min(1.0, max(0, (used - last[1]) - own) / elapsed)
        return self._reading()

    def _reading(self) -> Reading:
        if self.share is None:
            return False, "CPU use not measured yet"
        return self.share > self.threshold, f"other processes use {self.share * 100:.0f} % of the CPU"

    def _members(self) -> dict[tuple[int, int], _Process]:
        """The worker's processes now, by (pid, start time): its descendants, and those known before."""
        processes, children = {}, {}
        for entry in os.scandir(self.proc):
            if entry.name.isdigit() and (process := _read_process(self.proc, int(entry.name))):
                processes[process.pid] = process
                children.setdefault(process.ppid, []).append(process.pid)
        known = self._last[2] if self._last else {}
        todo = [self.pid] + [pid for pid, started in known if pid in processes and processes[pid].started == started]
        members: dict[tuple[int, int], _Process] = {}
        while todo:
            process = processes.get(todo.pop())
            if process is None or (process.pid, process.started) in members:
                continue
            members[(process.pid, process.started)] = process
            todo.extend(children.get(process.pid, ()))
        return members

    @staticmethod
    def _own_ticks(before: Mapping[tuple[int, int], _Process], now: Mapping[tuple[int, int], _Process]) -> int:
        """CPU ticks the worker's processes used between two polls."""
        ticks = sum(p.ticks - (before[key].ticks if key in before else 0) for key, p in now.items())
        by_pid = {p.pid: p for p in before.values()}
        for key, process in before.items():
            if key in now:
                continue
            # Gone. If its nearest ancestor still here waited for it, that
            # ancestor's count has just taken in all its time, part of it
            # counted at earlier polls: count only what is new.
            parent, seen = by_pid.get(process.ppid), set()
            while parent is not None and (parent.pid, parent.started) not in now and parent.pid not in seen:
                seen.add(parent.pid)
                parent = by_pid.get(parent.ppid)
            if parent is not None and (parent.pid, parent.started) in now:
                ticks -= process.ticks
        return max(0, ticks)


# -- how long ago a person used the desk -------------------------------------


class _Output(protocol.ProcessProtocol):
    """Collects a short command's standard output; ``done`` fires with it, or fails naming how it ended."""

    def __init__(self, argv: Sequence[str], limit: int = 65_536):
        self.argv = argv
        self.limit = limit
        self.out = bytearray()
        self.err = bytearray()
        self.done = defer.Deferred(self._cancel)

    def outReceived(self, data: bytes) -> None:
        if len(self.out) < self.limit:
            self.out += data[: self.limit - len(self.out)]

    def errReceived(self, data: bytes) -> None:
        if len(self.err) < 4096:
            self.err += data[: 4096 - len(self.err)]

    def processEnded(self, reason) -> None:
        if self.done.called:
            return
        code, signal_name = end_of(reason)
        if code == 0 and signal_name is None:
            self.done.callback(bytes(self.out))
        else:
            how = f"signal {signal_name}" if signal_name else f"exit code {code}"
            said = bytes(self.err).decode("utf-8", "replace").strip().splitlines()
            self.done.errback(RuntimeError(f"{self.argv[0]} ended with {how}" + (f": {said[-1]}" if said else "")))

    def _cancel(self, d: defer.Deferred) -> None:
        if self.transport is not None and self.transport.pid is not None:
            self.transport.signalProcess("KILL")


def run_command(reactor, argv: Sequence[str], env: Mapping[str, str] | None = None) -> defer.Deferred:
    """Run ``argv`` (found on ``PATH``); a Deferred of its standard output. Cancelling it kills the command.

    A command that fails says so in the error, with the last line of its
    standard error (kept, never passed on to the worker's own). The
    Deferred's ``pid`` attribute is the command's process id.
    """
    path = shutil.which(argv[0])
    if path is None:
        return defer.fail(FileNotFoundError(f"{argv[0]} not found on PATH"))
    out = _Output(argv)
    transport = reactor.spawnProcess(
        out, path, list(argv), env=dict(os.environ if env is None else env), childFDs={1: "r", 2: "r"}
    )
    out.done.pid = transport.pid  # for logs and tests
    return out.done


def terminal_idle(dev: str | os.PathLike = "/dev", now: Callable[[], float] = time.time) -> float | None:
    """Seconds since a key was last typed on a terminal (text consoles and pseudo-terminals), as ``w`` counts them.

    A terminal's access time is its last input; None where no terminal is found.
    """
    dev = Path(dev)
    times = []
    for pattern in ("tty[0-9]*", "pts/[0-9]*"):
        for path in dev.glob(pattern):
            try:
                times.append(path.stat().st_atime)
            except OSError:
                continue
    return max(0.0, now() - max(times)) if times else None


def parse_logind(text: str, now: Callable[[], float] = time.time) -> float | None:
    """The shortest idle time of the sessions in ``loginctl show-session -p Class -p IdleHint -p IdleSinceHint`` output.

    Sessions are separated by blank lines; only ``user`` sessions count. A
    session not idle since a known time counts as used now. One whose hint
    never changed (``IdleHint=no``, ``IdleSinceHint=0``: a desktop that does
    not tell logind) cannot tell. None when no session can.
    """
    idle = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if fields.get("Class", "user") != "user" or "IdleHint" not in fields:
            continue
        if fields["IdleHint"] != "yes":
            if int(fields.get("IdleSinceHint") or 0):
                idle.append(0.0)
            continue
        since = int(fields.get("IdleSinceHint") or 0) / 1e6
        idle.append(max(0.0, now() - since) if since else 0.0)
    return min(idle) if idle else None


@defer.inlineCallbacks
def logind_idle(reactor):
    """Seconds since a person used any user session, from logind (``loginctl``); None without one."""
    listed = yield run_command(reactor, ["loginctl", "list-sessions", "--no-legend"])
    sessions = [line.split()[0] for line in listed.decode("utf-8", "replace").splitlines() if line.strip()]
    if not sessions:
        return None
    shown = yield run_command(
        reactor, ["loginctl", "show-session", *sessions, "-p", "Class", "-p", "IdleHint", "-p", "IdleSinceHint"]
    )
    return parse_logind(shown.decode("utf-8", "replace"))


@defer.inlineCallbacks
def xprintidle_idle(reactor):
    """Seconds since the X display's last input (``xprintidle``); None without a display or the command."""
    if not os.environ.get("DISPLAY") or shutil.which("xprintidle") is None:
        return None
    out = yield run_command(reactor, ["xprintidle"])
    return int(out.decode().strip()) / 1000


#: Seconds a user idle probe that failed rests before it is asked again.
PROBE_REST = 600.0


class UserIdleTime(Source):
    """Busy when a person used the desk within ``min_idle`` seconds (default 300).

    Asks each of ``probes`` (callables returning seconds since the last use,
    None when they cannot tell, or a Deferred of either) and takes the
    shortest answer. By default: logind (``loginctl``), the X screensaver
    (``xprintidle``) and the terminals' last input. A probe that fails is
    logged once and rests for ``rest`` seconds (default 600) before it is
    asked again; when none can tell, the source says so in the log once and
    reads idle (the CPU source still guards the desk).
    """

    name = "user idle time"

    def __init__(
        self,
        reactor,
        min_idle: float = 300.0,
        probes: Iterable[Callable[[], object]] | None = None,
        *,
        rest: float = PROBE_REST,
    ):
        self.reactor = reactor
        self.min_idle = min_idle
        if probes is None:
            probes = (lambda: logind_idle(reactor), lambda: xprintidle_idle(reactor), terminal_idle)
        self.probes = list(probes)
        self.rest = rest
        self.idle: float | None = None
        self._told_unknown = False
        #: A probe that failed is not asked again until then (the reactor's clock); each failure is logged once.
        self._resting: dict[int, float] = {}

    @defer.inlineCallbacks
    def check(self):
        now = self.reactor.seconds()
        asked = [n for n in range(len(self.probes)) if self._resting.get(n, 0.0) <= now]
        answers = yield defer.DeferredList([defer.maybeDeferred(self.probes[n]) for n in asked], consumeErrors=True)
        for n, (ok, value) in zip(asked, answers, strict=True):
            if ok:
                self._resting.pop(n, None)
                continue
            if n not in self._resting:
                log.info(
                    "a user idle probe failed, asked again every {rest:g} s: {error}",
                    rest=self.rest,
                    error=value.getErrorMessage(),
                )
            self._resting[n] = now + self.rest
        known = [value for ok, value in answers if ok and value is not None]
        if not known:
            self.idle = None
            if not self._told_unknown:
                self._told_unknown = True
                log.info("no user idle time is available on this host (no logind, X display or terminal)")
            return False, "no user idle time available"
        self.idle = min(known)
        if self.idle < self.min_idle:
            return True, f"a person used the desk {duration_in_words(self.idle)} ago"
        return False, f"nobody used the desk for {duration_in_words(self.idle)}"


# -- what the host or an operator says -----------------------------------------


class SignalFile(Source):
    """A file the host writes for a worker inside a VM: its first word ``busy`` or ``idle``, then a reason.

    A missing file reads busy: the host has not said idle (its shared folder
    may be unmounted, its script gone), and a guest takes no work on a desk
    it cannot see. Anything else is an error, logged, and read as idle by
    the watch until the file is right.
    """

    settles = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = f"signal file {self.path}"

    def check(self) -> Reading:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return True, f"{self.path} is missing: the host has not said idle"
        word, _, rest = text.strip().partition(" ")
        said = f" ({rest.strip()[:200]})" if rest.strip() else ""
        if word.lower() == "busy":
            return True, f"the host says busy{said}"
        if word.lower() == "idle":
            return False, f"the host says idle{said}"
        raise ValueError(f"{self.path} should start with busy or idle, not {text[:40]!r}")


class Signal(Source):
    """Set from outside: the server's ``HOST`` notification (``gridctl worker busy|idle``), or a caller's."""

    settles = False
    name = "the operator's signal"

    def __init__(self):
        self.busy = False
        self.words = "no operator asked for the desk"
        self._watchers: list[Callable[[], object]] = []

    def set(self, busy: bool, reason: str = "") -> None:
        if busy:
            self.words = f"an operator asked for the desk ({reason})" if reason else "an operator asked for the desk"
        else:
            self.words = "the operator gave the desk back"
        self.busy = busy
        for changed in list(self._watchers):
            changed()

    def check(self) -> Reading:
        return self.busy, self.words

    def watch(self, changed: Callable[[], object]) -> None:
        self._watchers.append(changed)

    def unwatch(self, changed: Callable[[], object]) -> None:
        if changed in self._watchers:
            self._watchers.remove(changed)


# -- the watch -------------------------------------------------------------------


class _Seen:
    """What the watch knows of one source."""

    def __init__(self, source):
        self.source = source
        self.settles = getattr(source, "settles", True)
        self.busy = False
        self.words = ""
        self.idle_since: float | None = None  # a measured source: since when it has read idle without a break
        self.asking: defer.Deferred | None = None
        self.failing = False


class HostWatch(service.Service):
    """Polls ``sources`` every ``interval`` seconds and calls ``on_change(busy, reason)`` (module docstring).

    ``busy`` and ``reason`` hold the host's state; it starts as ``busy``
    (True: "the host has not been watched yet") unless told otherwise.
    """

    def __init__(
        self,
        clock,
        sources: Iterable,
        on_change: Callable[[bool, str], object],
        *,
        interval: float = 5.0,
        idle_after: float = 60.0,
        timeout: float = 10.0,
        busy: bool = True,
        reason: str = "the host has not been watched yet",
    ):
        self.clock = clock
        self.seen = [_Seen(source) for source in sources]
        self.on_change = on_change
        self.interval = interval
        self.idle_after = idle_after
        self.timeout = timeout
        self.busy = busy
        self.reason = reason if busy else ""
        self._loop: task.LoopingCall | None = None

    @property
    def sources(self) -> list:
        return [seen.source for seen in self.seen]

    def startService(self):
        super().startService()
        for seen in self.seen:
            seen.source.watch(self._changed_by_itself(seen))
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for seen in self.seen:
            seen.source.unwatch(self._changed_by_itself(seen))
            asking, seen.asking = seen.asking, None
            if asking is not None:
                asking.cancel()

    def _changed_by_itself(self, seen: _Seen):
        # One bound callable per source, equal each time it is made, so that unwatch finds it.
        return _Changed(self, seen)

    def poll(self) -> None:
        """Ask every source not still answering, then judge."""
        for seen in self.seen:
            if seen.asking is None:
                self._ask(seen)
        self._judge()

    def _ask(self, seen: _Seen) -> None:
        d = defer.maybeDeferred(seen.source.check)
        if d.called:  # answered at once: no timer to keep
            d.addBoth(self._answered, seen)
            return
        seen.asking = d
        d.addTimeout(self.timeout, self.clock)
        d.addBoth(self._answered, seen)
        d.addCallback(lambda _: self._judge() if self.running else None)

    def _answered(self, result, seen: _Seen) -> None:
        seen.asking = None
        if not self.running:
            return  # stopped (and so cancelled) meanwhile
        now = self.clock.seconds()
        if not isinstance(result, Failure) and not (isinstance(result, tuple) and len(result) == 2):
            result = Failure(TypeError(f"gave {result!r}, not a reading (busy, words)"))
        if isinstance(result, Failure):
            if not seen.failing:
                seen.failing = True
                log.warn(
                    "{source} cannot tell, read as idle until it can: {error}",
                    source=seen.source,
                    error=result.getErrorMessage() or result.type.__name__,
                )
            busy, words = False, f"{seen.source} cannot tell"
        else:
            if seen.failing:
                seen.failing = False
                log.info("{source} answers again", source=seen.source)
            busy, words = result
        seen.busy, seen.words = bool(busy), words
        if seen.busy:
            seen.idle_since = None
        elif seen.idle_since is None:
            seen.idle_since = now

    def _judge(self) -> None:
        busy = [seen for seen in self.seen if seen.busy]
        if busy:
            self.reason = "; ".join(seen.words for seen in busy)
            self._set(True)
            return
        now = self.clock.seconds()
        settled = all(
            seen.idle_since is not None and (not seen.settles or now - seen.idle_since >= self.idle_after)
            for seen in self.seen
        )
        if settled:
            self._set(False)

    def _set(self, busy: bool) -> None:
        if busy == self.busy:
            return
        self.busy = busy
        if not busy:
            self.reason = ""
        log.info("host {state}{why}", state="busy" if busy else "idle", why=f": {self.reason}" if busy else "")
        try:
            self.on_change(busy, self.reason)
        except Exception:
            log.failure("acting on the host's change failed")

    def changed(self, seen: _Seen) -> None:
        """A source changed by itself: read it now and judge, without waiting for the next poll."""
        if seen.asking is None:
            self._ask(seen)
        self._judge()


@dataclass(frozen=True, eq=True)
class _Changed:
    watch: HostWatch
    seen: _Seen

    def __call__(self) -> None:
        self.watch.changed(self.seen)
