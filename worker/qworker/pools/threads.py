"""The threads pool: tasks run in `size` threads of the worker's process.

A slot thread runs the task itself. `async def` tasks run on one asyncio loop in a
dedicated thread, and the slot thread waits for them. Python cannot kill a thread, so
stopping a sync task (time limit, cancel) *abandons* it: the slot is retired (it exits
when the task finally returns, and its outcome is ignored) and a fresh slot takes its
place. An async task is cancelled for real.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from qworker._execute import Execution
from qworker.pools._base import OnDone, take_all

__all__ = ["ThreadPool"]

log = structlog.get_logger("qworker.pool")


class _AsyncLoop:
    """One asyncio event loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()
                    loop.close()

                self._thread = threading.Thread(
                    target=run, name="qworker-asyncio", daemon=True
                )
                self._thread.start()
                started.wait()
                self._loop = loop
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self, timeout: float) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)


class _ThreadSlot:
    def __init__(self, pool: ThreadPool, index: int) -> None:
        self.pool = pool
        self.current: Execution | None = None
        self.future: concurrent.futures.Future[Any] | None = None
        self.retired = False
        self.thread = threading.Thread(
            target=self.run, name=f"qworker-slot-{index}", daemon=True
        )

    def run_async(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future = self.pool.loop.submit(coro)
        with self.pool.lock:
            self.future = future
        return future.result()

    def run(self) -> None:
        pool = self.pool
        while True:
            execution = pool.queue.get()
            if execution is None:
                return
            if execution.done:  # settled while it waited (cancelled): do not start it
                continue
            with pool.lock:
                self.current = execution
            outcome = execution.run(self.run_async)
            with pool.lock:
                self.current = self.future = None
                retired = self.retired
            pool.on_done(execution, outcome)
            if retired:
                return


class ThreadPool:
    """Runs tasks in `size` threads of this process. See the module docstring."""

    def __init__(self, size: int, on_done: OnDone) -> None:
        self.size = size
        self.on_done = on_done
        self.queue: queue.SimpleQueue[Execution | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.loop = _AsyncLoop()
        self._slots: list[_ThreadSlot] = []
        self._made = 0
        self.abandoned = 0  #: threads left running a stopped task

    def _add_slot(self) -> None:
        slot = _ThreadSlot(self, self._made)
        self._made += 1
        self._slots.append(slot)
        slot.thread.start()

    def start(self) -> None:
        with self.lock:
            for _ in range(self.size):
                self._add_slot()

    def submit(self, execution: Execution) -> None:
        self.queue.put(execution)

    def stop_execution(self, execution: Execution) -> bool:
        with self.lock:
            for slot in self._slots:
                if slot.current is execution:
                    break
            else:
                return False
            if slot.future is not None:  # an async task: cancel it for real
                slot.future.cancel()
                return True
            # A thread cannot be killed: leave it to finish on its own and replace it.
            slot.retired = True
            self._slots.remove(slot)
            self.abandoned += 1
            self._add_slot()
        log.warning(
            "pool.thread_abandoned",
            task=execution.task.name,
            job_id=execution.job.id,
            abandoned=self.abandoned,
        )
        return True

    def collect_progress(self) -> None:
        pass  # a task's progress is on its execution's context already

    def drain(self) -> list[Execution]:
        return take_all(self.queue)

    def stalled(self) -> bool:
        return False  # a thread slot never fails to start

    def run_here(self, execution: Execution) -> None:
        """Run `execution` in the calling thread, outside the slots, and report it.
        `stop_execution` does not find it there: the caller is left to finish it."""
        outcome = execution.run(lambda c: self.loop.submit(c).result())
        self.on_done(execution, outcome)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            slots = list(self._slots)
        for _ in slots:
            self.queue.put(None)
        for slot in slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        self.loop.close(max(0.0, deadline - time.monotonic()))

    def kill_children(self) -> None:
        pass  # no children; the process exit ends the (daemon) threads
