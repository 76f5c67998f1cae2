"""The reporter thread: sends the outcomes the lease thread will not carry.

A shell around the book's `plan_report`: it waits until the book hands it a batch,
sends it (`ack_many`/`fail_many`), and puts back what could not reach the broker, to
try again after a capped backoff (outcomes must beat their leases' expiry, so the cap
is short). At shutdown it keeps trying for REPORT_GIVE_UP seconds, then says how many
outcomes were lost.
"""

from __future__ import annotations

import time

from qworker._book import IDLE_TICK
from qworker._core import Core
from qworker._task import backoff_delay

__all__ = ["REPORT_GIVE_UP", "report_loop"]

RECONNECT_MIN = 0.1  #: seconds: first backoff after the broker could not be reached
REPORT_RETRY_MAX = 1.0  #: seconds: the backoff's cap for outcomes
REPORT_GIVE_UP = 10.0  #: seconds shutdown keeps trying to report outcomes
MIN_WAIT = 0.002  #: seconds: the shortest look-again, so a stale window never spins


def report_loop(core: Core) -> None:
    """Report outcomes until the book says stop and none is left (or it gives up)."""
    book = core.book
    report_after = 0.0  #: monotonic time before which a failed report waits
    give_up_at: float | None = None
    failures = 0
    seen_reconnects = 0
    while True:
        with core.lock:
            while True:
                now = time.monotonic()
                if book.reconnects != seen_reconnects:
                    seen_reconnects = book.reconnects
                    report_after, failures = 0.0, 0
                if book.stop_reporting:
                    if give_up_at is None:  # a refused token will not get better
                        give_up_at = now + (
                            0.0 if core.unauthorized else REPORT_GIVE_UP
                        )
                    if not book.results or now >= give_up_at:
                        if book.results:
                            lost = len(book.results)
                            core.log.error("worker.reports_lost", jobs=lost)
                        return
                batch, wake = book.plan_report(now, report_after)
                if batch:
                    break
                if give_up_at is not None:
                    wake = give_up_at if wake is None else min(wake, give_up_at)
                wait = IDLE_TICK if wake is None else max(wake - now, MIN_WAIT)
                core.cond.wait(min(wait, IDLE_TICK))
        unsent = core.send_reports(batch)
        with core.lock:
            book.reports_returned(unsent)
            core.cond.notify_all()
        if unsent:
            failures += 1
            report_after = time.monotonic() + backoff_delay(
                failures, base=RECONNECT_MIN, cap=REPORT_RETRY_MAX, jitter=True
            )
        else:
            failures = 0
