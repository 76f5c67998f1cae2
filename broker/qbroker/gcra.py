"""The generic cell rate algorithm (GCRA): a token bucket kept as one number per key.

Theory of operation (ITU-T I.371; Brandur Leach, "Rate limiting, cells, and GCRA").
A rate of `limit` starts per `per` seconds spaces starts `T = per / limit` apart. The
key keeps its *theoretical arrival time* `tat`: when the next start would be due if
starts had come exactly on schedule. A start at `now` is allowed when
`now >= tat - tau`, where `tau = burst * T` lets `burst` starts come early; it then
moves `tat` to `max(tat, now) + T`. Over any window of `w` seconds a key admits at
most `1 + burst + floor(w / T)` starts; with no burst, at most `limit` in any
`per`-long window. One float per key, no timers, no refill job: the broker stores
`tat` in the limit's row and updates it in the lease's own transaction.

Pure: `now` is passed in, nothing is read or written here.
"""

from __future__ import annotations

__all__ = ["allowed", "emission_interval", "next_start", "take"]


def emission_interval(limit: int, per: float) -> float:
    """Seconds between starts at the steady rate."""
    return per / limit


def allowed(
    tat: float | None, now: float, *, limit: int, per: float, burst: int
) -> int:
    """How many starts the key admits at `now`, from its stored `tat` (None: never
    started, a full bucket)."""
    t = emission_interval(limit, per)
    tau = burst * t
    base = now if tat is None or tat < now else tat
    # start k (0-based) is due at base + k*t and allowed once due - tau <= now
    room = (now + tau - base) / t
    return max(0, int(room + 1e-9) + 1) if room >= -1e-9 else 0


def take(tat: float | None, now: float, n: int, *, limit: int, per: float) -> float:
    """The key's `tat` after `n` starts at `now` (n within `allowed`)."""
    t = emission_interval(limit, per)
    base = now if tat is None or tat < now else tat
    return base + n * t


def next_start(
    tat: float | None, now: float, *, limit: int, per: float, burst: int
) -> float:
    """When the key admits its next start: `now` if it does now."""
    if tat is None:
        return now
    due = tat - burst * emission_interval(limit, per)
    return max(now, due)
