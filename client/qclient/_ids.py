"""Job ids: 26-character, time-sortable (ULID layout), made in the client.

Re-exported by wire.py (`qclient.wire.new_job_id`), where the protocol names them.
"""

from __future__ import annotations

import os
import time

__all__ = ["CROCKFORD", "crockford26", "new_job_id", "new_job_ids"]

#: Crockford's base32 (the ULID alphabet): its order is ASCII order, so ids sort as
#: their bits do.
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Every pair of Crockford characters, indexed by the 10 bits they spell: an id is 13
#: table lookups (with base64.b32encode, a pure-Python loop, an id took 1.5x as long).
_PAIRS = [a + b for a in CROCKFORD for b in CROCKFORD]


def new_job_id(now: float | None = None) -> str:
    """A new 26-character, time-sortable job id (ULID layout).

    48 bits of unix milliseconds then 80 random bits, in Crockford base32, so ids sort
    by creation time and two makers never pick the same one. Choosing the id in the
    client, not the broker, is what makes an enqueue safe to retry.

    Args:
        now: unix seconds to stamp; default: the wall clock.
    """
    ms = time.time_ns() // 1_000_000 if now is None else int(now * 1000)
    return crockford26((ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10)))


def new_job_ids(n: int, now: float | None = None) -> list[str]:
    """`n` new job ids for one batch, in the order they sort.

    One clock reading and one 80-bit random draw, then counting up from it (ULID's
    monotonic form): only the last two characters change between neighbours, so an id
    costs one string concatenation, not an encoding. A carry out of the random bits
    moves the stamp on by a millisecond, which keeps the ids unique and in order.

    Args:
        n: how many.
        now: unix seconds to stamp; default: the wall clock.
    """
    ms = time.time_ns() // 1_000_000 if now is None else int(now * 1000)
    v = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10))
    ids: list[str] = []
    while len(ids) < n:
        head = crockford26(v)[:24]
        low = v & 1023
        take = min(n - len(ids), 1024 - low)
        ids.extend([head + pair for pair in _PAIRS[low : low + take]])
        v += take
    return ids


def crockford26(v: int) -> str:
    """A 128-bit number as 26 Crockford base32 characters, most significant first
    (130 bits with two leading zeros: 13 groups of 10 bits, 2 characters each)."""
    p = _PAIRS
    return "".join(
        (
            p[v >> 120],
            p[v >> 110 & 1023],
            p[v >> 100 & 1023],
            p[v >> 90 & 1023],
            p[v >> 80 & 1023],
            p[v >> 70 & 1023],
            p[v >> 60 & 1023],
            p[v >> 50 & 1023],
            p[v >> 40 & 1023],
            p[v >> 30 & 1023],
            p[v >> 20 & 1023],
            p[v >> 10 & 1023],
            p[v & 1023],
        )
    )
