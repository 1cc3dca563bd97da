"""Did this process, or its host, just come back from a suspend?

:class:`SuspendWatch` takes one turn every ``interval`` seconds on the
reactor's clock and compares three clocks with their readings at its last
turn:

- ``CLOCK_MONOTONIC`` stops while the host is suspended (a laptop lid, a
  suspend to RAM or disk); ``CLOCK_BOOTTIME`` does not. Their two steps
  differing by more than ``threshold`` seconds means the host slept for
  that long: *"the host was suspended for 2 h 03 min"*.
- A turn that comes more than ``threshold`` seconds after it was due, by
  ``CLOCK_MONOTONIC``, means this process did not run: it was stopped
  (SIGSTOP), its VM was paused, or it was starved of CPU. Neither clock
  stops for these, so lateness is the only sign: *"this process did not run
  for 40 s (stopped, paused or starved)"*.
- The wall clock moving more than ``threshold`` seconds away from
  ``CLOCK_BOOTTIME`` is a step of the wall clock: a VM restored from a
  saved state whose clock was then set, or a time daemon's step. The
  reactor's timers run on the wall clock, so a step forward fires every
  pending timer early and a step back holds every timer (this watch's
  included) until the wall clock has caught up: *"the wall clock jumped
  forward by 3 h 10 min"*, *"the wall clock was set back by 5 min: the
  reactor's timers waited for it"*. Its turn after a step back is late by
  the step; that lateness is the step's, not a stop's.

Each event calls ``on_resume(gap_seconds, how)`` once, on the first turn
after it, with the causes seen in that turn in words (most often one) and
``gap_seconds`` the time they account for: what this process missed, or by
how far its timers were thrown. Turns after it compare with that turn, so
one event is never reported twice. A worker away for longer than its
server's heartbeat deadline has lost its leases, so given ``deadline`` (the
deadline now, asked at each turn) the watch keeps ``threshold`` (default
3 s) below half of it and its turns (``interval``, default 1 s) at most a
quarter of it apart: a stop as long as the deadline is late by at least
three quarters of it, and always noticed.

:func:`duration_in_words` writes a duration the way these messages do.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

__all__ = ["SuspendWatch", "boottime", "duration_in_words"]

log = Logger()


def boottime() -> float:
    """``CLOCK_BOOTTIME`` in seconds: like ``time.monotonic()``, but it goes on while the host sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def duration_in_words(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``7 min 05 s``, ``2 h 03 min``."""
    seconds = abs(seconds)
    if seconds < 10:
        return f"{seconds:.1f}".rstrip("0").rstrip(".") + " s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s" if rest else f"{minutes} min"
    hours, rest = divmod(round(seconds / 60), 60)
    return f"{hours} h {rest:02d} min"


class SuspendWatch(service.Service):
    """Call ``on_resume(gap_seconds, how)`` once after each suspend, stop or clock step (module docstring).

    ``clock`` is the reactor (or a ``task.Clock``); ``monotonic``,
    ``boottime`` and ``wall`` read the three clocks (the wall clock is the
    reactor's own by default: ``clock.seconds``). Start with ``start()`` or
    as a service; ``events`` counts the events reported.
    """

    def __init__(
        self,
        clock,
        on_resume: Callable[[float, str], object],
        *,
        interval: float = 1.0,
        threshold: float = 3.0,
        deadline: Callable[[], float] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        boottime: Callable[[], float] = boottime,
        wall: Callable[[], float] | None = None,
    ):
        self.clock = clock
        self.on_resume = on_resume
        self.interval = interval
        self._threshold = threshold
        self._deadline = deadline
        self._monotonic = monotonic
        self._boottime = boottime
        self._wall = wall if wall is not None else clock.seconds
        self._last: tuple[float, float, float] | None = None
        self._loop: task.LoopingCall | None = None
        self.events = 0

    @property
    def threshold(self) -> float:
        """Seconds of lateness or of a clock gap that make an event."""
        if self._deadline is None:
            return self._threshold
        return min(self._threshold, self._deadline() / 2)

    @property
    def turn_interval(self) -> float:
        """Seconds between two turns."""
        if self._deadline is None:
            return self.interval
        return min(self.interval, self._deadline() / 4)

    def start(self) -> None:
        if self._loop is not None:
            return
        self._last = None
        self._loop = task.LoopingCall(self._turn)
        self._loop.clock = self.clock
        self._loop.start(self.turn_interval, now=True)

    def stop(self) -> None:
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def startService(self):
        super().startService()
        self.start()

    def stopService(self):
        self.stop()
        return super().stopService()

    def _turn(self) -> None:
        now = (self._monotonic(), self._boottime(), self._wall())
        last, self._last = self._last, now
        if last is None:
            return
        interval, self._loop.interval = self._loop.interval, self.turn_interval  # this turn's; the next one's
        gap, how = self.judge(now[0] - last[0], now[1] - last[1], now[2] - last[2], interval)
        if how is None:
            return
        self.events += 1
        try:
            self.on_resume(gap, how)
        except Exception:
            log.failure("on_resume failed after: {how}", how=how)

    def judge(
        self, monotonic: float, boottime: float, wall: float, interval: float | None = None
    ) -> tuple[float, str | None]:
        """What the clocks' steps since the last turn ``interval`` seconds ago say: (seconds accounted for, causes)."""
        threshold = self.threshold
        slept = boottime - monotonic
        stepped = wall - boottime
        late = monotonic - (self.interval if interval is None else interval)
        causes, gap = [], 0.0
        if slept > threshold:
            causes.append(f"the host was suspended for {duration_in_words(slept)}")
            gap += slept
        if stepped < -threshold:
            # The reactor's timers waited for the wall clock: so much of the lateness is the step's.
            causes.append(
                f"the wall clock was set back by {duration_in_words(stepped)}: the reactor's timers waited for it"
            )
            gap += -stepped
            late += stepped
        elif stepped > threshold:
            causes.append(f"the wall clock jumped forward by {duration_in_words(stepped)}")
            gap += stepped
        if late > threshold:
            causes.append(f"this process did not run for {duration_in_words(late)} (stopped, paused or starved)")
            gap += late
        return gap, ("; ".join(causes) if causes else None)
