"""Who may connect, and as whom: credentials, the shared secret, identities.

A connection authenticates with the HELLO's ``token`` (protocols/PROTOCOL.md
section 13):

- a **credential** token is ``ID.SECRET``: ``ID`` names a row of the store's
  credentials table (1-64 of ``[A-Za-z0-9_-]``), ``SECRET`` is
  ``secrets.token_urlsafe(32)``. The store keeps only ``sha256(SECRET)`` in
  hex: the secret is 256 random bits, so there is nothing a slow password
  hash would protect, and a leaked table gives no token. The comparison is
  ``hmac.compare_digest``, in constant time.
- the **shared secret** (the server's secret file) is the bootstrap and
  compatibility path: a token whose part before the first ``.`` is not a
  known credential id, and which equals the shared secret, authenticates as
  role ``admin`` for a client and ``worker`` (under any name) for a worker.
  ``twistd gridd --no-shared-secret`` turns it off.

:meth:`Authenticator.check` only says who the token belongs to (an
:class:`Identity`); what that identity may send is the session's business
(``gridd.server.session``). The authenticator also issues, lists and revokes
credentials for the ``CREDENTIAL`` verb.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from gridd import errors, wire

__all__ = ["Identity", "Authenticator", "hash_secret", "load_or_create_secret"]

log = Logger()


@dataclass(frozen=True)
class Identity:
    """Who a connection acts as.

    ``id`` is the credential's id, or None for the shared secret; ``role``
    is ``worker``, ``submitter`` or ``admin``.
    """

    id: str | None
    role: str

    @property
    def shared(self) -> bool:
        return self.id is None

    def describe(self) -> str:
        return f"credential {self.id} ({self.role})" if self.id is not None else f"shared secret ({self.role})"


def hash_secret(secret: str) -> str:
    """The hex sha256 of a credential's secret: what the store keeps."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class Authenticator:
    """Checks HELLO tokens against the store's credentials and the shared secret.

    ``shared_secret`` None: only credentials log in. ``new_secret`` makes a
    credential's secret (tests make it deterministic); ``clock`` dates them.
    """

    def __init__(
        self,
        store,
        clock,
        *,
        shared_secret: str | None,
        new_secret: Callable[[], str] = lambda: secrets.token_urlsafe(32),
    ):
        if shared_secret is not None and not shared_secret:
            raise ValueError("the shared secret is empty")
        self.store = store
        self.clock = clock
        self._shared = None if shared_secret is None else shared_secret.encode("utf-8")
        self.new_secret = new_secret

    @property
    def shared_secret_enabled(self) -> bool:
        return self._shared is not None

    def check(self, name: str, role: str, token: str) -> defer.Deferred[Identity]:
        """Fire with the token's identity, or fail with ``AuthFailed``.

        ``name`` and ``role`` are the HELLO's, for the log; whether the
        identity may use them is checked by the session.
        """
        return defer.Deferred.fromCoroutine(self._check(name, role, token))

    async def _check(self, name: str, role: str, token: str) -> Identity:
        credential_id, dot, secret = token.partition(".")
        if dot and wire.CREDENTIAL_ID.match(credential_id):
            credential = await self.store.get_credential(credential_id)
            if credential is not None:
                # Always compare, so a revoked credential costs the same as a live one.
                good = hmac.compare_digest(
                    credential["secret_hash"].encode("ascii"), hash_secret(secret).encode("ascii")
                )
                if good and credential["revoked"] is None:
                    return Identity(credential_id, credential["role"])
                why = "revoked" if good else "wrong secret"
                log.info(
                    "{role} {name}: credential {id} refused ({why})", role=role, name=name, id=credential_id, why=why
                )
                raise errors.AuthFailed()
        if self._shared is not None and hmac.compare_digest(self._shared, token.encode("utf-8")):
            return Identity(None, "worker" if role == "worker" else "admin")
        raise errors.AuthFailed()

    # -- managing credentials (the CREDENTIAL verb) ----------------------

    async def add(self, credential_id: str, role: str, note: str | None = None) -> str:
        """Create a credential; return its token ``ID.SECRET`` (the only time it is seen)."""
        if role not in wire.ROLES:
            raise errors.BadRequest(f"a credential's role is one of {', '.join(wire.ROLES)}")
        secret = self.new_secret()
        await self.store.add_credential(credential_id, role, hash_secret(secret), self.clock.seconds(), note)
        log.info("credential {id} ({role}) created", id=credential_id, role=role)
        return f"{credential_id}.{secret}"

    async def list(self) -> list[dict]:
        """Every credential, without hashes."""
        return [
            {key: c[key] for key in ("id", "role", "created", "revoked", "note")}
            for c in await self.store.list_credentials()
        ]

    async def revoke(self, credential_id: str) -> None:
        """Revoke a credential in the store: from now on it cannot log in."""
        await self.store.revoke_credential(credential_id, self.clock.seconds())


def load_or_create_secret(path: str | os.PathLike) -> str:
    """Read the secret at ``path``, creating it (mode 0600) on first use."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
