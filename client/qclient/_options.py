"""The options of a job, declared once for every send: `qclient.send`, `Client.send`,
`AsyncClient.send`, `qclient.spec`, and qworker's `Task.send`.

`JobOptions` is what any sender may set; `SendOptions` adds what a task object fixes
for itself (the task name and the arguments). `make_spec` turns them into the wire's
`JobSpec`: durations may be `timedelta`s, `eta` an aware `datetime`, and the arguments
are tagged (`qclient.tags`) so their types survive the trip.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypedDict, Unpack

import msgspec

from qclient.tags import tag
from qclient.wire import JobSpec, new_job_id, new_job_ids

__all__ = [
    "JobOptions",
    "LeaseOptions",
    "SendOptions",
    "check_keys",
    "make_spec",
    "spec",
    "specs_from_items",
]

Duration = float | timedelta


class JobOptions(TypedDict, total=False):
    """A job's options, as keywords of every send (all optional).

    Attributes:
        delay: seconds (or a `timedelta`) from now before it may run; not with eta.
        eta: when it may run: unix seconds, or a timezone-aware `datetime`; not with
            delay.
        expires: seconds (or a `timedelta`) from now, or an aware `datetime`, after
            which it is never leased (it ends `expired`).
        priority: -1,000,000 .. 1,000,000; higher runs first. Default 0.
        job_id: your own id (a repeat of a stored one raises DuplicateJob);
            default: a new time-sortable id chosen here.
        max_retries: leases allowed beyond the first; default: the broker's (3).
        timeout: lease seconds (or a `timedelta`); default: the broker's (30).
        result_ttl: seconds (or a `timedelta`) to keep the finished job; default: the
            broker's (7 days).
        headers: free-form metadata passed to the worker.
        dedup_key: at most one unfinished job per queue and key.
        limit_key: a global limit key of the job's own (`customer:42`), besides
            `queue:<queue>` and `task:<task>` (`Client.set_limit`).
    """

    delay: Duration | None
    eta: float | datetime | None
    expires: Duration | datetime | None
    priority: int
    job_id: str | None
    max_retries: int | None
    timeout: Duration | None
    result_ttl: Duration | None
    headers: Mapping[str, Any] | None
    dedup_key: str | None
    limit_key: str | None


class SendOptions(JobOptions, total=False):
    """`JobOptions` plus the call itself (all optional).

    Attributes:
        task: the function to run; default: the queue's name.
        args: positional arguments.
        kwargs: keyword arguments.
    """

    task: str | None
    args: Sequence[Any] | None
    kwargs: Mapping[str, Any] | None


class LeaseOptions(TypedDict, total=False):
    """A lease's options, as keywords of `lease()` and `settle_and_lease()` (all
    optional).

    Attributes:
        max: 1 .. 1000 jobs at most; default 1.
        wait: seconds to long-poll when nothing is ready (0 .. 300); default 0.
        timeout: lease seconds, overriding each job's own.
        worker: this worker's name, for records and logs.
    """

    max: int
    wait: float
    timeout: float | None
    worker: str


def check_keys(options: Mapping[str, Any], declared: type) -> None:
    """Raise TypeError for a keyword `declared` (a TypedDict) does not have, as a
    function with those keywords would."""
    # typeshed gives a TypedDict class no type of its own to declare this on
    unknown = options.keys() - declared.__optional_keys__  # type: ignore[attr-defined]
    if unknown:
        raise TypeError(f"unexpected keyword argument {min(unknown)!r}")


_SEND_KEYS = SendOptions.__optional_keys__


def make_spec(
    payload: Any, options: SendOptions, *, now: float, new_id: bool = True
) -> JobSpec:
    """The `JobSpec` for a send's payload and options, its arguments tagged.

    A dict `payload` becomes kwargs, a list or tuple becomes args, any other value
    (not None) becomes the one positional argument.

    Args:
        payload: as `send()`'s.
        options: as `send()`'s keywords.
        now: unix seconds, to turn an `expires` datetime into seconds from now.
        new_id: choose an id when `job_id` is not given (else leave it None).

    Raises:
        TypeError: an unknown option, or `payload` together with `args` or `kwargs`.
        ValueError: a naive `datetime` for `eta` or `expires`.
    """
    if options and not options.keys() <= _SEND_KEYS:
        check_keys(options, SendOptions)
    args = options.get("args")
    kwargs = options.get("kwargs")
    if payload is not None:
        if args is not None or kwargs is not None:
            raise TypeError("pass either payload or args/kwargs, not both")
        if isinstance(payload, Mapping):
            kwargs = payload
        elif isinstance(payload, list | tuple):
            args = payload
        else:
            args = [payload]
    args = tag(args if type(args) is list else list(args)) if args else []
    kwargs = tag(kwargs if type(kwargs) is dict else dict(kwargs)) if kwargs else {}
    if not options:  # a payload alone (the usual call): every other field's default
        return JobSpec(id=new_job_id() if new_id else None, args=args, kwargs=kwargs)
    headers = options.get("headers")
    return JobSpec(
        id=options.get("job_id") or (new_job_id() if new_id else None),
        task=options.get("task"),
        args=args,
        kwargs=kwargs,
        headers=dict(headers) if headers else {},
        priority=options.get("priority", 0),
        delay=_seconds(options.get("delay")),
        eta=_unix_time(options.get("eta"), "eta"),
        expires=_expires(options.get("expires"), now),
        max_retries=options.get("max_retries"),
        timeout=_seconds(options.get("timeout")),
        result_ttl=_seconds(options.get("result_ttl")),
        dedup_key=options.get("dedup_key"),
        limit_key=options.get("limit_key"),
    )


def spec(payload: Any = None, **options: Unpack[SendOptions]) -> JobSpec:
    """One `send_many()` item with options of its own: the `JobSpec` that
    `send(queue, payload, **options)` would send.

        client.send_many("email", [qclient.spec({"to": a}, priority=5) for a in to])

    Raises:
        TypeError, ValueError: as `send()` does.
    """
    return make_spec(payload, options, now=time.time(), new_id=False)


def specs_from_items(items: Iterable[Any]) -> list[JobSpec]:
    """`send_many()` items as `JobSpec`s that each carry an id.

    An item means what `send()`'s payload means (a dict is kwargs, a list or tuple
    args, None no arguments, anything else the one argument); a `JobSpec` (made by
    `spec()`, or by hand in the wire's own form) is sent as it is. The ids made here
    come from one `new_job_ids()` call, so they sort in the items' order.
    """
    now = time.time()
    specs = [
        item
        if isinstance(item, JobSpec)
        else make_spec(item, {}, now=now, new_id=False)
        for item in items
    ]
    fresh = iter(new_job_ids(sum(1 for s in specs if s.id is None)))
    return [
        s if s.id is not None else msgspec.structs.replace(s, id=next(fresh))
        for s in specs
    ]


def _seconds(value: Duration | None) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def _unix_time(value: float | datetime | None, name: str) -> float | None:
    if not isinstance(value, datetime):
        return value
    if value.utcoffset() is None:
        raise ValueError(
            f"{name} is a naive datetime, whose time zone qclient cannot know: pass "
            "an aware one, e.g. datetime.now(timezone.utc) + timedelta(minutes=5)"
        )
    return value.timestamp()


def _expires(value: Duration | datetime | None, now: float) -> float | None:
    if isinstance(value, datetime):
        at = _unix_time(value, "expires")
        assert at is not None
        return max(0.0, at - now)  # a time already past: expired at once
    return _seconds(value)
