"""The workers registry's SQL: one row per worker, written by its beats.

The backend runs `beat` as a write unit on the writer thread and `workers` on a
reader connection. Its table is migration step 3 (schema.py).

A worker's state is not stored but derived when read, from its last beat: `stopped`
when that beat said so, `lost` once LOST_BEATS of its intervals have passed without
one, else `alive`. A worker not heard from for FORGET_AFTER is deleted by the next beat
of any worker, and never listed meanwhile.
"""

from __future__ import annotations

import sqlite3

import msgspec
from qclient.wire import WorkerBeat, WorkerInfo, WorkerState

LOST_BEATS = 3  #: missed beats after which a worker is `lost`
FORGET_AFTER = 86400.0  #: seconds without a beat after which a worker is forgotten

SCHEMA = """
CREATE TABLE IF NOT EXISTS workers (
    name          TEXT PRIMARY KEY,   -- the worker's own name (qworker: host:pid)
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    queues        TEXT NOT NULL,      -- JSON list of queue names
    pool          TEXT NOT NULL,      -- threads | processes
    concurrency   INTEGER NOT NULL,   -- slots
    version       TEXT NOT NULL,      -- qworker's version
    started_at    REAL,               -- when the worker started (its clock)
    first_seen_at REAL NOT NULL,      -- its first beat (the broker's clock)
    last_beat_at  REAL NOT NULL,      -- its last beat (the broker's clock)
    interval      REAL NOT NULL,      -- seconds between its beats
    jobs          TEXT NOT NULL,      -- JSON list of the job ids it ran at its last beat
    stopped       INTEGER NOT NULL    -- 1: its last beat said it stopped on purpose
) WITHOUT ROWID
"""

_COLUMNS = (
    "name, host, pid, queues, pool, concurrency, version, started_at,"
    " first_seen_at, last_beat_at, interval, jobs, stopped"
)
_encode = msgspec.json.Encoder().encode
_decode_names = msgspec.json.Decoder(list[str]).decode


def beat(conn: sqlite3.Connection, b: WorkerBeat, now: float) -> None:
    """Record one beat (the first one registers), and forget long-silent workers."""
    conn.execute(
        f"INSERT INTO workers ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
        " queues = excluded.queues, pool = excluded.pool,"
        " concurrency = excluded.concurrency, version = excluded.version,"
        " started_at = excluded.started_at, last_beat_at = excluded.last_beat_at,"
        " interval = excluded.interval, jobs = excluded.jobs,"
        " stopped = excluded.stopped,"
        # a new process under an old name is a new worker
        " first_seen_at = CASE WHEN workers.pid = excluded.pid AND workers.stopped = 0"
        " THEN workers.first_seen_at ELSE excluded.first_seen_at END",
        (
            b.name,
            b.host,
            b.pid,
            _encode(b.queues).decode(),
            b.pool,
            b.concurrency,
            b.version,
            b.started_at,
            now,
            now,
            b.interval,
            _encode(b.jobs).decode(),
            int(b.stopped),
        ),
    )
    conn.execute("DELETE FROM workers WHERE last_beat_at < ?", (now - FORGET_AFTER,))


def workers(conn: sqlite3.Connection, now: float) -> list[WorkerInfo]:
    """Every worker heard from within FORGET_AFTER, by name, with its derived state."""
    out = []
    for row in conn.execute(
        f"SELECT {_COLUMNS} FROM workers WHERE last_beat_at >= ? ORDER BY name",
        (now - FORGET_AFTER,),
    ):
        (name, host, pid, queues, pool, conc, version, started, first, last) = row[:10]
        interval, jobs, stopped = row[10:]
        if stopped:
            state = WorkerState.STOPPED
        elif now - last > LOST_BEATS * interval:
            state = WorkerState.LOST
        else:
            state = WorkerState.ALIVE
        out.append(
            WorkerInfo(
                name=name,
                state=state,
                host=host,
                pid=pid,
                queues=_decode_names(queues),
                pool=pool,
                concurrency=conc,
                version=version,
                started_at=started,
                first_seen_at=first,
                last_beat_at=last,
                interval=interval,
                jobs=_decode_names(jobs),
            )
        )
    return out
