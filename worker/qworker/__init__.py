"""qworker: the worker side of qbroker.

Define tasks with `@task`, run them with the `qworker` command (or `Worker(...).run()`):

    from qworker import task

    @task(max_retries=3, timeout=60)
    def send_email(name: str) -> str:
        return "success"

    send_email.delay(name="x")          # enqueue; returns a qclient.Job

    job = current_job()                 # inside a task: id, attempt, progress(), ...

    $ qworker --queue send_email --module tasks --concurrency 8

Importing qworker (what a web app does to call `.delay()`) stays light: the runner and
the pools (threads, multiprocessing, asyncio) load only when `Worker` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qworker._context import JobContext, current_job
from qworker._task import (
    InvalidArguments,
    Retry,
    Task,
    TimeLimitExceeded,
    TooManyAttempts,
    task,
)
from qworker.registry import NotRegistered, Registry, default_registry

if TYPE_CHECKING:
    from qworker.pools import WorkerLost
    from qworker.runner import Worker

__version__ = "0.1.0"

__all__ = [
    "InvalidArguments",
    "JobContext",
    "NotRegistered",
    "Registry",
    "Retry",
    "Task",
    "TimeLimitExceeded",
    "TooManyAttempts",
    "Worker",
    "WorkerLost",
    "current_job",
    "default_registry",
    "task",
]


def __getattr__(name: str) -> Any:  # PEP 562: load the worker machinery on first use
    if name == "Worker":
        from qworker.runner import Worker

        return Worker
    if name == "WorkerLost":
        from qworker.pools import WorkerLost

        return WorkerLost
    raise AttributeError(f"module 'qworker' has no attribute {name!r}")
