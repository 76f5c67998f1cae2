"""The worker's slot book without threads, sockets or a clock, and the worker's layout.

Every decision the worker's threads make from their shared state is a method of
`SlotBook` taking `now`; these tests drive it by hand (h11-style sans-IO tests).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

import pytest
from qclient.wire import AckItem, FailItem, LeasedJob
from qworker import Task
from qworker._book import (
    CARRY_POLL,
    INLINE_LIMIT,
    MAX_BATCH,
    PREFETCH_HOLD,
    SlotBook,
    runnable,
)
from qworker._execute import BROKER_DEFAULT_LEASE, Execution, Outcome
from qworker.registry import Registry

WORKER_SRC = Path(__file__).resolve().parent.parent / "worker" / "qworker"


def _fn(x: int = 0) -> int:
    return x


def _job(n: int, task: str = "t", **fields: Any) -> LeasedJob:
    values: dict[str, Any] = {
        "id": f"j{n}", "queue": "q", "task": task, "args": [], "kwargs": {},
        "headers": {}, "lease": f"l{n}", "attempt": 1, "max_retries": 3,
        "timeout": 30.0, "lease_expires_at": 0.0,
    }  # fmt: skip
    values.update(fields)
    return LeasedJob(**values)


def _registry(*tasks: Task[..., Any]) -> Registry:
    reg = Registry()
    for t in tasks:
        reg.register(t)
    return reg


def _book(concurrency: int = 2, **options: Any) -> SlotBook:
    book = SlotBook(concurrency, **options)
    book.due = 100.0  # as if upkeep had just found nothing due before then
    return book


def _admit(book: SlotBook, reg: Registry, jobs: list[LeasedJob], now: float) -> Any:
    return book.admit(jobs, now, functools.partial(runnable, reg))


OK = Outcome(ok=True, result=1)


def test_room_is_the_free_slots_and_none_while_the_pool_is_stalled() -> None:
    stalled = False
    book = _book(2, stalled=lambda: stalled)
    reg = _registry(Task(_fn, name="t"))
    assert book.room(0.0) == 2
    admitted = _admit(book, reg, [_job(1)], 0.0)
    assert [ex.job.id for ex in admitted.to_run] == ["j1"]
    assert book.room(0.0) == 1
    stalled = True
    assert book.room(0.0) == 0


def test_room_adds_the_prefetch_allowance_and_refills_it_by_halves() -> None:
    book = _book(2, prefetch=100)
    reg = _registry(Task(_fn, name="t"))
    assert book.room(0.0) == 2  # no run measured yet: hold none
    book.mean_run = 0.1  # 2 slots, 0.1 s a run: 20 start within PREFETCH_HOLD
    assert PREFETCH_HOLD == 1.0
    assert book.room(0.0) == 22
    admitted = _admit(book, reg, [_job(n) for n in range(12)], 0.0)
    for ex in admitted.to_run[:2]:
        ex.started_at = 0.0
    assert book.room(0.0) == 0  # 10 free of 20: wait until half is free
    book.backlog = True
    assert book.room(0.0) == 10


def test_a_job_no_task_here_can_run_is_failed_at_once_without_retry() -> None:
    book = _book()
    reg = _registry(Task(_fn, name="t", max_retries=0))
    jobs = [_job(1, task="missing"), _job(2, attempt=2), _job(3)]
    admitted = _admit(book, reg, jobs, 5.0)
    assert [ex.job.id for ex in admitted.to_run] == ["j3"]
    missing, too_many = book.results
    assert isinstance(missing.item, FailItem) and missing.item.retry_in is None
    assert missing.item.error.startswith("NotRegistered: no task named 'missing'")
    assert isinstance(too_many.item, FailItem) and too_many.item.retry_in is None
    assert too_many.item.error.startswith("TooManyAttempts: attempt 2")


def test_stopping_admits_nothing() -> None:
    book = _book()
    book.stopping = True
    assert _admit(book, _registry(Task(_fn, name="t")), [_job(1)], 0.0) is None
    assert book.plan_lease(True, 5.0) is None


def test_an_outcome_settles_once_and_a_late_one_is_dropped() -> None:
    book = _book()
    [ex] = _admit(book, _registry(Task(_fn, name="t")), [_job(1)], 0.0).to_run
    ex.started_at = 1.0
    assert book.settle(ex, OK, 1.5)
    assert book.mean_run == 0.5
    assert not book.settle(ex, OK, 2.0)  # stopped before, or a second report
    [report] = book.results
    assert isinstance(report.item, AckItem) and report.outcome == "succeeded"
    assert book.unsettle([ex]) == []


def test_a_failure_retries_within_the_smaller_of_the_jobs_and_the_tasks_bound() -> None:
    book = _book()
    reg = _registry(Task(_fn, name="t", max_retries=1, retry_backoff=False))
    first, last = _admit(book, reg, [_job(1), _job(2, attempt=2)], 0.0).to_run
    boom = Outcome(ok=False, error="ValueError: x", retry=True)
    book.settle(first, boom, 1.0)
    book.settle(last, boom, 1.0)
    assert [r.outcome for r in book.results] == ["retry", "failed"]
    assert [r.retry_in for r in book.results] == [0.0, None]


def test_a_lease_carrying_outcomes_long_polls_briefly_and_never_past_a_retry() -> None:
    book = _book(2)
    reg = _registry(Task(_fn, name="t"))
    plan = book.plan_lease(True, 5.0)
    assert plan is not None and (plan.batch, plan.wait, plan.idle) == ([], 5.0, True)
    a, b = _admit(book, reg, [_job(1), _job(2)], 0.0).to_run
    book.settle(a, OK, 0.1)
    plan = book.plan_lease(True, 5.0)
    assert plan is not None and [r.job.id for r in plan.batch] == ["j1"]
    assert plan.wait == CARRY_POLL  # its job.finished line leaves with the reply
    book.settle(b, Outcome(ok=False, error="E", retry=True, retry_delay=0.01), 0.2)
    plan = book.plan_lease(True, 5.0)
    assert plan is not None and plan.wait == 0.01
    book.lease_failed(plan.batch)  # the request failed: the outcomes go back
    assert [r.job.id for r in book.results] == ["j2"]
    plan = book.plan_lease(False, 5.0)  # refused with them: lease without them
    assert plan is not None and plan.batch == [] and book.results


def test_a_burst_lease_never_waits_and_a_full_worker_only_takes_what_is_ready() -> None:
    plan = _book(1, burst=True).plan_lease(True, 5.0)
    assert plan is not None and plan.wait == 0.0
    book = _book(1, prefetch=10)
    _admit(book, _registry(Task(_fn, name="t")), [_job(1)], 0.0)
    plan = book.plan_lease(True, 5.0)
    assert plan is not None and plan.wait == 0.0


def test_the_reporter_leaves_fresh_outcomes_to_a_lease_that_will_carry_them() -> None:
    book = _book(2)
    reg = _registry(Task(_fn, name="t"))
    a, b = _admit(book, reg, [_job(1), _job(2)], 0.0).to_run
    assert book.plan_report(0.0, 0.0) == ([], None)  # nothing: wait to be woken
    book.settle(a, OK, 1.0)
    book.lease_parked = True  # the lease thread waits for room, and there is some
    batch, wake = book.plan_report(1.001, 0.0)
    assert batch == [] and wake is not None and wake > 1.0
    book.lease_parked = False
    book.lease_in_flight = True  # a long-poll in flight: the reporter sends them
    batch, _ = book.plan_report(1.001, 0.0)
    assert [r.job.id for r in batch] == ["j1"] and book.reporting
    book.reports_returned(batch)  # unreachable: back in front, after a backoff
    assert book.plan_report(1.1, 2.0) == ([], 2.0)
    book.settle(b, OK, 1.2)
    batch, _ = book.plan_report(2.0, 2.0)
    assert [r.job.id for r in batch] == ["j1", "j2"]


def test_reports_go_in_batches_of_at_most_max_batch() -> None:
    book = _book(MAX_BATCH + 5)
    reg = _registry(Task(_fn, name="t"))
    for ex in _admit(book, reg, [_job(n) for n in range(MAX_BATCH + 5)], 0).to_run:
        book.settle(ex, OK, 0.0)
    book.lease_in_flight = True
    first, _ = book.plan_report(1.0, 0.0)
    second, _ = book.plan_report(1.0, 0.0)
    assert (len(first), len(second)) == (MAX_BATCH, 5)


def test_heartbeats_fall_due_at_a_third_of_the_lease() -> None:
    book = _book()
    reg = _registry(Task(_fn, name="t"))
    [ex] = _admit(book, reg, [_job(1, timeout=9.0)], 0.0).to_run
    assert book.due == 3.0
    assert book.heartbeats_due(2.9) == [] and book.heartbeats_due(3.0) == [ex]
    book.extended(ex, 3.5)
    assert ex.next_extend == 6.5 and ex.extend_with is None
    assert book.next_due(3.5) == 4.5  # IDLE_TICK at the latest


def test_a_job_sent_without_a_lease_time_gets_its_tasks_own() -> None:
    book = _book(4)
    short = Task(_fn, name="short", timeout=3)
    long = Task(_fn, name="long", timeout=90)
    reg = _registry(short, long, Task(_fn, name="t"))
    jobs = [
        _job(1, task="short", timeout=BROKER_DEFAULT_LEASE),  # sent without one
        _job(2, task="short", timeout=7.0),  # its producer asked for 7 s
        _job(3, task="long", timeout=BROKER_DEFAULT_LEASE),
        _job(4, task="t", timeout=BROKER_DEFAULT_LEASE),  # the task declares none
    ]
    a, b, c, d = _admit(book, reg, jobs, 10.0).to_run
    # shorter than what the broker granted: extended at once
    assert (a.extend_with, a.lease_seconds, a.next_extend) == (3, 3, 10.0)
    assert book.due == 10.0
    assert b.extend_with is None and b.next_extend == pytest.approx(10.0 + 7 / 3)
    # longer: the first heartbeat, due as usual, asks for it
    assert (c.extend_with, c.next_extend) == (90, 20.0)
    assert (d.extend_with, d.next_extend) == (None, 20.0)
    book.extended(a, 10.1)
    assert a.next_extend == pytest.approx(11.1)


def test_a_run_over_its_time_limit_fails_without_retry_unless_asked() -> None:
    book = _book(3)
    reg = _registry(
        Task(_fn, name="lim", time_limit=1),
        Task(_fn, name="again", time_limit=1, retry_on_timeout=True),
        Task(_fn, name="t"),
    )
    jobs = [_job(1, task="lim"), _job(2, task="again"), _job(3)]
    lim, again, free = _admit(book, reg, jobs, 0.0).to_run
    assert book.due == pytest.approx(0.02)  # not started yet: look again soon
    for ex in (lim, again, free):
        ex.started_at = 0.5
    assert book.over_time_limit(1.4) == []
    assert book.over_time_limit(1.5) == [lim, again]
    assert [r.outcome for r in book.results] == ["failed", "retry"]
    assert book.results[0].item.error.startswith("TimeLimitExceeded: lim ran longer")  # type: ignore[union-attr]
    assert list(book.running) == ["j3"]


def test_prefetched_jobs_are_overdue_after_the_hold() -> None:
    book = _book(1, prefetch=10)
    reg = _registry(Task(_fn, name="t"))
    first, held = _admit(book, reg, [_job(1), _job(2)], 0.0).to_run
    first.started_at = 0.0
    assert book.due == PREFETCH_HOLD
    assert not book.prefetch_overdue(PREFETCH_HOLD - 0.01)
    assert book.prefetch_overdue(PREFETCH_HOLD)
    assert book.unsettle([held]) == [held] and not book.prefetch_overdue(5.0)


def test_the_lease_thread_runs_a_quick_job_itself_and_is_replaced_if_it_lasts() -> None:
    book = _book(2, inline_pool=True)
    reg = _registry(Task(_fn, name="t"), Task(_fn, name="lim", time_limit=5))
    resolve = functools.partial(runnable, reg)
    admitted = book.admit([_job(1)], 0.0, resolve, inline_ok=True)
    assert admitted is not None and admitted.inline is None  # no run measured yet
    book.mean_run = 0.001
    admitted = book.admit([_job(2), _job(3)], 1.0, resolve, inline_ok=True)
    assert admitted is not None
    ex = admitted.inline
    assert ex is not None and ex.job.id == "j3" and book.lease_parked
    assert [e.job.id for e in admitted.to_run] == ["j2"]
    limited = book.admit([_job(4, task="lim")], 1.0, resolve, inline_ok=True)
    assert limited is not None and limited.inline is None
    assert book.take_over(1.0 + INLINE_LIMIT / 2) is None
    assert book.take_over(1.0 + INLINE_LIMIT) is ex and book.lease_gen == 1
    assert not book.inline_done(ex, gen=0)  # the old lease thread ends


def test_the_broker_coming_back_counts_a_reconnect_once() -> None:
    book = _book()
    assert not book.broker_seen(True)
    assert book.broker_seen(False) and not book.broker_seen(False)
    assert book.broker_seen(True) and book.reconnects == 1


def test_an_execution_carries_the_context_its_task_sees() -> None:
    job = _job(7, headers={"trace": "abc"}, attempt=3)
    ex = Execution(job, Task(_fn, name="t"), 0.0)
    ctx = ex.context
    assert (ctx.id, ctx.queue, ctx.task, ctx.attempt) == ("j7", "q", "t", 3)
    assert ctx.headers == {"trace": "abc"} and not ctx.cancelled
    ctx.progress(0.5, "half")
    assert ctx.last_progress is not None and ctx.last_progress[:2] == (0.5, "half")
    with pytest.raises(ValueError, match="between 0 and 1"):
        ctx.progress(1.5)


# ------------------------------------------------------------------ layout


def _imports(path: Path) -> set[str]:
    """The qworker modules `path` imports when it is imported (module level, outside
    `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "qworker" or m.startswith("qworker.")}


def test_worker_modules_stay_small_and_import_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for path in WORKER_SRC.rglob("*.py"):
        parts = path.relative_to(WORKER_SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        assert len(path.read_text().splitlines()) <= 600, f"{name} is over 600 lines"
        graph[name] = _imports(path) - {name}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if seen.get(name) == 2:
            return
        assert seen.get(name) != 1, f"import cycle: {' -> '.join([*path, name])}"
        seen[name] = 1
        for dep in sorted(graph.get(name, ())):
            visit(dep, [*path, name])
        seen[name] = 2

    for name in sorted(graph):
        visit(name, [])
