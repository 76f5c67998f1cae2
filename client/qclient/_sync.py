"""The blocking client: plain sockets, a keep-alive pool, h11 through `_http`.

Theory of operation: each call takes an idle socket from the pool (or connects),
writes the request `_http.HTTPConnection` built, reads until a whole reply is parsed,
and puts the socket back if keep-alive allows. A socket serves one call at a time,
so one `Client` can be shared by any number of threads.

Failures before a reply (refused, reset, EOF mid-reply) and replies 408/429/503 are
retried with exponential backoff (`_http.backoff`). A reply timeout is not retried:
the broker may be busy applying the request, and waiting again would double the
caller's deadline. Every job id is chosen here, so a resent enqueue that meets 409
is the first attempt's success, not an error, once the jobs are found stored as sent
(a 409 can also mean that an id or dedup_key met another job, and nothing was stored).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import h11
from msgspec.structs import replace

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
    RECV_SIZE,
    RESULTS_REPLY,
    SEND_MANY_CHUNK,
    STATE_REPLY,
    Codec,
    ConnectionLost,
    Encoding,
    HTTPConnection,
    Response,
    Rewait,
    backoff,
    format_wait,
    path_name,
    readable_now,
    rebuild,
    should_retry,
)
from qclient._job import (
    Job,
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

__all__ = ["Client"]

_TRANSPORT_ERRORS = (OSError, ConnectionLost, h11.ProtocolError)
_EMPTY = b""


class _Conn:
    """One pooled socket and its h11 state."""

    __slots__ = ("http", "reused", "sock", "timeout")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.http = HTTPConnection()
        self.timeout = timeout  #: the socket's current timeout, to skip needless calls
        self.reused = False  #: it served a request before this one

    def close(self) -> None:
        with contextlib.suppress(OSError):  # close() of a dead socket
            self.sock.close()


class Client:
    """A blocking qbroker client for producers and workers.

    Thread-safe: it keeps a pool of keep-alive connections and gives each call its
    own. Make one per process and share it; after a fork the child drops the
    inherited connections and opens its own.

    Args:
        url: the broker's base URL; default: env QBROKER_URL, else
            http://127.0.0.1:7733.
        token: a bearer token for `Authorization`; default: env QBROKER_TOKEN.
        timeout: seconds allowed to connect and, beyond any long-poll wait, for a
            reply to arrive; a call, its retries included, gives up after about
            `timeout` plus its wait.
        retries: how many times to resend after a connection error, 408, 429 or 503
            (exponential backoff from 0.05 s, capped at 2 s, with jitter).
        encoding: "msgpack" (default, faster) or "json" on the wire.

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
        self._address = (self._codec.host, self._codec.port)
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"<qclient.Client {self.url} {self.encoding}>"

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the idle connections; later calls raise RuntimeError.

        Calls in flight in other threads finish, and close their sockets after.
        """
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ transport

    def _checkout(self, connect_timeout: float) -> _Conn:
        if self._pid != os.getpid():
            self._after_fork()
        lock = self._lock
        while True:
            with lock:
                if self._closed:
                    raise RuntimeError("this qclient.Client is closed")
                if not self._idle:
                    break
                conn = self._idle.pop()
            if readable_now(conn.sock.fileno()):
                conn.close()  # the broker closed it while it sat idle
                continue
            conn.reused = True
            return conn
        sock = socket.create_connection(self._address, timeout=connect_timeout)
        with contextlib.suppress(OSError):  # not a TCP socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock, self.timeout)

    def _after_fork(self) -> None:
        # A forked child shares the parent's sockets: two processes reading one
        # socket would steal each other's replies. Forget them (closing our copy of
        # the fd leaves the parent's open) and the lock another thread may hold.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _checkin(self, conn: _Conn) -> None:
        if conn.http.reusable:
            with self._lock:
                if not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                    self._idle.append(conn)
                    return
        conn.close()

    def _drop_idle(self) -> None:
        # One dead socket usually means the broker restarted: all idle ones are dead.
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _request(
        self,
        method: bytes,
        path: str,
        body: bytes = _EMPTY,
        wait: float = 0.0,
        rewait: Rewait | None = None,
    ) -> Response:
        """Send one request, retrying per the policy; return the final reply.

        The reply may be any status except the retried ones (while retries last).
        Long-polls and leases pass `rewait`, which builds the request anew for each
        resend: it waits only what is left of `wait` (the broker may have spent the
        rest before the connection broke), and a lease says it is a resend.

        Raises:
            ProtocolError: the broker could not be reached or the reply timed out.
            BrokerError: 408/429/503 still came back after the last retry.
        """
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
        free_retry = True  # one immediate retry for a pooled socket found dead
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
                conn = self._checkout(connect_timeout)
            except OSError as exc:  # refused, unreachable, connect timeout: not sent
                error = exc
            else:
                try:
                    response = self._roundtrip(conn, head, body, reply_timeout)
                except TimeoutError as exc:
                    conn.close()
                    raise ProtocolError(
                        f"no reply from {self.url} within {reply_timeout:g} s"
                    ) from exc
                except _TRANSPORT_ERRORS as exc:
                    conn.close()
                    self._drop_idle()
                    maybe_applied = True
                    if conn.reused and not conn.http.got_bytes and free_retry:
                        free_retry = False  # a keep-alive race: resend at once
                        continue
                    error = exc
                except BaseException:
                    conn.close()  # interrupted mid-request: the socket state is unknown
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
            time.sleep(pause)
            attempt += 1

    @staticmethod
    def _roundtrip(
        conn: _Conn, head: h11.Request, body: bytes, timeout: float
    ) -> Response:
        http = conn.http
        data = http.request(head, body)
        sock = conn.sock
        if conn.timeout != timeout:
            sock.settimeout(timeout)
            conn.timeout = timeout
        try:
            sock.sendall(data)
        except OSError as exc:
            # The broker may refuse a body early (413 before reading it) and close;
            # its reply is then the answer, not the reset our write ran into.
            try:
                while (response := http.next_response()) is None:
                    http.receive(sock.recv(RECV_SIZE))
            except (*_TRANSPORT_ERRORS, TimeoutError):
                raise exc from None
            http.reusable = False  # part of the request never left
            return response
        while (response := http.next_response()) is None:
            http.receive(sock.recv(RECV_SIZE))
        return response

    # ------------------------------------------------------------ producer

    def send(
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
        timeout: float | None = None,
        result_ttl: float | None = None,
        headers: Mapping[str, Any] | None = None,
        dedup_key: str | None = None,
    ) -> Job:
        """Enqueue one job.

        Args:
            queue: the queue's name.
            payload: a dict becomes kwargs, a list/tuple args, anything else the one
                positional argument; use either payload or args/kwargs.
            task: the function to run; default: the queue's name.
            args: positional arguments.
            kwargs: keyword arguments.
            delay: seconds from now before it may run (not with eta).
            eta: unix seconds when it may run (not with delay).
            expires: seconds from now after which it is never leased.
            priority: -1,000,000 .. 1,000,000; higher runs first.
            job_id: your own id (a repeat of a stored one raises DuplicateJob);
                default: a new time-sortable id chosen here.
            max_retries: leases allowed beyond the first; default: the broker's.
            timeout: lease seconds; default: the broker's.
            result_ttl: seconds to keep the finished job; default: the broker's.
            headers: free-form metadata passed to the worker.
            dedup_key: at most one unfinished job per queue and key.

        Returns:
            A `Job` handle; the job is durably stored when this returns.

        Raises:
            DuplicateJob: the id, or an unfinished job's dedup_key, already exists.
            InvalidRequest: a value was out of range (`.field` names it).
            ProtocolError: the broker could not be reached; the job may or may not
                be stored. Its `job_ids` holds the id chosen for it: sending again
                with `job_id=exc.job_ids[0]` is safe.
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
            response = self._request(b"POST", path, self._codec.encode(spec))
        except ProtocolError as exc:
            exc.job_ids = [spec.id or ""]
            raise
        if response.status == 409 and response.retried:
            self._accept_duplicate(response, queue, [spec])
            return Job(spec.id or "", queue, self)
        return Job(self._codec.decode(response, ENQUEUE_REPLY).id, queue, self)

    def _accept_duplicate(
        self, response: Response, queue: str, specs: list[JobSpec]
    ) -> None:
        """Accept a 409 after a resend as our lost first attempt's success only if
        every job is stored as sent (`stored_as_sent`); else raise the 409."""
        error = self._codec.error(response)
        if not isinstance(error, DuplicateJob):
            raise error
        # one request: a send_many chunk (SEND_MANY_CHUNK) is within MAX_RESULTS
        records = self.wait_jobs([spec.id or "" for spec in specs], 0.0)
        if not stored_as_sent(records, queue, specs, self._codec.roundtrip):
            raise error

    def send_many(
        self, queue: str, items: Iterable[JobSpec | Mapping[str, Any]]
    ) -> list[Job]:
        """Enqueue many jobs, up to 1,000 per request.

        Each request is all-or-nothing; with more than one request, an error leaves
        the earlier ones stored. A batch over the broker's body limit is split.

        Args:
            queue: the queue's name.
            items: `JobSpec`s, or mappings of JobSpec fields (`{"args": [1]}`); an
                item without an id gets one here.

        Returns:
            One `Job` per item, in order.

        Raises:
            DuplicateJob, InvalidRequest: as for `send()`.
            ProtocolError: the broker could not be reached. Its `job_ids` are the
                ids of the items not known stored, the last `len(job_ids)` items in
                order (the first of them may be stored): send those again with
                these ids.
            TypeError: a mapping has a key that is not a JobSpec field.
        """
        specs = specs_from_items(items)
        path = f"/v1/queues/{path_name(queue)}/jobs"
        stored: list[str] = []
        try:
            for start in range(0, len(specs), SEND_MANY_CHUNK):
                chunk = specs[start : start + SEND_MANY_CHUNK]
                self._enqueue_batch(queue, path, chunk, stored)
        except ProtocolError as exc:
            exc.job_ids = [spec.id or "" for spec in specs[len(stored) :]]
            raise
        return [Job(job_id, queue, self) for job_id in stored]

    def _enqueue_batch(
        self, queue: str, path: str, specs: list[JobSpec], stored: list[str]
    ) -> None:
        """Enqueue one batch, halved on 413; appends the ids to `stored` as each
        request is answered, so they are known stored in order."""
        body = self._codec.encode(EnqueueManyRequest(jobs=specs))
        response = self._request(b"POST", path, body)
        if response.status == 413 and len(specs) > 1:  # nothing stored: halve it
            half = len(specs) // 2
            self._enqueue_batch(queue, path, specs[:half], stored)
            self._enqueue_batch(queue, path, specs[half:], stored)
            return
        if response.status == 409 and response.retried:
            self._accept_duplicate(response, queue, specs)
            stored += [spec.id or "" for spec in specs]
        else:
            stored += self._codec.decode(response, ENQUEUE_MANY_REPLY).ids

    def job(self, job_id: str) -> Job:
        """A `Job` handle for an id (no request is made)."""
        return Job(job_id, None, self)

    # ------------------------------------------------------------ reading

    def get_job(self, job_id: str) -> JobRecord:
        """A job's whole record.

        Raises:
            JobNotFound: no such job (or its result_ttl passed).
        """
        response = self._request(b"GET", f"/v1/jobs/{path_name(job_id)}")
        return self._codec.decode(response, JOB_RECORD)

    def wait_job(self, job_id: str, wait: float) -> JobRecord:
        """A job's record once it is final, or after `wait` seconds, whichever is first.

        Args:
            job_id: the job's id.
            wait: seconds to long-poll, 0 .. 300.

        Raises:
            JobNotFound: no such job.
        """

        def build(wait: float) -> tuple[str, bytes]:
            return (
                f"/v1/jobs/{path_name(job_id)}/result?wait={format_wait(wait)}",
                _EMPTY,
            )

        response = self._request(b"GET", *build(wait), wait, build)
        return self._codec.decode(response, JOB_RECORD)

    def wait_jobs(self, job_ids: Sequence[str], wait: float) -> list[JobRecord | None]:
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

            response = self._request(b"POST", *build(wait), wait, build)
            pages.take(self._codec.decode(response, RESULTS_REPLY))
            wait = 0.0  # the rest of a reply cut short: as they were when it was sent
        return pages.records()

    def results(
        self,
        jobs: Iterable[Job | str],
        timeout: float | None = None,
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
        records = self.final_records(ids, timeout)
        return outcomes(ids, records, return_exceptions=return_exceptions)

    def final_records(
        self,
        jobs: Iterable[Job | str],
        timeout: float | None = None,
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
            got = self.wait_jobs(chunk, next_wait(deadline))
            while todo := unfinished(got):
                if deadline is not None and time.monotonic() >= deadline:
                    raise results_timeout(len(todo), len(ids), timeout)
                again = self.wait_jobs([chunk[k] for k in todo], next_wait(deadline))
                for k, record in zip(todo, again, strict=True):
                    got[k] = record
            records += got
        return records

    def cancel(self, job_id: str) -> JobState:
        """Cancel a job that has not finished; returns its state after the call.

        An active job's worker learns of it at its next extend.

        Raises:
            JobNotFound: no such job.
        """
        response = self._request(b"POST", f"/v1/jobs/{path_name(job_id)}/cancel")
        return self._codec.decode(response, CANCEL_REPLY).state

    def queues(self) -> list[QueueStats]:
        """Counts by state for every known queue."""
        return self._codec.decode(
            self._request(b"GET", "/v1/queues"), QUEUE_LIST
        ).queues

    def queue(self, name: str) -> QueueStats:
        """Counts by state for one queue (all zero for an unknown one)."""
        response = self._request(b"GET", f"/v1/queues/{path_name(name)}")
        return self._codec.decode(response, QUEUE_STATS)

    def health(self) -> Health:
        """The broker's `/healthz` reply.

        Raises:
            ProtocolError: the broker is not reachable.
        """
        return self._codec.decode(self._request(b"GET", "/healthz"), HEALTH)

    # ------------------------------------------------------------ worker

    def lease(
        self,
        queues: Sequence[str],
        *,
        max: int = 1,
        wait: float = 0.0,
        timeout: float | None = None,
        worker: str = "",
    ) -> list[LeasedJob]:
        """Lease up to `max` ready jobs from `queues` (tried in order).

        Args:
            queues: 1 to 100 queue names.
            max: 1 .. 1000 jobs at most.
            wait: seconds to long-poll when nothing is ready (0 .. 300).
            timeout: lease seconds, overriding each job's own.
            worker: this worker's name, for records and logs.

        Returns:
            The leased jobs, possibly none after `wait`. Each must be acked, failed
            or released with its `lease` token before `lease_expires_at`, or
            extended; otherwise the broker gives it to another worker.
        """
        return self.settle_and_lease(
            queues, max=max, wait=wait, timeout=timeout, worker=worker
        ).jobs

    def settle_and_lease(
        self,
        queues: Sequence[str],
        acks: Sequence[AckItem] = (),
        fails: Sequence[FailItem] = (),
        *,
        max: int = 1,
        wait: float = 0.0,
        timeout: float | None = None,
        worker: str = "",
    ) -> LeaseReply:
        """Ack and fail jobs, then lease, in one request and one commit: what a
        worker does when a slot frees. Arguments as `lease()`, `ack_many()` and
        `fail_many()`.

        The outcomes are committed before any long-poll wait, so a result long-poll
        sees them at once; their `results` come with the reply's `jobs`. A resend
        after a lost reply gets the jobs the lost reply carried (`request_id`).

        Returns:
            The leased jobs, and one `BatchResult` per ack, then per fail, in order.
        """
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
        response = self._request(b"POST", "/v1/lease", body, wait, build)
        return self._codec.decode(response, LEASE_REPLY)

    def ack(self, job_id: str, lease: str, result: Any = None) -> None:
        """Report success; the job becomes `succeeded` with `result`.

        Raises:
            StaleLease: the lease expired or moved on; stop, do not retry. (A resend
                of an ack the broker applied, its reply lost, succeeds again.)
            JobNotFound: no such job.
        """
        body = self._codec.encode(AckRequest(lease=lease, result=result))
        response = self._request(b"POST", f"/v1/jobs/{path_name(job_id)}/ack", body)
        self._expect_ok(response)

    def fail(
        self,
        job_id: str,
        lease: str,
        error: str = "",
        traceback: str | None = None,
        retry_in: float | None = None,
    ) -> str:
        """Report a failure.

        Args:
            job_id: the job's id.
            lease: its lease token.
            error: "ExceptionType: message".
            traceback: the formatted traceback.
            retry_in: seconds until a retry (if attempts are left); None: no retry.

        Returns:
            The job's new state: "scheduled" (will retry) or "failed".

        Raises:
            StaleLease: the lease expired or moved on.
            JobNotFound: no such job.
        """
        request = FailRequest(
            lease=lease, error=error, traceback=traceback, retry_in=retry_in
        )
        path = f"/v1/jobs/{path_name(job_id)}/fail"
        response = self._request(b"POST", path, self._codec.encode(request))
        return str(self._codec.decode(response, STATE_REPLY)["state"])

    def extend(
        self, job_id: str, lease: str, timeout: float | None = None
    ) -> ExtendReply:
        """Renew a lease (heartbeat).

        Args:
            job_id: the job's id.
            lease: its lease token.
            timeout: new lease seconds from now; default: the lease's own length.

        Returns:
            The new expiry; `.cancelled` True means the job was cancelled: stop it.

        Raises:
            StaleLease: the lease expired or moved on.
            JobNotFound: no such job.
        """
        body = self._codec.encode(ExtendRequest(lease=lease, timeout=timeout))
        response = self._request(b"POST", f"/v1/jobs/{path_name(job_id)}/extend", body)
        return self._codec.decode(response, EXTEND_REPLY)

    def release(self, job_id: str, lease: str) -> None:
        """Hand back a leased job not started; the attempt is not counted.

        Raises:
            StaleLease: the lease expired or moved on.
            JobNotFound: no such job.
        """
        body = self._codec.encode(ReleaseRequest(lease=lease))
        response = self._request(b"POST", f"/v1/jobs/{path_name(job_id)}/release", body)
        self._expect_ok(response)

    def release_many(self, items: Sequence[ReleaseItem]) -> list[BatchResult]:
        """Hand back many unstarted jobs in one request (attempts not counted); each
        item succeeds or fails on its own.

        Returns:
            One result per item, in order, as for `ack_many()`.
        """
        return self._batch("/v1/release", ReleaseManyRequest(releases=list(items)))

    def ack_many(self, items: Sequence[AckItem]) -> list[BatchResult]:
        """Ack many jobs in one request; each item succeeds or fails on its own.

        Returns:
            One result per item, in order; `ok` False carries the reason in `error`
            ("stale_lease", "job_not_found").
        """
        return self._batch("/v1/ack", AckManyRequest(acks=list(items)))

    def fail_many(self, items: Sequence[FailItem]) -> list[BatchResult]:
        """Fail many jobs in one request; each item succeeds or fails on its own.

        Returns:
            One result per item, in order, as for `ack_many()`.
        """
        return self._batch("/v1/fail", FailManyRequest(fails=list(items)))

    def _batch(self, path: str, request: Any) -> list[BatchResult]:
        """POST a batch request; one result per item, in order."""
        response = self._request(b"POST", path, self._codec.encode(request))
        return self._codec.decode(response, BATCH_REPLY).results

    def _expect_ok(self, response: Response) -> None:
        if not 200 <= response.status < 300:
            raise self._codec.error(response)
