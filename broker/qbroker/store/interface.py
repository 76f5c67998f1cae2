"""The store's interface: the verbs every backend implements, and what they return.

Charter:
  Rule 1: only a backend (store/sqlite/) speaks its database's language; the rest of the
          broker sees these verbs and types, nothing else of the store.
  Rule 2: every verb is one atomic unit: all of it is durable once its awaitable
          returns, or none of it happened (it raised an errors.py error). Composite
          units (an enqueue that hands jobs to parked leases, a settle that leases the
          next jobs) are verbs of their own, never assembled by callers.
  Rule 3: `now` is always a parameter, never read by a backend, so tests control time.
  Rule 4: every write verb returns the transitions it made (`Changes`); what follows
          from them (metrics, wake-ups, later hooks) happens in transitions.py only.
  Rule 5: only errors.py errors leave a verb.

A second backend (PostgreSQL) implements `Store` and is tested by adding one entry to
tests/stores.py: the state machine of tests/test_properties.py drives every backend
through these verbs only.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from qclient.wire import (
    AckItem,
    BatchResult,
    FailItem,
    JobList,
    JobRecord,
    JobSpec,
    JobState,
    KVItem,
    LeasedJob,
    LeaseRequest,
    LimitRecord,
    QueueStats,
    RateSpec,
    ReleaseItem,
    ScheduleRecord,
    ScheduleSpec,
    WorkerBeat,
    WorkerInfo,
)

from qbroker.jobfilter import JobFilter

#: seconds a queue's last_leased_at may lag the last lease request that named it (a
#: backend need not write it at every lease)
LEASED_AT_STEP = 1.0


#: One job's change of state, as a verb made it: (job, queue, from_state, to_state).
#: from_state None: the job is new; to_state None: it was deleted (its result_ttl ran
#: out). A plain tuple, as a batch makes one per job.
Transition = tuple[str, str, JobState | None, JobState | None]


@dataclass(slots=True)
class Changes:
    """What a write verb changed, for transitions.py."""

    transitions: list[Transition] = field(default_factory=list)
    #: the earliest time something this verb made falls due (a delay, an expiry, a
    #: lease's end): the reaper must sweep by then
    due: float = math.inf
    #: the final records of the watched jobs this verb finished, read in its unit (a
    #: result long-poll answers with them and reads nothing)
    records: dict[str, JobRecord] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Defaults:
    """Per-job defaults applied at enqueue."""

    max_retries: int
    lease_seconds: float
    result_ttl: float


class Leased(NamedTuple):
    """What a lease got, and whether more was ready in its queues than it asked for."""

    jobs: list[LeasedJob]
    more: bool = False
    #: the jobs a resent request leased before (no transitions: reported back then)
    again: bool = False
    #: limits held ready jobs back: when a rate next allows a start (unix seconds), or
    #: math.inf (a concurrency: when a job of its key stops being active); None: none
    held: float | None = None


NOTHING_LEASED = Leased([])


@dataclass(slots=True)
class Enqueued:
    ids: list[str]  #: the jobs' ids, in order
    leased: list[Leased]  #: what each of the hand-off leases got, in order
    changes: Changes


@dataclass(slots=True)
class Settled:
    """What `settle_and_lease` did (`lease`'s too, with no results)."""

    results: list[BatchResult]  #: one per ack, then one per fail, in order
    leased: Leased  #: what the lease after the settling got (nothing if none asked)
    changes: Changes


@dataclass(slots=True)
class Failed:
    state: JobState  #: scheduled (a retry) or failed
    changes: Changes


@dataclass(slots=True)
class Extended:
    lease_expires_at: float
    cancelled: bool  #: the job was cancelled: its worker should stop
    changes: Changes


@dataclass(slots=True)
class Cancelled:
    state: JobState  #: the job's state after the call
    changes: Changes


@dataclass(slots=True)
class Released:
    results: list[BatchResult]
    changes: Changes


@dataclass(slots=True)
class Purged:
    deleted: int
    more: bool  #: a full batch: there may be more to delete
    changes: Changes


@dataclass(slots=True)
class Retried:
    retried: int
    next: int | None  #: the `before` of the next window; None: the table's end
    changes: Changes


@dataclass(slots=True)
class Swept:
    changes: Changes
    next_due: float | None  #: the earliest time something becomes due, if anything


@dataclass(slots=True)
class Fired:
    """What one `fire_schedules` did."""

    changes: Changes = field(default_factory=Changes)  #: the jobs it made
    fired: int = 0  #: ticks that made a job
    repeats: int = 0  #: ticks whose job already existed (fired before): none made
    skipped: int = 0  #: missed ticks not fired, by catch_up policy
    more: bool = False  #: more schedules were due than one unit takes
    next_due: float | None = None  #: the earliest next tick of a running schedule


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One row of the queues table."""

    name: str
    paused: bool  #: leases skip it (set_paused)
    last_leased_at: float | None  #: when a lease request last named it (None: never)


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job's whole stored row: its record and what only the store keeps."""

    record: JobRecord
    lease: str | None
    lease_seconds: float | None
    lease_expires_at: float | None
    purge_at: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything stored, for tests and offline inspection (O(jobs))."""

    jobs: list[JobRow]  #: in the order they were stored
    queues: list[QueueRow]  #: by name


class Store(Protocol):
    """The verbs. Each is atomic and takes `now`; see the module charter. Call them
    on the trio thread and await what they return (an `async def` implements one).

    Raises (every verb):
        errors.DiskFull: nothing of the verb was stored (a full disk or quota).
        errors.DatabaseGone: the store's file went away; nothing is stored any more.
        errors.InternalError: the store failed; nothing of the verb is known stored.
    """

    # ------------------------------------------------------------ producer

    def enqueue_and_hand_off(
        self,
        queue: str,
        specs: Sequence[JobSpec],
        leases: Sequence[LeaseRequest],
        *,
        defaults: Defaults,
        now: float,
    ) -> Awaitable[Enqueued]:
        """Store jobs, all or none, then lease ready ones for `leases` (parked lease
        long-polls, oldest first) in the same unit.

        The write is submitted when this is called, not when the result is awaited,
        so writes submitted in turn happen in turn (pipelined enqueues keep their order).

        Raises:
            errors.DiskLow: when called, if the store refuses new jobs for now.
            errors.DuplicateId, errors.DuplicateDedupKey: nothing is stored.
            errors.InvalidField: both delay and eta, or a value the store cannot keep.
        """
        ...

    def cancel(
        self, job_id: str, *, watched: Sequence[str], now: float
    ) -> Awaitable[Cancelled]:
        """Cancel an unfinished job; a finished one is left alone.

        Raises:
            errors.JobNotFound
        """
        ...

    # ------------------------------------------------------------ worker

    def lease(
        self, request: LeaseRequest, *, resend: bool, now: float
    ) -> Awaitable[Settled]:
        """Lease up to `request.max` ready jobs from its queues, in order; record that
        a worker asked for each queue. With `resend` (and a request_id), first give
        back the still-active jobs that request leased before, if any (`again`)."""
        ...

    def settle_and_lease(
        self,
        acks: Sequence[AckItem],
        fails: Sequence[FailItem],
        request: LeaseRequest | None,
        *,
        resend: bool,
        watched: Sequence[str],
        now: float,
    ) -> Awaitable[Settled]:
        """Ack and fail many jobs, each item on its own (a stale item fails only
        itself; a resent one is ok again and changes nothing), then lease for
        `request` as `lease` does, all in one unit."""
        ...

    def ack(
        self,
        job_id: str,
        lease: str,
        result: Any,
        *,
        watched: Sequence[str],
        now: float,
    ) -> Awaitable[Changes]:
        """Mark a leased job succeeded with its result. A resend of the ack that
        finished the job is ok and changes nothing.

        Raises:
            errors.StaleLease, errors.JobNotFound, errors.InvalidField
        """
        ...

    def fail(
        self,
        job_id: str,
        lease: str,
        *,
        error: str,
        traceback: str | None,
        retry_in: float | None,
        watched: Sequence[str],
        now: float,
    ) -> Awaitable[Failed]:
        """Record a failure; with `retry_in` and attempts left, schedule a retry.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        ...

    def extend(
        self,
        job_id: str,
        lease: str,
        *,
        lease_seconds: float | None,
        now: float,
        progress: float | None = None,
        progress_note: str | None = None,
    ) -> Awaitable[Extended]:
        """Renew a lease from now, keeping the run's progress when given. A cancelled
        job answers `cancelled`.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        ...

    def release(self, job_id: str, lease: str, *, now: float) -> Awaitable[Changes]:
        """Give a leased, unstarted job back; its attempt is not counted.

        Raises:
            errors.StaleLease, errors.JobNotFound
        """
        ...

    def release_many(
        self, items: Sequence[ReleaseItem], *, now: float
    ) -> Awaitable[Released]:
        """Release each item on its own; a stale item fails only itself."""
        ...

    # ------------------------------------------------------------ key-value store
    # Small values with a TTL (Celery's results). A key past its TTL reads as absent;
    # every write of a value gives its key a new version, greater than any before.

    def kv_get(self, keys: Sequence[str], *, now: float) -> Awaitable[list[KVItem]]:
        """One item per key, in order (version 0, value None: absent)."""
        ...

    def kv_set(
        self, key: str, value: Any, ttl: float | None, *, now: float
    ) -> Awaitable[int]:
        """Replace the key's value, kept `ttl` seconds (None: kept); its version."""
        ...

    def kv_incr(
        self, key: str, by: int, ttl: float | None, *, now: float
    ) -> Awaitable[tuple[int, int]]:
        """Add `by` to the integer under `key` (absent: 0); (value, version). A `ttl`
        sets its expiry, None keeps it. Raises: errors.InvalidField, not an integer."""
        ...

    def kv_expire(self, key: str, ttl: float | None, *, now: float) -> Awaitable[int]:
        """Set the key's expiry (None: never); 1 if it exists, else 0."""
        ...

    def kv_delete(self, keys: Sequence[str], *, now: float) -> Awaitable[int]:
        """Drop keys; how many existed."""
        ...

    # ------------------------------------------------------------ reaper

    def sweep(self, *, now: float) -> Awaitable[Swept]:
        """Promote due jobs, expire leases and jobs, delete finished jobs past their
        result_ttl; at most a batch of each, asking for the next sweep at once when
        more is due."""
        ...

    # ------------------------------------------------------------ schedules

    def put_schedule(
        self, name: str, spec: ScheduleSpec, *, now: float
    ) -> Awaitable[ScheduleRecord]:
        """Create or replace a schedule by name (idempotent); a same timing keeps
        its next tick, a new one starts from `now`; `spec.paused` None keeps it.

        Raises:
            errors.InvalidField: naming the field (nothing is stored).
        """
        ...

    def delete_schedule(self, name: str) -> Awaitable[None]:
        """Raises: errors.ScheduleNotFound. Its jobs stay."""
        ...

    def pause_schedule(
        self, name: str, paused: bool, *, now: float
    ) -> Awaitable[ScheduleRecord]:
        """Pause or resume; a resumed schedule's missed ticks follow its catch_up.

        Raises:
            errors.ScheduleNotFound
        """
        ...

    def run_schedule(
        self, name: str, *, defaults: Defaults, now: float
    ) -> Awaitable[tuple[str, Changes]]:
        """Make one job of the schedule now, outside its ticks; returns its id.

        Raises:
            errors.DiskLow: when called, as `enqueue_and_hand_off`.
            errors.ScheduleNotFound
        """
        ...

    def fire_schedules(self, *, defaults: Defaults, now: float) -> Awaitable[Fired]:
        """Make the jobs of every running schedule's due ticks (catch_up decides
        which), each under a key unique per (schedule, fire time), and move each
        one's next tick past `now`, in one unit: a tick never makes two jobs.

        Raises:
            errors.DiskLow: when called, as `enqueue_and_hand_off`.
        """
        ...

    def get_schedule(self, name: str) -> Awaitable[ScheduleRecord]:
        """Raises: errors.ScheduleNotFound."""
        ...

    def schedules(self) -> Awaitable[list[ScheduleRecord]]:
        """Every schedule, by name."""
        ...

    def schedule_jobs(self, name: str, limit: int) -> Awaitable[list[JobRecord]]:
        """The jobs schedule `name` made that are still stored, newest first."""
        ...

    # ------------------------------------------------------------ reads

    def get_job(self, job_id: str, *, now: float | None = None) -> Awaitable[JobRecord]:
        """With `now`, a queued job's record says what it waits on (`waiting_on`).

        Raises: errors.JobNotFound."""
        ...

    def get_jobs(self, job_ids: Sequence[str]) -> Awaitable[dict[str, JobRecord]]:
        """The records of those of `job_ids` that exist, by id."""
        ...

    def unfinished(self, job_ids: Sequence[str]) -> Awaitable[set[str]]:
        """Those of `job_ids` that exist and are not final (ids only: what a parked
        result long-poll holds)."""
        ...

    def queue_stats(self, queue: str, *, now: float) -> Awaitable[QueueStats]:
        """Counts by state (zeros included), the oldest ready job's age, and when a
        worker last asked for the queue."""
        ...

    def queues(self, *, now: float) -> Awaitable[list[QueueStats]]:
        """`queue_stats` of every queue row, by name."""
        ...

    def queues_holding(self, queues: Sequence[str]) -> Awaitable[set[str]]:
        """Those of `queues` that hold a job in any state."""
        ...

    # ------------------------------------------------------------ workers registry

    def beat_worker(self, beat: WorkerBeat, *, now: float) -> Awaitable[None]:
        """Register or refresh a worker from its beat; forget the workers silent for
        a day."""
        ...

    def workers(self, *, now: float) -> Awaitable[list[WorkerInfo]]:
        """Every worker heard from within a day, by name: its last beat, and
        `alive`, `lost` (3 intervals without a beat) or `stopped`."""
        ...

    def ping(self) -> Awaitable[None]:
        """Raises: what a verb would, if the store cannot serve (errors.DatabaseGone:
        its file was deleted under it)."""
        ...

    def snapshot(self) -> Awaitable[Snapshot]: ...

    # ------------------------------------------------------------ job control

    def set_paused(self, queue: str, paused: bool, *, now: float) -> Awaitable[None]:
        """Pause or resume a queue (its row is made if new). A paused queue leases
        nothing; `lease` skips it."""
        ...

    def purge(
        self, queue: str, states: Sequence[JobState], *, now: float
    ) -> Awaitable[Purged]:
        """Delete a batch of the queue's jobs in `states` (never `active`)."""
        ...

    def put_limit(
        self,
        key: str,
        *,
        concurrency: int | None,
        rate: RateSpec | None,
        now: float,
    ) -> Awaitable[LimitRecord]:
        """Create or replace the limit of `key`; its rate's state is kept when the
        rate is unchanged."""
        ...

    def delete_limit(self, key: str, *, now: float) -> Awaitable[None]:
        """Raises: errors.LimitNotFound."""
        ...

    def limits(self, *, now: float) -> Awaitable[list[LimitRecord]]:
        """Every limit, by key, with the key's active jobs now."""
        ...

    def retry_job(self, job_id: str, *, now: float) -> Awaitable[Changes]:
        """Put a dead, failed, expired or cancelled job back to queued, its history
        kept.

        Raises:
            errors.JobNotFound, errors.InvalidState, errors.DuplicateDedupKey
        """
        ...

    def retry_jobs(self, where: JobFilter, *, now: float) -> Awaitable[Retried]:
        """`retry_job` on the jobs `where` matches, within one window of the table
        below `where.before` (jobfilter.SCAN_LIMIT rows); `Retried.next` says where
        the next call goes on."""
        ...

    def delete_job(self, job_id: str, *, now: float) -> Awaitable[Changes]:
        """Delete a finished job.

        Raises:
            errors.JobNotFound, errors.InvalidState
        """
        ...

    def list_jobs(self, where: JobFilter, *, now: float) -> Awaitable[JobList]:
        """A page of the jobs `where` matches, newest first, from one window of the
        table (jobfilter.SCAN_LIMIT rows) below `where.before`."""
        ...

    def cancelled_among(self, job_ids: Sequence[str]) -> Awaitable[list[str]]:
        """Those of `job_ids` that are cancelled."""
        ...

    # ------------------------------------------------------------ lifecycle

    async def maintain(self) -> None:
        """The backend's own background work (SQLite: WAL checkpoints), until
        cancelled. Raises, ending the server, if the store can no longer be used."""
        ...

    async def aclose(self) -> None:
        """Finish what was submitted, then close. The store is not used after."""
        ...
