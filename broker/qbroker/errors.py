"""The broker's error tree. Each class knows its HTTP status and its wire `reason`.

    QBrokerError
    ├── BadRequest            400 bad_request
    ├── MalformedBody         400 malformed_body
    ├── Unauthorized          401 unauthorized
    ├── Forbidden             403 forbidden (names the roles that may)
    ├── NotFound              404 not_found
    ├── JobNotFound           404 job_not_found
    ├── LimitNotFound         404 limit_not_found
    ├── ScheduleNotFound      404 schedule_not_found
    ├── MethodNotAllowed      405 method_not_allowed
    ├── RequestTimeout        408 request_timeout
    ├── DuplicateId           409 duplicate_id
    ├── DuplicateDedupKey     409 duplicate_dedup_key
    ├── StaleLease            409 stale_lease
    ├── InvalidState          409 invalid_state (says the job's state)
    ├── BodyTooLarge          413 body_too_large
    ├── UnsupportedMediaType  415 unsupported_media_type
    ├── InvalidField          422 invalid_field (names the field)
    ├── TooManyConnections    429 too_many_connections
    ├── HeadersTooLarge       431 headers_too_large
    ├── InternalError         500 internal_error
    ├── ShuttingDown          503 shutting_down
    ├── DatabaseGone          503 database_gone
    ├── DiskFull              507 disk_full
    └── DiskLow               507 disk_low

Raised by the store and the handlers; turned into a reply in one place (server.py).
"""

from __future__ import annotations

from typing import ClassVar


class QBrokerError(Exception):
    """Base class: an error with a reply."""

    status: ClassVar[int] = 500
    reason: ClassVar[str] = "internal_error"

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message or self.reason.replace("_", " "))
        self.message = message or self.reason.replace("_", " ")
        self.field = field


class BadRequest(QBrokerError):
    status, reason = 400, "bad_request"


class MalformedBody(QBrokerError):
    status, reason = 400, "malformed_body"


class Unauthorized(QBrokerError):
    status, reason = 401, "unauthorized"


class Forbidden(QBrokerError):
    status, reason = 403, "forbidden"

    def __init__(self, message: str, *, roles: tuple[str, ...]) -> None:
        super().__init__(message)
        self.roles = roles  #: the roles that may make the request: the reply's `roles`


class NotFound(QBrokerError):
    status, reason = 404, "not_found"


class JobNotFound(QBrokerError):
    status, reason = 404, "job_not_found"


class ScheduleNotFound(QBrokerError):
    status, reason = 404, "schedule_not_found"


class MethodNotAllowed(QBrokerError):
    status, reason = 405, "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow  #: the methods the path takes: the reply's Allow header


class RequestTimeout(QBrokerError):
    status, reason = 408, "request_timeout"


class LimitNotFound(QBrokerError):
    status, reason = 404, "limit_not_found"


class InvalidState(QBrokerError):
    """The job is not in a state the request applies to; `state` says which it is."""

    status, reason = 409, "invalid_state"

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message, field="state")
        self.state = state


class DuplicateId(QBrokerError):
    status, reason = 409, "duplicate_id"


class DuplicateDedupKey(QBrokerError):
    status, reason = 409, "duplicate_dedup_key"


class StaleLease(QBrokerError):
    status, reason = 409, "stale_lease"


class BodyTooLarge(QBrokerError):
    status, reason = 413, "body_too_large"


class UnsupportedMediaType(QBrokerError):
    status, reason = 415, "unsupported_media_type"


class InvalidField(QBrokerError):
    status, reason = 422, "invalid_field"


class TooManyConnections(QBrokerError):
    status, reason = 429, "too_many_connections"


class HeadersTooLarge(QBrokerError):
    status, reason = 431, "headers_too_large"


class InternalError(QBrokerError):
    status, reason = 500, "internal_error"


class ShuttingDown(QBrokerError):
    status, reason = 503, "shutting_down"


class DatabaseGone(QBrokerError):
    """The database file was deleted or replaced under the running broker."""

    status, reason = 503, "database_gone"


class DiskFull(QBrokerError):
    status, reason = 507, "disk_full"


class DiskLow(QBrokerError):
    """Free space under --min-free-disk: enqueues are refused, the rest goes on."""

    status, reason = 507, "disk_low"
