"""``twistd gridworker``: options and the service tree, nothing else.

``makeService`` builds the tree and never connects by itself; starting the
tree (twistd does) connects to the server and keeps reconnecting.
"""

from __future__ import annotations

import os
import socket

from twisted.python import usage

from gridd import config, tls
from gridd.jobtypes import load_job_types
from gridd.worker.command import parse_command
from gridd.worker.guest import GuestOptions
from gridd.worker.limits import LIMIT_NAMES, AttemptLimits
from gridd.worker.sandbox import SandboxUnavailable, find_sandbox
from gridd.worker.service import HANDLER_MODES, make_worker_service

__all__ = ["Options", "makeService"]


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a gridd worker: it connects to a gridd server, says which job types it can run and "
        "how many jobs at once, and runs the jobs the server pushes to it, reporting each record's "
        "result as it is produced. It reconnects with backoff when the connection is lost; jobs "
        "keep running meanwhile and their results are sent once the server confirms the leases "
        "are still this worker's. Job types are found through the 'gridd.jobtypes' entry points. "
        "Stopping the worker (SIGTERM) gives its running jobs back to the server."
    )
    optParameters = [
        [
            "slots",
            None,
            os.cpu_count() or 1,
            "How many jobs to run at once (default: this host's number of CPUs); 0 takes no work.",
            int,
        ],
        [
            "name",
            None,
            None,
            "The worker's name, which identifies it across reconnects and restarts and must be "
            "unique among the server's workers (default: this host's name). Give each worker "
            "its own name when several run on one host.",
        ],
        [
            "secret-file",
            None,
            None,
            "File holding this worker's token: its credential (gridctl credentials add NAME --role worker), "
            "or the shared secret the server wrote to DATADIR/secret (default: $GRIDD_DATA/secret "
            "when GRIDD_DATA is set, else ./gridd-data/secret when it exists, else ~/.gridd/secret).",
        ],
        [
            "types",
            None,
            None,
            "Comma-separated job types to offer, e.g. textstats,sleep (default: every installed type).",
        ],
        ["memory", None, 0, "Memory offered to one job, in MiB; jobs requiring more are not sent here.", int],
        ["tags", None, None, "Comma-separated labels jobs may require, e.g. gpu,linux (default: none)."],
        [
            "handlers",
            None,
            "processes",
            "Where job types process records: 'processes' (default: a pool of child processes per type, "
            "so that a handler that crashes, hangs or eats memory fails only its attempt) or 'threads' "
            "(in the worker's own process: for trusted types and debugging; --limits do not apply).",
        ],
        [
            "cpu-threshold",
            None,
            25.0,
            "With --when-idle: the host is busy while processes other than this worker's own use more "
            "than this percentage of its CPU; 100 does not measure it.",
            float,
        ],
        [
            "user-idle",
            None,
            300.0,
            "With --when-idle: the host is busy while a person used the desk within this many seconds "
            "(logind, the X screensaver, the terminals); 0 does not measure it.",
            float,
        ],
        [
            "host-signal-file",
            None,
            None,
            "With --when-idle: a file the host writes for a worker in a VM, its first word 'busy' or "
            "'idle' (a missing file is idle) [default: none].",
        ],
        [
            "idle-after",
            None,
            60.0,
            "With --when-idle: seconds every measured source must read idle, without a break, before "
            "the host counts as idle again.",
            float,
        ],
        ["idle-poll", None, 5.0, "Seconds between two readings of the host's state.", float],
        [
            "grace",
            None,
            600.0,
            "Seconds running jobs stay paused (SIGSTOP) on a busy host before they are vacated: given back "
            "to the server, which re-queues them for another worker at once. Idle again within it, they resume.",
            float,
        ],
        [
            "data-dir",
            None,
            "~/.gridd",
            "The worker's own directory: with --sandbox, each attempt's work directory is made in DATADIR/work "
            "and removed after it; sandboxed code never sees the rest of it.",
        ],
    ]
    optFlags = [
        [
            "when-idle",
            None,
            "Work only while the host is idle (no person at the desk, little CPU used by others, or the "
            "host's signal file says idle); the worker starts busy until its host has been watched.",
        ],
        [
            "exit-when-drained",
            None,
            "Exit once an operator has drained this worker and its running jobs are finished.",
        ],
        [
            "sandbox",
            None,
            "Run handler processes and command programs under bubblewrap (bwrap must be installed): a "
            "read-only system, a private /tmp, only the attempt's work directory writable, no network unless "
            "the job type needs it (needs_network = True; for commands --command-network), the secret file and "
            "DATADIR invisible, a seccomp filter and Landlock where the kernel has it (docs/security.md). "
            "Needs --handlers processes.",
        ],
    ]

    def __init__(self):
        super().__init__()
        self["servers"] = []
        self["commands"] = []
        self["limits"] = []
        self["command-network"] = []

    def opt_server(self, spec):
        """Endpoint of a gridd server, e.g. tls:gridd.example:7701:trustRoots=certs
        [default: tcp:127.0.0.1:7700]. Repeatable: each reconnect attempt tries the next."""
        self["servers"].append(spec)

    def opt_limits(self, spec):
        self["limits"].append(spec)

    opt_limits.__doc__ = (
        "Limits of each attempt's handler process, as NAME=VALUE,... for every job type or "
        "TYPE:NAME=VALUE,... for one (a type's own wins). Names: "
        + "; ".join(f"{name} ({words})" for name, words in LIMIT_NAMES.items())
        + ". memory and processes use a control group of the process's own where the host offers "
        "one, else RLIMIT_AS and RLIMIT_NPROC. A job requiring memory (requires.memory) is limited to "
        "that, and with --memory and no memory limit each job to what is offered; a lower limit of "
        "yours always wins. The run-time limit is the job's timeout. Repeatable. [default: none]"
    )

    def opt_command(self, spec):
        self["commands"].append(spec)

    opt_command.__doc__ = (
        "A program this worker may run, as NAME=PATH: a job of type 'command' with params.command=NAME "
        "runs PATH (no shell) with its records as JSON lines on standard input, and reads one "
        '{"out": VALUE} or {"error": TEXT} line per record from its standard output. Repeatable; '
        "giving it offers the job type 'command'. Jobs name programs, never paths."
    )

    def opt_command_network(self, name):
        """With --sandbox, let the command NAME (of a --command) use the network; others have none. Repeatable."""
        self["command-network"].append(name)

    def postOptions(self):
        if not self["servers"]:
            self["servers"] = [config.DEFAULT_SERVER]
        for spec in self["servers"]:
            try:
                tls.check_client_spec(spec)
            except ValueError as e:
                raise usage.UsageError(f"--server {spec}: {e}") from None
        if self["slots"] < 0:
            raise usage.UsageError("--slots must be 0 or more")
        if self["memory"] < 0:
            raise usage.UsageError("--memory must be 0 or more")
        if self["name"] is None:
            self["name"] = socket.gethostname()
        if not 1 <= len(self["name"]) <= 128:
            raise usage.UsageError("--name must be 1 to 128 characters")
        self["tags"] = _comma_list(self["tags"] or "")
        commands = {}
        for spec in self["commands"]:
            try:
                name, path = parse_command(spec)
            except ValueError as e:
                raise usage.UsageError(f"--command {spec}: {e}") from None
            if name in commands:
                raise usage.UsageError(f"--command {name} is given twice")
            commands[name] = path
        self["commands"] = commands
        if self["handlers"] not in HANDLER_MODES:
            raise usage.UsageError(f"--handlers must be one of {', '.join(HANDLER_MODES)}")
        try:
            self["limits"] = AttemptLimits.from_specs(self["limits"], offered_memory=self["memory"])
        except ValueError as e:
            raise usage.UsageError(f"--limits: {e}") from None
        self["guest"] = self._guest_options()
        types = None if self["types"] is None else _comma_list(self["types"])
        if types is not None and "command" in types:
            if not commands:
                raise usage.UsageError("--types command needs at least one --command NAME=PATH")
            types = [t for t in types if t != "command"]
        try:
            self["job_types"] = load_job_types(types)
        except ValueError as e:
            raise usage.UsageError(f"--types: {e}") from None
        if self["secret-file"] is None:
            self["secret-file"] = str(config.default_secret_file())
        try:
            self["token"] = config.read_secret(self["secret-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot read the shared secret: {e}") from None
        unknown = sorted(set(self["command-network"]) - set(commands))
        if unknown:
            raise usage.UsageError(f"--command-network {', '.join(unknown)}: no such --command")
        self["sandbox"] = self._sandbox() if self["sandbox"] else None

    def _sandbox(self):
        if self["handlers"] != "processes":
            raise usage.UsageError("--sandbox needs --handlers processes: a thread cannot be sandboxed")
        data_dir = os.path.expanduser(self["data-dir"])
        hidden = [self["secret-file"], os.path.expanduser("~/.gridd"), str(config.default_data_dir())]
        try:
            return find_sandbox(data_dir, hidden)
        except SandboxUnavailable as e:
            raise usage.UsageError(f"--sandbox: {e}") from None

    def _guest_options(self) -> GuestOptions:
        if not 0 < self["cpu-threshold"] <= 100:
            raise usage.UsageError("--cpu-threshold must be a percentage above 0 and at most 100")
        for name in ("user-idle", "idle-after", "grace"):
            if self[name] < 0:
                raise usage.UsageError(f"--{name} must be 0 or more")
        if self["idle-poll"] <= 0:
            raise usage.UsageError("--idle-poll must be above 0")
        if not self["when-idle"]:
            given = [f"--{name}" for name in ("host-signal-file",) if self[name] is not None]
            if given:
                raise usage.UsageError(f"{', '.join(given)} needs --when-idle")
        return GuestOptions(
            when_idle=bool(self["when-idle"]),
            cpu_threshold=self["cpu-threshold"] / 100,
            user_idle=self["user-idle"],
            signal_file=self["host-signal-file"],
            idle_after=self["idle-after"],
            poll=self["idle-poll"],
            grace=self["grace"],
        )


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    return make_worker_service(
        reactor,
        options["servers"],
        name=options["name"],
        token=options["token"],
        job_types=options["job_types"],
        slots=options["slots"],
        memory=options["memory"],
        tags=options["tags"],
        commands=options["commands"],
        handlers=options["handlers"],
        limits=options["limits"],
        sandbox=options["sandbox"],
        command_network=options["command-network"],
        guest=options["guest"],
        exit_when_drained=bool(options["exit-when-drained"]),
    )
