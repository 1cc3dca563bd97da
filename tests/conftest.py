"""Shared fixtures: the cleanliness check pytest-twisted lacks."""

from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher


@pytest.fixture(autouse=True)
def clean_reactor_and_log(request):
    """Fail a test that leaves delayed calls on the global reactor or logs an error.

    pytest-twisted has no trial-style dirty-reactor check. A
    test that expects an error to be logged marks itself with
    ``@pytest.mark.expected_log_errors``.
    """
    from twisted.internet import reactor

    before = {id(c) for c in reactor.getDelayedCalls()}
    errors = []

    def observe(event):
        if event.get("isError") or (
            event.get("log_level") is not None and event["log_level"].name in ("error", "critical")
        ):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observe)
    left = [c for c in reactor.getDelayedCalls() if id(c) not in before and c.active()]
    for call in left:
        call.cancel()
    if request.node.get_closest_marker("expected_log_errors") is None and errors:
        from twisted.logger import formatEvent

        pytest.fail("errors were logged:\n" + "\n".join(formatEvent(e) for e in errors))
    if left:
        pytest.fail(f"test left delayed calls behind: {left!r}")


def pytest_configure(config):
    config.addinivalue_line("markers", "expected_log_errors: the test logs errors on purpose")
    config.addinivalue_line("markers", "e2e: end-to-end test with real processes")
    config.addinivalue_line("markers", "mysql: needs a MariaDB server")
    config.addinivalue_line("markers", "s3: needs moto's S3 server")


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory):
    """A throwaway MariaDB server for the whole session (tests/mariadb.py); fails if it is not installed."""
    from tests.mariadb import MariaDB, MariaDBMissing

    server = MariaDB(tmp_path_factory.mktemp("mariadb"))
    try:
        server.start()
    except MariaDBMissing as missing:
        pytest.fail(str(missing), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """moto's S3 server for the whole session (tests/motoserver.py), with boto3's fake credentials set."""
    from tests.motoserver import CREDENTIALS, MotoServer

    patch = pytest.MonkeyPatch()
    for name, value in CREDENTIALS.items():
        patch.setenv(name, value)
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()
    patch.undo()
