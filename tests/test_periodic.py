"""`@periodic` and `beat_schedule` declarations (qworker.periodic), without a broker."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from qworker import periodic as p
from qworker._task import Task
from qworker.registry import Registry


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    saved = list(p._declared)
    p._declared.clear()
    yield
    p._declared[:] = saved


def registered(reg: Registry, fn: object, **kw: object) -> Task[..., object]:
    t: Task[..., object] = Task(fn, **kw)  # type: ignore[arg-type]
    reg.register(t)
    return t


def test_declarations_become_specs_named_for_their_task() -> None:
    reg = Registry()

    @p.periodic(every=timedelta(minutes=5), args=(3, 4))
    def add(x: int, y: int) -> int:
        return x + y

    registered(reg, add, queue="math")
    weekly = registered(reg, lambda: None, name="weekly_report")
    p.periodic(cron="30 7 * * 1", tz="Europe/Berlin", name="weekly")(weekly)
    p.beat_schedule({"mul": {"task": "add", "schedule": 10, "args": (6, 7)},
                     "dawn": {"task": "weekly_report", "schedule": p.crontab(hour=5, minute=0)}})  # fmt: skip
    specs = p.declared(reg)
    assert sorted(specs) == ["add", "dawn", "mul", "weekly"]
    assert (specs["add"].task, specs["add"].queue, specs["add"].every) == (
        "add",
        "math",
        300.0,
    )
    assert specs["add"].args == [3, 4]
    assert (specs["weekly"].cron, specs["weekly"].tz) == ("30 7 * * 1", "Europe/Berlin")
    assert specs["dawn"].cron == "0 5 * * *"


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"cron": "30 7 * *"}, "needs 5 fields"),
        ({"cron": "61 7 * * *"}, "invalid cron expression"),
        ({"every": 0}, "1 second or more"),
        ({"every": 0.5}, "1 second or more"),
        ({"every": 5, "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 5, "cron": "* * * * *"}, "exactly one"),
        ({"every": 5, "name": "no spaces"}, "schedule name"),
    ],
)
def test_a_bad_declaration_fails_at_import_naming_the_task(
    kw: dict[str, object], words: str
) -> None:
    def nightly_cleanup() -> None: ...

    with pytest.raises(ValueError, match=words) as caught:
        p.periodic(**kw)(nightly_cleanup)  # type: ignore[arg-type]
    assert "nightly_cleanup" in str(caught.value)


def test_a_bad_beat_entry_names_the_entry() -> None:
    with pytest.raises(ValueError, match="entry 'bad'"):
        p.beat_schedule({"bad": {"task": "t", "schedule": -1}})


def test_periodic_without_task_and_name_clashes_are_refused() -> None:
    reg = Registry()

    @p.periodic(every=5)
    def not_a_task() -> None: ...

    with pytest.raises(ValueError, match="not a task"):
        p.declared(reg)
    p._declared.clear()
    t = registered(reg, not_a_task)
    p.periodic(every=5)(t)
    p.periodic(every=60)(t)
    with pytest.raises(ValueError, match="two schedules are named 'not_a_task'"):
        p.declared(reg)
