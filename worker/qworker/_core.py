"""What a worker's threads share: the slot book under one lock, and the I/O around it.

The book (`_book.py`) decides; this module does what the book cannot: it holds the
lock and the two conditions the threads wait on, the broker client, the pool and the
log, and it sends reports and releases. The loops (`_lease.py`, `_reporter.py`,
`_upkeep.py`) and the `Worker` (`runner.py`) build on it.

Locking: every book call is made under `lock`. `cond` wakes the lease thread, the
reporter and a shutdown waiting for runs to end; `upkeep_cond` (same lock) wakes only
the upkeep thread, when something is due sooner than it was told. No I/O under the lock.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from qclient import BrokerError, Client, JobNotFound, ProtocolError, StaleLease
from qclient.wire import AckItem, BatchResult, FailItem, LeasedJob, ReleaseItem

from qworker._book import MAX_BATCH, SlotBook
from qworker._execute import Execution, Outcome, describe
from qworker._reports import Report, split
from qworker.pools import Pool

__all__ = ["AUTH_STATUSES", "Core", "transient"]

AUTH_STATUSES = (401, 403)  #: the broker refuses us: no retry can help


def transient(exc: Exception) -> bool:
    """Whether an error means "the broker is not there right now" (retry later)."""
    if isinstance(exc, BrokerError):
        return exc.status >= 500 or exc.status in (408, 429)
    return True  # ProtocolError: refused, reset, timed out


class Core:
    """The book, its lock and the I/O the worker's threads share.

    Args:
        book: the slot book.
        client: the broker client (thread-safe).
        log: the worker's bound logger.
        stop_requested: set to make the worker shut down (the main thread waits on it).
    """

    def __init__(
        self,
        book: SlotBook,
        client: Client,
        log: Any,
        stop_requested: threading.Event,
    ) -> None:
        self.book = book
        self.client = client
        self.log = log
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.upkeep_cond = threading.Condition(self.lock)
        self.pool: Pool | None = None
        self.stop_requested = stop_requested
        self.exit_code = 0
        self.unauthorized = False  #: the broker refused our token: stop, exit 1

    @property
    def the_pool(self) -> Pool:
        """The pool; it is made before any loop starts."""
        assert self.pool is not None, "the pool starts before any loop"
        return self.pool

    def wake_all(self) -> None:
        """Wake every waiting thread (lock held)."""
        self.cond.notify_all()
        self.upkeep_cond.notify_all()

    def fail_stop(self) -> None:
        """Stop with exit status 1: an error no retry can fix."""
        self.exit_code = 1
        self.stop_requested.set()

    # ------------------------------------------------------------ broker health

    def broker_down(self, exc: BaseException) -> None:
        with self.lock:
            changed = self.book.broker_seen(False)
        if changed:
            url = self.client.url
            self.log.warning("broker.unreachable", url=url, error=describe(exc))

    def broker_up(self) -> None:
        with self.lock:
            changed = self.book.broker_seen(True)
            if changed:  # outcomes waiting out a backoff go now
                self.cond.notify_all()
        if changed:
            self.log.info("broker.reconnected", url=self.client.url)

    def refused(self, exc: Exception) -> bool:
        """If the broker refused our credentials (401, or 403: a token without the
        worker role) or its certificate failed verification, say so once, in one
        line, and stop the worker with status 1. Returns whether it did."""
        untrusted = isinstance(exc, ProtocolError) and isinstance(
            exc.__cause__, ssl.SSLCertVerificationError
        )
        if untrusted:
            event, status = "worker.tls_refused", None
            fix = "pass the CA that signed the broker's certificate: --ca or QBROKER_CA"
        elif isinstance(exc, BrokerError) and exc.status in AUTH_STATUSES:
            event, status = "worker.unauthorized", exc.status
            fix = "pass the broker's token with --token or QBROKER_TOKEN"
            if exc.status == 403:
                fix = "give the worker a token of the worker role (--token, QBROKER_TOKEN)"
        else:
            return False
        with self.lock:
            first, self.unauthorized = not self.unauthorized, True
        if first:
            self.log.error(
                event, url=self.client.url, status=status, error=describe(exc), fix=fix
            )
            self.fail_stop()
        return True

    # ------------------------------------------------------------ settling

    def on_done(self, ex: Execution, outcome: Outcome) -> None:
        """A pool reports a run. Called from pool threads."""
        with self.lock:
            if self.book.settle(ex, outcome, time.monotonic()):
                self.cond.notify_all()

    def unsettle(self, executions: Sequence[Execution]) -> list[Execution]:
        """Settle executions with no outcome to report; tell their tasks they no
        longer count. Returns the ones not settled before."""
        with self.lock:
            taken = self.book.unsettle(executions)
            self.cond.notify_all()
        for ex in taken:
            ex.context.cancel()
        return taken

    def abandon(self, ex: Execution, outcome: str, reason: str) -> None:
        """Stop an execution whose outcome must not be reported (cancelled, lost)."""
        if not self.unsettle([ex]):
            return
        self.the_pool.stop_execution(ex)
        started = ex.started_at
        duration = time.monotonic() - started if started is not None else 0.0
        self.log_finished(ex.job, outcome, duration, reason=reason)

    # ------------------------------------------------------------ logging

    def log_finished(
        self, job: LeasedJob, outcome: str, duration: float, **extra: Any
    ) -> None:
        """The one `job.finished` line of each delivery. Never the job's arguments."""
        ordinary = outcome in ("succeeded", "retry", "failed")
        level = self.log.info if ordinary else self.log.warning
        level(
            "job.finished",
            task=job.task,
            job_id=job.id,
            queue=job.queue,
            attempt=job.attempt,
            duration=round(duration, 6),
            outcome=outcome,
            **extra,
        )

    def log_reports(
        self, reports: Sequence[Report], results: Sequence[BatchResult]
    ) -> None:
        """Log what the broker made of reports: one `job.finished` line each."""
        for report, result in zip(reports, results, strict=False):
            extra: dict[str, Any] = {}
            item = report.item
            if isinstance(item, FailItem):
                extra["error"] = item.error.partition(":")[0]  # the type, not the text
                if item.retry_in is not None:
                    extra["retry_in"] = round(item.retry_in, 3)
            if result.ok:
                self.log_finished(report.job, report.outcome, report.duration, **extra)
            else:
                # stale_lease / job_not_found: the lease expired or the job was
                # cancelled, and another delivery owns it now. Drop this report.
                reason = result.error or "unknown"
                self.log_finished(
                    report.job, "lost", report.duration, reason=reason, **extra
                )

    # ------------------------------------------------------------ reporting

    def send_reports(self, batch: list[Report]) -> list[Report]:
        """Report a batch. Returns the reports the broker could not be reached for
        (or, after a 401/403, could not take)."""
        ack_reports, fail_reports, acks, fails = split(batch)
        pending = ack_reports + fail_reports
        try:
            if acks:
                self.log_reports(ack_reports, self.client.ack_many(acks))
                pending = fail_reports
            if fails:
                self.log_reports(fail_reports, self.client.fail_many(fails))
                pending = []
        except (ProtocolError, BrokerError) as exc:
            if self.refused(exc):
                return pending
            if transient(exc):
                self.broker_down(exc)
                return pending
            # The batch as a whole was refused (say 413, too large): one by one.
            return [r for r in pending if not self.send_one(r)]
        self.broker_up()
        return []

    def send_one(self, report: Report) -> bool:
        """Report one job alone; if the broker refuses its result, fail the job.

        Returns:
            False if the broker could not be reached (keep the report for later).
        """
        job, item = report.job, report.item
        error: str | None = None
        try:
            if isinstance(item, AckItem):
                try:
                    self.client.ack(item.id, item.lease, item.result)
                except BrokerError as exc:
                    if isinstance(exc, StaleLease | JobNotFound) or transient(exc):
                        raise
                    report.outcome = "failed"
                    report.item = item = FailItem(
                        id=job.id,
                        lease=job.lease,
                        error=f"InvalidResult: the broker refused the result: {exc}",
                    )
                    self.client.fail(item.id, item.lease, item.error)
            else:
                try:
                    self.client.fail(
                        item.id, item.lease, item.error, item.traceback, item.retry_in
                    )
                except BrokerError as exc:
                    if isinstance(exc, StaleLease | JobNotFound) or transient(exc):
                        raise
                    short = item.error[:1000]  # and without the traceback this time
                    self.client.fail(item.id, item.lease, short, None, item.retry_in)
        except (BrokerError, ProtocolError) as exc:
            if self.refused(exc):
                return False
            if transient(exc):
                self.broker_down(exc)
                return False
            error = exc.reason if isinstance(exc, BrokerError) else "refused"
        result = BatchResult(id=job.id, ok=error is None, error=error)
        self.log_reports([report], [result])
        return True

    # ------------------------------------------------------------ releasing

    def release(self, executions: Sequence[Execution], why: str) -> None:
        self.release_jobs([ex.job for ex in executions], why)

    def release_jobs(self, jobs: Sequence[LeasedJob], why: str) -> None:
        """Hand jobs back unstarted, MAX_BATCH per request. One that cannot be comes
        back when its lease expires, with the attempt counted."""
        for start in range(0, len(jobs), MAX_BATCH):
            chunk = jobs[start : start + MAX_BATCH]
            items = [ReleaseItem(id=job.id, lease=job.lease) for job in chunk]
            try:
                results = self.client.release_many(items)
            except (BrokerError, ProtocolError) as exc:
                results = [
                    BatchResult(id=job.id, ok=False, error=describe(exc))
                    for job in chunk
                ]
            for job, result in zip(chunk, results, strict=False):
                if result.ok:
                    fields = {"task": job.task, "job_id": job.id, "queue": job.queue}
                    self.log.info("job.released", reason=why, **fields)
                else:
                    error = result.error or "unknown"
                    self.log.warning("job.release_failed", job_id=job.id, error=error)
