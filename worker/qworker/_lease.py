"""The lease thread: lease jobs for free slots, carrying settled outcomes along.

A shell around the book (`_book.py`, which explains the policy): it waits until the
book has room, waits a moment more when the book says outcomes or slots are about to
come, sends one `POST /v1/lease` carrying the outcomes the book hands it, and gives the
jobs that come back to the pool (or, for a quick task in a threads pool, runs the last
one itself). Transport trouble is logged once as `broker.unreachable` and retried with
capped exponential backoff; with `--burst` the worker gives up, exit status 1, once the
broker has been unreachable for the client's timeout. A 401/403 stops the worker.
"""

from __future__ import annotations

import functools
import time

from qclient import BrokerError, ProtocolError
from qclient.wire import LeasedJob

from qworker._book import runnable
from qworker._core import Core, transient
from qworker._execute import Execution, describe
from qworker._reports import split
from qworker._task import backoff_delay
from qworker.pools import ThreadPool
from qworker.registry import Registry

__all__ = ["MAX_LEASE", "RECONNECT_MAX", "RECONNECT_MIN", "LeaseLoop"]

MAX_LEASE = 1000  #: jobs in one lease request (the protocol's limit)
RECONNECT_MIN = 0.1  #: seconds: first backoff after the broker could not be reached
RECONNECT_MAX = 5.0  #: seconds: the backoff's cap while the broker stays unreachable
STALLED_LOOK = 0.5  #: seconds between looks at a stalled pool (no child could start)
BURST_LOOK = (
    0.5  #: seconds a drained burst waits for a run to end before it looks again
)


class LeaseLoop:
    """The lease thread's loop; `run(gen)` is the thread's target.

    Args:
        core: the worker's shared state.
        queues: queues to lease from, in order.
        name: the worker's name in the broker's records.
        lease_wait: seconds one lease request long-polls when nothing is ready.
        registry: where leased jobs' tasks are looked up.
    """

    def __init__(
        self,
        core: Core,
        *,
        queues: list[str],
        name: str,
        lease_wait: float,
        registry: Registry,
    ) -> None:
        self.core = core
        self.queues = queues
        self.name = name
        self.lease_wait = lease_wait
        self._resolve = functools.partial(runnable, registry)

    def run(self, gen: int = 0) -> None:
        """Lease until stopping (or replaced: `gen` is no longer the book's)."""
        core, book, client = self.core, self.core.book, self.core.client
        failures = 0
        unreachable_since: float | None = None
        carry = True  #: take settled outcomes along with the next lease
        dispatched = False  #: the last lease brought jobs and the queue had no more
        while True:
            with core.lock:
                # "In flight" lasts until here, dispatch included: the outcomes
                # settled meanwhile are taken below when a slot is free.
                book.lease_in_flight = False
                book.lease_parked = carry
                while not book.stopping and not (free := book.room(time.monotonic())):
                    core.cond.wait(STALLED_LOOK if book.stalled() else None)
                moment = book.carry_moment() if carry else None
                if (
                    moment is not None
                ):  # runs are short: a moment's wait saves a request
                    if dispatched:
                        free = self._await_outcomes(free, moment)
                    elif book.should_gather(free):
                        free = self._gather_slots(free, moment)
                dispatched = False
                plan = book.plan_lease(carry, self.lease_wait)
                if plan is None or book.results:
                    core.cond.notify_all()  # what is left is the reporter's
                if plan is None:
                    return
            carry = True
            ack_reports, fail_reports, acks, fails = split(plan.batch)
            try:
                reply = client.settle_and_lease(
                    self.queues,
                    acks,
                    fails,
                    max=min(free, MAX_LEASE),
                    wait=plan.wait,
                    worker=self.name,
                )
            except (ProtocolError, BrokerError) as exc:
                with core.lock:
                    book.lease_failed(plan.batch)
                    core.cond.notify_all()
                if core.refused(exc):
                    return  # the worker stops, status 1
                if plan.batch and not transient(exc):
                    carry = False  # refused with them: lease again without them
                    continue
                failures += 1
                if transient(exc):
                    core.broker_down(exc)
                    now = time.monotonic()
                    if unreachable_since is None:
                        unreachable_since = now
                    if book.burst and now - unreachable_since >= client.timeout:
                        self._give_up(exc, now - unreachable_since)
                        return
                    pause = backoff_delay(
                        failures, base=RECONNECT_MIN, cap=RECONNECT_MAX, jitter=True
                    )
                else:  # 422...: say so every time; someone must fix something
                    core.log.error("worker.lease_refused", error=describe(exc))
                    pause = RECONNECT_MAX
                self._sleep_unless_stopping(max(pause, RECONNECT_MIN / 2))
                continue
            failures = 0
            unreachable_since = None
            jobs = reply.jobs
            with core.lock:
                book.backlog = reply.more
            core.broker_up()
            if plan.batch:
                core.log_reports(ack_reports + fail_reports, reply.results)
            dispatched = bool(jobs) and not reply.more
            inline = self._dispatch(jobs, inline_ok=dispatched)
            if inline is not None:
                pool = core.the_pool
                assert isinstance(pool, ThreadPool)
                pool.run_here(inline)
                with core.lock:
                    if not book.inline_done(inline, gen):
                        return  # it ran too long: another thread leases now
            if book.burst and not jobs:
                if plan.idle:  # nothing ready, nothing ran or waited to be reported
                    core.log.info("worker.drained")
                    core.stop_requested.set()
                    return
                with core.lock:  # wait for a task to end, then look again
                    core.cond.wait(BURST_LOOK)

    def _give_up(self, exc: Exception, seconds: float) -> None:
        self.core.log.error(
            "worker.gave_up",
            url=self.core.client.url,
            error=describe(exc),
            unreachable_for=round(seconds, 1),
            fix="start the broker or check --url; --burst does not wait for it",
        )
        self.core.fail_stop()

    def _dispatch(
        self, jobs: list[LeasedJob], inline_ok: bool = False
    ) -> Execution | None:
        """Hand leased jobs to the pool; return the one to run here, if any (see
        `SlotBook.admit`). If that run lasts INLINE_LIMIT, the upkeep thread starts
        another lease thread."""
        if not jobs:
            return None
        core = self.core
        with core.lock:
            reports = len(core.book.results)
            admitted = core.book.admit(
                jobs, time.monotonic(), self._resolve, inline_ok=inline_ok
            )
            # wake only whom it concerns: failures to report, something due sooner
            if len(core.book.results) > reports:
                core.cond.notify_all()
            if admitted is not None and admitted.due_lowered:
                core.upkeep_cond.notify_all()
        if admitted is None:  # stopping
            core.release_jobs(jobs, "not_started")
            return None
        pool = core.the_pool
        for ex in admitted.to_run:
            pool.submit(ex)
        return admitted.inline

    def _await_outcomes(self, free: int, moment: float) -> int:
        """The jobs just dispatched drained the queue: wait up to `moment` for an
        outcome, so it rides on the next lease instead of an ack of its own (lock
        held). Returns the free slots."""
        book, cond = self.core.book, self.core.cond
        until = time.monotonic() + moment
        while book.awaits_outcome() and (left := until - time.monotonic()) > 0:
            cond.wait(left)
        return book.room(time.monotonic()) or free

    def _gather_slots(self, free: int, moment: float) -> int:
        """More jobs are ready: wait up to `moment` for the slots whose runs began
        less than that ago, so that one lease refills them all instead of one
        request per slot (lock held). Returns the free slots."""
        book, cond = self.core.book, self.core.cond
        until = time.monotonic() + moment
        while not book.stopping:
            now = time.monotonic()
            free = book.room(now) or free
            left = until - now
            if free >= book.concurrency or left <= 0:
                break
            if not book.about_to_free(now, moment):
                break  # what still runs is not about to end: lease for what is free
            cond.wait(left)
        return free

    def _sleep_unless_stopping(self, seconds: float) -> None:
        book, cond = self.core.book, self.core.cond
        deadline = time.monotonic() + seconds
        with cond:
            while not book.stopping and (left := deadline - time.monotonic()) > 0:
                cond.wait(left)
