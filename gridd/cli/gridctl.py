"""gridctl: submit jobs to a gridd server, follow them, and steer the grid.

Everything that can go wrong before talking to the server (arguments, the
records file, the secret file) is checked first, so a mistake exits 2 with
nothing submitted. Then :func:`run` connects with the Deferred API of
:mod:`gridd.client` under ``task.react`` and runs one command coroutine.
Tables and JSON Lines go to stdout; progress and errors go to stderr, so
stdout stays fit for pipes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import aclosing
from typing import BinaryIO, NoReturn, TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from twisted.internet.task import react
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from gridd import client, config, errors, tls, wire
from gridd.cli.photos import add_photos_commands
from gridd.peer import ConnectionDropped

__all__ = ["main", "build_parser", "prepare", "run", "read_records", "InputError"]

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_CONNECT = 0, 1, 2, 3

_EPILOG = """\
exit status: 0 success; 1 the server refused a request (or, with --wait, a job
did not finish as done); 2 bad usage or unreadable input; 3 cannot connect, or
the connection was lost and no server took gridctl back within 60 s, or it was
lost before the reply to a change (submit, cancel, ...), which is then not
repeated: look before trying again. Reads and --wait reconnect, to any --server;
so does a change that had not been sent yet, which is then sent there once.

a failed submit: many jobs go out in several SUBMITs, each committed on its
own. stdout still lists the jobs that were committed (ids, or with --json their
usual lines), and stderr says which jobs were committed, which may or may not
have been (their SUBMIT was sent and the connection was lost before its reply,
or the server answered commit_unknown: its database lost the connection while
committing; look with gridctl list before submitting them again), and which were refused
or not sent (those do not exist: submit them again). With --json the last
stdout line is then
  {"error": CODE, "message": TEXT, "submitted": [FIRST, LAST],
   "unknown": [FIRST, LAST], "refused": [FIRST, LAST], "not_sent": [FIRST, LAST]}
where CODE is the server's error code, or outcome_unknown, reconnect_failed or
connection_lost; each range (null when empty) counts jobs from 1 in the order
they were built (job N holds records (N-1)*R+1 to N*R with --records-per-job
R), and the job lines before it are those of "submitted", in order.
"""


class InputError(Exception):
    """Input that gridctl cannot use: a bad records line, an unreadable file."""


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``gridctl`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "offline", None) is not None:  # gridctl certs: no server, no secret
        sys.exit(args.offline(args, sys.stdout, sys.stderr))
    try:
        prepare(args)
    except InputError as e:
        print(f"gridctl: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    _log_errors_to(sys.stderr)
    react(_react_main, (args,))


async def _react_main(reactor, args: argparse.Namespace) -> None:
    try:
        code = await run(reactor, args)
    except BrokenPipeError:
        # The reader left (``gridctl results 7 | head``): not an error. Point
        # stdout at /dev/null so that the flush at exit does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    if code != EXIT_OK:
        raise SystemExit(code)


def _log_errors_to(stream: TextIO) -> None:
    """Show only errors: the one-line messages of :func:`run` say the rest."""
    observer = FilteringLogObserver(
        textFileLogObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# -- arguments -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridctl",
        description="Submit jobs to a gridd server, follow them, and steer the grid.\n"
        "The options below go before the command: gridctl --server ENDPOINT list",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--server",
        metavar="ENDPOINT",
        action="append",
        help="server endpoint, e.g. tcp:HOST:7700 or tls:HOST:7701:trustRoots=DIR; repeat it for"
        " servers sharing one database, tried in turn (default: $GRIDD_SERVER, space-separated,"
        f" or {config.DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--secret-file",
        metavar="PATH",
        help="file holding the shared secret (default: $GRIDD_DATA/secret, ./gridd-data/secret or ~/.gridd/secret)",
    )
    parser.add_argument("--name", default="gridctl", help="this client's name in the server's logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="submit records as one or more jobs")
    submit.add_argument("file", help="JSON Lines file of records, one JSON value per line; - for stdin")
    submit.add_argument("--type", required=True, help="job type, as the workers' handlers name it")
    submit.add_argument("--name", dest="job_name", metavar="NAME", help="job name (default: the file's name)")
    submit.add_argument("--priority", type=int, metavar="N", help="higher runs first (default 0)")
    submit.add_argument("--requires-memory", type=_natural, metavar="MIB", help="memory a worker must offer")
    submit.add_argument(
        "--tag", dest="tags", action="append", metavar="TAG", help="tag a worker must have (repeatable)"
    )
    submit.add_argument("--min-version", metavar="VERSION", help="lowest handler version that may run the job")
    submit.add_argument("--retries", type=_natural, metavar="N", help="failed attempts to retry (default 3)")
    submit.add_argument("--timeout", type=_positive_float, metavar="SECONDS", help="run-time limit of an attempt")
    submit.add_argument("--params", type=_json_object, metavar="JSON", help="parameters for the handler, a JSON object")
    submit.add_argument(
        "--records-per-job", type=_positive_int, metavar="N", help="split the records into jobs of N (default: one job)"
    )
    submit.add_argument("--wait", action="store_true", help="show progress until every job has finished")
    submit.add_argument("--json", action="store_true", help="print JSON Lines instead of ids")
    submit.set_defaults(run=cmd_submit)

    listing = commands.add_parser("list", help="list jobs")
    listing.add_argument("--state", help="only jobs in this state")
    listing.add_argument("--type", help="only jobs of this type")
    listing.add_argument("--limit", type=_positive_int, help="at most this many jobs (default: all)")
    listing.add_argument("--json", action="store_true", help="print JSON Lines")
    listing.set_defaults(run=cmd_list)

    show = commands.add_parser("show", help="show a job and its history")
    show.add_argument("job", type=_job_id)
    show.add_argument("--json", action="store_true", help="print the job as one JSON line")
    show.set_defaults(run=cmd_show)

    workers = commands.add_parser("workers", help="list connected workers")
    workers.add_argument("--json", action="store_true", help="print JSON Lines")
    workers.set_defaults(run=cmd_workers)

    stats = commands.add_parser("stats", help="show the server's counters")
    stats.add_argument("--json", action="store_true", help="print one JSON line")
    stats.set_defaults(run=cmd_stats)

    results = commands.add_parser("results", help="write a job's results as JSON Lines")
    results.add_argument("job", type=_job_id)
    results.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    results.set_defaults(run=cmd_results)

    for verb, what in [
        ("cancel", "cancel jobs"),
        ("pause", "pause jobs"),
        ("resume", "resume paused jobs"),
        ("requeue", "queue jobs afresh"),
    ]:
        control = commands.add_parser(verb, help=what)
        control.add_argument("jobs", type=_job_id, nargs="+", metavar="JOB")
        control.set_defaults(run=cmd_job_control, action=verb)

    for action, what in [
        ("drain", "stop giving a worker new jobs"),
        ("undrain", "give a drained worker jobs again"),
        ("disconnect", "drop a worker's connection; its jobs go back to the queue"),
    ]:
        control = commands.add_parser(action, help=what)
        control.add_argument("worker", metavar="WORKER")
        control.set_defaults(run=cmd_worker, action=action)

    worker = commands.add_parser("worker", help="act on a worker by name")
    worker_actions = worker.add_subparsers(dest="worker_action", required=True, metavar="ACTION")
    for action, words in (
        ("busy", "say that a worker's host is busy (the host-side signal): it takes no work and pauses its jobs"),
        ("idle", "say that a worker's host is idle again"),
    ):
        host = worker_actions.add_parser(action, help=words)
        host.add_argument("worker", metavar="WORKER")
        host.add_argument("--reason", default=None, help="why, for the worker's log and operators")
        host.set_defaults(run=cmd_worker_host, action=action)
    clear = worker_actions.add_parser(
        "clear", help="lift a worker's flags: give it again the job types it kept failing (see gridctl workers)"
    )
    clear.add_argument("worker", metavar="WORKER")
    clear.set_defaults(run=cmd_worker_clear)

    dispatch = commands.add_parser("dispatch", help="turn the global stop switch")
    dispatch.add_argument("switch", choices=["on", "off"])
    dispatch.set_defaults(run=cmd_dispatch)

    credentials = commands.add_parser(
        "credentials",
        help="add, list and revoke the credentials workers and clients log in with (admin only)",
        description="Each worker and client gets its own credential, with a role: worker (runs jobs, "
        "under its credential's id as its name), submitter (submits and steers its own jobs) or admin "
        "(everything). The server keeps only a hash; the token is printed once, by add.",
    )
    actions = credentials.add_subparsers(dest="credentials_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a credential and print its token (once)")
    add.add_argument("id", type=_credential_id, metavar="ID", help="its id: 1-64 of A-Z a-z 0-9 _ -")
    add.add_argument("--role", required=True, choices=["worker", "submitter", "admin"])
    add.add_argument("--note", help="a note for operators (whose desk, which cron job)")
    add.set_defaults(run=cmd_credentials_add)
    listed = actions.add_parser("list", help="list credentials (never their secrets)")
    listed.add_argument("--json", action="store_true", help="print JSON Lines")
    listed.set_defaults(run=cmd_credentials_list)
    revoke = actions.add_parser("revoke", help="revoke a credential and close its live connections")
    revoke.add_argument("id", type=_credential_id, metavar="ID")
    revoke.set_defaults(run=cmd_credentials_revoke)

    certs = commands.add_parser(
        "certs",
        help="make the TLS certificates a small office needs (works offline, needs no server)",
        description="Make a certificate authority, then a certificate for each server; workers and "
        "clients get the CA's trust directory. Layout: DIR/ca.pem, DIR/ca.key (keep it safe), "
        "DIR/trust/ (copy to every worker and client host), DIR/servers/NAME/{cert,key}.pem.",
    )
    actions = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create a certificate authority in DIR")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--name", dest="ca_name", default="gridd CA", help="the CA's name (default: gridd CA)")
    init.add_argument("--days", type=_positive_int, default=tls.CA_DAYS, help=f"validity (default {tls.CA_DAYS})")
    init.set_defaults(offline=cmd_certs_init)
    server = actions.add_parser("server", help="issue a server certificate signed by the CA in DIR")
    server.add_argument("dir", metavar="DIR")
    server.add_argument(
        "--host",
        dest="hosts",
        action="append",
        required=True,
        metavar="NAME_OR_IP",
        help="a DNS name or IP address workers use to reach the server (repeatable; the first names the files)",
    )
    server.add_argument("--port", type=_positive_int, default=7701, help="port for the printed endpoints (7701)")
    server.add_argument(
        "--days", type=_positive_int, default=tls.SERVER_DAYS, help=f"validity (default {tls.SERVER_DAYS})"
    )
    server.set_defaults(offline=cmd_certs_server)
    add_photos_commands(commands)
    return parser


def _number(convert, acceptable, what: str):
    """An argparse type that names the problem instead of the converter's function name."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not acceptable(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_job_id = _number(int, lambda v: 0 <= v < 2**53, "a job id")
_credential_id = _number(
    str, lambda v: wire.CREDENTIAL_ID.match(v) is not None, "a credential id (1-64 of A-Za-z0-9_-)"
)
_natural = _number(int, lambda v: v >= 0, "a whole number >= 0")
_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
_positive_float = _number(float, lambda v: 0 < v < math.inf, "a positive number")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# -- input, checked before connecting ---------------------------------------


def server_endpoints(args: argparse.Namespace) -> list[str]:
    """The servers to try, in order: every --server, else $GRIDD_SERVER (space-separated), else the default."""
    return args.server or os.environ.get("GRIDD_SERVER", config.DEFAULT_SERVER).split()


def prepare(args: argparse.Namespace, stdin: BinaryIO | None = None) -> None:
    """Read the secret and, for ``submit``, the records into ``args``; raise InputError.

    ``stdin`` is the binary stream ``-`` reads (default: the process's stdin).
    """
    args.servers = server_endpoints(args)
    path = args.secret_file or config.default_secret_file()
    try:
        args.token = config.read_secret(path)
    except OSError as e:
        raise InputError(f"cannot read the secret file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"secret file {path} is not UTF-8 text") from None
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.command == "submit":
        args.jobs = build_jobs(args, _load_records(args.file, stdin or sys.stdin.buffer))


def _load_records(path: str, stdin: BinaryIO) -> list:
    if path == "-":
        return read_records(stdin, "stdin")
    try:
        with open(path, "rb") as f:
            return read_records(f, path)
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None


def read_records(lines, label: str) -> list:
    """Parse JSON Lines (one JSON value per line, blank lines skipped) from a binary stream."""
    records = []
    for number, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").strip()
            if text:
                records.append(json.loads(text, parse_constant=_reject_constant))
        except UnicodeDecodeError:
            raise InputError(f"{label}, line {number}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{label}, line {number}: not valid JSON: {e.msg} (column {e.colno})") from None
        except ValueError as e:
            raise InputError(f"{label}, line {number}: not valid JSON: {e}") from None
    if not records:
        raise InputError(f"{label}: no records")
    return records


def build_jobs(args: argparse.Namespace, records: list) -> list[dict]:
    """Turn the submit options and records into JOBSPECs, ``--records-per-job`` records each."""
    spec: dict = {"type": args.type}
    requires = {
        key: value
        for key, value in [("memory", args.requires_memory), ("tags", args.tags), ("version", args.min_version)]
        if value is not None
    }
    optional = [
        ("params", args.params),
        ("priority", args.priority),
        ("requires", requires or None),
        ("retries", args.retries),
        ("timeout", args.timeout),
    ]
    spec.update((key, value) for key, value in optional if value is not None)
    name = args.job_name or (None if args.file == "-" else os.path.basename(args.file))
    size = args.records_per_job or len(records)
    parts = [records[start : start + size] for start in range(0, len(records), size)]
    jobs = []
    for number, part in enumerate(parts, 1):
        job = dict(spec, records=part)
        if name:
            job["name"] = name if len(parts) == 1 else f"{name} [{number}/{len(parts)}]"
        jobs.append(job)
    return jobs


# -- running a command -------------------------------------------------------


async def run(
    reactor, args: argparse.Namespace, connect=client.connect, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Connect, run the command coroutine ``args.run``, close; return the exit status.

    Server refusals become ``gridctl: error: CODE: MESSAGE`` and status 1;
    connection trouble becomes one line and status 3, never a traceback.
    The client fails over between ``args.servers`` by itself (see
    :class:`gridd.client.Client`): a ``--wait`` whose server goes away
    reconnects and its progress bar carries on.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        grid = await connect(reactor, args.servers, args.token, args.name)
    except errors.GriddError as e:
        return _refused(err, e)
    except ValueError as e:
        print(f"gridctl: error: bad --server endpoint {e}", file=err)
        return EXIT_USAGE
    except Exception as e:
        print(f"gridctl: cannot connect to {' or '.join(args.servers)}: {str(e) or type(e).__name__}", file=err)
        return EXIT_CONNECT
    try:
        return await args.run(grid, args, out, err)
    except errors.GriddError as e:
        return _refused(err, e)
    except (client.OutcomeUnknown, client.ReconnectFailed) as e:
        print(f"gridctl: {e}", file=err)  # each says which connection was lost and what became of the request
        return EXIT_CONNECT
    except ConnectionDropped as e:
        print(f"gridctl: lost the connection to {' or '.join(args.servers)}: {e}", file=err)
        return EXIT_CONNECT
    finally:
        await grid.close()


def _refused(err: TextIO, e: errors.GriddError, subject: str = "") -> int:
    print(f"gridctl: error: {e.code}: {subject}{e.message}", file=err)
    return EXIT_SERVER_ERROR


def _print_json(stream: TextIO, value) -> None:
    stream.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")


def _console(stream: TextIO) -> Console:
    """A rich console that prints job names and tags as data, never as markup.

    Off a terminal, rich would squeeze tables into 80 columns and cut cells;
    a pipe gets whole lines instead.
    """
    width = None if stream.isatty() or "COLUMNS" in os.environ else 10_000
    return Console(file=stream, markup=False, highlight=False, emoji=False, width=width)


def _table(*columns: str) -> Table:
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)


def _details(rows) -> Table:
    """A two-column grid of labels and values."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, value in rows:
        grid.add_row(label, _text(value))
    return grid


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _text(value) -> str:
    if value is None or value == "" or value == {}:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# -- the commands --------------------------------------------------------------
#
# Each takes the connected client.Client, the arguments and the two streams,
# and returns the exit status. GriddError and ConnectionDropped are left to run(),
# except by submit, which says what became of each job. The client reconnects by
# itself: reads and --wait carry on across a lost connection; a change lost after
# it was sent and before its reply fails with OutcomeUnknown.


async def cmd_submit(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    try:
        ids = await grid.submit(args.jobs)
    except (errors.GriddError, ConnectionDropped) as e:
        if not hasattr(e, "not_sent"):  # submit() gives every failure the fate of each job
            raise
        return _submit_failed(e, args, out, err)
    _print_submitted(ids, args, out)
    if not args.wait:
        return EXIT_OK
    out.flush()
    totals = {job: len(spec["records"]) for job, spec in zip(ids, args.jobs, strict=True)}
    final = await _wait_with_progress(grid, totals, err)
    unfinished = [status for status in final.values() if status["state"] != "done"]
    for status in unfinished:
        print(f"gridctl: job {status['job']} {status['state']}", file=err)
    return EXIT_SERVER_ERROR if unfinished else EXIT_OK


def _print_submitted(ids: list[int], args, out: TextIO) -> None:
    """One line per committed job: its id, or with --json its id, name and number of records."""
    for job, spec in zip(ids, args.jobs, strict=False):  # a failed submit committed fewer
        if args.json:
            _print_json(out, {"job": job, "name": spec.get("name"), "records": len(spec["records"])})
        else:
            print(job, file=out)


def _submit_failed(e: Exception, args, out: TextIO, err: TextIO) -> int:
    """Report a submit that failed, maybe part way: the jobs it committed, then what became of the others."""
    _print_submitted(e.submitted, args, out)
    if isinstance(e, errors.GriddError):
        code, status, message = e.code, EXIT_SERVER_ERROR, e.message
        print(f"gridctl: error: {e.code}: {e.message}", file=err)
    else:
        status = EXIT_CONNECT
        if isinstance(e, client.OutcomeUnknown):
            code = "outcome_unknown"
            cause = f" ({e.__cause__})" if e.__cause__ is not None else ""
            message = f"lost the connection to {e.endpoint} before the reply to a SUBMIT{cause}; it was not sent again"
        elif isinstance(e, client.ReconnectFailed):
            code, message = "reconnect_failed", str(e)
        else:
            code, message = "connection_lost", f"lost the connection to {' or '.join(args.servers)}: {e}"
        print(f"gridctl: {message}", file=err)
    if e.submitted or e.unknown or not isinstance(e, errors.GriddError):
        print(f"gridctl: {_fates(e, len(args.jobs))}", file=err)
    if args.json:
        fates = [("submitted", range(len(e.submitted))), ("unknown", e.unknown), ("refused", e.refused),
                 ("not_sent", e.not_sent)]  # fmt: skip
        _print_json(out, {"error": code, "message": message, **{name: _job_range(r) for name, r in fates}})
    return status


def _fates(e: Exception, total: int) -> str:
    """``of 6 jobs: jobs 1-2 submitted (...); jobs 3-4 may or may not have been ...; jobs 5-6 not sent``."""
    parts = []
    if e.submitted:
        parts.append(f"{_jobs(range(len(e.submitted)))} submitted (ids on stdout)")
    if e.unknown:
        again = "it" if len(e.unknown) == 1 else "them"
        look = f"look (gridctl list) before submitting {again} again"
        parts.append(f"{_jobs(e.unknown)} may or may not have been submitted: {look}")
    if e.refused:
        parts.append(f"{_jobs(e.refused)} refused")
    if e.not_sent:
        parts.append(f"{_jobs(e.not_sent)} not sent")
    return f"of {total} job{'' if total == 1 else 's'}: " + "; ".join(parts)


def _jobs(indexes: range) -> str:
    """Job numbers counted from 1: ``job 3`` or ``jobs 3-4``."""
    if len(indexes) == 1:
        return f"job {indexes.start + 1}"
    return f"jobs {indexes.start + 1}-{indexes.stop}"


def _job_range(indexes: range) -> list[int] | None:
    """``[FIRST, LAST]`` job numbers counted from 1, or None for no job."""
    return [indexes.start + 1, indexes.stop] if indexes else None


#: Seconds between two redraws of the progress bar: events may come by the thousand.
_REDRAW_INTERVAL = 0.1


async def _wait_with_progress(grid: client.Client, totals: dict[int, int], err: TextIO) -> dict:
    """Wait for the jobs, drawing accepted records over total on ``err`` as EVENTs arrive."""
    accepted: dict[int, int] = {}
    finished: set[int] = set()
    records_done = 0
    last_redraw = -math.inf
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("records"),
        console=_console(err),
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    task = progress.add_task(f"0/{len(totals)} jobs finished", total=sum(totals.values()))

    def on_event(status):
        nonlocal records_done, last_redraw
        job = status["job"]
        now_accepted = status.get("accepted", accepted.get(job, 0))
        records_done += now_accepted - accepted.get(job, 0)
        accepted[job] = now_accepted
        if status["state"] in client.TERMINAL_STATES:
            finished.add(job)
        else:
            finished.discard(job)
        redraw = progress.get_time() - last_redraw >= _REDRAW_INTERVAL or len(finished) == len(totals)
        if redraw:
            last_redraw = progress.get_time()
        progress.update(
            task, completed=records_done, description=f"{len(finished)}/{len(totals)} jobs finished", refresh=redraw
        )

    with progress:
        return await grid.wait(list(totals), on_event)


async def cmd_list(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    page_size = min(args.limit, 1000) if args.limit else None
    table = _table("ID", "NAME", "TYPE", "STATE", "PRIORITY", "RECORDS", "ATTEMPTS", "WORKER", "UPDATED")
    count = 0
    async with aclosing(grid.iter_jobs(args.state, args.type, page_size)) as jobs:
        async for job in jobs:
            if args.json:
                _print_json(out, job)
            else:
                table.add_row(
                    _text(job.get("id")),
                    _text(job.get("name")),
                    _text(job.get("type")),
                    _text(job.get("state")),
                    _text(job.get("priority")),
                    f"{_text(job.get('accepted'))}/{_text(job.get('total'))}",
                    _text(job.get("attempts")),
                    _text(job.get("worker")),
                    _when(job.get("updated")),
                )
            count += 1
            if count == args.limit:
                break
    if not args.json:
        _console(out).print(table)
    return EXIT_OK


async def cmd_show(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    job = await grid.show(args.job)
    if args.json:
        _print_json(out, job)
        return EXIT_OK
    details = _details(
        [
            ("id", job.get("id")),
            ("name", job.get("name")),
            ("type", job.get("type")),
            ("state", job.get("state")),
            ("priority", job.get("priority")),
            ("records", f"{_text(job.get('accepted'))}/{_text(job.get('total'))} accepted"),
            ("failed records", job.get("failed_records")),
            ("attempts", f"{_text(job.get('attempts'))} (retries {_text(job.get('retries'))})"),
            ("timeout", job.get("timeout")),
            ("requires", job.get("requires")),
            ("params", job.get("params")),
            ("worker", job.get("worker")),
            ("lease", job.get("lease")),
            ("error", job.get("error")),
            ("not before", _when(job.get("not_before"))),
            ("created", _when(job.get("created"))),
            ("updated", _when(job.get("updated"))),
        ]
    )
    console = _console(out)
    console.print(details)
    if job.get("attempt_history"):
        attempts = _table("ATTEMPT", "WORKER", "START", "END", "OUTCOME", "ERROR")
        for attempt in job["attempt_history"]:
            attempts.add_row(
                _text(attempt.get("attempt")),
                _text(attempt.get("worker")),
                _when(attempt.get("start")),
                _when(attempt.get("end")),
                _text(attempt.get("outcome")),
                _text(attempt.get("error")),
            )
        console.print()
        console.print(attempts)
    if not job.get("history"):
        return EXIT_OK
    history = _table("AT", "EVENT", "ATTEMPT", "WORKER", "DETAIL")
    for entry in job["history"]:
        history.add_row(
            _when(entry.get("at")),
            _text(entry.get("event")),
            _text(entry.get("attempt")),
            _text(entry.get("worker")),
            _text(entry.get("detail")),
        )
    console.print()
    console.print(history)
    return EXIT_OK


async def cmd_workers(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    workers = await grid.workers()
    if args.json:
        for worker in workers:
            _print_json(out, worker)
        return EXIT_OK
    table = _table(
        "NAME", "ADDRESS", "STATE", "BUSY", "TYPES", "MEMORY", "TAGS", "DRAINED", "FLAGGED", "AGENT", "LAST SEEN"
    )
    for worker in workers:
        types = worker.get("types") or {}
        table.add_row(
            _text(worker.get("name")),
            _text(worker.get("address")),
            _worker_state(worker),
            f"{len(worker.get('running') or [])}/{_text(worker.get('slots'))}",
            " ".join(f"{name}={version}" for name, version in sorted(types.items())) or "-",
            _text(worker.get("memory")),
            " ".join(worker.get("tags") or []) or "-",
            "yes" if worker.get("drained") else "no",
            " ".join(flag.get("type", "?") for flag in worker.get("flags") or []) or "-",
            _text(worker.get("agent")),
            _when(worker.get("last_seen")),
        )
    console = _console(out)
    console.print(table)
    flags = [(worker.get("name"), flag) for worker in workers for flag in worker.get("flags") or []]
    if flags:
        reasons = _table("WORKER", "TYPE", "SINCE", "WHY")
        for name, flag in flags:
            reasons.add_row(_text(name), _text(flag.get("type")), _when(flag.get("since")), _text(flag.get("reason")))
        console.print()
        console.print(reasons)
        print("gridctl worker clear WORKER gives a flagged worker those types again.", file=err)
    return EXIT_OK


def _worker_state(worker: dict) -> str:
    """A worker's state for the table: idle, busy or vacating, with its reason; "silent" when it is."""
    state = _text(worker.get("state"))
    if worker.get("state_reason"):
        state += f" ({worker['state_reason']})"
    if worker.get("silent"):
        state += ", silent"
    return state


async def cmd_stats(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    stats = await grid.stats()
    if args.json:
        _print_json(out, stats)
        return EXIT_OK
    by_state = sorted((stats.get("jobs") or {}).items())
    rows = [(f"jobs {state}", count) for state, count in by_state]
    rows += [(key, stats.get(key)) for key in ("workers", "slots", "busy", "vacates")]
    rows.append(("dispatching", "yes" if stats.get("dispatching") else "no"))
    _console(out).print(_details(rows))
    return EXIT_OK


async def cmd_results(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    """Write the results page by page, so a million records never sit in memory.

    The first page is fetched before ``-o`` creates its file: an unknown job
    leaves no empty file behind.
    """
    page = await grid.results_page(args.job)
    try:
        target = open(args.output, "w", encoding="utf-8") if args.output else out
    except OSError as e:
        print(f"gridctl: error: cannot write {args.output}: {e.strerror}", file=err)
        return EXIT_USAGE
    try:
        while True:
            for result in page["results"]:
                _print_json(target, result)
            if page.get("next") is None:
                return EXIT_OK
            page = await grid.results_page(args.job, page["next"])
    finally:
        if target is not out:
            target.close()


async def cmd_job_control(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    """Apply the action to each job in turn; a refusal is reported and the rest go on."""
    act = getattr(grid, args.action)
    status = EXIT_OK
    for job in args.jobs:
        try:
            state = await act(job)
        except errors.GriddError as e:
            status = _refused(err, e, subject=f"job {job}: ")
        else:
            print(f"{job} {state}", file=out)
    return status


_DONE = {"drain": "drained", "undrain": "undrained", "disconnect": "disconnected"}


async def cmd_worker(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    await grid.worker_action(args.worker, args.action)
    print(f"{args.worker} {_DONE[args.action]}", file=out)
    return EXIT_OK


async def cmd_worker_host(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    connected = await grid.worker_host(args.worker, args.action == "busy", args.reason)
    later = "" if connected else " (not connected: it is told at its next HELLO)"
    print(f"{args.worker} host {args.action}{later}", file=out)
    return EXIT_OK


async def cmd_worker_clear(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    cleared = await grid.clear_worker(args.worker)
    print(f"{args.worker} cleared: {' '.join(cleared)}" if cleared else f"{args.worker} had no flags", file=out)
    return EXIT_OK


async def cmd_dispatch(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    dispatching = await grid.dispatch(args.switch == "on")
    print(f"dispatching {'on' if dispatching else 'off'}", file=out)
    return EXIT_OK


async def cmd_credentials_add(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    token = await grid.add_credential(args.id, args.role, args.note)
    print(token, file=out)
    where = "the worker's secret file (twistd gridworker --secret-file)" if args.role == "worker" else "its secret file"
    print(
        f"credential {args.id} ({args.role}) created. The token above is shown only this once: put it in {where},"
        " mode 0600." + (f" The worker must run with --name {args.id}." if args.role == "worker" else ""),
        file=err,
    )
    return EXIT_OK


async def cmd_credentials_list(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    credentials = await grid.list_credentials()
    if args.json:
        for credential in credentials:
            _print_json(out, credential)
        return EXIT_OK
    table = _table("ID", "ROLE", "CREATED", "REVOKED", "NOTE")
    for c in credentials:
        table.add_row(
            _text(c.get("id")),
            _text(c.get("role")),
            _when(c.get("created")),
            _when(c.get("revoked")),
            _text(c.get("note")),
        )
    _console(out).print(table)
    return EXIT_OK


async def cmd_credentials_revoke(grid: client.Client, args, out: TextIO, err: TextIO) -> int:
    await grid.revoke_credential(args.id)
    print(f"{args.id} revoked", file=out)
    return EXIT_OK


# -- certificates (no server) ---------------------------------------------------------


def cmd_certs_init(args, out: TextIO, err: TextIO) -> int:
    """``gridctl certs init DIR``: a new certificate authority."""
    try:
        trust = tls.make_ca(args.dir, args.ca_name, days=args.days)
    except (OSError, ValueError) as e:
        print(f"gridctl: error: {e}", file=err)
        return EXIT_USAGE
    directory = os.path.abspath(args.dir)
    print(f"certificate authority {args.ca_name!r} created in {directory}", file=out)
    key = os.path.join(directory, "ca.key")
    print(f"  {key}  its private key: keep it on this host, readable by you only", file=out)
    print(f"  {trust}  the trust directory: copy it to every worker and client host", file=out)
    print(f"next: gridctl certs server {args.dir} --host SERVER-NAME [--host SERVER-IP ...]", file=out)
    return EXIT_OK


def cmd_certs_server(args, out: TextIO, err: TextIO) -> int:
    """``gridctl certs server DIR --host NAME``: a server certificate, and the endpoints that use it."""
    hosts = [h.strip() for h in args.hosts if h.strip()]
    if not hosts:
        print("gridctl: error: --host needs a DNS name or an IP address", file=err)
        return EXIT_USAGE
    directory = os.path.abspath(args.dir)
    try:
        cert = tls.make_server_cert(directory, os.path.join(directory, "servers", hosts[0]), hosts, days=args.days)
    except FileNotFoundError as e:
        print(f"gridctl: error: no CA in {directory} ({e.filename}): run gridctl certs init first", file=err)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"gridctl: error: {e}", file=err)
        return EXIT_USAGE
    trust = tls.escape_endpoint_value(os.path.join(directory, "trust"))
    print(f"server certificate for {', '.join(cert.names)}, valid until {cert.not_after:%Y-%m-%d}", file=out)
    print(f"  server:  twistd gridd --listen {cert.listen_spec(args.port)}", file=out)
    print(f"  workers: twistd gridworker --server tls:{hosts[0]}:{args.port}:trustRoots={trust}", file=out)
    print(f"  clients: gridctl --server tls:{hosts[0]}:{args.port}:trustRoots={trust} ...", file=out)
    print("(copy the trust directory to each worker and client host and give its path there)", file=out)
    return EXIT_OK
