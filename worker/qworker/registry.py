"""Task name -> `Task`, and importing the modules that fill it.

`@task` registers into `default_registry` when its module is imported; the worker imports
the `--module` modules (in the parent, and again in each process-pool child) and then
looks every leased job's `task` up here.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from qworker._django import setup_django

if TYPE_CHECKING:
    from qworker._task import Task

__all__ = ["NotRegistered", "Registry", "default_registry", "import_modules"]


class NotRegistered(LookupError):
    """A job names a task that no imported module defines."""


class Registry:
    """Task name -> Task. Thread-safe; one per process is the normal case."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task[..., Any]] = {}
        self._lock = threading.Lock()
        #: the modules imported to fill it, for error messages
        self.modules: list[str] = []

    def register(self, t: Task[..., Any]) -> None:
        """Add a task.

        Re-registering the same function (a module reloaded) replaces it quietly.

        Raises:
            ValueError: another function already uses this task name.
        """
        with self._lock:
            old = self._tasks.get(t.name)
            if old is not None and _origin(old) != _origin(t):
                raise ValueError(
                    f"task name {t.name!r} is used twice: by {_origin(old)} and by "
                    f"{_origin(t)}; give one of them name=..."
                )
            self._tasks[t.name] = t

    def get(self, name: str) -> Task[..., Any]:
        """The task called `name`.

        Raises:
            NotRegistered: no imported module defines it; the message names the modules.
        """
        try:
            return self._tasks[name]
        except KeyError:
            raise NotRegistered(
                f"no task named {name!r} in modules {self.modules!r}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        """Every registered task name, sorted."""
        return sorted(self._tasks)

    def queues(self) -> list[str]:
        """Every registered task's queue, sorted, without repeats."""
        return sorted({t.queue for t in self._tasks.values()})


def _origin(t: Task[..., Any]) -> str:
    fn = t.fn
    module = getattr(fn, "__module__", "?")
    if (
        module == "__mp_main__"
    ):  # a spawned child re-imports the main script under this name
        module = "__main__"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


#: The registry `@task` fills and the worker reads.
default_registry = Registry()


def import_modules(
    modules: Sequence[str],
    *,
    registry: Registry | None = None,
    path: Iterable[str] = (),
) -> None:
    """Import task modules so that their `@task`s register.

    The current directory is put first on `sys.path` (as `python -m` does), so
    `qworker --module tasks` finds `./tasks.py`.

    Args:
        modules: dotted module names.
        registry: where to record the module names for error messages.
        path: extra `sys.path` entries to add first (a process-pool child gets its
            parent's).

    Raises:
        ImportError: and anything else the module raises on import; the caller reports it.
    """
    for entry in [*path, os.getcwd()]:
        if entry not in sys.path:
            sys.path.insert(0, entry)
    setup_django()  # before the task modules: they may import models
    reg = registry if registry is not None else default_registry
    for module in modules:
        importlib.import_module(module)
        if module not in reg.modules:
            reg.modules.append(module)
