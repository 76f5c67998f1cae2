"""The pure pieces of waiting for jobs that the operations share: turning final
records into results or exceptions, and what is left to wait for."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from qclient._errors import (
    JobCancelled,
    JobExpired,
    JobNotFound,
    ProtocolError,
    TaskFailed,
)
from qclient._http import RESULT_POLL_CHUNK
from qclient.tags import untag
from qclient.wire import FINAL_STATES, JobRecord, JobSpec, JobState, ResultsReply

__all__ = [
    "Handle",
    "ResultsPages",
    "job_ids",
    "next_wait",
    "outcome",
    "outcomes",
    "results_timeout",
    "stored_as_sent",
    "unfinished",
]


class ResultsPages:
    """The `POST /v1/results` requests that get one record per id in `ids`: each
    distinct id asked once, then the ids a reply `omitted` (its byte budget) asked
    again, until `todo` is empty; `records()` then has them in the order of `ids`."""

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


class Handle(Protocol):
    """A job handle (`Job`, `AsyncJob`): all the waiting needs is its id."""

    @property
    def id(self) -> str: ...


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
    """The result of a finished job (its tagged values untagged), or the exception
    its final state means.

    Raises:
        TaskFailed: the job is `failed` or `dead`.
        JobCancelled: the job is `cancelled`.
        JobExpired: the job is `expired`.
        ValueError: the job is not in a final state.
    """
    state = record.state
    if state is JobState.SUCCEEDED:
        return untag(record.result)
    if state is JobState.FAILED or state is JobState.DEAD:
        raise TaskFailed.from_error(record.id, state, record.error, record.traceback)
    if state is JobState.CANCELLED:
        raise JobCancelled(record.id, state)
    if state is JobState.EXPIRED:
        raise JobExpired(record.id, state)
    raise ValueError(f"job {record.id} is {state}, not finished")


def job_ids(jobs: Iterable[str | Handle]) -> list[str]:
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


def results_timeout(left: int, total: int, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"{left} of {total} jobs still unfinished after {timeout} s")


def next_wait(deadline: float | None) -> float:
    """The next long-poll's seconds: a chunk, or what is left until `deadline`."""
    if deadline is None:
        return RESULT_POLL_CHUNK
    return max(0.0, min(RESULT_POLL_CHUNK, deadline - time.monotonic()))
