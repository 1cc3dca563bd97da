"""The job type API and the built-in job types (gridd.jobtypes)."""

from __future__ import annotations

import hashlib
import json

import pytest
from twisted.internet import defer, task

from gridd import jobtypes
from gridd.jobtypes import DeliberateFailure, Fail, JobContext, Noop, RecordError, Sleep, TextStats, load_job_types


def make_context(clock=None, attempt=1, index=0, report=None):
    context = JobContext(clock=clock or task.Clock(), job=7, lease="L7", attempt=attempt, total=3)
    if report is not None:
        context.report_progress = report
    context.index = index
    return context


def test_noop_returns_none():
    """noop runs on the reactor and returns None for any record."""
    assert Noop.threaded is False
    assert Noop().process({"any": "thing"}, {}, make_context()) is None


def test_sleep_waits_on_the_injected_clock():
    """sleep's Deferred fires only once the injected clock has advanced params.seconds."""
    clock = task.Clock()
    d = Sleep().process("r", {"seconds": 2}, make_context(clock))
    clock.advance(1.9)
    assert not d.called
    clock.advance(0.1)
    assert d.called and d.result is None


def test_sleep_defaults_to_a_tenth_of_a_second():
    """Without params.seconds, sleep waits 0.1 s."""
    clock = task.Clock()
    d = Sleep().process("r", {}, make_context(clock))
    assert [round(c.getTime(), 6) for c in clock.getDelayedCalls()] == [0.1]
    clock.advance(0.1)
    assert d.called


def test_sleep_cancel_removes_the_timer():
    """Cancelling sleep's Deferred cancels its delayed call."""
    clock = task.Clock()
    d = Sleep().process("r", {"seconds": 5}, make_context(clock))
    d.cancel()
    assert clock.getDelayedCalls() == []
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(defer.CancelledError)


def test_sleep_bad_seconds_is_a_record_error():
    """A negative or non-numeric params.seconds gives the record an error."""
    for bad in (-1, "2", True):
        with pytest.raises(RecordError):
            Sleep().process("r", {"seconds": bad}, make_context())


def test_textstats_counts_a_string_record():
    """textstats counts words, lines and characters and ranks words by count then alphabet."""
    text = "The cat and the hat.\nThe END, the end!\ndon't stop"
    out = TextStats().process(text, {}, make_context())
    assert out == {
        "words": 11,
        "lines": 3,
        "chars": len(text),
        "top": [["the", 4], ["end", 2], ["and", 1], ["cat", 1], ["don't", 1]],
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    json.dumps(out)


def test_textstats_object_record_keeps_its_id():
    """An object record's id is echoed in the output."""
    out = TextStats().process({"text": "a b a", "id": "doc-1"}, {}, make_context())
    assert out["id"] == "doc-1"
    assert out["top"] == [["a", 2], ["b", 1]]


def test_textstats_empty_text():
    """An empty text has no words, no lines and the sha256 of nothing."""
    out = TextStats().process("", {}, make_context())
    assert (out["words"], out["lines"], out["chars"], out["top"]) == (0, 0, 0, [])


def test_textstats_rejects_other_records_with_record_error():
    """A record that is neither a string nor {"text": string} is a record error."""
    for bad in (3, None, {"txt": "x"}, {"text": 5}, ["a"]):
        with pytest.raises(RecordError):
            TextStats().process(bad, {}, make_context())


def test_textstats_is_threaded():
    """textstats declares itself threaded, so it never runs on the reactor."""
    assert TextStats.threaded is True


def test_fail_fails_every_attempt_by_default():
    """Without params, fail raises on the first record of every attempt."""
    for attempt in (1, 5):
        with pytest.raises(DeliberateFailure):
            Fail().process("r", {}, make_context(attempt=attempt))


def test_fail_stops_failing_after_fail_attempts():
    """fail raises while attempt <= fail_attempts, then returns None."""
    params = {"fail_attempts": 2}
    with pytest.raises(DeliberateFailure):
        Fail().process("r", params, make_context(attempt=2))
    assert Fail().process("r", params, make_context(attempt=3)) is None


def test_fail_at_only_fails_that_record():
    """With params.at, fail raises only at that record index."""
    params = {"at": 1}
    assert Fail().process("r", params, make_context(index=0)) is None
    with pytest.raises(DeliberateFailure, match="record 1"):
        Fail().process("r", params, make_context(index=1))


def test_context_progress_reports_the_note():
    """context.progress hands the note, as text, to the worker's reporter."""
    notes = []
    make_context(report=notes.append).progress(42)
    assert notes == ["42"]


def test_load_job_types_includes_builtins_without_installation(monkeypatch):
    """With no entry points (a source tree), the built-in types are loaded."""
    monkeypatch.setattr(jobtypes, "entry_points", lambda group: [])
    types = load_job_types()
    assert sorted(types) == ["fail", "noop", "sleep", "textstats"]
    assert {name: t.version for name, t in types.items()}["noop"] == "1.0"


def test_load_job_types_filters_by_name(monkeypatch):
    """names restricts the loaded types."""
    monkeypatch.setattr(jobtypes, "entry_points", lambda group: [])
    assert list(load_job_types(["sleep", "noop"])) == ["noop", "sleep"]


def test_load_job_types_unknown_name_raises(monkeypatch):
    """A requested type that is not available raises ValueError naming it."""
    monkeypatch.setattr(jobtypes, "entry_points", lambda group: [])
    with pytest.raises(ValueError, match="resize"):
        load_job_types(["noop", "resize"])


class FakeEntryPoint:
    def __init__(self, name, loaded=None, error=None):
        self.name, self.value, self._loaded, self._error = name, f"x:{name}", loaded, error

    def load(self):
        if self._error:
            raise self._error
        return self._loaded


class Resize(jobtypes.JobType):
    name = "resize"
    version = "2.1.0"
    threaded = True

    def process(self, record, params, context):
        return record


def test_load_job_types_discovers_entry_points(monkeypatch):
    """Types registered in the gridd.jobtypes entry point group are loaded."""
    seen = []

    def fake_entry_points(group):
        seen.append(group)
        return [FakeEntryPoint("resize", Resize)]

    monkeypatch.setattr(jobtypes, "entry_points", fake_entry_points)
    types = load_job_types()
    assert seen == ["gridd.jobtypes"]
    assert isinstance(types["resize"], Resize) and "noop" in types


@pytest.mark.expected_log_errors
def test_load_job_types_skips_broken_types(monkeypatch):
    """A type that fails to import or has a bad version is logged and left out."""

    class BadVersion(Resize):
        version = "two"

    monkeypatch.setattr(
        jobtypes,
        "entry_points",
        lambda group: [FakeEntryPoint("broken", error=ImportError("no PIL")), FakeEntryPoint("resize", BadVersion)],
    )
    types = load_job_types()
    assert "broken" not in types and "resize" not in types and "noop" in types


def test_a_job_type_whose_extra_is_not_installed_is_left_out_without_a_traceback(monkeypatch):
    """An entry point that needs a missing module (Pillow for photos) is not offered, and says so at info level."""
    from twisted.logger import globalLogPublisher

    import gridd.jobtypes as jobtypes

    class Missing:
        name, value = "photos", "gridd.photos.jobtype:Photos"

        def load(self):
            raise ModuleNotFoundError("No module named 'PIL'")

    monkeypatch.setattr(jobtypes, "entry_points", lambda group: [Missing()])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        found = jobtypes.load_job_types()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert "photos" not in found and "noop" in found
    [said] = [e for e in events if "not offered" in e.get("log_format", "")]
    assert said["log_level"].name == "info" and "PIL" in str(said["error"])
