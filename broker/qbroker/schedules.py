"""Schedule maths: checking a spec, its fire times, what a gap missed, its words.

Pure: no SQL, no I/O, no clock. `now` and every time are unix seconds, passed in.

Theory of operation: a schedule's ticks are the times it should fire. A cron schedule's
ticks come from cronsim, in the schedule's zone, with Debian cron's rules for daylight
saving: on the fall-back day a job at a fixed time in the repeated hour runs once (at
its first occurrence), on the spring-forward day a job in the skipped hour runs once,
right after the gap (croniter 7.0 and APScheduler 3.11 run `30 1 * * *` twice on a
fall-back day). An interval schedule's ticks are `anchor + k * every` (k >= 1), where
the anchor is when its timing was set: they never drift with firing latency.

The store keeps each schedule's next tick (`next_run_at`). When it falls due, `due()`
says which ticks to fire now (by the schedule's catch_up policy) and the next tick after
`now`; the store fires them and stores that tick in one transaction.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from qclient.wire import NAME_PATTERN, CatchUp, ScheduleSpec

from qbroker import errors

CATCH_UP_MAX = 100  #: ticks catch_up="all" fires at most after a gap; the rest skip
#: seconds a tick may be late and still fire under catch_up="none" (older: missed)
LATE_GRACE = 60.0
SCAN_MAX = 1000  #: missed cron ticks counted one by one at most; past it, estimated
_NAME_RE = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: a 5-field cron expression in a zone, or an interval."""

    cron: str | None
    every: float | None
    tz: str


@dataclass
class Due:
    """What a due schedule does now."""

    ticks: list[float]  #: fire times to make jobs for, oldest first
    next_run_at: float  #: the first tick after `now`
    skipped: int = 0  #: missed ticks not fired (a lower bound when `estimated`)
    estimated: bool = False


@lru_cache(maxsize=256)
def zone(tz: str) -> ZoneInfo:
    """The zone called `tz`.

    Raises:
        errors.InvalidField: no such zone (field `tz`).
    """
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise errors.InvalidField(
            f"unknown time zone {tz!r}: use an IANA name such as 'Europe/Berlin'",
            field="tz",
        ) from exc


def check(name: str, spec: ScheduleSpec, *, now: float) -> Timing:
    """Check what msgspec's types cannot: the name, one timing, the cron, the zone.

    Raises:
        errors.InvalidField: naming the field at fault (nothing is stored).
    """
    if not _NAME_RE.match(name):
        raise errors.InvalidField(
            "a schedule name is 1-200 characters of A-Z a-z 0-9 _ . : @ -",
            field="name",
        )
    if (spec.cron is None) == (spec.every is None):
        raise errors.InvalidField(
            "give exactly one of cron or every",
            field="every" if spec.cron is not None else "cron",
        )
    zone(spec.tz)
    timing = Timing(cron=spec.cron, every=spec.every, tz=spec.tz)
    if spec.cron is not None:
        if len(spec.cron.split()) != 5:
            raise errors.InvalidField(
                f"invalid cron expression {spec.cron!r}: it needs 5 fields"
                " (minute hour day-of-month month day-of-week)",
                field="cron",
            )
        try:
            next_after(timing, now, now)
        except (CronSimError, StopIteration, ValueError, OverflowError) as exc:
            raise errors.InvalidField(
                f"invalid cron expression {spec.cron!r}: {exc or 'it never fires'}",
                field="cron",
            ) from exc
    return timing


def next_after(timing: Timing, anchor: float, t: float) -> float:
    """The first tick strictly after `t`.

    Args:
        anchor: when the timing was set (intervals count from it).
    """
    if timing.every is not None:
        # every >= 1 s (wire.ScheduleSpec) and times < 2**35 s keep k < 2**35: exact
        every = timing.every
        k = max(1, math.floor((t - anchor) / every) + 1)
        if anchor + k * every <= t:  # float rounding either way
            k += 1
        elif k > 1 and anchor + (k - 1) * every > t:
            k -= 1
        return anchor + k * every
    assert timing.cron is not None
    it = CronSim(timing.cron, datetime.fromtimestamp(t, zone(timing.tz)))
    while True:
        # cronsim steps a fixed-time job in local wall time: from inside a repeated
        # (fall-back) hour its first answer can be that hour's first pass, before `t`
        tick = next(it).timestamp()
        if tick > t:
            return tick


def due(
    timing: Timing, anchor: float, next_run_at: float, catch_up: CatchUp, now: float
) -> Due:
    """The ticks to fire at `now` for a schedule whose next tick is `next_run_at`.

    `latest` fires the newest tick due (one job stands for every missed tick); `all`
    fires each missed tick, the oldest CATCH_UP_MAX of them (the rest are skipped);
    `none` fires the newest tick only if it is at most LATE_GRACE seconds late.
    """
    if next_run_at > now:
        return Due(ticks=[], next_run_at=next_run_at)
    ticks = [next_run_at]  # every due tick, up to CATCH_UP_MAX of them
    count = 1
    estimated = False
    if timing.every is not None:
        nxt = next_after(timing, anchor, now)
        count = max(1, round((nxt - next_run_at) / timing.every))
        first_k = round((next_run_at - anchor) / timing.every)
        ticks = [
            anchor + (first_k + i) * timing.every
            for i in range(min(count, CATCH_UP_MAX))
        ]
        latest = nxt - timing.every
    else:
        assert timing.cron is not None
        start = datetime.fromtimestamp(next_run_at, zone(timing.tz))
        it = CronSim(timing.cron, start)
        latest = next_run_at
        while True:
            tick = next(it).timestamp()
            if tick <= latest:
                continue  # see next_after
            if tick > now:
                nxt = tick
                break
            count += 1
            latest = tick
            if len(ticks) < CATCH_UP_MAX:
                ticks.append(tick)
            if count > SCAN_MAX:  # a long gap: jump to its end, count no further
                estimated = True
                nxt = next_after(timing, anchor, now)
                latest = _latest_before(timing, nxt, latest)
                break
    if catch_up == "all":
        fire = ticks
    elif catch_up == "latest" or now - latest <= LATE_GRACE:
        fire = [latest]
    else:
        fire = []
    return Due(
        ticks=fire, next_run_at=nxt, skipped=count - len(fire), estimated=estimated
    )


def _latest_before(timing: Timing, nxt: float, floor: float) -> float:
    """The newest cron tick before `nxt` (at least `floor`, a known earlier tick)."""
    assert timing.cron is not None
    back = CronSim(
        timing.cron, datetime.fromtimestamp(nxt, zone(timing.tz)), reverse=True
    )
    tick = next(back).timestamp()
    return tick if floor <= tick < nxt else floor


@lru_cache(maxsize=4096)  # a listing of 10,000 schedules reads many alike
def words(timing: Timing) -> str:
    """The timing in words: "every 10 seconds", "at 07:30 on Monday (Europe/Berlin)"."""
    if timing.every is not None:
        return "every " + _duration(timing.every)
    assert timing.cron is not None
    text = CronSim(timing.cron, datetime(2000, 1, 1)).explain()
    return f"{text[:1].lower()}{text[1:]} ({timing.tz})"


def _duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return unit if n == 1 else f"{n} {unit}s"
    return "second" if seconds == 1 else f"{seconds:g} seconds"


def job_id_prefix(name: str) -> str:
    """The start shared by the ids of every job schedule `name` makes: fixed-length
    (a digest of the name), so ids sort by fire time and no name's prefix is another's."""
    return "sch." + hashlib.blake2b(name.encode(), digest_size=8).hexdigest() + "."


def job_id(name: str, fire_time: float) -> str:
    """The id of the job for one tick: the key that makes a tick fire once. Firing a
    tick again (a crash before the commit of next_run_at, a clock step, a second
    firing path) finds this id taken and makes nothing."""
    return f"{job_id_prefix(name)}{round(fire_time * 1000):014d}"
