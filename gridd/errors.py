"""The errors gridd can answer with, one class per stable wire code.

Every layer raises these: the wire parser (framing errors), the session
(handshake and roles), the dispatcher (leases, states) and the store
(fencing and once-only checks it enforces itself). The server turns any of
them into ``ERR {"rid": ..., "code": ..., "message": ..., **extra}``; the
client API turns such a reply back into the same class. ``protocols/PROTOCOL.md``
defines every code; a rejected request never changes state, except that
after ``commit_unknown`` it may have.
"""

from __future__ import annotations

__all__ = ["GriddError", "error_for_code"]


class GriddError(Exception):
    """A request the server refuses, with a stable ``code`` for machines.

    ``close`` says whether the server closes the connection after replying.
    ``extra`` holds additional reply fields (for example the offending
    record indices of a duplicate result).
    """

    code = "internal"
    close = False
    #: The rid of the request being refused, when the raiser knows it.
    rid = None
    default_message = "internal error"

    def __init__(self, message: str | None = None, **extra):
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def to_body(self, rid=None) -> dict:
        body = {"rid": self.rid if rid is None else rid, "code": self.code, "message": self.message}
        body.update(self.extra)
        return body


# Framing and parsing (gridd.wire).


class BadLine(GriddError):
    code = "bad_line"
    default_message = "line is not UTF-8 text of the form VERB [JSON-object]"


class BadJSON(GriddError):
    code = "bad_json"
    default_message = "message body is not a JSON object"


class LineTooLong(GriddError):
    code = "line_too_long"
    default_message = "line exceeds the maximum line length"
    close = True


class UnknownVerb(GriddError):
    code = "unknown_verb"
    default_message = "unknown verb"


class BadRequest(GriddError):
    code = "bad_request"
    default_message = "missing or invalid field"


# Handshake and roles (gridd.server.session).


class HelloRequired(GriddError):
    code = "hello_required"
    default_message = "the first message must be HELLO"
    close = True


class UnsupportedProto(GriddError):
    code = "unsupported_proto"
    default_message = "protocol version not supported"
    close = True


class AuthFailed(GriddError):
    code = "auth_failed"
    default_message = "authentication failed"
    close = True


class NameInUse(GriddError):
    code = "name_in_use"
    default_message = "a live worker already uses this name"
    close = True


class HandshakeTimeout(GriddError):
    code = "handshake_timeout"
    default_message = "no HELLO within the handshake deadline"
    close = True


class Forbidden(GriddError):
    code = "forbidden"
    default_message = "this connection's role may not send this message"


class UnknownCredential(GriddError):
    code = "unknown_credential"
    default_message = "no credential with this id"


class AlreadyExists(GriddError):
    code = "already_exists"
    default_message = "a credential with this id already exists"


class AlreadyReady(GriddError):
    code = "already_ready"
    default_message = "HELLO was already accepted on this connection"


# Jobs, leases and results (gridd.scheduler, gridd.store).


class UnknownJob(GriddError):
    code = "unknown_job"
    default_message = "no such job"


class UnknownWorker(GriddError):
    code = "unknown_worker"
    default_message = "no such worker is connected"


class StaleLease(GriddError):
    code = "stale_lease"
    default_message = "lease is expired, revoked or not yours"


class UnknownRecord(GriddError):
    code = "unknown_record"
    default_message = "no such record in this job"


class DuplicateResult(GriddError):
    code = "duplicate_result"
    default_message = "a result for this record was already accepted"


class Incomplete(GriddError):
    code = "incomplete"
    default_message = "not every record of the job has an accepted result"


class InvalidState(GriddError):
    code = "invalid_state"
    default_message = "the job is not in a state that allows this"


class TooMany(GriddError):
    code = "too_many"
    default_message = "request exceeds a limit"


class TooLarge(GriddError):
    code = "too_large"
    default_message = "a job is too large to be sent to a worker in one line"


# Server condition.


class Unavailable(GriddError):
    code = "unavailable"
    default_message = "the store is unavailable; retry later"


class CommitUnknown(Unavailable):
    """The database connection was lost during COMMIT: the change may or may not have been made.

    An ``Unavailable`` to whoever retries (a worker sends its RESULT again
    and learns from ``duplicate_result`` what was accepted), and the one
    refusal after which state may have changed.
    """

    code = "commit_unknown"
    default_message = "the database connection was lost during COMMIT: the change may or may not have been made"


class ShuttingDown(GriddError):
    code = "shutting_down"
    default_message = "the server is shutting down"


def _codes(cls: type[GriddError]):
    for sub in cls.__subclasses__():
        yield sub
        yield from _codes(sub)


_BY_CODE: dict[str, type[GriddError]] = {cls.code: cls for cls in _codes(GriddError)}
__all__ += [cls.__name__ for cls in _BY_CODE.values()]


def error_for_code(code: str, message: str | None = None, **extra) -> GriddError:
    """Rebuild the exception for an ``ERR`` reply received from a peer."""
    cls = _BY_CODE.get(code, GriddError)
    err = cls(message, **extra)
    if cls is GriddError:
        err.code = code
    return err
