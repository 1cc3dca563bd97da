-- Schema 1: jobs, their records and their history (MariaDB/MySQL).
--
-- The same tables, columns and checks as migrations/sqlite/001_initial.sql,
-- in MySQL types: InnoDB (transactions, row locks, foreign keys), utf8mb4
-- with binary collation (so that leases, names and types compare exactly,
-- as in SQLite, not case-insensitively), BIGINT ids, LONGTEXT for JSON and
-- other text of unbounded length, DOUBLE for times.
--
-- MySQL commits around every DDL statement, so this file cannot be applied
-- as one transaction: each statement is written to be run again safely
-- (IF NOT EXISTS), in case a start is interrupted halfway through the file.
-- Indexes are declared inside CREATE TABLE for the same reason.

CREATE TABLE IF NOT EXISTS jobs (
    -- AUTO_INCREMENT: an id is never reused (InnoDB keeps the counter across
    -- restarts since MariaDB 10.2 and MySQL 8.0), because clients keep ids
    -- and ask about them later.
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name TEXT,
    type TEXT NOT NULL,
    priority INT NOT NULL,
    requires LONGTEXT NOT NULL,
    params LONGTEXT NOT NULL,
    total INT NOT NULL,
    -- Records with an accepted result, kept here so completing is one read.
    accepted INT NOT NULL DEFAULT 0,
    state VARCHAR(16) NOT NULL CHECK (state IN ('queued', 'running', 'paused', 'done', 'failed', 'cancelled')),
    attempts INT NOT NULL DEFAULT 0,
    retries INT NOT NULL,
    timeout DOUBLE,
    lease TEXT,
    worker TEXT,
    not_before DOUBLE,
    submitter TEXT,
    created DOUBLE NOT NULL,
    updated DOUBLE NOT NULL,
    CONSTRAINT jobs_accepted CHECK (accepted BETWEEN 0 AND total),
    -- Listing and counting by state, and finding the active jobs on start.
    INDEX jobs_state (state, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS records (
    job_id BIGINT NOT NULL,
    idx INT NOT NULL,
    data LONGTEXT NOT NULL,
    -- A record is pending while accepted_at is NULL; then it has an output
    -- (JSON, possibly 'null') or an error, and the lease and worker that
    -- produced it.
    output LONGTEXT,
    error LONGTEXT,
    accepted_at DOUBLE,
    lease TEXT,
    worker TEXT,
    PRIMARY KEY (job_id, idx),
    CONSTRAINT records_job FOREIGN KEY (job_id) REFERENCES jobs (id),
    CONSTRAINT records_one_outcome CHECK (output IS NULL OR error IS NULL)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE IF NOT EXISTS job_events (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    job_id BIGINT NOT NULL,
    at DOUBLE NOT NULL,
    event VARCHAR(32) NOT NULL,
    attempt INT,
    lease TEXT,
    worker TEXT,
    detail LONGTEXT,
    INDEX job_events_job (job_id, id),
    CONSTRAINT job_events_job FOREIGN KEY (job_id) REFERENCES jobs (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
