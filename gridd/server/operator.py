"""The operator's console object, ``grid`` in the SSH manhole.

``Operator`` is a thin, curated face on the dispatcher and the store for a
person at a prompt: every method answers with a short table (a ``Report``,
whose repr is the text and whose ``data`` is the plain values behind it), and
every action is logged through ``twisted.logger`` with who took it. It calls
the dispatcher's own request methods, the same ones the wire protocol's
clients use, so an action taken here follows exactly the rules an action
taken with ``gridctl`` does.

It knows nothing of SSH: ``gridd.server.manhole`` builds one per session,
and the tests drive one on a ``task.Clock`` and the memory store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from gridd import errors
from gridd.scheduler.connection import JobStatus
from gridd.scheduler.inprocess import InProcessConnection
from gridd.store.base import JOB_STATES, TERMINAL_STATES

__all__ = ["Operator", "Report"]

log = Logger()

#: What ``overview`` shows rates of, and the windows (minutes) it shows them over.
RATE_KINDS = ("submitted", "records", "done", "failed", "cancelled")
RATE_WINDOWS = (1, 5, 15)


class Report:
    """An operator call's answer: text for people (its repr) and the data behind it.

    ``report.data`` holds plain values (dicts, lists, numbers); ``report[key]``
    is short for ``report.data[key]``.
    """

    def __init__(self, text: str, data=None):
        self.text = text
        self.data = data

    def __repr__(self) -> str:
        return self.text

    def __getitem__(self, key):
        return self.data[key]


class Operator:
    """gridd's operator console: look inside the running server, and act on it.

    Every method returns a Deferred. At the manhole prompt the prompt waits
    until it fires and shows the result (Ctrl-C stops waiting; the result is
    then shown when it arrives). The last result is ``_``; its plain data is
    ``_.data``, e.g. ``_.data["jobs"]["queued"]``.

    Looking:
      grid.overview()            jobs by state, queue depth by type and priority,
                                 workers, and rates over the last 1, 5, 15 minutes
      grid.workers()             connected workers: slots, running jobs, last
                                 heartbeat, handler versions, address, and the
                                 job types each is flagged for (and why)
      grid.jobs(state=None, type=None, after=0, limit=20)
                                 jobs by id, e.g. grid.jobs("failed")
      grid.job(17, records=20)   one job: each attempt's worker, outcome and error,
                                 its history, and its first ``records`` records
      grid.wait(17)              wait until job 17 is done, failed or cancelled
      grid.sessions()            who is logged in to this manhole

    Acting (each action is logged with your name, key and address):
      grid.pause(17)             keep job 17 from being dispatched (a running
                                 job's worker is told to stop)
      grid.resume(17)            let a paused job be dispatched again
      grid.cancel(17)            end job 17 for good
      grid.requeue(17)           queue job 17 again (running, paused, failed,
                                 cancelled or poison) with its attempts reset;
                                 accepted records are kept, the rest run again
      grid.drain("w1")           worker w1 finishes what it runs, gets nothing new
      grid.undrain("w1")         worker w1 gets work again
      grid.disconnect("w1")      drop w1's connection; its jobs are re-queued
                                 without using up an attempt
      grid.busy("w1")            tell w1 its host is busy (the host-side signal
                                 of a worker in a VM); it is told again after
                                 its next HELLO
      grid.idle("w1")            tell w1 its host is idle again
      grid.clear("w1")           lift w1's flags: it gets the job types it kept
                                 failing again (connected or not)
      grid.stop_dispatching()    the global stop switch: no worker gets a new job
                                 (running jobs go on)
      grid.start_dispatching()   dispatch again

    Raw objects, for deep debugging (no guard rails: you are inside the server):
      dispatcher, store, server, reactor.
      A coroutine (``dispatcher.stats()``) is run and its result shown like a
      Deferred's. Never block: a call that sleeps or waits for input stops the
      whole server while it waits.
    """

    def __init__(
        self,
        dispatcher,
        store,
        *,
        clock,
        who=None,
        sessions: Callable[[], Iterable] | None = None,
    ):
        self.dispatcher = dispatcher
        self.store = store
        self.clock = clock
        #: The logged-in person (``user``, ``fingerprint``, ``address``), for the log.
        self.who = who
        self._sessions = sessions
        #: Deferreds of ``wait`` still waiting, cancelled by ``close``.
        self._waits: set[defer.Deferred] = set()

    def __repr__(self) -> str:
        guide = type(self).__doc__.split("Looking:", 1)[1]
        return "grid: gridd's operator console (help(grid) for more)\nLooking:" + guide.rstrip()

    # ------------------------------------------------------------------
    # looking

    def overview(self) -> defer.Deferred:
        """Jobs by state (from the store), queue depth by type and priority, workers, rates.

        ``data["recent"][kind][m]`` counts the events of ``kind`` (jobs submitted,
        records accepted, jobs done, failed, cancelled) in the last ``m`` minutes;
        the text shows them per minute.
        """
        return defer.Deferred.fromCoroutine(self._overview())

    async def _overview(self) -> Report:
        stats = await self.dispatcher.stats()
        workers = (await self.dispatcher.workers_view())["workers"]
        depth = self.dispatcher.queue_depth()
        rates = {kind: {m: self.dispatcher.rates.total(kind, m * 60) for m in RATE_WINDOWS} for kind in RATE_KINDS}
        jobs = {state: stats["jobs"].get(state, 0) for state in JOB_STATES}
        drained = sum(1 for w in workers if w["drained"])
        data = {
            "dispatching": stats["dispatching"],
            "jobs": jobs,
            "queue": [{"type": t, "priority": p, "queued": n} for (t, p), n in depth.items()],
            "workers": {
                "connected": stats["workers"],
                "slots": stats["slots"],
                "busy": stats["busy"],
                "drained": drained,
            },
            "recent": rates,
        }
        lines = [
            "dispatching  " + ("on" if stats["dispatching"] else "OFF (grid.start_dispatching() turns it on)"),
            "jobs         " + "  ".join(f"{state} {jobs[state]:,}" for state in JOB_STATES),
            f"workers      {stats['workers']} connected  {stats['slots']} slots  {stats['busy']} busy"
            f"  {drained} drained",
            "",
        ]
        if depth:
            lines.append("queued by type and priority")
            rows = [(t, p, n) for (t, p), n in depth.items()]
            lines += _table(("type", "priority", "queued"), rows, indent="  ")
        else:
            lines.append("queued by type and priority: none")
        lines += ["", "per minute, over the last"]
        header = ("",) + tuple(f"{m} min" for m in RATE_WINDOWS)
        rows = [(kind,) + tuple(_per_minute(rates[kind][m], m) for m in RATE_WINDOWS) for kind in RATE_KINDS]
        lines += _table(header, rows, indent="  ")
        return Report("\n".join(lines), data)

    def workers(self) -> defer.Deferred:
        """Connected workers: slots, running jobs, last heartbeat, handler versions, address."""
        return defer.Deferred.fromCoroutine(self._workers())

    async def _workers(self) -> Report:
        workers = (await self.dispatcher.workers_view())["workers"]
        now = self.clock.seconds()
        rows = []
        flagged = []
        for w in sorted(workers, key=lambda w: w["name"]):
            rows.append(
                (
                    w["name"] + (" (drained)" if w["drained"] else ""),
                    w["state"] + (" (silent)" if w["silent"] else ""),
                    f"{len(w['running'])}/{w['slots']}",
                    _ids(w["running"]),
                    f"{max(0.0, now - w['last_seen']):.1f} s ago",
                    ", ".join(f"{t} {v}" for t, v in sorted(w["types"].items())),
                    ", ".join(f["type"] for f in w["flags"]) or "-",
                    w["address"],
                    w["agent"],
                )
            )
            flagged += [
                f"{w['name']} flagged for {f['type']} since {_clock_time(f['since'])}: {f['reason']}"
                for f in w["flags"]
            ]
        if not rows:
            return Report("no workers connected", [])
        headers = ("name", "state", "busy", "running jobs", "last beat", "handlers", "flagged", "address", "agent")
        lines = _table(headers, rows)
        if flagged:
            lines += ["", *flagged, 'grid.clear("NAME") gives a flagged worker those types again']
        return Report("\n".join(lines), workers)

    def jobs(self, state: str | None = None, type: str | None = None, after: int = 0, limit: int = 20):
        """Jobs with id > ``after``, by id, optionally only of one ``state`` and ``type``."""
        return defer.Deferred.fromCoroutine(self._jobs(state, type, after, limit))

    async def _jobs(self, state, type, after, limit) -> Report:
        if state is not None and state not in JOB_STATES:
            raise ValueError(f"state must be one of {', '.join(JOB_STATES)}")
        page = await self.dispatcher.list_jobs(state=state, type=type, after=after, limit=limit)
        rows = [
            (
                j["id"],
                j["name"] or "",
                j["type"],
                j["priority"],
                j["state"],
                f"{j['accepted']}/{j['total']}",
                j["attempts"],
                j["worker"] or "",
                _clock_time(j["updated"]),
            )
            for j in page["jobs"]
        ]
        if not rows:
            return Report("no such jobs", page["jobs"])
        lines = _table(("id", "name", "type", "prio", "state", "records", "attempts", "worker", "updated"), rows)
        if page["next"] is not None:
            lines.append(f"... more: grid.jobs({_args(state, type)}after={page['next']})")
        return Report("\n".join(lines), page["jobs"])

    def job(self, job_id: int, records: int = 20) -> defer.Deferred:
        """One job's full story: its leases and attempts, errors, and its first ``records`` records."""
        return defer.Deferred.fromCoroutine(self._job(job_id, records))

    async def _job(self, job_id: int, records: int) -> Report:
        view = (await self.dispatcher.show(job_id))["job"]
        shown = min(records, view["total"])
        results = (await self.dispatcher.results(job_id, limit=max(shown, 1)))["results"] if shown else []
        by_index = {r["i"]: r for r in results if r["i"] < shown}
        name = f" {view['name']!r}" if view["name"] else ""
        ok = view["accepted"] - view["failed_records"]
        # Records without a result wait for a worker, unless the job has ended.
        open_ = "pending" if view["state"] not in TERMINAL_STATES else "without a result"
        lines = [
            f"job {view['id']}{name}  {view['type']}  priority {view['priority']}  {view['state']}"
            f"  attempt {view['attempts']} of {1 + view['retries']}",
            f"records  {view['total']}: {ok} ok, {view['failed_records']} error,"
            f" {view['total'] - view['accepted']} {open_}",
        ]
        if view["lease"]:
            lines.append(f"running  on {view['worker']} under lease {view['lease']}")
        if view.get("note"):
            lines.append(f"note     {view['note']}")
        if view["not_before"]:
            lines.append(f"retry    not before {_clock_time(view['not_before'])}")
        if view["requires"]:
            lines.append(f"requires {_short(view['requires'], 100)}")
        if view.get("error"):
            lines.append(f"error    {view['error']}")
        lines.append(f"created  {_clock_time(view['created'])}, updated {_clock_time(view['updated'])}")
        if view.get("attempt_history"):
            lines += ["", "attempts"]
            rows = [
                (
                    a["attempt"],
                    a["worker"] or "",
                    _clock_time(a["start"], ms=True),
                    _clock_time(a["end"], ms=True) if a["end"] is not None else "",
                    a["outcome"] or "",
                    _short(a["error"], 60) if a["error"] is not None else "",
                )
                for a in view["attempt_history"]
            ]
            lines += _table(("attempt", "worker", "start", "end", "outcome", "error"), rows, indent="  ")
        lines += ["", "history"]
        rows = [
            (
                _clock_time(h["at"], ms=True),
                h["event"],
                h["attempt"] if h["attempt"] is not None else "",
                h["lease"] or "",
                h["worker"] or "",
                _event_detail(h),
            )
            for h in view["history"]
        ]
        lines += _table(("at", "event", "attempt", "lease", "worker", "detail"), rows, indent="  ")
        if shown:
            lines += ["", f"records {0}..{shown - 1} of {view['total']}" if shown < view["total"] else "records"]
            rows = []
            for i in range(shown):
                r = by_index.get(i)
                if r is None:
                    rows.append((i, "pending" if open_ == "pending" else "none", "", "", ""))
                elif "error" in r:
                    rows.append((i, "error", r["worker"] or "", r["lease"] or "", _short(r["error"], 60)))
                else:
                    rows.append((i, "ok", r["worker"] or "", r["lease"] or "", _short(r["out"], 60)))
            lines += _table(("#", "state", "worker", "lease", "output or error"), rows, indent="  ")
            if shown < view["total"]:
                lines.append(f"  ... grid.job({job_id}, records={view['total']}) shows them all")
        view["records"] = [by_index.get(i) for i in range(shown)]
        return Report("\n".join(lines), view)

    def wait(self, job_id: int) -> defer.Deferred:
        """Fire when job ``job_id`` is done, failed or cancelled; cancel the Deferred to stop waiting."""
        watcher = _Watcher(job_id)
        d = defer.Deferred()
        watcher.finished = d

        def forget(result):
            self._waits.discard(d)
            # The dispatcher forgets the watch on the next turn: this may run while it
            # walks its watchers to send the very event that ended the wait.
            self.clock.callLater(0, self.dispatcher.connection_lost, watcher)
            return result

        d.addBoth(forget)
        self._waits.add(d)

        def started(reply):
            if d.called:  # cancelled while the watch was being set up: undo it
                self.dispatcher.connection_lost(watcher)
                return
            for view in reply["jobs"]:
                watcher.tell(JobStatus(view["job"], view["state"], view["accepted"], view["total"]))

        def refused(failure):
            if not d.called:
                d.errback(failure)

        defer.Deferred.fromCoroutine(self.dispatcher.watch(watcher, [job_id])).addCallbacks(started, refused)
        return d.addCallback(lambda s: Report(f"job {s['job']} {s['state']}: {s['accepted']}/{s['total']} records", s))

    def sessions(self) -> defer.Deferred:
        """Who is logged in to this manhole: user, key fingerprint, address, since when."""
        logins = list(self._sessions()) if self._sessions is not None else []
        if not logins:
            return defer.succeed(Report("no manhole sessions", []))
        rows = [(s.user, s.fingerprint, s.address, _clock_time(s.since)) for s in logins]
        data = [{"user": s.user, "fingerprint": s.fingerprint, "address": s.address, "since": s.since} for s in logins]
        return defer.succeed(Report("\n".join(_table(("user", "key", "address", "since"), rows)), data))

    # ------------------------------------------------------------------
    # acting

    def pause(self, job_id: int) -> defer.Deferred:
        """Keep job ``job_id`` from being dispatched; a running job's worker is told to stop."""
        return self._act("pause", f"job {job_id}", self.dispatcher.pause, job_id)

    def resume(self, job_id: int) -> defer.Deferred:
        """Let a paused job be dispatched again."""
        return self._act("resume", f"job {job_id}", self.dispatcher.resume, job_id)

    def cancel(self, job_id: int) -> defer.Deferred:
        """End job ``job_id`` for good; a running job's worker is told to stop."""
        return self._act("cancel", f"job {job_id}", self.dispatcher.cancel, job_id)

    def requeue(self, job_id: int) -> defer.Deferred:
        """Queue job ``job_id`` again with its attempts reset; accepted records are kept."""
        return self._act("requeue", f"job {job_id}", self.dispatcher.requeue, job_id)

    def drain(self, name: str) -> defer.Deferred:
        """Worker ``name`` finishes the jobs it runs and is given no new one."""
        return self._act("drain", f"worker {name}", self.dispatcher.worker_action, name, "drain")

    def undrain(self, name: str) -> defer.Deferred:
        """Worker ``name`` is given work again."""
        return self._act("undrain", f"worker {name}", self.dispatcher.worker_action, name, "undrain")

    def disconnect(self, name: str) -> defer.Deferred:
        """Drop worker ``name``'s connection; its jobs go back to the queue without using an attempt."""
        return self._act("disconnect", f"worker {name}", self.dispatcher.worker_action, name, "disconnect")

    def busy(self, name: str, reason: str | None = None) -> defer.Deferred:
        """Tell worker ``name`` that its host is busy (HOST); remembered, and told again after its next HELLO."""
        return self._act("busy", f"worker {name}", self.dispatcher.worker_action, name, "busy", reason)

    def idle(self, name: str, reason: str | None = None) -> defer.Deferred:
        """Tell worker ``name`` that its host is idle again (HOST)."""
        return self._act("idle", f"worker {name}", self.dispatcher.worker_action, name, "idle", reason)
    def clear(self, name: str) -> defer.Deferred:
        """Lift worker ``name``'s flags: it is given the job types it kept failing again."""
        return self._act("clear", f"worker {name}", self.dispatcher.worker_action, name, "clear")

    def stop_dispatching(self) -> defer.Deferred:
        """The global stop switch: no worker is given a new job until start_dispatching()."""
        return self._act("stop dispatching", "all workers", self.dispatcher.set_dispatching, False)

    def start_dispatching(self) -> defer.Deferred:
        """Undo stop_dispatching(): runnable jobs go to free workers again."""
        return self._act("start dispatching", "all workers", self.dispatcher.set_dispatching, True)

    def _act(self, action: str, target: str, method, *args) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._acting(action, target, method, *args))

    async def _acting(self, action: str, target: str, method, *args) -> Report:
        who = _who(self.who)
        try:
            reply = await method(*args)
        except errors.GriddError as e:
            log.info(
                "manhole: {user} [{fingerprint}] from {address}: {action} {target} refused: {code}: {message}",
                action=action,
                target=target,
                code=e.code,
                message=e.message,
                **who,
            )
            raise
        outcome = _outcome(action, target, reply)
        log.info(
            "manhole: {user} [{fingerprint}] from {address}: {action} {target}: {outcome}",
            action=action,
            target=target,
            outcome=outcome,
            **who,
        )
        return Report(outcome, reply)

    # ------------------------------------------------------------------

    def close(self):
        """The session ended: stop every wait still running, so nothing is left behind."""
        for d in list(self._waits):
            d.cancel()


class _Watcher(InProcessConnection):
    """The scheduler's connection for ``Operator.wait``: job changes in, nothing out."""

    def __init__(self, job_id: int):
        super().__init__("manhole", on_status=self._changed)
        self.job_id = job_id
        self.finished: defer.Deferred | None = None

    def _changed(self, status: JobStatus):
        if status.job == self.job_id and status.state in TERMINAL_STATES:
            if self.finished is not None and not self.finished.called:
                self.finished.callback(status.view())


def _who(who) -> dict:
    return {
        "user": getattr(who, "user", "an operator"),
        "fingerprint": getattr(who, "fingerprint", "-"),
        "address": getattr(who, "address", "-"),
    }


def _outcome(action: str, target: str, reply: dict) -> str:
    if "dispatching" in reply:
        return "dispatching is " + ("on" if reply["dispatching"] else "OFF")
    if "state" in reply:
        return f"{target} is {reply['state']}"
    if "connected" in reply:
        later = "" if reply["connected"] else " (not connected: told at its next HELLO)"
        return f"{target}: host {action}{later}"
    if "cleared" in reply:
        return f"{target} cleared: {', '.join(reply['cleared'])}" if reply["cleared"] else f"{target} had no flags"
    return f"{target} {_DONE[action]}"


_DONE = {"drain": "drained", "undrain": "undrained", "disconnect": "disconnected"}


def _event_detail(event: dict) -> str:
    detail = event.get("detail")
    if not detail:
        return ""
    if event["event"] == "released":
        text = f"-> {detail.get('to')} ({detail.get('reason')})"
        if detail.get("error"):
            text += f": {_short(detail['error'], 80)}"
        return text
    if event["event"] == "state":
        return f"{detail.get('from')} -> {detail.get('to')} ({detail.get('reason')})"
    return _short(detail, 80)


def _per_minute(count: int, minutes: int) -> int | float:
    rate = count / minutes
    return int(rate) if rate == int(rate) or rate >= 100 else round(rate, 1)


def _ids(ids: list[int], most: int = 6) -> str:
    shown = ", ".join(str(i) for i in ids[:most])
    return shown + (f" +{len(ids) - most}" if len(ids) > most else "")


def _args(state, type) -> str:
    out = ""
    if state is not None:
        out += f"{state!r}, "
    if type is not None:
        out += f"type={type!r}, "
    return out


def _clock_time(t: float | None, ms: bool = False) -> str:
    if t is None:
        return ""
    text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return text + f".{int((t % 1) * 1000):03d}" if ms else text


def _short(value, width: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(headers: tuple, rows: list[tuple], indent: str = "") -> list[str]:
    """Lines of a plain table: numbers right-aligned, text left-aligned, two spaces apart."""
    cells = [tuple(str(c) for c in headers)] + [tuple(_cell(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        lines.append((indent + "  ".join(parts)).rstrip())
    return lines


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)
