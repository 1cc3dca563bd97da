"""A real S3 endpoint for the tests: moto's standalone server, as a child process on a free loopback port.

One server serves the whole test session (``conftest.py``'s ``moto_s3``
fixture); each test makes buckets of its own (``bucket()``), so tests are
independent although the server keeps its state in memory. boto3 talks to
it over HTTP like to any S3-compatible service, with the fake credentials
the fixture puts in the environment. The server is stopped by its PID.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from gridd.launch import free_port

__all__ = ["MotoServer", "CREDENTIALS"]

#: Seconds a start may take before the tests give up on it.
TIMEOUT = 30.0
#: The environment boto3 reads its (fake) credentials and region from.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_SESSION_TOKEN": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1: ``start()``, ``stop()``, ``client()``, ``bucket()``."""

    def __init__(self, base: Path):
        self.base = Path(base)
        self.log = self.base / "moto.log"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._names = itertools.count(1)

    def start(self) -> None:
        """Start the server; return once it accepts connections (checked every 50 ms, for TIMEOUT at most)."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=log,
                env=dict(os.environ, **CREDENTIALS),
            )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto.server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto.server did not listen on {self.port} in {TIMEOUT} s:\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def client(self):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"])

    def bucket(self) -> str:
        """Create a new, empty bucket; return its name."""
        name = f"gridd-test-{next(self._names)}"
        self.client().create_bucket(Bucket=name)
        return name
