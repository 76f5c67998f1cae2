"""Periodic tasks for tests/test_schedules_broker.py: the seeds' beat example, ported.

Imported by `qworker --module tasks_periodic` and `qbroker schedules sync --module
tasks_periodic` with `cwd=tests/`.
"""

from __future__ import annotations

from qworker import task
from qworker.periodic import beat_schedule, crontab, periodic


@task()
@periodic(every=10, args=(3, 4))
def add(x: int, y: int) -> int:
    return x + y


@task()
@periodic(cron="30 7 * * 1", tz="Europe/Berlin")
def weekly_report() -> str:
    return "sent"


beat_schedule(
    {
        "mul-every-minute": {"task": "add", "schedule": 60, "args": (6, 7)},
        "report-at-dawn": {
            "task": "weekly_report",
            "schedule": crontab(hour=5, minute=0, day_of_week="mon-fri"),
            "tz": "America/New_York",
            "catch_up": "none",
        },
    }
)
