"""The limits each attempt runs under: the worker operator's, per job type, and the job's own memory.

Rules this module owns:

- A limit is one of ``memory`` (MiB), ``cpu`` (seconds of CPU time per
  attempt), ``files`` (open files) and ``processes`` (processes and threads).
  The run-time limit is the job's ``timeout`` and is kept by the runners.
- The worker operator sets them, for every type (``--limits memory=512``)
  or for one (``--limits photos:memory=2048,cpu=600``); a type's own setting
  wins over the worker-wide one for that type.
- A job that requires memory (``requires.memory``, sent in its ``JOB``) runs
  with that much: the server only sends it to a worker offering at least
  that. A worker that offers memory (``--memory``) and has no memory limit of
  its own limits each job to what it offers. The operator's limit, when
  lower, still wins: the submitter never raises a limit the operator set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["LIMIT_NAMES", "AttemptLimits", "parse_limits"]

#: The limits there are, and what each counts, in the words of ``--help``.
LIMIT_NAMES = {
    "memory": "MiB of memory",
    "cpu": "seconds of CPU time per attempt",
    "files": "open files",
    "processes": "processes and threads",
}


def parse_limits(spec: str) -> tuple[str | None, dict[str, int]]:
    """``"[TYPE:]NAME=VALUE,..."`` to (TYPE or None, {NAME: VALUE}); ValueError says what is wrong."""
    head, sep, rest = spec.partition(":")
    job_type, body = (head.strip(), rest) if sep and "=" not in head else (None, spec)
    if job_type == "":
        raise ValueError("the job type before ':' is empty")
    limits: dict[str, int] = {}
    for item in body.split(","):
        name, eq, value = item.strip().partition("=")
        if not eq:
            raise ValueError(f"{item.strip()!r} is not NAME=VALUE")
        if name not in LIMIT_NAMES:
            raise ValueError(f"unknown limit {name!r} (known: {', '.join(LIMIT_NAMES)})")
        if name in limits:
            raise ValueError(f"limit {name!r} is given twice")
        try:
            amount = int(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a whole number") from None
        if amount < 1:
            raise ValueError(f"{name} must be at least 1")
        limits[name] = amount
    return job_type, limits


class AttemptLimits:
    """Works out the limits of one attempt from the operator's settings and the job's memory."""

    def __init__(self, worker: Mapping[str, int] | None = None, per_type: Mapping[str, Mapping[str, int]] | None = None,
                 *, offered_memory: int = 0):  # fmt: skip
        self.worker = dict(worker or {})
        self.per_type = {name: dict(limits) for name, limits in (per_type or {}).items()}
        self.offered_memory = offered_memory

    @classmethod
    def from_specs(cls, specs: Iterable[str], *, offered_memory: int = 0) -> AttemptLimits:
        """From ``--limits`` values; a type or worker-wide limit given twice is a ValueError."""
        worker: dict[str, int] = {}
        per_type: dict[str, dict[str, int]] = {}
        for spec in specs:
            job_type, limits = parse_limits(spec)
            into = worker if job_type is None else per_type.setdefault(job_type, {})
            for name, value in limits.items():
                if name in into:
                    where = f"for {job_type}" if job_type else "for every type"
                    raise ValueError(f"limit {name!r} {where} is given twice")
                into[name] = value
        return cls(worker, per_type, offered_memory=offered_memory)

    def for_attempt(self, job_type: str, job_memory: int = 0) -> dict[str, int]:
        """The limits of an attempt of ``job_type`` whose job requires ``job_memory`` MiB (0: none)."""
        limits = {**self.worker, **self.per_type.get(job_type, {})}
        operator_memory = limits.get("memory")
        wanted = job_memory or (self.offered_memory if operator_memory is None else 0)
        if wanted:
            limits["memory"] = min(wanted, operator_memory) if operator_memory else wanted
        return limits

    def describe(self) -> str:
        """The settings in words, for the worker's start-up log line."""
        parts = [_words(self.worker) or "none"]
        parts += [f"{name}: {_words(limits)}" for name, limits in sorted(self.per_type.items())]
        if self.offered_memory and "memory" not in self.worker:
            parts.append(f"memory per job: {self.offered_memory} MiB offered")
        return "; ".join(parts)


def _words(limits: Mapping[str, int]) -> str:
    return ", ".join(f"{name} {value}" for name, value in sorted(limits.items()))
