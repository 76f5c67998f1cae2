"""The schedules' SQL units on a real SQLite file, `now` passed in: firing once per
tick, a crash between fire and commit, catch-up, pause, 1,000 due at once
(store/sqlite/schedules.py, driven as the writer thread drives it)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from qbroker import errors, schedules
from qbroker.store import Defaults
from qbroker.store.sqlite.reads import Reader
from qbroker.store.sqlite.schedules import FIRE_BATCH, ScheduleReads, ScheduleWrites
from qbroker.store.sqlite.schema import open_writer
from qbroker.store.sqlite.writes import Writes
from qclient.wire import FIRE_TIME_HEADER, SCHEDULE_HEADER, ScheduleSpec

T = TypeVar("T")
DEFAULTS = Defaults(max_retries=3, lease_seconds=30.0, result_ttl=86400.0)
T0 = 1_800_000_000.0


class Jobs:
    """The jobs' reads, by id (the reader pool)."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def get_jobs(self, ids: list[str]) -> dict[str, Any]:
        return self.reader.get_jobs(ids)

    def count(self) -> int:
        return len(self.reader.snapshot().jobs)


class Sched:
    """ScheduleWrites with keyword `now`, and the reads the tests need."""

    def __init__(self, writes: ScheduleWrites, reads: ScheduleReads) -> None:
        self.w, self.r = writes, reads

    def put(self, name: str, spec: ScheduleSpec, *, now: float) -> Any:
        return self.w.put(name, spec, now)

    def set_paused(self, name: str, paused: bool, *, now: float) -> Any:
        return self.w.set_paused(name, paused, now)

    def run_now(self, name: str, *, now: float, defaults: Defaults) -> Any:
        job_id, changes = self.w.run_now(name, now, defaults)
        [(_, queue, _, _)] = changes.transitions
        return job_id, queue

    def fire_due(self, *, now: float, defaults: Defaults) -> Any:
        return self.w.fire_due(now, defaults)

    def delete(self, name: str) -> None:
        self.w.delete(name)


class Names:
    """ScheduleReads as the tests read them."""

    def __init__(self, reads: ScheduleReads) -> None:
        self.reads = reads

    def get(self, name: str) -> Any:
        return self.reads.get(name)

    def all(self) -> Any:
        return self.reads.all()

    def job_ids(self, name: str, limit: int) -> list[str]:
        return [j.id for j in self.reads.jobs(name, limit)]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, Sched, Names, Jobs]]:
    path = tmp_path / "q.db"
    conn = open_writer(path, synchronous="OFF")
    reader = Reader(path)
    reads = ScheduleReads(reader)
    yield conn, Sched(ScheduleWrites(Writes(conn)), reads), Names(reads), Jobs(reader)
    reader.close()
    conn.close()


def tx(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one unit in its own committed transaction, as the writer thread does."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn(*args, **kwargs)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


def spec(**kw: Any) -> ScheduleSpec:
    return msgspec.convert({"task": "add", **kw}, ScheduleSpec)


def fire_times(reader: Names, jobs: Jobs, name: str) -> list[float]:
    records = jobs.get_jobs(reader.job_ids(name, 1000))
    return sorted(r.headers[FIRE_TIME_HEADER] for r in records.values())


def test_each_tick_fires_once_and_jobs_carry_name_and_fire_time(db: Any) -> None:
    store, sched, reader, jobs = db
    rec = tx(store, sched.put, "add10", spec(every=10, args=[3, 4]), now=T0)
    assert rec.next_run_at == T0 + 10
    for now in (T0 + 5, T0 + 10.2, T0 + 10.4, T0 + 21, T0 + 21):
        tx(store, sched.fire_due, now=now, defaults=DEFAULTS)
    assert fire_times(reader, jobs, "add10") == [T0 + 10, T0 + 20]
    [newest] = jobs.get_jobs(reader.job_ids("add10", 1)).values()
    assert newest.headers == {SCHEDULE_HEADER: "add10", FIRE_TIME_HEADER: T0 + 20}
    assert (newest.task, newest.queue, newest.args) == ("add", "add", [3, 4])
    rec = reader.get("add10")
    assert (rec.last_run_at, rec.last_job_id, rec.next_run_at) == (
        T0 + 20, newest.id, T0 + 30,
    )  # fmt: skip


def test_a_crash_between_fire_and_commit_leaves_the_tick_to_fire_once(db: Any) -> None:
    store, sched, reader, jobs = db
    tx(store, sched.put, "s", spec(every=10), now=T0)
    store.execute("BEGIN IMMEDIATE")
    fired = sched.fire_due(now=T0 + 10, defaults=DEFAULTS)
    assert fired.fired == 1
    store.execute("ROLLBACK")  # the broker died before the commit
    assert fire_times(reader, jobs, "s") == []
    assert reader.get("s").next_run_at == T0 + 10
    tx(store, sched.fire_due, now=T0 + 11, defaults=DEFAULTS)
    assert fire_times(reader, jobs, "s") == [T0 + 10]


def test_a_tick_fired_again_by_another_path_makes_no_second_job(db: Any) -> None:
    store, sched, reader, jobs = db
    tx(store, sched.put, "s", spec(every=10), now=T0)
    tx(store, sched.fire_due, now=T0 + 10, defaults=DEFAULTS)
    # a clock stepped back, or a second firing path that read the old next_run_at
    store.execute("UPDATE schedules SET next_run_at = ?", (T0 + 10,))
    fired = tx(store, sched.fire_due, now=T0 + 10.5, defaults=DEFAULTS)
    assert (fired.fired, fired.repeats) == (0, 1)
    assert fire_times(reader, jobs, "s") == [T0 + 10]
    assert reader.get("s").next_run_at == T0 + 20


@pytest.mark.parametrize(
    ("catch_up", "want"),
    [("latest", [T0 + 3600 * 5]), ("all", [T0 + 3600 * k for k in range(1, 6)]),
     ("none", [])],
)  # fmt: skip
def test_ticks_missed_while_down_follow_catch_up(
    db: Any, catch_up: str, want: list[float]
) -> None:
    store, sched, reader, jobs = db
    tx(store, sched.put, "h", spec(every=3600, catch_up=catch_up), now=T0)
    fired = tx(store, sched.fire_due, now=T0 + 3600 * 5 + 600, defaults=DEFAULTS)
    assert fire_times(reader, jobs, "h") == want
    assert fired.skipped == 5 - len(want)
    assert reader.get("h").next_run_at == T0 + 3600 * 6


def test_a_paused_schedule_does_not_fire_and_catches_up_on_resume(db: Any) -> None:
    store, sched, reader, jobs = db
    tx(store, sched.put, "p", spec(every=10), now=T0)
    tx(store, sched.set_paused, "p", True, now=T0 + 1)
    tx(store, sched.fire_due, now=T0 + 45, defaults=DEFAULTS)
    assert fire_times(reader, jobs, "p") == []
    tx(store, sched.set_paused, "p", False, now=T0 + 45)
    tx(store, sched.fire_due, now=T0 + 45, defaults=DEFAULTS)
    assert fire_times(reader, jobs, "p") == [T0 + 40]  # latest: one for four ticks


def test_put_is_idempotent_and_a_new_timing_starts_over(db: Any) -> None:
    store, sched, reader, _ = db
    tx(store, sched.put, "s", spec(every=10), now=T0)
    tx(store, sched.set_paused, "s", True, now=T0)
    rec = tx(store, sched.put, "s", spec(every=10, args=[1]), now=T0 + 7)
    assert (rec.next_run_at, rec.args, rec.paused) == (T0 + 10, [1], True)
    rec = tx(store, sched.put, "s", spec(every=60, paused=False), now=T0 + 7)
    assert (rec.next_run_at, rec.paused) == (T0 + 67, False)
    assert [r.name for r in reader.all()] == ["s"]


def test_bad_input_stores_nothing(db: Any) -> None:
    store, sched, reader, _ = db
    tx(store, sched.put, "s", spec(every=10), now=T0)
    with pytest.raises(errors.InvalidField) as caught:
        tx(store, sched.put, "s", spec(cron="99 * * * *"), now=T0)
    assert caught.value.field == "cron"
    with pytest.raises(errors.InvalidField) as caught:
        tx(store, sched.put, "s", spec(every=10, args=[2**70]), now=T0)
    assert caught.value.field == "args"
    assert reader.get("s").every == 10.0


def test_run_now_makes_a_job_and_keeps_the_next_tick(db: Any) -> None:
    store, sched, reader, _ = db
    tx(store, sched.put, "r", spec(every=3600), now=T0)
    job_id, queue = tx(store, sched.run_now, "r", now=T0 + 5, defaults=DEFAULTS)
    assert queue == "add"
    assert reader.job_ids("r", 10) == [job_id]
    rec = reader.get("r")
    assert (rec.next_run_at, rec.last_job_id) == (T0 + 3600, job_id)
    with pytest.raises(errors.ScheduleNotFound):
        tx(store, sched.run_now, "nope", now=T0, defaults=DEFAULTS)


def test_a_thousand_schedules_due_at_once_fire_in_one_call(db: Any) -> None:
    store, sched, reader, jobs = db
    for i in range(1000):
        kind = {"every": 60} if i % 2 else {"cron": "* * * * *"}
        tx(store, sched.put, f"s{i}", spec(**kind), now=T0 - 0.5)
    assert FIRE_BATCH >= 1000
    due = {r.next_run_at for r in reader.all()}
    now = max(due)
    fired = tx(store, sched.fire_due, now=now, defaults=DEFAULTS)
    assert (fired.fired, fired.more, fired.repeats) == (1000, False, 0)
    assert len(fired.changes.transitions) == jobs.count() == 1000
    assert all(len(reader.job_ids(f"s{i}", 5)) == 1 for i in range(0, 1000, 97))
    assert min(r.next_run_at for r in reader.all()) > now


def test_job_listing_is_by_schedule_only(db: Any) -> None:
    store, sched, reader, jobs = db
    for name in ("a", "a.b", "ab"):
        tx(store, sched.put, name, spec(every=1), now=T0)
    tx(store, sched.fire_due, now=T0 + 3.5, defaults=DEFAULTS)  # latest: one each
    for name in ("a", "a.b", "ab"):
        [job] = jobs.get_jobs(reader.job_ids(name, 10)).values()
        assert job.headers[SCHEDULE_HEADER] == name
    tx(store, sched.delete, "a")
    with pytest.raises(errors.ScheduleNotFound):
        reader.get("a")
    assert len(reader.job_ids("a", 10)) == 1  # its jobs stay
    assert schedules.job_id_prefix("a") != schedules.job_id_prefix("ab")
