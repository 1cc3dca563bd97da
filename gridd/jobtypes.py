"""Job types: the handlers a worker runs on a job's records.

A job type is a class with these attributes, found through the entry point
group ``gridd.jobtypes`` (name = ``module:Class``) and instantiated once per
worker:

``name``
    the type name jobs are submitted with.
``version``
    a dotted numeric string; jobs may require a minimum version.
``threaded``
    True: ``process`` runs in the worker's thread pool, so it may block
    (CPU work, file or network I/O through blocking libraries). False:
    ``process`` runs on the reactor and must not block; it may return a
    Deferred or be ``async def``.
``needs_network`` (optional, default False)
    True: the type's handler processes need the network, and get it in the
    sandbox (``twistd gridworker --sandbox``), which gives no other type any.
``process(record, params, context)``
    called once per record, in index order; returns the record's output (a
    JSON value). Raising :class:`RecordError` gives the record an error
    result, which counts as a result; any other exception fails the attempt,
    and the server retries the job from its first record without a result.

``context`` is a :class:`JobContext`: the clock, the job id, the attempt
number, the index of the record being processed and ``progress(note)``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUILTIN_TYPES",
    "RecordError",
    "JobContext",
    "JobType",
    "Noop",
    "Sleep",
    "TextStats",
    "Fail",
    "DeliberateFailure",
    "load_job_types",
]

ENTRY_POINT_GROUP = "gridd.jobtypes"

_VERSION = re.compile(r"\d+(\.\d+)*\Z")
log = Logger()


class RecordError(Exception):
    """One record cannot be processed; its result is this error text.

    Unlike any other exception, it does not fail the attempt: the record is
    finished (with an error result) and the job goes on with the next one.
    """


@dataclass(eq=False)
class JobContext:
    """What a handler may know and do besides processing its record.

    One context serves a whole attempt; ``index`` is updated before each
    record. ``progress`` may be called from the handler's thread when the type
    is threaded: the worker hands the note to the reactor itself.
    """

    #: The reactor (a ``task.Clock`` in tests): use it for ``deferLater``.
    clock: IReactorTime
    job: int
    lease: str
    attempt: int
    #: The job's number of records (not only those of this attempt).
    total: int
    report_progress: Callable[[str], None] = field(default=lambda note: None, repr=False)
    #: The index of the record being processed.
    index: int | None = None

    def progress(self, note: str) -> None:
        """Tell operators and watchers how the job is going (not stored)."""
        self.report_progress(str(note))


class JobType:
    """Base class for job types; subclasses set the attributes and ``process``.

    Subclassing is a convenience: the worker only needs the attributes.
    """

    name: str = ""
    version: str = "1.0"
    threaded: bool = False
    needs_network: bool = False

    def process(self, record: Any, params: dict, context: JobContext) -> Any:
        raise NotImplementedError


class Noop(JobType):
    """Does nothing and returns None: measures the grid's own overhead."""

    name = "noop"
    version = "1.0"

    def process(self, record, params, context):
        return None


class Sleep(JobType):
    """Waits ``params.seconds`` (default 0.1) per record on the reactor's clock.

    It stands for a handler that waits on I/O; cancelling the attempt cancels
    the wait at once.
    """

    name = "sleep"
    version = "1.0"

    def process(self, record, params, context):
        seconds = params.get("seconds", 0.1)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds < 0:
            raise RecordError("params.seconds must be a non-negative number")
        return task.deferLater(context.clock, seconds)


_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


class TextStats(JobType):
    """Counts words, lines and characters of a text and finds its top 5 words.

    A record is a string, or ``{"text": TEXT, "id": ANY}``; the output is
    ``{"words", "lines", "chars", "top": [[WORD, COUNT], ...], "sha256"}`` and
    the record's ``id`` when it has one. Words are runs of letters and digits
    (inner apostrophes allowed), compared case-insensitively; ``top`` is
    ordered by count, then alphabetically. Threaded: a long text takes CPU.
    """

    name = "textstats"
    version = "1.0"
    threaded = True

    def process(self, record, params, context):
        text, record_id = _text_of(record)
        words = Counter(word.casefold() for word in _WORD.findall(text))
        top = sorted(words.items(), key=lambda item: (-item[1], item[0]))[:5]
        output = {
            "words": sum(words.values()),
            "lines": len(text.splitlines()),
            "chars": len(text),
            "top": [[word, count] for word, count in top],
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
        if record_id is not None:
            output["id"] = record_id
        return output


def _text_of(record) -> tuple[str, Any]:
    if isinstance(record, str):
        return record, None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"], record.get("id")
    raise RecordError('a textstats record is a string or {"text": STRING, "id": ANY}')


class DeliberateFailure(Exception):
    """The failure the ``fail`` job type raises."""


class Fail(JobType):
    """Fails attempts on purpose, to show and test retries.

    It fails the attempt while ``context.attempt <= params.fail_attempts``
    (without ``fail_attempts``: every attempt), at the record whose index is
    ``params.at`` (without ``at``: at the first record it is given). Records
    it does not fail on produce None.
    """

    name = "fail"
    version = "1.0"

    def process(self, record, params, context):
        limit = params.get("fail_attempts")
        at = params.get("at")
        if limit is not None and context.attempt > limit:
            return None
        if at is not None and context.index != at:
            return None
        raise DeliberateFailure(f"attempt {context.attempt} fails at record {context.index}, as asked")


#: The job types gridd ships, by name.
BUILTIN_TYPES: dict[str, type] = {cls.name: cls for cls in (Noop, Sleep, TextStats, Fail)}


def load_job_types(names: Iterable[str] | None = None) -> dict[str, Any]:
    """Instantiate the installed job types, by name.

    Types come from the ``gridd.jobtypes`` entry points, on top of the
    built-ins, which are thus available even when gridd runs from a source
    tree without being installed. A type that cannot be loaded is logged and
    left out. ``names`` restricts the result; a name that is not available
    raises ``ValueError``.
    """
    factories: dict[str, Callable[[], Any]] = dict(BUILTIN_TYPES)
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            factories[point.name] = point.load()
        except ModuleNotFoundError as e:
            # An optional extra not installed (Pillow for photos): not offered, and no traceback.
            log.info("job type {name} is not offered: {error} (install the extra it needs)", name=point.name, error=e)
        except Exception:
            log.failure("cannot load job type {name} ({value})", name=point.name, value=point.value)
    wanted = None if names is None else list(dict.fromkeys(names))
    found = {}
    for name, factory in factories.items():
        if wanted is not None and name not in wanted:
            continue
        job_type = _instantiate(name, factory)
        if job_type is not None:
            found[name] = job_type
    missing = [name for name in wanted or () if name not in found]
    if missing:
        raise ValueError(f"job types not available: {', '.join(missing)} (available: {', '.join(sorted(factories))})")
    return found


def _instantiate(name: str, factory: Callable[[], Any]):
    """An instance of the job type, or None (logged) when it is not usable."""
    try:
        job_type = factory()
    except Exception:
        log.failure("cannot create job type {name}", name=name)
        return None
    version = getattr(job_type, "version", None)
    if not callable(getattr(job_type, "process", None)) or not isinstance(version, str) or not _VERSION.match(version):
        log.error(
            "job type {name} is not usable: it needs process() and a dotted numeric version (has {version!r})",
            name=name,
            version=version,
        )
        return None
    if getattr(job_type, "name", name) != name:
        log.warn(
            "job type {cls} registered as {name} says its name is {own}", cls=factory, name=name, own=job_type.name
        )
    return job_type
