"""A deadline judged on what was read, not on what the clock says (PROTOCOL.md section 5).

Twisted runs the timers that are due before it reads the sockets. So a
process that was stalled (its host suspended, starved of CPU, swapping)
past a peer's deadline would, on waking, judge the peer silent although
the peer's lines are waiting unread. :class:`Deadline` guards the verdict
twice:

- a timer that ran more than ``STALL_FRACTION`` of a beat late shows the
  judge itself was stalled: the peer gets one more beat, once;
- the verdict waits one turn of the reactor (``callLater(0)`` runs after
  the next poll of the sockets), so what has already arrived is read
  first; any line then moves the deadline on as usual.

A peer that stays silent is judged at most one beat and one reactor turn
late, however often the judge stalls.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Deadline", "STALL_FRACTION"]

#: A deadline timer that runs more than this fraction of a beat late shows
#: that the side judging was itself stalled (PROTOCOL.md 5).
STALL_FRACTION = 0.25


class Deadline:
    """Call ``on_expired`` once nothing has moved this deadline for ``seconds``.

    ``touch()`` moves it on (a line arrived); ``cancel()`` stops it.
    ``on_stall(late)`` is told when a stall put the verdict off.
    """

    def __init__(
        self,
        clock,
        seconds: float,
        beat: float,
        on_expired: Callable[[], object],
        on_stall: Callable[[float], object] | None = None,
    ):
        self.clock = clock
        self.seconds = seconds
        self.beat = beat
        self._on_expired = on_expired
        self._on_stall = on_stall
        #: "due": waiting out ``seconds``; "extended": the extra beat after a
        #: stall; "verdict": one reactor turn before the verdict.
        self._phase = "due"
        self._call = clock.callLater(seconds, self._fired)

    def touch(self) -> None:
        """Something arrived: the full deadline again, from now."""
        if self._call.active():
            self._phase = "due"
            self._call.reset(self.seconds)

    def active(self) -> bool:
        return self._call.active()

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()

    def _fired(self) -> None:
        if self._phase == "due":
            late = self.clock.seconds() - self._call.getTime()
            if late > self.beat * STALL_FRACTION:
                self._phase = "extended"
                if self._on_stall is not None:
                    self._on_stall(late)
                self._call = self.clock.callLater(self.beat, self._fired)
                return
        if self._phase != "verdict":
            self._phase = "verdict"
            self._call = self.clock.callLater(0, self._fired)
            return
        self._on_expired()
