"""The limits of an attempt (gridd.worker.limits): the operator's, per type, and the job's memory."""

from __future__ import annotations

import pytest

from gridd.worker.limits import AttemptLimits, parse_limits


def test_parse_limits_reads_worker_wide_and_per_type_specs():
    """``NAME=VALUE,...`` is for every type, ``TYPE:NAME=VALUE,...`` for one."""
    assert parse_limits("memory=512,cpu=60") == (None, {"memory": 512, "cpu": 60})
    assert parse_limits("photos:files=64,processes=8") == ("photos", {"files": 64, "processes": 8})


@pytest.mark.parametrize(
    "spec, words",
    [
        ("memory", "is not NAME=VALUE"),
        ("disk=5", "unknown limit 'disk'"),
        ("cpu=1,cpu=2", "given twice"),
        ("cpu=ten", "not a whole number"),
        ("files=0", "at least 1"),
        (":cpu=1", "job type before ':' is empty"),
    ],
)
def test_parse_limits_refuses_bad_specs_saying_why(spec, words):
    """Each mistake in a ``--limits`` value is a ValueError naming it."""
    with pytest.raises(ValueError, match=words):
        parse_limits(spec)


def test_attempt_limits_type_setting_wins_over_worker_wide_one():
    """A type's own limit replaces the worker-wide one for that type only."""
    limits = AttemptLimits.from_specs(["memory=512,cpu=60", "photos:memory=2048"])
    assert limits.for_attempt("photos") == {"memory": 2048, "cpu": 60}
    assert limits.for_attempt("noop") == {"memory": 512, "cpu": 60}


def test_attempt_limits_same_setting_twice_is_refused():
    with pytest.raises(ValueError, match="for photos is given twice"):
        AttemptLimits.from_specs(["photos:cpu=1", "photos:cpu=2"])


def test_attempt_limits_job_memory_is_the_limit_unless_the_operator_set_a_lower_one():
    """A job's required memory is its limit; an operator's lower limit still wins."""
    assert AttemptLimits({}).for_attempt("t", job_memory=300) == {"memory": 300}
    assert AttemptLimits({"memory": 200}).for_attempt("t", job_memory=300) == {"memory": 200}
    assert AttemptLimits({"memory": 800}).for_attempt("t", job_memory=300) == {"memory": 300}


def test_attempt_limits_offered_memory_limits_jobs_when_the_operator_set_no_memory_limit():
    """``--memory`` (memory offered per job) limits each job to it, unless a memory limit is given."""
    assert AttemptLimits({}, offered_memory=1024).for_attempt("t") == {"memory": 1024}
    assert AttemptLimits({"memory": 512}, offered_memory=1024).for_attempt("t") == {"memory": 512}
    assert AttemptLimits({}).for_attempt("t") == {}
