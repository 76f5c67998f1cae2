"""Execution pools: where tasks actually run, in threads or in child processes.

Theory of operation. Both pools have the same shape: `size` slots, each a thread of this
process, all taking `Execution`s from one queue. The runner only leases as many jobs as
there are free slots (plus, with `prefetch`, a few held jobs), so the queue is short; a
job waits in it while a slot replaces its child process, or while it is held.

- `threads.ThreadPool`: a slot thread runs the task itself; a sync task cannot be
  killed, so stopping one abandons its thread.
- `processes.ProcessPool`: a slot thread owns one child process (`_child.py` is what
  runs there) and talks to it over a pipe; stopping a task kills the child.

Pools report each run to `on_done(execution, outcome)` from a slot thread; the runner
decides whether an outcome still counts (a stopped execution's late outcome does not).
"""

from __future__ import annotations

from collections.abc import Sequence

from qworker.pools._base import OnDone, Pool, PoolStartError, WorkerLost
from qworker.pools.processes import RUN_MAX, ProcessPool
from qworker.pools.threads import ThreadPool

__all__ = [
    "POOL_KINDS",
    "RUN_MAX",
    "OnDone",
    "Pool",
    "PoolStartError",
    "ProcessPool",
    "ThreadPool",
    "WorkerLost",
    "make_pool",
]

POOL_KINDS = ("threads", "processes")


def make_pool(
    kind: str,
    size: int,
    on_done: OnDone,
    *,
    modules: Sequence[str] = (),
    max_tasks_per_child: int | None = None,
) -> Pool:
    """Build the pool `kind` ("threads" or "processes") with `size` slots.

    Raises:
        ValueError: an unknown kind or a size below 1.
    """
    if size < 1:
        raise ValueError("concurrency must be at least 1")
    if kind == "threads":
        return ThreadPool(size, on_done)
    if kind == "processes":
        return ProcessPool(
            size, on_done, modules=modules, max_tasks_per_child=max_tasks_per_child
        )
    raise ValueError(f"unknown pool {kind!r}; choose one of {POOL_KINDS}")
