-- Schema 4: the job state 'poison' (MariaDB/MySQL).
--
-- The same change as migrations/sqlite/004_poison.sql: the CHECK of
-- jobs.state allows 'poison'. MariaDB keeps a column's CHECK with the
-- column, so redefining the column replaces it (MySQL 8 keeps it as a
-- table constraint named jobs_chk_1 instead, which the MODIFY leaves: drop
-- it there first). Re-runnable: the MODIFY gives the same column again.

ALTER TABLE jobs MODIFY state VARCHAR(16) NOT NULL
    CHECK (state IN ('queued', 'running', 'paused', 'done', 'failed', 'cancelled', 'poison'));
