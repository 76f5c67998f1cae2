"""The client's error tree.

    QClientError
    ├── BrokerError         a 4xx/5xx reply (status, reason, message, field)
    │   ├── InvalidRequest  400, 413, 415, 422: the request was wrong; don't retry
    │   ├── JobNotFound     404 job_not_found: unknown id, or its result was swept
    │   ├── DuplicateJob    409 duplicate_id / duplicate_dedup_key
    │   └── StaleLease      409 stale_lease: another worker owns the job now
    ├── ProtocolError       transport trouble (refused, reset, timeout, garbled
    │                       reply) that outlived the retries
    └── JobNotSucceeded     `Job.result()` found the job ended without success
        ├── TaskFailed      failed or dead; the task's exception type, traceback
        ├── JobCancelled    cancelled
        └── JobExpired      its `expires` passed before a worker leased it

As in h11 (LocalProtocolError / RemoteProtocolError) the split is by who is at fault:
`BrokerError` is a reply the broker chose to send, `ProtocolError` is a conversation
that broke down. `JobNotSucceeded` is neither: the broker and the wire worked, the job
did not.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "DuplicateJob",
    "InvalidRequest",
    "JobCancelled",
    "JobExpired",
    "JobNotFound",
    "JobNotSucceeded",
    "ProtocolError",
    "QClientError",
    "StaleLease",
    "TaskFailed",
    "broker_error",
]


class QClientError(Exception):
    """Base class of every error qclient raises on purpose."""


class BrokerError(QClientError):
    """The broker answered with an error reply (protocol.md section 4).

    Attributes:
        status: the HTTP status, e.g. 422.
        reason: the machine-readable `error` of the body, e.g. "invalid_field".
        message: the human-readable explanation.
        field: the offending field for 422 `invalid_field`, else None.
    """

    def __init__(
        self, status: int, reason: str, message: str = "", field: str | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        text = f"{status} {reason}"
        if message:
            text += f": {message}"
        if field:
            text += f" (field {field!r})"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the exception picklable across process pools (args != __init__ args).
        return (type(self), (self.status, self.reason, self.message, self.field))


class InvalidRequest(BrokerError):
    """400, 413, 415 or 422: the request itself was wrong; retrying it cannot help."""


class JobNotFound(BrokerError):
    """404 `job_not_found`: no job has that id (or it was swept after result_ttl)."""


class DuplicateJob(BrokerError):
    """409 `duplicate_id` or `duplicate_dedup_key`: the job (or its twin) exists."""


class StaleLease(BrokerError):
    """409 `stale_lease`: the lease expired or moved on; stop working on the job."""


class ProtocolError(QClientError):
    """The broker could not be reached or talked to, after all retries.

    The request may or may not have been applied (protocol.md section 1, "Durability").
    `__cause__` holds the last underlying error.

    Attributes:
        job_ids: from `send()` and `send_many()`, the ids chosen for the jobs not
            known stored, so they can be sent again safely with the same ids;
            otherwise empty.
    """

    job_ids: list[str]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.job_ids = []


class JobNotSucceeded(QClientError):
    """The job reached a final state other than `succeeded`.

    Attributes:
        job_id: the job's id.
        state: the final state, a `JobState` string.
    """

    def __init__(self, job_id: str, state: str, text: str = "") -> None:
        self.job_id = job_id
        self.state = state
        super().__init__(text or f"job {job_id} ended {state}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.job_id, self.state))


class TaskFailed(JobNotSucceeded):
    """The task raised (state `failed`) or its leases kept expiring (state `dead`).

    Attributes:
        job_id: the job's id.
        state: "failed" or "dead".
        exc_type: the exception's type name as the worker reported it ("" if unknown).
        message: the exception's message.
        traceback: the formatted traceback from the worker, or None.
    """

    def __init__(
        self,
        job_id: str,
        state: str,
        exc_type: str = "",
        message: str = "",
        traceback: str | None = None,
    ) -> None:
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
        what = f"{exc_type}: {message}" if exc_type else message
        super().__init__(
            job_id, state, f"job {job_id} {state}: {what or 'no error text'}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        args = (self.job_id, self.state, self.exc_type, self.message, self.traceback)
        return (type(self), args)

    @classmethod
    def from_error(
        cls, job_id: str, state: str, error: str | None, traceback: str | None
    ) -> TaskFailed:
        """Build one from a job record's `error` ("Type: message") and `traceback`."""
        exc_type, message = split_error(error or "")
        return cls(job_id, state, exc_type, message, traceback)


class JobCancelled(JobNotSucceeded):
    """The job was cancelled before it succeeded."""


class JobExpired(JobNotSucceeded):
    """The job's `expires` time passed before any worker leased it."""


def split_error(error: str) -> tuple[str, str]:
    """Split "ValueError: bad input" into ("ValueError", "bad input").

    Only a leading dotted identifier counts as the type, so a bare message that
    happens to contain ": " keeps its whole text as the message.
    """
    head, sep, tail = error.partition(": ")
    if sep and head and all(part.isidentifier() for part in head.split(".")):
        return head, tail
    if error.isidentifier():  # "KeyboardInterrupt" with no message
        return error, ""
    return "", error


_BY_REASON: dict[str, type[BrokerError]] = {
    "job_not_found": JobNotFound,
    "stale_lease": StaleLease,
    "duplicate_id": DuplicateJob,
    "duplicate_dedup_key": DuplicateJob,
}
_INVALID_STATUSES = frozenset({400, 413, 415, 422})


def broker_error(
    status: int, reason: str, message: str = "", field: str | None = None
) -> BrokerError:
    """The right `BrokerError` subclass for a reply's status and reason."""
    cls = _BY_REASON.get(reason)
    if cls is None:
        cls = InvalidRequest if status in _INVALID_STATUSES else BrokerError
    return cls(status, reason, message, field)
