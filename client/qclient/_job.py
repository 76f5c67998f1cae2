"""Job handles and the pure pieces both clients share: ids, job specs, outcomes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from qclient._errors import (
    JobCancelled,
    JobExpired,
    JobNotFound,
    ProtocolError,
    TaskFailed,
)
from qclient._http import RESULT_POLL_CHUNK
from qclient.wire import (
    FINAL_STATES,
    JobRecord,
    JobSpec,
    JobState,
    ResultsReply,
    new_job_id,
    new_job_ids,
)

if TYPE_CHECKING:
    from qclient._async import AsyncClient
    from qclient._sync import Client

__all__ = [
    "AsyncJob",
    "Job",
    "ResultsPages",
    "job_ids",
    "make_spec",
    "new_job_id",
    "outcome",
    "outcomes",
    "results_timeout",
    "specs_from_items",
    "unfinished",
]


def make_spec(
    payload: Any,
    *,
    task: str | None,
    args: Any,
    kwargs: Mapping[str, Any] | None,
    delay: float | None,
    eta: float | None,
    expires: float | None,
    priority: int,
    job_id: str | None,
    max_retries: int | None,
    timeout: float | None,
    result_ttl: float | None,
    headers: Mapping[str, Any] | None,
    dedup_key: str | None,
) -> JobSpec:
    """The `JobSpec` for `send()`'s arguments, with an id chosen if none was given.

    A dict `payload` becomes kwargs, a list or tuple becomes args, any other value
    (not None) becomes the one positional argument.

    Raises:
        TypeError: `payload` was given together with `args` or `kwargs`.
    """
    if payload is not None:
        if args is not None or kwargs is not None:
            raise TypeError("pass either payload or args/kwargs, not both")
        if isinstance(payload, Mapping):
            kwargs = payload
        elif isinstance(payload, list | tuple):
            args = payload
        else:
            args = [payload]
    return JobSpec(
        id=job_id or new_job_id(),
        task=task,
        args=list(args) if args else [],
        kwargs=dict(kwargs) if kwargs else {},
        headers=dict(headers) if headers else {},
        priority=priority,
        delay=delay,
        eta=eta,
        expires=expires,
        max_retries=max_retries,
        timeout=timeout,
        result_ttl=result_ttl,
        dedup_key=dedup_key,
    )


def specs_from_items(items: Iterable[JobSpec | Mapping[str, Any]]) -> list[JobSpec]:
    """`send_many()` items as `JobSpec`s that each carry an id; the ids it makes come
    from one `new_job_ids()` call, so they sort in the items' order.

    Raises:
        TypeError: a mapping has a key that is not a JobSpec field.
    """
    specs = [item if isinstance(item, JobSpec) else JobSpec(**item) for item in items]
    fresh = iter(new_job_ids(sum(1 for s in specs if s.id is None)))
    return [
        s if s.id is not None else msgspec.structs.replace(s, id=next(fresh))
        for s in specs
    ]


def stored_as_sent(
    records: Sequence[JobRecord | None],
    queue: str,
    specs: Sequence[JobSpec],
    roundtrip: Callable[[Any], Any],
) -> bool:
    """Whether every spec's job is stored as sent: after a resend got 409, the sign
    that the lost first attempt stored them, not that an id or dedup_key met
    another job (a batch is all or nothing, so then none of it is stored).

    `roundtrip(value)` is `value` as the broker hands it back (through the wire's
    encoding: tuples become lists, and so on).
    """
    for record, spec in zip(records, specs, strict=True):
        if (
            record is None
            or record.queue != queue
            or record.task != (spec.task or queue)
            or record.args != roundtrip(spec.args)
            or record.kwargs != roundtrip(spec.kwargs)
        ):
            return False
    return True


def outcome(record: JobRecord) -> Any:
    """The result of a finished job, or the exception its final state means.

    Raises:
        TaskFailed: the job is `failed` or `dead`.
        JobCancelled: the job is `cancelled`.
        JobExpired: the job is `expired`.
        ValueError: the job is not in a final state.
    """
    state = record.state
    if state is JobState.SUCCEEDED:
        return record.result
    if state is JobState.FAILED or state is JobState.DEAD:
        raise TaskFailed.from_error(record.id, state, record.error, record.traceback)
    if state is JobState.CANCELLED:
        raise JobCancelled(record.id, state)
    if state is JobState.EXPIRED:
        raise JobExpired(record.id, state)
    raise ValueError(f"job {record.id} is {state}, not finished")


def job_ids(jobs: Iterable[str | Job | AsyncJob]) -> list[str]:
    """The ids of `jobs`, given as handles or as ids."""
    return [j if isinstance(j, str) else j.id for j in jobs]


def outcomes(
    ids: Sequence[str],
    records: Sequence[JobRecord | None],
    *,
    return_exceptions: bool,
) -> list[Any]:
    """`outcome()` of each record, in order (None: no such job, `JobNotFound`).

    Raises the first exception in order, unless `return_exceptions`, which puts
    each in the list in place of its job's result instead.
    """
    out: list[Any] = []
    for job_id, record in zip(ids, records, strict=True):
        try:
            if record is None:
                raise JobNotFound(404, "job_not_found", f"no job {job_id}")
            out.append(outcome(record))
        except (JobNotFound, JobCancelled, JobExpired, TaskFailed) as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out


def unfinished(records: Sequence[JobRecord | None]) -> list[int]:
    """The indexes of `records` not final yet (a missing job counts as final)."""
    return [
        k
        for k, r in enumerate(records)
        if r is not None and r.state not in FINAL_STATES
    ]


class ResultsPages:
    """The `POST /v1/results` requests that get one record per id in `ids`: each
    distinct id asked once, then the ids a reply `omitted` (its byte budget) asked
    again, until `todo` is empty; `records()` then has them in the order of `ids`.

        pages = ResultsPages(ids)
        while pages.todo:
            pages.take(<the reply to a request for pages.todo>)
        return pages.records()
    """

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        self.todo = list(dict.fromkeys(self.ids))  #: the ids the next request asks for
        self._got: dict[str, JobRecord | None] = {}

    def take(self, reply: ResultsReply) -> None:
        """Take the reply to a request for `todo`.

        Raises:
            ProtocolError: the reply does not answer the request (so asking again
                would loop).
        """
        left = set(reply.omitted)
        answered = [i for i in self.todo if i not in left]
        if len(answered) != len(reply.jobs) or not answered:
            raise ProtocolError(
                f"POST /v1/results asked {len(self.todo)} ids and got"
                f" {len(reply.jobs)} records with {len(left)} omitted"
            )
        self._got.update(zip(answered, reply.jobs, strict=True))
        self.todo = [i for i in self.todo if i in left]

    def records(self) -> list[JobRecord | None]:
        return [self._got[i] for i in self.ids]


def results_timeout(left: int, total: int, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"{left} of {total} jobs still unfinished after {timeout} s")


def next_wait(deadline: float | None) -> float:
    """The next long-poll's seconds: a chunk, or what is left until `deadline`."""
    if deadline is None:
        return RESULT_POLL_CHUNK
    return max(0.0, min(RESULT_POLL_CHUNK, deadline - time.monotonic()))


class Job:
    """A handle on one enqueued job, as returned by `Client.send()`.

    Cheap to make (`client.job(id)`), holds no state beyond its id: every method
    asks the broker. Thread-safe as its client is.

    Attributes:
        id: the job's id.
        queue: its queue, or None when the handle was made from an id alone.
        client: the `Client` it talks through.
    """

    __slots__ = ("client", "id", "queue")

    def __init__(self, id: str, queue: str | None, client: Client) -> None:
        self.id = id
        self.queue = queue
        self.client = client

    def __repr__(self) -> str:
        return f"<Job {self.id} queue={self.queue!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def info(self) -> JobRecord:
        """The job's whole record.

        Raises:
            JobNotFound: no such job (or its result_ttl passed).
        """
        return self.client.get_job(self.id)

    def status(self) -> JobState:
        """The job's current state.

        Raises:
            JobNotFound: no such job (or its result_ttl passed).
        """
        return self.client.get_job(self.id).state

    def cancel(self) -> JobState:
        """Cancel the job if it has not finished; returns its state after the call.

        Raises:
            JobNotFound: no such job.
        """
        return self.client.cancel(self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its result.

        Long-polls the broker (no busy polling) in chunks of at most 60 s.

        Args:
            timeout: seconds to wait at most; None waits as long as it takes,
                0 only looks once.

        Returns:
            The value the task returned (as acked by the worker).

        Raises:
            TaskFailed: the task failed or died; `.traceback` holds the worker's.
            JobCancelled: the job was cancelled.
            JobExpired: the job expired before a worker took it.
            TimeoutError: the job had not finished after `timeout` seconds; it may
                still finish later, so calling `result()` again is fine.
            JobNotFound: no such job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.client.wait_job(self.id, next_wait(deadline))
            if record.state in FINAL_STATES:
                return outcome(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.id} still {record.state} after {timeout} s"
                )


class AsyncJob:
    """The `AsyncClient` counterpart of `Job`: the same methods, as coroutines.

    Attributes:
        id: the job's id.
        queue: its queue, or None when the handle was made from an id alone.
        client: the `AsyncClient` it talks through.
    """

    __slots__ = ("client", "id", "queue")

    def __init__(self, id: str, queue: str | None, client: AsyncClient) -> None:
        self.id = id
        self.queue = queue
        self.client = client

    def __repr__(self) -> str:
        return f"<AsyncJob {self.id} queue={self.queue!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncJob) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    async def info(self) -> JobRecord:
        """The job's whole record. Raises `JobNotFound` for an unknown id."""
        return await self.client.get_job(self.id)

    async def status(self) -> JobState:
        """The job's current state. Raises `JobNotFound` for an unknown id."""
        return (await self.client.get_job(self.id)).state

    async def cancel(self) -> JobState:
        """Cancel the job if unfinished; returns its state after the call."""
        return await self.client.cancel(self.id)

    async def result(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors Job.result()
    ) -> Any:
        """Wait for the job to finish and return its result; see `Job.result()`.

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            The value the task returned.

        Raises:
            TaskFailed: the task failed or died.
            JobCancelled: the job was cancelled.
            JobExpired: the job expired before a worker took it.
            TimeoutError: not finished after `timeout` seconds.
            JobNotFound: no such job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = await self.client.wait_job(self.id, next_wait(deadline))
            if record.state in FINAL_STATES:
                return outcome(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.id} still {record.state} after {timeout} s"
                )
