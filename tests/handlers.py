"""Job types that misbehave on purpose, for the handler-process tests (loaded by module path in the child)."""

from __future__ import annotations

import ctypes
import os
import threading
import time

from twisted.internet import task

from gridd.jobtypes import JobType, RecordError


class Upper(JobType):
    """Upper-cases text; "bad" gets an error result; prints junk to its standard output as it goes."""

    name, version, threaded = "upper", "1.0", True

    def process(self, record, params, context):
        print("a line on stdout that is not a result")
        if record == "bad":
            raise RecordError("bad record")
        context.progress(f"record {context.index}")
        return {"text": str(record).upper(), "pid": os.getpid()}


class Exits(JobType):
    """Exits the process on the record "exit" (after the records before it)."""

    name, version, threaded = "exits", "1.0", True

    def process(self, record, params, context):
        if record == "exit":
            os._exit(3)
        return record


class Segfaults(JobType):
    name, version, threaded = "segfaults", "1.0", True

    def process(self, record, params, context):
        return ctypes.string_at(0)


class Hangs(JobType):
    name, version, threaded = "hangs", "1.0", True

    def process(self, record, params, context):
        threading.Event().wait()  # an event nothing sets: it hangs until killed


class Hogs(JobType):
    """Allocates far more memory than its limit allows."""

    name, version, threaded = "hogs", "1.0", True

    def process(self, record, params, context):
        hoard = []
        for _ in range(64):
            hoard.append(bytearray(64 * 1024 * 1024))
        return len(hoard)


class Raises(JobType):
    name, version, threaded = "raises", "1.0", True

    def process(self, record, params, context):
        raise ValueError(f"cannot handle {record!r}")


class Waits(JobType):
    """Not threaded: waits on the child's own reactor, then answers."""

    name, version, threaded = "waits", "1.0", False

    async def process(self, record, params, context):
        await task.deferLater(context.clock, 0.01)
        return record


class Fills(JobType):
    """Fills memory it really uses (written, not only reserved) until it is stopped."""

    name, version, threaded = "fills", "1.0", True

    def process(self, record, params, context):
        hoard = []
        for _ in range(64):
            hoard.append(b"x" * (64 * 1024 * 1024))
        return len(hoard)


class ForkBomb(JobType):
    """Starts processes that start processes, without end; each waits to be killed."""

    name, version, threaded = "forkbomb", "1.0", True

    def process(self, record, params, context):
        while True:
            if os.fork() == 0:
                threading.Event().wait()


class Burns(JobType):
    """Spends ``record`` seconds of CPU time (forever when the record is null), then answers."""

    name, version, threaded = "burns", "1.0", True

    def process(self, record, params, context):
        start = time.process_time()
        while record is None or time.process_time() - start < record:
            pass
        return os.getpid()


class Counts(JobType):
    """Answers each record after a short wait on the child's reactor: a job that takes a while."""

    name, version, threaded = "counts", "1.0", False

    async def process(self, record, params, context):
        await task.deferLater(context.clock, 0.02)
        return record


class Probes(JobType):
    """Tries what a record names from inside its process (tests/sandbox_probe.py) and says how it went."""

    name, version, threaded = "probes", "1.0", True

    def process(self, record, params, context):
        from tests.sandbox_probe import probe

        return probe(record)


class NetworkProbes(Probes):
    """The same, for a type that declares that it needs the network."""

    name, needs_network = "netprobes", True
