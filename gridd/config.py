"""Defaults shared by the server, the worker and gridctl.

One place decides where the shared secret lives, so that a worker or gridctl
started next to a server finds the secret that server wrote without being
told, and every command documents the same rule in its ``--help``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DEFAULT_SERVER",
    "DATA_ENV",
    "default_data_dir",
    "default_secret_file",
    "read_secret",
]

#: The endpoint workers and clients connect to when given none.
DEFAULT_SERVER = "tcp:127.0.0.1:7700"

#: The environment variable that names the server's data directory.
DATA_ENV = "GRIDD_DATA"


def default_data_dir() -> Path:
    """The server's data directory: ``$GRIDD_DATA``, else ``./gridd-data``."""
    return Path(os.environ.get(DATA_ENV, "gridd-data"))


def default_secret_file() -> Path:
    """Where to read the shared secret when no ``--secret-file`` is given.

    The server writes its secret to ``DATADIR/secret``. ``$GRIDD_DATA/secret``
    when ``GRIDD_DATA`` is set (an explicit choice, used even before the file
    exists); else ``./gridd-data/secret`` when it exists, which is the case
    when the command runs where a server with default options runs; else
    ``~/.gridd/secret``, where an operator copies the secret on other hosts.
    """
    local = default_data_dir() / "secret"
    if DATA_ENV in os.environ or local.exists():
        return local
    return Path.home() / ".gridd" / "secret"


def read_secret(path: str | os.PathLike) -> str:
    """The secret stored in ``path``, without trailing whitespace (PROTOCOL.md 6.1).

    Raises ``OSError`` when the file cannot be read and ``ValueError`` when it
    is empty.
    """
    secret = Path(path).expanduser().read_text(encoding="utf-8").rstrip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret
