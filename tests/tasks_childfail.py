"""A task module that imports in the worker but raises in its pool children, as one
needing a setting only the worker's own process has would: `qworker --module
tasks_childfail --pool processes` must fail at once, not lease jobs it cannot run."""

from __future__ import annotations

import os

from qworker import task

_first = os.environ.setdefault("TASKS_CHILDFAIL_PID", str(os.getpid()))
if _first != str(os.getpid()):
    raise RuntimeError("this module only imports in the worker's own process")


@task
def wt_childfail() -> None:
    return None
