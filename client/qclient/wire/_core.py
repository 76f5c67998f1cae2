"""The wire's core: names, the job's shapes as producers and workers send and read
them, the job record, errors, and job ids. See the package docstring."""

from __future__ import annotations

import enum
import os
import time
from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "CROCKFORD",
    "FINAL_STATES",
    "MAX_ATTEMPT_ERROR",
    "MAX_ATTEMPT_ERRORS",
    "MAX_BATCH",
    "MAX_LEASE_SECONDS",
    "MAX_PROGRESS_NOTE",
    "MAX_RESULTS",
    "MAX_SECONDS",
    "MIN_LEASE_SECONDS",
    "NAME_PATTERN",
    "AckItem",
    "AckManyRequest",
    "AckReply",
    "AckRequest",
    "AttemptError",
    "BatchReply",
    "BatchResult",
    "CancelReply",
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
    "crockford26",
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
Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
MAX_PROGRESS_NOTE = 1000  #: characters a progress note may have
ProgressNote = Annotated[str, msgspec.Meta(max_length=MAX_PROGRESS_NOTE)]


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
    #: a limit key of its own besides `queue:<queue>` and `task:<task>` (`customer:42`)
    limit_key: Name | None = None


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
    progress: Fraction | None = (
        None  #: how far the run has got, 0 .. 1; null: unchanged
    )
    progress_note: ProgressNote | None = None  #: a short text for people


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
    limit_key: str | None = None
    progress: float | None = None  #: 0 .. 1, as the task last reported it
    progress_note: str | None = None
    #: why a queued job is not leased yet: "paused" (its queue is) or "limit KEY"
    waiting_on: str | None = None
    #: every failed attempt's error summary, oldest first (`error` is the last)
    errors: list[AttemptError] = []


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
    paused: bool = False  #: the queue leases nothing (it still takes jobs)


class QueueList(_Struct, frozen=True):
    queues: list[QueueStats]


class Health(_Struct, frozen=True):
    status: str
    version: str


# ---------------------------------------------------------------- job records


class AttemptError(_Struct, frozen=True):
    """One failed attempt of a job, as `JobRecord.errors` keeps it."""

    attempt: int  #: 1 for the first delivery
    error: str  #: "Type: message", cut to MAX_ATTEMPT_ERROR characters
    at: float  #: unix seconds


MAX_ATTEMPT_ERROR = 500  #: characters of each attempt's error a record keeps
MAX_ATTEMPT_ERRORS = 50  #: attempts' errors a record keeps (the first and the latest)


class ErrorBody(_Struct, frozen=True):
    """Every 4xx/5xx body."""

    error: str  #: machine-readable reason, e.g. "invalid_field"
    message: str
    field: str | None = None
    roles: list[str] | None = None  #: for 403 `forbidden`: the roles that may
    state: JobState | None = None  #: for 409 `invalid_state`: the job's state


#: Crockford's base32 (the ULID alphabet): its order is ASCII order, so ids sort as
#: their bits do.
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of Crockford characters, indexed by the 10 bits they spell: an id is 13
#: table lookups (with base64.b32encode, a pure-Python loop, an id took 1.5x as long).
_PAIRS = [a + b for a in CROCKFORD for b in CROCKFORD]


def new_job_id(now: float | None = None) -> str:
    """A new 26-character, time-sortable job id (ULID layout).

    48 bits of unix milliseconds then 80 random bits, in Crockford base32, so ids sort
    by creation time and two makers never pick the same one. Choosing the id in the
    client, not the broker, is what makes an enqueue safe to retry.

    Args:
        now: unix seconds to stamp; default: the wall clock.
    """
    ms = time.time_ns() // 1_000_000 if now is None else int(now * 1000)
    return crockford26((ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10)))


def new_job_ids(n: int, now: float | None = None) -> list[str]:
    """`n` new job ids for one batch, in the order they sort.

    One clock reading and one 80-bit random draw, then counting up from it (ULID's
    monotonic form): only the last two characters change between neighbours, so an id
    costs one string concatenation, not an encoding. A carry out of the random bits
    moves the stamp on by a millisecond, which keeps the ids unique and in order.

    Args:
        n: how many.
        now: unix seconds to stamp; default: the wall clock.
    """
    ms = time.time_ns() // 1_000_000 if now is None else int(now * 1000)
    v = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10))
    ids: list[str] = []
    while len(ids) < n:
        head = crockford26(v)[:24]
        low = v & 1023
        take = min(n - len(ids), 1024 - low)
        ids.extend([head + pair for pair in _PAIRS[low : low + take]])
        v += take
    return ids


def crockford26(v: int) -> str:
    """A 128-bit number as 26 Crockford base32 characters, most significant first
    (130 bits with two leading zeros: 13 groups of 10 bits, 2 characters each)."""
    p = _PAIRS
    return "".join(
        (
            p[v >> 120],
            p[v >> 110 & 1023],
            p[v >> 100 & 1023],
            p[v >> 90 & 1023],
            p[v >> 80 & 1023],
            p[v >> 70 & 1023],
            p[v >> 60 & 1023],
            p[v >> 50 & 1023],
            p[v >> 40 & 1023],
            p[v >> 30 & 1023],
            p[v >> 20 & 1023],
            p[v >> 10 & 1023],
            p[v & 1023],
        )
    )
