"""The reaper: a background task that promotes due jobs, expires leases and jobs, and
sweeps finished jobs past their result_ttl.

It sleeps until the earliest thing falls due (asked of the store after each sweep), at
most REAPER_MAX_SLEEP, and is woken early by handlers that create something due sooner
(a short delay, a short lease). No polling loop: an idle broker sweeps once a second.
"""

from __future__ import annotations

import math

import structlog
import trio

from qbroker import errors, metrics
from qbroker.app import Broker
from qbroker.clock import BEAT_SECONDS
from qbroker.config import CHECKPOINT_INTERVAL, REAPER_MAX_SLEEP
from qbroker.store import TickResult

log = structlog.get_logger("qbroker.reaper")


async def run_reaper(broker: Broker) -> None:
    """Sweep forever. A crash here propagates and stops the server (trio nurseries)."""
    while True:
        now = broker.clock.now()
        # A poke during the sweep (a write committed after the sweep's read) lowers
        # reaper_due from infinity, so the next sweep comes no later than it asks.
        broker.reaper_due = math.inf
        try:
            result = await broker.writer.call(broker.store.tick, now=now)
        except errors.DiskFull:
            # nothing of the sweep was written; try again at the next one, and meanwhile
            # keep serving reads (a full disk must not end the broker)
            log.warning("reaper.disk_full")
            result = TickResult()
        except errors.DatabaseGone:  # logged once by the guard; reads go on
            result = TickResult()
        for queue in result.promoted_queues:
            broker.queue_waiters.notify(queue)
        broker.finished(result.finished_ids)
        metrics.count_finished(result.finished)
        for outcome, n in (
            ("promoted", result.promoted),
            ("requeued", result.requeued),
            ("dead", result.dead),
            ("expired", result.expired),
            ("purged", result.purged),
        ):
            if n:
                metrics.REAPED.labels(outcome).inc(n)
        if result.requeued or result.dead or result.expired:
            log.info("reaper.swept", requeued=result.requeued, dead=result.dead,
                     expired=result.expired)  # fmt: skip
        due = min(now + REAPER_MAX_SLEEP, broker.reaper_due)
        if result.next_due is not None:
            due = min(due, result.next_due)
        broker.reaper_due = due
        # sleep until reaper_due, which a poke may bring forward meanwhile
        while (left := broker.reaper_due - broker.clock.now()) > 0:
            broker.reaper_wakeup = trio.Event()
            with trio.move_on_after(left):
                await broker.reaper_wakeup.wait()


async def run_heartbeat(broker: Broker) -> None:
    """Mark the loop as running every BEAT_SECONDS, so that the clock can leave a
    stall of the broker out of lease times (clock.py)."""
    while True:
        broker.clock.beat()
        await trio.sleep(BEAT_SECONDS)


async def run_checkpointer(broker: Broker) -> None:
    """Checkpoint the WAL every CHECKPOINT_INTERVAL seconds, off the write path."""
    while True:
        await trio.sleep(CHECKPOINT_INTERVAL)
        try:
            await trio.to_thread.run_sync(broker.reader.checkpoint)
        except errors.DiskFull:
            # the database file could not grow; the WAL still holds every commit
            log.warning("checkpoint.disk_full")
