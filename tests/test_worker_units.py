"""qworker pieces without a broker: backoff, the decorator, the registry, execute(), runs."""

from __future__ import annotations

import asyncio
import math
import random
import subprocess
import sys
from typing import Any

import pytest
import qworker
from qclient.wire import LeasedJob
from qworker import Retry, Task, TimeLimitExceeded, task
from qworker._execute import Execution, execute
from qworker._task import backoff_delay
from qworker.pools import RUN_MAX, ProcessPool
from qworker.registry import NotRegistered, Registry
from qworker.runner import prefetch_allowance

from tests.conftest import child_env


def test_backoff_doubles_from_its_base_up_to_its_cap() -> None:
    delays = [backoff_delay(n, base=0.5, cap=3.0, jitter=False) for n in range(1, 6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_full_jitter_stays_below_the_exponential_delay() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        delay = backoff_delay(attempt, base=1.0, cap=60.0, jitter=True, rng=rng)
        assert 0.0 <= delay <= ceiling


def test_backoff_of_zero_retries_at_once_and_huge_attempts_do_not_overflow() -> None:
    assert backoff_delay(5, base=0.0, cap=10.0, jitter=False) == 0.0
    assert backoff_delay(1000, base=1.0, cap=600.0, jitter=False) == 600.0


def _plain(x: int) -> int:
    return x + 1


def test_prefetch_holds_what_the_slots_start_within_the_hold_time() -> None:
    # 2 slots, 0.1 s a run: 20 start within 1 s; the cap and "no runs yet" win.
    assert prefetch_allowance(100, 2, 0.1, 0.0, hold=1.0) == 20
    assert prefetch_allowance(10, 2, 0.1, 0.0, hold=1.0) == 10
    assert prefetch_allowance(100, 2, None, 0.0, hold=1.0) == 0
    assert prefetch_allowance(0, 2, 0.001, 0.0, hold=1.0) == 0
    assert prefetch_allowance(1000, 8, 0.0, 0.0, hold=1.0) == 1000  # no-op tasks
    # A run going on longer than the mean counts as the run time: none once it is
    # past concurrency x hold.
    assert prefetch_allowance(100, 2, 0.001, 0.5, hold=1.0) == 4
    assert prefetch_allowance(100, 2, 0.001, 2.5, hold=1.0) == 0


def _execution(t: Task[..., Any], n: int) -> Execution:
    job = LeasedJob(
        id=f"j{n}", queue="q", task=t.name, args=[n], kwargs={}, headers={},
        lease="l", attempt=1, max_retries=3, timeout=30.0, lease_expires_at=0.0,
    )  # fmt: skip
    return Execution(job, t, now=0.0)


def test_process_slot_takes_a_run_of_quick_jobs_only() -> None:
    """A slot sends its child a run of queued jobs whose tasks are known to be quick
    and have no time limit, up to its share of the queue; the first that does not fit
    is kept for its next turn, and drain() hands it back first."""
    quick, slow = Task(_plain, name="quick"), Task(_plain, name="slow")
    limited = Task(_plain, name="limited", time_limit=5)
    unknown = Task(_plain, name="unknown")
    pool = ProcessPool(2, lambda ex, o: None, modules=[])
    slot = pool._slots[0]
    for name, mean in (("quick", 0.00001), ("slow", 0.5), ("limited", 0.00001)):
        pool.ran(name, mean)

    def queued(*tasks: Task[..., Any]) -> list[Execution]:
        made = [_execution(t, n) for n, t in enumerate(tasks)]
        for ex in made:
            pool.queue.put(ex)
        return made

    # 8 quick ones queued: the slot takes its share (half) plus the one in hand.
    first = _execution(quick, 99)
    made = queued(*[quick] * 8)
    assert slot.take_run(first) == [first, *made[:4]]
    assert pool.drain() == made[4:]
    # A slow, a time-limited or a not-yet-measured task ends the run and is held.
    for stopper in (slow, limited, unknown):
        made = queued(quick, stopper, quick, quick, quick, quick)
        assert slot.take_run(first) == [first, made[0]]
        assert list(slot.held) == [made[1]]
        assert pool.drain() == made[1:]
    # A job whose own task is slow, limited or not yet measured runs alone.
    for alone in (slow, limited, unknown):
        made = queued(quick, quick)
        lone = _execution(alone, 7)
        assert slot.take_run(lone) == [lone]
        assert pool.drain() == made
    # Together the mean runs fill about RUN_SPAN (2 ms): three of 0.6 ms.
    medium = Task(_plain, name="medium")
    pool.ran("medium", 0.0006)
    made = queued(*[medium] * 6)
    lead = _execution(medium, 7)
    assert slot.take_run(lead) == [lead, made[0], made[1]]
    assert pool.drain() == made[2:]
    made = queued(*[quick] * 6)
    made[0].done = True
    assert slot.take_run(first) == [first, *made[1:4]]
    pool.drain()
    # RUN_MAX and max_tasks_per_child cap a run.
    made = queued(*[quick] * (4 * RUN_MAX))
    assert len(slot.take_run(first)) == RUN_MAX
    pool.drain()
    pool.max_tasks_per_child, slot.tasks_run = 10, 7
    made = queued(*[quick] * 20)
    assert slot.take_run(first) == [first, *made[:2]]


def test_task_defaults_follow_the_function() -> None:
    t = Task(_plain)
    assert (t.name, t.queue) == ("_plain", "_plain")
    assert (t.max_retries, t.retry_backoff, t.retry_backoff_max) == (None, 1.0, 600.0)
    assert t.retry_for == (Exception,)
    assert (t.timeout, t.time_limit, t.is_async) == (None, None, False)
    assert t(1) == 2  # calling a task runs it here
    assert t.__name__ == "_plain"


@pytest.mark.parametrize(
    "options",
    [
        {"name": "has space"},
        {"queue": ""},
        {"max_retries": -1},
        {"max_retries": 1001},
        {"timeout": 0},
        {"time_limit": -1.0},
    ],
)
def test_task_rejects_invalid_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"."):
        Task(_plain, **options)


@pytest.mark.parametrize("delay", [-1.0, math.inf, math.nan])
def test_retry_rejects_a_delay_that_is_not_finite_seconds(delay: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        Retry(delay=delay)


def test_retry_policy_retry_for_and_retry() -> None:
    narrow = Task(_plain, retry_for=(ConnectionError,))
    assert narrow.should_retry(ConnectionResetError())
    assert not narrow.should_retry(ValueError())
    assert narrow.should_retry(Retry())  # on purpose: always
    # issue 20: a time limit retries only when asked for, by name or retry_on_timeout
    assert not Task(_plain).should_retry(TimeLimitExceeded())
    assert Task(_plain, retry_on_timeout=True).should_retry(TimeLimitExceeded())
    assert not Task(_plain).should_retry(KeyboardInterrupt())
    assert not Task(_plain, retry_for=()).should_retry(ValueError())


def _other() -> None: ...


def test_registry_rejects_a_second_function_under_one_name() -> None:
    reg = Registry()
    reg.register(Task(_plain, name="same"))
    reg.register(Task(_plain, name="same"))  # the same function again: fine (reload)
    with pytest.raises(ValueError, match="used twice"):
        reg.register(Task(_other, name="same"))
    reg.modules.append("mymod")
    with pytest.raises(
        NotRegistered, match=r"no task named 'other' in modules \['mymod'\]"
    ):
        reg.get("other")
    assert reg.names() == ["same"]
    assert reg.queues() == ["same"]


def _run(t: Task[..., Any], *args: Any) -> Any:
    return execute(t, list(args), {}, asyncio.run)


def test_execute_reports_a_result_as_json_like_builtins() -> None:
    def shaped() -> dict[str, Any]:
        return {"a": (1, 2), "b": {3}}

    outcome = _run(Task(shaped))
    assert outcome.ok
    # a tuple goes as a list; a set is tagged so Job.result() gives a set back
    assert outcome.result == {"a": [1, 2], "b": {"__type__": "set", "__value__": [3]}}


def test_execute_reports_an_exception_with_type_message_and_traceback() -> None:
    def broken() -> None:
        raise ValueError("bad input")

    outcome = _run(Task(broken))
    assert not outcome.ok
    assert outcome.error == "ValueError: bad input"
    assert outcome.retry
    assert "in broken" in (outcome.traceback or "")
    assert not _run(Task(broken, retry_for=(KeyError,))).retry


def test_execute_honours_retry_with_its_delay() -> None:
    def again() -> None:
        raise Retry(delay=5, reason="later")

    outcome = _run(Task(again, retry_for=()))
    assert (outcome.retry, outcome.retry_delay, outcome.error) == (
        True,
        5,
        "Retry: later",
    )


def test_execute_fails_an_unserializable_result_without_retry() -> None:
    outcome = _run(Task(object))
    assert not outcome.ok
    assert outcome.error.startswith("UnserializableResult: ")
    assert not outcome.retry


def test_execute_runs_async_def_tasks() -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    t = Task(double)
    assert t.is_async
    assert _run(t, 21).result == 42


def test_decorator_bare_and_with_options_registers() -> None:
    @task
    def wt_unit_bare() -> None: ...

    @task(name="wt_unit_named", queue="wt_unit_q", max_retries=0, time_limit=2)
    def whatever() -> None: ...

    assert qworker.default_registry.get("wt_unit_bare") is wt_unit_bare
    named = qworker.default_registry.get("wt_unit_named")
    assert (named.queue, named.max_retries, named.time_limit) == ("wt_unit_q", 0, 2)


def test_send_passes_the_task_options_to_the_client() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeClient:
        def send(self, queue: str, **options: Any) -> str:
            calls.append((queue, options))
            return "job"

    t = Task(_plain, name="wt_unit_send", queue="q1", max_retries=7, timeout=45)
    assert t.send(args=[1], delay=30, priority=5, client=FakeClient()) == "job"  # type: ignore[arg-type]
    queue, options = calls[0]
    assert queue == "q1"
    assert options["task"] == "wt_unit_send"
    assert (options["args"], options["kwargs"]) == ([1], None)
    assert (options["delay"], options["priority"]) == (30, 5)
    assert (options["max_retries"], options["timeout"]) == (7, 45)


def test_public_names_all_resolve() -> None:
    assert qworker.__all__ == sorted(qworker.__all__)
    for name in qworker.__all__:
        assert getattr(qworker, name) is not None


def test_importing_qworker_does_not_load_the_worker_machinery() -> None:
    code = (
        "import sys, qworker\n"
        "heavy = {'asyncio', 'multiprocessing', 'sqlite3', 'trio', 'qworker.runner'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
