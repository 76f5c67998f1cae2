"""The filters of a job listing and a bulk retry, read from a query string. Sans-IO.

`GET /v1/jobs?state=dead&queue=q&task=t&schedule=s&kwargs.user_id=42&limit=50&cursor=C`
and `POST /v1/jobs/retry` with the same filters. Every parameter is checked here, so a
malformed one is refused (422 naming it) before the store is asked anything.

Argument filters (`args.0=x`, `kwargs.user.id=42`, `headers.tenant=acme`) name a path
into the job's arguments: dots separate keys, a number indexes a list. The value is read
as JSON when it parses (`42` matches the number 42, `"42"` the string), else taken as a
string. They are checked against the jobs a page scans (see `SCAN_LIMIT`), not through
an index: a page costs at most that many rows, whatever the table holds.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from qclient.wire import NAME_PATTERN, JobState

from qbroker import errors

__all__ = [
    "LIST_DEFAULT",
    "LIST_MAX",
    "RETRYABLE",
    "SCAN_LIMIT",
    "JobFilter",
    "decode_cursor",
    "encode_cursor",
    "parse_filter",
]

LIST_DEFAULT = 100  #: jobs a page holds unless `limit` says
LIST_MAX = 1000  #: the most jobs one page may hold
#: rows one page (or one batch of a bulk retry) examines at most: its cost is bounded
#: whatever the table holds; a page that did not fill says where to go on (`next`)
SCAN_LIMIT = 20_000
#: the states a retry takes a job from
RETRYABLE = frozenset(
    {JobState.DEAD, JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED}
)
MAX_WHERE = 10  #: argument filters one request may give
_PARTS = ("args", "kwargs", "headers")
_NAME_RE = re.compile(NAME_PATTERN)
_SIMPLE = frozenset({"state", "queue", "task", "schedule"})
_CURSOR_RE = re.compile(r"[1-9][0-9]{0,18}\Z", re.ASCII)


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What a listing or bulk retry asks for."""

    state: JobState | None = None
    queue: str | None = None
    task: str | None = None
    schedule: str | None = None
    #: argument filters: (part, path, value); part is args, kwargs or headers
    where: tuple[tuple[str, tuple[str | int, ...], Any], ...] = ()
    limit: int = LIST_DEFAULT
    before: int | None = None  #: the cursor: only rows stored before this one

    def below(self, before: int) -> JobFilter:
        """The same filter, over the jobs stored before row `before`."""
        return dataclasses.replace(self, before=before)

    def matches_arguments(
        self, args: list[Any], kwargs: dict[str, Any], headers: dict[str, Any]
    ) -> bool:
        """Whether a job's arguments pass every argument filter."""
        parts = {"args": args, "kwargs": kwargs, "headers": headers}
        for part, path, want in self.where:
            value: Any = parts[part]
            for step in path:
                if isinstance(value, dict) and isinstance(step, str):
                    if step not in value:
                        return False
                    value = value[step]
                elif isinstance(value, list) and isinstance(step, int):
                    if not -len(value) <= step < len(value):
                        return False
                    value = value[step]
                elif isinstance(value, dict) and str(step) in value:
                    value = value[str(step)]
                else:
                    return False
            if not _same(value, want):
                return False
        return True


def _same(value: Any, want: Any) -> bool:
    """JSON equality: True is not 1, 1 is 1.0."""
    if isinstance(value, bool) or isinstance(want, bool):
        return isinstance(value, bool) and isinstance(want, bool) and value is want
    return bool(value == want)


def encode_cursor(seq: int) -> str:
    return str(seq)


def decode_cursor(text: str) -> int:
    """Raises: errors.InvalidField naming `cursor`."""
    if _CURSOR_RE.match(text) is None:
        raise errors.InvalidField(
            "cursor must be a `next` value from an earlier page", field="cursor"
        )
    return int(text)


def parse_filter(
    query: Mapping[str, str],
    *,
    paging: bool = True,
    states: frozenset[JobState] | None = None,
) -> JobFilter:
    """Read the filters of a query string.

    Args:
        query: the request's query parameters.
        paging: `limit` and `cursor` are allowed (a listing; not a bulk retry).
        states: the states `state` may name (default: any).

    Raises:
        errors.InvalidField: naming the parameter that is malformed or unknown.
    """
    fields: dict[str, Any] = {}
    where: list[tuple[str, tuple[str | int, ...], Any]] = []
    for name, raw in query.items():
        if name in _SIMPLE:
            fields[name] = _simple(name, raw, states)
        elif paging and name == "limit":
            if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= LIST_MAX:
                raise errors.InvalidField(
                    f"limit must be an integer within [1, {LIST_MAX}]", field="limit"
                )
            fields["limit"] = int(raw)
        elif paging and name == "cursor":
            fields["before"] = decode_cursor(raw)
        elif name.partition(".")[0] in _PARTS:
            where.append(_where(name, raw))
        else:
            known = "state, queue, task, schedule, args.N, kwargs.KEY, headers.KEY"
            if paging:
                known += ", limit, cursor"
            raise errors.InvalidField(
                f"unknown filter {name[:100]!r}; use {known}", field=name[:100]
            )
    if len(where) > MAX_WHERE:
        raise errors.InvalidField(
            f"at most {MAX_WHERE} argument filters", field=where[-1][0]
        )
    return JobFilter(where=tuple(where), **fields)


def _simple(name: str, raw: str, states: frozenset[JobState] | None) -> Any:
    if name == "state":
        try:
            state = JobState(raw)
        except ValueError:
            raise errors.InvalidField(
                f"state must be one of {', '.join(s.value for s in JobState)}",
                field="state",
            ) from None
        if states is not None and state not in states:
            allowed = ", ".join(sorted(s.value for s in states))
            raise errors.InvalidField(
                f"state must be one of {allowed} here", field="state"
            )
        return state
    if _NAME_RE.match(raw) is None:
        raise errors.InvalidField(f"{name} must be a name ({NAME_PATTERN})", field=name)
    return raw


def _where(name: str, raw: str) -> tuple[str, tuple[str | int, ...], Any]:
    part, _, rest = name.partition(".")
    steps = rest.split(".") if rest else []
    if not steps or any(not s for s in steps) or len(steps) > 8 or len(name) > 200:
        raise errors.InvalidField(
            f"argument filter {name[:100]!r}: give a path such as kwargs.user_id"
            " or args.0 (at most 8 steps)",
            field=name[:100],
        )
    path: list[str | int] = []
    for i, step in enumerate(steps):
        if step.lstrip("-").isdigit() and (part == "args" or i > 0):
            path.append(int(step))
        elif part == "args" and i == 0:
            raise errors.InvalidField(
                f"{name[:100]!r}: args are indexed by number (args.0)",
                field=name[:100],
            )
        else:
            path.append(step)
    try:
        value: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        value = raw
    return part, tuple(path), value
