"""Credentials and roles (PROTOCOL.md section 13) on the server stack, and once end to end.

The unit tests run the whole server (wire adapter, session, dispatcher,
memory store) on StringTransport and task.Clock, as tests/test_server.py
does: every refusal is checked for the spec's ERR, its rid, and an unchanged
store (jobs, results and credentials).
"""

from __future__ import annotations

import inspect
import re
import sqlite3

import pytest
import pytest_twisted

from gridd.server import auth
from gridd.server.auth import Authenticator, Identity, hash_secret
from gridd.store.memory import MemoryStore
from gridd.store.sqlite import SQLiteStore
from tests.test_server import SECRET, Peer, Stack, run


class AuthStack(Stack):
    """A Stack whose server knows credentials, with helpers to log in with them."""

    def __init__(self, shared_secret: str | None = SECRET):
        super().__init__()
        self.factory.authenticator = Authenticator(self.store, self.clock, shared_secret=shared_secret)
        self.tokens: dict[str, str] = {}

    def add(self, credential_id: str, role: str) -> str:
        token = run(defer_of(self.factory.authenticator.add(credential_id, role)))
        self.tokens[credential_id] = token
        return token

    def login(self, role: str, name: str, token: str, **extra) -> tuple[Peer, object]:
        peer = self.connect()
        if role == "worker":
            extra = {"slots": 1, "types": {"noop": "1.0"}, **extra}
        peer.send("HELLO", {"rid": 1, "proto": 1, "role": role, "name": name, "token": token, **extra})
        return peer, peer.reply(1)

    def as_worker(self, credential_id: str) -> Peer:
        peer, reply = self.login("worker", credential_id, self.tokens[credential_id])
        assert reply.verb == "OK", reply
        return peer

    def as_client(self, credential_id: str, name: str = "c") -> Peer:
        peer, reply = self.login("client", name, self.tokens[credential_id])
        assert reply.verb == "OK", reply
        return peer

    def state(self) -> tuple:
        """Everything a refused request must leave alone: jobs, results and credentials."""
        return self.snapshot(), run(self.store.list_credentials())


def defer_of(coro):
    from twisted.internet import defer

    return defer.Deferred.fromCoroutine(coro)


@pytest.fixture
def grid():
    """Credentials alice and bob (submitters), root (admin), w1 and w2 (workers); bob's job 1 runs on w1."""
    s = AuthStack()
    for credential_id, role in [("alice", "submitter"), ("bob", "submitter"), ("root", "admin")]:
        s.add(credential_id, role)
    s.add("w1", "worker")
    s.add("w2", "worker")
    s.w1 = s.as_worker("w1")
    s.w2 = s.as_worker("w2")
    s.bob = s.as_client("bob")
    s.job = s.submit(s.bob, records=["a", "b"])
    [pushed] = s.w1.take("JOB")
    s.lease = pushed["lease"]
    for peer in s.peers:
        peer.take_all()
    yield s
    s.stop()


def refused(peer: Peer, verb: str, body: dict, code: str = "forbidden"):
    reply = peer.request(verb, body)
    assert reply is not None and reply.verb == "ERR", reply
    assert reply.body["code"] == code, reply.body
    assert isinstance(reply.body["rid"], int)
    return reply


# -- the HELLO ----------------------------------------------------------------------


def test_auth_credentials_log_in_with_their_roles(grid):
    """Each credential's token logs in with the role it was made for; the session knows the identity."""
    assert grid.w1.proto.session.identity == Identity("w1", "worker")
    assert grid.bob.proto.session.identity == Identity("bob", "submitter")
    root = grid.as_client("root")
    assert root.proto.session.identity == Identity("root", "admin")
    shared, reply = grid.login("client", "ops", SECRET)
    assert reply.verb == "OK" and shared.proto.session.identity == Identity(None, "admin")


@pytest.mark.parametrize(
    "credential, role, name, message",
    [
        ("w1", "client", "w1", "a worker credential may not connect as a client"),
        ("w1", "worker", "w2", "worker credential w1 may only connect as worker w1"),
        ("alice", "worker", "alice", "a submitter credential may not connect as a worker"),
        ("root", "worker", "root", "an admin credential may not connect as a worker"),
    ],
)
def test_auth_hello_with_the_wrong_role_or_name_forbidden_and_closed(grid, credential, role, name, message):
    """A credential used in a role it does not have, or a worker credential under another name: forbidden, close."""
    before = grid.state()
    peer, reply = grid.login(role, name, grid.tokens[credential])
    assert (reply.verb, reply.body) == ("ERR", {"rid": 1, "code": "forbidden", "message": message})
    assert peer.closed
    assert grid.state() == before
    assert sorted(grid.dispatcher.workers) == ["w1", "w2"]  # w1 was not disturbed by the impostor


@pytest.mark.parametrize(
    "token",
    ["alice.wrong", "nobody.secret", "alice", "alice.", ".x", "wrong", ""],
    ids=["wrong-secret", "unknown-id", "id-only", "empty-secret", "empty-id", "wrong-shared", "empty"],
)
def test_auth_bad_token_refused_and_closed(grid, token):
    """A wrong secret, an unknown id, or anything else that is neither a credential nor the shared secret."""
    peer, reply = grid.login("client", "c", token)
    assert (reply.verb, reply.body["code"]) == ("ERR", "auth_failed")
    assert peer.closed


def test_auth_shared_secret_with_a_known_id_prefix_is_a_credential_token():
    """A token whose part before the dot is a known id is checked as that credential only."""
    s = AuthStack(shared_secret="alice.shared")
    s.add("alice", "submitter")
    peer, reply = s.login("client", "c", "alice.shared")
    assert reply.body["code"] == "auth_failed"
    s.stop()


def test_auth_no_shared_secret_refuses_it_credentials_still_work():
    """Without the shared secret (--no-shared-secret) it logs nobody in; credentials do."""
    s = AuthStack(shared_secret=None)
    s.add("root", "admin")
    for role in ("client", "worker"):
        peer, reply = s.login(role, "x", SECRET)
        assert (reply.verb, reply.body["code"]) == ("ERR", "auth_failed") and peer.closed
    assert s.as_client("root").proto.session.identity == Identity("root", "admin")
    s.stop()


def test_auth_secret_compared_in_constant_time():
    """Credential hashes and the shared secret are compared with hmac.compare_digest, never ==."""
    source = inspect.getsource(auth.Authenticator._check)
    assert source.count("hmac.compare_digest(") == 2
    assert not re.search(r"secret_hash\"\]\s*==|==\s*hash_secret|_shared\s*==", source)


# -- what each role may send ----------------------------------------------------------

_JOB = {"job": 1}
SUBMITTER_FORBIDDEN = {
    "WORKER": {"worker": "w1", "action": "drain"},
    "DISPATCH": {"enabled": False},
    "CREDENTIAL-list": {"action": "list"},
    "CREDENTIAL-add": {"action": "add", "id": "mine", "role": "admin"},
    "CREDENTIAL-revoke": {"action": "revoke", "id": "bob"},
    "RESULT": {"job": 1, "lease": "L1", "results": [{"i": 0, "out": 1}]},
    "DONE": {"job": 1, "lease": "L1", "results": [{"i": 0, "out": 1}, {"i": 1, "out": 2}]},
    "SLOTS": {"slots": 3},
    "CANCEL": _JOB,
    "PAUSE": _JOB,
    "RESUME": _JOB,
    "REQUEUE": _JOB,
}


@pytest.mark.parametrize("case", sorted(SUBMITTER_FORBIDDEN))
def test_auth_submitter_forbidden_messages_refused_store_unchanged(grid, case):
    """A submitter may not steer workers, the grid, credentials, leases, or another submitter's job."""
    alice = grid.as_client("alice")
    before = grid.state()
    body = SUBMITTER_FORBIDDEN[case]
    reply = refused(alice, case.split("-")[0], body)
    assert not alice.closed
    assert grid.state() == before
    assert not grid.w1.take("REVOKE") and not grid.w1.take("DRAIN")
    if case in ("CANCEL", "PAUSE", "RESUME", "REQUEUE"):
        assert reply.body["message"] == f"a submitter may only {case} its own jobs; job 1 is not"


WORKER_FORBIDDEN = {
    "SUBMIT": {"jobs": [{"type": "noop", "records": [1]}]},
    "CANCEL": _JOB,
    "PAUSE": _JOB,
    "RESUME": _JOB,
    "REQUEUE": _JOB,
    "SHOW": _JOB,
    "LIST": {},
    "RESULTS": _JOB,
    "WORKERS": {},
    "STATS": {},
    "WATCH": {"jobs": []},
    "WORKER": {"worker": "w2", "action": "disconnect"},
    "DISPATCH": {"enabled": False},
    "CREDENTIAL": {"action": "add", "id": "mine", "role": "admin"},
}


@pytest.mark.parametrize("verb", sorted(WORKER_FORBIDDEN))
def test_auth_worker_forbidden_messages_refused_store_unchanged(grid, verb):
    """A worker may only report on its own leases: no client verb, not even reads."""
    before = grid.state()
    reply = refused(grid.w1, verb, WORKER_FORBIDDEN[verb])
    assert reply.body["message"] == f"a worker may not send {verb}"
    assert grid.state() == before and not grid.w1.closed


@pytest.mark.parametrize("verb", ["RESULT", "PROGRESS", "DONE", "FAIL", "RETURN"])
def test_auth_worker_cannot_finish_another_workers_lease(grid, verb):
    """w2, holding a valid credential, naming w1's lease: stale_lease, nothing changes."""
    body = {"job": grid.job, "lease": grid.lease}
    body.update(
        {
            "RESULT": {"results": [{"i": 0, "out": "x"}]},
            "DONE": {"results": [{"i": 0, "out": "x"}, {"i": 1, "out": "y"}]},
            "FAIL": {"error": "no", "retry": False},
        }.get(verb, {})
    )
    before = grid.state()
    refused(grid.w2, verb, body, code="stale_lease")
    assert grid.state() == before


def test_auth_submitter_controls_its_own_jobs(grid):
    """bob may pause, resume, cancel and requeue the job he submitted; it records him as submitter."""
    assert run(grid.store.get_job(grid.job))["submitter"] == "bob"
    for verb, state in [("PAUSE", "paused"), ("RESUME", "queued"), ("CANCEL", "cancelled"), ("REQUEUE", "queued")]:
        reply = grid.bob.request(verb, {"job": grid.job})
        assert (reply.verb, reply.body["state"]) == ("OK", state), reply


def test_auth_submitter_own_job_check_on_unknown_job_is_unknown_job(grid):
    """A job that does not exist is unknown_job for a submitter too."""
    refused(grid.bob, "CANCEL", {"job": 99}, code="unknown_job")


def test_auth_submitter_may_read_everything_a_client_reads(grid):
    """Reads are not limited to one's own jobs: SHOW, LIST, RESULTS, WORKERS, STATS, WATCH."""
    alice = grid.as_client("alice")
    for verb, body in [
        ("SHOW", _JOB),
        ("LIST", {}),
        ("RESULTS", _JOB),
        ("WORKERS", {}),
        ("STATS", {}),
        ("WATCH", {"jobs": [1]}),
    ]:
        assert alice.request(verb, body).verb == "OK", verb
    [job_id] = alice.request("SUBMIT", {"jobs": [{"type": "noop", "records": [1]}]}).body["jobs"]
    assert run(grid.store.get_job(job_id))["submitter"] == "alice"


def test_auth_admin_controls_others_jobs_and_workers(grid):
    """An admin credential may steer any job, any worker and the grid."""
    root = grid.as_client("root")
    assert root.request("PAUSE", {"job": grid.job}).body["state"] == "paused"
    assert grid.w1.take("REVOKE") == [{"job": grid.job, "lease": grid.lease, "reason": "paused"}]
    assert root.request("WORKER", {"worker": "w2", "action": "drain"}).verb == "OK"
    assert root.request("DISPATCH", {"enabled": False}).body["dispatching"] is False


# -- managing credentials ----------------------------------------------------------------


def test_auth_credential_add_list_and_the_new_token_logs_in(grid):
    """CREDENTIAL add returns ID.SECRET once; list shows it without secrets; the token works."""
    root = grid.as_client("root")
    reply = root.request("CREDENTIAL", {"action": "add", "id": "desk-7", "role": "worker", "note": "Anna"})
    token = reply.body["token"]
    assert token.startswith("desk-7.") and len(token.split(".", 1)[1]) >= 43
    listed = root.request("CREDENTIAL", {"action": "list"}).body["credentials"]
    assert [c["id"] for c in listed] == ["alice", "bob", "desk-7", "root", "w1", "w2"]
    assert listed[2] == {"id": "desk-7", "role": "worker", "created": 0.0, "revoked": None, "note": "Anna"}
    assert all(set(c) == {"id", "role", "created", "revoked", "note"} for c in listed)
    grid.tokens["desk-7"] = token
    assert grid.as_worker("desk-7").proto.session.identity == Identity("desk-7", "worker")


@pytest.mark.parametrize(
    "body, code",
    [
        ({"action": "add", "id": "alice", "role": "admin"}, "already_exists"),
        ({"action": "add", "id": "new"}, "bad_request"),
        ({"action": "add", "role": "admin"}, "bad_request"),
        ({"action": "add", "id": "bad.id", "role": "admin"}, "bad_request"),
        ({"action": "revoke", "id": "nobody"}, "unknown_credential"),
        ({"action": "revoke"}, "bad_request"),
        ({"action": "revoke", "id": "root"}, "forbidden"),
    ],
    ids=["exists", "no-role", "no-id", "bad-id", "unknown", "revoke-no-id", "own"],
)
def test_auth_credential_bad_requests_refused_unchanged(grid, body, code):
    """Taken ids, missing fields, unknown ids and revoking one's own credential are refused; nothing changes."""
    root = grid.as_client("root")
    before = grid.state()
    refused(root, "CREDENTIAL", body, code=code)
    assert grid.state() == before and not root.closed


def test_auth_store_keeps_only_hashes():
    """No stored row holds a token's secret; the row holds its sha256."""
    s = AuthStack()
    token = s.add("desk-7", "worker")
    secret = token.split(".", 1)[1]
    rows = repr(s.store._data)
    assert secret not in rows and token not in rows
    assert run(s.store.get_credential("desk-7"))["secret_hash"] == hash_secret(secret)
    s.stop()


@pytest_twisted.ensureDeferred
async def test_auth_sqlite_file_holds_no_secret(tmp_path):
    """In a real database file, too, only the hash of a new credential's secret is written."""
    path = tmp_path / "gridd.db"
    store = SQLiteStore(str(path))
    await store.start()
    try:
        authenticator = Authenticator(store, MemoryClock(), shared_secret=None)
        token = await defer_of(authenticator.add("cron", "submitter"))
        assert await authenticator.check("c", "client", token) == Identity("cron", "submitter")
    finally:
        await store.stop()
    secret = token.split(".", 1)[1]
    with sqlite3.connect(path) as db:
        dump = "\n".join(db.iterdump())
    assert hash_secret(secret) in dump and secret not in dump
    assert secret.encode() not in path.read_bytes()


class MemoryClock:
    def seconds(self):
        return 1_000_000.0


# -- revocation ---------------------------------------------------------------------------


def test_auth_revocation_closes_live_connections_at_once(grid):
    """Revoking w1 and bob: BYE and close on each of their connections, w1's job back to the queue."""
    root = grid.as_client("root")
    second_bob = grid.as_client("bob", name="bob-laptop")
    grid.w2.take_all()
    assert root.request("CREDENTIAL", {"action": "revoke", "id": "w1"}).verb == "OK"
    assert grid.w1.take("BYE") == [{"reason": "credential revoked"}] and grid.w1.closed
    assert "w1" not in grid.dispatcher.workers
    # w1's lease ended as for a lost worker, and the job went on to w2.
    [pushed] = grid.w2.take("JOB")
    assert (pushed["job"], pushed["attempt"]) == (grid.job, 2)
    assert run(grid.store.get_job(grid.job))["worker"] == "w2"
    assert root.request("CREDENTIAL", {"action": "revoke", "id": "bob"}).verb == "OK"
    for peer in (grid.bob, second_bob):
        assert peer.take("BYE") == [{"reason": "credential revoked"}] and peer.closed
    assert not root.closed and not grid.w2.closed
    revoked = {c["id"]: c["revoked"] for c in root.request("CREDENTIAL", {"action": "list"}).body["credentials"]}
    assert revoked["w1"] == revoked["bob"] == 0.0 and revoked["alice"] is None


def test_auth_revocation_ends_the_leases_of_a_worker_that_holds_its_connection_open(grid):
    """A revoked worker that does not let its connection go loses its lease at the BYE, not at the close timeout."""
    root = grid.as_client("root")
    grid.w2.take_all()
    grid.w1.holds_open = True
    assert root.request("CREDENTIAL", {"action": "revoke", "id": "w1"}).verb == "OK"
    assert grid.w1.take("BYE") == [{"reason": "credential revoked"}] and grid.w1.closed and not grid.w1.lost
    assert "w1" not in grid.dispatcher.workers
    [pushed] = grid.w2.take("JOB")
    assert (pushed["job"], pushed["attempt"]) == (grid.job, 2)
    # What it still sends is not acted upon.
    grid.w1.send("RESULT", {"rid": 9, "job": grid.job, "lease": "L1", "results": [{"i": 1, "out": 1}]})
    assert grid.w1.take_all() == []
    assert run(grid.store.get_job(grid.job))["accepted"] == 0


def test_auth_revoked_token_cannot_log_in_again(grid):
    """After revocation the token is refused with auth_failed; other credentials work on."""
    root = grid.as_client("root")
    root.request("CREDENTIAL", {"action": "revoke", "id": "alice"})
    peer, reply = grid.login("client", "c", grid.tokens["alice"])
    assert reply.body["code"] == "auth_failed" and peer.closed
    assert grid.as_client("bob", name="again")


def test_auth_revocation_during_handshake_closes_it(grid):
    """A connection whose HELLO is still waiting (name arbitration) is closed too."""
    root = grid.as_client("root")
    # w1 connects again while its first connection lives: the server PINGs the old one and waits.
    second, reply = grid.login("worker", "w1", grid.tokens["w1"])
    assert reply is None and grid.w1.take("PING")
    root.request("CREDENTIAL", {"action": "revoke", "id": "w1"})
    assert second.take("BYE") == [{"reason": "credential revoked"}] and second.closed
    assert grid.w1.closed
    grid.advance(grid.dispatcher.beat)  # the arbitration times out on a closed connection: nothing more
    assert "w1" not in grid.dispatcher.workers


def test_auth_memory_store_sibling_sees_credentials():
    """Credentials live in the shared data: a second server on the same store knows them."""
    store = MemoryStore()
    run(store.start())
    run(store.add_credential("x", "admin", "h" * 64, 0.0))
    other = store.sibling("B")
    run(other.start())
    assert run(other.get_credential("x"))["role"] == "admin"


# -- end to end ---------------------------------------------------------------------------


@pytest.mark.e2e
@pytest_twisted.ensureDeferred
async def test_auth_e2e_credentials_for_a_real_worker_and_submitter(tmp_path):
    """An admin makes credentials; a real worker and a submitter use them; revoking cuts the worker at once."""
    from twisted.internet import reactor

    from gridd.client import connect
    from gridd.launch import LocalGrid

    grid = LocalGrid(reactor, tmp_path)
    clients = []
    try:
        await grid.start_server()
        admin = await connect(reactor, grid.endpoint, grid.secret, name="admin")
        clients.append(admin)
        worker_token = await admin.add_credential("desk-1", "worker", note="e2e worker")
        submitter_token = await admin.add_credential("cron", "submitter")
        secret_file = tmp_path / "desk-1.secret"
        secret_file.write_text(worker_token + "\n")
        secret_file.chmod(0o600)
        await grid.start_worker("desk-1", 1, "--secret-file", str(secret_file))
        await grid.server.wait_for(r"worker desk-1 ready as credential desk-1 \(worker\)")

        submitter = await connect(reactor, grid.endpoint, submitter_token, name="cron-job")
        clients.append(submitter)
        ids = await submitter.submit([{"type": "noop", "records": [1, 2, 3]}])
        statuses = await submitter.wait(ids)
        assert [s["state"] for s in statuses.values()] == ["done"]
        assert grid.db_rows("SELECT submitter FROM jobs WHERE id = ?", ids[0]) == [("cron",)]
        assert {role for (role,) in grid.db_rows("SELECT role FROM credentials")} == {"worker", "submitter"}
        stored = repr(grid.db_rows("SELECT * FROM credentials"))
        for token in (worker_token, submitter_token):
            assert token.split(".", 1)[1] not in stored

        since = len(grid.server.lines)
        await admin.revoke_credential("desk-1")
        await grid.server.wait_for(r"credential desk-1 revoked: closing its 1 connections", since)
        await grid.server.wait_for(r"worker desk-1 gone \(disconnected\)", since)
        # The worker reconnects with its revoked token and is refused.
        await grid.server.wait_for(r"credential desk-1 refused \(revoked\)", since)
        assert [w["name"] for w in await admin.workers()] == []
    finally:
        for c in clients:
            await c.close()
        await grid.stop_all()
