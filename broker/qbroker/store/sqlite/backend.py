"""The SQLite backend of the store interface: one file, one writer thread that group-
commits every write unit (writer.py), a few reader threads for reads (readers.py), and
a checkpointer that keeps the WAL from growing.

Each write verb submits one unit of writes.py (or sweep.py) to the writer and returns
once the commit that made it durable is done; each read verb runs one method of
reads.py on a reader thread. The trio loop never waits on SQLite.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import structlog
import trio
from qclient.wire import (
    AckItem,
    FailItem,
    JobList,
    JobRecord,
    JobSpec,
    JobState,
    KVItem,
    LeaseRequest,
    LimitRecord,
    QueueStats,
    RateSpec,
    ReleaseItem,
    ScheduleRecord,
    ScheduleSpec,
    WorkerBeat,
    WorkerInfo,
)

from qbroker import errors
from qbroker.config import CHECKPOINT_INTERVAL
from qbroker.jobfilter import JobFilter
from qbroker.store.interface import (
    Cancelled,
    Changes,
    Defaults,
    Enqueued,
    Extended,
    Failed,
    Fired,
    Purged,
    Released,
    Retried,
    Settled,
    Snapshot,
    Swept,
)
from qbroker.store.sqlite import kv, schema, workers
from qbroker.store.sqlite.guards import FileGuard, FreeSpaceFloor
from qbroker.store.sqlite.readers import ReadThreads
from qbroker.store.sqlite.reads import Reader
from qbroker.store.sqlite.schedules import ScheduleReads, ScheduleWrites
from qbroker.store.sqlite.sweep import sweep
from qbroker.store.sqlite.writer import Writer
from qbroker.store.sqlite.writes import Writes

log = structlog.get_logger("qbroker.store")


class SQLiteStore:
    """The store on one SQLite file. Open with `open()` on the trio thread; every
    verb is called from the trio thread; `aclose()` ends it."""

    def __init__(
        self,
        path: Path,
        writes: Writes,
        writer: Writer,
        guard: FileGuard,
        floor: FreeSpaceFloor,
    ) -> None:
        self.path = path
        self._writes = writes
        self._writer = writer
        self._guard = guard  #: fails writes and pings once the file is gone
        self._floor = floor  #: refuses enqueues while the disk is nearly full
        self._reader = Reader(path)
        self._reads = ReadThreads()
        self._schedule_writes = ScheduleWrites(writes)
        self._schedule_reads = ScheduleReads(self._reader)

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: str = "FULL",
        max_db_bytes: int | None = None,
        min_free_disk: int = 0,
    ) -> SQLiteStore:
        """Check, migrate and open the file at `path`, and start the threads.

        Args:
            max_db_bytes: a quota on the file; writes past it get errors.DiskFull.
            min_free_disk: bytes free on the file's disk under which enqueues get
                errors.DiskLow (0: no floor).

        Raises:
            errors.InternalError: damaged, not a database, or of a newer schema.
        """
        conn = await trio.to_thread.run_sync(
            lambda: schema.open_writer(
                path, synchronous=synchronous, max_db_bytes=max_db_bytes
            )
        )
        writes = Writes(conn)
        guard = FileGuard(path)
        writer = Writer(conn, writes.rolled_back, guard.check)
        floor = FreeSpaceFloor(path.parent, min_free_disk)
        store = cls(path, writes, writer, guard, floor)
        store._writer.start()
        store._reads.start()
        return store

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._writer.stop)
            await trio.to_thread.run_sync(self._reads.stop)
            self._reader.close()
            self._guard.close()

    async def maintain(self) -> None:
        """Checkpoint the WAL every CHECKPOINT_INTERVAL seconds, off the write path;
        raise if the writer thread dies (the server then stops, for a supervisor to
        restart it on the file as last committed)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._checkpoints)
            await self._writer.died.wait()
            raise errors.InternalError("the writer thread died") from self._writer.error

    async def _checkpoints(self) -> None:
        while True:
            await trio.sleep(CHECKPOINT_INTERVAL)
            try:
                await trio.to_thread.run_sync(self._reader.checkpoint)
            except errors.DiskFull:
                # the database file could not grow; the WAL still holds every commit
                log.warning("checkpoint.disk_full")

    # ------------------------------------------------------------ writes

    def _write(self, fn: Any, *args: Any) -> Awaitable[Any]:
        writer = self._writer
        return writer.wait(writer.submit(fn, *args))

    def enqueue_and_hand_off(
        self,
        queue: str,
        specs: Sequence[JobSpec],
        leases: Sequence[LeaseRequest],
        *,
        defaults: Defaults,
        now: float,
    ) -> Awaitable[Enqueued]:
        self._floor.check()  # raises here, before anything is submitted
        return self._write(
            self._writes.enqueue_and_hand_off, queue, specs, leases, defaults, now
        )

    def cancel(
        self, job_id: str, *, watched: Sequence[str], now: float
    ) -> Awaitable[Cancelled]:
        return self._write(self._writes.cancel, job_id, watched, now)

    def lease(
        self, request: LeaseRequest, *, resend: bool, now: float
    ) -> Awaitable[Settled]:
        return self._write(
            self._writes.settle_and_lease, (), (), request, resend, (), now
        )

    def settle_and_lease(
        self,
        acks: Sequence[AckItem],
        fails: Sequence[FailItem],
        request: LeaseRequest | None,
        *,
        resend: bool,
        watched: Sequence[str],
        now: float,
    ) -> Awaitable[Settled]:
        return self._write(
            self._writes.settle_and_lease, acks, fails, request, resend, watched, now
        )

    def ack(
        self,
        job_id: str,
        lease: str,
        result: Any,
        *,
        watched: Sequence[str],
        now: float,
    ) -> Awaitable[Changes]:
        return self._write(self._writes.ack, job_id, lease, result, watched, now)

    def fail(
        self,
        job_id: str,
        lease: str,
        *,
        error: str,
        traceback: str | None,
        retry_in: float | None,
        watched: Sequence[str],
        now: float,
    ) -> Awaitable[Failed]:
        return self._write(
            self._writes.fail, job_id, lease, error, traceback, retry_in, watched, now
        )

    def extend(
        self,
        job_id: str,
        lease: str,
        *,
        lease_seconds: float | None,
        now: float,
        progress: float | None = None,
        progress_note: str | None = None,
    ) -> Awaitable[Extended]:
        return self._write(
            self._writes.extend,
            job_id,
            lease,
            lease_seconds,
            now,
            progress,
            progress_note,
        )

    def release(self, job_id: str, lease: str, *, now: float) -> Awaitable[Changes]:
        return self._write(self._writes.release, job_id, lease, now)

    def release_many(
        self, items: Sequence[ReleaseItem], *, now: float
    ) -> Awaitable[Released]:
        return self._write(self._writes.release_many, items, now)

    def kv_set(
        self, key: str, value: Any, ttl: float | None, *, now: float
    ) -> Awaitable[int]:
        return self._write(kv.set_value, self._writes.conn, key, value, ttl, now)

    def kv_incr(
        self, key: str, by: int, ttl: float | None, *, now: float
    ) -> Awaitable[tuple[int, int]]:
        return self._write(kv.incr, self._writes.conn, key, by, ttl, now)

    def kv_expire(self, key: str, ttl: float | None, *, now: float) -> Awaitable[int]:
        return self._write(kv.expire, self._writes.conn, key, ttl, now)

    def kv_delete(self, keys: Sequence[str], *, now: float) -> Awaitable[int]:
        return self._write(kv.delete, self._writes.conn, keys, now)

    def sweep(self, *, now: float) -> Awaitable[Swept]:
        return self._write(sweep, self._writes.conn, now)

    # ------------------------------------------------------------ schedules

    def put_schedule(
        self, name: str, spec: ScheduleSpec, *, now: float
    ) -> Awaitable[ScheduleRecord]:
        return self._write(self._schedule_writes.put, name, spec, now)

    def delete_schedule(self, name: str) -> Awaitable[None]:
        return self._write(self._schedule_writes.delete, name)

    def pause_schedule(
        self, name: str, paused: bool, *, now: float
    ) -> Awaitable[ScheduleRecord]:
        return self._write(self._schedule_writes.set_paused, name, paused, now)

    def run_schedule(
        self, name: str, *, defaults: Defaults, now: float
    ) -> Awaitable[tuple[str, Changes]]:
        self._floor.check()  # as an enqueue
        return self._write(self._schedule_writes.run_now, name, now, defaults)

    def fire_schedules(self, *, defaults: Defaults, now: float) -> Awaitable[Fired]:
        self._floor.check()  # as an enqueue: the ticks wait, then follow catch_up
        return self._write(self._schedule_writes.fire_due, now, defaults)

    def get_schedule(self, name: str) -> Awaitable[ScheduleRecord]:
        return self._reads.call(self._schedule_reads.get, name)

    def schedules(self) -> Awaitable[list[ScheduleRecord]]:
        return self._reads.call(self._schedule_reads.all)

    def schedule_jobs(self, name: str, limit: int) -> Awaitable[list[JobRecord]]:
        return self._reads.call(self._schedule_reads.jobs, name, limit)

    # ------------------------------------------------------------ reads

    def get_job(self, job_id: str, *, now: float | None = None) -> Awaitable[JobRecord]:
        return self._reads.call(self._reader.get_job, job_id, now)

    def get_jobs(self, job_ids: Sequence[str]) -> Awaitable[dict[str, JobRecord]]:
        return self._reads.call(self._reader.get_jobs, job_ids)

    def unfinished(self, job_ids: Sequence[str]) -> Awaitable[set[str]]:
        return self._reads.call(self._reader.unfinished, job_ids)

    def queue_stats(self, queue: str, *, now: float) -> Awaitable[QueueStats]:
        return self._reads.call(self._reader.queue_stats, queue, now)

    def queues(self, *, now: float) -> Awaitable[list[QueueStats]]:
        return self._reads.call(self._reader.queues, now)

    def ping(self) -> Awaitable[None]:
        lost = self._guard.check()
        if lost is not None:
            raise lost
        return self._reads.call(self._reader.ping)

    def queues_holding(self, queues: Sequence[str]) -> Awaitable[set[str]]:
        return self._reads.call(self._reader.queues_holding, queues)

    def kv_get(self, keys: Sequence[str], *, now: float) -> Awaitable[list[KVItem]]:
        return self._reads.call(self._reader.kv_get, keys, now)

    def beat_worker(self, beat: WorkerBeat, *, now: float) -> Awaitable[None]:
        return self._write(workers.beat, self._writes.conn, beat, now)

    def workers(self, *, now: float) -> Awaitable[list[WorkerInfo]]:
        return self._reads.call(self._reader.workers, now)

    def snapshot(self) -> Awaitable[Snapshot]:
        return self._reads.call(self._reader.snapshot)

    # ------------------------------------------------------------ job control

    def set_paused(self, queue: str, paused: bool, *, now: float) -> Awaitable[None]:
        return self._write(self._writes.set_paused, queue, paused, now)

    def purge(
        self, queue: str, states: Sequence[JobState], *, now: float
    ) -> Awaitable[Purged]:
        return self._write(self._writes.purge, queue, states, now)

    def put_limit(
        self,
        key: str,
        *,
        concurrency: int | None,
        rate: RateSpec | None,
        now: float,
    ) -> Awaitable[LimitRecord]:
        return self._write(self._writes.put_limit, key, concurrency, rate, now)

    def delete_limit(self, key: str, *, now: float) -> Awaitable[None]:
        return self._write(self._writes.delete_limit, key, now)

    def limits(self, *, now: float) -> Awaitable[list[LimitRecord]]:
        return self._reads.call(self._reader.limits, now)

    def retry_job(self, job_id: str, *, now: float) -> Awaitable[Changes]:
        return self._write(self._writes.retry_job, job_id, now)

    def retry_jobs(self, where: JobFilter, *, now: float) -> Awaitable[Retried]:
        return self._write(self._writes.retry_jobs, where, now)

    def delete_job(self, job_id: str, *, now: float) -> Awaitable[Changes]:
        return self._write(self._writes.delete_job, job_id, now)

    def list_jobs(self, where: JobFilter, *, now: float) -> Awaitable[JobList]:
        return self._reads.call(self._reader.list_jobs, where, now)

    def cancelled_among(self, job_ids: Sequence[str]) -> Awaitable[list[str]]:
        return self._reads.call(self._reader.cancelled_among, job_ids)
