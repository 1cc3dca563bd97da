"""Who may connect: the shared secret (per-identity credentials come later).

An authenticator's ``check(name, role, token)`` returns the identity the
connection acts as, or raises ``AuthFailed``. Per-identity credentials with
hashed tokens and roles will implement the same method.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from gridd import errors

__all__ = ["SharedSecret", "load_or_create_secret"]


class SharedSecret:
    """Every peer presents the same token, the content of the server's secret file."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the shared secret is empty")
        self._token = token.encode("utf-8")

    def check(self, name: str, role: str, token: str) -> str:
        if not hmac.compare_digest(self._token, token.encode("utf-8")):
            raise errors.AuthFailed()
        return name


def load_or_create_secret(path: str | os.PathLike) -> str:
    """Read the secret at ``path``, creating it (mode 0600) on first use."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
