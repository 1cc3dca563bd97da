-- Schema 4: the job state 'poison' (gridd.scheduler.poison).
--
-- A job whose attempts failed on several different workers ends in state
-- 'poison', terminal like 'failed' and told apart from it. The CHECK of
-- jobs.state gains the value. SQLite cannot alter a CHECK, and rebuilding
-- jobs (records and job_events refer to it) needs foreign keys off, which
-- cannot be changed inside the migration's transaction. A CHECK that only
-- allows more changes nothing stored, so, as SQLite's documentation on
-- schema changes allows for such a change, the table's definition is
-- edited in place (writable_schema), and RESET makes this connection read
-- the schema again. Each job's attempts (SHOW's "attempts") are read from
-- job_events, which holds every lease's grant and end already: no table.

PRAGMA writable_schema = ON;

UPDATE sqlite_master SET sql = replace(sql, '''failed'', ''cancelled'')', '''failed'', ''cancelled'', ''poison'')')
    WHERE type = 'table' AND name = 'jobs';

PRAGMA writable_schema = RESET;

-- Any DDL moves the schema cookie on, so that other connections to the file
-- (a second gridd on it, an operator's sqlite3 shell) read the schema again
-- too: a table made and dropped.
CREATE TABLE schema_4_cookie (x INTEGER);

DROP TABLE schema_4_cookie;
