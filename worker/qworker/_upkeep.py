"""The upkeep thread: heartbeats, time limits, held jobs, a lease thread that ran long.

A shell around the book's `next_due`: it sleeps until the next thing is due (woken
early through `Core.upkeep_cond` when a new execution is due sooner), then

- extends each lease a third of the way through it (a heartbeat), with the task's own
  lease length for a job sent without one, and sooner to carry the progress a task
  reported (`current_job().progress()`, at most once a second per job); a reply saying
  the job was cancelled, or a stale lease, stops the run and drops its outcome;
- fails the runs over their `time_limit` and has the pool stop them;
- gives back the jobs waiting for a slot when the pool is stalled, or a prefetched one
  has waited PREFETCH_HOLD;
- starts another lease thread when the lease thread's own run lasts INLINE_LIMIT.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qclient import BrokerError, JobNotFound, ProtocolError, StaleLease

from qworker._core import Core

__all__ = ["RECONNECT_MAX", "upkeep_loop"]

RECONNECT_MAX = 5.0  #: seconds: the longest wait for a heartbeat that failed to go out


def upkeep_loop(core: Core, start_lease_thread: Callable[[int], None]) -> None:
    """Do upkeep until the book says stop.

    Args:
        core: the worker's shared state.
        start_lease_thread: starts lease thread number `gen` (called with the lock
            held, so a shutdown never joins the old one instead).
    """
    book = core.book
    while True:
        with core.lock:
            while True:
                if book.stop_reporting:
                    return
                now = time.monotonic()
                if now >= book.due:
                    break
                core.upkeep_cond.wait(book.due - now)
        take_over_lease(core, start_lease_thread)
        heartbeat(core)
        enforce_time_limits(core)
        return_held(core)
        with core.lock:
            book.due = book.next_due(time.monotonic())


def take_over_lease(core: Core, start_lease_thread: Callable[[int], None]) -> None:
    """The lease thread has run a task itself for INLINE_LIMIT: start another lease
    thread, so the free slots get jobs meanwhile. The old one ends once the task does
    (its outcome is reported as any other)."""
    with core.lock:
        ex = core.book.take_over(time.monotonic())
        if ex is None:
            return
        start_lease_thread(core.book.lease_gen)
    core.log.info("worker.lease_thread_replaced", task=ex.task.name, job_id=ex.job.id)


def heartbeat(core: Core) -> None:
    """Extend the leases due for it, with the progress their tasks reported."""
    core.the_pool.collect_progress()
    with core.lock:
        due = core.book.heartbeats_due(time.monotonic())
    for ex in due:
        job = ex.job
        progress = ex.context.last_progress
        fresh = progress is not None and progress is not ex.progress_sent
        try:
            reply = core.client.extend(
                job.id,
                job.lease,
                ex.extend_with,
                progress=progress.fraction if fresh and progress else None,
                progress_note=progress.note if fresh and progress else None,
            )
        except (StaleLease, JobNotFound) as exc:
            core.abandon(ex, "lost", exc.reason)
            continue
        except (ProtocolError, BrokerError) as exc:
            if core.refused(exc):
                return
            core.broker_down(exc)
            # Try again soon: the lease is still good for about two thirds of it.
            ex.next_extend = time.monotonic() + min(RECONNECT_MAX, ex.lease_seconds / 6)
            continue
        core.broker_up()
        if reply.cancelled:
            core.abandon(ex, "cancelled", "cancelled")
        else:
            with core.lock:
                now = time.monotonic()
                core.book.extended(ex, now)
                if fresh:
                    ex.progress_sent, ex.progress_sent_at = progress, now
            core.log.debug("job.extended", job_id=job.id, timeout=ex.lease_seconds)


def enforce_time_limits(core: Core) -> None:
    """Fail the runs over their time limit and stop them."""
    with core.lock:
        over = core.book.over_time_limit(time.monotonic())
        if over:
            core.cond.notify_all()
    for ex in over:
        ex.context.cancel()
        core.the_pool.stop_execution(ex)
        core.log.warning(
            "job.time_limit",
            task=ex.task.name,
            job_id=ex.job.id,
            time_limit=ex.task.time_limit,
        )


def return_held(core: Core) -> None:
    """Give back every job waiting here for a slot (their attempts not counted) when
    the pool is stalled (its children fail to start, so nothing would run them), or
    once a job held for prefetch has waited PREFETCH_HOLD for a slot (the slots are
    busy with longer runs than the allowance assumed, and other workers may be free)."""
    pool = core.the_pool
    if pool.stalled():
        say, event, why = core.log.warning, "worker.pool_stalled", "pool_stalled"
    else:
        with core.lock:
            overdue = core.book.prefetch_overdue(time.monotonic())
        if not overdue:
            return
        say, event, why = core.log.info, "worker.prefetch_returned", "held_too_long"
    held = core.unsettle(pool.drain())
    if held:
        say(event, jobs=len(held))
        core.release(held, why)
