"""A few long-lived threads that run the broker's reads off the trio loop.

`trio.to_thread.run_sync` costs about 120 µs a call here (a limiter, a cancel scope, a
thread-cache hand-off); a read of one job by id takes a tenth of that. These threads take
calls from one queue and wake the waiting task through the trio token: about half the
cost, and the same rule holds -- the trio loop never waits on SQLite.

A call is not cancellable once submitted (reads are short); its task waits for it.
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


class ReadThreads:
    """Start with `start()` from the trio thread; `stop()` ends the threads."""

    def __init__(self, threads: int = READ_THREADS) -> None:
        self._queue: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], Any] | None
        ] = queue.SimpleQueue()
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
        """Run `fn(*args)` in a reader thread and return (or raise) what it did."""
        self._queue.put((fn, args, trio.lowlevel.current_task()))

        def abort(_: Any) -> trio.lowlevel.Abort:
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
            fn, args, task = item
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:
                return
