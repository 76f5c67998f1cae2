"""Tasks for tests/test_client_values.py, run by an in-process `qworker.Worker`."""

from __future__ import annotations

from typing import Any

from qworker import task


@task(retry_for=())
def qc_echo(*args: Any, **kwargs: Any) -> list[Any]:
    """Its arguments as the task got them, and the names of their types."""
    types = [type(a).__name__ for a in args]
    types += [f"{k}={type(v).__name__}" for k, v in sorted(kwargs.items())]
    return [list(args), kwargs, types]
