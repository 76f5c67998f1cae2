"""Job control on the write side: paused queues, global limits in the lease, purge,
retry and delete. A mixin of `Writes` (writes.py), whose charter holds here too.

Theory of operation.

- **Caches.** The paused queues and the limit rows are read once into memory and kept
  there by the verbs that change them (this writer is the only one); `rolled_back`
  drops them, so a rolled-back change is never believed. A lease with no limit and no
  paused queue costs one set lookup more than before.
- **Leasing under limits** (`lease_limited`). A job is subject to the limits of
  `queue:<queue>`, `task:<task>` and its `limit_key`. When no limit can apply to the
  queue's jobs, a lease is the single UPDATE of before. Otherwise it reads candidates
  in lease order (`seq, task, limit_key`, from the jobs_ready index), takes each whose
  keys all have room, skips the others and leases the taken ones by `seq`. A key's
  room is its concurrency less its active leases that have not lapsed (counted once
  per lease, from the jobs_active index: O(active jobs)), and what its GCRA rate
  admits now (gcra.py). A key out of room is left out of the next round's SQL, so a
  held task never blocks the jobs behind it (no head-of-line blocking). The first
  round reads `want` rows, the next ones at most `want + HOLD_SCAN`.
- **Retry by hand** keeps `attempts` (the total) and sets `attempt_base` to it: the
  next lease is attempt 1 again, so the job gets its `max_retries + 1` runs anew
  without the worker taking it for one that used them up.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qclient.wire import FINAL_STATES, JobState, LeasedJob, LimitRecord, RateSpec

from qbroker import errors, gcra
from qbroker.jobfilter import RETRYABLE, SCAN_LIMIT, JobFilter
from qbroker.store.interface import Changes, Purged, Retried
from qbroker.store.sqlite.rows import LEASED_COLUMNS, decode_payload, leased_job
from qbroker.store.sqlite.schema import translate_error, translate_errors

__all__ = ["HOLD_SCAN", "PURGE_BATCH", "Control", "LimitRow", "active_of", "window"]

PURGE_BATCH = 10_000  #: jobs one purge call deletes at most (one commit each)
HOLD_SCAN = 200  #: candidates a limited lease reads beyond the jobs it wants, per round
HOLD_ROUNDS = 4  #: rounds a limited lease makes at most (each leaves out held keys)
_UNLIMITED = 1 << 62
_RETRYABLE_SQL = ",".join(f"'{s.value}'" for s in sorted(RETRYABLE))
_FINAL_SQL = ",".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
_QUEUED, _ACTIVE = JobState.QUEUED, JobState.ACTIVE


@dataclass(slots=True)
class LimitRow:
    """One row of the limits table, as the writer keeps it in memory."""

    key: str
    concurrency: int | None
    rate: RateSpec | None
    tat: float | None
    updated_at: float

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> LimitRow:
        key, concurrency, limit, per, burst, tat, updated_at = row
        rate = None
        if limit is not None:
            rate = RateSpec(limit=limit, per=per, burst=burst or 0)
        return cls(key, concurrency, rate, tat, updated_at)

    def record(self, active: int) -> LimitRecord:
        return LimitRecord(
            key=self.key,
            concurrency=self.concurrency,
            rate=self.rate,
            active=active,
            updated_at=self.updated_at,
        )


LIMIT_COLUMNS = "key, concurrency, rate_limit, rate_per, rate_burst, tat, updated_at"


def active_of(conn: sqlite3.Connection, key: str, now: float) -> int:
    """The jobs of a limit key active now (leases not lapsed)."""
    kind, _, name = key.partition(":")
    if kind == "queue" and name:
        sql = "SELECT count(*) FROM jobs WHERE queue = ?1 AND state = 'active'"
        param = name
    elif kind == "task" and name:
        sql = "SELECT count(*) FROM jobs WHERE state = 'active' AND task = ?1"
        param = name
    else:
        sql = "SELECT count(*) FROM jobs WHERE state = 'active' AND limit_key = ?1"
        param = key
    row = conn.execute(sql + " AND lease_expires_at > ?2", (param, now)).fetchone()
    return int(row[0])


def keys_of(queue: str, task: str, limit_key: str | None) -> tuple[str, ...]:
    """The limit keys a job is subject to."""
    own = (limit_key,) if limit_key is not None else ()
    return (f"queue:{queue}", f"task:{task}", *own)


def window(
    conn: sqlite3.Connection, before: int | None, rows: int = SCAN_LIMIT
) -> tuple[int, int | None]:
    """The `seq` range of the next `rows` stored jobs below `before`, newest first:
    (low, next). Jobs with `low <= seq < before` are the window; `next` is `low`
    unless the window reached the table's start (then None). A walk down the rowid
    b-tree: `rows` steps, whatever the table holds."""
    top = before if before is not None else (1 << 63) - 1
    row = conn.execute(
        "SELECT seq FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
        (top, rows - 1),
    ).fetchone()
    if row is None:
        return 0, None
    low = int(row[0])
    more = conn.execute("SELECT 1 FROM jobs WHERE seq < ? LIMIT 1", (low,)).fetchone()
    return low, low if more is not None else None


def filter_sql(where: JobFilter) -> tuple[str, list[Any]]:
    """The SQL conditions (after `WHERE seq >= ? AND seq < ?`) of a filter's plain
    fields, and their parameters."""
    sql, params = "", []
    for column, value in (
        ("queue", where.queue),
        ("state", where.state),
        ("task", where.task),
    ):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(str(value))
    return sql, params


def matches(where: JobFilter, payload: bytes) -> bool:
    """Whether a job's arguments (and schedule header) pass the filter."""
    if not where.where and where.schedule is None:
        return True
    args, kwargs, headers = decode_payload(payload)
    if where.schedule is not None and headers.get(SCHEDULE_HEADER) != where.schedule:
        return False
    return where.matches_arguments(args, kwargs, headers)


#: the header the jobs a schedule makes carry (the sched lane's wire.SCHEDULE_HEADER)
SCHEDULE_HEADER = "qbroker.schedule"


class Control:
    """Job control's statements on the write connection (mixed into `Writes`)."""

    conn: sqlite3.Connection

    def __init__(self) -> None:
        self._paused: set[str] | None = None
        self._limits: dict[str, LimitRow] | None = None
        self._job_keys = False  #: a limit on a key other than `queue:...` exists
        #: the lease in progress was held back by limits: when it may go on
        self.held_until: float | None = None

    def forget_control(self) -> None:
        """Drop the caches (after a rollback): read again on next use."""
        self._paused = None
        self._limits = None

    # ------------------------------------------------------------ caches

    def paused_queues(self) -> set[str]:
        if self._paused is None:
            with translate_errors():
                rows = self.conn.execute("SELECT name FROM queues WHERE paused = 1")
                self._paused = {r[0] for r in rows}
        return self._paused

    def limit_rows(self) -> dict[str, LimitRow]:
        if self._limits is None:
            with translate_errors():
                rows = self.conn.execute(f"SELECT {LIMIT_COLUMNS} FROM limits")
                self._limits = {r[0]: LimitRow.of(r) for r in rows}
            self._job_keys = any(not k.startswith("queue:") for k in self._limits)
        return self._limits

    def limited(self, queue: str) -> bool:
        """Whether a limit may apply to a job of `queue`."""
        limits = self.limit_rows()
        return bool(limits) and (self._job_keys or f"queue:{queue}" in limits)

    # ------------------------------------------------------------ leasing

    def lease_limited(
        self,
        queue: str,
        want: int,
        params: tuple[str, float | None, float, str],
    ) -> list[LeasedJob]:
        """Lease up to `want` jobs of `queue` that its limits let start now (see the
        module docstring). `params`: (token prefix, lease seconds, now, worker).
        Sets `held_until` when limits held jobs back."""
        prefix, lease_seconds, now, worker = params
        limits = self.limit_rows()
        room: dict[str, int] = {}

        def room_of(key: str) -> int:
            n = room.get(key)
            if n is None:
                row = limits.get(key)
                n = _UNLIMITED
                if row is not None:
                    if row.concurrency is not None:
                        n = row.concurrency - active_of(self.conn, key, now)
                    if row.rate is not None:
                        r = row.rate
                        allowed = gcra.allowed(
                            row.tat, now, limit=r.limit, per=r.per, burst=r.burst
                        )
                        n = min(n, allowed)
                room[key] = n = max(n, 0)
            return n

        qkey = f"queue:{queue}"
        held: set[str] = set()
        if room_of(qkey) == 0:
            self._hold(limits, {qkey}, now)
            return []
        want = min(want, room_of(qkey))
        quick = self._lease_unless_held(queue, want, params, limits)
        if quick is not None:
            return quick
        room = {qkey: room[qkey]}  # counted before the try, which was rolled back
        out: list[LeasedJob] = []
        started: dict[str, int] = {}
        held_tasks: list[str] = []
        held_keys: list[str] = []
        for _ in range(HOLD_ROUNDS):
            need = want - len(out)
            if need <= 0:
                break
            sql = (
                "SELECT seq, task, limit_key FROM jobs WHERE state = 'queued'"
                " AND queue = ? AND (expires_at IS NULL OR expires_at > ?)"
            )
            args: list[Any] = [queue, now]
            if held_tasks:
                sql += f" AND task NOT IN ({','.join('?' * len(held_tasks))})"
                args += held_tasks
            if held_keys:
                marks = ",".join("?" * len(held_keys))
                sql += f" AND (limit_key IS NULL OR limit_key NOT IN ({marks}))"
                args += held_keys
            sql += " ORDER BY priority DESC, available_at, seq LIMIT ?"
            # the first round reads only what it wants; once keys ran out of room,
            # a few more, as the rest of a held key's jobs may sit among them
            scan = need if not held else need + HOLD_SCAN
            with translate_errors():
                candidates = self.conn.execute(sql, [*args, scan]).fetchall()
            taken: list[int] = []
            newly_held = False
            for seq, task, limit_key in candidates:
                keys = [k for k in keys_of(queue, task, limit_key) if k in limits]
                blocked = [k for k in keys if room_of(k) == 0]
                if blocked:
                    for k in blocked:
                        if k not in held:
                            held.add(k)
                            newly_held = True
                            if k == f"task:{task}":
                                held_tasks.append(task)
                            elif k != qkey:
                                held_keys.append(k)
                    if qkey in blocked:
                        break
                    continue
                for k in keys:
                    room[k] -= 1
                    started[k] = started.get(k, 0) + 1
                taken.append(seq)
                if len(taken) >= need:
                    break
            if taken:
                out += self._lease_seqs(
                    queue, taken, prefix, lease_seconds, now, worker
                )
            if len(candidates) < scan or qkey in held or not newly_held:
                break
        self._spend(limits, started, now)
        if held:
            self._hold(limits, held, now)
        return out

    def _lease_unless_held(
        self,
        queue: str,
        want: int,
        params: tuple[str, float | None, float, str],
        limits: dict[str, LimitRow],
    ) -> list[LeasedJob] | None:
        """The usual case, at the cost of a lease without limits: lease the first
        `want` ready jobs in one UPDATE, then check that the limits of the keys they
        carry had room for them (`queue:` is checked by the caller). None if not:
        the UPDATE is rolled back, and the caller takes jobs one by one."""
        prefix, lease_seconds, now, worker = params
        qkey = f"queue:{queue}"
        with translate_errors():
            self.conn.execute("SAVEPOINT lease_try")
            rows = self.conn.execute(
                "UPDATE jobs SET state = 'active', attempts = attempts + 1,"
                " lease = ?1 || seq, lease_seconds = coalesce(?2, timeout),"
                " lease_expires_at = ?3 + coalesce(?2, timeout), started_at = ?3,"
                " worker = ?4, progress = NULL, progress_note = NULL"
                " WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued'"
                "   AND queue = ?5 AND (expires_at IS NULL OR expires_at > ?3)"
                "   ORDER BY priority DESC, available_at, seq LIMIT ?6)"
                f" RETURNING {LEASED_COLUMNS}, limit_key",
                (prefix, lease_seconds, now, worker, queue, want),
            ).fetchall()
            started: dict[str, int] = {qkey: len(rows)} if qkey in limits else {}
            for r in rows:
                for key in (f"task:{r[4]}", r[11]):
                    if key is not None and key in limits:
                        started[key] = started.get(key, 0) + 1
            fits = True
            for key, n in started.items():
                row = limits[key]
                # the jobs just leased count as active now: the key fits if no
                # more than its concurrency is active
                if row.concurrency is not None and key != qkey:
                    fits = fits and active_of(self.conn, key, now) <= row.concurrency
                if row.rate is not None and key != qkey:
                    r = row.rate
                    allowed = gcra.allowed(
                        row.tat, now, limit=r.limit, per=r.per, burst=r.burst
                    )
                    fits = fits and allowed >= n
                if not fits:
                    break
            if not fits:
                self.conn.execute("ROLLBACK TO lease_try")
            self.conn.execute("RELEASE lease_try")
        if not fits:
            return None
        self._spend(limits, started, now)
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        return [leased_job(r, queue) for r in rows]

    def _lease_seqs(
        self,
        queue: str,
        seqs: list[int],
        prefix: str,
        lease_seconds: float | None,
        now: float,
        worker: str,
    ) -> list[LeasedJob]:
        with translate_errors():
            rows = self.conn.execute(
                "UPDATE jobs SET state = 'active', attempts = attempts + 1,"
                " lease = ?1 || seq, lease_seconds = coalesce(?2, timeout),"
                " lease_expires_at = ?3 + coalesce(?2, timeout), started_at = ?3,"
                " worker = ?4, progress = NULL, progress_note = NULL"
                " WHERE seq IN (SELECT value FROM json_each(?5))"
                f" RETURNING {LEASED_COLUMNS}",
                (prefix, lease_seconds, now, worker, json.dumps(seqs)),
            ).fetchall()
        rows.sort(key=lambda r: (-r[0], r[1], r[2]))
        return [leased_job(r, queue) for r in rows]

    def _spend(
        self, limits: dict[str, LimitRow], started: dict[str, int], now: float
    ) -> None:
        """Move the rate of each key that started jobs on (its GCRA `tat`)."""
        for key, n in started.items():
            row = limits[key]
            if row.rate is None:
                continue
            row.tat = gcra.take(row.tat, now, n, limit=row.rate.limit, per=row.rate.per)
            with translate_errors():
                self.conn.execute(
                    "UPDATE limits SET tat = ? WHERE key = ?", (row.tat, key)
                )

    def _hold(self, limits: dict[str, LimitRow], held: set[str], now: float) -> None:
        """Note when the keys that held jobs back may let one start: a rate's next
        start, or never by itself (a concurrency: when a job of the key ends)."""
        until = math.inf
        for key in held:
            row = limits[key]
            if row.rate is not None and (
                row.concurrency is None
                or active_of(self.conn, key, now) < row.concurrency
            ):
                r = row.rate
                at = gcra.next_start(
                    row.tat, now, limit=r.limit, per=r.per, burst=r.burst
                )
                until = min(until, at)
        prev = self.held_until
        self.held_until = until if prev is None else min(prev, until)

    # ------------------------------------------------------------ queues

    def set_paused(self, queue: str, paused: bool, now: float) -> Changes:
        with translate_errors():
            self.conn.execute(
                "INSERT INTO queues (name, paused) VALUES (?1, ?2)"
                " ON CONFLICT (name) DO UPDATE SET paused = ?2",
                (queue, int(paused)),
            )
        names = self.paused_queues()
        if paused:
            names.add(queue)
        else:
            names.discard(queue)
        return Changes()

    def purge(self, queue: str, states: Sequence[JobState], now: float) -> Purged:
        changes = Changes()
        names = [s.value for s in states if s is not _ACTIVE]
        marks = ",".join("?" * len(names))
        with translate_errors():
            rows = self.conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE queue = ?"
                f" AND state IN ({marks}) LIMIT ?) RETURNING id, state",
                (queue, *names, PURGE_BATCH),
            ).fetchall()
        made = changes.transitions
        for job_id, state in rows:
            made.append((job_id, queue, JobState(state), None))
        return Purged(len(rows), len(rows) >= PURGE_BATCH, changes)

    # ------------------------------------------------------------ limits

    def put_limit(
        self, key: str, concurrency: int | None, rate: RateSpec | None, now: float
    ) -> LimitRecord:
        limits = self.limit_rows()
        old = limits.get(key)
        # the same rate keeps its state: a worker's upsert at start must not refill
        # the bucket
        tat = old.tat if old is not None and old.rate == rate else None
        row = LimitRow(key, concurrency, rate, tat, now)
        with translate_errors():
            self.conn.execute(
                f"INSERT OR REPLACE INTO limits ({LIMIT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    concurrency,
                    None if rate is None else rate.limit,
                    None if rate is None else rate.per,
                    None if rate is None else rate.burst,
                    tat,
                    now,
                ),
            )
            active = active_of(self.conn, key, now)
        limits[key] = row
        self._job_keys = self._job_keys or not key.startswith("queue:")
        return row.record(active)

    def delete_limit(self, key: str, now: float) -> Changes:
        with translate_errors():
            gone = self.conn.execute(
                "DELETE FROM limits WHERE key = ?", (key,)
            ).rowcount
        if not gone:
            raise errors.LimitNotFound(f"no limit on {key}")
        limits = self.limit_rows()
        limits.pop(key, None)
        self._job_keys = any(not k.startswith("queue:") for k in limits)
        return Changes()

    # ------------------------------------------------------------ jobs

    def retry_job(self, job_id: str, now: float) -> Changes:
        changes = Changes()
        with translate_errors():
            row = self.conn.execute(
                "SELECT seq, queue, state FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        if row is None:
            raise errors.JobNotFound(f"no job {job_id}")
        seq, queue, state = row
        if JobState(state) not in RETRYABLE:
            raise errors.InvalidState(
                f"job {job_id} is {state}: only a dead, failed, expired or cancelled"
                " job can be retried",
                state=state,
            )
        if not self._requeue([seq], now):
            raise errors.DuplicateDedupKey(
                "an unfinished job with this job's dedup_key is in the queue",
                field="dedup_key",
            )
        changes.transitions.append((job_id, queue, JobState(state), _QUEUED))
        return changes

    def _requeue(self, seqs: list[int], now: float) -> bool:
        """Put these rows back to queued, all or none. False: a dedup_key of theirs
        is taken by an unfinished job now (nothing changed)."""
        try:
            self.conn.execute(
                "UPDATE jobs SET state = 'queued', attempt_base = attempts,"
                " available_at = ?1, expires_at = NULL, finished_at = NULL,"
                " purge_at = NULL, lease = NULL, lease_expires_at = NULL"
                " WHERE seq IN (SELECT value FROM json_each(?2))",
                (now, json.dumps(seqs)),
            )
        except sqlite3.IntegrityError:
            return False
        except sqlite3.Error as exc:
            raise translate_error(exc) from exc
        return True

    def retry_jobs(self, where: JobFilter, now: float) -> Retried:
        changes = Changes()
        cond, params = filter_sql(where)
        with translate_errors():
            low, nxt = window(self.conn, where.before)
            top = where.before if where.before is not None else (1 << 63) - 1
            rows = self.conn.execute(
                "SELECT seq, id, queue, state, payload FROM jobs"
                f" WHERE seq >= ? AND seq < ? AND state IN ({_RETRYABLE_SQL}){cond}",
                (low, top, *params),
            ).fetchall()
        picked = [r for r in rows if matches(where, r[4])]
        done = picked
        if picked and not self._requeue([r[0] for r in picked], now):
            # one by one: a job whose dedup_key is taken now is left alone
            done = [r for r in picked if self._requeue([r[0]], now)]
        for _, job_id, queue, state, _ in done:
            changes.transitions.append((job_id, queue, JobState(state), _QUEUED))
        return Retried(len(done), nxt, changes)

    def delete_job(self, job_id: str, now: float) -> Changes:
        changes = Changes()
        with translate_errors():
            row = self.conn.execute(
                f"DELETE FROM jobs WHERE id = ? AND state IN ({_FINAL_SQL})"
                " RETURNING queue, state",
                (job_id,),
            ).fetchone()
            if row is None:
                found = self.conn.execute(
                    "SELECT state FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                if found is None:
                    raise errors.JobNotFound(f"no job {job_id}")
                raise errors.InvalidState(
                    f"job {job_id} is {found[0]}: only a finished job can be deleted"
                    " (cancel it first)",
                    state=found[0],
                )
        changes.transitions.append((job_id, row[0], JobState(row[1]), None))
        return changes
