"""Time for the broker: unix seconds that never jump.

Stored times must be wall-clock (they outlive the process), but order matters for leases
and delays: a wall clock stepped back an hour must not keep leases alive an hour longer,
nor stepped forward expire every lease at once. So the broker reads the wall clock once at
start and advances it with the monotonic clock (time.monotonic, CLOCK_MONOTONIC).
"""

from __future__ import annotations

import time


class Clock:
    """A wall clock anchored at construction and advanced monotonically."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()

    def now(self) -> float:
        """Unix seconds, monotonic within this process."""
        return self._wall0 + (time.monotonic() - self._mono0)
