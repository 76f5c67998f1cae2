"""Schedule maths with `now` passed in: DST both ways in two zones, leap day, catch-up,
anchored intervals, validation, words (broker/qbroker/schedules.py)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from qbroker import errors, schedules
from qbroker.schedules import Timing, due, next_after
from qclient.wire import CatchUp, ScheduleSpec


def ts(zone: str, *args: int, fold: int = 0) -> float:
    y, mo, d, h, mi = (*args, 0, 0)[:5]
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(zone), fold=fold).timestamp()


def ticks(timing: Timing, start: float, end: float) -> list[float]:
    out, t = [], start
    while (t := next_after(timing, start, t)) <= end:
        out.append(t)
    return out


def local(zone: str, t: float) -> str:
    return datetime.fromtimestamp(t, ZoneInfo(zone)).strftime("%m-%d %H:%M %Z")


@pytest.mark.parametrize(
    ("zone", "expr", "day", "want"),
    [
        # fall back: 03:00 CEST -> 02:00 CET on 2026-10-25; 02:30 happens twice
        ("Europe/Berlin", "30 2 * * *", (2026, 10, 25), ["10-25 02:30 CEST"]),
        # fall back: 02:00 EDT -> 01:00 EST on 2026-11-01; 01:30 happens twice
        ("America/New_York", "30 1 * * *", (2026, 11, 1), ["11-01 01:30 EDT"]),
        # spring forward: 02:00 -> 03:00 on 2026-03-29; 02:30 never happens
        ("Europe/Berlin", "30 2 * * *", (2026, 3, 29), ["03-29 03:00 CEST"]),
        # spring forward: 02:00 -> 03:00 on 2026-03-08
        ("America/New_York", "30 2 * * *", (2026, 3, 8), ["03-08 03:00 EDT"]),
    ],
)
def test_a_daily_job_runs_once_on_dst_days(
    zone: str, expr: str, day: tuple[int, int, int], want: list[str]
) -> None:
    timing = Timing(cron=expr, every=None, tz=zone)
    start = ts(zone, *day)  # local midnight
    end = start + 26 * 3600
    got = [local(zone, t) for t in ticks(timing, start, end) if t < end]
    assert got[:1] == want
    assert len([g for g in got if g.startswith(want[0][:5])]) == 1


def test_a_cron_fired_from_inside_the_repeated_hour_does_not_go_back() -> None:
    zone = "America/New_York"
    timing = Timing(cron="30 1 * * *", every=None, tz=zone)
    second_pass = ts(zone, 2026, 11, 1, 1, 10, fold=1)  # after the 01:30 EDT run
    nxt = next_after(timing, 0, second_pass)
    assert nxt > second_pass
    assert local(zone, nxt) == "11-02 01:30 EST"


def test_the_catch_up_of_a_day_with_a_repeated_hour_fires_the_hour_once() -> None:
    zone = "Europe/Berlin"
    timing = Timing(cron="30 2 * * *", every=None, tz=zone)
    first = ts(zone, 2026, 10, 24, 2, 30)
    plan = due(timing, 0, first, "all", ts(zone, 2026, 10, 26, 12, 0))
    assert [local(zone, t) for t in plan.ticks] == [
        "10-24 02:30 CEST",
        "10-25 02:30 CEST",
        "10-26 02:30 CET",
    ]


def test_a_leap_day_cron_waits_for_the_next_leap_year() -> None:
    timing = Timing(cron="0 12 29 2 *", every=None, tz="UTC")
    nxt = next_after(timing, 0, ts("UTC", 2026, 3, 1))
    assert local("UTC", nxt) == "02-29 12:00 UTC"
    assert datetime.fromtimestamp(nxt, ZoneInfo("UTC")).year == 2028


def test_intervals_are_anchored_to_the_start_not_to_firing() -> None:
    timing = Timing(cron=None, every=10.0, tz="UTC")
    anchor = 1000.25
    assert next_after(timing, anchor, anchor) == 1010.25
    # fired late (at 1013.9): the tick after is still on the anchor's grid
    assert next_after(timing, anchor, 1013.9) == 1020.25
    assert next_after(timing, anchor, 1020.25) == 1030.25


@pytest.mark.parametrize(
    ("catch_up", "fired", "skipped"),
    [("latest", [5000.0], 4), ("all", [1000.0, 2000.0, 3000.0, 4000.0, 5000.0], 0),
     ("none", [], 5)],
)  # fmt: skip
def test_missed_interval_ticks_follow_the_catch_up_policy(
    catch_up: CatchUp, fired: list[float], skipped: int
) -> None:
    timing = Timing(cron=None, every=1000.0, tz="UTC")
    plan = due(timing, 0.0, 1000.0, catch_up, now=5500.0)  # 500 s past the last
    assert plan.ticks == fired
    assert plan.skipped == skipped
    assert plan.next_run_at == 6000.0


def test_catch_up_none_still_fires_a_tick_that_is_only_a_little_late() -> None:
    timing = Timing(cron=None, every=10.0, tz="UTC")
    plan = due(timing, 1000.0, 1010.0, "none", now=1012.5)
    assert plan.ticks == [1010.0]
    assert plan.next_run_at == 1020.0


def test_catch_up_all_is_bounded_and_counts_the_rest() -> None:
    timing = Timing(cron=None, every=1.0, tz="UTC")
    plan = due(timing, 0.0, 1.0, "all", now=1000.5)
    assert len(plan.ticks) == schedules.CATCH_UP_MAX
    assert plan.ticks[:2] == [1.0, 2.0]
    assert plan.skipped == 1000 - schedules.CATCH_UP_MAX
    assert plan.next_run_at == 1001.0


def test_a_long_cron_gap_is_not_walked_tick_by_tick() -> None:
    timing = Timing(cron="* * * * *", every=None, tz="UTC")
    start = ts("UTC", 2026, 1, 1)
    now = ts("UTC", 2026, 12, 31, 23, 59, 30)
    plan = due(timing, 0, start, "latest", now)
    assert plan.estimated
    assert plan.ticks == [ts("UTC", 2026, 12, 31, 23, 59)]
    assert plan.next_run_at == ts("UTC", 2027, 1, 1)


def test_a_schedule_not_yet_due_fires_nothing() -> None:
    timing = Timing(cron="30 7 * * 1", every=None, tz="Europe/Berlin")
    plan = due(timing, 0, 2000.0, "all", now=1999.0)
    assert plan.ticks == []
    assert plan.next_run_at == 2000.0


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("ok", {"task": "t", "cron": "61 * * * *"}, "cron"),
        ("ok", {"task": "t", "cron": "* * * *"}, "cron"),
        ("ok", {"task": "t", "cron": "0 0 30 2 *"}, "cron"),
        ("ok", {"task": "t", "every": 5, "tz": "Mars/Olympus"}, "tz"),
        ("ok", {"task": "t", "every": 5, "tz": "../../etc/passwd"}, "tz"),
        ("ok", {"task": "t", "every": 5, "cron": "* * * * *"}, "every"),
        ("ok", {"task": "t"}, "cron"),
        ("bad name", {"task": "t", "every": 5}, "name"),
        ("x" * 201, {"task": "t", "every": 5}, "name"),
    ],
)
def test_check_names_the_field_at_fault(
    name: str, body: dict[str, object], field: str
) -> None:
    import msgspec

    spec = msgspec.convert(body, ScheduleSpec)
    with pytest.raises(errors.InvalidField) as caught:
        schedules.check(name, spec, now=1e9)
    assert caught.value.field == field


def test_words_say_when() -> None:
    assert schedules.words(Timing(None, 10.0, "UTC")) == "every 10 seconds"
    assert schedules.words(Timing(None, 3600.0, "UTC")) == "every hour"
    assert schedules.words(Timing(None, 1.5, "UTC")) == "every 1.5 seconds"
    assert (
        schedules.words(Timing("30 7 * * 1", None, "Europe/Berlin"))
        == "at 07:30 on Monday (Europe/Berlin)"
    )


def test_job_ids_are_unique_per_tick_and_sort_by_fire_time() -> None:
    a = schedules.job_id("nightly", 1_800_000_000.0)
    b = schedules.job_id("nightly", 1_800_000_001.0)
    assert a != b and a < b
    assert a == schedules.job_id("nightly", 1_800_000_000.0)
    assert a.startswith(schedules.job_id_prefix("nightly"))
    assert not a.startswith(schedules.job_id_prefix("nightly2"))
