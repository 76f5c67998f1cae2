"""Tasks for tests/test_worker.py, imported by `qworker --module tasks_worker`.

A worker subprocess runs with `cwd=tests/`, so this file is the top-level module
`tasks_worker` there; the test process imports it as `tests.tasks_worker` to send jobs.
Tasks that tests count append a line to a file named in their arguments.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from qworker import Retry, task


def _note(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(f"{line} {time.time():.3f} {os.getpid()}\n")


@task(max_retries=3, timeout=60)
def send_email(name: str) -> str:
    return "success"


@task(max_retries=2, retry_backoff=0.2, retry_jitter=False)
def wt_flaky(path: str) -> None:
    _note(path, "run")
    raise ValueError("flaky failed")


@task(max_retries=0)
def wt_boom(key: str) -> None:
    raise KeyError(key)


@task(timeout=2, max_retries=5)
def wt_slow(path: str, seconds: float) -> str:
    """Note the start, sleep, note the end: a file with one `start` ran exactly once."""
    _note(path, "start")
    time.sleep(seconds)
    _note(path, "end")
    return "slept"


@task(time_limit=1, max_retries=0)
def wt_limited(seconds: float) -> str:
    time.sleep(seconds)
    return "too late"


@task
async def wt_async(x: int) -> int:
    await asyncio.sleep(0.05)
    return x * 2


@task(max_retries=0)
def wt_unserializable() -> object:
    return object()


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for this one")


@task(max_retries=0)
def wt_unprintable() -> None:
    raise _Unprintable


@task(max_retries=0)
def wt_too_deep() -> object:
    value: list[object] = []
    for _ in range(100_000):
        value = [value]
    return value


@task(max_retries=0, retry_backoff=0.01)
def wt_no_retries(path: str) -> None:
    _note(path, "run")
    raise ValueError("must not run twice")


@task(max_retries=2, retry_for=())
def wt_retry_far(path: str) -> None:
    _note(path, "run")
    raise Retry(delay=1e12)  # over the wire's ten years: retried at ten years


@task(max_retries=3, retry_for=())
def wt_retry_on_purpose(path: str) -> int:
    """`raise Retry(...)` twice, then succeed; `retry_for=()` retries nothing else."""
    _note(path, "run")
    runs = len(Path(path).read_text().splitlines())
    if runs < 3:
        raise Retry(delay=0.05, reason=f"not yet ({runs})")
    return runs


@task
def wt_pid() -> int:
    return os.getpid()


@task(max_retries=3)
def wt_big(size: int) -> str:
    return "x" * size


@task(max_retries=0)
def wt_echo(x: int) -> list[int]:
    return [x, os.getpid()]


@task(max_retries=0)
def wt_die_once(path: str, x: int, die: bool) -> int:
    """Note the run; the job with `die` kills its process the first time it runs."""
    if die and not Path(f"{path}.died").exists():
        Path(f"{path}.died").touch()
        os._exit(3)
    _note(path, f"ran {x}")
    return x


@task(max_retries=0)
def wt_stop_a_program() -> int:
    """Start a program and stop it with SIGTERM: its exit code, as Popen reports it."""
    program = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    program.terminate()
    return program.wait(timeout=10)


@task(max_retries=0)
def wt_fork_exit(path: str) -> int:
    """Fork a child that calls sys.exit(3) at once: its exit code."""
    _note(path, "run")
    pid = os.fork()
    if pid == 0:
        sys.exit(3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
