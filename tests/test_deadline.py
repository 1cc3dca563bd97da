"""gridd.deadline: a deadline judged on what was read (PROTOCOL.md 5), on a clock that turns like the reactor."""

from __future__ import annotations

from twisted.internet import task

from gridd.deadline import Deadline


class TurnClock(task.Clock):
    """A ``task.Clock`` that, like the reactor, runs a call scheduled during a turn only at the next turn.

    (``task.Clock.advance`` would run a ``callLater(0)`` made by a due call
    in the same step; the reactor polls the sockets first.) Each
    ``advance`` is one turn: the calls due when it starts, then nothing
    else. What a test does between two turns is what the poll read.
    """

    def advance(self, amount):
        self.rightNow += amount
        self._sortCalls()
        for call in [c for c in self.calls if c.getTime() <= self.rightNow]:
            if call not in self.calls or call.getTime() > self.rightNow:
                continue  # cancelled or moved on by an earlier call of this turn
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def deadline(clock, seconds=6.0, beat=2.0):
    expired, stalls = [], []
    d = Deadline(clock, seconds, beat, lambda: expired.append(clock.seconds()), stalls.append)
    return d, expired, stalls


def test_deadline_passed_on_time_waits_one_turn_for_what_was_read():
    """Due on time, the verdict waits one turn: a line read in that poll keeps the peer."""
    clock = TurnClock()
    d, expired, _ = deadline(clock)
    clock.advance(6.0)  # due; the verdict is for the next turn
    assert expired == []
    d.touch()  # the line the poll read
    clock.advance(0)
    assert expired == []
    clock.advance(5.9)
    assert expired == []
    clock.advance(0.1)
    clock.advance(0)
    assert expired == [12.0]


def test_deadline_with_nothing_read_expires_the_turn_after_it_is_due():
    clock = TurnClock()
    _, expired, stalls = deadline(clock)
    clock.advance(6.0)
    clock.advance(0)
    assert expired == [6.0] and stalls == []


def test_deadline_a_little_late_still_waits_the_turn():
    """A stall that ends just after the deadline (less than a quarter beat late) is covered by the turn."""
    clock = TurnClock()
    d, expired, stalls = deadline(clock)
    clock.advance(6.3)  # 0.3 s late: not a stall by the rule
    assert stalls == [] and expired == []
    d.touch()
    clock.advance(0)
    assert expired == []


def test_deadline_judged_late_gives_one_beat_once():
    """A timer more than a quarter beat late: one more beat; a judge that stalls again gets no more."""
    clock = TurnClock()
    _, expired, stalls = deadline(clock)
    clock.advance(10.0)  # 4 s late
    assert stalls == [4.0] and expired == []
    clock.advance(3.0)  # the extra beat, itself run 1 s late: no second extension
    assert expired == []
    clock.advance(0)
    assert expired == [13.0] and stalls == [4.0]


def test_deadline_touch_after_a_stall_starts_a_full_deadline():
    clock = TurnClock()
    d, expired, stalls = deadline(clock)
    clock.advance(10.0)
    d.touch()
    clock.advance(5.9)
    assert expired == []
    clock.advance(0.1)
    clock.advance(0)
    assert expired == [16.0] and stalls == [4.0]


def test_deadline_cancelled_never_expires():
    clock = TurnClock()
    d, expired, _ = deadline(clock)
    clock.advance(6.0)
    d.cancel()
    clock.advance(0)
    clock.advance(60)
    assert expired == [] and not d.active()
