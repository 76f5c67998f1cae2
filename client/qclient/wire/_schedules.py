"""The schedules' shapes (protocol.md, section 11)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from qclient.wire._core import (
    MAX_SECONDS,
    JobRecord,
    Name,
    Priority,
    _Struct,
)

__all__ = [
    "FIRE_TIME_HEADER",
    "SCHEDULE_HEADER",
    "CatchUp",
    "ScheduleDeleted",
    "ScheduleList",
    "ScheduleRecord",
    "ScheduleSpec",
    "ScheduledJobList",
]


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
