"""The write side's reports from workers: ack, fail, extend, release, one by one and
in batches. Used by the writer thread only, through `Writes` (writes.py), whose charter
holds here too.

Ack, fail and release keep the lease token, so a resend of one (its reply lost) is
recognised (`_resent`) and changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence
from typing import Any

import structlog
from qclient.wire import (
    FINAL_STATES,
    AckItem,
    BatchResult,
    FailItem,
    JobRecord,
    JobState,
    ReleaseItem,
)

from qbroker import errors
from qbroker.store.interface import Changes, Extended, Failed, Released
from qbroker.store.sqlite.rows import (
    RECORD_COLUMNS,
    append_error_sql,
    pack,
    record,
)
from qbroker.store.sqlite.schema import translate_errors

log = structlog.get_logger("qbroker.store")
_SCHEDULED, _QUEUED, _ACTIVE = JobState.SCHEDULED, JobState.QUEUED, JobState.ACTIVE
_SUCCEEDED, _FAILED = JobState.SUCCEEDED, JobState.FAILED
_FINAL_SQL = ",".join(f"'{s.value}'" for s in sorted(FINAL_STATES))
#: the states a job's own ack / fail / release leaves it in while it keeps that token
_ACKED = ("succeeded",)
_FAILED_TO = ("scheduled", "queued", "failed")
_RELEASED = ("queued",)
ACK_CHUNK = 1000  #: acks per UPDATE statement (3 bound parameters each)
_APPEND_ERROR = append_error_sql("?3", "?2")


class Reports:
    """Statements on the write connection `conn` for workers' reports."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def final_records(self, job_ids: Sequence[str]) -> dict[str, JobRecord]:
        """The records of those of `job_ids` in a final state, by id."""
        marks = ",".join("?" * len(job_ids))
        with translate_errors():
            rows = self.conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM jobs WHERE id IN ({marks})"
                f" AND state IN ({_FINAL_SQL})",
                list(job_ids),
            ).fetchall()
        return {r.id: r for r in map(record, rows)}

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

    def ack(
        self, job_id: str, lease: str, result: Any, watched: Sequence[str], now: float
    ) -> Changes:
        """Mark a leased job succeeded and store its result; a resend of the ack
        that finished the job changes nothing.

        Raises:
            errors.StaleLease: the lease expired, moved on, or the job was cancelled.
            errors.JobNotFound, errors.InvalidField
        """
        changes = Changes()
        packed = pack(result, "result")
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
                return changes
        changes.transitions.append((job_id, row[0], _ACTIVE, _SUCCEEDED))
        if watched:
            changes.records = self.final_records(watched)
        return changes

    def fail(
        self,
        job_id: str,
        lease: str,
        error: str,
        traceback: str | None,
        retry_in: float | None,
        watched: Sequence[str],
        now: float,
    ) -> Failed:
        """Record a failure; with `retry_in` and attempts left, schedule a retry; a
        resend of the fail that settled this delivery changes nothing.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        changes = Changes()
        state = self._fail(job_id, lease, error, traceback, retry_in, now, changes)
        if watched and state in FINAL_STATES and changes.transitions:
            changes.records = self.final_records(watched)
        return Failed(state, changes)

    def _fail(
        self,
        job_id: str,
        lease: str,
        error: str,
        traceback: str | None,
        retry_in: float | None,
        now: float,
        changes: Changes,
    ) -> JobState:
        retry = -1.0 if retry_in is None else retry_in
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET"
                " state = CASE WHEN ?1 >= 0 AND attempts - attempt_base <= max_retries"
                "   THEN 'scheduled' ELSE 'failed' END,"
                " available_at = CASE WHEN ?1 >= 0 THEN ?2 + ?1 ELSE available_at END,"
                " finished_at = CASE WHEN ?1 >= 0 AND attempts - attempt_base"
                "   <= max_retries THEN NULL ELSE ?2 END,"
                " purge_at = CASE WHEN ?1 >= 0 AND attempts - attempt_base"
                "   <= max_retries THEN NULL ELSE ?2 + result_ttl END,"
                f" error = ?3, errors = {_APPEND_ERROR},"
                " traceback = ?4, lease_expires_at = NULL"
                " WHERE id = ?5 AND lease = ?6 AND state = 'active'"
                " AND lease_expires_at > ?2 RETURNING queue, state, available_at",
                (retry, now, error, traceback, job_id, lease),
            ).fetchone()
            if row is None:
                state = self._resent(job_id, lease, _FAILED_TO)
                # a retry the reaper has since made due is still the fail's "scheduled"
                return _FAILED if state == "failed" else _SCHEDULED
        new = JobState(row[1])
        changes.transitions.append((job_id, row[0], _ACTIVE, new))
        if new is _SCHEDULED and row[2] < changes.due:
            changes.due = row[2]
        return new

    def ack_many(
        self, items: Sequence[AckItem], *, now: float, changes: Changes
    ) -> list[BatchResult]:
        """Ack each item on its own; a stale item fails only itself, a resent one is
        ok again.

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
                packed_of[it.id] = pack(it.result, "result")
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
        made = changes.transitions
        for it in items:
            if it.id in invalid:
                out.append(BatchResult(id=it.id, ok=False, error="invalid_field"))
            elif it.id in repeated:
                try:
                    one = self.ack(it.id, it.lease, it.result, (), now)
                except (
                    errors.StaleLease,
                    errors.JobNotFound,
                    errors.InvalidField,
                ) as exc:
                    out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
                else:
                    out.append(BatchResult(id=it.id, ok=True))
                    made += one.transitions
            elif it.id in done:
                made.append((it.id, done[it.id], _ACTIVE, _SUCCEEDED))
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
        self, items: Sequence[FailItem], *, now: float, changes: Changes
    ) -> list[BatchResult]:
        """Fail each item on its own; a stale item fails only itself."""
        out = []
        for it in items:
            try:
                self._fail(
                    it.id, it.lease, it.error, it.traceback, it.retry_in, now, changes
                )
            except (errors.StaleLease, errors.JobNotFound) as exc:
                out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
            else:
                out.append(BatchResult(id=it.id, ok=True))
        return out

    def extend(
        self,
        job_id: str,
        lease: str,
        lease_seconds: float | None,
        now: float,
        progress: float | None = None,
        progress_note: str | None = None,
    ) -> Extended:
        """Renew a lease from now (beanstalkd `touch`), and keep the run's progress
        when given. A cancelled job keeps its lease token so its worker can learn of
        the cancel here.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        with translate_errors():
            row = self.conn.execute(
                "UPDATE jobs SET lease_seconds = coalesce(?1, lease_seconds),"
                " lease_expires_at = ?2 + coalesce(?1, lease_seconds),"
                " progress = coalesce(?5, progress),"
                " progress_note = coalesce(?6, progress_note)"
                " WHERE id = ?3 AND lease = ?4 AND state = 'active'"
                " AND lease_expires_at > ?2 RETURNING lease_expires_at",
                (lease_seconds, now, job_id, lease, progress, progress_note),
            ).fetchone()
            if row is not None:
                expires = float(row[0])
                return Extended(expires, False, Changes(due=expires))
            row = self.conn.execute(
                "SELECT state FROM jobs WHERE id = ? AND lease = ?", (job_id, lease)
            ).fetchone()
            if row is not None and row[0] == "cancelled":
                return Extended(now, True, Changes())
            raise self._stale(job_id)

    def release(self, job_id: str, lease: str, now: float) -> Changes:
        """Give a leased, unstarted job back; its attempt is not counted. The job keeps
        the lease token until its next lease, so a resend of this release (its reply
        lost) is recognised and changes nothing.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        changes = Changes()
        self._release(job_id, lease, now, changes)
        return changes

    def _release(self, job_id: str, lease: str, now: float, changes: Changes) -> None:
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
                return
        changes.transitions.append((job_id, row[0], _ACTIVE, _QUEUED))

    def release_many(self, items: Sequence[ReleaseItem], now: float) -> Released:
        """Release each item on its own; a stale item fails only itself."""
        changes = Changes()
        out: list[BatchResult] = []
        for it in items:
            try:
                self._release(it.id, it.lease, now, changes)
            except (errors.StaleLease, errors.JobNotFound) as exc:
                out.append(BatchResult(id=it.id, ok=False, error=exc.reason))
            else:
                out.append(BatchResult(id=it.id, ok=True))
        return Released(out, changes)
