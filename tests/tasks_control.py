"""Tasks for tests/test_control.py, imported by `qworker --module tasks_control` (a
worker runs with `cwd=tests/`); the test process imports it as `tests.tasks_control`
to send jobs. Tasks note what happens to them in a file given as an argument."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from qworker import Retry, current_job, task


def _note(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(f"{line} {time.time():.3f} {os.getpid()}\n")


@task(max_retries=0)
def ctl_until_cancelled(path: str) -> str:
    """Run until the worker says the run no longer counts (a threads-pool task cannot
    be killed), or 60 s; note when it saw the flag."""
    job = current_job()
    assert job is not None
    _note(path, f"start {job.id}")
    deadline = time.monotonic() + 60
    while not job.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    _note(path, f"{'flagged' if job.cancelled else 'timeout'} {job.id}")
    return "finished"


@task(max_retries=0)
async def ctl_async_until_cancelled(path: str) -> str:
    """Sleep 60 s unless cancelled; note the cancel."""
    job = current_job()
    assert job is not None
    _note(path, f"start {job.id}")
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _note(path, f"cancelled {job.id}")
        raise
    return "finished"


@task(max_retries=0)
def ctl_sleep(path: str, seconds: float) -> str:
    """Sleep `seconds` (a processes-pool child is killed by a cancel)."""
    job = current_job()
    assert job is not None
    _note(path, f"start {job.id}")
    time.sleep(seconds)
    _note(path, f"end {job.id}")
    return "finished"


@task(max_retries=0)
def ctl_progress(path: str) -> str:
    """Report progress, then wait until the test saw it (the file says "seen")."""
    job = current_job()
    assert job is not None
    job.progress(0.4, "resized 40 of 100")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if Path(path).exists() and "seen" in Path(path).read_text():
            break
        time.sleep(0.02)
    job.progress(1.0, "done")
    return "ok"


@task(max_retries=2, backoff=False)
def ctl_fails_every_time(n: int) -> None:
    raise ValueError(f"attempt failed (n={n})")


@task(max_retries=3, backoff=0.05, jitter=False, dont_retry_for=(KeyError,))
def ctl_policy(kind: str) -> str:
    """Raises per `kind`: a KeyError (never retried), a Retry, or succeeds."""
    job = current_job()
    assert job is not None
    if kind == "key":
        raise KeyError("missing")
    if kind == "retry" and job.attempt < 3:
        raise Retry(delay=0.05, reason=f"not yet ({job.attempt})")
    return f"attempt {job.attempt}"


@task(rate_limit="5/s", concurrency=2, max_retries=0)
def ctl_limited(path: str) -> None:
    _note(path, "start")
    time.sleep(0.3)
    _note(path, "end")


@task(max_retries=0)
def ctl_free(path: str) -> None:
    _note(path, "free")


@task(max_retries=0)
def ctl_noop(x: int = 0) -> int:
    return x
