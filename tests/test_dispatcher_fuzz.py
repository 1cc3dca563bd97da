"""The dispatcher driven by random sequences of messages from several fake workers and clients.

A hypothesis state machine plays three workers (each with its own job
types) and the clients around one Dispatcher over a MemoryStore on a
task.Clock: submits, valid, duplicate, unknown and stale results, DONE, FAIL
and RETURN, disconnects and reconnects that list what the worker still holds,
a second login under a live name, silence past the deadline, run-time limits,
operator actions, the stop switch, and server restarts. After every step:

- no record is accepted twice, and the store holds exactly the results that
  were acknowledged, each under the lease that sent it;
- no job is leased to two workers at once, and the dispatcher's memory and
  the store agree on every active job's state and lease;
- a lease is only ever granted to a registered, undrained worker with a free
  slot, while dispatching is on (checked at the grant itself).

At the end the operator resumes everything and every worker comes back and
works off what it is given: every acknowledged job must end done, failed or
cancelled, and a done job has exactly one result per record.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from twisted.internet import task

from gridd import errors
from gridd.scheduler import Dispatcher
from gridd.store.memory import MemoryStore
from tests.test_dispatcher import FakeConnection, run

WORKER_TYPES = {"w0": ("noop",), "w1": ("noop", "other"), "w2": ("other",)}
BEAT = 2.0
TERMINAL = ("done", "failed", "cancelled", "poison")


class CheckedDispatcher(Dispatcher):
    """The dispatcher, with the slot and guest invariants asserted at the one place a new lease is made.

    That place is ``Leases.grant`` (every dispatch hands out a job through it).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        grant = self.leases.grant

        def checked_grant(worker, job):
            self.check_grant(worker, job)
            grant(worker, job)

        self.leases.grant = checked_grant
        #: Grants checked so far (a check that never runs checks nothing).
        self.grants_checked = 0

    def check_grant(self, worker, job):
        assert self.dispatching, "a lease granted while dispatching is off"
        assert self.workers.get(worker.name) is worker, "a lease granted to a worker that is gone"
        assert not worker.drained, "a lease granted to a drained worker"
        assert not worker.quiet, "a lease granted to a worker silent for more than one beat"
        assert worker.state == "idle", f"a lease granted to a worker whose host is {worker.state}"
        assert not job.kept_from(worker.name, self.clock.seconds()), "a job handed back to the worker that returned it"
        assert len(worker.leases) < worker.slots, "a lease granted beyond the worker's slots"
        assert job.lease is None and job.worker is None and job.state == "queued", "a job leased twice"
        self.grants_checked += 1


@dataclass
class Held:
    """What a fake worker believes about one lease it holds."""

    job: int
    todo: set[int]


@dataclass
class FakeWorker:
    name: str
    types: tuple[str, ...]
    conn: FakeConnection | None = None
    held: dict[str, Held] = field(default_factory=dict)


jobspecs = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["noop", "other"]),
        "records": st.lists(st.integers(0, 9), min_size=1, max_size=4),
        "retries": st.integers(0, 2),
        "priority": st.integers(0, 2),
    },
    optional={"timeout": st.sampled_from([5.0, 50.0])},
)
worker_names = st.sampled_from(sorted(WORKER_TYPES))
#: A worker mostly names a lease it holds; sometimes a stale, foreign or unknown one.
valid_mostly = st.integers(0, 3).map(bool)


def _connected(machine) -> bool:
    return any(w.conn is not None for w in machine.workers.values())


class DispatcherMachine(RuleBasedStateMachine):
    @initialize(slots=st.lists(st.integers(1, 3), min_size=3, max_size=3), specs=st.lists(jobspecs, max_size=4))
    def setup(self, slots, specs):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.store = MemoryStore(server_id="run-0")
        run(self.store.start())
        self.restarts = 0
        self._lease_ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.d = self._new_dispatcher()
        self.workers = {name: FakeWorker(name, types) for name, types in WORKER_TYPES.items()}
        self.conns: list[FakeConnection] = []  # every connection, to deliver its loss once dropped
        self.lost: set[int] = set()
        self.watcher = self._conn("client")
        self.acked_jobs: list[int] = []
        #: (job, record) -> the lease under which its result was acknowledged.
        self.acked_records: dict[tuple[int, int], str] = {}
        self.leases_seen: list[tuple[int, str]] = []
        # Start from a working grid: every worker connected, some jobs waiting.
        for name, n in zip(sorted(self.workers), slots, strict=True):
            self.hello(name, n, False)
        if specs:
            self.submit(specs)

    def _new_dispatcher(self):
        d = CheckedDispatcher(
            self.store,
            self.clock,
            beat=BEAT,
            backoff_base=1.0,
            backoff_max=8.0,
            reattach_grace=30.0,
            new_lease=lambda: f"L{next(self._lease_ids)}",
        )
        run(d.start())
        return d

    def _conn(self, who) -> FakeConnection:
        conn = FakeConnection(address=f"{who}#{next(self._conn_ids)}")
        self.conns.append(conn)
        return conn

    # -- the wire, seen from the peers ----------------------------------------------

    def _pump(self):
        """Deliver what the dispatcher sent, and the loss of every connection it dropped."""
        self.clock.advance(0)
        for worker in self.workers.values():
            conn = worker.conn
            if conn is None:
                continue
            for verb, body in conn.sent:
                if verb == "JOB":
                    worker.held[body["lease"]] = Held(body["job"], {r["i"] for r in body["records"]})
                    self.leases_seen.append((body["job"], body["lease"]))
                elif verb == "REVOKE":
                    worker.held.pop(body["lease"], None)
            conn.sent.clear()
        self.watcher.sent.clear()
        for conn in self.conns:
            if conn.dropped is not None and id(conn) not in self.lost:
                self.lost.add(id(conn))
                self.d.connection_lost(conn)
                for worker in self.workers.values():
                    if worker.conn is conn:
                        worker.conn = None
        self.clock.advance(0)

    def _request(self, call):
        """Run one request; a refusal must leave the store's results unchanged."""
        before = self._store_results()
        try:
            reply = run(call)
        except errors.GriddError:
            assert self._store_results() == before, "a refused request changed the store"
            reply = None
        self._pump()
        return reply

    def _store_results(self) -> dict[int, list]:
        return {job: run(self.store.get_results(job, limit=100)) for job in self.acked_jobs}

    def _pick_lease(self, worker: FakeWorker, data, valid: bool) -> tuple[int, str]:
        if valid and worker.held:
            lease = data.draw(st.sampled_from(sorted(worker.held)))
            return worker.held[lease].job, lease
        if self.leases_seen and data.draw(st.booleans()):
            return data.draw(st.sampled_from(self.leases_seen))  # someone else's, or an old one
        return data.draw(st.sampled_from(self.acked_jobs or [1])), "L999"

    def _acknowledge(self, job: int, lease: str, indices):
        for i in indices:
            assert (job, i) not in self.acked_records, f"record {i} of job {job} accepted twice"
            self.acked_records[(job, i)] = lease
        for worker in self.workers.values():
            if lease in worker.held:
                worker.held[lease].todo -= set(indices)

    # -- rules: clients and operators ------------------------------------------------

    @rule(specs=st.lists(jobspecs, min_size=1, max_size=3))
    def submit(self, specs):
        reply = self._request(self.d.submit([dict(s) for s in specs]))
        self.acked_jobs.extend(reply["jobs"])

    @rule(action=st.sampled_from(["pause", "resume", "cancel", "requeue"]), data=st.data())
    def operate(self, action, data):
        if self.acked_jobs:
            job = data.draw(st.sampled_from(self.acked_jobs))
            self._request(getattr(self.d, action)(job))

    @rule(worker=worker_names, action=st.sampled_from(["drain", "undrain", "disconnect"]))
    def worker_action(self, worker, action):
        self._request(self.d.worker_action(worker, action))

    @rule(enabled=st.booleans())
    def switch(self, enabled):
        self._request(self.d.set_dispatching(enabled))

    @rule()
    def watch_everything(self):
        self._request(self.d.watch(self.watcher, []))

    # -- rules: workers ----------------------------------------------------------------

    @rule(name=worker_names, slots=st.integers(0, 3), old_answers=st.booleans())
    def hello(self, name, slots, old_answers):
        """A worker connects, listing what it still holds; if it is connected already, the old one is pinged."""
        worker = self.workers[name]
        if worker.conn is not None:
            worker.conn.answers_ping = old_answers
        conn = self._conn(name)
        hello = {
            "name": name,
            "slots": slots,
            "types": {t: "1.0" for t in worker.types},
            "holding": [{"job": h.job, "lease": lease} for lease, h in worker.held.items()],
        }
        try:
            reply = run(self.d.worker_hello(conn, hello))
        except errors.NameInUse:
            assert old_answers
            self.lost.add(id(conn))
            return
        worker.conn = conn
        for kept in reply["kept"]:
            worker.held[kept["lease"]].todo = set(kept["todo"])
        for lost in reply["lost"]:
            worker.held.pop(lost["lease"], None)
        self._pump()

    @rule(name=worker_names, forget=st.booleans())
    def disconnect(self, name, forget):
        """The connection drops; the worker keeps its work (or, after a crash, forgets it)."""
        worker = self.workers[name]
        if worker.conn is not None:
            self.lost.add(id(worker.conn))
            self.d.connection_lost(worker.conn)
            worker.conn = None
        if forget:
            worker.held.clear()
        self._pump()

    @rule(name=worker_names)
    def beat(self, name):
        if self.workers[name].conn is not None:
            self.d.seen(self.workers[name].conn)

    def _connected_worker(self, data) -> FakeWorker:
        return self.workers[data.draw(st.sampled_from([n for n, w in sorted(self.workers.items()) if w.conn]))]

    @precondition(lambda self: any(w.conn is not None and w.held for w in self.workers.values()))
    @rule(finish=st.booleans(), data=st.data())
    def work(self, finish, data):
        """A worker that holds a lease does its job: some results, or all of them with DONE."""
        worker = self.workers[
            data.draw(st.sampled_from([n for n, w in sorted(self.workers.items()) if w.conn and w.held]))
        ]
        lease = data.draw(st.sampled_from(sorted(worker.held)))
        held = worker.held[lease]
        if finish or not held.todo:
            indices = sorted(held.todo)
            reply = self._request(self.d.done(worker.conn, held.job, lease, [{"i": i, "out": i} for i in indices]))
            if reply is not None:
                self._acknowledge(held.job, lease, indices)
                worker.held.pop(lease, None)
            return
        indices = data.draw(st.lists(st.sampled_from(sorted(held.todo)), min_size=1, max_size=3, unique=True))
        reply = self._request(self.d.result(worker.conn, held.job, lease, [{"i": i, "out": i} for i in indices]))
        if reply is not None:
            self._acknowledge(held.job, lease, indices)

    @precondition(_connected)
    @rule(valid=valid_mostly, data=st.data())
    def result(self, valid, data):
        """Results: for records still to do, or already accepted, unknown, repeated, or under a stale lease."""
        worker = self._connected_worker(data)
        job, lease = self._pick_lease(worker, data, valid)
        held = worker.held.get(lease)
        if valid and held is not None and held.todo:
            indices = data.draw(st.lists(st.sampled_from(sorted(held.todo)), min_size=1, max_size=3, unique=True))
        else:
            indices = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
        reply = self._request(self.d.result(worker.conn, job, lease, [{"i": i, "out": i} for i in indices]))
        if reply is not None:
            self._acknowledge(job, lease, indices)

    @precondition(_connected)
    @rule(valid=valid_mostly, data=st.data())
    def done(self, valid, data):
        worker = self._connected_worker(data)
        job, lease = self._pick_lease(worker, data, valid)
        held = worker.held.get(lease)
        indices = sorted(held.todo) if held is not None else [0]
        if not valid and indices:
            indices = indices[:-1]  # one short: incomplete
        reply = self._request(self.d.done(worker.conn, job, lease, [{"i": i, "out": i} for i in indices]))
        if reply is not None:
            self._acknowledge(job, lease, indices)
            worker.held.pop(lease, None)
            assert run(self.store.get_job(job))["state"] == "done"

    @precondition(_connected)
    @rule(retry=st.booleans(), valid=valid_mostly, data=st.data())
    def fail(self, retry, valid, data):
        worker = self._connected_worker(data)
        job, lease = self._pick_lease(worker, data, valid)
        if self._request(self.d.fail(worker.conn, job, lease, "boom", retry)) is not None:
            worker.held.pop(lease, None)

    @precondition(_connected)
    @rule(valid=valid_mostly, vacate=st.booleans(), data=st.data())
    def give_back(self, valid, vacate, data):
        worker = self._connected_worker(data)
        job, lease = self._pick_lease(worker, data, valid)
        if self._request(self.d.give_back(worker.conn, job, lease, "host busy", vacate)) is not None:
            worker.held.pop(lease, None)

    @precondition(_connected)
    @rule(state=st.sampled_from(["idle", "busy", "vacating"]), data=st.data())
    def host_state(self, state, data):
        """The worker says what its host is doing (STATE); only an idle one gets jobs (CheckedDispatcher)."""
        worker = self._connected_worker(data)
        self._request(self.d.set_state(worker.conn, state, "fuzz"))

    @precondition(_connected)
    @rule(data=st.data())
    def check(self, data):
        """After a suspend the worker asks which of its leases are still its own (CHECK) and drops the lost ones."""
        worker = self._connected_worker(data)
        holding = [{"job": h.job, "lease": lease} for lease, h in sorted(worker.held.items())]
        reply = self._request(self.d.check_leases(worker.conn, holding))
        if reply is None:
            return
        assert {k["lease"] for k in reply["kept"]} | {k["lease"] for k in reply["lost"]} == set(worker.held)
        for kept in reply["kept"]:
            job = self.d.jobs[kept["job"]]
            assert job.token == kept["lease"] and job.worker is self.d.workers[worker.name]
            worker.held[kept["lease"]].todo = set(kept["todo"])
        for lost in reply["lost"]:
            worker.held.pop(lost["lease"], None)

    @rule(name=worker_names, slots=st.integers(0, 3))
    def set_slots(self, name, slots):
        if self.workers[name].conn is not None:
            self._request(self.d.set_slots(self.workers[name].conn, slots))

    # -- rules: time and the server ------------------------------------------------------

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.0, 7.0, 40.0]))
    def advance(self, seconds):
        """Time passes; workers that do not beat are dropped, run-time limits expire.

        A step far past a deadline is a stall of the server: the worker is
        dropped one beat after it (PROTOCOL.md 5), in a later step.
        """
        self.clock.advance(seconds)
        self._pump()

    @rule(seconds=st.integers(1, 60))
    def advance_beating(self, seconds):
        """Time passes while every connected worker beats."""
        for _ in range(seconds):
            for worker in self.workers.values():
                if worker.conn is not None:
                    self.d.seen(worker.conn)
            self.clock.advance(1.0)
            self._pump()

    @rule()
    def restart(self):
        """The server restarts on the same data, as a new server: connections are gone, workers keep their work.

        The old run's leases stay with it until a worker brings one back, or
        until the old run's deadline and the reattach grace have passed.
        """
        self.d.stop()
        run(self.store.stop())
        self.restarts += 1
        self.store = self.store.sibling(f"run-{self.restarts}")
        run(self.store.start())
        self.d = self._new_dispatcher()
        for worker in self.workers.values():
            worker.conn = None
        self.lost.update(id(c) for c in self.conns)
        self.watcher = self._conn("client")
        self._pump()

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def one_worker_per_lease_and_memory_agrees_with_store(self):
        d = self.d
        leased: dict[int, str] = {}
        for name, worker in d.workers.items():
            assert d.workers.by_connection.get(worker.conn) is worker
            for lease, job in worker.leases.items():
                assert job.token == lease and job.worker is worker
                assert job.id not in leased, f"job {job.id} leased to {leased[job.id]} and {name}"
                leased[job.id] = name
                assert d.jobs.get(job.id) is job
        for job in d.jobs.values():
            view = run(self.store.get_job(job.id))
            assert (view["state"], view["lease"]) == (job.state, job.token), (job.id, view["state"], job.state)
            if job.lease is not None:
                assert job.worker is not None and leased.get(job.id) == job.worker.name
        for job_id in self.acked_jobs:
            if job_id not in d.jobs:
                # Finished, or (after a restart) still leased by the earlier run.
                state = run(self.store.get_job(job_id))["state"]
                assert state in TERMINAL or (state == "running" and self.restarts), (job_id, state)

    @invariant()
    def results_accepted_once_under_the_acknowledged_lease(self):
        if not hasattr(self, "store"):
            return
        stored = {(job, r["i"]): r["lease"] for job, rows in self._store_results().items() for r in rows}
        assert stored == self.acked_records

    # -- the end: everything is worked off ------------------------------------------------------

    def teardown(self):
        if not hasattr(self, "d"):
            return
        run(self.d.set_dispatching(True))
        for job in self.acked_jobs:
            if run(self.store.get_job(job))["state"] == "paused":
                run(self.d.resume(job))
        for name, worker in self.workers.items():
            if worker.conn is not None:
                self._request(self.d.worker_action(name, "undrain"))
                self._request(self.d.set_state(worker.conn, "idle"))
                self._request(self.d.set_slots(worker.conn, 3))
            else:
                self.hello(name, 3, False)
        for _ in range(200):
            for worker in self.workers.values():
                for lease, held in sorted(worker.held.items()):
                    if worker.conn is None:
                        break
                    results = [{"i": i, "out": i} for i in sorted(held.todo)]
                    if self._request(self.d.done(worker.conn, held.job, lease, results)) is not None:
                        self._acknowledge(held.job, lease, sorted(held.todo))
                    worker.held.pop(lease, None)
            for name, worker in self.workers.items():
                if worker.conn is None:
                    self.hello(name, 3, False)
                else:
                    self.d.seen(worker.conn)
            if all(run(self.store.get_job(job))["state"] in TERMINAL for job in self.acked_jobs):
                break
            self.clock.advance(1.0)
            self._pump()
        states = {job: run(self.store.get_job(job)) for job in self.acked_jobs}
        unfinished = {job: view["state"] for job, view in states.items() if view["state"] not in TERMINAL}
        assert not unfinished, f"acknowledged jobs never finished: {unfinished}"
        for job, view in states.items():
            if view["state"] == "done":
                indices = sorted(r["i"] for r in run(self.store.get_results(job, limit=100)))
                assert indices == list(range(view["total"])) and view["accepted"] == view["total"]
        self.results_accepted_once_under_the_acknowledged_lease()
        self.d.stop()


DispatcherMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_dispatcher_never_breaks_its_invariants = DispatcherMachine.TestCase
