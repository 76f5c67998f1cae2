"""The SQLite file: its schema and migrations, connections and their pragmas, the check
before a start, and the translation of sqlite3 errors into the broker's.

Migrations are keyed on `PRAGMA user_version` (sqlite.org/pragma.html#pragma_user_version):
`MIGRATIONS[v]` takes a file from version v to v + 1, and a start applies every step
from the file's version, all in one transaction. A new file runs them all.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import structlog

from qbroker import errors
from qbroker.store.sqlite import workers

log = structlog.get_logger("qbroker.store")

# One row per job. Times are unix seconds (REAL).
_JOBS = """
CREATE TABLE IF NOT EXISTS jobs (
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
-- ready jobs in lease order (only queued rows are in it)
CREATE INDEX IF NOT EXISTS jobs_ready
    ON jobs(queue, priority DESC, available_at, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_scheduled
    ON jobs(available_at) WHERE state = 'scheduled';
CREATE INDEX IF NOT EXISTS jobs_active
    ON jobs(lease_expires_at) WHERE state = 'active';
CREATE INDEX IF NOT EXISTS jobs_expiring
    ON jobs(expires_at) WHERE expires_at IS NOT NULL AND state IN ('queued', 'scheduled');
CREATE INDEX IF NOT EXISTS jobs_purge
    ON jobs(purge_at) WHERE purge_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_queue_state ON jobs(queue, state);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_dedup ON jobs(queue, dedup_key)
    WHERE dedup_key IS NOT NULL AND state IN ('scheduled', 'queued', 'active');
"""

# One row per queue, made by its first enqueue or lease request; never deleted.
_QUEUES = """
CREATE TABLE IF NOT EXISTS queues (
    name           TEXT PRIMARY KEY,            -- wire.NAME_PATTERN
    paused         INTEGER NOT NULL DEFAULT 0,  -- reserved for pausing a queue
    defaults       BLOB,                        -- reserved: msgpack job defaults of the queue
    last_leased_at REAL                         -- when a lease request last named it (LEASED_AT_STEP)
) WITHOUT ROWID;
-- the queues of the jobs stored before this table: one seek in jobs_queue_state per
-- queue (a plain DISTINCT reads the whole index, finished jobs included)
INSERT OR IGNORE INTO queues (name)
    WITH RECURSIVE q(name) AS (
        SELECT min(queue) FROM jobs
        UNION ALL SELECT (SELECT min(queue) FROM jobs WHERE queue > q.name)
        FROM q WHERE q.name IS NOT NULL)
    SELECT name FROM q WHERE name IS NOT NULL;
"""

# The key-value store (kv.py): one row per key. Every write of a value replaces the
# row, so `version` (its AUTOINCREMENT rowid) grows with each write and is never reused.
_KV = """
CREATE TABLE IF NOT EXISTS kv (
    version    INTEGER PRIMARY KEY AUTOINCREMENT, -- grows with every write, never reused
    key        TEXT NOT NULL UNIQUE,              -- wire.NAME_PATTERN
    value      BLOB NOT NULL,                     -- msgpack
    expires_at REAL                               -- unix seconds, NULL: kept
);
CREATE INDEX IF NOT EXISTS kv_expiring ON kv(expires_at) WHERE expires_at IS NOT NULL;
"""

# One row per periodic schedule (store/sqlite/schedules.py); times are unix seconds.
_SCHEDULES = """
CREATE TABLE IF NOT EXISTS schedules (
    name        TEXT PRIMARY KEY,
    task        TEXT NOT NULL,
    queue       TEXT NOT NULL,
    cron        TEXT,              -- 5-field cron expression, or NULL (an interval)
    every       REAL,              -- seconds between ticks, or NULL (a cron)
    tz          TEXT NOT NULL,     -- IANA zone the cron is read in
    payload     BLOB NOT NULL,     -- msgpack [args, kwargs, headers] of each job
    priority    INTEGER NOT NULL,
    catch_up    TEXT NOT NULL,     -- latest | all | none (schedules.due)
    paused      INTEGER NOT NULL DEFAULT 0,
    anchor      REAL NOT NULL,     -- when the timing was set: intervals count from it
    next_run_at REAL NOT NULL,     -- the next tick, unix seconds
    last_run_at REAL,              -- fire time of the last job made
    last_job_id TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
-- the schedules that can fall due, by when
CREATE INDEX IF NOT EXISTS schedules_due ON schedules(next_run_at) WHERE paused = 0;
"""

# Job control (issue 25): a job's own limit key, its progress, every attempt's error,
# and the attempts before its last manual retry; the global limits.
_CONTROL = """
ALTER TABLE jobs ADD COLUMN limit_key TEXT;      -- a limit key of its own (customer:42)
ALTER TABLE jobs ADD COLUMN progress REAL;       -- 0 .. 1, as the task last reported it
ALTER TABLE jobs ADD COLUMN progress_note TEXT;
ALTER TABLE jobs ADD COLUMN errors TEXT;         -- JSON [[attempt, error, at], ...]
-- attempts made before its last retry by hand: its attempt number counts from there
ALTER TABLE jobs ADD COLUMN attempt_base INTEGER NOT NULL DEFAULT 0;
-- one row per limit key (queue:Q, task:T, or a jobs' limit_key)
CREATE TABLE IF NOT EXISTS limits (
    key         TEXT PRIMARY KEY,
    concurrency INTEGER,   -- jobs of the key active at once, or NULL
    rate_limit  INTEGER,   -- starts per rate_per seconds, or NULL
    rate_per    REAL,
    rate_burst  INTEGER,
    tat         REAL,      -- GCRA theoretical arrival time (gcra.py), NULL: never
    updated_at  REAL NOT NULL
) WITHOUT ROWID;
"""

#: MIGRATIONS[v]: the statements that take a file from schema v to v + 1
MIGRATIONS = (_JOBS, _QUEUES, _KV, _SCHEDULES, workers.SCHEMA, _CONTROL)
SCHEMA_VERSION = len(MIGRATIONS)

WRITER_CACHE_KIB = 8192  #: KiB of page cache for the write connection
WRITER_AUTOCHECKPOINT_PAGES = 8192  #: WAL pages (32 MiB) before the writer checkpoints
WAL_SIZE_LIMIT = 64 * 1024 * 1024  #: bytes a reset WAL is truncated to
WAL_HEADER_BYTES = 32  #: sqlite.org/fileformat.html#the_write_ahead_log
WAL_FRAME_BYTES = 24  #: each WAL frame's header, before its page


def translate_error(exc: sqlite3.Error) -> errors.QBrokerError:
    """Map a sqlite3 error to the broker's tree (SQLITE_FULL is 13)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == 13 or "disk is full" in str(exc):
        return errors.DiskFull("the disk holding the database is full")
    return errors.InternalError(f"database error: {exc}")


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Run a block, turning sqlite3 errors into broker errors."""
    try:
        yield
    except sqlite3.Error as exc:
        raise translate_error(exc) from exc


def connect(
    path: Path,
    *,
    synchronous: str = "FULL",
    readonly: bool = False,
    cache_kib: int = 2048,
) -> sqlite3.Connection:
    """Open the database with the pragmas every connection needs.

    Raises:
        errors.InternalError: the file is not a database, or cannot be opened.
    """
    uri = f"file:{path}?mode={'ro' if readonly else 'rwc'}"
    try:
        conn = sqlite3.connect(
            uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA busy_timeout = 30000")
        if not readonly:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise errors.InternalError(f"cannot switch {path} to WAL mode")
        # https://sqlite.org/pragma.html#pragma_synchronous: FULL syncs the WAL at every
        # commit, so a committed transaction survives a power loss.
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA temp_store = MEMORY")
        # A small page cache keeps broker memory flat as queues grow: the hot pages are
        # the ends of the indexes (ready jobs, ids that sort by time), not the payloads.
        conn.execute(f"PRAGMA cache_size = -{cache_kib}")
        # After a checkpoint resets the WAL, truncate it back to this size.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    except sqlite3.Error as exc:
        raise translate_error(exc) from exc
    return conn


def verify(path: Path) -> None:
    """Check an existing database before the broker writes to it, so that a damaged file
    stops the start instead of failing requests later. Reads only: a read-only
    connection, `PRAGMA quick_check` (sqlite.org/pragma.html#pragma_quick_check; about a
    second per million jobs), which never writes the database file.

    Raises:
        errors.InternalError: the file is not a healthy SQLite database (one-line reason).
    """
    if not path.exists() or path.stat().st_size == 0:
        return  # a new database
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise errors.InternalError(
            f"{path} is damaged or not a database: {exc}"
        ) from exc
    if problems != ["ok"]:
        lines = [
            ln for p in problems for ln in p.splitlines() if not ln.startswith("***")
        ]
        raise errors.InternalError(
            f"{path} is damaged ({len(lines)} problems, first: {lines[0] if lines else '?'})"
        )


def backup(path: Path, dest: Path) -> int:
    """Copy the database at `path` into a new file `dest`, as of one moment, while a
    broker may be writing to it.

    SQLite's online backup API (sqlite.org/backup.html) copies every page in one step,
    so inside one read transaction: in WAL mode that is a snapshot, and the broker's
    writes go on beside it (only its checkpoints wait for the copy). The copy is then
    taken out of WAL mode, so `dest` is one self-contained file, and checked.

    Returns:
        The number of jobs in the copy.

    Raises:
        errors.InternalError: `path` cannot be read as a database, or `dest` written.
    """
    try:
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            dst = sqlite3.connect(dest, isolation_level=None)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode = DELETE")
                problems = [r[0] for r in dst.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise errors.InternalError(
                        f"the copy fails its check: {problems[0]}"
                    )
                jobs = int(dst.execute("SELECT count(*) FROM jobs").fetchone()[0])
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise errors.InternalError(f"cannot copy {path} to {dest}: {exc}") from exc
    return jobs


def open_writer(
    path: Path, *, synchronous: str = "FULL", max_db_bytes: int | None = None
) -> sqlite3.Connection:
    """The write connection to a database that `verify` found healthy, migrated to
    this broker's schema.

    Args:
        max_db_bytes: a quota on the database file; a write past it fails with
            errors.DiskFull, like a full disk (PRAGMA max_page_count).

    Raises:
        errors.InternalError: damaged, not a database, or of a newer schema.
    """
    verify(path)
    conn = connect(path, synchronous=synchronous, cache_kib=WRITER_CACHE_KIB)
    with translate_errors():
        if max_db_bytes is not None:
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            # https://sqlite.org/pragma.html#pragma_max_page_count: never below the
            # file's current size; past it, writes fail with SQLITE_FULL
            conn.execute(f"PRAGMA max_page_count = {max(1, max_db_bytes // page)}")
        # Checkpoints run on a reader connection each second (Reader.checkpoint), off
        # the write path. Under sustained writes that passive checkpoint never reaches
        # the WAL's end, so the WAL could grow without bound: past this many pages the
        # writer checkpoints after its commit, catches up, and the next write resets it.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
        migrate(conn, path)
    if synchronous.upper() == "FULL":
        _preallocate_wal(conn, path)
    return conn


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the file to SCHEMA_VERSION, every step in one transaction.

    Raises:
        errors.InternalError: the file's schema is newer than this broker's.
    """
    with translate_errors():
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise errors.InternalError(
                f"{path} has schema {version}, newer than this broker's"
            )
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        for step in MIGRATIONS[version:]:
            for statement in step.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    if version:
        log.info("store.migrated", path=str(path), old=version, new=SCHEMA_VERSION)


def _preallocate_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Grow the WAL file to the size it cycles in, with zeros actually written.

    Each commit fsyncs the WAL. While the file grows, that fsync must also commit
    the file system's metadata (the new size and blocks), which made a one-row
    commit take 190-250 µs here instead of 120-140 µs. SQLite reuses the WAL from
    its start after a checkpoint, so a broker only writes in place once the file
    has reached its working size: after its first ~30 MiB of writes. Writing that
    much zeros at start-up (about 20 ms) gives the first minutes after a restart
    the same commit cost as the hours after. SQLite ignores bytes past the last
    valid frame (each frame carries a checksum and the WAL's salt), so the zeros
    are never taken for data; only bytes past the file's current end are written.
    Best effort: on a disk with less than four times that free, or on an error,
    the WAL grows as it would anyway.
    """
    wal = f"{path}-wal"
    with translate_errors():
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    want = WAL_HEADER_BYTES + WRITER_AUTOCHECKPOINT_PAGES * (WAL_FRAME_BYTES + page)
    try:
        fd = os.open(wal, os.O_WRONLY)
    except OSError:
        return  # SQLite has not made the WAL: nothing to grow
    start = -1
    try:
        start = have = os.fstat(fd).st_size
        disk = os.fstatvfs(fd)
        if have >= want or disk.f_bavail * disk.f_frsize < 4 * (want - have):
            return  # grown already, or the space is better left to the data
        zeros = bytes(min(1 << 20, want - have))
        while have < want:
            have += os.pwrite(fd, zeros[: want - have], have)
        os.fsync(fd)
    except OSError as exc:
        log.warning("store.wal_preallocate_failed", error=str(exc))
        if start >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # give the space back
    finally:
        os.close(fd)
