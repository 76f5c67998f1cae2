"""The route table: every endpoint's method, path, name, request and reply struct and
success status, in one place. Sans-IO: no trio, no sockets, no store.

It drives the router (`match`), the handlers' binding (app.py: one `on_<name>` per
route, its body decoded as the route's `request`), and `/v1/openapi.json` (openapi.py).
It names only qclient.wire structs, so a client operation can be derived from it too.
Adding an endpoint: a row here, a handler in app.py, a section in protocol.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote

import msgspec
from qclient import wire
from qclient.wire import MAX_BATCH, NAME_PATTERN, JobSpec

from qbroker import errors


class EnqueueBody(JobSpec, frozen=True):
    """Decodes both enqueue forms: one job object, or `{"jobs": [...]}`."""

    jobs: (
        Annotated[list[JobSpec], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]
        | None
    ) = None


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  #: `{queue}` and `{id}` match one name (wire.NAME_PATTERN)
    name: str  #: the handler is `on_<name>`; labels metrics; the operationId
    request: Any  #: the struct the body decodes to; None: no body
    reply: Any  #: the success reply's struct; None: not a struct (see `media`)
    status: int = 200
    #: the request's and reply's forms, when a route takes either of two (openapi)
    request_forms: tuple[Any, ...] = ()
    reply_forms: tuple[Any, ...] = ()
    query: tuple[str, ...] = ()  #: query parameters (openapi.QUERY describes each)
    optional: bool = False  #: the body may be left out: `request`'s defaults apply
    conflict: bool = False  #: may answer 409 (stale lease or duplicate)
    media: str = "application/json"  #: the reply's type when `reply` is None


#: the job listing's query parameters besides the argument filters (`kwargs.KEY=...`)
JOB_FILTERS = ("state", "queue", "task", "schedule", "limit", "cursor")

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/queues/{queue}/jobs", "enqueue", EnqueueBody, None, 201,
          request_forms=(wire.JobSpec, wire.EnqueueManyRequest),
          reply_forms=(wire.EnqueueReply, wire.EnqueueManyReply), conflict=True),
    Route("POST", "/v1/lease", "lease", wire.LeaseRequest, wire.LeaseReply),
    Route("POST", "/v1/jobs/{id}/ack", "ack", wire.AckRequest, wire.AckReply,
          conflict=True),
    Route("POST", "/v1/jobs/{id}/fail", "fail", wire.FailRequest, wire.FailReply,
          conflict=True),
    Route("POST", "/v1/jobs/{id}/extend", "extend", wire.ExtendRequest,
          wire.ExtendReply, conflict=True),
    Route("POST", "/v1/jobs/{id}/release", "release", wire.ReleaseRequest,
          wire.ReleaseReply, conflict=True),
    Route("POST", "/v1/jobs/{id}/cancel", "cancel", None, wire.CancelReply),
    Route("POST", "/v1/ack", "ack_many", wire.AckManyRequest, wire.BatchReply),
    Route("POST", "/v1/fail", "fail_many", wire.FailManyRequest, wire.BatchReply),
    Route("POST", "/v1/release", "release_many", wire.ReleaseManyRequest,
          wire.BatchReply),
    Route("GET", "/v1/jobs/{id}", "get_job", None, wire.JobRecord),
    Route("GET", "/v1/jobs/{id}/result", "job_result", None, wire.JobRecord,
          query=("wait",)),
    Route("POST", "/v1/results", "results", wire.ResultsRequest, wire.ResultsReply),
    Route("GET", "/v1/queues", "queues", None, wire.QueueList),
    Route("GET", "/v1/queues/{queue}", "queue", None, wire.QueueStats),
    Route("POST", "/v1/queues/{queue}/pause", "pause_queue", None, wire.PauseReply),
    Route("POST", "/v1/queues/{queue}/resume", "resume_queue", None, wire.PauseReply),
    Route("POST", "/v1/queues/{queue}/purge", "purge", wire.PurgeRequest,
          wire.PurgeReply, optional=True),
    Route("GET", "/v1/limits", "limits", None, wire.LimitList),
    Route("PUT", "/v1/limits/{key}", "put_limit", wire.LimitSpec, wire.LimitRecord),
    Route("DELETE", "/v1/limits/{key}", "delete_limit", None, wire.LimitDeleted),
    Route("GET", "/v1/jobs", "list_jobs", None, wire.JobList, query=JOB_FILTERS),
    Route("POST", "/v1/jobs/retry", "retry_jobs", None, wire.RetryManyReply,
          query=JOB_FILTERS[:4]),
    Route("POST", "/v1/jobs/{id}/retry", "retry_job", None, wire.RetryReply,
          conflict=True),
    Route("DELETE", "/v1/jobs/{id}", "delete_job", None, wire.DeleteReply,
          conflict=True),
    Route("POST", "/v1/cancels", "cancels", wire.CancelsRequest, wire.CancelsReply),
    Route("POST", "/v1/kv/get", "kv_get", wire.KVGetRequest, wire.KVGetReply),
    Route("POST", "/v1/kv/set", "kv_set", wire.KVSetRequest, wire.KVVersionReply),
    Route("POST", "/v1/kv/incr", "kv_incr", wire.KVIncrRequest, wire.KVIncrReply),
    Route("POST", "/v1/kv/expire", "kv_expire", wire.KVExpireRequest,
          wire.CountReply),
    Route("POST", "/v1/kv/delete", "kv_delete", wire.KVDeleteRequest,
          wire.CountReply),
    Route("POST", "/v1/workers", "worker_beat", wire.WorkerBeat,
          wire.WorkerBeatReply),
    Route("GET", "/v1/workers", "workers", None, wire.WorkerList),
    Route("GET", "/healthz", "healthz", None, wire.Health),
    Route("GET", "/metrics", "metrics", None, None, media="text/plain"),
    Route("GET", "/v1/openapi.json", "openapi", None, None),
    Route("GET", "/v1/schedules", "schedules", None, wire.ScheduleList),
    Route("GET", "/v1/schedules/{name}", "get_schedule", None, wire.ScheduleRecord),
    Route("PUT", "/v1/schedules/{name}", "put_schedule", wire.ScheduleSpec,
          wire.ScheduleRecord),
    Route("DELETE", "/v1/schedules/{name}", "delete_schedule", None,
          wire.ScheduleDeleted),
    Route("POST", "/v1/schedules/{name}/pause", "pause_schedule", None,
          wire.ScheduleRecord),
    Route("POST", "/v1/schedules/{name}/resume", "resume_schedule", None,
          wire.ScheduleRecord),
    Route("POST", "/v1/schedules/{name}/run", "run_schedule", None,
          wire.EnqueueReply, 201),
)  # fmt: skip
BY_NAME = {r.name: r for r in ROUTES}
#: the routes whose body may be left out
OPTIONAL_BODY = frozenset(r.name for r in ROUTES if r.optional)
_NAME_RE = re.compile(NAME_PATTERN)
#: /v1/<kind>/{param}: the name of the path parameter after each kind
_PARAMS = {"jobs": "id", "queues": "queue", "schedules": "name", "limits": "key"}


def _shape(path: str) -> tuple[str, str | None, str | None]:
    """("/v1/jobs/J1/ack") -> ("/v1/jobs/{id}/ack", "id", "J1"): a path's table shape."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[1] == "v1" and parts[2] in _PARAMS:
        param = _PARAMS[parts[2]]
        value = parts[3]
        if "%" in value:  # a name percent-encoded (JavaScript's encodeURIComponent)
            try:
                value = unquote(value, errors="strict")
            except UnicodeDecodeError:
                value = ""  # matches no name
        parts[3] = "{" + param + "}"
        return "/".join(parts), param, value
    return path, None, None


# shape -> {method: route name}
_TABLE: dict[str, dict[str, str]] = {}
for _r in ROUTES:
    _TABLE.setdefault(_r.path, {})[_r.method] = _r.name
#: the paths without a parameter: matched as they are, before any shape
_LITERAL = {path: methods for path, methods in _TABLE.items() if "{" not in path}
#: shape -> the methods it takes, for a 405's Allow header (GET brings HEAD along)
_ALLOW = {
    shape: tuple(sorted(set(methods) | ({"HEAD"} if "GET" in methods else set())))
    for shape, methods in _TABLE.items()
}


def match(method: str, path: str) -> tuple[str, str | None, str | None]:
    """The route name for a request, and its path parameter's name and value if any.

    Raises:
        errors.NotFound: no route has this path.
        errors.MethodNotAllowed: a route has this path with another method.
    """
    literal = _LITERAL.get(path)  # /v1/jobs/retry before /v1/jobs/{id}
    if literal is not None:
        name = literal.get("GET" if method == "HEAD" else method)
        if name is not None:
            return name, None, None
    shape, param, value = _shape(path)
    methods = _TABLE.get(shape)
    # a schedule's name is checked by its handler: a PUT of a bad name gets 422
    if methods is None or (
        value is not None and param != "name" and not _NAME_RE.match(value)
    ):
        raise errors.NotFound(f"no route for {_quoted(path)}")
    name = methods.get("GET" if method == "HEAD" else method)
    if name is None:
        raise errors.MethodNotAllowed(
            f"{method} is not allowed on {_quoted(path)}", allow=_ALLOW[shape]
        )
    return name, param, value


QUOTED_PATH_CHARS = 100  #: characters of a path an error message repeats


def _quoted(path: str) -> str:
    """`path` for an error message: a 15 KB path is not sent back whole."""
    if len(path) <= QUOTED_PATH_CHARS:
        return path
    return f"{path[:QUOTED_PATH_CHARS]}... ({len(path)} characters)"
