"""Tasks for the dashboard, CLI and workers-registry tests (`qworker --module tasks_ui`)."""

from __future__ import annotations

import time

from qworker import task


@task(timeout=5, max_retries=0)
def ui_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"
