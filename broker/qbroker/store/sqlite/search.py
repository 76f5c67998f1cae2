"""Job control on the read side: the job listing, what a queued job waits on, the
limits with their active jobs, and which jobs are cancelled. Functions of a reader
connection (reads.py lends one), each reading as of one commit.

The listing is keyset paged over `seq` (the order jobs were stored) and examines one
window of at most jobfilter.SCAN_LIMIT rows per page (control.window): `queue` with
`state` seek the (queue, state) index inside the window, the rest is checked row by
row, the argument filters on the decoded payload. So a page costs the same at a
million jobs as at a thousand, and a page may come back short with `next` set.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec
from qclient.wire import JobList, JobRecord, JobState, LimitRecord

from qbroker import gcra
from qbroker.jobfilter import JobFilter, encode_cursor
from qbroker.store.sqlite.control import (
    LIMIT_COLUMNS,
    LimitRow,
    active_of,
    filter_sql,
    keys_of,
    matches,
    window,
)
from qbroker.store.sqlite.rows import RECORD_COLUMNS, record

__all__ = ["cancelled_among", "limits", "list_jobs", "waiting_on"]

_IN_CHUNK = 500


def list_jobs(conn: sqlite3.Connection, where: JobFilter, now: float) -> JobList:
    """A page of the jobs `where` matches, newest first (see the module docstring)."""
    low, nxt = window(conn, where.before)
    top = where.before if where.before is not None else (1 << 63) - 1
    cond, params = filter_sql(where)
    # the window's rows by their payload alone; whole records of the matches only
    picked: list[int] = []
    last = None
    rows = conn.execute(
        f"SELECT seq, payload FROM jobs WHERE seq >= ? AND seq < ?{cond}"
        " ORDER BY seq DESC",
        (low, top, *params),
    )
    for seq, payload in rows:
        if matches(where, payload):
            picked.append(seq)
            if len(picked) >= where.limit:
                last = seq
                break
    rows.close()
    jobs: list[JobRecord] = []
    seen: dict[str, Any] = {}  #: what `waiting_on` read, for the page's other jobs
    for row in conn.execute(
        f"SELECT {RECORD_COLUMNS} FROM jobs"
        " WHERE seq IN (SELECT value FROM json_each(?)) ORDER BY seq DESC",
        (json.dumps(picked),),
    ):
        job = record(row)
        if job.state is JobState.QUEUED:
            why = waiting_on(conn, job, now, seen)
            if why is not None:
                job = msgspec.structs.replace(job, waiting_on=why)
        jobs.append(job)
    if last is not None:  # the page filled before the window's end: go on below it
        more = conn.execute(
            f"SELECT 1 FROM jobs WHERE seq >= ? AND seq < ?{cond} LIMIT 1",
            (low, last, *params),
        ).fetchone()
        nxt = last if more is not None or nxt is not None else None
    return JobList(jobs=jobs, next=None if nxt is None else encode_cursor(nxt))


def waiting_on(
    conn: sqlite3.Connection,
    job: JobRecord,
    now: float,
    seen: dict[str, Any] | None = None,
) -> str | None:
    """Why a queued job is not leased: "paused", "limit KEY", or None. `seen` keeps
    what was read for the next job of a page (each queue and key is read once)."""
    if job.state is not JobState.QUEUED:
        return None
    seen = {} if seen is None else seen
    queue = "queue " + job.queue
    if queue not in seen:
        row = conn.execute(
            "SELECT paused FROM queues WHERE name = ?", (job.queue,)
        ).fetchone()
        seen[queue] = row is not None and bool(row[0])
    if seen[queue]:
        return "paused"
    for key in keys_of(job.queue, job.task, job.limit_key):
        if key not in seen:
            seen[key] = _full(conn, key, now)
        if seen[key]:
            return f"limit {key}"
    return None


def _full(conn: sqlite3.Connection, key: str, now: float) -> bool:
    """Whether `key` has a limit that lets no job start now."""
    found = conn.execute(
        f"SELECT {LIMIT_COLUMNS} FROM limits WHERE key = ?", (key,)
    ).fetchone()
    if found is None:
        return False
    limit = LimitRow.of(found)
    if limit.concurrency is not None and active_of(conn, key, now) >= limit.concurrency:
        return True
    r = limit.rate
    return r is not None and not gcra.allowed(
        limit.tat, now, limit=r.limit, per=r.per, burst=r.burst
    )


def limits(conn: sqlite3.Connection, now: float) -> list[LimitRecord]:
    """Every limit, by key, with the key's active jobs now."""
    rows = conn.execute(f"SELECT {LIMIT_COLUMNS} FROM limits ORDER BY key").fetchall()
    return [LimitRow.of(r).record(active_of(conn, r[0], now)) for r in rows]


def cancelled_among(conn: sqlite3.Connection, job_ids: Sequence[str]) -> list[str]:
    """Those of `job_ids` that are cancelled."""
    out: list[str] = []
    ids = list(dict.fromkeys(job_ids))
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        out += [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM jobs WHERE id IN ({marks}) AND state = 'cancelled'",
                chunk,
            )
        ]
    return out
