"""Schedules in the broker: the `/v1/schedules` handlers and the reaper's firing step.

`ScheduleHandlers` is a base of app.Broker: its `on_<name>` methods answer the schedule
routes of routes.py, and `fire_schedules` is the reaper's step that fires due ticks
(one store unit: the jobs and the schedules' next ticks commit together, see
store/sqlite/schedules.py). A write that makes a tick due sooner (a new schedule, a
resume) pokes the reaper through transitions.py, as a short delay does.
"""

from __future__ import annotations

import math

import structlog
from qclient.wire import (
    EnqueueReply,
    ScheduleDeleted,
    ScheduleList,
    ScheduleSpec,
)

from qbroker import errors, metrics
from qbroker.clock import Clock
from qbroker.protocol import Request, Response, encode
from qbroker.store import Changes, Defaults, Store
from qbroker.transitions import Effects

HELD_RETRY = 1.0  #: seconds before a firing the disk or a lost database held is retried
log = structlog.get_logger("qbroker.schedules")


class ScheduleHandlers:
    """The schedule endpoints and firing step; app.Broker provides these attributes."""

    store: Store
    clock: Clock
    effects: Effects
    defaults: Defaults

    async def on_put_schedule(self, req: Request, body: ScheduleSpec) -> Response:
        record = await self.store.put_schedule(
            req.params["name"], body, now=self.clock.now()
        )
        if not record.paused:
            self.effects.apply(Changes(due=record.next_run_at))
        return encode(req, record)

    async def on_schedules(self, req: Request, _: None) -> Response:
        return encode(req, ScheduleList(schedules=await self.store.schedules()))

    async def on_get_schedule(self, req: Request, _: None) -> Response:
        return encode(req, await self.store.get_schedule(req.params["name"]))

    async def on_delete_schedule(self, req: Request, _: None) -> Response:
        await self.store.delete_schedule(req.params["name"])
        return encode(req, ScheduleDeleted())

    async def on_pause_schedule(self, req: Request, _: None) -> Response:
        return await self._set_paused(req, True)

    async def on_resume_schedule(self, req: Request, _: None) -> Response:
        return await self._set_paused(req, False)

    async def _set_paused(self, req: Request, paused: bool) -> Response:
        record = await self.store.pause_schedule(
            req.params["name"], paused, now=self.clock.now()
        )
        if not paused:
            self.effects.apply(Changes(due=record.next_run_at))
        return encode(req, record)

    async def on_run_schedule(self, req: Request, _: None) -> Response:
        job_id, changes = await self.store.run_schedule(
            req.params["name"], defaults=self.defaults, now=self.clock.now()
        )
        self.effects.apply(changes)
        return encode(req, EnqueueReply(id=job_id), 201)

    async def fire_schedules(self, now: float) -> float:
        """The reaper's step: fire what is due at `now`.

        Returns:
            when it must run next (`now` if more was due than one unit takes).
        """
        try:
            fired = await self.store.fire_schedules(defaults=self.defaults, now=now)
        except (errors.DiskFull, errors.DiskLow, errors.DatabaseGone) as exc:
            # nothing of it was written: its ticks wait, then follow catch_up
            if not isinstance(exc, errors.DatabaseGone):  # the guard logs that
                log.warning("schedules.held", reason=exc.reason)
            return now + HELD_RETRY
        self.effects.apply(fired.changes)
        for outcome, n in (
            ("fired", fired.fired),
            ("skipped", fired.skipped),
            ("repeated", fired.repeats),
        ):
            if n:
                metrics.SCHEDULE_TICKS.labels(outcome).inc(n)
        if fired.more:
            return now
        return math.inf if fired.next_due is None else fired.next_due
