"""Job control's shapes: pause, purge, limits, the job listing, retry, delete, the
workers' cancel long-poll (protocol.md, section 12)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from qclient.wire._core import (
    MAX_BATCH,
    MAX_SECONDS,
    JobRecord,
    JobState,
    Name,
    _Struct,
)

__all__ = [
    "PURGEABLE_STATES",
    "CancelsReply",
    "CancelsRequest",
    "DeleteReply",
    "JobList",
    "LimitDeleted",
    "LimitList",
    "LimitRecord",
    "LimitSpec",
    "PauseReply",
    "PurgeReply",
    "PurgeRequest",
    "RateSpec",
    "RetryManyReply",
    "RetryReply",
]


# ---------------------------------------------------------------- job control


class PauseReply(_Struct, frozen=True):
    """`POST /v1/queues/{queue}/pause` and `/resume`."""

    queue: str
    paused: bool


#: States a purge may delete: never `active` (a worker holds it).
PURGEABLE_STATES = frozenset(s for s in JobState if s is not JobState.ACTIVE)


class PurgeRequest(_Struct, frozen=True):
    """`POST /v1/queues/{queue}/purge`: delete the queue's jobs in these states."""

    states: Annotated[list[JobState], msgspec.Meta(min_length=1, max_length=8)] = (
        msgspec.field(default_factory=lambda: [JobState.QUEUED, JobState.SCHEDULED])
    )


class PurgeReply(_Struct, frozen=True):
    deleted: int


class RateSpec(_Struct, frozen=True):
    """At most `limit` starts per `per` seconds, `burst` more of them at once."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
    per: Annotated[float, msgspec.Meta(gt=0, le=MAX_SECONDS)] = 1.0
    burst: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0


class LimitSpec(_Struct, frozen=True):
    """`PUT /v1/limits/{key}`: a concurrency, a rate (a RateSpec or a string such as
    "10/m"), or both."""

    concurrency: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    rate: RateSpec | Annotated[str, msgspec.Meta(max_length=50)] | None = None


class LimitRecord(_Struct, frozen=True):
    """A stored limit, as `GET /v1/limits` lists it."""

    key: str
    concurrency: int | None
    rate: RateSpec | None
    active: int  #: the key's jobs active now (leases not lapsed)
    updated_at: float  #: unix seconds


class LimitList(_Struct, frozen=True):
    limits: list[LimitRecord]


class LimitDeleted(_Struct, frozen=True):
    """`DELETE /v1/limits/{key}`."""

    key: str
    deleted: bool


class JobList(_Struct, frozen=True):
    """`GET /v1/jobs`: a page of jobs, newest first."""

    jobs: list[JobRecord]
    #: pass as `cursor` for the next page; null: no more. A page may hold fewer than
    #: `limit` jobs (even none) while `next` is not null: each page scans a bounded
    #: number of jobs.
    next: str | None = None


class RetryReply(_Struct, frozen=True):
    """`POST /v1/jobs/{id}/retry`."""

    id: str
    state: JobState


class RetryManyReply(_Struct, frozen=True):
    """`POST /v1/jobs/retry`: how many jobs went back to `queued`."""

    retried: int


class DeleteReply(_Struct, frozen=True):
    """`DELETE /v1/jobs/{id}`."""

    id: str
    deleted: bool


class CancelsRequest(_Struct, frozen=True):
    """`POST /v1/cancels`: a worker waits to hear that jobs it runs were cancelled."""

    worker: Annotated[str, msgspec.Meta(max_length=200)] = ""
    jobs: Annotated[list[Name], msgspec.Meta(max_length=MAX_BATCH)] = msgspec.field(
        default_factory=list
    )
    wait: Annotated[float, msgspec.Meta(ge=0, le=300)] = 0.0  #: long-poll seconds


class CancelsReply(_Struct, frozen=True):
    cancelled: list[str]  #: ids of the asked jobs (or the worker's) now cancelled
