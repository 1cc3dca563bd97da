-- Schema 2: several servers on one database.
--
-- A running job names the server that owns its lease (jobs.server, NULL
-- while the job is not running); the lease-fenced writes check it along
-- with the lease. Each server beats into ``servers``; a server whose last
-- beat is older than its deadline is gone, and another server ends its
-- leases (gridd.store.sql.thd_expire_servers).

ALTER TABLE jobs ADD COLUMN server TEXT;

CREATE TABLE servers (
    id TEXT NOT NULL PRIMARY KEY,
    -- When the server last said it is alive, and how many seconds after
    -- that it counts as gone without another beat.
    last_beat REAL NOT NULL,
    deadline REAL NOT NULL
);

-- A server's own leases (own_leases) and a gone server's (expire_servers).
CREATE INDEX jobs_server ON jobs (server, state);

-- The queue in the order it is served (runnable): ORDER BY priority DESC,
-- id ASC. A descending key makes the index's own order that order, so the
-- query reads the first LIMIT runnable rows and sorts nothing; an ascending
-- (state, priority, id) makes it sort all queued rows of the top priority
-- (every row, when all share priority 0) on each call. Measured with 20k
-- queued and 20k done jobs, LIMIT 100: 0.04 ms with this index, 0.7-7.6 ms
-- with the ascending one, 3.2 ms with jobs_state alone (MariaDB 10.11: 0.4
-- ms against 16-22 ms, where the ascending index is not even chosen).
CREATE INDEX jobs_runnable ON jobs (state, priority DESC, id);

-- Jobs running when the database is upgraded were leased by a server that
-- knew nothing of owners: give them to a pseudo-server that stopped beating
-- when it last touched one of them, with no deadline. Their workers can take
-- the leases over (take_lease) during the reattach grace; after that any
-- server's expire_servers re-queues them. No running job, no row.
UPDATE jobs SET server = '(before 2)' WHERE state = 'running';

INSERT INTO servers (id, last_beat, deadline)
    SELECT server, MAX(updated), 0 FROM jobs WHERE server = '(before 2)' GROUP BY server;
