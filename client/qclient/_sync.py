"""The blocking client and its job handle: thin drivers of the operations in `_ops`.

Theory of operation: each method runs one operation (`_client` shows the loop): every
request it yields is tried on a pooled socket (`_sockets`), and the retry policy
(`_retry`) says whether to return the reply, sleep and resend, or raise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, Unpack

from qclient import _admin, _ops, wire
from qclient._admin import AdminMethods, JobProgress
from qclient._client import ClientBase, HandleBase, Operation, advance
from qclient._job import job_ids
from qclient._options import LeaseOptions, SendOptions, make_spec, specs_from_items
from qclient._retry import Request
from qclient._sockets import SocketPool

__all__ = ["Client", "Job"]

P = ParamSpec("P")
T = TypeVar("T")


class Client(ClientBase, AdminMethods):
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
        ca: for an `https://` URL, a PEM file of the CA that signed the broker's
            certificate (a private CA); default: env QBROKER_CA, else the system's
            CAs. The certificate and host name are always verified.

    Raises:
        ValueError: the URL is not `http://` or `https://`, the encoding is
            unknown, or the CA file cannot be used.
    """

    def _open(self) -> None:
        self._pool = SocketPool(
            (self._codec.host, self._codec.port), self.timeout, self._tls
        )

    def close(self) -> None:
        """Close the idle connections; later calls raise RuntimeError.

        Calls in flight in other threads finish, and close their sockets after.
        """
        self._pool.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(
        self,
        operation: Operation[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run an operation to its end, each request retried per the policy."""
        op = operation(self._codec, *args, **kwargs)
        step = advance(op, None)
        while isinstance(step, Request):
            retry = self._retry(step)
            while isinstance(
                pause := retry.decide(self._pool.attempt(retry), time.monotonic()),
                float,
            ):
                time.sleep(pause)
            step = advance(op, pause)
        return step.value

    # ------------------------------------------------------------ producer

    def send(
        self, queue: str, payload: Any = None, **options: Unpack[SendOptions]
    ) -> Job:
        """Enqueue one job.

        Args:
            queue: the queue's name.
            payload: a dict becomes kwargs, a list/tuple args, anything else the one
                positional argument; use either payload or args/kwargs.
            **options: `task`, `args`, `kwargs`, `delay`, `eta`, `expires`,
                `priority`, `job_id`, `max_retries`, `timeout`, `result_ttl`,
                `headers`, `dedup_key`: see `qclient.SendOptions`. Arguments of
                types JSON lacks (datetime, Decimal, UUID, set, ...) are tagged and
                reach the task as they were sent (`qclient.tags`).

        Returns:
            A `Job` handle; the job is durably stored when this returns.

        Raises:
            DuplicateJob: the id, or an unfinished job's dedup_key, already exists.
            InvalidRequest: a value was out of range (`.field` names it).
            ProtocolError: the broker could not be reached; the job may or may not
                be stored. Its `job_ids` holds the id chosen for it: sending again
                with `job_id=exc.job_ids[0]` is safe.
            TypeError: an unknown option, or payload with args/kwargs.
            ValueError: a naive datetime for `eta` or `expires`.
        """
        spec = make_spec(payload, options, now=time.time())
        return Job(self._run(_ops.send, queue, spec), queue, self)

    def send_many(self, queue: str, items: Iterable[Any]) -> list[Job]:
        """Enqueue many jobs, up to 1,000 per request.

        Each request is all-or-nothing; with more than one request, an error leaves
        the earlier ones stored. A batch over the broker's body limit is split.

        Args:
            queue: the queue's name.
            items: one per job, each meaning what `send()`'s payload means: a dict is
                kwargs, a list or tuple args, anything else the one argument. For
                options per job, pass `qclient.spec(payload, **options)` (or a
                `JobSpec`, the wire's form, sent as it is). A job without an id
                gets one here.

        Returns:
            One `Job` per item, in order.

        Raises:
            DuplicateJob, InvalidRequest: as for `send()`.
            ProtocolError: the broker could not be reached. Its `job_ids` are the
                ids of the items not known stored, the last `len(job_ids)` items in
                order (the first of them may be stored): send those again with
                these ids.
        """
        specs = specs_from_items(items)
        return [Job(i, queue, self) for i in self._run(_ops.send_many, queue, specs)]

    def job(self, job_id: str) -> Job:
        """A `Job` handle for an id (no request is made)."""
        return Job(job_id, None, self)

    # ------------------------------------------------------------ reading

    def get_job(self, job_id: str) -> wire.JobRecord:
        """A job's whole record.

        Raises:
            JobNotFound: no such job (or its result_ttl passed).
        """
        return self._run(_ops.get_job, job_id)

    def wait_job(self, job_id: str, wait: float) -> wire.JobRecord:
        """A job's record once it is final, or after `wait` seconds, whichever is first.

        Args:
            job_id: the job's id.
            wait: seconds to long-poll, 0 .. 300.

        Raises:
            JobNotFound: no such job.
        """
        return self._run(_ops.wait_job, job_id, wait)

    def wait_jobs(
        self, job_ids: Sequence[str], wait: float
    ) -> list[wire.JobRecord | None]:
        """The records of up to 1,000 jobs once all are final, or after `wait` seconds.

        One long-poll request (`POST /v1/results`); one record per id, in order,
        None where no job has that id.
        """
        return self._run(_ops.wait_jobs, list(job_ids), wait)

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
        return self._run(_ops.results, job_ids(jobs), timeout, return_exceptions)

    def final_records(
        self,
        jobs: Iterable[Job | str],
        timeout: float | None = None,
    ) -> list[wire.JobRecord | None]:
        """Wait for many jobs to finish and return their final records, in order
        (None where no job has the id): `results()` without turning them into
        values. One long-poll request per 1,000 jobs.

        Raises:
            TimeoutError: some job had not finished after `timeout` seconds.
        """
        return self._run(_ops.final_records, job_ids(jobs), timeout)

    def cancel(self, job_id: str) -> wire.JobState:
        """Cancel a job that has not finished; returns its state after the call.

        An active job's worker learns of it at its next extend.

        Raises:
            JobNotFound: no such job.
        """
        return self._run(_ops.cancel, job_id)

    def queues(self) -> list[wire.QueueStats]:
        """Counts by state for every known queue."""
        return self._run(_ops.queues)

    def queue(self, name: str) -> wire.QueueStats:
        """Counts by state for one queue (all zero for an unknown one)."""
        return self._run(_ops.queue, name)

    def health(self) -> wire.Health:
        """The broker's `/healthz` reply.

        Raises:
            ProtocolError: the broker is not reachable.
        """
        return self._run(_ops.health)

    def workers(self) -> list[wire.WorkerInfo]:
        """The workers registry: every worker heard from in the last day."""
        return self._run(_ops.workers)

    # ------------------------------------------------------------ worker

    def beat(self, info: wire.WorkerBeat) -> None:
        """Register this worker, or tell the broker it is still there (what
        `qworker` does every few seconds; `info.stopped` on its way out)."""
        self._run(_ops.beat, info)

    def lease(
        self, queues: Sequence[str], **options: Unpack[LeaseOptions]
    ) -> list[wire.LeasedJob]:
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
            extended; otherwise the broker gives it to another worker. Their args
            and kwargs are in the wire's form: `qclient.tags.untag()` them.
        """
        return self.settle_and_lease(queues, **options).jobs

    def settle_and_lease(
        self,
        queues: Sequence[str],
        acks: Sequence[wire.AckItem] = (),
        fails: Sequence[wire.FailItem] = (),
        **options: Unpack[LeaseOptions],
    ) -> wire.LeaseReply:
        """Ack and fail jobs, then lease, in one request and one commit: what a
        worker does when a slot frees. Arguments as `lease()`, `ack_many()` and
        `fail_many()`.

        The outcomes are committed before any long-poll wait, so a result long-poll
        sees them at once; their `results` come with the reply's `jobs`. A resend
        after a lost reply gets the jobs the lost reply carried (`request_id`).

        Returns:
            The leased jobs, and one `wire.BatchResult` per ack, then per fail, in order.
        """
        return self._run(_ops.settle_and_lease, queues, acks, fails, options)

    def ack(self, job_id: str, lease: str, result: Any = None) -> None:
        """Report success; the job becomes `succeeded` with `result` (sent as it is:
        `qclient.tags.tag()` it to keep datetimes and the like).

        Raises:
            StaleLease: the lease expired or moved on; stop, do not retry. (A resend
                of an ack the broker applied, its reply lost, succeeds again.)
            JobNotFound: no such job.
        """
        self._run(_ops.ack, job_id, lease, result)

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
        return self._run(_ops.fail, job_id, lease, error, traceback, retry_in)

    def extend(
        self,
        job_id: str,
        lease: str,
        timeout: float | None = None,
        *,
        progress: float | None = None,
        progress_note: str | None = None,
    ) -> wire.ExtendReply:
        """Renew a lease (heartbeat), and say how far the run has got.

        Args:
            job_id: the job's id.
            lease: its lease token.
            timeout: new lease seconds from now; default: the lease's own length.
            progress: 0.0 .. 1.0, shown in the job's record; None: unchanged.
            progress_note: a short text (up to 1,000 characters) with it.

        Returns:
            The new expiry; `.cancelled` True means the job was cancelled: stop it.

        Raises:
            StaleLease: the lease expired or moved on.
            JobNotFound: no such job.
        """
        return self._run(_ops.extend, job_id, lease, timeout, progress, progress_note)

    def release(self, job_id: str, lease: str) -> None:
        """Hand back a leased job not started; the attempt is not counted.

        Raises:
            StaleLease: the lease expired or moved on.
            JobNotFound: no such job.
        """
        self._run(_ops.release, job_id, lease)

    def release_many(self, items: Sequence[wire.ReleaseItem]) -> list[wire.BatchResult]:
        """Hand back many unstarted jobs in one request (attempts not counted); each
        item succeeds or fails on its own.

        Returns:
            One result per item, in order, as for `ack_many()`.
        """
        return self._run(_ops.release_many, items)

    def ack_many(self, items: Sequence[wire.AckItem]) -> list[wire.BatchResult]:
        """Ack many jobs in one request; each item succeeds or fails on its own.

        Returns:
            One result per item, in order; `ok` False carries the reason in `error`
            ("stale_lease", "job_not_found").
        """
        return self._run(_ops.ack_many, items)

    def fail_many(self, items: Sequence[wire.FailItem]) -> list[wire.BatchResult]:
        """Fail many jobs in one request; each item succeeds or fails on its own.

        Returns:
            One result per item, in order, as for `ack_many()`.
        """
        return self._run(_ops.fail_many, items)


class Job(HandleBase[Client]):
    """A handle on one enqueued job, as returned by `Client.send()`.

    Cheap to make (`client.job(id)`), holds no state beyond its id: every method
    asks the broker. Thread-safe as its client is.

    Attributes:
        id: the job's id.
        queue: its queue, or None when the handle was made from an id alone.
        client: the `Client` it talks through.
    """

    __slots__ = ()

    def info(self) -> wire.JobRecord:
        """The job's whole record (its args, kwargs and result in the wire's form).

        Raises:
            JobNotFound: no such job (or its result_ttl passed).
        """
        return self.client.get_job(self.id)

    def status(self) -> wire.JobState:
        """The job's current state.

        Raises:
            JobNotFound: no such job (or its result_ttl passed).
        """
        return self.client.get_job(self.id).state

    def cancel(self) -> wire.JobState:
        """Cancel the job if it has not finished; returns its state after the call.

        Raises:
            JobNotFound: no such job.
        """
        return self.client.cancel(self.id)

    def progress(self) -> JobProgress | None:
        """How far the job has got, as its task last reported it with
        `current_job().progress(...)` (reaching the broker with the worker's next
        heartbeat, within about a second); None if it never reported any.

        Raises:
            JobNotFound: no such job.
        """
        return self.client._run(_admin.progress, self.id)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its result.

        Long-polls the broker (no busy polling) in chunks of at most 60 s.

        Args:
            timeout: seconds to wait at most; None waits as long as it takes,
                0 only looks once.

        Returns:
            The value the task returned (as acked by the worker), its datetimes,
            Decimals and the like as they were returned (`qclient.tags`).

        Raises:
            TaskFailed: the task failed or died; `.traceback` holds the worker's.
            JobCancelled: the job was cancelled.
            JobExpired: the job expired before a worker took it.
            TimeoutError: the job had not finished after `timeout` seconds; it may
                still finish later, so calling `result()` again is fine.
            JobNotFound: no such job.
        """
        return self.client._run(_ops.result, self.id, timeout)
