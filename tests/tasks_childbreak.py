"""A task module whose pool children stop starting in mid-run, as when the fork server
is killed (say, by the OOM killer) after a deploy broke the code on disk: `wt_break`
creates the file named by QW_BREAK_FILE and kills its fork server; while that file
exists this module fails to import in any process but the worker's own, so the
restarted fork server cannot preload it and each new child fails to start."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from qworker import task

_BREAK = Path(os.environ["QW_BREAK_FILE"])
_first = os.environ.setdefault("TASKS_CHILDBREAK_PID", str(os.getpid()))
if _first != str(os.getpid()) and _BREAK.exists():
    raise ImportError(f"broken while {_BREAK} exists")


# Never again: killing the fork server may fail it with WorkerLost, and a retry
# leased once children start again would break them a second time.
@task(max_retries=0)
def wt_break() -> None:
    _BREAK.touch()
    os.kill(os.getppid(), signal.SIGKILL)  # a pool child's parent: the fork server


@task
def wt_after() -> str:
    return "ran"
