"""Rows to wire structs and back: the msgpack columns, and the column lists the
statements read. Shared by the write side (writes.py) and the read side (reads.py)."""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec
from qclient.wire import (
    MAX_ATTEMPT_ERROR,
    MAX_ATTEMPT_ERRORS,
    AttemptError,
    JobRecord,
    JobSpec,
    JobState,
    LeasedJob,
)

from qbroker import errors

_encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode
_decode_payload = msgspec.msgpack.Decoder(
    tuple[list[Any], dict[str, Any], dict[str, Any]]
).decode
decode_payload = _decode_payload
_decode_errors = msgspec.json.Decoder(list[tuple[int, str, float]]).decode


def pack(value: Any, name: str) -> bytes:
    """msgpack-encode a client value; JSON bodies may carry integers msgpack cannot.

    Raises:
        errors.InvalidField: an integer outside -2**63 .. 2**64-1.
    """
    try:
        return _encode(value)
    except OverflowError as exc:
        raise errors.InvalidField(
            "integers must lie within -2**63 .. 2**64-1", field=name
        ) from exc


def pack_payload(spec: JobSpec) -> bytes:
    """A job's (args, kwargs, headers), packed as one value.

    Raises:
        errors.InvalidField: naming the part with an integer msgpack cannot carry.
    """
    try:
        return _encode((spec.args, spec.kwargs, spec.headers))
    except OverflowError:
        for name in ("args", "kwargs", "headers"):
            pack(getattr(spec, name), name)
        raise


RECORD_COLUMNS = (
    "id, queue, task, state, attempts, max_retries, priority, payload, result, error, "
    "traceback, timeout, created_at, available_at, started_at, finished_at, expires_at, "
    "worker, dedup_key, limit_key, progress, progress_note, errors"
)
#: the SQL that appends the failed attempt's error to `errors` (a JSON array of
#: [attempt, error, at]), keeping the first and the latest when it is full; its
#: parameters: ?E the error text, ?N now
APPEND_ERROR_SQL = (
    "json_insert(CASE WHEN json_array_length(coalesce(errors, '[]')) >= {max}"
    " THEN json_remove(errors, '$[1]') ELSE coalesce(errors, '[]') END, '$[#]',"
    " json_array(attempts - attempt_base, substr({error}, 1, {chars}), {now}))"
)


def append_error_sql(error: str, now: str) -> str:
    """APPEND_ERROR_SQL with its parameters named (`?3`, `?2`, ...)."""
    return APPEND_ERROR_SQL.format(
        max=MAX_ATTEMPT_ERRORS, chars=MAX_ATTEMPT_ERROR, error=error, now=now
    )


def record(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    """A JobRecord from a row of RECORD_COLUMNS."""
    (
        id_, queue, task, state, attempts, max_retries, priority, payload, result, error,
        traceback, timeout, created_at, available_at, started_at, finished_at, expires_at,
        worker, dedup_key, limit_key, progress, progress_note, errors_json,
    ) = row  # fmt: skip
    args, kwargs, headers = _decode_payload(payload)
    return JobRecord(
        id=id_,
        queue=queue,
        task=task,
        state=JobState(state),
        attempts=attempts,
        max_retries=max_retries,
        priority=priority,
        args=args,
        kwargs=kwargs,
        headers=headers,
        result=None if result is None else decode(result),
        error=error,
        traceback=traceback,
        timeout=timeout,
        created_at=created_at,
        available_at=available_at,
        started_at=started_at,
        finished_at=finished_at,
        expires_at=expires_at,
        worker=worker,
        dedup_key=dedup_key,
        limit_key=limit_key,
        progress=progress,
        progress_note=progress_note,
        errors=[]
        if errors_json is None
        else [
            AttemptError(attempt=a, error=e, at=t)
            for a, e, t in _decode_errors(errors_json)
        ],
    )


#: a leased job's columns, as `leased_job` reads them: the attempt counts from the
#: job's last retry by hand (attempt_base)
LEASED_COLUMNS = (
    "priority, available_at, seq, id, task, payload, lease, attempts - attempt_base,"
    " max_retries, lease_seconds, lease_expires_at"
)


def leased_job(r: sqlite3.Row | tuple[Any, ...], queue: str) -> LeasedJob:
    """A LeasedJob from a row of LEASED_COLUMNS."""
    args, kwargs, headers = _decode_payload(r[5])
    return LeasedJob(
        id=r[3],
        queue=queue,
        task=r[4],
        args=args,
        kwargs=kwargs,
        headers=headers,
        lease=r[6],
        attempt=r[7],
        max_retries=r[8],
        timeout=r[9],
        lease_expires_at=r[10],
    )
