"""The worker as a guest on its host: step aside while a person uses the desk, check leases after a suspend.

Rules this module owns (the worker's side of PROTOCOL.md's ``STATE``):

- **idle**: the host is free; the worker takes work.
- The host becomes busy: no new work at once (``STATE busy``, or
  ``vacating`` when jobs run). Running jobs are paused (their handler
  processes get SIGSTOP: they use no CPU, but keep their memory and their
  leases, and heartbeats go on).
- The host is idle again within ``grace`` seconds (default 600, like
  HTCondor's suspend-then-vacate): the jobs resume where they stopped.
- The host stays busy for ``grace`` seconds: the jobs are **vacated**, given
  back with ``RETURN`` and ``"vacate": true``; the server re-queues each at
  once for another worker, which resumes at the first record without an
  accepted result. The worker stays ``busy`` until the host is idle.
- After a suspend of the worker or its host, the worker pauses its jobs,
  sends nothing, and asks the server which leases are still its own
  (``CHECK``); it drops the others and resumes the rest
  (:meth:`gridd.worker.core.WorkerCore.check_leases`).
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gridd.worker.core import WorkerCore

__all__ = ["GRACE", "Guest"]

#: Seconds running jobs stay paused on a busy host before they are vacated.
GRACE = 600.0


class Guest:
    """Turns the host's state (from ``gridd.worker.idle``) and suspends (``gridd.worker.suspend``) into the core's."""

    log = Logger()

    def __init__(self, clock: IReactorTime, core: WorkerCore, *, grace: float = GRACE):
        self.clock = clock
        self.core = core
        self.grace = grace
        self._grace_call = None

    @property
    def state(self) -> str:
        return self.core.host_state

    # -- from the host watch ------------------------------------------------

    def host_changed(self, busy: bool, reason: str = "") -> None:
        """The host became busy (``reason`` says why) or idle again."""
        if busy:
            self._busy(reason)
        else:
            self._idle()

    def _busy(self, reason: str) -> None:
        if self.state != "idle":
            self.core.set_host_state(self.state, reason)  # still busy; the reason may have changed
            return
        if not self.core.holdings:
            self.log.info("host busy ({reason}): taking no work until it is idle", reason=reason)
            self.core.set_host_state("busy", reason)
            return
        self.log.info(
            "host busy ({reason}): {n} jobs paused; vacated in {grace:g} s unless the host is idle again",
            reason=reason,
            n=len(self.core.holdings),
            grace=self.grace,
        )
        self.core.pause("host")
        self.core.set_host_state("vacating", reason)
        self._grace_call = self.clock.callLater(self.grace, self._vacate)

    def _idle(self) -> None:
        if self.state == "idle":
            return
        self._cancel_grace()
        if self.state == "vacating":
            self.log.info("host idle again: {n} paused jobs resume", n=len(self.core.holdings))
        else:
            self.log.info("host idle again: taking work")
        self.core.resume("host")
        self.core.set_host_state("idle")

    def _vacate(self) -> None:
        self._grace_call = None
        reason = self.core.host_reason
        self.log.info(
            "host busy for {grace:g} s ({reason}): vacating {n} jobs", grace=self.grace, reason=reason,
            n=len(self.core.holdings),
        )  # fmt: skip
        self.core.vacate(f"vacated: the host was busy for {self.grace:g} s ({reason})")
        self.core.resume("host")  # nothing is left to pause; a job taken later must not start stopped
        self.core.set_host_state("busy", reason)

    # -- from the suspend watch ---------------------------------------------

    def resumed(self, gap: float, how: str) -> None:
        """The worker or its host was suspended for ``gap`` seconds and runs again."""
        self.core.check_leases(how)

    # -- stopping -----------------------------------------------------------

    def stop(self) -> None:
        self._cancel_grace()

    def _cancel_grace(self) -> None:
        if self._grace_call is not None and self._grace_call.active():
            self._grace_call.cancel()
        self._grace_call = None
