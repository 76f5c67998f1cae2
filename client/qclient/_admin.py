"""Job control: the operations an operator or a dashboard calls, and the client
methods that run them.

Pausing a queue, purging it, global limits, finding jobs and putting them back, and
the two worker-side calls of live control (a cancel long-poll, a heartbeat's
progress). Sans-IO operations as in `_ops`, then two thin mixins, one driven by
`Client._run`, one by `AsyncClient._run`, so each call's rules exist once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NamedTuple, ParamSpec, TypeVar
from urllib.parse import quote, urlencode

import msgspec

from qclient._client import Op, Operation
from qclient._http import Codec, Decoders, path_name
from qclient._retry import Request
from qclient.rates import parse_rate
from qclient.wire import (
    CancelsReply,
    CancelsRequest,
    DeleteReply,
    JobList,
    JobRecord,
    JobState,
    LimitList,
    LimitRecord,
    LimitSpec,
    PauseReply,
    PurgeReply,
    PurgeRequest,
    RateSpec,
    RetryManyReply,
    RetryReply,
)

__all__ = ["AdminMethods", "AsyncAdminMethods", "JobProgress", "job_filters"]

T = TypeVar("T")
P = ParamSpec("P")

PAUSE_REPLY: Final[Decoders[PauseReply]] = Decoders(PauseReply)
PURGE_REPLY: Final[Decoders[PurgeReply]] = Decoders(PurgeReply)
LIMIT_RECORD: Final[Decoders[LimitRecord]] = Decoders(LimitRecord)
LIMIT_LIST: Final[Decoders[LimitList]] = Decoders(LimitList)
JOB_LIST: Final[Decoders[JobList]] = Decoders(JobList)
RETRY_REPLY: Final[Decoders[RetryReply]] = Decoders(RetryReply)
RETRY_MANY_REPLY: Final[Decoders[RetryManyReply]] = Decoders(RetryManyReply)
DELETE_REPLY: Final[Decoders[DeleteReply]] = Decoders(DeleteReply)
CANCELS_REPLY: Final[Decoders[CancelsReply]] = Decoders(CancelsReply)
_JOB_RECORD: Final[Decoders[JobRecord]] = Decoders(JobRecord)

_POST, _GET, _PUT, _DELETE = b"POST", b"GET", b"PUT", b"DELETE"


class JobProgress(NamedTuple):
    """How far a running job has got, as its task last reported it."""

    fraction: float  #: 0.0 .. 1.0
    note: str


def job_filters(
    state: str | JobState | None = None,
    queue: str | None = None,
    task: str | None = None,
    schedule: str | None = None,
    where: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The query parameters of a job listing or bulk retry.

    `where` filters on argument content: `{"kwargs.user_id": 42}`, `{"args.0": "x"}`;
    a value is sent as JSON, so 42 matches the number and "42" the string.
    """
    query: dict[str, str] = {}
    for name, value in (
        ("state", state),
        ("queue", queue),
        ("task", task),
        ("schedule", schedule),
    ):
        if value is not None:
            query[name] = str(value)
    for path, value in (where or {}).items():
        query[path] = msgspec.json.encode(value).decode()
    return query


def _query(params: Mapping[str, str]) -> str:
    return "?" + urlencode(params, quote_via=quote) if params else ""


def _limit_path(key: str) -> str:
    return f"/v1/limits/{path_name(key)}"


# ---------------------------------------------------------------- queues


def pause(codec: Codec, queue: str, paused: bool) -> Op[bool]:
    verb = "pause" if paused else "resume"
    response = yield Request(_POST, f"/v1/queues/{path_name(queue)}/{verb}")
    return codec.decode(response, PAUSE_REPLY).paused


def purge(codec: Codec, queue: str, states: Sequence[str]) -> Op[int]:
    body = codec.encode(PurgeRequest(states=[JobState(s) for s in states]))
    response = yield Request(_POST, f"/v1/queues/{path_name(queue)}/purge", body)
    return codec.decode(response, PURGE_REPLY).deleted


# ---------------------------------------------------------------- limits


def set_limit(
    codec: Codec,
    key: str,
    concurrency: int | None,
    rate: str | RateSpec | None,
    burst: int,
) -> Op[LimitRecord]:
    spec_rate: RateSpec | None = None
    if isinstance(rate, str):
        limit, per = parse_rate(rate)
        spec_rate = RateSpec(limit=limit, per=per, burst=burst)
    elif rate is not None:
        spec_rate = rate
    body = codec.encode(LimitSpec(concurrency=concurrency, rate=spec_rate))
    response = yield Request(_PUT, _limit_path(key), body)
    return codec.decode(response, LIMIT_RECORD)


def limits(codec: Codec) -> Op[list[LimitRecord]]:
    response = yield Request(_GET, "/v1/limits")
    return codec.decode(response, LIMIT_LIST).limits


def delete_limit(codec: Codec, key: str) -> Op[None]:
    response = yield Request(_DELETE, _limit_path(key))
    if not 200 <= response.status < 300:
        raise codec.error(response)


# ---------------------------------------------------------------- jobs


def list_jobs(
    codec: Codec, filters: Mapping[str, str], limit: int, cursor: str | None
) -> Op[JobList]:
    params = dict(filters)
    params["limit"] = str(limit)
    if cursor is not None:
        params["cursor"] = cursor
    response = yield Request(_GET, "/v1/jobs" + _query(params))
    return codec.decode(response, JOB_LIST)


def retry_job(codec: Codec, job_id: str) -> Op[JobState]:
    response = yield Request(_POST, f"/v1/jobs/{path_name(job_id)}/retry")
    return codec.decode(response, RETRY_REPLY).state


def retry_jobs(codec: Codec, filters: Mapping[str, str]) -> Op[int]:
    response = yield Request(_POST, "/v1/jobs/retry" + _query(filters))
    return codec.decode(response, RETRY_MANY_REPLY).retried


def delete_job(codec: Codec, job_id: str) -> Op[bool]:
    response = yield Request(_DELETE, f"/v1/jobs/{path_name(job_id)}")
    return codec.decode(response, DELETE_REPLY).deleted


def progress(codec: Codec, job_id: str) -> Op[JobProgress | None]:
    response = yield Request(_GET, f"/v1/jobs/{path_name(job_id)}")
    record = codec.decode(response, _JOB_RECORD)
    if record.progress is None:
        return None
    return JobProgress(record.progress, record.progress_note or "")


# ---------------------------------------------------------------- worker


def wait_cancels(
    codec: Codec, worker: str, job_ids: Sequence[str], wait: float
) -> Op[list[str]]:
    def build(wait: float) -> Request:
        body = codec.encode(
            CancelsRequest(worker=worker, jobs=list(job_ids), wait=wait)
        )
        return Request(_POST, "/v1/cancels", body, wait, build)

    response = yield build(wait)
    return codec.decode(response, CANCELS_REPLY).cancelled


# ---------------------------------------------------------------- methods


class AdminMethods:
    """`Client`'s job-control methods (mixed in)."""

    if TYPE_CHECKING:  # Client's own

        def _run(
            self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs
        ) -> T: ...

    def pause(self, queue: str) -> bool:
        """Pause a queue: it keeps taking jobs but leases none until resumed. A
        queue with no jobs yet may be paused. Returns True (paused)."""
        return self._run(pause, queue, True)

    def resume(self, queue: str) -> bool:
        """Resume a paused queue. Returns False (not paused)."""
        return self._run(pause, queue, False)

    def purge(self, queue: str, states: Sequence[str] = ("queued", "scheduled")) -> int:
        """Delete a queue's jobs in `states` (never `active` ones); returns how many.

        Raises:
            InvalidRequest: a state that is unknown or `active`.
        """
        return self._run(purge, queue, list(states))

    def set_limit(
        self,
        key: str,
        *,
        concurrency: int | None = None,
        rate: str | RateSpec | None = None,
        burst: int = 0,
    ) -> LimitRecord:
        """Create or replace the global limit of `key` (`queue:Q`, `task:T`, or any
        job's `limit_key`): at most `concurrency` of its jobs active at once, and/or
        `rate` starts ("10/s", "100/m", "1000/h" or a `RateSpec`), `burst` more at once.

        Raises:
            ValueError: an unknown rate string.
            InvalidRequest: neither given, or a value out of range (`.field`).
        """
        return self._run(set_limit, key, concurrency, rate, burst)

    def limits(self) -> list[LimitRecord]:
        """Every stored limit, by key, with its active jobs now."""
        return self._run(limits)

    def delete_limit(self, key: str) -> None:
        """Remove a limit. Raises: BrokerError (404 limit_not_found)."""
        self._run(delete_limit, key)

    def list_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        schedule: str | None = None,
        where: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobList:
        """One page of jobs, newest first; pass `.next` as `cursor` for the next.

        `where` filters on argument content (`{"kwargs.user_id": 42}`). A page may
        hold fewer than `limit` jobs while `.next` is set: keep following it.
        """
        filters = job_filters(state, queue, task, schedule, where)
        return self._run(list_jobs, filters, limit, cursor)

    def iter_jobs(self, **filters: Any) -> Iterator[JobRecord]:
        """Every job the filters of `list_jobs` match, newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(cursor=cursor, **filters)
            yield from page.jobs
            if page.next is None:
                return
            cursor = page.next

    def retry(self, job_id: str) -> JobState:
        """Put a dead, failed, expired or cancelled job back to `queued`, its
        attempts and errors kept. Raises: BrokerError 409 (queued or active)."""
        return self._run(retry_job, job_id)

    def retry_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        schedule: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        """Retry every finished, unsucceeded job the filters match; returns how many."""
        return self._run(retry_jobs, job_filters(state, queue, task, schedule, where))

    def delete_job(self, job_id: str) -> bool:
        """Delete a finished job. Raises: BrokerError 409 (not finished)."""
        return self._run(delete_job, job_id)

    def wait_cancels(
        self, worker: str, job_ids: Sequence[str], wait: float
    ) -> list[str]:
        """Long-poll until one of `job_ids`, or a job leased by `worker`, is
        cancelled; returns the cancelled ids (none after `wait` seconds)."""
        return self._run(wait_cancels, worker, job_ids, wait)


class AsyncAdminMethods:
    """`AsyncClient`'s job-control methods (mixed in): `AdminMethods` as coroutines."""

    if TYPE_CHECKING:  # AsyncClient's own

        async def _run(
            self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs
        ) -> T: ...

    async def pause(self, queue: str) -> bool:
        return await self._run(pause, queue, True)

    async def resume(self, queue: str) -> bool:
        return await self._run(pause, queue, False)

    async def purge(
        self, queue: str, states: Sequence[str] = ("queued", "scheduled")
    ) -> int:
        return await self._run(purge, queue, list(states))

    async def set_limit(
        self,
        key: str,
        *,
        concurrency: int | None = None,
        rate: str | RateSpec | None = None,
        burst: int = 0,
    ) -> LimitRecord:
        return await self._run(set_limit, key, concurrency, rate, burst)

    async def limits(self) -> list[LimitRecord]:
        return await self._run(limits)

    async def delete_limit(self, key: str) -> None:
        await self._run(delete_limit, key)

    async def list_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        schedule: str | None = None,
        where: Mapping[str, Any] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> JobList:
        filters = job_filters(state, queue, task, schedule, where)
        return await self._run(list_jobs, filters, limit, cursor)

    async def retry(self, job_id: str) -> JobState:
        return await self._run(retry_job, job_id)

    async def retry_jobs(
        self,
        *,
        state: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        schedule: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        filters = job_filters(state, queue, task, schedule, where)
        return await self._run(retry_jobs, filters)

    async def delete_job(self, job_id: str) -> bool:
        return await self._run(delete_job, job_id)
