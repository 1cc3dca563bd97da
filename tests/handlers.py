"""Job types that misbehave on purpose, for the handler-process tests (loaded by module path in the child)."""

from __future__ import annotations

import ctypes
import os
import threading

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
