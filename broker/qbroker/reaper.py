"""The reaper: a background task that promotes due jobs, expires leases and jobs, and
deletes finished jobs past their result_ttl, by the store's `sweep` verb; then fires
the schedules due (schedule_api.py).

It sleeps until the earliest thing falls due (asked of the store after each sweep), at
most REAPER_MAX_SLEEP, and is woken early by writes that create something due sooner
(a short delay, a short lease: transitions.py pokes it). No polling loop: an idle
broker sweeps once a second.
"""

from __future__ import annotations

import math

import structlog
import trio

from qbroker import errors
from qbroker.app import Broker
from qbroker.clock import BEAT_SECONDS
from qbroker.config import REAPER_MAX_SLEEP

log = structlog.get_logger("qbroker.reaper")


async def run_reaper(broker: Broker) -> None:
    """Sweep forever. A crash here propagates and stops the server (trio nurseries)."""
    while True:
        now = broker.clock.now()
        # A poke during the sweep (a write committed after the sweep's read) lowers
        # reaper_due from infinity, so the next sweep comes no later than it asks.
        broker.reaper_due = math.inf
        due = now + REAPER_MAX_SLEEP
        try:
            swept = await broker.store.sweep(now=now)
        except errors.DiskFull:
            # nothing of the sweep was written; try again at the next one, and meanwhile
            # keep serving reads (a full disk must not end the broker)
            log.warning("reaper.disk_full")
        except errors.DatabaseGone:  # logged once by the guard; reads go on
            pass
        else:
            broker.effects.apply(swept.changes, swept=True)
            if swept.next_due is not None:
                due = min(due, swept.next_due)
        due = min(due, await broker.fire_schedules(now))
        broker.reaper_due = min(due, broker.reaper_due)
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
