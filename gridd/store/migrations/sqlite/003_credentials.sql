-- Schema 3: per-identity credentials (docs/security.md, "Credentials and roles").
--
-- A credential's token is ID.SECRET; only sha256(SECRET), in hex, is kept.
-- The secret is 32 random bytes (secrets.token_urlsafe), so a fast hash is
-- enough: there is nothing to guess that a slow KDF would protect. A revoked
-- credential keeps its row (revoked: when), so that its id is not reused by
-- mistake and jobs it submitted still name a known identity.

CREATE TABLE credentials (
    id TEXT NOT NULL PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('worker', 'submitter', 'admin')),
    secret_hash TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    note TEXT
);
