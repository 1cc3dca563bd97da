"""Framing and parsing of the gridd line protocol (protocols/PROTOCOL.md).

Pure functions and constants: no state, no I/O. A line is ``VERB`` or
``VERB SP JSON-object``; :func:`parse_line` turns the bytes of one line into a
:class:`Message` whose body has been checked against the verb's field
specification, or raises the ``gridd.errors`` class the spec names.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from gridd import errors

__all__ = [
    "PROTO",
    "DEFAULT_MAX_LINE",
    "PRE_HELLO_MAX_LINE",
    "CREDENTIAL_ID",
    "ROLES",
    "WORKER_STATES",
    "HELLO_STATES",
    "WORKER_ACTIONS",
    "Message",
    "parse_line",
    "encode",
    "PEER_VERBS",
    "NOTIFICATIONS",
    "SERVER_VERBS",
]

PROTO = 1
DEFAULT_MAX_LINE = 1_048_576
#: The limit a peer must assume before the HELLO reply announces the real one.
PRE_HELLO_MAX_LINE = 65_536
#: How deeply a body may nest lists and objects (the body itself is level 1).
MAX_DEPTH = 64
#: The most job ids one WATCH may name.
MAX_WATCH = 10_000
#: A credential's id: the part of its token before the first ``.`` (PROTOCOL.md section 13).
CREDENTIAL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: The roles a credential may have.
ROLES = ("worker", "submitter", "admin")
#: What a worker says of its host (``STATE``); a HELLO may say only the first two.
WORKER_STATES = ("idle", "busy", "vacating")
HELLO_STATES = ("idle", "busy")
#: What an operator may do to a worker (``WORKER``).
WORKER_ACTIONS = ("drain", "undrain", "disconnect", "busy", "idle", "clear")

_VERB = re.compile(rb"[A-Z]{1,16}\Z")
_MAX_INT = 2**53 - 1

#: Messages that are no request and get no reply, in either direction (PROTOCOL.md 2).
NOTIFICATIONS = frozenset({"BEAT", "PONG", "PING", "JOB", "REVOKE", "DRAIN", "HOST", "EVENT", "BYE"})


@dataclass(frozen=True)
class Message:
    verb: str
    body: dict

    @property
    def rid(self) -> int | None:
        """The request id a reply names: a request's checked ``rid``; None for a notification.

        A notification has no rid (PROTOCOL.md 2): whatever its body holds
        under "rid" is not one, is never echoed, and makes it no request.
        """
        if self.verb in NOTIFICATIONS:
            return None
        rid = self.body.get("rid")
        return rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= _MAX_INT else None


# -- field specifications --------------------------------------------------
#
# Each verb maps to {field: (check, required)}. A check is a function that
# returns True for an acceptable value. Unknown fields are ignored (the spec
# says so: that is how the protocol grows within a version).


def _int(lo=0, hi=_MAX_INT):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _num(lo=0.0, hi=_MAX_INT):
    # Bounded above: a huge integer (JSON allows thousands of digits) cannot
    # become a float, and a duration is used as one (timers, JOB's timeout).
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _str(lo=0, hi=1 << 20):
    return lambda v: isinstance(v, str) and lo <= len(v) <= hi


def _list_of(check, lo=0, hi=_MAX_INT):
    return lambda v: isinstance(v, list) and lo <= len(v) <= hi and all(check(x) for x in v)


def _is_bool(v):
    return isinstance(v, bool)


def _is_obj(v):
    return isinstance(v, dict)


def _any(v):
    return True


def _one_of(*choices):
    return lambda v: v in choices


def _record_result(v):
    if not isinstance(v, dict) or not _int()(v.get("i")):
        return False
    has_out, has_error = "out" in v, "error" in v
    return has_out != has_error and (not has_error or isinstance(v["error"], str))


def _holding(v):
    return isinstance(v, dict) and _int()(v.get("job")) and _str(1, 128)(v.get("lease"))


def _types(v):
    return isinstance(v, dict) and all(_str(1, 128)(k) and _str(0, 64)(ver) for k, ver in v.items())


def _requires(v):
    if not isinstance(v, dict):
        return False
    return (
        _int()(v.get("memory", 0)) and _list_of(_str(1, 128))(v.get("tags", [])) and _str(0, 64)(v.get("version", ""))
    )


def _jobspec(v):
    if not isinstance(v, dict):
        return False
    checks = {
        "type": (_str(1, 128), True),
        "records": (_list_of(_any, lo=1), True),
        "params": (_is_obj, False),
        "priority": (_int(-1_000_000, 1_000_000), False),
        "requires": (_requires, False),
        "retries": (_int(0, 1000), False),
        "timeout": (_num(0.001), False),
        "name": (_str(0, 256), False),
    }
    return _problem(v, checks) is None


_RID = (_int(), True)
_JOB = (_int(), True)
_LEASE = (_str(1, 128), True)
_RESULTS = (_list_of(_record_result, lo=1), True)

#: Verbs a peer (worker or client) sends, with their fields.
PEER_VERBS: dict[str, dict] = {
    "HELLO": {
        "rid": _RID,
        "proto": (_int(), True),
        "role": (_one_of("worker", "client"), True),
        "name": (_str(1, 128), True),
        "token": (_str(0, 4096), True),
        "agent": (_str(0, 256), False),
        "slots": (_int(0, 100_000), False),
        "types": (_types, False),
        "memory": (_int(), False),
        "tags": (_list_of(_str(1, 128), hi=256), False),
        "holding": (_list_of(_holding, hi=100_000), False),
        "state": (_one_of(*HELLO_STATES), False),
    },
    "BEAT": {"load": (_num(), False)},
    "PONG": {"n": (_int(), False)},
    # worker
    "RESULT": {"rid": _RID, "job": _JOB, "lease": _LEASE, "results": _RESULTS},
    "PROGRESS": {"rid": _RID, "job": _JOB, "lease": _LEASE, "note": (_str(0, 4096), False)},
    "DONE": {"rid": _RID, "job": _JOB, "lease": _LEASE, "results": (_list_of(_record_result), False)},
    "FAIL": {
        "rid": _RID,
        "job": _JOB,
        "lease": _LEASE,
        "error": (_str(0, 65_536), True),
        "retry": (_is_bool, False),
    },
    "RETURN": {
        "rid": _RID,
        "job": _JOB,
        "lease": _LEASE,
        "reason": (_str(0, 4096), False),
        "vacate": (_is_bool, False),
    },
    "SLOTS": {"rid": _RID, "slots": (_int(0, 100_000), True)},
    "STATE": {"rid": _RID, "state": (_one_of(*WORKER_STATES), True), "reason": (_str(0, 4096), False)},
    "CHECK": {"rid": _RID, "holding": (_list_of(_holding, hi=100_000), True)},
    # client
    "SUBMIT": {"rid": _RID, "jobs": (_list_of(_jobspec, lo=1), True)},
    "SHOW": {"rid": _RID, "job": _JOB},
    "LIST": {
        "rid": _RID,
        "state": (_str(1, 32), False),
        "type": (_str(1, 128), False),
        "after": (_int(), False),
        "limit": (_int(1, 1000), False),
    },
    "RESULTS": {
        "rid": _RID,
        "job": _JOB,
        "after": (_int(-1), False),
        "limit": (_int(1, 10_000), False),
    },
    "WORKERS": {"rid": _RID},
    "STATS": {"rid": _RID},
    "WATCH": {"rid": _RID, "jobs": (_list_of(_int(), hi=MAX_WATCH), True)},
    "CANCEL": {"rid": _RID, "job": _JOB},
    "PAUSE": {"rid": _RID, "job": _JOB},
    "RESUME": {"rid": _RID, "job": _JOB},
    "REQUEUE": {"rid": _RID, "job": _JOB},
    "WORKER": {
        "rid": _RID,
        "worker": (_str(1, 128), True),
        "action": (_one_of(*WORKER_ACTIONS), True),
        "reason": (_str(0, 4096), False),
    },
    "DISPATCH": {"rid": _RID, "enabled": (_is_bool, True)},
    "CREDENTIAL": {
        "rid": _RID,
        "action": (_one_of("add", "list", "revoke"), True),
        "id": (lambda v: isinstance(v, str) and CREDENTIAL_ID.match(v) is not None, False),
        "role": (_one_of(*ROLES), False),
        "note": (_str(0, 1024), False),
    },
}

#: Verbs the server sends. Peers parse them with ``parse_line(..., SERVER_VERBS)``.
SERVER_VERBS: dict[str, dict] = {
    "OK": {"rid": (lambda v: v is None or _int()(v), True)},
    "ERR": {
        "rid": (lambda v: v is None or _int()(v), True),
        "code": (_str(1, 64), True),
        "message": (_str(0, 65_536), False),
    },
    "BEAT": {},
    "PING": {"n": (_int(), True)},
    "JOB": {
        "job": _JOB,
        "lease": _LEASE,
        "type": (_str(1, 128), True),
        "attempt": (_int(1), True),
        "params": (_is_obj, True),
        "total": (_int(1), True),
        "records": (_list_of(lambda r: isinstance(r, dict) and _int()(r.get("i")) and "data" in r), True),
        "timeout": (_num(), True),
        "memory": (_int(0), False),
    },
    "REVOKE": {"job": _JOB, "lease": _LEASE, "reason": (_str(0, 256), True)},
    "DRAIN": {"drain": (_is_bool, True)},
    "HOST": {"busy": (_is_bool, True), "reason": (_str(0, 4096), False)},
    "EVENT": {"job": _JOB, "state": (_str(1, 32), True)},
    "BYE": {"reason": (_str(0, 256), False)},
}


def _problem(body: dict, spec: dict) -> str | None:
    """Return a description of the first field that breaks ``spec``, or None."""
    for name, (check, required) in spec.items():
        if name not in body:
            if required:
                return f"missing field {name!r}"
            continue
        if not check(body[name]):
            return f"invalid field {name!r}"
    return None


def parse_line(line: bytes, verbs: dict[str, dict] = PEER_VERBS) -> Message:
    """Parse one line (without its LF) into a checked :class:`Message`.

    Raises ``BadLine``, ``BadJSON``, ``UnknownVerb`` or ``BadRequest``; the
    exception's ``rid`` attribute holds the request's ``rid`` when one could
    be read, so the reply can name it.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    verb_bytes, _, rest = line.partition(b" ")
    if not _VERB.match(verb_bytes):
        raise errors.BadLine()
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise errors.BadLine("line is not valid UTF-8") from None
    verb = verb_bytes.decode("ascii")
    if text.strip():
        try:
            body = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except (ValueError, RecursionError):
            raise errors.BadJSON() from None
        if not isinstance(body, dict):
            raise errors.BadJSON()
        if text.count("[") + text.count("{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
            raise errors.BadJSON(f"message body nests deeper than {MAX_DEPTH} levels")
        if _SURROGATE_ESCAPE.search(text) and not _encodable(body):
            raise errors.BadJSON("message body has a string with a lone surrogate (\\uD800-\\uDFFF)")
    else:
        body = {}
    spec = verbs.get(verb)
    if spec is None:
        # Not a verb of this direction: not a notification either, so a valid rid is named.
        raise _with_rid(errors.UnknownVerb(f"unknown verb {verb}"), None, body)
    problem = _problem(body, spec)
    if problem is not None:
        raise _with_rid(errors.BadRequest(f"{verb}: {problem}"), verb, body)
    return Message(verb, body)


def _depth(value) -> int:
    """How deeply ``value`` nests lists and objects (stops counting past MAX_DEPTH)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_DEPTH:
        value, depth = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((v, depth + 1) for v in value)
    return deepest


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text):
    # 1e400 parses as infinity, which no JSON encoder will send back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


#: A ``\uD800``-``\uDFFF`` escape: JSON decodes an unpaired one into a string
#: that cannot be encoded as UTF-8 again (so could never be stored or echoed).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _encodable(body: dict) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def _with_rid(err: errors.GriddError, verb: str | None, body: dict) -> errors.GriddError:
    """``err`` naming the line's rid, as ``Message.rid`` reads it (None for a notification)."""
    err.rid = Message(verb or "", body).rid
    return err


def encode(verb: str, body: dict[str, Any] | None = None) -> bytes:
    """Serialise one message to a line, LF included."""
    if not body:
        return verb.encode("ascii") + b"\n"
    return b"%s %s\n" % (
        verb.encode("ascii"),
        json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8"),
    )
