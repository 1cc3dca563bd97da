-- Schema 2: several servers on one database (MariaDB/MySQL).
--
-- The same columns, tables, indexes and data moves as
-- migrations/sqlite/002_servers.sql; see there for what they are for.
--
-- MySQL commits around every DDL statement, so a start interrupted halfway
-- runs this file again from its top. MySQL 8 has no ADD COLUMN IF NOT
-- EXISTS, so the DDL statements are plain and the migration runner skips one
-- whose column, index or table is already there (MySQLDialect.ddl_done_codes).
-- The data moves come after the last DDL statement and are committed
-- together with the schema_version row: they apply once.

CREATE TABLE IF NOT EXISTS servers (
    id VARCHAR(255) NOT NULL PRIMARY KEY,
    last_beat DOUBLE NOT NULL,
    deadline DOUBLE NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One ALTER for the column and both indexes: one pass over the table, and
-- atomic (InnoDB's DDL is), so a re-run finds all of it or none of it.
-- jobs_runnable has a descending key: MariaDB 10.8+ and MySQL 8 keep it
-- descending and read the queue in its served order; older servers ignore
-- DESC, and the query then sorts (correct, slower).
ALTER TABLE jobs
    ADD COLUMN server VARCHAR(255),
    ADD INDEX jobs_server (server, state),
    ADD INDEX jobs_runnable (state, priority DESC, id);

UPDATE jobs SET server = '(before 2)' WHERE state = 'running';

INSERT INTO servers (id, last_beat, deadline)
    SELECT server, MAX(updated), 0 FROM jobs WHERE server = '(before 2)' GROUP BY server;
