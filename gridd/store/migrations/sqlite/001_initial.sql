-- Schema 1: jobs, their records and their history.
--
-- JSON values (requires, params, record data and outputs, event details) are
-- stored as compact JSON text. Times are POSIX seconds. A job's lease and
-- worker are set exactly while it is running.

CREATE TABLE jobs (
    -- AUTOINCREMENT: an id is never reused, even once old jobs are purged,
    -- because clients keep ids and ask about them later.
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    requires TEXT NOT NULL,
    params TEXT NOT NULL,
    total INTEGER NOT NULL,
    -- Records with an accepted result, kept here so completing is one read.
    accepted INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'paused', 'done', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL,
    timeout REAL,
    lease TEXT,
    worker TEXT,
    not_before REAL,
    submitter TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    CHECK (accepted BETWEEN 0 AND total)
);

-- Listing and counting by state, and finding the active jobs on start.
CREATE INDEX jobs_state ON jobs (state, id);

CREATE TABLE records (
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    idx INTEGER NOT NULL,
    data TEXT NOT NULL,
    -- A record is pending while accepted_at is NULL; then it has an output
    -- (JSON, possibly 'null') or an error, and the lease and worker that
    -- produced it.
    output TEXT,
    error TEXT,
    accepted_at REAL,
    lease TEXT,
    worker TEXT,
    PRIMARY KEY (job_id, idx),
    CHECK (output IS NULL OR error IS NULL)
);

CREATE TABLE job_events (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    at REAL NOT NULL,
    event TEXT NOT NULL,
    attempt INTEGER,
    lease TEXT,
    worker TEXT,
    detail TEXT
);

CREATE INDEX job_events_job ON job_events (job_id, id);
