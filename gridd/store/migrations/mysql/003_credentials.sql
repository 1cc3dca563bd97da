-- Schema 3: per-identity credentials (MariaDB/MySQL).
--
-- The same table as migrations/sqlite/003_credentials.sql; see there for
-- what it holds. Re-runnable (IF NOT EXISTS), as every MySQL migration is.

CREATE TABLE IF NOT EXISTS credentials (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    role VARCHAR(16) NOT NULL CHECK (role IN ('worker', 'submitter', 'admin')),
    secret_hash CHAR(64) NOT NULL,
    created DOUBLE NOT NULL,
    revoked DOUBLE,
    note TEXT
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
