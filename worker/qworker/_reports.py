"""Settled outcomes as the acks and fails a worker sends: the retry policy applied.

Sans-IO: nothing here sends anything. `make_report` decides, from a run's `Outcome`, the
job and its task, whether the broker hears an ack, a fail with a retry, or a final fail.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from qclient.wire import MAX_SECONDS, AckItem, FailItem, LeasedJob

from qworker._execute import Outcome, describe

if TYPE_CHECKING:
    from qworker._task import Task

__all__ = ["Report", "make_report", "split"]


@dataclass(slots=True)
class Report:
    """A settled outcome waiting to be sent to the broker."""

    job: LeasedJob
    item: AckItem | FailItem
    outcome: str  #: "succeeded" | "retry" | "failed"
    duration: float  #: seconds the task ran
    settled_at: float = field(default_factory=time.monotonic)

    @property
    def retry_in(self) -> float | None:
        """Seconds until the retry this report asks for, or None."""
        item = self.item
        return item.retry_in if isinstance(item, FailItem) else None


def make_report(
    job: LeasedJob, outcome: Outcome, task: Task[..., Any] | None, now: float
) -> Report:
    """Turn an outcome into the ack or fail to send, applying the retry policy.

    Args:
        job: the job as leased.
        outcome: what its run came to.
        task: the task that ran it; None when none could (then no retry).
        now: time.monotonic(), when it settled.
    """
    if outcome.ok:
        try:  # one result the wire cannot carry must not sink a whole batch
            msgspec.msgpack.encode(outcome.result)
        except (TypeError, ValueError, OverflowError) as exc:
            error = f"UnserializableResult: {describe(exc)}"
            outcome = Outcome(ok=False, error=error, duration=outcome.duration)
        else:
            ack = AckItem(id=job.id, lease=job.lease, result=outcome.result)
            return Report(job, ack, "succeeded", outcome.duration, now)
    retry_in: float | None = None
    limit = job.max_retries
    if task is not None and task.max_retries is not None:
        limit = min(limit, task.max_retries)  # the task's bound, however sent
    if outcome.retry and task is not None and job.attempt <= limit:
        retry_in = outcome.retry_delay
        if retry_in is None:
            retry_in = task.backoff(job.attempt)
        retry_in = min(retry_in, MAX_SECONDS)  # what the wire takes
    fail = FailItem(
        id=job.id,
        lease=job.lease,
        error=outcome.error,
        traceback=outcome.traceback,
        retry_in=retry_in,
    )
    verdict = "failed" if retry_in is None else "retry"
    return Report(job, fail, verdict, outcome.duration, now)


def split(
    batch: Sequence[Report],
) -> tuple[list[Report], list[Report], list[AckItem], list[FailItem]]:
    """The ack reports of `batch` and its fail reports, each in order (the broker
    answers the acks first), then their items."""
    ack_reports = [r for r in batch if isinstance(r.item, AckItem)]
    fail_reports = [r for r in batch if isinstance(r.item, FailItem)]
    acks = [r.item for r in ack_reports if isinstance(r.item, AckItem)]
    fails = [r.item for r in fail_reports if isinstance(r.item, FailItem)]
    return ack_reports, fail_reports, acks, fails
