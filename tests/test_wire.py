"""gridd.wire on its own: every framing error for its input, round trips, and properties over arbitrary bytes."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineOnlyReceiver

from gridd import errors, wire
from gridd.server.protocol import ServerFactory, ServerProtocol

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: A valid body for every verb a peer sends; the round-trip tests insist on one per verb.
PEER_EXAMPLES = {
    "HELLO": {
        "rid": 1,
        "proto": 1,
        "role": "worker",
        "name": "w1",
        "token": "s3cret",
        "agent": "gridd/0.1.0",
        "slots": 2,
        "types": {"noop": "1.0", "textstats": "1.2"},
        "memory": 512,
        "tags": ["gpu", "linux"],
        "holding": [{"job": 3, "lease": "L3"}],
        "state": "busy",
    },
    "BEAT": {"load": 0.25},
    "PONG": {"n": 3},
    "RESULT": {"rid": 2, "job": 1, "lease": "L1", "results": [{"i": 0, "out": {"x": [1, 2]}}, {"i": 1, "error": "no"}]},
    "PROGRESS": {"rid": 3, "job": 1, "lease": "L1", "note": "half way"},
    "DONE": {"rid": 4, "job": 1, "lease": "L1", "results": [{"i": 2, "out": None}]},
    "FAIL": {"rid": 5, "job": 1, "lease": "L1", "error": "handler raised", "retry": False},
    "RETURN": {"rid": 6, "job": 1, "lease": "L1", "reason": "host busy", "vacate": True},
    "SLOTS": {"rid": 7, "slots": 0},
    "STATE": {"rid": 22, "state": "vacating", "reason": "keyboard in use"},
    "CHECK": {"rid": 23, "holding": [{"job": 1, "lease": "L1"}, {"job": 2, "lease": "L2"}]},
    "SUBMIT": {
        "rid": 8,
        "jobs": [
            {
                "type": "noop",
                "records": ["a", 1, None, {"k": [True]}],
                "params": {"k": "v"},
                "priority": -5,
                "requires": {"memory": 64, "tags": ["gpu"], "version": "1.2"},
                "retries": 0,
                "timeout": 30.5,
                "name": "nightly",
            }
        ],
    },
    "SHOW": {"rid": 9, "job": 1},
    "LIST": {"rid": 10, "state": "queued", "type": "noop", "after": 0, "limit": 10},
    "RESULTS": {"rid": 11, "job": 1, "after": -1, "limit": 100},
    "WORKERS": {"rid": 12},
    "STATS": {"rid": 13},
    "WATCH": {"rid": 14, "jobs": [1, 2]},
    "CANCEL": {"rid": 15, "job": 1},
    "PAUSE": {"rid": 16, "job": 1},
    "RESUME": {"rid": 17, "job": 1},
    "REQUEUE": {"rid": 18, "job": 1},
    "WORKER": {"rid": 19, "worker": "w1", "action": "busy", "reason": "VM host in use"},
    "DISPATCH": {"rid": 20, "enabled": False},
    "CREDENTIAL": {"rid": 21, "action": "add", "id": "desk-7", "role": "worker", "note": "Anna's desktop"},
}

#: A valid body for every verb the server sends.
SERVER_EXAMPLES = {
    "OK": {"rid": 1, "proto": 1, "server": "gridd/0.1.0", "beat": 2.0, "deadline": 6.0, "kept": [], "lost": []},
    "ERR": {"rid": None, "code": "bad_json", "message": "message body is not a JSON object"},
    "BEAT": {},
    "PING": {"n": 1},
    "JOB": {
        "job": 1,
        "lease": "L1",
        "type": "noop",
        "attempt": 1,
        "params": {},
        "total": 2,
        "records": [{"i": 0, "data": "a"}, {"i": 1, "data": None}],
        "timeout": 3600.0,
        "memory": 512,
    },
    "REVOKE": {"job": 1, "lease": "L1", "reason": "cancelled"},
    "DRAIN": {"drain": True},
    "HOST": {"busy": True, "reason": "VM host in use"},
    "EVENT": {"job": 1, "state": "done", "accepted": 2, "total": 2},
    "BYE": {"reason": "shutdown"},
}

#: Each direction's verbs and examples, by name.
DIRECTIONS = {"peer": (wire.PEER_VERBS, PEER_EXAMPLES), "server": (wire.SERVER_VERBS, SERVER_EXAMPLES)}


def parse(text: str | bytes, verbs=wire.PEER_VERBS) -> wire.Message:
    return wire.parse_line(text.encode("utf-8") if isinstance(text, str) else text, verbs)


def line(verb: str, body: dict) -> bytes:
    """The line ``encode`` makes, without its LF."""
    return wire.encode(verb, body)[:-1]


def refused(data: bytes, verbs=wire.PEER_VERBS) -> errors.GriddError:
    with pytest.raises(errors.GriddError) as info:
        wire.parse_line(data, verbs)
    return info.value


# -- the examples themselves ------------------------------------------------


def test_examples_cover_every_verb():
    """Every verb of both directions has an example body, so no verb escapes the round-trip tests."""
    assert set(PEER_EXAMPLES) == set(wire.PEER_VERBS)
    assert set(SERVER_EXAMPLES) == set(wire.SERVER_VERBS)


@pytest.mark.parametrize("verb", sorted(wire.PEER_VERBS))
def test_encode_parse_roundtrip_peer_verb(verb):
    """Each peer verb with a valid body survives encode then parse_line unchanged."""
    body = PEER_EXAMPLES[verb]
    data = wire.encode(verb, body)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert wire.parse_line(data[:-1]) == wire.Message(verb, body)


@pytest.mark.parametrize("verb", sorted(wire.SERVER_VERBS))
def test_encode_parse_roundtrip_server_verb(verb):
    """Each server verb with a valid body survives encode then parse_line(SERVER_VERBS) unchanged."""
    body = SERVER_EXAMPLES[verb]
    assert wire.parse_line(line(verb, body), wire.SERVER_VERBS) == wire.Message(verb, body)


def _required(verbs):
    return [(verb, name) for verb, spec in sorted(verbs.items()) for name, (_, req) in spec.items() if req]


@pytest.mark.parametrize(("verb", "field"), _required(wire.PEER_VERBS))
def test_parse_line_missing_required_field_is_bad_request(verb, field):
    """Dropping any required field of a peer verb gives BadRequest naming the field, with the rid if still there."""
    body = dict(PEER_EXAMPLES[verb])
    del body[field]
    err = refused(line(verb, body))
    assert type(err) is errors.BadRequest
    assert repr(field) in err.message
    assert err.rid == body.get("rid")


@pytest.mark.parametrize(("verb", "field"), _required(wire.SERVER_VERBS))
def test_parse_line_server_verb_missing_required_field_is_bad_request(verb, field):
    """A peer parsing server lines refuses one without a required field."""
    body = dict(SERVER_EXAMPLES[verb])
    del body[field]
    assert type(refused(line(verb, body), wire.SERVER_VERBS)) is errors.BadRequest


# -- bad_line ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b" {}", id="no-verb"),
        pytest.param(b'{"rid":1}', id="json-only"),
        pytest.param(b"hello {}", id="lowercase"),
        pytest.param(b"Hello {}", id="mixed-case"),
        pytest.param(b"A" * 17, id="verb-17-letters"),
        pytest.param(b"HELLO2 {}", id="digit-in-verb"),
        pytest.param(b"BEAT\t{}", id="tab-separator"),
        pytest.param(b"R\xc3\x89SULT {}", id="non-ascii-verb"),
        pytest.param(b"\xff\xfe", id="binary"),
        pytest.param(b"BEAT\r\r", id="two-CRs"),
    ],
)
def test_parse_line_not_verb_form_is_bad_line(data):
    """A line that does not start with 1 to 16 capital letters is refused as bad_line, with no rid."""
    err = refused(data)
    assert type(err) is errors.BadLine
    assert err.code == "bad_line" and err.rid is None and not err.close


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b'RESULT {"rid":1,"note":"\xff"}', id="invalid-byte"),
        pytest.param(b'BEAT {"x":"\xc3"}', id="truncated-sequence"),
        pytest.param(b'BEAT {"x":"\xed\xa0\x80"}', id="encoded-surrogate"),
        pytest.param(b'BEAT {"x":"\xc0\xaf"}', id="overlong"),
    ],
)
def test_parse_line_body_not_utf8_is_bad_line(data):
    """A body that is not valid UTF-8 is refused as bad_line, even if it would be JSON otherwise."""
    err = refused(data)
    assert type(err) is errors.BadLine
    assert err.rid is None


def test_parse_line_sixteen_letter_verb_is_well_formed():
    """A 16-letter verb is well formed (so unknown_verb, not bad_line): the limit is inclusive."""
    assert type(refused(b"A" * 16)) is errors.UnknownVerb


# -- bad_json ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"rid":1', id="unterminated"),
        pytest.param(b'{"rid":1,}', id="trailing-comma"),
        pytest.param(b"{'rid':1}", id="single-quotes"),
        pytest.param(b'{"rid":1} x', id="trailing-garbage"),
        pytest.param(b'{"rid":1}{"rid":2}', id="two-objects"),
        pytest.param(b"[1,2]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"17", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"true", id="bool"),
        pytest.param(b'{"load":NaN}', id="NaN"),
        pytest.param(b'{"load":Infinity}', id="Infinity"),
        pytest.param(b'{"load":-Infinity}', id="minus-Infinity"),
        pytest.param(b'{"load":1e400}', id="float-overflow"),
        pytest.param(b'{"load":-1e999}', id="negative-overflow"),
        pytest.param(b'{"n":' + b"9" * 5000 + b"}", id="int-too-many-digits"),
    ],
)
def test_parse_line_body_not_json_object_is_bad_json(body):
    """A body that is not one finite JSON object is refused as bad_json, without a rid."""
    err = refused(b"BEAT " + body)
    assert type(err) is errors.BadJSON
    assert err.code == "bad_json" and err.rid is None and not err.close


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_parse_line_deep_nesting_is_bad_json(opener):
    """A body nested far beyond the recursion limit is refused as bad_json instead of crashing."""
    closer = b"]" if opener == b"[" else b"}"
    body = b'{"x":' + opener * 100_000 + b"1" + closer * 100_000 + b"}"
    assert type(refused(b"BEAT " + body)) is errors.BadJSON


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(r'"\ud800"', id="lone-high"),
        pytest.param(r'"\uDC00"', id="lone-low-uppercase"),
        pytest.param(r'"a\udfff"', id="lone-after-text"),
        pytest.param(r'"\ude00\ud83d"', id="reversed-pair"),
    ],
)
def test_parse_line_lone_surrogate_escape_is_bad_json(text):
    """A string holding an unpaired surrogate escape is refused: it could never be stored or sent back as UTF-8."""
    err = refused(('SUBMIT {"rid":1,"jobs":[{"type":"t","records":[1],"name":' + text + "}]}").encode())
    assert type(err) is errors.BadJSON


def test_parse_line_lone_surrogate_in_key_is_bad_json():
    """An object key with an unpaired surrogate is refused like a value."""
    assert type(refused(rb'BEAT {"\ud800":1}')) is errors.BadJSON


def test_parse_line_surrogate_pair_and_escaped_backslash_accepted():
    """A proper surrogate pair decodes to its character, and an escaped backslash before u is plain text."""
    msg = parse(r'PROGRESS {"rid":1,"job":1,"lease":"L1","note":"\ud83d\ude00 \\ud800"}')
    assert msg.body["note"] == "\U0001f600 \\ud800"
    assert wire.parse_line(line(msg.verb, msg.body)) == msg


# -- unknown_verb -----------------------------------------------------------


def test_parse_line_unknown_verb_with_rid_keeps_rid():
    """An unknown verb is refused as unknown_verb, naming the request's rid when it has one."""
    err = refused(b'FROB {"rid":41}')
    assert type(err) is errors.UnknownVerb
    assert err.rid == 41 and "FROB" in err.message


@pytest.mark.parametrize(
    "data", [b"FROB", b"FROB {}", b'FROB {"rid":"41"}', b'FROB {"rid":true}', b'FROB {"rid":-1}', b'FROB {"rid":1.5}']
)
def test_parse_line_unknown_verb_without_valid_rid_has_none(data):
    """An unknown verb without a usable integer rid is refused with rid None."""
    err = refused(data)
    assert type(err) is errors.UnknownVerb
    assert err.rid is None


@pytest.mark.parametrize("verb", sorted(set(wire.SERVER_VERBS) - set(wire.PEER_VERBS)))
def test_parse_line_server_only_verb_from_peer_is_unknown(verb):
    """A verb only the server sends (JOB, OK, ...) is unknown coming from a peer."""
    assert type(refused(line(verb, SERVER_EXAMPLES[verb]))) is errors.UnknownVerb


@pytest.mark.parametrize("verb", sorted(set(wire.PEER_VERBS) - set(wire.SERVER_VERBS)))
def test_parse_line_peer_only_verb_from_server_is_unknown(verb):
    """A peer parsing server lines treats a peer-only verb (HELLO, RESULT, ...) as unknown."""
    assert type(refused(line(verb, PEER_EXAMPLES[verb]), wire.SERVER_VERBS)) is errors.UnknownVerb


# -- bad_request ------------------------------------------------------------


def _with(verb, **changes):
    body = copy.deepcopy(PEER_EXAMPLES[verb])
    body.update(changes)
    return verb, body


BAD_REQUESTS = {
    # Booleans are JSON's own type, never integers.
    "rid-true": _with("SHOW", rid=True),
    "job-true": _with("SHOW", job=True),
    "job-false": _with("RESULT", job=False),
    "proto-true": _with("HELLO", proto=True),
    "slots-true": _with("HELLO", slots=True),
    "memory-true": _with("HELLO", memory=True),
    "slots-verb-true": _with("SLOTS", slots=True),
    "pong-n-true": _with("PONG", n=True),
    "index-true": _with("RESULT", results=[{"i": True, "out": 1}]),
    "priority-true": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "priority": True}]),
    "retries-false": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "retries": False}]),
    "timeout-true": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "timeout": True}]),
    "load-true": _with("BEAT", load=True),
    "limit-true": _with("LIST", limit=True),
    "after-true": _with("RESULTS", after=True),
    "watch-ids-true": _with("WATCH", jobs=[1, True]),
    "requires-memory-true": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "requires": {"memory": True}}]),
    # Other wrong types.
    "job-string": _with("SHOW", job="1"),
    "job-float": _with("SHOW", job=1.0),
    "job-null": _with("CANCEL", job=None),
    "lease-int": _with("RESULT", lease=1),
    "lease-empty": _with("RESULT", lease=""),
    "name-int": _with("HELLO", name=5),
    "name-too-long": _with("HELLO", name="n" * 129),
    "token-null": _with("HELLO", token=None),
    "role-unknown": _with("HELLO", role="admin"),
    "types-list": _with("HELLO", types=["noop"]),
    "types-version-int": _with("HELLO", types={"noop": 1}),
    "holding-no-lease": _with("HELLO", holding=[{"job": 1}]),
    "retry-string": _with("FAIL", retry="yes"),
    "enabled-int": _with("DISPATCH", enabled=1),
    "action-unknown": _with("WORKER", action="explode"),
    "worker-reason-int": _with("WORKER", reason=1),
    "worker-reason-too-long": _with("WORKER", reason="r" * 4097),
    # The good-guest fields: a worker's host state, a vacate, the lease check.
    "hello-state-vacating": _with("HELLO", state="vacating"),
    "hello-state-unknown": _with("HELLO", state="asleep"),
    "state-unknown": _with("STATE", state="away"),
    "state-null": _with("STATE", state=None),
    "state-reason-int": _with("STATE", reason=5),
    "state-reason-too-long": _with("STATE", reason="r" * 4097),
    "vacate-int": _with("RETURN", vacate=1),
    "vacate-string": _with("RETURN", vacate="true"),
    "check-holding-not-list": _with("CHECK", holding={"job": 1, "lease": "L1"}),
    "check-holding-no-lease": _with("CHECK", holding=[{"job": 1}]),
    "check-holding-job-string": _with("CHECK", holding=[{"job": "1", "lease": "L1"}]),
    "check-holding-empty-lease": _with("CHECK", holding=[{"job": 1, "lease": ""}]),
    "check-holding-too-many": _with("CHECK", holding=[{"job": 1, "lease": "L"}] * 100_001),
    "records-not-list": _with("SUBMIT", jobs=[{"type": "t", "records": "abc"}]),
    "records-empty": _with("SUBMIT", jobs=[{"type": "t", "records": []}]),
    "jobs-empty": _with("SUBMIT", jobs=[]),
    "jobspec-no-type": _with("SUBMIT", jobs=[{"records": [1]}]),
    "params-list": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "params": []}]),
    "results-empty": _with("RESULT", results=[]),
    "result-out-and-error": _with("RESULT", results=[{"i": 0, "out": 1, "error": "x"}]),
    "result-neither": _with("RESULT", results=[{"i": 0}]),
    "result-error-not-text": _with("RESULT", results=[{"i": 0, "error": 3}]),
    # Ranges.
    "rid-negative": _with("SHOW", rid=-1),
    "rid-2^53": _with("SHOW", rid=2**53),
    "job-negative": _with("SHOW", job=-1),
    "limit-zero": _with("LIST", limit=0),
    "limit-over": _with("LIST", limit=1001),
    "timeout-zero": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "timeout": 0}]),
    "timeout-huge-int": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "timeout": 10**400}]),
    "load-negative": _with("BEAT", load=-0.5),
    "priority-over": _with("SUBMIT", jobs=[{"type": "t", "records": [1], "priority": 1_000_001}]),
}


@pytest.mark.parametrize(("verb", "body"), list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
def test_parse_line_wrong_type_or_range_is_bad_request(verb, body):
    """A field of the wrong JSON type or out of range (booleans for integers included) is bad_request."""
    err = refused(line(verb, body))
    assert type(err) is errors.BadRequest
    assert err.code == "bad_request" and not err.close
    rid = body.get("rid")
    assert err.rid == (rid if type(rid) is int and 0 <= rid < 2**53 else None)


def test_parse_line_bad_request_names_verb_and_field():
    """The bad_request message says which verb and which field is wrong, for the person reading it."""
    err = refused(b'RESULT {"rid":3,"job":"x","lease":"L1","results":[{"i":0,"out":1}]}')
    assert err.rid == 3
    assert err.message == "RESULT: invalid field 'job'"


# -- what is accepted ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (b"BEAT", {}),
        (b"BEAT ", {}),
        (b"BEAT  \t ", {}),
        (b"BEAT {}", {}),
        (b"BEAT\r", {}),
        (b'BEAT {"load":1.5}\r', {"load": 1.5}),
        (b'BEAT  {"load":1}', {"load": 1}),
    ],
)
def test_parse_line_bare_verb_and_crlf_accepted(data, body):
    """A verb alone means an empty body, and one CR before the LF is ignored."""
    assert wire.parse_line(data) == wire.Message("BEAT", body)


def test_parse_line_crlf_full_request():
    """A request ending in CR LF parses exactly as the same request ending in LF."""
    data = line("RESULT", PEER_EXAMPLES["RESULT"])
    assert wire.parse_line(data + b"\r") == wire.parse_line(data)


def test_parse_line_unknown_fields_ignored_and_kept():
    """Unknown fields are ignored by the checks (the protocol grows that way) and left in the body."""
    msg = parse('SHOW {"rid":1,"job":2,"since":"v2","extra":{"a":[1,null]}}')
    assert msg.verb == "SHOW" and msg.rid == 1
    assert msg.body["extra"] == {"a": [1, None]}


def test_parse_line_limits_inclusive():
    """The largest rid and the longest name are accepted: the ranges are inclusive."""
    msg = parse(f'SHOW {{"rid":{2**53 - 1},"job":0}}')
    assert msg.rid == 2**53 - 1
    hello = dict(PEER_EXAMPLES["HELLO"], name="n" * 128)
    assert wire.parse_line(line("HELLO", hello)).body["name"] == "n" * 128


def test_message_rid_absent_is_none():
    """A notification has no rid."""
    assert parse("BEAT").rid is None
    assert parse('PONG {"n":2}').rid is None


# -- encode -------------------------------------------------------------------


def test_encode_empty_body_is_bare_verb():
    """A message without a body is its verb and LF, nothing else."""
    assert wire.encode("BEAT") == b"BEAT\n"
    assert wire.encode("BEAT", {}) == b"BEAT\n"


def test_encode_compact_utf8_without_raw_lf():
    """encode writes compact UTF-8 JSON, and a newline inside a string never becomes a raw LF."""
    data = wire.encode("PROGRESS", {"rid": 1, "note": "line one\nzwei — ü"})
    assert data == 'PROGRESS {"rid":1,"note":"line one\\nzwei — ü"}\n'.encode()
    assert data.count(b"\n") == 1


def test_encode_refuses_non_finite_number():
    """encode refuses NaN rather than sending a line no peer may accept."""
    with pytest.raises(ValueError):
        wire.encode("BEAT", {"load": float("nan")})


# -- properties ---------------------------------------------------------------

_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
_SAFE_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
#: JSON values including what a hostile peer may write: NaN, infinities, huge
#: numbers, unpaired surrogates (as escapes), deep-ish nesting.
_HOSTILE_TEXT = st.text(st.characters(codec="utf-8") | st.characters(categories=["Cs"]), max_size=8)
_HOSTILE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _HOSTILE_TEXT | st.integers(min_value=2**53 - 2),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_HOSTILE_TEXT, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def hostile_lines(draw, direction):
    """Bytes that look more or less like a line of ``direction`` ("peer" or "server")."""
    verbs, examples = DIRECTIONS[direction]
    verb = draw(st.sampled_from(sorted(verbs)) | st.from_regex(r"[A-Za-z]{0,18}", fullmatch=True))
    kind = draw(st.sampled_from(["bytes", "after-verb", "json", "mutated", "extra"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    if kind == "after-verb":
        return verb.encode() + draw(st.sampled_from([b"", b" ", b"\r"])) + draw(st.binary(max_size=60))
    if kind == "json":
        body = draw(st.dictionaries(st.sampled_from(["rid", "job", "lease", "n", "x"]) | _HOSTILE_TEXT, _HOSTILE_JSON))
    elif kind == "mutated":
        body = copy.deepcopy(examples.get(verb, {}))
        for name in draw(st.lists(st.sampled_from(sorted(body) or ["rid"]), max_size=3)):
            body[name] = draw(_HOSTILE_JSON)
    else:  # a valid body with hostile unknown fields, which the checks let through
        body = copy.deepcopy(examples.get(verb, {}))
        body.update(draw(st.dictionaries(_HOSTILE_TEXT, _HOSTILE_JSON, min_size=1, max_size=3)))
    text = json.dumps(body, ensure_ascii=draw(st.booleans()), allow_nan=True)
    if draw(st.booleans()):
        text = text.replace("-Infinity", "-1e999").replace("Infinity", "1E400")
    data = text.encode("utf-8", "surrogatepass")
    cut = draw(st.integers(min_value=0, max_value=len(data)))
    truncate = draw(st.booleans())
    return verb.encode() + b" " + (data[:cut] if truncate else data)


@PROPERTY
@given(data=st.binary(max_size=200))
def test_parse_line_arbitrary_bytes_only_gridd_errors(data):
    """parse_line fed arbitrary bytes returns a Message or raises a GriddError, never anything else."""
    for verbs in (wire.PEER_VERBS, wire.SERVER_VERBS):
        try:
            msg = wire.parse_line(data, verbs)
        except errors.GriddError:
            continue
        assert isinstance(msg, wire.Message)


@PROPERTY
@given(st.data())
def test_parse_line_hostile_lines_only_gridd_errors_and_accepted_reencode(data):
    """A line parse_line accepts can be encoded again and parses to the same Message; others raise a GriddError."""
    direction = data.draw(st.sampled_from(sorted(DIRECTIONS)))
    verbs = DIRECTIONS[direction][0]
    raw = data.draw(hostile_lines(direction))
    try:
        msg = wire.parse_line(raw, verbs)
    except errors.GriddError as e:
        assert e.code in ("bad_line", "bad_json", "unknown_verb", "bad_request")
        assert e.rid is None or (type(e.rid) is int and 0 <= e.rid < 2**53)
        return
    again = wire.encode(msg.verb, msg.body)
    assert again.count(b"\n") == 1
    assert wire.parse_line(again[:-1], verbs) == msg


@st.composite
def valid_messages(draw, direction):
    """A valid message of ``direction``: an example body with varied values, optional fields and unknown extras."""
    verbs, examples = DIRECTIONS[direction]
    verb = draw(st.sampled_from(sorted(verbs)))
    spec = verbs[verb]
    body = copy.deepcopy(examples[verb])
    for name, value in list(body.items()):
        if name not in spec:
            continue  # a reply's own fields (OK carries what the request asked for)
        check, required = spec[name]
        if not required and draw(st.booleans()):
            del body[name]
            continue
        if isinstance(value, str):
            candidate = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=20))
        elif type(value) is int:
            candidate = draw(st.integers(min_value=0, max_value=2**53 - 1))
        else:
            continue
        if check(candidate):
            body[name] = candidate
    extras = draw(st.dictionaries(_TEXT.filter(lambda k: k not in spec), _SAFE_JSON, max_size=3))
    body.update(extras)
    return wire.Message(verb, body)


def _feed(receiver, data: bytes, sizes: list[int]):
    """Deliver ``data`` to ``receiver`` in chunks of the given sizes (cycled), 1 byte at least."""
    i, k = 0, 0
    while i < len(data):
        size = sizes[k % len(sizes)]
        receiver.dataReceived(data[i : i + size])
        i += size
        k += 1


class _RecordingSession:
    """Stands in for Session so the ServerProtocol's framing and parsing are seen alone."""

    state = "client"
    name = "recorder"

    def __init__(self):
        self.messages: list[wire.Message] = []

    def heard(self):
        pass

    def receive(self, msg):
        self.messages.append(msg)

    def closed(self):
        self.state = "closed"


@PROPERTY
@given(
    messages=st.lists(valid_messages("peer"), min_size=1, max_size=5),
    sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
    crlf=st.booleans(),
)
def test_server_protocol_chunked_peer_messages_arrive_identical(messages, sizes, crlf):
    """Valid peer messages fed to a ServerProtocol in chunks of 1..N bytes arrive as identical Messages."""
    factory = ServerFactory(None, None, task.Clock())
    proto = factory.buildProtocol(None)
    assert isinstance(proto, ServerProtocol)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.session = session = _RecordingSession()
    data = b"".join(wire.encode(m.verb, m.body) for m in messages)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    _feed(proto, data, sizes)
    assert session.messages == messages
    assert transport.value() == b"", "the server refused a valid message"


class _ServerLineReader(LineOnlyReceiver):
    """A peer's view of the server's lines: frame, then parse with SERVER_VERBS."""

    delimiter = b"\n"
    MAX_LENGTH = wire.DEFAULT_MAX_LINE

    def __init__(self):
        self.messages: list[wire.Message] = []

    def lineReceived(self, line):
        self.messages.append(wire.parse_line(line, wire.SERVER_VERBS))


@PROPERTY
@given(
    messages=st.lists(valid_messages("server"), min_size=1, max_size=5),
    sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
)
def test_line_receiver_chunked_server_messages_arrive_identical(messages, sizes):
    """Valid server messages, encoded and fed to a LineOnlyReceiver in chunks of 1..N bytes, parse back identical."""
    reader = _ServerLineReader()
    reader.makeConnection(StringTransport())
    _feed(reader, b"".join(wire.encode(m.verb, m.body) for m in messages), sizes)
    assert reader.messages == messages


def test_parse_line_refuses_bodies_nested_past_the_limit():
    """A body nested deeper than MAX_DEPTH is bad_json; one exactly at the limit parses."""

    def nested(depth):
        return b"BEAT " + b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)

    assert wire.parse_line(nested(wire.MAX_DEPTH)).verb == "BEAT"
    with pytest.raises(errors.BadJSON):
        wire.parse_line(nested(wire.MAX_DEPTH + 1))
    with pytest.raises(errors.BadJSON):
        wire.parse_line(b'BEAT {"a":' + b"[" * wire.MAX_DEPTH + b"]" * wire.MAX_DEPTH + b"}")


def test_message_rid_only_a_requests_valid_rid():
    """Message.rid is a request's integer rid; None for a notification, whatever its body says, and for a bad one."""
    assert wire.Message("SHOW", {"rid": 7, "job": 1}).rid == 7
    assert wire.Message("BEAT", {"rid": 7}).rid is None
    assert wire.Message("PONG", {"rid": "x", "n": 1}).rid is None
    for bad in ("x", -1, 2**53, True, 1.5, None):
        assert wire.Message("SHOW", {"rid": bad}).rid is None


@pytest.mark.parametrize("line", [b'BEAT {"rid":5,"load":"x"}', b'PONG {"rid":5,"n":"x"}'])
def test_parse_line_refused_notification_names_no_rid(line):
    """A notification refused by the parser names no rid, whatever its body says under "rid"."""
    with pytest.raises(errors.BadRequest) as refused:
        wire.parse_line(line)
    assert refused.value.rid is None


def test_parse_line_verb_of_the_other_direction_is_unknown_and_names_its_rid():
    """A server's verb sent by a peer is an unknown verb, answered with the line's rid like any other."""
    with pytest.raises(errors.UnknownVerb) as refused:
        wire.parse_line(b'JOB {"rid":5}')
    assert refused.value.rid == 5


@pytest.mark.parametrize(("verb", "field"), [("STATE", "state"), ("CHECK", "holding")])
def test_parse_line_good_guest_verbs_name_their_required_field(verb, field):
    """STATE without a state and CHECK without holding are bad_request naming the field."""
    body = copy.deepcopy(PEER_EXAMPLES[verb])
    del body[field]
    err = refused(line(verb, body))
    assert err.message == f"{verb}: missing field {field!r}" and err.rid == body["rid"]


@pytest.mark.parametrize("state", ["idle", "busy", "vacating"])
def test_parse_line_state_takes_each_host_state_reason_optional(state):
    """STATE takes idle, busy and vacating, with or without a reason; a HELLO takes idle and busy only."""
    assert parse(f'STATE {{"rid":1,"state":"{state}"}}').body == {"rid": 1, "state": state}
    hello = {k: v for k, v in PEER_EXAMPLES["HELLO"].items() if k != "state"}
    if state == "vacating":
        assert type(refused(line("HELLO", {**hello, "state": state}))) is errors.BadRequest
    else:
        assert parse(line("HELLO", {**hello, "state": state}).decode()).body["state"] == state


def test_parse_line_check_with_empty_holding_accepted():
    """CHECK may list no lease (a worker with nothing to check still gets an answer)."""
    assert parse('CHECK {"rid":4,"holding":[]}').body == {"rid": 4, "holding": []}
