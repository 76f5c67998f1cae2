"""Every call of the client, written once, as a sans-IO operation.

Theory of operation (h11 keeps I/O out of its state machine; so do these): an
operation is a generator. It yields each `Request` it needs answered and receives
the `Response` (any status but the retried ones; see `_retry`), or has the call's
`ProtocolError`/`BrokerError` raised at that `yield`; it returns the call's value.
`Client` and `AsyncClient` drive the same operations, one with sockets and
`time.sleep`, the other with an event loop, so each rule (a 409 after a resend,
halving a batch on 413, the chunks of a results wait) exists once. A composite call
uses `yield from` on others.

Every job id is chosen by the client, so a resent enqueue that meets 409 is the first
attempt's success, not an error, once the jobs are found stored as sent (a 409 can
also mean that an id or dedup_key met another job, and nothing was stored).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from msgspec.structs import replace

from qclient._client import Op
from qclient._errors import DuplicateJob, ProtocolError
from qclient._http import (
    BATCH_REPLY,
    CANCEL_REPLY,
    ENQUEUE_MANY_REPLY,
    ENQUEUE_REPLY,
    EXTEND_REPLY,
    HEALTH,
    JOB_RECORD,
    LEASE_REPLY,
    QUEUE_LIST,
    QUEUE_STATS,
    RESULTS_REPLY,
    SEND_MANY_CHUNK,
    STATE_REPLY,
    WORKER_LIST,
    Codec,
    Response,
    format_wait,
    path_name,
)
from qclient._job import (
    ResultsPages,
    next_wait,
    outcome,
    outcomes,
    results_timeout,
    stored_as_sent,
    unfinished,
)
from qclient._options import LeaseOptions, check_keys
from qclient._retry import Request
from qclient.wire import (
    FINAL_STATES,
    MAX_RESULTS,
    AckItem,
    AckManyRequest,
    AckRequest,
    BatchResult,
    EnqueueManyRequest,
    ExtendReply,
    ExtendRequest,
    FailItem,
    FailManyRequest,
    FailRequest,
    Health,
    JobRecord,
    JobSpec,
    JobState,
    LeaseReply,
    LeaseRequest,
    QueueStats,
    ReleaseItem,
    ReleaseManyRequest,
    ReleaseRequest,
    ResultsRequest,
    WorkerBeat,
    WorkerInfo,
)

_POST = b"POST"
_GET = b"GET"


def _jobs_path(queue: str) -> str:
    return f"/v1/queues/{path_name(queue)}/jobs"


def _job_path(job_id: str, action: str = "") -> str:
    return f"/v1/jobs/{path_name(job_id)}{action}"


def _expect_ok(codec: Codec, response: Response) -> None:
    if not 200 <= response.status < 300:
        raise codec.error(response)


# ---------------------------------------------------------------- producer


def send(codec: Codec, queue: str, spec: JobSpec) -> Op[str]:
    """Enqueue one job; returns its id. A `ProtocolError` carries that id."""
    try:
        response = yield Request(_POST, _jobs_path(queue), codec.encode(spec))
    except ProtocolError as exc:
        exc.job_ids = [spec.id or ""]
        raise
    if response.status == 409 and response.retried:
        yield from _accept_duplicate(codec, response, queue, [spec])
        return spec.id or ""
    return codec.decode(response, ENQUEUE_REPLY).id


def send_many(codec: Codec, queue: str, specs: list[JobSpec]) -> Op[list[str]]:
    """Enqueue many jobs, SEND_MANY_CHUNK per request; returns their ids in order.
    A `ProtocolError` carries the ids of the jobs not known stored."""
    stored: list[str] = []
    try:
        for start in range(0, len(specs), SEND_MANY_CHUNK):
            chunk = specs[start : start + SEND_MANY_CHUNK]
            yield from _enqueue_batch(codec, queue, chunk, stored)
    except ProtocolError as exc:
        exc.job_ids = [spec.id or "" for spec in specs[len(stored) :]]
        raise
    return stored


def _enqueue_batch(
    codec: Codec, queue: str, specs: list[JobSpec], stored: list[str]
) -> Op[None]:
    """Enqueue one batch, halved on 413; appends the ids to `stored` as each
    request is answered, so they are known stored in order."""
    body = codec.encode(EnqueueManyRequest(jobs=specs))
    response = yield Request(_POST, _jobs_path(queue), body)
    if response.status == 413 and len(specs) > 1:  # nothing stored: halve it
        half = len(specs) // 2
        yield from _enqueue_batch(codec, queue, specs[:half], stored)
        yield from _enqueue_batch(codec, queue, specs[half:], stored)
        return
    if response.status == 409 and response.retried:
        yield from _accept_duplicate(codec, response, queue, specs)
        stored += [spec.id or "" for spec in specs]
    else:
        stored += codec.decode(response, ENQUEUE_MANY_REPLY).ids


def _accept_duplicate(
    codec: Codec, response: Response, queue: str, specs: list[JobSpec]
) -> Op[None]:
    """Accept a 409 after a resend as our lost first attempt's success only if
    every job is stored as sent (`stored_as_sent`); else raise the 409."""
    error = codec.error(response)
    if not isinstance(error, DuplicateJob):
        raise error
    # one request: a send_many chunk (SEND_MANY_CHUNK) is within MAX_RESULTS
    records = yield from wait_jobs(codec, [spec.id or "" for spec in specs], 0.0)
    if not stored_as_sent(records, queue, specs, codec.roundtrip):
        raise error


# ---------------------------------------------------------------- reading


def get_job(codec: Codec, job_id: str) -> Op[JobRecord]:
    response = yield Request(_GET, _job_path(job_id))
    return codec.decode(response, JOB_RECORD)


def wait_job(codec: Codec, job_id: str, wait: float) -> Op[JobRecord]:
    def build(wait: float) -> Request:
        path = _job_path(job_id, f"/result?wait={format_wait(wait)}")
        return Request(_GET, path, wait=wait, rebuild=build)

    response = yield build(wait)
    return codec.decode(response, JOB_RECORD)


def wait_jobs(codec: Codec, ids: list[str], wait: float) -> Op[list[JobRecord | None]]:
    """One record per id of `ids`, in order: the ids a reply left out for its byte
    budget (`omitted`) are asked again at once, without a wait."""
    pages = ResultsPages(ids)
    while pages.todo:
        todo = pages.todo

        def build(wait: float, todo: list[str] = todo) -> Request:
            body = codec.encode(ResultsRequest(ids=todo, wait=wait))
            return Request(_POST, "/v1/results", body, wait, build)

        response = yield build(wait)
        pages.take(codec.decode(response, RESULTS_REPLY))
        wait = 0.0
    return pages.records()


def result(codec: Codec, job_id: str, timeout: float | None) -> Op[Any]:
    """`Job.result()`: long-poll in chunks until the job is final or `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        record = yield from wait_job(codec, job_id, next_wait(deadline))
        if record.state in FINAL_STATES:
            return outcome(record)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} still {record.state} after {timeout} s")


def final_records(
    codec: Codec, ids: list[str], timeout: float | None
) -> Op[list[JobRecord | None]]:
    """The records of `ids` once all are final: one long-poll per MAX_RESULTS ids,
    asking again for those not final yet until `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    records: list[JobRecord | None] = []
    for start in range(0, len(ids), MAX_RESULTS):
        chunk = ids[start : start + MAX_RESULTS]
        got = yield from wait_jobs(codec, chunk, next_wait(deadline))
        while todo := unfinished(got):
            if deadline is not None and time.monotonic() >= deadline:
                raise results_timeout(len(todo), len(ids), timeout)
            again = yield from wait_jobs(
                codec, [chunk[k] for k in todo], next_wait(deadline)
            )
            for k, record in zip(todo, again, strict=True):
                got[k] = record
        records += got
    return records


def results(
    codec: Codec, ids: list[str], timeout: float | None, return_exceptions: bool
) -> Op[list[Any]]:
    records = yield from final_records(codec, ids, timeout)
    return outcomes(ids, records, return_exceptions=return_exceptions)


def cancel(codec: Codec, job_id: str) -> Op[JobState]:
    response = yield Request(_POST, _job_path(job_id, "/cancel"))
    return codec.decode(response, CANCEL_REPLY).state


def queues(codec: Codec) -> Op[list[QueueStats]]:
    response = yield Request(_GET, "/v1/queues")
    return codec.decode(response, QUEUE_LIST).queues


def queue(codec: Codec, name: str) -> Op[QueueStats]:
    response = yield Request(_GET, f"/v1/queues/{path_name(name)}")
    return codec.decode(response, QUEUE_STATS)


def health(codec: Codec) -> Op[Health]:
    response = yield Request(_GET, "/healthz")
    return codec.decode(response, HEALTH)


def workers(codec: Codec) -> Op[list[WorkerInfo]]:
    response = yield Request(_GET, "/v1/workers")
    return codec.decode(response, WORKER_LIST).workers


# ---------------------------------------------------------------- worker


def beat(codec: Codec, info: WorkerBeat) -> Op[None]:
    _expect_ok(codec, (yield Request(_POST, "/v1/workers", codec.encode(info))))


def settle_and_lease(
    codec: Codec,
    queues: Sequence[str],
    acks: Sequence[AckItem],
    fails: Sequence[FailItem],
    options: LeaseOptions,
) -> Op[LeaseReply]:
    """One `POST /v1/lease` under a new `request_id`; a resend says so, and waits
    only what is left of `wait`."""
    check_keys(options, LeaseOptions)
    lease = LeaseRequest(
        queues=list(queues),
        acks=list(acks),
        fails=list(fails),
        request_id=secrets.token_hex(8),
        **options,
    )

    def build(wait: float) -> Request:
        again = codec.encode(replace(lease, wait=wait, resend=True))
        return Request(_POST, "/v1/lease", again, wait, build)

    body = codec.encode(lease)
    response = yield Request(_POST, "/v1/lease", body, lease.wait, build)
    return codec.decode(response, LEASE_REPLY)


def ack(codec: Codec, job_id: str, lease: str, result: Any) -> Op[None]:
    body = codec.encode(AckRequest(lease=lease, result=result))
    _expect_ok(codec, (yield Request(_POST, _job_path(job_id, "/ack"), body)))


def fail(
    codec: Codec,
    job_id: str,
    lease: str,
    error: str,
    traceback: str | None,
    retry_in: float | None,
) -> Op[str]:
    request = FailRequest(
        lease=lease, error=error, traceback=traceback, retry_in=retry_in
    )
    path = _job_path(job_id, "/fail")
    response = yield Request(_POST, path, codec.encode(request))
    return str(codec.decode(response, STATE_REPLY)["state"])


def extend(
    codec: Codec,
    job_id: str,
    lease: str,
    timeout: float | None,
    progress: float | None = None,
    progress_note: str | None = None,
) -> Op[ExtendReply]:
    request = ExtendRequest(
        lease=lease, timeout=timeout, progress=progress, progress_note=progress_note
    )
    body = codec.encode(request)
    response = yield Request(_POST, _job_path(job_id, "/extend"), body)
    return codec.decode(response, EXTEND_REPLY)


def release(codec: Codec, job_id: str, lease: str) -> Op[None]:
    body = codec.encode(ReleaseRequest(lease=lease))
    _expect_ok(codec, (yield Request(_POST, _job_path(job_id, "/release"), body)))


def ack_many(codec: Codec, items: Sequence[AckItem]) -> Op[list[BatchResult]]:
    return _batch(codec, "/v1/ack", AckManyRequest(acks=list(items)))


def fail_many(codec: Codec, items: Sequence[FailItem]) -> Op[list[BatchResult]]:
    return _batch(codec, "/v1/fail", FailManyRequest(fails=list(items)))


def release_many(codec: Codec, items: Sequence[ReleaseItem]) -> Op[list[BatchResult]]:
    return _batch(codec, "/v1/release", ReleaseManyRequest(releases=list(items)))


def _batch(codec: Codec, path: str, request: Any) -> Op[list[BatchResult]]:
    """POST a batch request; one result per item, in order."""
    response = yield Request(_POST, path, codec.encode(request))
    return codec.decode(response, BATCH_REPLY).results
