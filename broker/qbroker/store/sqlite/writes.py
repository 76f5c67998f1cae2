"""The write side: every statement that changes a job or a queue row.

Charter:
  Rule 1: used by the writer thread only (writer.py), never concurrently; not thread-safe.
  Rule 2: every public method is one atomic unit and never commits: the writer runs
          each in its own SAVEPOINT and commits many together (group commit).
  Rule 3: every state change a method makes is reported as a Transition.

Theory of operation: a job row moves between states with single UPDATE statements whose
WHERE clause checks the state and lease token it expects; a row count of 0 means the
caller's view is stale (409) or the job does not exist (404). Partial indexes keep each
state's hot path (ready jobs, due delays, expiring leases) small and O(log n). Workers'
reports (ack, fail, extend, release) are in reports.py.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from qclient.wire import (
    FINAL_STATES,
    AckItem,
    FailItem,
    JobSpec,
    JobState,
    LeasedJob,
    LeaseRequest,
    new_job_ids,
)

from qbroker import errors
from qbroker.ids import new_lease_prefix, request_prefix
from qbroker.store.interface import (
    LEASED_AT_STEP,
    NOTHING_LEASED,
    Cancelled,
    Changes,
    Defaults,
    Enqueued,
    Leased,
    Settled,
)
from qbroker.store.sqlite.control import Control
from qbroker.store.sqlite.reports import Reports
from qbroker.store.sqlite.rows import LEASED_COLUMNS, leased_job, pack_payload
from qbroker.store.sqlite.schema import translate_error, translate_errors

_SCHEDULED, _QUEUED, _ACTIVE = JobState.SCHEDULED, JobState.QUEUED, JobState.ACTIVE
_CANCELLED = JobState.CANCELLED

_INSERT_COLUMNS = (
    "id, queue, task, state, priority, payload, max_retries, timeout, result_ttl,"
    " dedup_key, created_at, available_at, expires_at, limit_key"
)
_ROW_PARAMS = _INSERT_COLUMNS.count(",") + 1
#: rows per INSERT statement: a batch is split into these sizes (100 = 64 + 32 + 4), so
#: a handful of prepared statements serve every batch size
INSERT_CHUNKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)


@functools.cache
def _insert_sql(rows: int) -> str:
    row = "(" + ",".join("?" * _ROW_PARAMS) + ")"
    return f"INSERT INTO jobs ({_INSERT_COLUMNS}) VALUES " + ",".join([row] * rows)


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


class Writes(Reports, Control):
    """The write connection's statements; see the module charter."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        Reports.__init__(self, conn)
        Control.__init__(self)
        #: queues whose row is known to exist, and when this process last wrote each
        #: one's last_leased_at: both spare a statement per request. Only what a commit
        #: made durable may be here, so the writer calls `rolled_back` after any rollback.
        self._known: set[str] = set()
        self._leased_at: dict[str, float] = {}

    def rolled_back(self) -> None:
        """Forget what may not have been committed (see __init__)."""
        self._known.clear()
        self._leased_at.clear()
        self.forget_control()

    # ------------------------------------------------------------ units

    def enqueue_and_hand_off(
        self,
        queue: str,
        specs: Sequence[JobSpec],
        leases: Sequence[LeaseRequest],
        defaults: Defaults,
        now: float,
    ) -> Enqueued:
        changes = Changes()
        ids = self.enqueue(queue, specs, defaults=defaults, now=now, changes=changes)
        leased = [
            self.lease_for(r, resend=False, now=now, changes=changes) for r in leases
        ]
        return Enqueued(ids, leased, changes)

    def settle_and_lease(
        self,
        acks: Sequence[AckItem],
        fails: Sequence[FailItem],
        request: LeaseRequest | None,
        resend: bool,
        watched: Sequence[str],
        now: float,
    ) -> Settled:
        changes = Changes()
        results = self.ack_many(acks, now=now, changes=changes) if acks else []
        if fails:
            results += self.fail_many(fails, now=now, changes=changes)
        leased = NOTHING_LEASED
        if request is not None:
            leased = self.lease_for(request, resend=resend, now=now, changes=changes)
        if watched and changes.transitions:
            changes.records = self.final_records(watched)
        return Settled(results, leased, changes)

    # ------------------------------------------------------------ producer

    def enqueue(
        self,
        queue: str,
        specs: Sequence[JobSpec],
        *,
        defaults: Defaults,
        now: float,
        changes: Changes,
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
        made = changes.transitions
        due = changes.due
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
            expires_at = None if spec.expires is None else now + spec.expires
            if available > now:
                state, name = _SCHEDULED, "scheduled"
                if available < due:
                    due = available
            else:
                state, name = _QUEUED, "queued"
            if expires_at is not None and expires_at < due:
                due = expires_at
            params += (
                job_id,
                queue,
                spec.task or queue,
                name,  # a plain str: sqlite3 binds a str subclass the slow way
                spec.priority,
                pack_payload(spec),
                defaults.max_retries if spec.max_retries is None else spec.max_retries,
                spec.timeout or lease_seconds,
                defaults.result_ttl if spec.result_ttl is None else spec.result_ttl,
                spec.dedup_key,
                now,
                available,
                expires_at,
                spec.limit_key,
            )
            ids.append(job_id)
            made.append((job_id, queue, None, state))
        try:
            if queue not in self._known:
                self.conn.execute(
                    "INSERT OR IGNORE INTO queues (name) VALUES (?)", (queue,)
                )
                self._known.add(queue)
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
        changes.due = due
        return ids

    def cancel(self, job_id: str, watched: Sequence[str], now: float) -> Cancelled:
        """Cancel an unfinished job; a finished one is left alone.

        Raises:
            errors.JobNotFound
        """
        changes = Changes()
        with translate_errors():
            row = self.conn.execute(
                "SELECT state, queue FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise errors.JobNotFound(f"no job {job_id}")
            state, queue = JobState(row[0]), row[1]
            if state not in FINAL_STATES:
                self.conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?1,"
                    " purge_at = ?1 + result_ttl WHERE id = ?2",
                    (now, job_id),
                )
                changes.transitions.append((job_id, queue, state, _CANCELLED))
                if watched:
                    changes.records = self.final_records(watched)
                state = _CANCELLED
        return Cancelled(state, changes)

    # ------------------------------------------------------------ worker

    def lease_for(
        self, request: LeaseRequest, *, resend: bool, now: float, changes: Changes
    ) -> Leased:
        """Lease what `request` asks for, and tell whether more was ready than it got;
        note that a worker asked for its queues. With `resend`, first give back what
        the request leased before, if its jobs are still active."""
        queues = request.queues
        self._note_lease(queues, now)
        if resend and request.request_id is not None:
            again = self.leased_by(request.request_id, queues, now=now)
            if again:
                return Leased(again, again=True)
        self.held_until = None
        jobs = self.lease(
            queues,
            max_jobs=request.max,
            lease_seconds=request.timeout,
            worker=request.worker,
            now=now,
            request_id=request.request_id,
            changes=changes,
        )
        full = len(jobs) >= request.max
        more = full and self.more_ready(queues, now=now)
        return Leased(jobs, more, held=None if jobs else self.held_until)

    def _note_lease(self, queues: Sequence[str], now: float) -> None:
        """Record that a lease request named `queues` (making their rows if new)."""
        # a busy queue's lease requests write it once per LEASED_AT_STEP, not each time
        seen = self._leased_at
        for queue in queues:
            last = seen.get(queue)
            if last is None or now - last >= LEASED_AT_STEP:
                with translate_errors():
                    self.conn.execute(
                        "INSERT INTO queues (name, last_leased_at) VALUES (?1, ?2)"
                        " ON CONFLICT (name) DO UPDATE SET last_leased_at = ?2",
                        (queue, now),
                    )
                seen[queue] = now
                self._known.add(queue)

    def lease(
        self,
        queues: Sequence[str],
        *,
        max_jobs: int,
        lease_seconds: float | None,
        worker: str,
        now: float,
        request_id: str | None = None,
        changes: Changes,
    ) -> list[LeasedJob]:
        """Lease up to `max_jobs` ready jobs, trying `queues` in order.

        Each job's attempt count goes up by one; its lease token is a random prefix
        shared by this call plus the job's row number, so it is unique per delivery.
        With `request_id` the tokens start with it, for `leased_by`.
        """
        prefix = new_lease_prefix(request_id)
        out: list[LeasedJob] = []
        paused = self.paused_queues()
        with translate_errors():
            for queue in queues:
                want = max_jobs - len(out)
                if want <= 0:
                    break
                if paused and queue in paused:
                    continue
                if self.limited(queue):
                    params = (prefix, lease_seconds, now, worker)
                    out += self.lease_limited(queue, want, params)
                    continue
                rows = self.conn.execute(
                    "UPDATE jobs SET state = 'active', attempts = attempts + 1,"
                    " lease = ?1 || seq, lease_seconds = coalesce(?2, timeout),"
                    " lease_expires_at = ?3 + coalesce(?2, timeout), started_at = ?3,"
                    " worker = ?4, progress = NULL, progress_note = NULL"
                    " WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued'"
                    "   AND queue = ?5 AND (expires_at IS NULL OR expires_at > ?3)"
                    "   ORDER BY priority DESC, available_at, seq LIMIT ?6)"
                    f" RETURNING {LEASED_COLUMNS}",
                    (prefix, lease_seconds, now, worker, queue, want),
                ).fetchall()
                # RETURNING order is unspecified (sqlite.org/lang_returning.html)
                rows.sort(key=lambda r: (-r[0], r[1], r[2]))
                out += (leased_job(r, queue) for r in rows)
        if out:
            made = changes.transitions
            due = changes.due
            for job in out:
                made.append((job.id, job.queue, _QUEUED, _ACTIVE))
                if job.lease_expires_at < due:
                    due = job.lease_expires_at
            changes.due = due
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
                f"SELECT {LEASED_COLUMNS}, queue FROM jobs WHERE state = 'active'"
                " AND lease_expires_at > ?1 AND lease >= ?2 AND lease < ?3",
                (now, start, end),
            ).fetchall()
        order: dict[str, int] = {}
        for i, q in enumerate(queues):
            order.setdefault(q, i)  # a queue named twice gave its jobs the first time
        rows.sort(key=lambda r: (order.get(r[11], len(order)), -r[0], r[1], r[2]))
        return [leased_job(r, r[11]) for r in rows]

    def more_ready(self, queues: Sequence[str], *, now: float) -> bool:
        """Whether any of `queues` has a job ready to lease (after a full lease: so a
        worker knows to ask again at once rather than long-poll)."""
        paused = self.paused_queues()
        with translate_errors():
            for queue in queues:
                if queue in paused:
                    continue
                row = self.conn.execute(
                    "SELECT 1 FROM jobs WHERE state = 'queued' AND queue = ?1"
                    " AND (expires_at IS NULL OR expires_at > ?2) LIMIT 1",
                    (queue, now),
                ).fetchone()
                if row is not None:
                    return True
        return False
