"""The worker as a guest (gridd.worker.guest and the core's host inputs): busy, vacate, lease checks after a suspend.

Each test drives a worker over a StringTransport with a task.Clock, feeding
the server's lines and asserting the exact lines the worker sends.
"""

from __future__ import annotations

import json

from gridd.worker.guest import Guest
from tests.test_worker import Harness, job_line


class Worker(Harness):
    """The test worker's harness, leaving out the keepalive's BEATs from what it sent."""

    def sent(self):
        return [line for line in super().sent() if line != "BEAT"]


def guest_worker(grace=600.0):
    w = Worker().welcome()
    return w, Guest(w.clock, w.core, grace=grace)


def run_to_the_end(w, step=1.0, most=20) -> list[str]:
    """Advance the clock a step at a time, acknowledging each RESULT, until DONE; the verbs sent on the way."""
    seen = []
    for _ in range(most):
        w.clock.advance(step)
        w.clock.advance(0)
        for line in w.sent():
            seen.append(line.split(" ", 1)[0])
            rid = body(line)["rid"]
            if seen[-1] == "DONE":
                return seen
            w.receive(f'OK {{"rid":{rid},"accepted":0}}')
    raise AssertionError(f"no DONE after {most} steps: {seen}")


def verbs(lines):
    return [line.split(" ", 1)[0] for line in lines]


def body(line):
    return json.loads(line.split(" ", 1)[1])


def test_guest_busy_without_jobs_says_busy_and_gives_back_a_job_sent_before_the_server_heard():
    """A busy host with no job is STATE busy; a JOB crossing it goes straight back as a vacate; idle says idle."""
    w, guest = guest_worker()
    guest.host_changed(True, "a user was active 3 s ago")
    assert w.sent() == ['STATE {"state":"busy","reason":"a user was active 3 s ago","rid":2}']
    w.receive('OK {"rid":2}')
    w.receive(job_line(params={"seconds": 1}))
    (line,) = w.sent()
    assert line.startswith("RETURN ") and body(line)["vacate"] is True
    assert "the host is busy" in body(line)["reason"]
    w.receive('OK {"rid":3}')
    guest.host_changed(False)
    assert w.sent() == ['STATE {"state":"idle","rid":4}']


def test_guest_busy_pauses_running_jobs_and_idle_within_grace_resumes_them():
    """Running jobs pause (vacating) when the host is busy and finish in place when it is idle again in time."""
    w, guest = guest_worker(grace=600)
    w.receive(job_line(records=["a", "b", "c"], params={"seconds": 1}))
    guest.host_changed(True, "other processes use 80 % of the CPU")
    assert w.sent() == ['STATE {"state":"vacating","reason":"other processes use 80 % of the CPU","rid":2}']
    w.receive('OK {"rid":2}')
    w.clock.advance(1)  # the record under way finishes; no other starts
    w.clock.advance(0)
    assert verbs(w.sent()) == ["RESULT"]
    w.clock.advance(300)
    assert w.sent() == []
    guest.host_changed(False)
    assert w.sent() == ['STATE {"state":"idle","rid":4}']
    w.receive('OK {"rid":3,"accepted":1}', 'OK {"rid":4}')
    assert run_to_the_end(w) == ["RESULT", "DONE"]
    assert not [c for c in w.clock.getDelayedCalls() if c.func.__name__ == "_vacate"]


def test_guest_vacates_jobs_when_the_host_stays_busy_past_grace():
    """Past the grace period every running job is given back with RETURN vacate, and the worker stays busy."""
    w, guest = guest_worker(grace=600)
    w.receive(job_line(records=["a", "b"], params={"seconds": 5}))
    guest.host_changed(True, "host signal file says busy")
    w.sent()
    w.receive('OK {"rid":2}')
    w.clock.advance(5)  # a record under way in a thread finishes (a handler process would be stopped)
    w.clock.advance(0)
    assert verbs(w.sent()) == ["RESULT"]
    w.receive('OK {"rid":3,"accepted":1}')
    w.clock.advance(595)
    returned, state = w.sent()
    assert returned == (
        'RETURN {"job":1,"lease":"L1","reason":"vacated: the host was busy for 600 s (host signal file says busy)",'
        '"vacate":true,"rid":4}'
    )
    assert state == 'STATE {"state":"busy","reason":"host signal file says busy","rid":5}'
    w.receive('OK {"rid":4}', 'OK {"rid":5}')
    assert w.core.holdings == {}
    guest.host_changed(False)
    assert w.sent() == ['STATE {"state":"idle","rid":6}']
    w.receive('OK {"rid":6}', job_line(job=2, lease="L2", records=["x"], params={"seconds": 1}))
    w.clock.advance(1)
    w.clock.advance(0)
    assert verbs(w.sent()) == ["DONE"]  # a job taken after the vacate runs, not paused


def test_guest_vacates_before_a_paused_jobs_run_time_limit_would_pass():
    """A job 3,300 s into its 3,600 s limit is vacated 290 s after the host turns busy, not after the 600 s grace."""
    w, guest = guest_worker(grace=600)
    w.receive(job_line(records=["a", "b"], params={"seconds": 3300}))
    w.clock.advance(3300)
    w.clock.advance(0)
    (result,) = w.sent()
    w.receive(f'OK {{"rid":{body(result)["rid"]},"accepted":1}}')
    guest.host_changed(True, "a person at the desk")
    w.sent()
    w.clock.advance(289)
    assert w.sent() == []
    w.clock.advance(1)
    (returned, state) = w.sent()
    assert body(returned)["vacate"] is True, returned
    assert "busy for 290 s" in body(returned)["reason"]


def test_guest_busy_twice_only_updates_the_reason():
    w, guest = guest_worker()
    guest.host_changed(True, "first")
    guest.host_changed(True, "first")
    guest.host_changed(True, "second")
    assert w.sent() == [
        'STATE {"state":"busy","reason":"first","rid":2}',
        'STATE {"state":"busy","reason":"second","rid":3}',
    ]


def test_hello_of_a_busy_worker_says_busy_and_a_vacating_one_says_so_after_the_handshake():
    """HELLO carries state busy; a worker vacating when it reconnects sends STATE vacating after the reply."""
    w, guest = guest_worker()
    w.receive(job_line(records=["a"], params={"seconds": 5}))
    guest.host_changed(True, "busy desk")
    w.sent()
    w.disconnect()
    w.connect()
    (hello,) = w.sent()
    assert body(hello)["state"] == "busy"
    w.receive(
        'OK {"rid":1,"proto":1,"server":"gridd/0.1.0","beat":30.0,"deadline":90.0,"max_line":1048576,'
        '"kept":[{"job":1,"lease":"L1","todo":[0]}],"lost":[]}'
    )
    assert w.sent() == ['STATE {"state":"vacating","reason":"busy desk","rid":2}']


def test_host_notification_reaches_the_host_signal_callback():
    """HOST from the server (an operator's gridctl worker busy) is handed to the host watch's signal."""
    w = Worker().welcome()
    heard = []
    w.core.on_host_signal = lambda busy, reason: heard.append((busy, reason))
    w.receive('HOST {"busy":true,"reason":"VM host in use"}', 'HOST {"busy":false}')
    assert heard == [(True, "VM host in use"), (False, "")]


def test_check_after_suspend_sends_nothing_until_answered_and_drops_lost_leases_unsent():
    """After a suspend the worker asks CHECK; a lost lease is dropped with its results never sent."""
    w = Worker().welcome()
    w.receive(job_line(records=["a", "b", "c"], params={"seconds": 1}))
    w.core.check_leases("the host was suspended for 2 h 3 min")
    assert w.sent() == ['CHECK {"holding":[{"job":1,"lease":"L1"}],"rid":2}']
    w.clock.advance(1)  # the record under way finishes while the question is out
    w.clock.advance(0)
    assert w.sent() == []
    w.receive('OK {"rid":2,"kept":[],"lost":[{"job":1,"lease":"L1","reason":"expired"}]}')
    w.clock.advance(5)
    assert w.sent() == [] and w.core.holdings == {}


def test_check_keeps_leases_the_server_still_counts_and_reports_only_their_todo():
    """A kept lease resumes and reports the records the reply lists in todo, and no other."""
    w = Worker().welcome()
    w.receive(job_line(records=["a", "b", "c"], params={"seconds": 1}))
    w.core.check_leases("this process was stopped for 40 s")
    w.sent()
    w.clock.advance(1)
    w.clock.advance(0)
    w.receive('OK {"rid":2,"kept":[{"job":1,"lease":"L1","todo":[1,2]}],"lost":[]}')
    assert w.sent() == []  # record 0's result is the server's already: not sent
    w.clock.advance(1)
    w.clock.advance(0)
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":1,"out":null}],"rid":3}']
    w.receive('OK {"rid":3,"accepted":2}')
    w.clock.advance(1)
    w.clock.advance(0)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":2,"out":null}],"rid":4}']


def test_check_without_a_connection_is_answered_by_the_next_handshake():
    """Suspended while disconnected: jobs stay paused until the reconnect's HELLO reply settles the leases."""
    w = Worker().welcome()
    w.receive(job_line(records=["a", "b"], params={"seconds": 1}))
    w.disconnect()
    w.core.check_leases("the host was suspended for 10 min")
    w.clock.advance(1)
    w.clock.advance(5)  # paused: the second record does not start
    w.connect()
    w.sent()
    w.receive(
        'OK {"rid":1,"proto":1,"server":"gridd/0.1.0","beat":30.0,"deadline":90.0,"max_line":1048576,'
        '"kept":[{"job":1,"lease":"L1","todo":[0,1]}],"lost":[]}'
    )
    assert w.sent() == ['RESULT {"job":1,"lease":"L1","results":[{"i":0,"out":null}],"rid":2}']
    w.receive('OK {"rid":2,"accepted":1}')
    w.clock.advance(1)
    w.clock.advance(0)
    assert w.sent() == ['DONE {"job":1,"lease":"L1","results":[{"i":1,"out":null}],"rid":3}']


def test_check_refused_by_the_server_reconnects_and_the_handshake_settles_the_leases():
    """A server that refuses CHECK: the worker sends nothing, drops the connection, and the next HELLO settles."""
    w = Worker().welcome()
    w.receive(job_line(records=["a", "b"], params={"seconds": 1}))
    w.core.check_leases("the host was suspended for 5 min")
    w.sent()
    w.clock.advance(1)  # record 0 done while the question is out: held back
    w.clock.advance(0)
    assert w.sent() == []
    w.receive('ERR {"rid":2,"code":"unknown_verb","message":"unknown verb CHECK"}')
    assert w.sent() == [] and w.transport.disconnecting, "nothing sent under a lease that may be gone"
    w.disconnect()
    w.connect()
    (hello,) = w.sent()
    assert [h["lease"] for h in body(hello)["holding"]] == ["L1"]
    w.receive(
        'OK {"rid":1,"proto":1,"server":"gridd/0.1.0","beat":30.0,"deadline":90.0,"max_line":1048576,'
        '"kept":[],"lost":[{"job":1,"lease":"L1","reason":"expired"}]}'
    )
    assert w.sent() == [] and not w.core.holdings and not w.core.checking


def test_a_check_answered_before_a_result_in_flight_leaves_that_result_counted():
    """CHECK's answer may overtake an earlier RESULT's: the RESULT is not sent again and the job still ends."""
    w = Worker().welcome()
    w.receive(job_line(records=["a", "b", "c"], params={"seconds": 1}))
    w.clock.advance(1)
    w.clock.advance(0)
    assert verbs(w.sent()) == ["RESULT"]  # rid 2, record 0, in flight
    w.core.check_leases("the wall clock jumped forward by 5 min")
    assert verbs(w.sent()) == ["CHECK"]  # rid 3
    w.receive('OK {"rid":3,"kept":[{"job":1,"lease":"L1","todo":[0,1,2]}],"lost":[]}')
    assert w.sent() == [], "record 0 is still in flight: not sent again"
    w.receive('OK {"rid":2,"accepted":1}')
    assert run_to_the_end(w) == ["RESULT", "DONE"]


def test_an_earlier_checks_answer_drops_what_it_says_is_lost_but_the_latest_ends_the_check():
    """Two suspends, two CHECKs: the first answer does not end the check; its lost leases go at once."""
    w = Worker().welcome()
    w.receive(job_line(records=["a", "b", "c"], params={"seconds": 1}))
    w.receive(job_line(job=2, lease="L2", records=["a"], params={"seconds": 1}))
    w.core.check_leases("first stop")
    w.core.check_leases("second stop")
    assert verbs(w.sent()) == ["CHECK", "CHECK"]  # rids 2 and 3
    w.receive(
        'OK {"rid":2,"kept":[{"job":1,"lease":"L1","todo":[0,1,2]}],"lost":[{"job":2,"lease":"L2","reason":"expired"}]}'
    )
    assert w.core.checking and set(w.core.holdings) == {"L1"}
    w.clock.advance(1)
    w.clock.advance(0)
    assert w.sent() == [], "the later CHECK is unanswered: nothing is sent"
    w.receive('OK {"rid":3,"kept":[],"lost":[{"job":1,"lease":"L1","reason":"expired"}]}')
    assert not w.core.holdings and not w.core.checking and w.sent() == []


def test_check_with_no_jobs_asks_nothing():
    w = Worker().welcome()
    w.core.check_leases("the host was suspended for 5 min")
    assert w.sent() == []


def test_a_job_started_during_a_check_waits_for_the_answer():
    """A JOB that arrives while the lease check is out is ours, but starts paused until the answer."""
    w = Worker().welcome()
    w.receive(job_line(records=["a"], params={"seconds": 1}))
    w.core.check_leases("stopped")
    w.sent()
    w.receive(job_line(job=2, lease="L2", records=["x", "y"], params={"seconds": 1}))
    w.clock.advance(1)
    w.clock.advance(1)
    w.clock.advance(0)
    assert w.sent() == []
    w.receive('OK {"rid":2,"kept":[{"job":1,"lease":"L1","todo":[0]}],"lost":[]}')
    assert sorted(verbs(w.sent())) == ["DONE", "RESULT"]


# -- the guest service: host watch, operator's signal and suspend watch together -----------------


def guest_service(w, **options):
    from gridd.worker.guest import GuestOptions, GuestService

    service = GuestService(w.clock, w.core, GuestOptions(**options))
    service.suspend._monotonic = service.suspend._boottime = w.clock.seconds  # the test's clock is every clock
    return service


def test_a_when_idle_worker_says_busy_in_its_first_hello_and_follows_its_signal_file(tmp_path):
    """--when-idle: the HELLO already says busy; the file's idle is heard at the next poll, its busy too."""
    signal_file = tmp_path / "state"
    signal_file.write_text("busy the host's user is at the desk")
    w = Worker()
    service = guest_service(w, when_idle=True, cpu_threshold=1.0, user_idle=0, signal_file=str(signal_file), poll=5)
    service.startService()
    assert w.core.host_state == "busy"
    w.connect()
    (hello,) = w.sent()
    assert body(hello)["state"] == "busy"
    w.welcome()
    w.sent()
    signal_file.write_text("idle")
    w.clock.advance(5)
    assert w.sent() == ['STATE {"state":"idle","rid":2}'], "a said source's idle needs no wait"
    w.receive('OK {"rid":2}')
    signal_file.write_text("busy back")
    w.clock.advance(5)
    assert w.sent() == ['STATE {"state":"busy","reason":"the host says busy (back)","rid":3}']
    service.stopService()


def test_without_when_idle_the_host_is_idle_but_the_operators_signal_still_works():
    w = Worker()
    service = guest_service(w)
    service.startService()
    w.welcome()
    assert w.core.host_state == "idle"
    w.receive('HOST {"busy":true,"reason":"gridctl worker busy w1"}')
    assert w.sent() == [
        'STATE {"state":"busy","reason":"an operator asked for the desk (gridctl worker busy w1)","rid":2}'
    ]
    w.receive('OK {"rid":2}', 'HOST {"busy":false}')
    assert w.sent() == ['STATE {"state":"idle","rid":3}']
    service.stopService()


def test_a_late_turn_of_the_suspend_watch_makes_the_worker_check_its_leases():
    w = Worker().welcome()
    service = guest_service(w)
    service.startService()
    w.receive(job_line(records=["a", "b"], params={"seconds": 100}))
    w.clock.advance(1)
    assert w.sent() == []
    w.clock.advance(40)  # one turn, 39 s late: the process was stopped
    (line,) = w.sent()
    assert line.startswith("CHECK ") and body(line)["holding"][0]["lease"] == "L1"
    service.stopService()


# -- twistd gridworker's options ---------------------------------------------------


def worker_options(tmp_path, *argv):
    from gridd.worker import tap

    secret = tmp_path / "secret"
    secret.write_text("x")
    options = tap.Options()
    options.parseOptions(["--secret-file", str(secret), "--handlers", "threads", *argv])
    return options


def test_when_idle_options_build_a_guest_service_with_each_source_and_their_defaults(tmp_path):
    from twisted.internet import task

    from gridd.worker import tap
    from gridd.worker.idle import OtherProcessesCPU, Signal, SignalFile, UserIdleTime

    options = worker_options(tmp_path, "--when-idle", "--host-signal-file", str(tmp_path / "state"))
    guest = tap.makeService(options, reactor=task.Clock()).getServiceNamed("guest")
    kinds = [type(source) for source in guest.host.sources]
    assert kinds == [OtherProcessesCPU, UserIdleTime, SignalFile, Signal]
    cpu, person = guest.host.sources[:2]
    assert (cpu.threshold, person.min_idle) == (0.25, 300.0)
    assert (guest.host.idle_after, guest.host.interval, guest.guest.grace) == (60.0, 5.0, 600.0)
    assert guest.host.busy, "a --when-idle worker starts busy"


def test_measured_sources_can_be_turned_off_and_without_when_idle_only_the_operators_signal_is_heard(tmp_path):
    from twisted.internet import task

    from gridd.worker import tap
    from gridd.worker.idle import Signal, UserIdleTime

    options = worker_options(tmp_path, "--when-idle", "--cpu-threshold", "100", "--grace", "30", "--idle-after", "5")
    guest = tap.makeService(options, reactor=task.Clock()).getServiceNamed("guest")
    assert [type(source) for source in guest.host.sources] == [UserIdleTime, Signal]
    assert (guest.host.idle_after, guest.guest.grace) == (5.0, 30.0)
    guest = tap.makeService(worker_options(tmp_path), reactor=task.Clock()).getServiceNamed("guest")
    assert [type(source) for source in guest.host.sources] == [Signal] and not guest.host.busy


def test_guest_options_refuse_bad_values(tmp_path):
    import pytest
    from twisted.python import usage

    for argv, words in (
        (["--cpu-threshold", "0"], "--cpu-threshold"),
        (["--cpu-threshold", "101"], "--cpu-threshold"),
        (["--grace", "-1"], "--grace"),
        (["--idle-poll", "0"], "--idle-poll"),
        (["--host-signal-file", "x"], "--host-signal-file needs --when-idle"),
    ):
        with pytest.raises(usage.UsageError, match=words):
            worker_options(tmp_path, *argv)


def test_the_suspend_threshold_stays_below_half_the_silence_the_server_allows():
    """Beat 0.5 s, deadline 2 s: leases may end after 1.5 s unheard, so a turn 0.75 s late is already a suspend."""
    w = Worker().welcome(beat=0.5, deadline=2.0)
    service = guest_service(w)
    service.startService()
    assert (service.suspend.threshold, service.suspend.turn_interval) == (0.75, 0.375)
    w.receive(job_line(records=["a", "b"], params={"seconds": 100}))
    w.clock.advance(1)
    w.sent()
    w.clock.advance(2.5)  # one turn, 1.5 s late
    assert any(line.startswith("CHECK ") for line in w.sent())
    service.stopService()
