"""structlog set-up, called once by the CLI. Events are dotted (`job.finished`)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["LOG_FORMATS", "configure"]

LOG_FORMATS = ("kv", "json")


def configure(level: str = "info", fmt: str = "kv") -> None:
    """Log one line per event to stderr at `level`: key=value (as qbroker does) or JSON.

    Args:
        level: debug, info, warning or error.
        fmt: "kv" or "json".
    """
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event"], sort_keys=False
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
