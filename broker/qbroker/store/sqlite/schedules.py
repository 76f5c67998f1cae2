"""The schedules' SQL: their table's verbs (writer thread) and reads (reader threads).

Theory of operation: each schedule row holds its next tick (`next_run_at`). `fire_due`
takes the rows due (index `schedules_due`), enqueues each tick's job through the jobs'
own `enqueue` (writes.py) under an id made from (schedule, fire time), and moves
`next_run_at` on, all in one unit: a crash before the commit leaves both undone, and a
tick fired again finds its job id taken and makes nothing. The table is made by
schema.py's third migration.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import structlog
from qclient.wire import (
    FIRE_TIME_HEADER,
    SCHEDULE_HEADER,
    CatchUp,
    JobRecord,
    JobSpec,
    ScheduleRecord,
    ScheduleSpec,
    crockford26,
)

from qbroker import errors, schedules
from qbroker.store.interface import Changes, Defaults, Fired
from qbroker.store.sqlite.reads import Reader
from qbroker.store.sqlite.schema import translate_errors
from qbroker.store.sqlite.writes import Writes

FIRE_BATCH = 1000  #: due schedules one `fire_due` call takes at most
_COLUMNS = (
    "name, task, queue, cron, every, tz, payload, priority, catch_up, paused, anchor,"
    " next_run_at, last_run_at, last_job_id, created_at, updated_at"
)
log = structlog.get_logger("qbroker.schedules")
_encode = msgspec.msgpack.Encoder().encode
_decode_payload = msgspec.msgpack.Decoder(
    tuple[list[Any], dict[str, Any], dict[str, Any]]
).decode


def _timing(row: tuple[Any, ...]) -> schedules.Timing:
    return schedules.Timing(cron=row[3], every=row[4], tz=row[5])


def _record(row: tuple[Any, ...]) -> ScheduleRecord:
    args, kwargs, headers = _decode_payload(row[6])
    return ScheduleRecord(
        name=row[0],
        task=row[1],
        queue=row[2],
        cron=row[3],
        every=None if row[4] is None else float(row[4]),
        tz=row[5],
        args=args,
        kwargs=kwargs,
        headers=headers,
        priority=row[7],
        catch_up=row[8],
        paused=bool(row[9]),
        next_run_at=float(row[11]),
        last_run_at=row[12],
        last_job_id=row[13],
        words=schedules.words(_timing(row)),
        created_at=row[14],
        updated_at=row[15],
    )


def _not_found(name: str) -> errors.ScheduleNotFound:
    return errors.ScheduleNotFound(f"no schedule {name}")


class ScheduleWrites:
    """The write side, on the jobs' `Writes` (writer thread only, not thread-safe).
    Every public method is one atomic unit and never commits (writes.py's charter)."""

    def __init__(self, writes: Writes) -> None:
        self.writes = writes
        self.conn = writes.conn

    def _row(self, name: str) -> tuple[Any, ...]:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM schedules WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise _not_found(name)
        return tuple(row)

    def put(self, name: str, spec: ScheduleSpec, now: float) -> ScheduleRecord:
        """Create or replace a schedule (idempotent). A schedule whose timing (cron,
        every, tz) is unchanged keeps its next tick; a new timing starts from `now`.
        `spec.paused` None keeps the stored paused state.

        Raises:
            errors.InvalidField: naming the field (nothing is stored).
        """
        timing = schedules.check(name, spec, now=now)
        try:
            payload = _encode((spec.args, spec.kwargs, spec.headers))
        except OverflowError as exc:
            raise errors.InvalidField(
                "integers must lie within -2**63 .. 2**64-1", field="args"
            ) from exc
        with translate_errors():
            old = self.conn.execute(
                f"SELECT {_COLUMNS} FROM schedules WHERE name = ?", (name,)
            ).fetchone()
            if old is not None and _timing(old) == timing:
                anchor, next_run_at = old[10], old[11]
            else:
                anchor, next_run_at = now, schedules.next_after(timing, now, now)
            paused = spec.paused if spec.paused is not None else bool(old and old[9])
            params = (
                name, spec.task, spec.queue or spec.task, spec.cron, spec.every,
                spec.tz, payload, spec.priority, spec.catch_up, int(paused),
                anchor, next_run_at, now,
            )  # fmt: skip
            row = self.conn.execute(
                f"INSERT INTO schedules ({_COLUMNS})"
                " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,"
                "   NULL, NULL, ?13, ?13)"
                " ON CONFLICT (name) DO UPDATE SET task = ?2, queue = ?3, cron = ?4,"
                "   every = ?5, tz = ?6, payload = ?7, priority = ?8, catch_up = ?9,"
                "   paused = ?10, anchor = ?11, next_run_at = ?12, updated_at = ?13"
                f" RETURNING {_COLUMNS}",
                params,
            ).fetchone()
        return _record(row)

    def delete(self, name: str) -> None:
        """Raises: errors.ScheduleNotFound. Jobs it made are left alone."""
        with translate_errors():
            gone = self.conn.execute(
                "DELETE FROM schedules WHERE name = ?", (name,)
            ).rowcount
        if not gone:
            raise _not_found(name)

    def set_paused(self, name: str, paused: bool, now: float) -> ScheduleRecord:
        """Pause or resume. A resumed schedule's missed ticks follow its catch_up.

        Raises:
            errors.ScheduleNotFound
        """
        with translate_errors():
            row = self.conn.execute(
                "UPDATE schedules SET paused = ?1, updated_at = ?2 WHERE name = ?3"
                f" RETURNING {_COLUMNS}",
                (int(paused), now, name),
            ).fetchone()
        if row is None:
            raise _not_found(name)
        return _record(row)

    def run_now(self, name: str, now: float, defaults: Defaults) -> tuple[str, Changes]:
        """Make one job of the schedule now, outside its ticks (its next tick stays).

        Returns:
            the job's id, and the changes.

        Raises:
            errors.ScheduleNotFound
        """
        with translate_errors():
            row = self._row(name)
            suffix = crockford26(int.from_bytes(os.urandom(8)))[-8:]
            job_id = f"{schedules.job_id(name, now)}.run.{suffix}"
            changes = Changes()
            self._enqueue(row, job_id, now, now=now, defaults=defaults, changes=changes)
            self.conn.execute(
                "UPDATE schedules SET last_run_at = ?1, last_job_id = ?2"
                " WHERE name = ?3",
                (now, job_id, name),
            )
        return job_id, changes

    def _enqueue(
        self,
        row: tuple[Any, ...],
        job_id: str,
        fire_time: float,
        *,
        now: float,
        defaults: Defaults,
        changes: Changes,
    ) -> None:
        """Store the job for one tick through the jobs' own enqueue.

        Raises:
            errors.DuplicateId: the tick's job exists: it was fired before.
        """
        args, kwargs, headers = _decode_payload(row[6])
        headers = {**headers, SCHEDULE_HEADER: row[0], FIRE_TIME_HEADER: fire_time}
        spec = JobSpec(
            id=job_id,
            task=row[1],
            args=args,
            kwargs=kwargs,
            headers=headers,
            priority=row[7],
        )
        self.writes.enqueue(row[2], [spec], defaults=defaults, now=now, changes=changes)

    def fire_due(self, now: float, defaults: Defaults) -> Fired:
        """Fire every running schedule whose next tick has come (up to FIRE_BATCH),
        and move each one's next tick past `now`."""
        out = Fired()
        with translate_errors():
            rows = self.conn.execute(
                f"SELECT {_COLUMNS} FROM schedules WHERE paused = 0"
                " AND next_run_at <= ? ORDER BY next_run_at LIMIT ?",
                (now, FIRE_BATCH + 1),
            ).fetchall()
            out.more = len(rows) > FIRE_BATCH
            updates: list[tuple[Any, ...]] = []
            for row in rows[:FIRE_BATCH]:
                updates.append(self._fire(tuple(row), out, now=now, defaults=defaults))
            self.conn.executemany(
                "UPDATE schedules SET next_run_at = ?1,"
                " last_run_at = coalesce(?2, last_run_at),"
                " last_job_id = coalesce(?3, last_job_id) WHERE name = ?4",
                updates,
            )
            due = self.conn.execute(
                "SELECT min(next_run_at) FROM schedules WHERE paused = 0"
            ).fetchone()[0]
        out.next_due = None if due is None else float(due)
        return out

    def _fire(
        self, row: tuple[Any, ...], out: Fired, *, now: float, defaults: Defaults
    ) -> tuple[Any, ...]:
        """Fire one due schedule's ticks; returns its UPDATE's parameters."""
        name = row[0]
        catch_up: CatchUp = row[8]
        plan = schedules.due(_timing(row), row[10], row[11], catch_up, now)
        last: tuple[float | None, str | None] = (None, None)
        for tick in plan.ticks:
            job_id = schedules.job_id(name, tick)
            try:
                self._enqueue(
                    row, job_id, tick, now=now, defaults=defaults, changes=out.changes
                )
            except errors.DuplicateId:
                out.repeats += 1
                log.warning("schedule.tick_repeated", schedule=name, fire_time=tick)
                continue
            except (errors.DiskFull, errors.InternalError):
                raise
            except errors.QBrokerError as exc:  # a payload stored before a rule came
                log.error("schedule.fire_failed", schedule=name, error=exc.message)
                continue
            out.fired += 1
            last = (tick, job_id)
        if plan.skipped:
            out.skipped += plan.skipped
            log.warning(
                "schedule.ticks_skipped", schedule=name, catch_up=catch_up,
                skipped=plan.skipped, at_least=plan.estimated,
            )  # fmt: skip
        return (plan.next_run_at, last[0], last[1], name)


class ScheduleReads:
    """The read side, on the store's reader pool (reads.py). Thread-safe."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def _all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with translate_errors(), self.reader._conn() as conn:
            return [tuple(r) for r in conn.execute(sql, params).fetchall()]

    def get(self, name: str) -> ScheduleRecord:
        """Raises: errors.ScheduleNotFound."""
        rows = self._all(f"SELECT {_COLUMNS} FROM schedules WHERE name = ?", (name,))
        if not rows:
            raise _not_found(name)
        return _record(rows[0])

    def all(self) -> list[ScheduleRecord]:
        """Every schedule, by name."""
        rows = self._all(f"SELECT {_COLUMNS} FROM schedules ORDER BY name", ())
        return [_record(r) for r in rows]

    def jobs(self, name: str, limit: int) -> list[JobRecord]:
        """The jobs of schedule `name` still stored, newest first: a range of the
        jobs' id index (their ids start with the schedule's prefix)."""
        start = schedules.job_id_prefix(name)
        end = start[:-1] + chr(ord(start[-1]) + 1)
        ids = [
            r[0]
            for r in self._all(
                "SELECT id FROM jobs WHERE id > ? AND id < ? ORDER BY id DESC LIMIT ?",
                (start, end, limit),
            )
        ]
        records = self.reader.get_jobs(ids)
        return [
            r
            for i in ids
            if (r := records.get(i)) is not None
            and r.headers.get(SCHEDULE_HEADER) == name
        ]
