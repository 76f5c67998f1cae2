"""The async client, for trio and asyncio alike.

Theory of operation: the same sans-IO core as the blocking client (`_http`), with a
small backend per event loop (`_backends`) that only opens streams, moves bytes,
sleeps and enforces timeouts. Each call asks sniffio which loop runs it, so one
`AsyncClient` works under `trio.run()` and `asyncio.run()`; a pooled connection
remembers the loop that opened it and is never reused by another one.

Retries, backoff and the "409 duplicate_id after a resend is success" rule are those
of `_sync.Client`; see its module docstring.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from msgspec.structs import replace

from qclient._backends import TRANSPORT_ERRORS, Backend, Stream, current_backend
from qclient._errors import DuplicateJob, ProtocolError
from qclient._http import (
    BATCH_REPLY,
    CANCEL_REPLY,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    ENQUEUE_MANY_REPLY,
    ENQUEUE_REPLY,
    EXTEND_REPLY,
    HEALTH,
    JOB_RECORD,
    LEASE_REPLY,
    MAX_IDLE_CONNECTIONS,
    QUEUE_LIST,
    QUEUE_STATS,
    RESULTS_REPLY,
    SEND_MANY_CHUNK,
    STATE_REPLY,
    Codec,
    Encoding,
    HTTPConnection,
    Response,
    Rewait,
    backoff,
    format_wait,
    path_name,
    rebuild,
    should_retry,
)
from qclient._job import (
    AsyncJob,
    ResultsPages,
    job_ids,
    make_spec,
    next_wait,
    outcomes,
    results_timeout,
    specs_from_items,
    stored_as_sent,
    unfinished,
)
from qclient.wire import (
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
    LeasedJob,
    LeaseReply,
    LeaseRequest,
    QueueStats,
    ReleaseItem,
    ReleaseManyRequest,
    ReleaseRequest,
    ResultsRequest,
)

__all__ = ["AsyncClient"]

_EMPTY = b""


class _AsyncConn:
    __slots__ = ("http", "owner", "reused", "stream")

    def __init__(self, stream: Stream, owner: object) -> None:
        self.stream = stream
        self.http = HTTPConnection()
        self.owner = owner  #: the event loop (asyncio) or trio token that opened it
        self.reused = False


# ---------------------------------------------------------------- the client


class AsyncClient:
    """The async qbroker client: `Client`'s methods as coroutines, for trio or asyncio.

    Task-safe: concurrent tasks each get their own pooled connection. Close it with
    `await client.aclose()` (or `async with`) inside the event loop that used it.

    Args:
        url: the broker's base URL; default: env QBROKER_URL, else
            http://127.0.0.1:7733.
        token: a bearer token for `Authorization`; default: env QBROKER_TOKEN.
        timeout: seconds allowed to connect and, beyond any long-poll wait, for a
            reply to arrive; a call, its retries included, gives up after about
            `timeout` plus its wait.
        retries: how many times to resend after a connection error, 408, 429 or 503.
        encoding: "msgpack" (default) or "json" on the wire.

    Raises:
        ValueError: the URL is not `http://...` or the encoding is unknown.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        encoding: Encoding = "msgpack",
    ) -> None:
        self.url: str = url or os.environ.get("QBROKER_URL") or DEFAULT_URL
        if token is None:
            token = os.environ.get("QBROKER_TOKEN")
        self.timeout = timeout
        self.retries = retries
        self.encoding: Encoding = encoding
        self._codec = Codec(self.url, token, encoding)
        self._idle: list[_AsyncConn] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"<qclient.AsyncClient {self.url} {self.encoding}>"

    # ------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Close the idle connections; later calls raise RuntimeError."""
        self._closed = True
        idle, self._idle = self._idle, []
        try:
            owner: object = current_backend().owner()
        except RuntimeError:
            owner = None
        for conn in idle:
            if conn.owner is owner:
                await conn.stream.aclose()
            else:
                conn.stream.abort()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ transport

    async def _checkout(
        self, backend: Backend, owner: object, connect_timeout: float
    ) -> _AsyncConn:
        if self._closed:
            raise RuntimeError("this qclient.AsyncClient is closed")
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.owner is not owner or conn.stream.idle_dead():
                conn.stream.abort()
                continue
            conn.reused = True
            return conn
        codec = self._codec
        stream = await backend.connect(codec.host, codec.port, connect_timeout)
        return _AsyncConn(stream, owner)

    def _checkin(self, conn: _AsyncConn) -> None:
        if (
            conn.http.reusable
            and not self._closed
            and len(self._idle) < MAX_IDLE_CONNECTIONS
        ):
            self._idle.append(conn)
        else:
            conn.stream.abort()

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.stream.abort()

    async def _request(
        self,
        method: bytes,
        path: str,
        body: bytes = _EMPTY,
        wait: float = 0.0,
        rewait: Rewait | None = None,
    ) -> Response:
        """Send one request, retrying per the policy; see `Client._request`."""
        backend = current_backend()
        owner = backend.owner()
        codec = self._codec
        target = codec.target(path)
        head = codec.head(method, target, body)
        reply_timeout = self.timeout + wait
        # retries included, a call ends within about `timeout + wait`: one connect
        # that hangs (a full listen backlog) must not take `timeout` per retry
        start = time.monotonic()
        give_up = start + reply_timeout
        attempt = 0
        maybe_applied = False
        resend = False
        free_retry = True
        while True:
            if resend and rewait is not None:
                body, head, left = rebuild(codec, method, rewait, wait, start)
                reply_timeout = self.timeout + left
            resend = True
            error: BaseException | None = None
            response: Response | None = None
            try:
                connect_timeout = max(
                    0.01, min(self.timeout, give_up - time.monotonic())
                )
                conn = await self._checkout(backend, owner, connect_timeout)
            except OSError as exc:  # refused, unreachable, connect timeout
                error = exc
            else:
                try:
                    data = conn.http.request(head, body)
                    response = await backend.exchange(
                        conn.stream, conn.http, data, reply_timeout
                    )
                except TimeoutError as exc:
                    conn.stream.abort()
                    raise ProtocolError(
                        f"no reply from {self.url} within {reply_timeout:g} s"
                    ) from exc
                except TRANSPORT_ERRORS as exc:
                    conn.stream.abort()
                    self._drop_idle()
                    maybe_applied = True
                    if conn.reused and not conn.http.got_bytes and free_retry:
                        free_retry = False
                        continue
                    error = exc
                except BaseException:
                    # Cancelled mid-request: the socket's state is unknown.
                    conn.stream.abort()
                    raise
                else:
                    self._checkin(conn)
                    if not should_retry(response.status):
                        response.retried = maybe_applied
                        return response
            pause = backoff(attempt)
            if attempt >= self.retries or time.monotonic() + pause > give_up:
                if response is not None:
                    raise codec.error(response)
                raise ProtocolError(
                    f"{method.decode()} {path} to {self.url} failed after "
                    f"{attempt} retries: {error!r}"
                ) from error
            await backend.sleep(pause)
            attempt += 1

    # ------------------------------------------------------------ producer

    async def send(
        self,
        queue: str,
        payload: Any = None,
        *,
        task: str | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        delay: float | None = None,
        eta: float | None = None,
        expires: float | None = None,
        priority: int = 0,
        job_id: str | None = None,
        max_retries: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the job's lease length
        result_ttl: float | None = None,
        headers: Mapping[str, Any] | None = None,
        dedup_key: str | None = None,
    ) -> AsyncJob:
        """Enqueue one job; see `Client.send()` for the arguments and errors.

        Returns:
            An `AsyncJob` handle; the job is durably stored when this returns.
        """
        spec = make_spec(
            payload,
            task=task,
            args=args,
            kwargs=kwargs,
            delay=delay,
            eta=eta,
            expires=expires,
            priority=priority,
            job_id=job_id,
            max_retries=max_retries,
            timeout=timeout,
            result_ttl=result_ttl,
            headers=headers,
            dedup_key=dedup_key,
        )
        path = f"/v1/queues/{path_name(queue)}/jobs"
        try:
            response = await self._request(b"POST", path, self._codec.encode(spec))
        except ProtocolError as exc:
            exc.job_ids = [spec.id or ""]
            raise
        if response.status == 409 and response.retried:
            await self._accept_duplicate(response, queue, [spec])
            return AsyncJob(spec.id or "", queue, self)
        return AsyncJob(self._codec.decode(response, ENQUEUE_REPLY).id, queue, self)

    async def _accept_duplicate(
        self, response: Response, queue: str, specs: list[JobSpec]
    ) -> None:
        """Accept a 409 after a resend as our lost first attempt's success only if
        every job is stored as sent (`stored_as_sent`); else raise the 409."""
        error = self._codec.error(response)
        if not isinstance(error, DuplicateJob):
            raise error
        # one request: a send_many chunk (SEND_MANY_CHUNK) is within MAX_RESULTS
        records = await self.wait_jobs([spec.id or "" for spec in specs], 0.0)
        if not stored_as_sent(records, queue, specs, self._codec.roundtrip):
            raise error

    async def send_many(
        self, queue: str, items: Iterable[JobSpec | Mapping[str, Any]]
    ) -> list[AsyncJob]:
        """Enqueue many jobs, up to 1,000 per request; see `Client.send_many()`."""
        specs = specs_from_items(items)
        path = f"/v1/queues/{path_name(queue)}/jobs"
        stored: list[str] = []
        try:
            for start in range(0, len(specs), SEND_MANY_CHUNK):
                chunk = specs[start : start + SEND_MANY_CHUNK]
                await self._enqueue_batch(queue, path, chunk, stored)
        except ProtocolError as exc:
            exc.job_ids = [spec.id or "" for spec in specs[len(stored) :]]
            raise
        return [AsyncJob(job_id, queue, self) for job_id in stored]

    async def _enqueue_batch(
        self, queue: str, path: str, specs: list[JobSpec], stored: list[str]
    ) -> None:
        """Enqueue one batch, halved on 413; appends the ids to `stored` as each
        request is answered, so they are known stored in order."""
        body = self._codec.encode(EnqueueManyRequest(jobs=specs))
        response = await self._request(b"POST", path, body)
        if response.status == 413 and len(specs) > 1:
            half = len(specs) // 2
            await self._enqueue_batch(queue, path, specs[:half], stored)
            await self._enqueue_batch(queue, path, specs[half:], stored)
            return
        if response.status == 409 and response.retried:
            await self._accept_duplicate(response, queue, specs)
            stored += [spec.id or "" for spec in specs]
        else:
            stored += self._codec.decode(response, ENQUEUE_MANY_REPLY).ids

    def job(self, job_id: str) -> AsyncJob:
        """An `AsyncJob` handle for an id (no request is made)."""
        return AsyncJob(job_id, None, self)

    # ------------------------------------------------------------ reading

    async def get_job(self, job_id: str) -> JobRecord:
        """A job's whole record. Raises `JobNotFound` for an unknown id."""
        response = await self._request(b"GET", f"/v1/jobs/{path_name(job_id)}")
        return self._codec.decode(response, JOB_RECORD)

    async def wait_job(self, job_id: str, wait: float) -> JobRecord:
        """A job's record once final, or after `wait` seconds (0 .. 300)."""

        def build(wait: float) -> tuple[str, bytes]:
            return (
                f"/v1/jobs/{path_name(job_id)}/result?wait={format_wait(wait)}",
                _EMPTY,
            )

        response = await self._request(b"GET", *build(wait), wait, build)
        return self._codec.decode(response, JOB_RECORD)

    async def wait_jobs(
        self, job_ids: Sequence[str], wait: float
    ) -> list[JobRecord | None]:
        """The records of up to 1,000 jobs once all are final, or after `wait` seconds.

        One long-poll request (`POST /v1/results`), and more at once for the ids
        a reply left out to stay within its byte budget; one record per id, in
        order, None where no job has that id.
        """
        pages = ResultsPages(job_ids)
        while ids := pages.todo:

            def build(wait: float, ids: list[str] = ids) -> tuple[str, bytes]:
                body = ResultsRequest(ids=ids, wait=wait)
                return "/v1/results", self._codec.encode(body)

            response = await self._request(b"POST", *build(wait), wait, build)
            pages.take(self._codec.decode(response, RESULTS_REPLY))
            wait = 0.0  # the rest of a reply cut short: as they were when it was sent
        return pages.records()

    async def results(
        self,
        jobs: Iterable[AsyncJob | str],
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.results()
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Wait for many jobs to finish and return their results, in order.

        Celery's `ResultSet.get()`: one long-poll request per 1,000 jobs, however
        they finish, instead of one `result()` each.

        Args:
            jobs: job handles or ids.
            timeout: seconds to wait at most for all of them; None: no limit.
            return_exceptions: put each failed job's exception in the list in place
                of its result, instead of raising the first one.

        Raises:
            TaskFailed, JobCancelled, JobExpired, JobNotFound: for the first job (in
                order) that did not succeed, unless `return_exceptions`.
            TimeoutError: some job had not finished after `timeout` seconds.
        """
        ids = job_ids(jobs)
        records = await self.final_records(ids, timeout)
        return outcomes(ids, records, return_exceptions=return_exceptions)

    async def final_records(
        self,
        jobs: Iterable[AsyncJob | str],
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.results()
    ) -> list[JobRecord | None]:
        """Wait for many jobs to finish and return their final records, in order
        (None where no job has the id): `results()` without turning them into
        values. One long-poll request per 1,000 jobs.

        Raises:
            TimeoutError: some job had not finished after `timeout` seconds.
        """
        ids = job_ids(jobs)
        deadline = None if timeout is None else time.monotonic() + timeout
        records: list[JobRecord | None] = []
        for start in range(0, len(ids), MAX_RESULTS):
            chunk = ids[start : start + MAX_RESULTS]
            got = await self.wait_jobs(chunk, next_wait(deadline))
            while todo := unfinished(got):
                if deadline is not None and time.monotonic() >= deadline:
                    raise results_timeout(len(todo), len(ids), timeout)
                again = await self.wait_jobs(
                    [chunk[k] for k in todo], next_wait(deadline)
                )
                for k, record in zip(todo, again, strict=True):
                    got[k] = record
            records += got
        return records

    async def cancel(self, job_id: str) -> JobState:
        """Cancel an unfinished job; returns its state after the call."""
        response = await self._request(b"POST", f"/v1/jobs/{path_name(job_id)}/cancel")
        return self._codec.decode(response, CANCEL_REPLY).state

    async def queues(self) -> list[QueueStats]:
        """Counts by state for every known queue."""
        response = await self._request(b"GET", "/v1/queues")
        return self._codec.decode(response, QUEUE_LIST).queues

    async def queue(self, name: str) -> QueueStats:
        """Counts by state for one queue (all zero for an unknown one)."""
        response = await self._request(b"GET", f"/v1/queues/{path_name(name)}")
        return self._codec.decode(response, QUEUE_STATS)

    async def health(self) -> Health:
        """The broker's `/healthz` reply."""
        return self._codec.decode(await self._request(b"GET", "/healthz"), HEALTH)

    # ------------------------------------------------------------ worker

    async def lease(
        self,
        queues: Sequence[str],
        *,
        max: int = 1,
        wait: float = 0.0,
        timeout: float | None = None,  # noqa: ASYNC109 - the lease length
        worker: str = "",
    ) -> list[LeasedJob]:
        """Lease up to `max` ready jobs from `queues`; see `Client.lease()`."""
        reply = await self.settle_and_lease(
            queues, max=max, wait=wait, timeout=timeout, worker=worker
        )
        return reply.jobs

    async def settle_and_lease(
        self,
        queues: Sequence[str],
        acks: Sequence[AckItem] = (),
        fails: Sequence[FailItem] = (),
        *,
        max: int = 1,
        wait: float = 0.0,
        timeout: float | None = None,  # noqa: ASYNC109 - the lease length
        worker: str = "",
    ) -> LeaseReply:
        """Ack and fail jobs, then lease, in one request and one commit; see
        `Client.settle_and_lease()`."""
        request = LeaseRequest(
            queues=list(queues),
            max=max,
            wait=wait,
            timeout=timeout,
            worker=worker,
            acks=list(acks),
            fails=list(fails),
            request_id=secrets.token_hex(8),
        )

        def build(wait: float) -> tuple[str, bytes]:
            again = replace(request, wait=wait, resend=True)
            return "/v1/lease", self._codec.encode(again)

        body = self._codec.encode(request)
        response = await self._request(b"POST", "/v1/lease", body, wait, build)
        return self._codec.decode(response, LEASE_REPLY)

    async def ack(self, job_id: str, lease: str, result: Any = None) -> None:
        """Report success; raises `StaleLease` if the lease moved on."""
        body = self._codec.encode(AckRequest(lease=lease, result=result))
        path = f"/v1/jobs/{path_name(job_id)}/ack"
        self._expect_ok(await self._request(b"POST", path, body))

    async def fail(
        self,
        job_id: str,
        lease: str,
        error: str = "",
        traceback: str | None = None,
        retry_in: float | None = None,
    ) -> str:
        """Report a failure; returns the new state ("scheduled" or "failed")."""
        request = FailRequest(
            lease=lease, error=error, traceback=traceback, retry_in=retry_in
        )
        path = f"/v1/jobs/{path_name(job_id)}/fail"
        response = await self._request(b"POST", path, self._codec.encode(request))
        return str(self._codec.decode(response, STATE_REPLY)["state"])

    async def extend(
        self,
        job_id: str,
        lease: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the new lease length
    ) -> ExtendReply:
        """Renew a lease; `.cancelled` in the reply means: stop the task."""
        body = self._codec.encode(ExtendRequest(lease=lease, timeout=timeout))
        path = f"/v1/jobs/{path_name(job_id)}/extend"
        return self._codec.decode(
            await self._request(b"POST", path, body), EXTEND_REPLY
        )

    async def release(self, job_id: str, lease: str) -> None:
        """Hand back a leased job not started; the attempt is not counted."""
        body = self._codec.encode(ReleaseRequest(lease=lease))
        path = f"/v1/jobs/{path_name(job_id)}/release"
        self._expect_ok(await self._request(b"POST", path, body))

    async def release_many(self, items: Sequence[ReleaseItem]) -> list[BatchResult]:
        """Hand back many unstarted jobs in one request; one result per item."""
        return await self._batch(
            "/v1/release", ReleaseManyRequest(releases=list(items))
        )

    async def ack_many(self, items: Sequence[AckItem]) -> list[BatchResult]:
        """Ack many jobs in one request; one result per item, in order."""
        return await self._batch("/v1/ack", AckManyRequest(acks=list(items)))

    async def fail_many(self, items: Sequence[FailItem]) -> list[BatchResult]:
        """Fail many jobs in one request; one result per item, in order."""
        return await self._batch("/v1/fail", FailManyRequest(fails=list(items)))

    async def _batch(self, path: str, request: Any) -> list[BatchResult]:
        """POST a batch request; one result per item, in order."""
        response = await self._request(b"POST", path, self._codec.encode(request))
        return self._codec.decode(response, BATCH_REPLY).results

    def _expect_ok(self, response: Response) -> None:
        if not 200 <= response.status < 300:
            raise self._codec.error(response)
