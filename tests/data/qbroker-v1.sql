-- qbroker.db as written by qbroker 0.1.0 (schema 1, queues derived from jobs),
-- at commit ddaf76e, dumped with sqlite3 iterdump; tests/test_migration.py loads it.
PRAGMA user_version = 1;
BEGIN TRANSACTION;
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY,  -- insertion order: FIFO tie-break, lease suffix
    id               TEXT NOT NULL UNIQUE, -- client-chosen or a ULID
    queue            TEXT NOT NULL,
    task             TEXT NOT NULL,        -- function name the worker looks up
    state            TEXT NOT NULL,        -- wire.JobState
    priority         INTEGER NOT NULL,     -- higher is leased first
    payload          BLOB NOT NULL,        -- msgpack [args, kwargs, headers]
    attempts         INTEGER NOT NULL DEFAULT 0, -- leases so far
    max_retries      INTEGER NOT NULL,     -- leases allowed: max_retries + 1
    timeout          REAL NOT NULL,        -- default lease seconds
    result_ttl       REAL NOT NULL,        -- seconds a finished job is kept
    dedup_key        TEXT,                 -- unique among unfinished jobs of a queue
    created_at       REAL NOT NULL,
    available_at     REAL NOT NULL,        -- when it may be leased (delay, eta, backoff)
    expires_at       REAL,                 -- never leased after this
    started_at       REAL,                 -- last lease
    finished_at      REAL,
    purge_at         REAL,                 -- finished_at + result_ttl: swept then
    lease            TEXT,                 -- current lease token while active, kept after ack, fail, release (resends)
    lease_seconds    REAL,                 -- length of the current lease
    lease_expires_at REAL,
    worker           TEXT,                 -- holder of the current or last lease
    result           BLOB,                 -- msgpack result of the ack
    error            TEXT,                 -- last failure, "Type: message"
    traceback        TEXT
);
INSERT INTO "jobs" VALUES(1,'mail-done','emails','emails','succeeded',0,X'939081A2746FA56140622E6380',1,3,30.0,315360000.0,NULL,1700000000.0,1700000000.0,NULL,1700000002.0,1700000003.0,2015360003.0,'aefb1b552c24d967.1',30.0,NULL,'w1',X'81A473656E74C3',NULL,NULL);
INSERT INTO "jobs" VALUES(2,'mail-failed','emails','emails','failed',0,X'939201028080',1,3,30.0,315360000.0,NULL,1700000001.0,1700000001.0,NULL,1700000002.0,1700000003.0,2015360003.0,'aefb1b552c24d967.2',30.0,NULL,'w1',NULL,'ValueError: bad','tb');
INSERT INTO "jobs" VALUES(3,'mail-waiting','emails','emails','queued',5,X'939081A2746FA56340642E6580',0,3,30.0,315360000.0,NULL,1700000004.0,1700000004.0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "jobs" VALUES(4,'report-later','reports','build_report','scheduled',0,X'93908080',0,3,30.0,315360000.0,'monthly',1700000005.0,4102444800.0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
INSERT INTO "jobs" VALUES(5,'report-now','reports','build_report','queued',0,X'9391A271318080',0,3,30.0,315360000.0,NULL,1700000006.0,1700000006.0,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL,NULL);
CREATE INDEX jobs_ready
    ON jobs(queue, priority DESC, available_at, seq) WHERE state = 'queued';
CREATE INDEX jobs_scheduled
    ON jobs(available_at) WHERE state = 'scheduled';
CREATE INDEX jobs_active
    ON jobs(lease_expires_at) WHERE state = 'active';
CREATE INDEX jobs_expiring
    ON jobs(expires_at) WHERE expires_at IS NOT NULL AND state IN ('queued', 'scheduled');
CREATE INDEX jobs_purge
    ON jobs(purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX jobs_queue_state ON jobs(queue, state);
CREATE UNIQUE INDEX jobs_dedup ON jobs(queue, dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('scheduled', 'queued', 'active');
COMMIT;
