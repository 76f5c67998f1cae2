"""The job-control handlers: pause, purge, limits, the job listing, retry, delete and
the workers' cancel long-poll. Mixed into `Broker` (app.py), one `on_<name>` per route
of routes.py, each over one store verb, its Changes handed to transitions.py.

Live cancel. A worker keeps `POST /v1/cancels` parked, naming itself and the jobs it
runs. The poll parks in the job waiters under those ids and under its worker's key;
`on_cancel` of an active job notes the id for its worker (`cancel_notes`, only while
a poll of that worker is parked) and wakes it. The poll answers with the listed jobs
that are cancelled and the noted ones, at once when the broker stops.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio
from qclient.rates import parse_rate
from qclient.wire import (
    PURGEABLE_STATES,
    CancelsReply,
    CancelsRequest,
    DeleteReply,
    JobList,
    JobRecord,
    JobState,
    LimitDeleted,
    LimitList,
    LimitSpec,
    PauseReply,
    PurgeReply,
    PurgeRequest,
    RateSpec,
    RetryManyReply,
    RetryReply,
)

from qbroker import errors
from qbroker.jobfilter import RETRYABLE, JobFilter, parse_filter
from qbroker.protocol import Request, Response, encode

if TYPE_CHECKING:
    from qbroker.clock import Clock
    from qbroker.store import Leased, Store
    from qbroker.transitions import Effects
    from qbroker.waiters import Waiters

__all__ = ["ControlHandlers", "worker_key"]

MAX_NOTES = 10_000  #: cancelled ids noted for one worker's poll at most


def worker_key(worker: str) -> str:
    """A worker's key among the job waiters: a space keeps it apart from job ids."""
    return f" worker {worker}"


class ControlHandlers:
    """Job control's handlers; see the module docstring. Needs Broker's attributes."""

    if TYPE_CHECKING:
        store: Store
        clock: Clock
        effects: Effects
        queue_waiters: Waiters
        job_waiters: Waiters
        closing: bool

    #: worker -> ids of its jobs cancelled while one of its polls was parked
    cancel_notes: dict[str, list[str]]

    # ------------------------------------------------------------ queues

    async def on_pause_queue(self, req: Request, _: None) -> Response:
        queue = req.params["queue"]
        await self.store.set_paused(queue, True, now=self.clock.now())
        return encode(req, PauseReply(queue=queue, paused=True))

    async def on_resume_queue(self, req: Request, _: None) -> Response:
        queue = req.params["queue"]
        await self.store.set_paused(queue, False, now=self.clock.now())
        self.queue_waiters.notify(queue)  # parked leases look again
        return encode(req, PauseReply(queue=queue, paused=False))

    async def on_purge(self, req: Request, body: PurgeRequest) -> Response:
        for i, state in enumerate(body.states):
            if state not in PURGEABLE_STATES:
                raise errors.InvalidField(
                    f"states[{i}]: active jobs are never purged (a worker holds"
                    " them); cancel them instead",
                    field="states",
                )
        queue = req.params["queue"]
        deleted = 0
        while True:  # a batch per commit: other requests are served between them
            done = await self.store.purge(queue, body.states, now=self.clock.now())
            self.effects.apply(done.changes)
            deleted += done.deleted
            if not done.more:
                return encode(req, PurgeReply(deleted=deleted))

    # ------------------------------------------------------------ limits

    async def on_put_limit(self, req: Request, body: LimitSpec) -> Response:
        rate = body.rate
        if isinstance(rate, str):
            try:
                limit, per = parse_rate(rate)
            except ValueError as exc:
                raise errors.InvalidField(str(exc), field="rate") from None
            rate = RateSpec(limit=limit, per=per)
        if body.concurrency is None and rate is None:
            raise errors.InvalidField(
                "give concurrency, rate or both", field="concurrency"
            )
        record = await self.store.put_limit(
            req.params["key"],
            concurrency=body.concurrency,
            rate=rate,
            now=self.clock.now(),
        )
        # a looser limit may let held jobs start: parked leases look again
        self.queue_waiters.notify_all()
        return encode(req, record)

    async def on_limits(self, req: Request, _: None) -> Response:
        records = await self.store.limits(now=self.clock.now())
        return encode(req, LimitList(limits=records))

    async def on_delete_limit(self, req: Request, _: None) -> Response:
        key = req.params["key"]
        await self.store.delete_limit(key, now=self.clock.now())
        self.queue_waiters.notify_all()
        return encode(req, LimitDeleted(key=key, deleted=True))

    # ------------------------------------------------------------ jobs

    async def on_list_jobs(self, req: Request, _: None) -> Response:
        where = parse_filter(req.query)
        if where.schedule is not None and where == JobFilter(
            schedule=where.schedule, limit=where.limit
        ):
            # a schedule's jobs alone: their ids share a prefix (one index range)
            jobs = await self.store.schedule_jobs(where.schedule, where.limit)
            return encode(req, JobList(jobs=jobs))
        return encode(req, await self.store.list_jobs(where, now=self.clock.now()))

    async def on_retry_job(self, req: Request, _: None) -> Response:
        job_id = req.params["id"]
        changes = await self.store.retry_job(job_id, now=self.clock.now())
        self.effects.apply(changes)
        return encode(req, RetryReply(id=job_id, state=JobState.QUEUED))

    async def on_retry_jobs(self, req: Request, _: None) -> Response:
        where = parse_filter(req.query, paging=False, states=RETRYABLE)
        retried = 0
        while True:  # a window per commit, newest first, to the table's start
            done = await self.store.retry_jobs(where, now=self.clock.now())
            self.effects.apply(done.changes)
            retried += done.retried
            if done.next is None:
                return encode(req, RetryManyReply(retried=retried))
            where = where.below(done.next)

    async def on_delete_job(self, req: Request, _: None) -> Response:
        job_id = req.params["id"]
        changes = await self.store.delete_job(job_id, now=self.clock.now())
        self.effects.apply(changes)
        return encode(req, DeleteReply(id=job_id, deleted=True))

    # ------------------------------------------------------------ live cancel

    def cancelled_active(self, job_id: str, worker: str | None) -> None:
        """An active job was cancelled: tell its worker's parked poll, if any."""
        if worker is None:
            return
        key = worker_key(worker)
        if key in self.job_waiters:
            notes = self.cancel_notes.setdefault(worker, [])
            if len(notes) < MAX_NOTES:
                notes.append(job_id)
            self.job_waiters.notify(key, value=job_id)

    async def on_cancels(self, req: Request, body: CancelsRequest) -> Response:
        req.body = b""
        deadline = trio.current_time() + body.wait
        key = worker_key(body.worker)
        listed = list(dict.fromkeys(body.jobs))
        with self.job_waiters.register([*listed, key], many=True) as slot:
            while True:
                found = set(self.cancel_notes.pop(body.worker, ()))
                if listed:
                    found.update(await self.store.cancelled_among(listed))
                if found or self.closing or trio.current_time() >= deadline:
                    return encode(req, CancelsReply(cancelled=sorted(found)))
                with trio.move_on_at(deadline):
                    await slot.event.wait()
                slot.event = trio.Event()
                assert slot.values is not None
                # a listed job that finished otherwise (its final record handed
                # over) will never be cancelled: no need to look at it again
                done = {
                    job_id
                    for job_id, record in slot.values.items()
                    if isinstance(record, JobRecord)
                    and record.state is not JobState.CANCELLED
                }
                slot.values.clear()
                if done:
                    listed = [j for j in listed if j not in done]

    # ------------------------------------------------------------ held leases

    def held_deadline(self, got: Leased, deadline: float) -> float:
        """How long a lease long-poll that got nothing may park (trio time): until
        its deadline, or sooner when a rate will let a held job start."""
        if got.held is None or math.isinf(got.held):
            return deadline
        return min(
            deadline, trio.current_time() + max(0.0, got.held - self.clock.now())
        )
