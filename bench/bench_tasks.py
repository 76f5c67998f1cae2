"""Tasks of the qbroker benchmarks, run by `qworker --module bench_tasks` with cwd bench/.

`add` is the e2e workload (`bench/e2e.py`); its Celery and Dramatiq twins are in
`peer_tasks.py`. `crash_run` is the task of `bench/soak.py --crash`.
"""

from __future__ import annotations

import itertools
import os
import time

from qworker import task

_runs = itertools.count()
_fd: int | None = None


@task(max_retries=0)
def add(x: int, y: int) -> int:
    return x + y


@task(max_retries=50)
def crash_run(job_id: str) -> str:
    """Note this run in the runs log named by QB_CRASH_RUNS and return its token.

    One O_APPEND write per run, no fsync: only the broker is killed in that run, so
    the page cache keeps every line.
    """
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["QB_CRASH_RUNS"], os.O_WRONLY | os.O_APPEND)
    token = f"{os.getpid()}.{next(_runs)}"
    os.write(_fd, f"{job_id} {token} {time.time():.6f}\n".encode())
    return token
