"""Schedules in the broker: the `/v1/schedules` handlers and the task that fires them.

The firing task sleeps until the earliest next tick of a running schedule (asked of the
store after each pass), at most SCHEDULER_MAX_SLEEP, and is woken early by a handler
that makes a tick due sooner (a new schedule, a resume). Each pass is one writer call:
its jobs and the schedules' next ticks commit together (schedule_store.py).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog
import trio
from qclient.wire import (
    SCHEDULE_HEADER,
    EnqueueReply,
    ScheduledJobList,
    ScheduleList,
    ScheduleSpec,
)

from qbroker import errors, metrics
from qbroker.app import Broker
from qbroker.protocol import Request, Response, decode, encode
from qbroker.schedule_store import LIST_MAX, Fired, ScheduleReader, ScheduleStore

SCHEDULER_MAX_SLEEP = 60.0  #: seconds the firing task sleeps at most between passes
HELD_RETRY = 1.0  #: seconds before a pass the disk or a lost database held is retried
LIST_DEFAULT = 100  #: jobs `GET /v1/jobs?schedule=` returns unless `limit` says
log = structlog.get_logger("qbroker.schedules")
Handler = Callable[[Request], Awaitable[Response]]


class Schedules:
    """The schedule endpoints and the firing task of one `serve()` run."""

    def __init__(
        self, broker: Broker, store: ScheduleStore, reader: ScheduleReader
    ) -> None:
        self.broker = broker
        self.store = store
        self.reader = reader
        self.wakeup = trio.Event()
        self.due = 0.0  #: when the firing task will next look (unix seconds)

    def handlers(self) -> dict[str, Handler]:
        """Route name -> handler, for the broker's table (protocol.ROUTES names)."""
        return {
            "schedules": self.on_list,
            "get_schedule": self.on_get,
            "put_schedule": self.on_put,
            "delete_schedule": self.on_delete,
            "pause_schedule": self.on_pause,
            "resume_schedule": self.on_resume,
            "run_schedule": self.on_run,
            "list_jobs": self.on_jobs,
        }

    def poke(self, due: float) -> None:
        """Bring the next firing pass forward to `due` if that is sooner."""
        if due < self.due:
            self.due = due
            self.wakeup.set()

    # ---------------------------------------------------------------- endpoints

    async def on_put(self, req: Request) -> Response:
        spec = decode(req, ScheduleSpec)
        b = self.broker
        record = await b.writer.call(
            self.store.put, req.params["name"], spec, now=b.clock.now()
        )
        if not record.paused:
            self.poke(record.next_run_at)
        return encode(req, record)

    async def on_list(self, req: Request) -> Response:
        records = await self.broker.reads.call(self.reader.all)
        return encode(req, ScheduleList(schedules=records))

    async def on_get(self, req: Request) -> Response:
        record = await self.broker.reads.call(self.reader.get, req.params["name"])
        return encode(req, record)

    async def on_delete(self, req: Request) -> Response:
        await self.broker.writer.call(self.store.delete, req.params["name"])
        return encode(req, {})

    async def on_pause(self, req: Request) -> Response:
        return await self._set_paused(req, True)

    async def on_resume(self, req: Request) -> Response:
        return await self._set_paused(req, False)

    async def _set_paused(self, req: Request, paused: bool) -> Response:
        b = self.broker
        record = await b.writer.call(
            self.store.set_paused, req.params["name"], paused, now=b.clock.now()
        )
        if not paused:
            self.poke(record.next_run_at)
        return encode(req, record)

    async def on_run(self, req: Request) -> Response:
        b = self.broker
        if b.floor is not None:
            b.floor.check()  # as an enqueue does
        job_id, queue = await b.writer.call(
            self.store.run_now,
            req.params["name"],
            now=b.clock.now(),
            defaults=b.defaults,
        )
        metrics.jobs_enqueued(queue).inc()
        b.queue_waiters.notify(queue, 1)
        return encode(req, EnqueueReply(id=job_id), 201)

    async def on_jobs(self, req: Request) -> Response:
        name = req.query.get("schedule")
        if name is None:
            raise errors.InvalidField(
                "list jobs by schedule: GET /v1/jobs?schedule=NAME", field="schedule"
            )
        limit = req.query.get("limit", str(LIST_DEFAULT))
        if not limit.isdigit() or not 1 <= int(limit) <= LIST_MAX:
            raise errors.InvalidField(
                f"limit must be an integer within [1, {LIST_MAX}]", field="limit"
            )
        b = self.broker

        def read() -> ScheduledJobList:
            ids = self.reader.job_ids(name, int(limit))
            records = b.reader.get_jobs(ids)
            return ScheduledJobList(
                jobs=[
                    r
                    for i in ids
                    if (r := records.get(i)) is not None
                    and r.headers.get(SCHEDULE_HEADER) == name
                ]
            )

        return encode(req, await b.reads.call(read))

    # ---------------------------------------------------------------- firing

    async def run(self) -> None:
        """Fire due schedules forever. A crash here propagates and stops the server."""
        b = self.broker
        while True:
            now = b.clock.now()
            # a poke during the pass lowers `due` from infinity (see reaper.py)
            self.due = math.inf
            try:
                if b.floor is not None:
                    b.floor.check()  # ticks held back meanwhile follow catch_up
                fired = await b.writer.call(
                    self.store.fire_due, now=now, defaults=b.defaults
                )
            except (errors.DiskFull, errors.DiskLow, errors.DatabaseGone) as exc:
                # nothing of the pass was written: its ticks wait, then follow catch_up
                if not isinstance(exc, errors.DatabaseGone):  # the guard logs that
                    log.warning("schedules.held", reason=exc.reason)
                fired = Fired(next_due=now + HELD_RETRY)
            self._count(fired)
            if fired.more:
                continue
            due = min(now + SCHEDULER_MAX_SLEEP, self.due)
            if fired.next_due is not None:
                due = min(due, fired.next_due)
            self.due = due
            while (left := self.due - b.clock.now()) > 0:
                self.wakeup = trio.Event()
                with trio.move_on_after(left):
                    await self.wakeup.wait()

    def _count(self, fired: Fired) -> None:
        for queue, n in fired.queues.items():
            metrics.jobs_enqueued(queue).inc(n)
            self.broker.queue_waiters.notify(queue, n)
        for outcome, n in (
            ("fired", sum(fired.queues.values())),
            ("skipped", fired.skipped),
            ("repeated", fired.repeats),
        ):
            if n:
                metrics.SCHEDULE_TICKS.labels(outcome).inc(n)


def open_schedules(broker: Broker, store: ScheduleStore, path: Path) -> Schedules:
    """The Schedules of a broker, its handlers added to the broker's routes."""
    schedules = Schedules(broker, store, ScheduleReader(path))
    broker.add_routes(schedules.handlers())
    return schedules
