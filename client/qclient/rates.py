"""Rate strings, Celery's way: "10/s", "100/m", "1000/h" (and a bare "10": per second).

Pure and dependency-free, so the worker's `@task(rate_limit=...)`, the `qbroker limits`
command and the broker all read a rate the same way.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

__all__ = ["UNITS", "Rate", "format_rate", "parse_rate"]

#: seconds in each unit a rate string may name (Celery: s, m, h; d is ours)
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_RATE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d*)\s*([smhd])\s*)?\Z", re.ASCII)


class Rate(NamedTuple):
    """At most `limit` starts per `per` seconds."""

    limit: int
    per: float


def parse_rate(text: str) -> Rate:
    """Read a rate string as (limit, per seconds).

    "10/s", "100/m", "1000/h", "5/d", "3/10s" (3 per 10 seconds) and a bare "10"
    (per second, as Celery reads it). A fractional limit ("0.5/s", Celery allows it)
    becomes a whole one over a longer period ("1/2s").

    Raises:
        ValueError: not such a string, or a limit of zero.
    """
    found = _RATE_RE.match(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError(
            f"unknown rate {text!r}: use N/s, N/m, N/h or N/d, such as '10/m'"
        )
    amount, count, unit = found.groups()
    value = float(amount)
    per = UNITS[unit or "s"] * (int(count) if count else 1)
    if not (value > 0 and per > 0 and math.isfinite(value)):
        raise ValueError(f"rate {text!r} allows nothing: its limit must be above 0")
    if value != int(value):  # 0.5/s -> 1 per 2 s
        per /= value
        value = 1.0
    return Rate(int(value), per)


def format_rate(limit: int, per: float) -> str:
    """A rate for people: (10, 60.0) -> "10/m", (3, 10.0) -> "3/10s"."""
    for unit, seconds in reversed(UNITS.items()):
        if per == seconds:
            return f"{limit}/{unit}"
    return f"{limit}/{per:g}s"
