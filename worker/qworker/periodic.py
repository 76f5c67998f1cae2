"""Periodic tasks declared in code, and their sync to the broker.

    from qworker import task
    from qworker.periodic import periodic

    @task()
    @periodic(every=10, args=(3, 4))                  # seconds or a timedelta
    def add(x, y): ...

    @task()
    @periodic(cron="30 7 * * 1", tz="Europe/Berlin")  # Mondays 07:30 Berlin time
    def weekly_report(): ...

or, for projects that keep a Celery-style `beat_schedule` in their settings:

    beat_schedule({
        "add-every-10s": {"task": "add", "schedule": 10, "args": (3, 4)},
        "weekly": {"task": "weekly_report", "schedule": crontab(hour=7, minute=30,
                   day_of_week=1), "tz": "Europe/Berlin"},
    })

The broker holds and fires the schedules; the code only declares them. A worker sends
the declarations of its modules when it starts (`sync`: an idempotent upsert by name,
so any number of workers may start at once), and so does `qbroker schedules sync
--module tasks`, which also reports (and with `--prune` deletes) schedules the broker
has that the code no longer declares. A bad declaration fails at import, naming the task.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from qclient.wire import NAME_PATTERN, CatchUp, ScheduleSpec

from qworker._task import Task
from qworker.registry import Registry, default_registry

__all__ = [
    "Periodic",
    "SyncReport",
    "beat_schedule",
    "crontab",
    "declared",
    "periodic",
    "sync",
]

F = TypeVar("F")
_NAME_RE = re.compile(NAME_PATTERN)
_CATCH_UPS = ("latest", "all", "none")
_ATTR = "__qworker_periodic__"  #: on a decorated function: its declarations


@dataclass(frozen=True)
class Periodic:
    """One declared schedule. `name` and `task` None: the decorated task's name."""

    name: str | None
    task: str | None
    queue: str | None
    cron: str | None
    every: float | None
    tz: str = "UTC"
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, Any] = field(default_factory=dict)
    priority: int = 0
    catch_up: CatchUp = "latest"

    def spec(self, task: str, queue: str | None) -> ScheduleSpec:
        return ScheduleSpec(
            task=task,
            queue=self.queue or queue,
            cron=self.cron,
            every=self.every,
            tz=self.tz,
            args=list(self.args),
            kwargs=dict(self.kwargs),
            headers=dict(self.headers),
            priority=self.priority,
            catch_up=self.catch_up,
        )


#: what `periodic` decorated and `beat_schedule` declared, in order
_declared: list[tuple[Callable[..., Any] | Task[..., Any] | None, Periodic]] = []


def _check(p: Periodic, who: str) -> None:
    """Raises: ValueError naming `who` (the task or mapping entry) and the fault."""

    def bad(what: str) -> ValueError:
        return ValueError(f"periodic {who}: {what}")

    if p.name is not None and not _NAME_RE.match(p.name):
        raise bad(f"schedule name {p.name!r} does not match {NAME_PATTERN}")
    if (p.cron is None) == (p.every is None):
        raise bad("give exactly one of cron= or every=")
    if p.every is not None and not 1 <= p.every < math.inf:
        raise bad(f"every must be 1 second or more, not {p.every!r}")
    if p.catch_up not in _CATCH_UPS:
        raise bad(f"catch_up must be one of {_CATCH_UPS}, not {p.catch_up!r}")
    try:
        zone = ZoneInfo(p.tz)
    except (LookupError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise bad(f"unknown time zone {p.tz!r}") from exc
    if p.cron is not None:
        from cronsim import CronSim, CronSimError

        if len(p.cron.split()) != 5:
            raise bad(f"cron expression {p.cron!r} needs 5 fields")
        try:
            next(CronSim(p.cron, datetime.now(zone)))
        except (CronSimError, StopIteration) as exc:
            raise bad(f"invalid cron expression {p.cron!r}: {exc}") from exc


def _seconds(every: float | timedelta | None) -> float | None:
    return every.total_seconds() if isinstance(every, timedelta) else every


def periodic(
    *,
    every: float | timedelta | None = None,
    cron: str | None = None,
    tz: str = "UTC",
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
    queue: str | None = None,
    headers: Mapping[str, Any] | None = None,
    priority: int = 0,
    catch_up: CatchUp = "latest",
) -> Callable[[F], F]:
    """Declare that a task runs on a schedule; under or over `@task`.

    Args:
        every: seconds (or a timedelta; 1 s at least) between runs, counted from
            when the broker first got the schedule.
        cron: a 5-field cron expression ("30 7 * * 1"), read in `tz`.
        tz: the IANA zone of `cron` (DST as Debian cron: no run skipped or doubled).
        args: positional arguments of each run.
        kwargs: keyword arguments of each run.
        name: the schedule's name; default: the task name (give one when a task
            has several schedules).
        queue: default: the task's queue.
        headers: headers of each job.
        priority: each job's priority.
        catch_up: what runs after the broker was down or the schedule paused:
            "latest" (one run), "all" (each missed run, up to 100), "none".

    Raises:
        ValueError: at import: a bad expression, zone, interval or name, naming the task.
    """
    decl = Periodic(
        name=name,
        task=None,
        queue=queue,
        cron=cron,
        every=_seconds(every),
        tz=tz,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        headers=dict(headers or {}),
        priority=priority,
        catch_up=catch_up,
    )

    def decorate(target: F) -> F:
        who = getattr(target, "name", None) or getattr(target, "__name__", "?")
        _check(decl, f"schedule of task {who!r}")
        _declared.append((target, decl))  # type: ignore[arg-type]  # a function or Task
        return target

    return decorate


def crontab(
    minute: str | int = "*",
    hour: str | int = "*",
    day_of_week: str | int = "*",
    day_of_month: str | int = "*",
    month_of_year: str | int = "*",
) -> str:
    """Celery's `crontab(...)` as the cron expression it stands for."""
    return f"{minute} {hour} {day_of_month} {month_of_year} {day_of_week}"


def beat_schedule(mapping: Mapping[str, Mapping[str, Any]]) -> None:
    """Declare schedules from a Celery-style `beat_schedule` mapping.

    Each entry: "task" (the task name), "schedule" (seconds, a timedelta, or a cron
    expression such as `crontab(...)` returns), and optionally "args", "kwargs",
    "tz", "queue", "headers", "priority", "catch_up". The key is the schedule's name.

    Raises:
        ValueError: naming the entry at fault.
    """
    for key, entry in mapping.items():
        when = entry.get("schedule")
        if "task" not in entry or when is None:
            raise ValueError(f"periodic entry {key!r}: needs 'task' and 'schedule'")
        cron = when if isinstance(when, str) else None
        decl = Periodic(
            name=key,
            task=entry["task"],
            queue=entry.get("queue"),
            cron=cron,
            every=None if cron is not None else _seconds(when),
            tz=entry.get("tz", "UTC"),
            args=tuple(entry.get("args", ())),
            kwargs=dict(entry.get("kwargs", {})),
            headers=dict(entry.get("headers", {})),
            priority=entry.get("priority", 0),
            catch_up=entry.get("catch_up", "latest"),
        )
        _check(decl, f"entry {key!r}")
        _declared.append((None, decl))


def declared(registry: Registry | None = None) -> dict[str, ScheduleSpec]:
    """Every schedule declared so far, by name, as the broker is sent it.

    Raises:
        ValueError: two declarations share a name, or `@periodic` marks a function
            that is not a registered task.
    """
    reg = registry if registry is not None else default_registry
    by_fn = {reg.get(n).fn: reg.get(n) for n in reg.names()}
    out: dict[str, ScheduleSpec] = {}
    for target, decl in _declared:
        t: Task[..., Any] | None = None
        if isinstance(target, Task):
            t = target
        elif target is not None:
            t = by_fn.get(target)
            if t is None:
                who = getattr(target, "__name__", repr(target))
                raise ValueError(
                    f"@periodic on {who!r}, which is not a task: add @task()"
                )
        task = t.name if t is not None else decl.task
        assert task is not None
        name = decl.name or task
        if name in out:
            raise ValueError(
                f"two schedules are named {name!r}: give each periodic a name="
            )
        out[name] = decl.spec(task, t.queue if t is not None else None)
    return out


@dataclass
class SyncReport:
    """What `sync` did: schedules sent, and those the code no longer declares."""

    put: list[str]
    stale: list[str]  #: on the broker, not declared: kept unless pruned
    deleted: list[str]


def sync(
    url: str | None = None,
    *,
    token: str | None = None,
    ca: str | None = None,
    registry: Registry | None = None,
    prune: bool = False,
    stale: bool = True,
) -> SyncReport:
    """Send every declared schedule to the broker (an idempotent upsert by name).

    Args:
        url: the broker; default: env QBROKER_URL, else http://127.0.0.1:7733.
        token: the broker's bearer token; default: env QBROKER_TOKEN.
        ca: for an https broker, its CA's PEM file; default: env QBROKER_CA.
        registry: whose tasks `@periodic` marked; default: the default registry.
        prune: delete the broker's schedules that are not declared.
        stale: list the broker's schedules that are not declared (a worker's sync
            does not: its token's role may not read them).

    Raises:
        ValueError: see `declared`.
        qclient.BrokerError, qclient.ProtocolError: the broker refused or is unreachable.
    """
    from qclient.schedules import Schedules

    specs = declared(registry)
    with Schedules(url, token, ca=ca) as client:
        put = []
        for name, spec in specs.items():
            client.put(name, spec)
            put.append(name)
        old: list[str] = []
        if stale or prune:
            old = sorted(r.name for r in client.list() if r.name not in specs)
        deleted = []
        if prune:
            for name in old:
                client.delete(name)
                deleted.append(name)
    return SyncReport(put=put, stale=old, deleted=deleted)


def sync_on_start(
    url: str, token: str | None, ca: str | None, registry: Registry, log: Any
) -> None:
    """A worker's start: send its modules' schedules, if they declare any. A broker
    that cannot be reached or refuses is logged, not fatal: the worker still runs jobs.

    Raises:
        ValueError: see `declared` (a mistake in the code, fatal like an import error).
    """
    if not declared(registry):
        return
    import qclient

    try:
        report = sync(url, token=token, ca=ca, registry=registry, stale=False)
    except (qclient.BrokerError, qclient.ProtocolError, ValueError) as exc:
        log.warning("worker.schedules_sync_failed", error=str(exc))
        return
    log.info("worker.schedules_synced", schedules=report.put)
