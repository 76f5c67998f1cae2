"""The store: every job, lease and result, in one SQLite file.

Charter:
  Rule 1: nothing outside this file writes SQL.
  Rule 2: every public method of `Store` is one atomic unit. It never commits: the writer
          thread (writer.py) runs many calls, each in its own SAVEPOINT, inside one
          transaction and commits them together (group commit).
  Rule 3: `now` is always a parameter, never read here, so tests control time.
  Rule 4: only errors from errors.py leave this module, never `sqlite3.*`.

`Store` owns the one write connection and is used by the writer thread only (not
thread-safe). `Reader` serves reads on one connection per reading thread (WAL lets readers
run beside the writer).

Theory of operation: a job row moves between states with single UPDATE statements whose
WHERE clause checks the state and lease token it expects; a row count of 0 means the
caller's view is stale (409) or the job does not exist (404). Partial indexes keep each
state's hot path (ready jobs, due delays, expiring leases) small and O(log n).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import structlog
from qclient.wire import (
    FINAL_STATES,
    AckItem,
    BatchResult,
    FailItem,
    JobRecord,
    JobSpec,
    JobState,
    LeasedJob,
    QueueStats,
    ReleaseItem,
    new_job_ids,
)

from qbroker import errors
from qbroker.ids import new_lease_prefix, request_prefix

SCHEMA_VERSION = 1

# One row per job. Times are unix seconds (REAL).
SCHEMA = """
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

log = structlog.get_logger("qbroker.store")
_STATES = [s.value for s in JobState]
_FINAL_SQL = ",".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
#: the states a job's own ack / fail leaves it in while it keeps that lease's token
_ACKED = ("succeeded",)
_FAILED = ("scheduled", "queued", "failed")
_RELEASED = ("queued",)  #: and a release's own resend
_IN_CHUNK = 500  #: ids per `IN (...)` list, well under SQLite's variable limit
#: rows one sweep changes at most in each of its steps (promote, lease expiry, expiry,
#: purge): a backlog falling due at once is worked off over several writer calls, so
#: other writes get their turn between them (the sweep after comes at once)
SWEEP_BATCH = 10_000
WRITER_CACHE_KIB = 8192  #: KiB of page cache for the write connection
WRITER_AUTOCHECKPOINT_PAGES = 8192  #: WAL pages (32 MiB) before the writer checkpoints
WAL_SIZE_LIMIT = 64 * 1024 * 1024  #: bytes a reset WAL is truncated to
WAL_HEADER_BYTES = 32  #: sqlite.org/fileformat.html#the_write_ahead_log
WAL_FRAME_BYTES = 24  #: each WAL frame's header, before its page
ACK_CHUNK = 1000  #: acks per UPDATE statement (3 bound parameters each)

_INSERT_COLUMNS = (
    "id, queue, task, state, priority, payload, max_retries, timeout, result_ttl,"
    " dedup_key, created_at, available_at, expires_at"
)
_ROW_PARAMS = _INSERT_COLUMNS.count(",") + 1
#: rows per INSERT statement: a batch is split into these sizes (100 = 64 + 32 + 4), so
#: a handful of prepared statements serve every batch size
INSERT_CHUNKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)


@functools.cache
def _insert_sql(rows: int) -> str:
    row = "(" + ",".join("?" * _ROW_PARAMS) + ")"
    return f"INSERT INTO jobs ({_INSERT_COLUMNS}) VALUES " + ",".join([row] * rows)


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_decode_payload = msgspec.msgpack.Decoder(
    tuple[list[Any], dict[str, Any], dict[str, Any]]
).decode


def _pack(value: Any, name: str) -> bytes:
    """msgpack-encode a client value; JSON bodies may carry integers msgpack cannot.

    Raises:
        errors.InvalidField: an integer outside -2**63 .. 2**64-1.
    """
    try:
        return _encode(value)
    except OverflowError as exc:
        raise errors.InvalidField(
            "integers must lie within -2**63 .. 2**64-1", field=name
        ) from exc


def _pack_payload(spec: JobSpec) -> bytes:
    """A job's (args, kwargs, headers), packed as one value.

    Raises:
        errors.InvalidField: naming the part with an integer msgpack cannot carry.
    """
    try:
        return _encode((spec.args, spec.kwargs, spec.headers))
    except OverflowError:
        for name in ("args", "kwargs", "headers"):
            _pack(getattr(spec, name), name)
        raise


def _refuse_repeats(specs: Sequence[JobSpec], ids: list[str]) -> None:
    """Name a batch's item whose id or dedup_key repeats an earlier item's: its
    IntegrityError is no duplicate of a stored job (nothing of the batch is stored).

    Raises:
        errors.InvalidField: for the first repeat, as `jobs[i].id` or `.dedup_key`.
    """
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    for i, (spec, job_id) in enumerate(zip(specs, ids, strict=True)):
        first = seen_ids.setdefault(job_id, i)
        if first != i:
            raise errors.InvalidField(
                f"jobs[{i}] repeats the id of jobs[{first}]", field=f"jobs[{i}].id"
            )
        if spec.dedup_key is not None:
            first = seen_keys.setdefault(spec.dedup_key, i)
            if first != i:
                raise errors.InvalidField(
                    f"jobs[{i}] repeats the dedup_key of jobs[{first}]",
                    field=f"jobs[{i}].dedup_key",
                )


@dataclass(frozen=True)
class Defaults:
    """Per-job defaults applied at enqueue."""

    max_retries: int
    lease_seconds: float
    result_ttl: float


@dataclass
class TickResult:
    """What one reaper sweep changed, and when the next one is due."""

    promoted_queues: set[str] = field(
        default_factory=set
    )  #: queues with new ready jobs
    finished_ids: list[str] = field(default_factory=list)  #: jobs that became final
    #: (queue, "dead" | "expired") -> jobs that became final so
    finished: Counter[tuple[str, str]] = field(default_factory=Counter)
    promoted: int = 0  #: scheduled jobs that became queued
    requeued: int = 0
    purged: int = 0
    next_due: float | None = None  #: earliest time something becomes due

    @property
    def dead(self) -> int:
        return sum(n for (_, state), n in self.finished.items() if state == "dead")

    @property
    def expired(self) -> int:
        return sum(n for (_, state), n in self.finished.items() if state == "expired")


@dataclass(frozen=True)
class StoreStatistics:
    jobs: int
    page_count: int
    page_size: int


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


def _record(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    (
        id_, queue, task, state, attempts, max_retries, priority, payload, result, error,
        traceback, timeout, created_at, available_at, started_at, finished_at, expires_at,
        worker, dedup_key,
    ) = row  # fmt: skip
    args, kwargs, headers = _decode_payload(payload)
    return JobRecord(
        id=id_,
        queue=queue,
        task=task,
        state=JobState(state),
        attempts=attempts,
        max_retries=max_retries,
        priority=priority,
        args=args,
        kwargs=kwargs,
        headers=headers,
        result=None if result is None else _decode(result),
        error=error,
        traceback=traceback,
        timeout=timeout,
        created_at=created_at,
        available_at=available_at,
        started_at=started_at,
        finished_at=finished_at,
        expires_at=expires_at,
        worker=worker,
        dedup_key=dedup_key,
    )


_RECORD_COLUMNS = (
    "id, queue, task, state, attempts, max_retries, priority, payload, result, error, "
    "traceback, timeout, created_at, available_at, started_at, finished_at, expires_at, "
    "worker, dedup_key"
)


#: The oldest ready job's available_at in a queue, by seeks in jobs_ready: one per
#: distinct priority (a skip-scan down the index), then the first available_at of each.
#: A plain min() over the queue's ready jobs reads all of them: 124 ms at 1M, not 0.2.
_OLDEST_READY_SQL = """
WITH RECURSIVE p(pr) AS (
    SELECT (SELECT priority FROM jobs WHERE state = 'queued' AND queue = ?1
            ORDER BY priority DESC LIMIT 1)
    UNION ALL
    SELECT (SELECT priority FROM jobs WHERE state = 'queued' AND queue = ?1
            AND priority < p.pr ORDER BY priority DESC LIMIT 1)
    FROM p WHERE p.pr IS NOT NULL
)
SELECT min((SELECT available_at FROM jobs WHERE state = 'queued' AND queue = ?1
            AND priority = p.pr ORDER BY priority DESC, available_at LIMIT 1))
FROM p WHERE p.pr IS NOT NULL
"""

#: a leased job's columns, as `_leased_job` reads them
_LEASED_COLUMNS = (
    "priority, available_at, seq, id, task, payload, lease, attempts, max_retries,"
    " lease_seconds, lease_expires_at"
)


def _leased_job(r: sqlite3.Row | tuple[Any, ...], queue: str) -> LeasedJob:
    args, kwargs, headers = _decode_payload(r[5])
    return LeasedJob(
        id=r[3],
        queue=queue,
        task=r[4],
        args=args,
        kwargs=kwargs,
        headers=headers,
        lease=r[6],
        attempt=r[7],
        max_retries=r[8],
        timeout=r[9],
        lease_expires_at=r[10],
    )


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


class Store:
    """The write side. Used by the writer thread only; see the module charter."""

    def __init__(
        self, path: Path, *, synchronous: str = "FULL", max_db_bytes: int | None = None
    ) -> None:
        """Open (or create) the database, after `verify` found it healthy.

        Args:
            max_db_bytes: a quota on the database file; a write past it fails with
                errors.DiskFull, like a full disk (PRAGMA max_page_count).
        """
        self.path = path
        verify(path)
        self.conn = connect(path, synchronous=synchronous, cache_kib=WRITER_CACHE_KIB)
        if max_db_bytes is not None:
            with translate_errors():
                page = self.conn.execute("PRAGMA page_size").fetchone()[0]
                # https://sqlite.org/pragma.html#pragma_max_page_count: never below the
                # file's current size; past it, writes fail with SQLITE_FULL
                self.conn.execute(
                    f"PRAGMA max_page_count = {max(1, max_db_bytes // page)}"
                )
        # Checkpoints run on a reader connection each second (Reader.checkpoint), off the
        # write path. Under sustained writes that passive checkpoint never reaches the
        # WAL's end, so the WAL could grow without bound: past this many pages the writer
        # checkpoints after its commit, catches up, and the next write resets the WAL.
        self.conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
        self._migrate()
        if synchronous.upper() == "FULL":
            self._preallocate_wal()

    def _preallocate_wal(self) -> None:
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
        wal = f"{self.path}-wal"
        with translate_errors():
            page = self.conn.execute("PRAGMA page_size").fetchone()[0]
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

    def _migrate(self) -> None:
        with translate_errors():
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise errors.InternalError(
                    f"{self.path} has schema {version}, newer than this broker's"
                )
            if version < SCHEMA_VERSION:
                self.conn.execute("BEGIN IMMEDIATE")
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ producer

    def enqueue(
        self, queue: str, specs: Sequence[JobSpec], *, defaults: Defaults, now: float
    ) -> list[str]:
        """Store jobs, all or none.

        Returns:
            their ids, in order.

        Raises:
            errors.DuplicateId: an id is already stored (nothing is stored).
            errors.DuplicateDedupKey: an unfinished job has the same dedup_key.
            errors.InvalidField: both delay and eta given.
        """
        fresh = iter(new_job_ids(sum(1 for s in specs if not s.id), now))
        lease_seconds = defaults.lease_seconds
        params: list[Any] = []  # _INSERT_COLUMNS values, row after row
        ids = []
        for spec in specs:
            job_id = spec.id or next(fresh)
            delay, eta = spec.delay, spec.eta
            if delay is not None:
                if eta is not None:
                    raise errors.InvalidField(
                        "give delay or eta, not both", field="delay"
                    )
                available = now + delay
            elif eta is not None:
                available = max(eta, now)
            else:
                available = now
            params += (
                job_id,
                queue,
                spec.task or queue,
                "scheduled" if available > now else "queued",
                spec.priority,
                _pack_payload(spec),
                defaults.max_retries if spec.max_retries is None else spec.max_retries,
                spec.timeout or lease_seconds,
                defaults.result_ttl if spec.result_ttl is None else spec.result_ttl,
                spec.dedup_key,
                now,
                available,
                None if spec.expires is None else now + spec.expires,
            )
            ids.append(job_id)
        try:
            # Many rows per INSERT, not executemany's one row per step: each step drops
            # and retakes the GIL, and the trio thread then holds the writer up.
            done = 0
            for size in INSERT_CHUNKS:
                while len(ids) - done >= size:
                    self.conn.execute(
                        _insert_sql(size),
                        params[done * _ROW_PARAMS : (done + size) * _ROW_PARAMS],
                    )
                    done += size
        except sqlite3.IntegrityError as exc:
            _refuse_repeats(specs, ids)
            if "dedup_key" in str(exc):
                raise errors.DuplicateDedupKey(
                    "an unfinished job with this dedup_key is in the queue",
                    field="dedup_key",
                ) from exc
            raise errors.DuplicateId(
                "a job with this id is already stored", field="id"
            ) from exc
        except sqlite3.Error as exc:
            raise translate_error(exc) from exc
        return ids

    def cancel(
        self,
        job_id: str,
        *,
        now: float,
        counts: Counter[tuple[str, str]] | None = None,
    ) -> JobState:
        """Cancel an unfinished job; a finished one is left alone. `counts`, if
        given, gets (queue, "cancelled") when this call cancelled it.

        Returns:
            the job's state after the call.

        Raises:
            errors.JobNotFound
        """
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?1,"
                " purge_at = ?1 + result_ttl WHERE id = ?2"
                " AND state IN ('scheduled', 'queued', 'active') RETURNING state, queue",
                (now, job_id),
            ).fetchone()
            if row is not None and counts is not None:
                counts[row[1], "cancelled"] += 1
            if row is None:
                row = self.conn.execute(
                    "SELECT state FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                if row is None:
                    raise errors.JobNotFound(f"no job {job_id}")
        return JobState(row[0])

    # ------------------------------------------------------------ worker

    def lease(
        self,
        queues: Sequence[str],
        *,
        max_jobs: int,
        lease_seconds: float | None,
        worker: str,
        now: float,
        request_id: str | None = None,
    ) -> list[LeasedJob]:
        """Lease up to `max_jobs` ready jobs, trying `queues` in order.

        Each job's attempt count goes up by one; its lease token is a random prefix
        shared by this call plus the job's row number, so it is unique per delivery.
        With `request_id` the tokens start with it, for `leased_by`.
        """
        prefix = new_lease_prefix(request_id)
        out: list[LeasedJob] = []
        with translate_errors():
            for queue in queues:
                want = max_jobs - len(out)
                if want <= 0:
                    break
                rows = self.conn.execute(
                    "UPDATE jobs SET state = 'active', attempts = attempts + 1,"
                    " lease = ?1 || seq, lease_seconds = coalesce(?2, timeout),"
                    " lease_expires_at = ?3 + coalesce(?2, timeout), started_at = ?3,"
                    " worker = ?4"
                    " WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued'"
                    "   AND queue = ?5 AND (expires_at IS NULL OR expires_at > ?3)"
                    "   ORDER BY priority DESC, available_at, seq LIMIT ?6)"
                    f" RETURNING {_LEASED_COLUMNS}",
                    (prefix, lease_seconds, now, worker, queue, want),
                ).fetchall()
                # RETURNING order is unspecified (sqlite.org/lang_returning.html)
                rows.sort(key=lambda r: (-r[0], r[1], r[2]))
                out += (_leased_job(r, queue) for r in rows)
        return out

    def leased_by(
        self, request_id: str, queues: Sequence[str], *, now: float
    ) -> list[LeasedJob]:
        """The jobs that the lease call with `request_id` leased and that are still
        active under its tokens, in the order it handed them out: what a resent lease
        request gets back when its first reply was lost. O(active jobs): the
        jobs_active index, then each row's token; only resends ask.
        """
        start = request_prefix(request_id)
        end = start[:-1] + chr(ord(start[-1]) + 1)  # every token with that prefix
        with translate_errors():
            rows = self.conn.execute(
                f"SELECT {_LEASED_COLUMNS}, queue FROM jobs WHERE state = 'active'"
                " AND lease_expires_at > ?1 AND lease >= ?2 AND lease < ?3",
                (now, start, end),
            ).fetchall()
        order: dict[str, int] = {}
        for i, q in enumerate(queues):
            order.setdefault(q, i)  # a queue named twice gave its jobs the first time
        rows.sort(key=lambda r: (order.get(r[11], len(order)), -r[0], r[1], r[2]))
        return [_leased_job(r, r[11]) for r in rows]

    def more_ready(self, queues: Sequence[str], *, now: float) -> bool:
        """Whether any of `queues` has a job ready to lease (after a full lease: so a
        worker knows to ask again at once rather than long-poll)."""
        with translate_errors():
            for queue in queues:
                row = self.conn.execute(
                    "SELECT 1 FROM jobs WHERE state = 'queued' AND queue = ?1"
                    " AND (expires_at IS NULL OR expires_at > ?2) LIMIT 1",
                    (queue, now),
                ).fetchone()
                if row is not None:
                    return True
        return False

    def final_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The records of those of `job_ids` in a final state, by id."""
        marks = ",".join("?" * len(job_ids))
        with translate_errors():
            rows = self.conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id IN ({marks})"
                f" AND state IN ({_FINAL_SQL})",
                list(job_ids),
            ).fetchall()
        return {r.id: r for r in map(_record, rows)}

    def _stale(self, job_id: str) -> errors.QBrokerError:
        row = self.conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return errors.JobNotFound(f"no job {job_id}")
        return errors.StaleLease("this lease is not the job's current lease")

    def _resent(
        self,
        job_id: str,
        lease: str,
        states: tuple[str, ...],
        *,
        released: bool = False,
        result: bytes | None = None,
    ) -> str:
        """The state of a job that `lease`'s own ack, fail or release (with
        `released`) already put in one of `states`: a report resent after its reply was
        lost. Ack, fail and release keep the token; only a release clears `started_at`,
        which tells a released job from one whose failure was retried. A resent ack
        with another `result` (packed) than the stored one is logged: the first stands.

        Raises:
            errors.StaleLease: it is not such a repeat.
            errors.JobNotFound
        """
        row = self.conn.execute(
            "SELECT state, lease, started_at IS NULL, result FROM jobs WHERE id = ?",
            (job_id,),
        ).fetchone()
        if row is None:
            raise errors.JobNotFound(f"no job {job_id}")
        if row[1] != lease or row[0] not in states or bool(row[2]) != released:
            raise errors.StaleLease("this lease is not the job's current lease")
        if result is not None and row[3] != result:
            # two workers think they ran this delivery, or a task is not deterministic
            log.warning("job.ack_repeated", job_id=job_id,
                        detail="a second ack of this lease with another result;"
                               " the first result stands")  # fmt: skip
        return str(row[0])

    def ack(self, job_id: str, lease: str, result: Any, *, now: float) -> str | None:
        """Mark a leased job succeeded and store its result. The job keeps the lease
        token, so a resend of this ack (its reply lost) is recognised and changes nothing.

        Returns:
            the job's queue; None for a resend of the ack that finished the job.

        Raises:
            errors.StaleLease: the lease expired, moved on, or the job was cancelled.
            errors.JobNotFound
        """
        packed = _pack(result, "result")
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET state = 'succeeded', result = ?1, finished_at = ?2,"
                " purge_at = ?2 + result_ttl, lease_expires_at = NULL"
                " WHERE id = ?3 AND lease = ?4 AND state = 'active'"
                " AND lease_expires_at > ?2 RETURNING queue",
                (packed, now, job_id, lease),
            ).fetchone()
            if row is None:
                self._resent(job_id, lease, _ACKED, result=packed)
                return None
        return str(row[0])

    def fail(
        self,
        job_id: str,
        lease: str,
        *,
        error: str,
        traceback: str | None,
        retry_in: float | None,
        now: float,
    ) -> tuple[str | None, JobState]:
        """Record a failure; with `retry_in` and attempts left, schedule a retry. The
        job keeps the lease token until its next lease, so a resend of this fail (its
        reply lost) is recognised and changes nothing.

        Returns:
            (queue, new state: scheduled or failed); the queue is None for a resend of
            the fail that settled this delivery.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        retry = -1.0 if retry_in is None else retry_in
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET"
                " state = CASE WHEN ?1 >= 0 AND attempts <= max_retries"
                "   THEN 'scheduled' ELSE 'failed' END,"
                " available_at = CASE WHEN ?1 >= 0 THEN ?2 + ?1 ELSE available_at END,"
                " finished_at = CASE WHEN ?1 >= 0 AND attempts <= max_retries"
                "   THEN NULL ELSE ?2 END,"
                " purge_at = CASE WHEN ?1 >= 0 AND attempts <= max_retries"
                "   THEN NULL ELSE ?2 + result_ttl END,"
                " error = ?3, traceback = ?4, lease_expires_at = NULL"
                " WHERE id = ?5 AND lease = ?6 AND state = 'active'"
                " AND lease_expires_at > ?2 RETURNING queue, state",
                (retry, now, error, traceback, job_id, lease),
            ).fetchone()
            if row is None:
                state = self._resent(job_id, lease, _FAILED)
                # a retry the reaper has since made due is still the fail's "scheduled"
                return (
                    None,
                    JobState.FAILED if state == "failed" else JobState.SCHEDULED,
                )
        return str(row[0]), JobState(row[1])

    def ack_many(
        self,
        items: Sequence[AckItem],
        *,
        now: float,
        counts: Counter[tuple[str, str]] | None = None,
    ) -> list[BatchResult]:
        """Ack each item on its own; a stale item fails only itself, a resent one is
        ok again. `counts`, if given, gets one (queue, "succeeded") per job acked.

        One UPDATE ... FROM (VALUES ...) acks every valid item (sqlite.org/lang_update.html
        #upfrom); only the items it did not match are looked at one by one. A job named
        by several items is acked item by item, in order: the UPDATE reports only job
        ids, so it could not tell which of the items' leases was the valid one.
        """
        done: dict[str, str] = {}  #: job id -> queue
        repeated = {i for i, n in Counter(it.id for it in items).items() if n > 1}
        batch = [it for it in items if it.id not in repeated] if repeated else items
        packed: list[tuple[str, str, bytes]] = []
        invalid: set[str] = set()  #: ids whose result msgpack cannot carry
        packed_of: dict[str, bytes] = {}
        for it in batch:
            try:
                packed_of[it.id] = _pack(it.result, "result")
            except errors.InvalidField:
                invalid.add(it.id)
            else:
                packed.append((it.id, it.lease, packed_of[it.id]))
        with translate_errors():
            for start in range(0, len(packed), ACK_CHUNK):
                chunk = packed[start : start + ACK_CHUNK]
                values = ",".join(["(?,?,?)"] * len(chunk))
                params: list[Any] = []
                for row in chunk:
                    params += row
                rows = self.conn.execute(
                    "UPDATE jobs SET state = 'succeeded', result = v.column3,"
                    " finished_at = ?1, purge_at = ?1 + result_ttl,"
                    " lease_expires_at = NULL"
                    f" FROM (VALUES {values}) AS v"
                    " WHERE jobs.id = v.column1 AND jobs.lease = v.column2"
                    " AND jobs.state = 'active' AND jobs.lease_expires_at > ?1"
                    " RETURNING jobs.id, jobs.queue",
                    [now, *params],
                ).fetchall()
                done.update(rows)
        out = []
        for it in items:
            if it.id in invalid:
                out.append(BatchResult(id=it.id, ok=False, error="invalid_field"))
            elif it.id in repeated:
                try:
                    queue = self.ack(it.id, it.lease, it.result, now=now)
                except (
                    errors.StaleLease,
                    errors.JobNotFound,
                    errors.InvalidField,
                ) as exc:
                    out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
                else:
                    out.append(BatchResult(id=it.id, ok=True))
                    if counts is not None and queue is not None:
                        counts[queue, "succeeded"] += 1
            elif it.id in done:
                if counts is not None:
                    counts[done[it.id], "succeeded"] += 1
                out.append(BatchResult(id=it.id, ok=True))
            else:
                try:
                    self._resent(it.id, it.lease, _ACKED, result=packed_of[it.id])
                except (errors.StaleLease, errors.JobNotFound) as exc:
                    out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
                else:
                    out.append(BatchResult(id=it.id, ok=True))
        return out

    def fail_many(
        self,
        items: Sequence[FailItem],
        *,
        now: float,
        counts: Counter[tuple[str, str]] | None = None,
    ) -> list[BatchResult]:
        """Fail each item on its own; a stale item fails only itself. `counts`, if
        given, gets one (queue, new state) per job failed."""
        out = []
        for it in items:
            try:
                queue, state = self.fail(
                    it.id,
                    it.lease,
                    error=it.error,
                    traceback=it.traceback,
                    retry_in=it.retry_in,
                    now=now,
                )
            except (errors.StaleLease, errors.JobNotFound) as exc:
                out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
            else:
                out.append(BatchResult(id=it.id, ok=True))
                if counts is not None and queue is not None:
                    counts[queue, state.value] += 1
        return out

    def extend(
        self, job_id: str, lease: str, *, lease_seconds: float | None, now: float
    ) -> tuple[float, bool]:
        """Renew a lease from now (beanstalkd `touch`).

        Returns:
            (new lease_expires_at, cancelled). A cancelled job keeps its lease token
            so its worker can learn of the cancel here.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET lease_seconds = coalesce(?1, lease_seconds),"
                " lease_expires_at = ?2 + coalesce(?1, lease_seconds)"
                " WHERE id = ?3 AND lease = ?4 AND state = 'active'"
                " AND lease_expires_at > ?2 RETURNING lease_expires_at",
                (lease_seconds, now, job_id, lease),
            ).fetchone()
            if row is not None:
                return float(row[0]), False
            row = self.conn.execute(
                "SELECT state FROM jobs WHERE id = ? AND lease = ?", (job_id, lease)
            ).fetchone()
            if row is not None and row[0] == "cancelled":
                return now, True
            raise self._stale(job_id)

    def release(self, job_id: str, lease: str, *, now: float) -> str | None:
        """Give a leased, unstarted job back; its attempt is not counted. The job keeps
        the lease token until its next lease, so a resend of this release (its reply
        lost) is recognised and changes nothing.

        Returns:
            the job's queue; None for a resend of the release that requeued the job.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = max(attempts - 1, 0),"
                " lease_expires_at = NULL, started_at = NULL"
                " WHERE id = ?1 AND lease = ?2 AND state = 'active'"
                " AND lease_expires_at > ?3 RETURNING queue",
                (job_id, lease, now),
            ).fetchone()
            if row is None:
                self._resent(job_id, lease, _RELEASED, released=True)
                return None
        return str(row[0])

    def release_many(
        self, items: Sequence[ReleaseItem], *, now: float
    ) -> tuple[list[BatchResult], Counter[str]]:
        """Release each item on its own; a stale item fails only itself.

        Returns:
            one result per item, in order, and how many jobs went back per queue.
        """
        out: list[BatchResult] = []
        queues: Counter[str] = Counter()
        for it in items:
            try:
                queue = self.release(it.id, it.lease, now=now)
            except (errors.StaleLease, errors.JobNotFound) as exc:
                out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
            else:
                out.append(BatchResult(id=it.id, ok=True))
                if queue is not None:
                    queues[queue] += 1
        return out, queues

    # ------------------------------------------------------------ reaper

    def tick(self, *, now: float) -> TickResult:
        """One sweep: promote due jobs, expire leases and jobs, purge old results."""
        out = TickResult()
        c = self.conn
        with translate_errors():
            for (queue,) in c.execute(
                "UPDATE jobs SET state = 'queued' WHERE seq IN (SELECT seq FROM jobs"
                " WHERE state = 'scheduled' AND available_at <= ? LIMIT ?)"
                " RETURNING queue",
                (now, SWEEP_BATCH),
            ).fetchall():
                out.promoted_queues.add(queue)
                out.promoted += 1
            for job_id, queue, state in c.execute(
                "UPDATE jobs SET"
                " state = CASE WHEN attempts > max_retries THEN 'dead' ELSE 'queued' END,"
                " finished_at = CASE WHEN attempts > max_retries THEN ?1 ELSE NULL END,"
                " purge_at = CASE WHEN attempts > max_retries THEN ?1 + result_ttl END,"
                " error = 'LeaseExpired: the lease ran out before an ack (attempt '"
                "   || attempts || ' of ' || (max_retries + 1) || ')',"
                " lease = NULL, lease_expires_at = NULL"
                " WHERE seq IN (SELECT seq FROM jobs"
                "   WHERE state = 'active' AND lease_expires_at <= ?1 LIMIT ?2)"
                " RETURNING id, queue, state",
                (now, SWEEP_BATCH),
            ).fetchall():
                if state == "dead":
                    out.finished_ids.append(job_id)
                    out.finished[queue, "dead"] += 1
                else:
                    out.requeued += 1
                    out.promoted_queues.add(queue)
            for job_id, queue in c.execute(
                "UPDATE jobs SET state = 'expired', finished_at = ?1,"
                " purge_at = ?1 + result_ttl WHERE seq IN (SELECT seq FROM jobs"
                "   WHERE expires_at <= ?1 AND expires_at IS NOT NULL"
                "   AND state IN ('queued', 'scheduled') LIMIT ?2)"
                " RETURNING id, queue",
                (now, SWEEP_BATCH),
            ).fetchall():
                out.finished_ids.append(job_id)
                out.finished[queue, "expired"] += 1
            out.purged = c.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs"
                " WHERE purge_at IS NOT NULL AND purge_at <= ? LIMIT ?)",
                (now, SWEEP_BATCH),
            ).rowcount
            due = c.execute(
                "SELECT min(t) FROM ("
                " SELECT min(available_at) AS t FROM jobs WHERE state = 'scheduled'"
                " UNION ALL SELECT min(lease_expires_at) FROM jobs WHERE state = 'active'"
                " UNION ALL SELECT min(expires_at) FROM jobs WHERE expires_at IS NOT NULL"
                "   AND state IN ('queued', 'scheduled')"
                " UNION ALL SELECT min(purge_at) FROM jobs WHERE purge_at IS NOT NULL)"
            ).fetchone()[0]
            out.next_due = None if due is None else float(due)
        return out


class Reader:
    """The read side: a pool of connections lent to one reading thread at a time.

    Thread-safe. The pool grows to the most reads ever run at once (bounded by the
    reader threads, readers.py, and the checkpointer) and never shrinks.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []

    @contextlib.contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = connect(self.path)
            with self._lock:
                self._all.append(conn)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._idle.put(conn)

    @property
    def connections(self) -> int:
        """How many reader connections are open."""
        return len(self._all)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def get_job(self, job_id: str) -> JobRecord:
        """Raises: errors.JobNotFound."""
        with translate_errors(), self._conn() as conn:
            row = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise errors.JobNotFound(f"no job {job_id}")
        return _record(row)

    def get_jobs(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The records of those of `job_ids` that exist, by id."""
        out: dict[str, JobRecord] = {}
        ids = list(dict.fromkeys(job_ids))
        with translate_errors(), self._conn() as conn:
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk
                ).fetchall()
                out.update((r.id, r) for r in map(_record, rows))
        return out

    def unfinished(self, job_ids: Sequence[str]) -> set[str]:
        """Those of `job_ids` that exist and are not in a final state: what a result
        long-poll waits for (ids only: a parked wait holds no records)."""
        out: set[str] = set()
        ids = list(dict.fromkeys(job_ids))
        with translate_errors(), self._conn() as conn:
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                out.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM jobs WHERE id IN ({marks})"
                        f" AND state NOT IN ({_FINAL_SQL})",
                        chunk,
                    )
                )
        return out

    def queue_stats(self, queue: str, *, now: float) -> QueueStats:
        """Counts by state (all states, zeros included) and the oldest ready job's age."""
        with translate_errors(), self._conn() as conn:
            conn.execute("BEGIN")
            try:
                counts = dict.fromkeys(_STATES, 0)
                for state, n in conn.execute(
                    "SELECT state, count(*) FROM jobs WHERE queue = ? GROUP BY state",
                    (queue,),
                ):
                    counts[state] = n
                oldest = conn.execute(_OLDEST_READY_SQL, (queue,)).fetchone()[0]
            finally:
                conn.execute("COMMIT")
        age = None if oldest is None else max(0.0, now - oldest)
        return QueueStats(queue=queue, counts=counts, oldest_age=age)

    def queue_names(self) -> list[str]:
        with translate_errors(), self._conn() as conn:
            # one seek in jobs_queue_state per distinct queue (a plain DISTINCT
            # reads the whole index, finished jobs included)
            return [
                r[0]
                for r in conn.execute(
                    "WITH RECURSIVE q(name) AS (SELECT min(queue) FROM jobs"
                    " UNION ALL SELECT (SELECT min(queue) FROM jobs WHERE queue > q.name)"
                    " FROM q WHERE q.name IS NOT NULL)"
                    " SELECT name FROM q WHERE name IS NOT NULL"
                )
            ]

    def queues_holding(self, queues: Sequence[str]) -> set[str]:
        """Those of `queues` that hold a job in any state: one seek in
        jobs_queue_state each (queue_names() seeks once per queue there is)."""
        out: set[str] = set()
        with translate_errors(), self._conn() as conn:
            for i in range(0, len(queues), _IN_CHUNK):
                chunk = queues[i : i + _IN_CHUNK]
                values = ",".join(["(?)"] * len(chunk))
                out.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT column1 FROM (VALUES {values}) WHERE EXISTS"
                        " (SELECT 1 FROM jobs WHERE queue = column1)",
                        chunk,
                    )
                )
        return out

    def checkpoint(self) -> int:
        """Copy committed WAL pages into the database file without blocking the writer
        (https://sqlite.org/c3ref/wal_checkpoint_v2.html, PASSIVE).

        Returns:
            the WAL's size in pages.
        """
        with translate_errors(), self._conn() as conn:
            _, wal_pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(wal_pages)

    def ping(self) -> None:
        with translate_errors(), self._conn() as conn:
            conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()

    def statistics(self) -> StoreStatistics:
        with translate_errors(), self._conn() as conn:
            jobs = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
        return StoreStatistics(jobs=jobs, page_count=pages, page_size=size)
