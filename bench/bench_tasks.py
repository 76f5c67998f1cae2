"""Tasks for the qbroker benchmarks (`bench/e2e.py`), run by `qworker --module bench_tasks`.

The worker runs with `cwd=bench/`, so this file is the top-level module `bench_tasks`.
`noop` is the counterpart of Celery's `qbroker_bench.noop` in `celery_tasks.py`: no
arguments, returns None. The benchmarks send jobs with `task="noop"` to a fresh queue
and start the worker with `--queue <that queue>`.
"""

from __future__ import annotations

from qworker import task


@task(max_retries=0)
def noop() -> None:
    return None
