"""The async client and its job handle, for trio and asyncio alike: thin drivers of
the same operations (`_ops`) and retry policy (`_retry`) as the blocking client.

Theory of operation: a small backend per event loop (`_backends`) only opens streams,
moves bytes, sleeps and enforces timeouts. Each call asks sniffio which loop runs it,
so one `AsyncClient` works under `trio.run()` and `asyncio.run()`; a pooled
connection remembers the loop that opened it and is never reused by another one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, Unpack

from qclient import _admin, _ops, wire
from qclient._admin import AsyncAdminMethods, JobProgress
from qclient._backends import Backend, Stream, current_backend
from qclient._client import ClientBase, HandleBase, Operation, advance
from qclient._http import (
    MAX_IDLE_CONNECTIONS,
    TRANSPORT_ERRORS,
    HTTPConnection,
    Response,
)
from qclient._job import job_ids
from qclient._options import LeaseOptions, SendOptions, make_spec, specs_from_items
from qclient._retry import Failure, Request, Retry

__all__ = ["AsyncClient", "AsyncJob"]

P = ParamSpec("P")
T = TypeVar("T")


class _AsyncConn:
    __slots__ = ("http", "owner", "reused", "stream")

    def __init__(self, stream: Stream, owner: object) -> None:
        self.stream = stream
        self.http = HTTPConnection()
        self.owner = owner  #: the event loop (asyncio) or trio token that opened it
        self.reused = False


class AsyncClient(ClientBase, AsyncAdminMethods):
    """The async qbroker client: `Client`'s methods as coroutines, for trio or asyncio.

    Task-safe: concurrent tasks each get their own pooled connection. Close it with
    `await client.aclose()` (or `async with`) inside the event loop that used it.
    The arguments are `Client`'s.

    Raises:
        ValueError: the URL is not `http://` or `https://`, the encoding is unknown,
            or the CA file cannot be used.
    """

    def _open(self) -> None:
        self._idle: list[_AsyncConn] = []
        self._closed = False

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

    async def _run(
        self,
        operation: Operation[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run an operation to its end; see `Client._run`."""
        backend = current_backend()
        op = operation(self._codec, *args, **kwargs)
        step = advance(op, None)
        while isinstance(step, Request):
            retry = self._retry(step)
            while isinstance(
                pause := retry.decide(
                    await self._attempt(backend, retry), time.monotonic()
                ),
                float,
            ):
                await backend.sleep(pause)
            step = advance(op, pause)
        return step.value

    async def _attempt(self, backend: Backend, retry: Retry) -> Response | Failure:
        """Try `retry`'s request once, on an idle stream of this loop or a new one."""
        owner = backend.owner()
        conn = None
        if self._closed:
            raise RuntimeError("this qclient.AsyncClient is closed")
        while self._idle and conn is None:
            conn = self._idle.pop()
            if conn.owner is not owner or conn.stream.idle_dead():
                conn.stream.abort()
                conn = None
        if conn is not None:
            conn.reused = True
        else:
            codec = self._codec
            limit = retry.connect_timeout(time.monotonic())
            try:
                stream = await backend.connect(codec.host, codec.port, limit, self._tls)
            except OSError as exc:  # refused, unreachable, connect timeout
                return Failure(exc)
            conn = _AsyncConn(stream, owner)
        http = conn.http
        try:
            data = http.request(retry.head, retry.body)
            response = await backend.exchange(
                conn.stream, http, data, retry.reply_timeout
            )
        except BaseException as exc:
            conn.stream.abort()  # cancelled mid-request: the stream's state is unknown
            if not isinstance(exc, TRANSPORT_ERRORS):
                raise
            if not isinstance(exc, TimeoutError):
                self._drop_idle()
            return Failure(exc, sent=True, stale=conn.reused and not http.got_bytes)
        if (
            http.reusable
            and not self._closed
            and len(self._idle) < MAX_IDLE_CONNECTIONS
        ):
            self._idle.append(conn)
        else:
            conn.stream.abort()
        return response

    def _drop_idle(self) -> None:
        # One dead stream usually means the broker restarted: all idle ones are dead.
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.stream.abort()

    # ------------------------------------------------------------ producer

    async def send(
        self, queue: str, payload: Any = None, **options: Unpack[SendOptions]
    ) -> AsyncJob:
        """Enqueue one job; see `Client.send()` for the arguments and errors.

        Returns:
            An `AsyncJob` handle; the job is durably stored when this returns.
        """
        spec = make_spec(payload, options, now=time.time())
        return AsyncJob(await self._run(_ops.send, queue, spec), queue, self)

    async def send_many(self, queue: str, items: Iterable[Any]) -> list[AsyncJob]:
        """Enqueue many jobs, up to 1,000 per request; see `Client.send_many()`."""
        ids = await self._run(_ops.send_many, queue, specs_from_items(items))
        return [AsyncJob(job_id, queue, self) for job_id in ids]

    def job(self, job_id: str) -> AsyncJob:
        """An `AsyncJob` handle for an id (no request is made)."""
        return AsyncJob(job_id, None, self)

    # ------------------------------------------------------------ reading

    async def get_job(self, job_id: str) -> wire.JobRecord:
        """A job's whole record. Raises `JobNotFound` for an unknown id."""
        return await self._run(_ops.get_job, job_id)

    async def wait_job(self, job_id: str, wait: float) -> wire.JobRecord:
        """A job's record once final, or after `wait` seconds (0 .. 300)."""
        return await self._run(_ops.wait_job, job_id, wait)

    async def wait_jobs(
        self, job_ids: Sequence[str], wait: float
    ) -> list[wire.JobRecord | None]:
        """Up to 1,000 jobs' records once all are final, or after `wait` seconds;
        see `Client.wait_jobs()`."""
        return await self._run(_ops.wait_jobs, list(job_ids), wait)

    async def results(
        self,
        jobs: Iterable[AsyncJob | str],
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.results()
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Wait for many jobs and return their results, in order; see
        `Client.results()` for the arguments and errors."""
        ids = job_ids(jobs)
        return await self._run(_ops.results, ids, timeout, return_exceptions)

    async def final_records(
        self,
        jobs: Iterable[AsyncJob | str],
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.results()
    ) -> list[wire.JobRecord | None]:
        """Wait for many jobs and return their final records; see
        `Client.final_records()`."""
        return await self._run(_ops.final_records, job_ids(jobs), timeout)

    async def cancel(self, job_id: str) -> wire.JobState:
        """Cancel an unfinished job; returns its state after the call."""
        return await self._run(_ops.cancel, job_id)

    async def queues(self) -> list[wire.QueueStats]:
        """Counts by state for every known queue."""
        return await self._run(_ops.queues)

    async def queue(self, name: str) -> wire.QueueStats:
        """Counts by state for one queue (all zero for an unknown one)."""
        return await self._run(_ops.queue, name)

    async def health(self) -> wire.Health:
        """The broker's `/healthz` reply."""
        return await self._run(_ops.health)

    async def workers(self) -> list[wire.WorkerInfo]:
        """The workers registry; see `Client.workers()`."""
        return await self._run(_ops.workers)

    # ------------------------------------------------------------ worker

    async def beat(self, info: wire.WorkerBeat) -> None:
        """Register or refresh a worker; see `Client.beat()`."""
        await self._run(_ops.beat, info)

    async def lease(
        self, queues: Sequence[str], **options: Unpack[LeaseOptions]
    ) -> list[wire.LeasedJob]:
        """Lease up to `max` ready jobs from `queues`; see `Client.lease()`."""
        return (await self.settle_and_lease(queues, **options)).jobs

    async def settle_and_lease(
        self,
        queues: Sequence[str],
        acks: Sequence[wire.AckItem] = (),
        fails: Sequence[wire.FailItem] = (),
        **options: Unpack[LeaseOptions],
    ) -> wire.LeaseReply:
        """Ack and fail jobs, then lease, in one request and one commit; see
        `Client.settle_and_lease()`."""
        return await self._run(_ops.settle_and_lease, queues, acks, fails, options)

    async def ack(self, job_id: str, lease: str, result: Any = None) -> None:
        """Report success; raises `StaleLease` if the lease moved on."""
        await self._run(_ops.ack, job_id, lease, result)

    async def fail(
        self,
        job_id: str,
        lease: str,
        error: str = "",
        traceback: str | None = None,
        retry_in: float | None = None,
    ) -> str:
        """Report a failure; returns the new state ("scheduled" or "failed")."""
        return await self._run(_ops.fail, job_id, lease, error, traceback, retry_in)

    async def extend(
        self,
        job_id: str,
        lease: str,
        timeout: float | None = None,  # noqa: ASYNC109 - the new lease length
        *,
        progress: float | None = None,
        progress_note: str | None = None,
    ) -> wire.ExtendReply:
        """Renew a lease, with the run's progress; `.cancelled` in the reply means:
        stop the task."""
        return await self._run(
            _ops.extend, job_id, lease, timeout, progress, progress_note
        )

    async def release(self, job_id: str, lease: str) -> None:
        """Hand back a leased job not started; the attempt is not counted."""
        await self._run(_ops.release, job_id, lease)

    async def release_many(
        self, items: Sequence[wire.ReleaseItem]
    ) -> list[wire.BatchResult]:
        """Hand back many unstarted jobs in one request; one result per item."""
        return await self._run(_ops.release_many, items)

    async def ack_many(self, items: Sequence[wire.AckItem]) -> list[wire.BatchResult]:
        """Ack many jobs in one request; one result per item, in order."""
        return await self._run(_ops.ack_many, items)

    async def fail_many(self, items: Sequence[wire.FailItem]) -> list[wire.BatchResult]:
        """Fail many jobs in one request; one result per item, in order."""
        return await self._run(_ops.fail_many, items)


class AsyncJob(HandleBase[AsyncClient]):
    """The `AsyncClient` counterpart of `Job`: the same methods, as coroutines.

    Attributes:
        id: the job's id.
        queue: its queue, or None when the handle was made from an id alone.
        client: the `AsyncClient` it talks through.
    """

    __slots__ = ()

    async def info(self) -> wire.JobRecord:
        """The job's whole record. Raises `JobNotFound` for an unknown id."""
        return await self.client.get_job(self.id)

    async def status(self) -> wire.JobState:
        """The job's current state. Raises `JobNotFound` for an unknown id."""
        return (await self.client.get_job(self.id)).state

    async def cancel(self) -> wire.JobState:
        """Cancel the job if unfinished; returns its state after the call."""
        return await self.client.cancel(self.id)

    async def progress(self) -> JobProgress | None:
        """How far the job has got; see `Job.progress()`."""
        return await self.client._run(_admin.progress, self.id)

    async def result(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - mirrors Job.result()
    ) -> Any:
        """Wait for the job to finish and return its result; see `Job.result()` for
        what it returns and raises."""
        return await self.client._run(_ops.result, self.id, timeout)
