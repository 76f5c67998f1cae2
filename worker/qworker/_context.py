"""The job context: what a running task may know about its job, `current_job()`.

A worker sets the context around each run (in a pool thread, in a pool child process,
inside an `async def` task's coroutine), so a task reads it with `current_job()` and
no extra parameter. Outside a run, `current_job()` is None (rq's `get_current_job()`,
dramatiq's `CurrentMessage`), so a task stays callable as a plain function.

`progress()` is recorded on the context, in the process that runs the task (a pool child
hands it to its parent through shared memory), and the worker sends the latest with its
next heartbeat, at most once a second per job. `cancelled` turns true when the worker
learns the run no longer counts (the job was cancelled, its lease lost, its time limit
or the shutdown grace ran out), so a task that checks it can stop early; the worker
stops the run its own way too (see docs/worker.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "JobContext",
    "Progress",
    "current_job",
    "in_context",
    "reset_current",
    "set_current",
]

MAX_NOTE_CHARS = 1000  #: a progress note longer than this is cut (the wire's limit)

T = TypeVar("T")

_current: ContextVar[JobContext | None] = ContextVar("qworker_job", default=None)


class Progress(NamedTuple):
    """The last progress a task reported."""

    fraction: float  #: 0.0 .. 1.0
    note: str
    at: float  #: unix seconds


class JobContext:
    """The job a task is running for. Read-only for the task, but for `progress()`.

    Attributes:
        id: the job's id.
        queue: the queue it was leased from.
        task: the task name it carries.
        attempt: 1 for the first delivery, 2 for the first retry, ...
        headers: the job's headers, as sent.
    """

    __slots__ = (
        "_cancelled",
        "_on_progress",
        "_progress",
        "attempt",
        "headers",
        "id",
        "queue",
        "task",
    )

    def __init__(
        self,
        id: str,
        queue: str,
        task: str,
        attempt: int,
        headers: Mapping[str, Any],
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.id = id
        self.queue = queue
        self.task = task
        self.attempt = attempt
        self.headers = dict(headers)
        self._cancelled = False
        self._progress: Progress | None = None
        self._on_progress = on_progress

    def __repr__(self) -> str:
        return f"<JobContext {self.task} {self.id} attempt={self.attempt}>"

    @property
    def cancelled(self) -> bool:
        """True once the worker learned this run no longer counts: the job was
        cancelled, its lease was lost, or its time limit or the shutdown grace ran
        out. Its outcome will not be reported; stop when convenient."""
        return self._cancelled

    def cancel(self) -> None:
        """Mark the run as no longer counting (the worker calls this)."""
        self._cancelled = True

    def progress(self, fraction: float, note: str = "") -> None:
        """Record how far the run has got.

        Args:
            fraction: from 0.0 (nothing done) to 1.0 (all done).
            note: a short text for people (cut at 1,000 characters).

        Raises:
            ValueError: `fraction` is not a finite number between 0 and 1.
        """
        value = float(fraction)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"progress fraction must be between 0 and 1, not {value}")
        self.record_progress(Progress(value, str(note)[:MAX_NOTE_CHARS], time.time()))

    def record_progress(self, progress: Progress) -> None:
        """Keep `progress` as the last one (the worker calls this with what a pool
        child reported)."""
        self._progress = progress
        if self._on_progress is not None:
            self._on_progress(progress)

    @property
    def last_progress(self) -> Progress | None:
        """The last `progress()` recorded, or None."""
        return self._progress


def current_job() -> JobContext | None:
    """The job the calling task runs for, or None outside a worker's run.

    Works in sync and `async def` tasks, in the threads and the processes pool.
    """
    return _current.get()


def set_current(context: JobContext | None) -> Any:
    """Make `context` the current job; returns the token to pass to `reset_current`."""
    return _current.set(context)


def reset_current(token: Any) -> None:
    """Undo a `set_current`."""
    _current.reset(token)


async def in_context(coro: Coroutine[Any, Any, T], context: JobContext | None) -> T:
    """Await `coro` with `context` current: an event loop in another thread runs it
    in that thread's context, not in the caller's."""
    token = _current.set(context)
    try:
        return await coro
    finally:
        _current.reset(token)
