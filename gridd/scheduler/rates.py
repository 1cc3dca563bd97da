"""Counts over time, and failures that recur on a timer said once.

Rules this module owns:

- Rates are counted into fixed slots of the clock and kept for a bounded
  time; nothing is scheduled on the clock for them.
- A failure that recurs on every beat or sync (a store out of reach) is said
  once, then once a minute with a count, then its end: an hour's outage is a
  handful of lines, the first of which says why.
"""

from __future__ import annotations

from collections import Counter, deque

from twisted.logger import Logger

__all__ = ["Complaint", "RateCounter"]

log = Logger()


class RateCounter:
    """Events by kind in fixed time slots on a clock, for "how many per minute lately".

    ``add`` counts into the slot the clock is in; ``total`` sums the slots
    that began within the last ``seconds``. Slots older than ``keep`` seconds
    are dropped as new ones start, so memory is bounded and nothing is
    scheduled on the clock.
    """

    def __init__(self, clock, *, slot: float = 10.0, keep: float = 900.0):
        self.clock = clock
        self.slot = slot
        self.keep = keep
        #: (slot number, Counter of kinds), oldest first.
        self._slots: deque[tuple[int, Counter]] = deque()

    def add(self, kind: str, n: int = 1):
        current = int(self.clock.seconds() // self.slot)
        if not self._slots or self._slots[-1][0] != current:
            self._slots.append((current, Counter()))
            oldest = current - int(self.keep // self.slot)
            while self._slots[0][0] <= oldest:
                self._slots.popleft()
        self._slots[-1][1][kind] += n

    def total(self, kind: str, seconds: float) -> int:
        """Events of ``kind`` in the slots that began within the last ``seconds``."""
        first = int(self.clock.seconds() // self.slot) - int(seconds // self.slot) + 1
        return sum(counts[kind] for number, counts in self._slots if number >= first)


class Complaint:
    """A failure that recurs on a timer (a store out of reach), said once, then every ``every`` seconds, then its end.

    An outage of an hour would otherwise log a line every beat and every
    sync: thousands of lines that bury the one that says why.
    """

    def __init__(self, clock, what: str, every: float = 60.0):
        self.clock = clock
        self.what = what
        self.every = every
        self.since: float | None = None
        self._said = 0.0
        self._tries = 0

    def failed(self, error: BaseException, retry: float):
        now = self.clock.seconds()
        self._tries += 1
        if self.since is None:
            self.since = self._said = now
            log.warn("{what} failed ({e}); trying again every {r:g} s", what=self.what, e=error, r=retry)
        elif now - self._said >= self.every:
            self._said = now
            log.warn(
                "{what} still failing after {s:.0f} s ({n} tries; last: {e})",
                what=self.what,
                s=now - self.since,
                n=self._tries,
                e=error,
            )

    def ok(self):
        if self.since is not None:
            log.info(
                "{what} works again after {s:.1f} s ({n} failed tries)",
                what=self.what,
                s=self.clock.seconds() - self.since,
                n=self._tries,
            )
            self.since, self._tries = None, 0
