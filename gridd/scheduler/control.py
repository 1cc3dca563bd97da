"""Operators' control: pause, resume, cancel and requeue jobs; drain and disconnect workers; the stop switch.

Rules this module owns:

- A running job's change ends its lease (the worker is told at once) and
  does not use the lease's attempt; a requeue also sets the attempts back
  to 0. A job closing (its DONE, FAIL or RETURN being committed) cannot be
  changed until that write has answered.
- A resting job's change is decided by the store, which sees the commits in
  order: until it has answered, the job is held out of the run queue, so a
  slot freed meanwhile does not hand it out under the change.
- A job running under another server's lease (several servers on one
  store) is changed by ending that lease in the store; its server revokes
  it from its worker at its next sync.
- A change answered "commit unknown" may or may not have been made: this
  server's copy of the job is dropped, and the store's view comes back at
  the next sync or with the next change.
- A worker's flags (``gridd.scheduler.poison``) are cleared by name, connected
  or not. Drained workers keep their leases and get no new jobs; a disconnected
  worker's leases go back to the queue without using an attempt. With
  dispatching stopped, no job is handed out at all.
- An operator's word on a worker's host (busy or idle: the host-side signal
  of a worker in a VM, which cannot see the desk) is relayed to the worker,
  which answers with its state; the server itself gives the word no other
  effect. It is remembered by worker name (at most ``HOST_SETTINGS_KEPT``
  names, the oldest forgotten) and relayed again after that worker's next
  HELLO, so a worker that was not connected, or reconnects, still hears it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from gridd import errors
from gridd.scheduler.model import LeaseState

if TYPE_CHECKING:
    from gridd.scheduler.dispatcher import Dispatcher

__all__ = ["Control"]

log = Logger()

#: The reason a lease ended, by the state an operator's change sends its job to.
REASONS = {"cancelled": "cancelled", "paused": "paused", "queued": "requeued"}
#: How many workers' host settings (WORKER busy|idle) are remembered at most.
HOST_SETTINGS_KEPT = 10_000
#: The reason a host setting gives when the operator gave none.
HOST_REASON = "said by an operator"


class Control:
    """Operators' changes of jobs and workers."""

    def __init__(self, core: Dispatcher):
        self.core = core
        #: What operators last said of each worker's host, by name: (busy, reason), oldest first.
        self.host_settings: dict[str, tuple[bool, str]] = {}

    async def cancel(self, job_id: int) -> dict:
        return await self._change(job_id, "cancelled", allowed=("queued", "running", "paused"))

    async def pause(self, job_id: int) -> dict:
        return await self._change(job_id, "paused", allowed=("queued", "running"))

    async def resume(self, job_id: int) -> dict:
        return await self._change(job_id, "queued", allowed=("paused",))

    async def requeue(self, job_id: int) -> dict:
        return await self._change(
            job_id, "queued", allowed=("running", "failed", "cancelled", "poison", "paused"), reset=True
        )

    async def worker_action(self, name: str, action: str, reason: str | None = None) -> dict:
        core = self.core
        worker = core.workers.by_name.get(name)
        if action in ("busy", "idle"):
            return self._host(name, action == "busy", reason or HOST_REASON, worker)
        if action == "clear" and (worker is not None or core.poison.barred(name)):
            return {"cleared": core.poison.clear(name)}  # flags outlive connections
        if worker is None:
            flagged = " or flagged" if action == "clear" else ""
            raise errors.UnknownWorker(f"no connected{flagged} worker {name!r}")
        log.info("worker {name}: {action} by operator", name=name, action=action)
        if action in ("drain", "undrain"):
            worker.drained = action == "drain"
            worker.conn.drain(worker.drained)
            if not worker.drained:
                core.dispatch()
        else:
            core.workers.gone(worker, "disconnected", count=False)
            worker.conn.drop("disconnected by an operator")
        return {}

    def _host(self, name: str, busy: bool, reason: str, worker) -> dict:
        """Remember what an operator says of ``name``'s host and relay it now if that worker is connected here."""
        settings = self.host_settings
        settings.pop(name, None)
        settings[name] = (busy, reason)
        while len(settings) > HOST_SETTINGS_KEPT:
            del settings[next(iter(settings))]
        log.info(
            "worker {name}: host {state} by operator ({reason}){later}",
            name=name,
            state="busy" if busy else "idle",
            reason=reason,
            later="" if worker is not None else "; not connected here, told at its next HELLO",
        )
        if worker is not None:
            worker.conn.host(busy, reason)
        return {"connected": worker is not None}

    async def set_dispatching(self, enabled: bool) -> dict:
        core = self.core
        if enabled != core.dispatching:
            log.info("dispatching {state} by operator", state="enabled" if enabled else "stopped")
        core.dispatching = enabled and not core.stopped
        core.dispatch()
        return {"dispatching": core.dispatching}

    async def _change(self, job_id: int, target: str, allowed: tuple, reset=False) -> dict:
        """Pause, resume, cancel or requeue: end a running lease, or change a resting job."""
        core = self.core
        reason = REASONS[target]
        job = core.jobs.get(job_id)
        if job is not None and job.lease is not None:
            if "running" not in allowed or job.lease.state is LeaseState.CLOSING:
                raise errors.InvalidState(f"job {job_id} is running", state="running")
            await core.leases.end_as_asked(job, reason, to=target, reset=reset, revoke=True)
            return {"state": target}
        if job is not None:
            job.changes += 1
            core.queue.discard(job)
        try:
            await self._change_resting(job_id, target, allowed, reason, reset)
        finally:
            if job is not None:
                job.changes -= 1
                if (
                    not job.changes
                    and core.jobs.get(job_id) is job
                    and job.state == "queued"
                    and job.lease is None
                    and job not in core.queue
                    and job.timer is None
                ):
                    core.make_runnable(job, core.clock.seconds())
                    core.dispatch()
        return {"state": target}

    async def _change_resting(self, job_id: int, target: str, allowed: tuple, reason: str, reset: bool):
        """The store decides a change of a job that holds no lease here; then memory follows."""
        core = self.core
        try:
            try:
                await core.store.set_state(
                    job_id,
                    tuple(s for s in allowed if s != "running"),
                    target,
                    core.clock.seconds(),
                    reason=reason,
                    reset_attempts=reset,
                )
            except errors.InvalidState as e:
                if e.extra.get("state") != "running" or "running" not in allowed:
                    raise
                # Running under another server's lease: end that lease in the
                # store; its server revokes it from its worker when it next syncs.
                token = (await core.store.get_job(job_id))["lease"]
                await core.store.end_lease(job_id, token, target, core.clock.seconds(), reason=reason)
        except errors.CommitUnknown:
            # Made or not, the copy here may be wrong either way (a RESUME
            # made would leave it paused here for good): forget it, and the
            # store's view comes back at the next sync, or with a change.
            current = core.jobs.get(job_id)
            if current is not None and current.lease is None:
                core.forget(current)
            raise
        current = core.jobs.get(job_id)  # the world moved while we waited
        if current is None:
            await core.reload(job_id)  # a terminal job came back (requeue)
        elif current.lease is not None:
            # It came into memory (its SUBMIT's reply) and was handed out
            # after this change committed: the claim, committed after the
            # change, decides (it is refused with the job's state).
            pass
        else:
            core.queue.discard(current)
            core.cancel_timer(current)
            if reset:
                current.attempts = 0
            current.not_before = None
            core.enter(current, target, None)
