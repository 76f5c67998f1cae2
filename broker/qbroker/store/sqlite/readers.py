"""A few long-lived threads that run the broker's reads off the trio loop.

`trio.to_thread.run_sync` costs about 120 µs a call here (a limiter, a cancel scope, a
thread-cache hand-off); a read of one job by id takes a tenth of that. These threads take
calls from one queue and wake the waiting task through the trio token: about half the
cost, and the same rule holds -- the trio loop never waits on SQLite.

A call is cancellable until a thread takes it (then its task waits for it: reads are
short), so a stop's cancel does not wait behind a queue of reads: after SIGTERM woke
4,000 result long-polls, their queued reads kept the broker running for 81 s.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
READ_THREADS = 4  #: reads that can run at once (a slow stats scan holds only one)


class _Item:
    """One submitted call; `state` moves from QUEUED to TAKEN or CANCELLED under the lock."""

    __slots__ = ("args", "fn", "state", "task")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], task: Any
    ) -> None:
        self.fn = fn
        self.args = args
        self.task = task
        self.state = _QUEUED


_QUEUED, _TAKEN, _CANCELLED = range(3)


class ReadThreads:
    """Start with `start()` from the trio thread; `stop()` ends the threads."""

    def __init__(self, threads: int = READ_THREADS) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  #: orders a call's take against its cancel
        self._threads = [
            threading.Thread(target=self._run, name=f"qbroker-reader-{i}", daemon=True)
            for i in range(threads)
        ]
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        for t in self._threads:
            t.start()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a reader thread and return (or raise) what it did.
        A cancel lands while the call is queued; once a thread has it, it waits."""
        item = _Item(fn, args, trio.lowlevel.current_task())
        self._queue.put(item)

        def abort(_: Any) -> trio.lowlevel.Abort:
            with self._lock:
                if item.state == _QUEUED:
                    item.state = _CANCELLED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def stop(self) -> None:
        """End the threads once the calls before this one are done (blocking)."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            if t.is_alive():
                t.join()

    def _run(self) -> None:
        token = self._token
        assert token is not None
        while (item := self._queue.get()) is not None:
            with self._lock:
                if item.state == _CANCELLED:
                    continue
                item.state = _TAKEN
            result = outcome.capture(item.fn, *item.args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, item.task, result)
            except trio.RunFinishedError:
                return
