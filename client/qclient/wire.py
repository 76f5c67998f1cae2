"""The protocol's one vocabulary: every request, reply and error body of qbroker v1.

The broker, the client and the worker all import their shapes from here, so the wire
has exactly one definition. This module needs msgspec only (no trio, no sqlite3).

Schema evolution rules (msgspec docs, "schema evolution"): new fields get defaults and
go last; a field never changes type; decoders never forbid unknown fields, so an old
client keeps working against a newer broker.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

from qclient._ids import (
    CROCKFORD as CROCKFORD,
    crockford26 as crockford26,
    new_job_id as new_job_id,
    new_job_ids as new_job_ids,
)

__all__ = [
    "FINAL_STATES",
    "FIRE_TIME_HEADER",
    "MAX_BATCH",
    "MAX_KEYS",
    "MAX_LEASE_SECONDS",
    "MAX_RESULTS",
    "MAX_SECONDS",
    "MIN_LEASE_SECONDS",
    "NAME_PATTERN",
    "SCHEDULE_HEADER",
    "AckItem",
    "AckManyRequest",
    "AckReply",
    "AckRequest",
    "BatchReply",
    "BatchResult",
    "CancelReply",
    "CountReply",
    "EnqueueManyReply",
    "EnqueueManyRequest",
    "EnqueueReply",
    "ErrorBody",
    "ExtendReply",
    "ExtendRequest",
    "FailItem",
    "FailManyRequest",
    "FailReply",
    "FailRequest",
    "Health",
    "JobRecord",
    "JobSpec",
    "JobState",
    "KVDeleteRequest",
    "KVExpireRequest",
    "KVGetReply",
    "KVGetRequest",
    "KVIncrReply",
    "KVIncrRequest",
    "KVItem",
    "KVSetRequest",
    "KVVersionReply",
    "LeaseReply",
    "LeaseRequest",
    "LeasedJob",
    "QueueList",
    "QueueStats",
    "ReleaseItem",
    "ReleaseManyRequest",
    "ReleaseReply",
    "ReleaseRequest",
    "ResultsReply",
    "ResultsRequest",
    "ScheduleDeleted",
    "ScheduleList",
    "ScheduleRecord",
    "ScheduleSpec",
    "ScheduledJobList",
    "WorkerBeat",
    "WorkerBeatReply",
    "WorkerInfo",
    "WorkerList",
    "WorkerState",
    "new_job_id",
    "new_job_ids",
]


class JobState(enum.StrEnum):
    """A job's state. The same words appear in SQL, JSON, metric labels and logs."""

    SCHEDULED = "scheduled"  #: waiting for its delay/eta or a retry backoff
    QUEUED = "queued"  #: ready to be leased
    ACTIVE = "active"  #: leased to one worker
    SUCCEEDED = "succeeded"  #: acked with a result
    FAILED = "failed"  #: failed with no retry asked for, or retries used up
    DEAD = "dead"  #: its leases expired more often than its attempts allow
    CANCELLED = "cancelled"  #: cancelled before it finished
    EXPIRED = "expired"  #: its `expires` time passed before a worker leased it


#: States a job never leaves.
FINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.DEAD,
        JobState.CANCELLED,
        JobState.EXPIRED,
    }
)

#: Queue names, task names, job ids and dedup keys: 1-200 characters of this set, but
#: not "." or ".." (proxies and curl resolve those in a path, RFC 3986 section 5.2.4).
NAME_PATTERN = r"^(?!\.\.?$)[A-Za-z0-9_.:@\-]{1,200}(?!\n)$"

#: Items one batch request (enqueue, ack, fail) may carry.
MAX_BATCH = 10_000
MAX_RESULTS = 1000  #: job ids one `POST /v1/results` may wait for

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
#: A lease request's own id, chosen by the client: 8-64 letters, digits, _ and -.
RequestId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{8,64}(?!\n)$")]
MAX_SECONDS = 10 * 365 * 86400.0  #: the longest delay, lease or retry_in: ten years
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
UnixTime = Annotated[float, msgspec.Meta(ge=0, le=32503680000.0)]  # up to year 3000
#: The shortest lease: a job's `timeout`, a lease's `timeout`, an extend's `timeout`.
#: Shorter leases ran out before an immediate ack could arrive (409, then dead jobs).
MIN_LEASE_SECONDS = 1.0
MAX_LEASE_SECONDS = 7 * 86400.0  #: the longest lease: a week
LeaseSeconds = Annotated[
    float, msgspec.Meta(ge=MIN_LEASE_SECONDS, le=MAX_LEASE_SECONDS)
]
Priority = Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000)]
Retries = Annotated[int, msgspec.Meta(ge=0, le=1000)]
Text = Annotated[str, msgspec.Meta(max_length=65536)]


class _Struct(msgspec.Struct, kw_only=True, frozen=True):
    pass


# ---------------------------------------------------------------- producer side


class JobSpec(_Struct, frozen=True):
    """One job as a producer submits it (`POST /v1/queues/{queue}/jobs`)."""

    id: Name | None = None  #: client-chosen id; a repeat of a stored id is 409
    task: Name | None = None  #: function name; defaults to the queue name
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    headers: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = 0  #: higher first; FIFO within one priority
    delay: Seconds | None = None  #: seconds from now until it may run
    eta: UnixTime | None = None  #: unix seconds when it may run (not with delay)
    expires: Seconds | None = None  #: seconds from now after which it is never leased
    max_retries: Retries | None = None  #: default: the broker's (3)
    timeout: LeaseSeconds | None = None  #: lease seconds; default: the broker's (30)
    result_ttl: Seconds | None = None  #: seconds a finished job is kept; default 7 days
    dedup_key: Name | None = None  #: at most one unfinished job per (queue, dedup_key)


class EnqueueManyRequest(_Struct, frozen=True):
    jobs: Annotated[list[JobSpec], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class EnqueueReply(_Struct, frozen=True):
    id: str


class EnqueueManyReply(_Struct, frozen=True):
    ids: list[str]


# ---------------------------------------------------------------- worker side


class LeasedJob(_Struct, frozen=True):
    id: str
    queue: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    lease: str  #: the token that ack/fail/extend/release must present
    attempt: int  #: 1 for the first delivery
    max_retries: int
    timeout: float  #: lease seconds granted
    lease_expires_at: float  #: unix seconds


class AckRequest(_Struct, frozen=True):
    lease: Annotated[str, msgspec.Meta(max_length=200)]
    result: Any = None


class AckReply(_Struct, frozen=True):
    """`POST /v1/jobs/{id}/ack`: `{}`."""


class AckItem(_Struct, frozen=True):
    id: Name
    lease: Annotated[str, msgspec.Meta(max_length=200)]
    result: Any = None


class AckManyRequest(_Struct, frozen=True):
    acks: Annotated[list[AckItem], msgspec.Meta(max_length=MAX_BATCH)]


class FailRequest(_Struct, frozen=True):
    lease: Annotated[str, msgspec.Meta(max_length=200)]
    error: Text = ""  #: "ExceptionType: message"
    traceback: Annotated[str, msgspec.Meta(max_length=262144)] | None = None
    retry_in: Seconds | None = None  #: seconds; null means no retry


class FailReply(_Struct, frozen=True):
    state: Literal["scheduled", "failed"]  #: scheduled: a retry is due


class FailItem(_Struct, frozen=True):
    id: Name
    lease: Annotated[str, msgspec.Meta(max_length=200)]
    error: Text = ""
    traceback: Annotated[str, msgspec.Meta(max_length=262144)] | None = None
    retry_in: Seconds | None = None


class FailManyRequest(_Struct, frozen=True):
    fails: Annotated[list[FailItem], msgspec.Meta(max_length=MAX_BATCH)]


class ExtendRequest(_Struct, frozen=True):
    lease: Annotated[str, msgspec.Meta(max_length=200)]
    timeout: LeaseSeconds | None = None  #: new lease seconds from now


class ExtendReply(_Struct, frozen=True):
    lease_expires_at: float
    cancelled: bool = False  #: the job was cancelled: stop working on it


class ReleaseRequest(_Struct, frozen=True):
    """Hand a leased job back unstarted; its attempt is not counted."""

    lease: Annotated[str, msgspec.Meta(max_length=200)]


class ReleaseReply(_Struct, frozen=True):
    """`POST /v1/jobs/{id}/release`: `{}`."""


class ReleaseItem(_Struct, frozen=True):
    id: Name
    lease: Annotated[str, msgspec.Meta(max_length=200)]


class ReleaseManyRequest(_Struct, frozen=True):
    releases: Annotated[list[ReleaseItem], msgspec.Meta(max_length=MAX_BATCH)]


class BatchResult(_Struct, frozen=True):
    id: str
    ok: bool
    error: str | None = None  #: the reason, as in ErrorBody.error


class BatchReply(_Struct, frozen=True):
    results: list[BatchResult]


class CancelReply(_Struct, frozen=True):
    id: str
    state: JobState


# ---------------------------------------------------------------- reading


class LeaseRequest(_Struct, frozen=True):
    """`POST /v1/lease`: ask for up to `max` ready jobs from `queues`, in order,
    after settling the jobs of `acks` and `fails` in the same commit."""

    queues: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=100)]
    max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    wait: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0  #: long-poll seconds
    timeout: LeaseSeconds | None = None  #: lease seconds; default: the job's own
    worker: Annotated[str, msgspec.Meta(max_length=200)] = ""
    acks: Annotated[list[AckItem], msgspec.Meta(max_length=MAX_BATCH)] = []
    fails: Annotated[list[FailItem], msgspec.Meta(max_length=MAX_BATCH)] = []
    #: unique per lease request, not per resend: makes a resend safe (protocol.md)
    request_id: RequestId | None = None
    resend: bool = False  #: a resend of the request with this `request_id`


class LeaseReply(_Struct, frozen=True):
    jobs: list[LeasedJob]
    results: list[BatchResult] = []  #: one per ack, then one per fail, in order
    #: the lease got `max` jobs and its queues had more ready: ask again at once
    more: bool = False


class JobRecord(_Struct, frozen=True):
    """`GET /v1/jobs/{id}`: a job's whole record."""

    id: str
    queue: str
    task: str
    state: JobState
    attempts: int
    max_retries: int
    priority: int
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    result: Any
    error: str | None
    traceback: str | None
    timeout: float
    created_at: float
    available_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    worker: str | None
    dedup_key: str | None = None


class ResultsRequest(_Struct, frozen=True):
    """`POST /v1/results`: wait for many jobs at once, until all are finished."""

    ids: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_RESULTS)]
    wait: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0  #: long-poll seconds


class ResultsReply(_Struct, frozen=True):
    #: one per distinct asked id not `omitted`, in the order first asked; null: no job
    jobs: list[JobRecord | None]
    #: ids left out to keep the reply within its byte budget: ask again for them
    omitted: list[str] = []


class QueueStats(_Struct, frozen=True):
    queue: str
    counts: dict[str, int]  #: every state's count, zero included
    oldest_age: float | None  #: seconds since the oldest queued job became ready
    #: unix seconds when a lease request last named the queue, to within a second;
    #: null: no worker has asked for it
    last_leased_at: float | None = None


class QueueList(_Struct, frozen=True):
    queues: list[QueueStats]


class Health(_Struct, frozen=True):
    status: str
    version: str


# ---------------------------------------------------------------- schedules

#: The headers every job a schedule makes carries: the schedule's name, and the unix
#: seconds of the tick it was made for (a run-now job: the time it was asked for).
SCHEDULE_HEADER = "qbroker.schedule"
FIRE_TIME_HEADER = "qbroker.fire_time"

#: The ways a schedule makes up for ticks it missed (broker down, schedule paused).
CatchUp = Literal["latest", "all", "none"]


class ScheduleSpec(_Struct, frozen=True):
    """`PUT /v1/schedules/{name}`: a periodic task. Give `cron` or `every`, not both."""

    task: Name
    queue: Name | None = None  #: default: the task name
    cron: Annotated[str, msgspec.Meta(max_length=200)] | None = None  #: 5 fields
    #: seconds between ticks, 1 at least (more often is a queue's work, not a clock's)
    every: Annotated[float, msgspec.Meta(ge=1, le=MAX_SECONDS)] | None = None
    tz: Annotated[str, msgspec.Meta(max_length=100)] = "UTC"  #: IANA zone of `cron`
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    headers: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = 0
    catch_up: CatchUp = "latest"
    paused: bool | None = None  #: None: keep the stored schedule's (new: running)


class ScheduleRecord(_Struct, frozen=True):
    """`GET /v1/schedules/{name}`: a stored schedule and when it runs."""

    name: str
    task: str
    queue: str
    cron: str | None
    every: float | None
    tz: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    priority: int
    catch_up: CatchUp
    paused: bool
    next_run_at: float  #: unix seconds of the next tick (a paused one: when due)
    last_run_at: float | None  #: fire time of the last job made
    last_job_id: str | None
    words: str  #: e.g. "at 07:30 on Monday (Europe/Berlin)"
    created_at: float
    updated_at: float


class ScheduleDeleted(_Struct, frozen=True):
    """`DELETE /v1/schedules/{name}`: `{}`."""


class ScheduleList(_Struct, frozen=True):
    schedules: list[ScheduleRecord]


class ScheduledJobList(_Struct, frozen=True):
    """`GET /v1/jobs?schedule=NAME`: a schedule's jobs still stored, newest first."""

    jobs: list[JobRecord]


class ErrorBody(_Struct, frozen=True):
    """Every 4xx/5xx body."""

    error: str  #: machine-readable reason, e.g. "invalid_field"
    message: str
    field: str | None = None
    roles: list[str] | None = None  #: for 403 `forbidden`: the roles that may


# ---------------------------------------------------------------- workers


class WorkerBeat(_Struct, frozen=True):
    """`POST /v1/workers`: a worker registers (its first beat) and beats."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    host: Annotated[str, msgspec.Meta(max_length=255)] = ""
    pid: Annotated[int, msgspec.Meta(ge=0, le=2**32)] = 0
    queues: Annotated[list[Name], msgspec.Meta(max_length=100)] = []
    pool: Annotated[str, msgspec.Meta(max_length=50)] = ""
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    version: Annotated[str, msgspec.Meta(max_length=50)] = ""
    started_at: UnixTime | None = None  #: when the worker started
    #: seconds until its next beat; missing 3 of them makes it `lost`
    interval: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 10.0
    jobs: Annotated[list[Name], msgspec.Meta(max_length=MAX_BATCH)] = []  #: running now
    stopped: bool = False  #: its last beat: it stopped on purpose


class WorkerBeatReply(_Struct, frozen=True):
    """`POST /v1/workers`: `{}`."""


class WorkerState(enum.StrEnum):
    ALIVE = "alive"  #: beating
    LOST = "lost"  #: missed 3 beats: killed, hung, or cut off from the broker
    STOPPED = "stopped"  #: said goodbye


class WorkerInfo(_Struct, frozen=True):
    """One worker in `GET /v1/workers`: its last beat, and what the broker makes of it."""

    name: str
    state: WorkerState
    host: str
    pid: int
    queues: list[str]
    pool: str
    concurrency: int
    version: str
    started_at: float | None
    first_seen_at: float  #: unix seconds of its first beat
    last_beat_at: float  #: unix seconds of its last beat
    interval: float
    jobs: list[str]  #: the jobs it ran at its last beat


class WorkerList(_Struct, frozen=True):
    workers: list[WorkerInfo]  #: by name


# ---------------------------------------------------------------- key-value store
# Small values with a TTL kept in the broker: the Celery result backend's storage
# (qclient.celery). A key is a name (NAME_PATTERN); a value is any JSON/msgpack value.

MAX_KEYS = 1000  #: keys one `POST /v1/kv/get` or `/v1/kv/delete` may name
Ttl = Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)]


class KVGetRequest(_Struct, frozen=True):
    """`POST /v1/kv/get`: read keys; with `wait`, long-poll until one of them has a
    version other than the one given for it (0, the default: absent)."""

    keys: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_KEYS)]
    versions: Annotated[list[int], msgspec.Meta(max_length=MAX_KEYS)] | None = None
    wait: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0  #: long-poll seconds


class KVItem(_Struct, frozen=True):
    key: str
    value: Any = None  #: null when absent
    version: int = 0  #: grows with every write of any key; 0: absent


class KVGetReply(_Struct, frozen=True):
    items: list[KVItem]  #: one per asked key, in order


class KVSetRequest(_Struct, frozen=True):
    key: Name
    value: Any
    ttl: Ttl | None = None  #: seconds until the key is dropped; null: kept


class KVVersionReply(_Struct, frozen=True):
    version: int


class KVIncrRequest(_Struct, frozen=True):
    """Add `by` to an integer key (an absent key counts as 0), atomically."""

    key: Name
    by: Annotated[int, msgspec.Meta(ge=-(2**53), le=2**53)] = 1
    ttl: Ttl | None = None  #: as for set; null keeps the key's own expiry


class KVIncrReply(_Struct, frozen=True):
    value: int
    version: int


class KVExpireRequest(_Struct, frozen=True):
    key: Name
    ttl: Ttl | None = None  #: null: keep it until deleted


class KVDeleteRequest(_Struct, frozen=True):
    keys: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=MAX_KEYS)]


class CountReply(_Struct, frozen=True):
    """How many keys a write found (expire, delete) or jobs a purge cancelled."""

    count: int
