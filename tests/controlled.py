"""A store the tests control call by call: hold an answer, let it go, fail a call, lose its answer.

Every test that needs the store to answer late, out of order, wrongly or
not at all uses this one wrapper of a :class:`~gridd.store.memory.MemoryStore`,
so that "memory follows the store, in the store's commit order" is tested
in one vocabulary:

- ``hold(name)``: calls of ``name`` are held. By default the work is done
  at the call and only the answer waits (a database that committed and has
  not answered yet); with ``work=False`` nothing happens until the call is
  answered, or until ``call.work()`` says when it looks at the data (a
  database that hangs, or a read whose snapshot is taken later).
  (The vocabulary's words are none of the store's methods, which the
  wrapper passes through: ``release`` is the store's, ``answer`` the test's.)
- ``answer(name)``, ``answer_all()``, ``let_go(pick)``: held calls answer.
- ``fail(name, error)``: calls of ``name`` fail with ``error`` and change
  nothing (a database that is down, or a write that never committed and
  whose outcome is reported unknown).
- ``lose(name)``: the next call of ``name`` (by default: the next write a
  request makes) does its work, then answers ``commit_unknown``, as when
  the connection to the database is lost during a COMMIT that was made.
- ``clear(name)``: no more rules for ``name`` (calls held stay held).

Each rule lasts ``times`` calls (``None``: until cleared); the oldest rule
for a method applies first. ``in_commit_order=True`` makes the store answer
writes as a database's group committer does: a write made while another
write's answer is held is held too, and held writes answer oldest first
(held reads answer in any order).

Every call is recorded in ``calls`` with its cause: the request on whose
behalf it was made, which the test sets in ``cause`` while it sends one.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.python.failure import Failure

from gridd import errors
from gridd.store.memory import MemoryStore

__all__ = ["Call", "ControlledStore", "HOUSEKEEPING", "WRITES"]

#: The store's writes, those a request makes and the server's own.
WRITES = frozenset(
    {"submit", "grant", "add_results", "complete", "release", "set_state", "end_lease", "take_lease"}
    | {"add_credential", "revoke_credential", "beat", "expire_servers"}
)
#: Writes no request makes: ``lose()`` without a name leaves them alone.
HOUSEKEEPING = frozenset({"beat", "expire_servers"})
_REQUEST_WRITES = WRITES - HOUSEKEEPING

#: The request on whose behalf the code that calls the store runs. A context
#: variable, so that a coroutine started while a request was sent keeps it
#: across its awaits (``Deferred.fromCoroutine`` runs each step in the
#: context it started in), whichever store answer resumes it.
_cause: ContextVar[tuple | None] = ContextVar("cause", default=None)


@dataclass(eq=False)
class Call:
    """One call on the store: what, with what, on whose behalf, and how it went."""

    name: str
    args: tuple
    kwargs: dict
    #: Whatever the test set as the cause when the call was made (None: a timer, say).
    cause: tuple | None
    #: The work succeeded (done at the call, or when answered, or at ``work()``).
    succeeded: bool | None = None
    #: The caller has been given the answer.
    answered: bool = False
    _method: object = None
    _lose: bool = False
    _result: defer.Deferred | None = None
    _answer: defer.Deferred = field(default_factory=defer.Deferred)

    def work(self) -> Call:
        """Do the call's work now, if it is not done yet (its answer still waits)."""
        if self._result is None:
            self._result = defer.maybeDeferred(self._method, *self.args, **self.kwargs)
            self._result.addBoth(self._worked)
        return self

    def _worked(self, result):
        self.succeeded = not isinstance(result, Failure)
        if self._lose and self.succeeded:
            return Failure(errors.CommitUnknown("the database connection was lost during COMMIT"))
        return result

    def _answered(self, result):
        self.answered = True
        return result

    def _let_answer(self):
        self.work()._result.chainDeferred(self._answer)


@dataclass
class _Rule:
    kind: str  # "hold", "fail" or "lose"
    name: str | None  # None: any write a request makes
    times: int | None
    work: bool = True
    error: BaseException | None = None

    def matches(self, name: str) -> bool:
        return self.name == name or (self.name is None and name in _REQUEST_WRITES)


class ControlledStore:
    """A memory store whose calls the test holds, answers, fails and loses, per method."""

    def __init__(self, inner: MemoryStore | None = None, *, server_id=None, in_commit_order=False):
        self.inner = inner if inner is not None else MemoryStore(server_id)
        self.in_commit_order = in_commit_order
        #: Every call made, in order.
        self.calls: list[Call] = []
        #: The calls whose answers wait, in the order they were made.
        self.held: list[Call] = []
        self._rules: list[_Rule] = []

    def sibling(self, server_id: str) -> ControlledStore:
        """Another controlled store on the same data, as another server on the same database."""
        return ControlledStore(self.inner.sibling(server_id), in_commit_order=self.in_commit_order)

    # -- the test's vocabulary ------------------------------------------

    @property
    def cause(self) -> tuple | None:
        return _cause.get()

    @cause.setter
    def cause(self, value: tuple | None):
        _cause.set(value)

    def hold(self, *names: str, work: bool = True, times: int | None = None):
        """Hold the answers of these methods' calls (and their work too, unless ``work``)."""
        self._rules += [_Rule("hold", name, times, work=work) for name in names]

    def fail(self, name: str, error: BaseException, *, times: int | None = None):
        """Calls of ``name`` fail with ``error`` and change nothing."""
        self._rules.append(_Rule("fail", name, times, error=error))

    def lose(self, name: str | None = None, *, times: int | None = 1):
        """The next call of ``name`` (None: any request's write) is made, then answered ``commit_unknown``."""
        self._rules.append(_Rule("lose", name, times))

    def clear(self, *names: str):
        """No more rules for these methods (none named: for any); held calls stay held."""
        self._rules = [r for r in self._rules if names and r.name not in names]

    def answer(self, name: str) -> Call:
        """Let the oldest held call of ``name`` answer."""
        for call in self.held:
            if call.name == name:
                return self._release(call)
        raise AssertionError(f"no {name} call is held")

    def answer_all(self, name: str | None = None):
        """Let every held call (of ``name``) answer, oldest first, until none is held."""
        while True:
            waiting = [call for call in self.held if name is None or call.name == name]
            if not waiting:
                return
            self._release(waiting[0])

    def releasable(self) -> list[int]:
        """Positions in ``held`` that may answer now: any, or in commit order any read and the oldest write."""
        if not self.in_commit_order:
            return list(range(len(self.held)))
        writes = [k for k, call in enumerate(self.held) if call.name in WRITES]
        return [k for k, call in enumerate(self.held) if call.name not in WRITES] + writes[:1]

    def let_go(self, pick: int) -> Call:
        """Let the ``pick``-th releasable held call answer (modulo)."""
        options = self.releasable()
        return self._release(self.held[options[pick % len(options)]])

    # -- the calls ------------------------------------------------------

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name.startswith("_") or not callable(method):
            return method

        def call(*args, **kwargs):
            return self._call(Call(name, args, kwargs, _cause.get(), _method=method))

        return call

    def _call(self, call: Call) -> defer.Deferred:
        self.calls.append(call)
        rule = self._take_rule(call.name)
        answer = call._answer
        answer.addBoth(call._answered)
        if rule is not None and rule.kind == "fail":
            call.succeeded = False
            answer.errback(Failure(rule.error))
            return answer
        call._lose = rule is not None and rule.kind == "lose"
        held = rule is not None and rule.kind == "hold"
        if not held or rule.work:
            call.work()
        if held or self.in_commit_order and call.name in WRITES and self._write_held():
            self.held.append(call)
        else:
            call._let_answer()
        return answer

    def _take_rule(self, name: str) -> _Rule | None:
        for rule in self._rules:
            if rule.matches(name):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times == 0:
                        self._rules.remove(rule)
                return rule
        return None

    def _write_held(self) -> bool:
        return any(call.name in WRITES for call in self.held)

    def _release(self, call: Call) -> Call:
        """Answer ``call``, on behalf of its cause."""
        self.held.remove(call)
        token = _cause.set(call.cause)
        try:
            call._let_answer()
        finally:
            _cause.reset(token)
        return call
