"""What every pool shares: the protocol the runner uses, and the pool errors."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Protocol

from qworker._execute import Execution, Outcome

__all__ = ["OnDone", "Pool", "PoolStartError", "WorkerLost", "take_all"]

OnDone = Callable[[Execution, Outcome], None]


class WorkerLost(Exception):
    """The child process running the task died before it reported back."""


class Pool(Protocol):
    """What the runner needs from a pool. Every method is thread-safe."""

    def start(self) -> None:
        """Start the slots (and child processes); returns once they can take work."""

    def submit(self, execution: Execution) -> None:
        """Queue an execution; a free slot starts it at once."""

    def stop_execution(self, execution: Execution) -> bool:
        """Stop a running execution (kill its child, cancel or abandon it).

        Returns:
            True if it was running here and has been stopped or abandoned.
        """

    def collect_progress(self) -> None:
        """Bring the progress tasks reported elsewhere (a child process) onto their
        executions' contexts."""

    def drain(self) -> list[Execution]:
        """Take back every execution submitted but not yet started."""

    def stalled(self) -> bool:
        """Whether no slot can start a job now (every child failed to start)."""

    def close(self, timeout: float) -> None:
        """Stop the slots once they finish what runs; wait up to `timeout` seconds."""

    def kill_children(self) -> None:
        """SIGKILL every child process at once (the second-signal exit path)."""


class PoolStartError(RuntimeError):
    """No child of a processes pool could start: a task module that imports in the
    worker fails in a child (say, a setting the child does not have)."""


def take_all(q: queue.SimpleQueue[Execution | None]) -> list[Execution]:
    """Everything waiting in `q` now, stop sentinels left out."""
    taken: list[Execution] = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return taken
        if item is not None:
            taken.append(item)
