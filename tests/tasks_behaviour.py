"""Tasks for tests/test_worker_behaviour.py, imported by `qworker --module
tasks_behaviour` (a worker runs with `cwd=tests/`); the test process imports it as
`tests.tasks_behaviour` to send jobs. Counted tasks append a line to a file."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from qworker import current_job, task


def _note(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(f"{line} {time.time():.3f} {os.getpid()}\n")


def _context() -> dict[str, Any]:
    job = current_job()
    assert job is not None
    job.progress(0.5, "half way")
    progress = job.last_progress
    return {
        "id": job.id,
        "queue": job.queue,
        "task": job.task,
        "attempt": job.attempt,
        "headers": job.headers,
        "progress": [progress.fraction, progress.note] if progress else None,
        "cancelled": job.cancelled,
        "pid": os.getpid(),
    }


@task(max_retries=0)
def wb_context() -> dict[str, Any]:
    return _context()


@task(max_retries=0)
async def wb_context_async() -> dict[str, Any]:
    await asyncio.sleep(0)
    return _context()


@task(max_retries=0)
def wb_until_cancelled(path: str) -> str:
    """Run until the worker says the run no longer counts, then note it."""
    job = current_job()
    assert job is not None
    _note(path, "start")
    deadline = time.monotonic() + 60
    while not job.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    _note(path, "cancelled" if job.cancelled else "timeout")
    return "stopped"


@task(max_retries=3)
def wb_send_email(name: str) -> str:
    return f"sent to {name}"


@task(max_retries=1, retry_backoff=False)
def wb_own_type_error(path: str) -> None:
    """A TypeError the task raises itself: an ordinary exception, retried."""
    _note(path, "run")
    raise TypeError("the task's own mistake")


@task(max_retries=2, time_limit=0.5, retry_backoff=False)
def wb_limited(path: str) -> None:
    _note(path, "run")
    time.sleep(30)


@task(max_retries=1, time_limit=0.5, retry_backoff=False, retry_on_timeout=True)
def wb_limited_retried(path: str) -> None:
    _note(path, "run")
    time.sleep(30)


@task(timeout=2, max_retries=3)
def wb_short_lease(path: str, seconds: float) -> str:
    _note(path, "start")
    time.sleep(seconds)
    return "done"


@task(max_retries=0)
def wb_quick(x: int) -> int:
    return x
