"""The JSON log observer for log shippers."""

from __future__ import annotations

from twisted.logger import Logger, eventsFromJSONLogFile


def test_json_observer_writes_loadable_events_to_the_named_file(tmp_path, monkeypatch):
    """With $GRIDD_JSON_LOG set, events are written there as Twisted JSON log records."""
    from gridd import logs

    path = tmp_path / "gridd.jsonl"
    monkeypatch.setenv("GRIDD_JSON_LOG", str(path))
    observer = logs.json()
    Logger(namespace="gridd.test", observer=observer).info("job {job} done", job=17)
    with open(path, encoding="utf-8") as f:
        [event] = list(eventsFromJSONLogFile(f))
    assert (event["log_namespace"], event["job"], event["log_format"]) == ("gridd.test", 17, "job {job} done")
