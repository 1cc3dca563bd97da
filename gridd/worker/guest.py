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
  accepted result. The worker stays ``busy`` until the host is idle. A
  paused job's run-time limit keeps counting (the server's too), so the
  jobs are vacated sooner when one of them would pass its limit within the
  grace: a pause never turns into a failure that counts against the job.
- After a suspend of the worker or its host, the worker pauses its jobs,
  sends nothing, and asks the server which leases are still its own
  (``CHECK``); it drops the others and resumes the rest
  (:meth:`gridd.worker.core.WorkerCore.check_leases`).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gridd.worker.core import WorkerCore
from gridd.worker.idle import HostWatch, OtherProcessesCPU, Signal, SignalFile, UserIdleTime
from gridd.worker.suspend import SuspendWatch

__all__ = ["GRACE", "Guest", "GuestOptions", "GuestService"]

#: Seconds running jobs stay paused on a busy host before they are vacated.
GRACE = 600.0
#: A paused job is vacated this long (at most a tenth of its run-time limit) before its limit would pass.
VACATE_MARGIN = 10.0


@dataclass(frozen=True)
class GuestOptions:
    """How the worker watches its host (``twistd gridworker --when-idle`` and the options after it).

    Without ``when_idle`` the host counts as idle, but for the operator's
    signal (``gridctl worker busy|idle``), which always works.
    """

    when_idle: bool = False
    #: The host is busy while other processes use more than this share of its CPU; 1.0 or more: not measured.
    cpu_threshold: float = 0.25
    #: ... or while a person used the desk within this many seconds; 0: not measured.
    user_idle: float = 300.0
    #: ... or while this file says busy (a worker inside a VM).
    signal_file: str | None = None
    #: Every measured source must read idle this long, without a break, before the host is idle.
    idle_after: float = 60.0
    #: Seconds between two readings of the sources.
    poll: float = 5.0
    #: Seconds running jobs stay paused on a busy host before they are vacated.
    grace: float = GRACE
    #: A turn of the reactor this many seconds late, or a clock gap as large, is a suspend
    #: (or half the silence the server allows, its deadline less a beat, when that is less: ``SuspendWatch``).
    suspend_threshold: float = 3.0


class Guest:
    """Turns the host's state (from ``gridd.worker.idle``) and suspends (``gridd.worker.suspend``) into the core's."""

    log = Logger()

    def __init__(self, clock: IReactorTime, core: WorkerCore, *, grace: float = GRACE):
        self.clock = clock
        self.core = core
        self.grace = grace
        self._grace_call = None
        self._busy_since = 0.0

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
        wait = self._vacate_in()
        self.log.info(
            "host busy ({reason}): {n} jobs paused; vacated in {wait:g} s{why} unless the host is idle again",
            reason=reason,
            n=len(self.core.holdings),
            wait=round(wait, 1),
            why="" if wait == self.grace else ", before a run-time limit passes",
        )
        self.core.pause("host")
        self.core.set_host_state("vacating", reason)
        self._busy_since = self.clock.seconds()
        self._grace_call = self.clock.callLater(wait, self._vacate)

    def _vacate_in(self) -> float:
        """Seconds until the paused jobs are vacated: the grace, or less if a run-time limit would pass first."""
        now = self.clock.seconds()
        soonest = min(
            holding.limit_left(now) - min(VACATE_MARGIN, holding.assignment.timeout / 10)
            for holding in self.core.holdings.values()
        )
        return max(0.0, min(self.grace, soonest))

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
        waited = self.clock.seconds() - self._busy_since
        self.log.info(
            "host busy for {waited:g} s ({reason}): vacating {n} jobs", waited=round(waited, 1), reason=reason,
            n=len(self.core.holdings),
        )  # fmt: skip
        self.core.vacate(f"vacated: the host was busy for {round(waited, 1):g} s ({reason})")
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


class GuestService(MultiService):
    """The worker's eyes on its host: a :class:`HostWatch` and a :class:`SuspendWatch` feeding one :class:`Guest`.

    ::

        GuestService "guest"
         ├── HostWatch "host"        the sources of ``options``, and the operator's signal (HOST)
         └── SuspendWatch "suspend"  suspends, stops and clock steps

    Started before the connection, so that a ``--when-idle`` worker's first
    HELLO already says it is busy: its host has not been watched yet.
    """

    log = Logger()

    def __init__(self, clock, core: WorkerCore, options: GuestOptions = GuestOptions()):
        super().__init__()
        self.setName("guest")
        self.options = options
        self.core = core
        self.guest = Guest(clock, core, grace=options.grace)
        self.signal = Signal()
        core.on_host_signal = self.signal.set
        sources = []
        if options.when_idle:
            if options.cpu_threshold < 1.0:
                sources.append(OtherProcessesCPU(options.cpu_threshold))
            if options.user_idle > 0:
                sources.append(UserIdleTime(clock, options.user_idle))
            if options.signal_file:
                sources.append(SignalFile(options.signal_file))
        sources.append(self.signal)
        self.host = HostWatch(
            clock, sources, self.guest.host_changed, interval=options.poll, idle_after=options.idle_after,
            busy=options.when_idle,
        )  # fmt: skip
        self.host.setName("host")
        self.host.setServiceParent(self)
        # A worker unheard for its server's deadline (from its last beat) has lost its leases: notice before that.
        self.suspend = SuspendWatch(
            clock, self.guest.resumed, threshold=options.suspend_threshold, deadline=lambda: core.silence_allowed
        )
        self.suspend.setName("suspend")
        self.suspend.setServiceParent(self)

    def startService(self):
        if self.host.busy:
            self.guest.host_changed(True, self.host.reason)
        super().startService()
        if self.options.when_idle:
            self.log.info(
                "working only while the host is idle: {sources}; idle after {after:g} s; vacating after {grace:g} s",
                sources=", ".join(str(source) for source in self.host.sources),
                after=self.options.idle_after,
                grace=self.options.grace,
            )

    def stopService(self):
        self.guest.stop()
        return super().stopService()
