"""Time for the broker: unix seconds that never jump.

Stored times must be wall-clock (they outlive the process), but order matters for leases
and delays: a wall clock stepped back an hour must not keep leases alive an hour longer,
nor stepped forward expire every lease at once. So the broker reads the wall clock once at
start and advances it with the monotonic clock (time.monotonic, CLOCK_MONOTONIC).

Nor does a stall of the broker itself count (SIGSTOP, a paused VM, a loop blocked for
seconds): while it lasts, workers' acks and extends wait in the sockets unread, and
counting it would expire their leases before the broker read them (16 acks buffered
through a 10 s SIGSTOP got 409 and their jobs ran twice). A heartbeat task `beat()`s
every BEAT_SECONDS; a gap over STALL_SECONDS since the last beat, seen by the beat or by
any `now()`, is a stall, and the clock leaves out what exceeds STALL_SECONDS. So the
requests already received are answered with the time the broker was running, before
the reaper sees a lease expire. The clock then lags the wall clock by the stalls (a
restart re-anchors it).
"""

from __future__ import annotations

import threading
import time

import structlog

BEAT_SECONDS = 0.25  #: how often the heartbeat task marks the loop as running
STALL_SECONDS = 2.0  #: a gap between beats longer than this is a stall, left out

log = structlog.get_logger("qbroker.clock")


class Clock:
    """A wall clock anchored at construction and advanced monotonically, without the
    broker's stalls once `beat()` is called. Monotonic as the trio thread sees it;
    `now()` may be called from other threads too (within a stall's skip of it)."""

    def __init__(self) -> None:
        self._wall0 = time.time()
        self._mono0 = time.monotonic()
        self._skipped = 0.0  #: seconds of stalls left out
        self._beat: float | None = None  #: monotonic time of the last beat
        self._lock = threading.Lock()

    def now(self) -> float:
        """Unix seconds, monotonic within this process."""
        m = time.monotonic()
        beat = self._beat
        if beat is not None and m - beat > STALL_SECONDS:
            self._skip(m)
        return self._wall0 + (m - self._mono0) - self._skipped

    def beat(self) -> None:
        """Mark the loop as running (the heartbeat task, every BEAT_SECONDS)."""
        m = time.monotonic()
        if self._beat is not None and m - self._beat > STALL_SECONDS:
            self._skip(m)
        self._beat = m

    @property
    def skipped(self) -> float:
        """Seconds of stalls left out so far."""
        return self._skipped

    def _skip(self, m: float) -> None:
        # Only what exceeds STALL_SECONDS: every `now()` before this one was within
        # STALL_SECONDS of the last beat, so time still never goes back.
        with self._lock:
            beat = self._beat
            if beat is None or m - beat <= STALL_SECONDS:
                return  # another thread left this stall out already
            lost = m - beat - STALL_SECONDS
            self._skipped += lost
            self._beat = m
        log.warning("broker.stalled", seconds=round(m - beat, 3),
                    left_out=round(lost, 3))  # fmt: skip
