"""The workers registry's shapes."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from qclient.wire._core import (
    MAX_BATCH,
    Name,
    UnixTime,
    _Struct,
)

__all__ = [
    "WorkerBeat",
    "WorkerBeatReply",
    "WorkerInfo",
    "WorkerList",
    "WorkerState",
]


# ---------------------------------------------------------------- workers


class WorkerBeat(_Struct, frozen=True):
    """`POST /v1/workers`: a worker registers (its first beat) and beats."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    host: Annotated[str, msgspec.Meta(max_length=255)] = ""
    pid: Annotated[int, msgspec.Meta(ge=0, le=2**32)] = 0
    queues: Annotated[list[Name], msgspec.Meta(max_length=100)] = msgspec.field(
        default_factory=list
    )
    pool: Annotated[str, msgspec.Meta(max_length=50)] = ""
    concurrency: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 0
    version: Annotated[str, msgspec.Meta(max_length=50)] = ""
    started_at: UnixTime | None = None  #: when the worker started
    #: seconds until its next beat; missing 3 of them makes it `lost`
    interval: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 10.0
    jobs: Annotated[list[Name], msgspec.Meta(max_length=MAX_BATCH)] = msgspec.field(
        default_factory=list
    )  #: running now
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
