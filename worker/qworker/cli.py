"""`qworker --queue Q --module tasks [...]`: parse flags, import the tasks, run a Worker.

Exit status: 0 after a clean stop (SIGTERM/SIGINT, or `--burst` drained); 1 after a
second signal, an internal error, a broker that refuses the token (401/403) or whose
certificate fails verification, or with
`--burst` a broker unreachable for the client's timeout; 2 for bad flags, a task module
that fails to import, or a processes pool none of whose children can start.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections.abc import Sequence

import structlog
from qclient.wire import NAME_PATTERN

from qworker import __version__
from qworker._beat import BEAT_INTERVAL
from qworker._logs import LOG_FORMATS, configure
from qworker.pools import POOL_KINDS, PoolStartError
from qworker.runner import DEFAULT_GRACE, PREFETCH_HOLD, Worker, default_concurrency

__all__ = ["build_parser", "main"]

log = structlog.get_logger("qworker.cli")


def _name(value: str) -> str:
    if not re.match(NAME_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid queue name ({NAME_PATTERN})"
        )
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0 seconds")
    return number


def _beat_seconds(value: str) -> float:
    number = float(value)
    if not 0.1 <= number <= 3600:  # the broker's range for a beat's interval
        raise argparse.ArgumentTypeError("must be within 0.1 .. 3600 seconds")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The `qworker` argument parser."""
    p = argparse.ArgumentParser(
        prog="qworker",
        description="Run qbroker jobs with the tasks defined in your modules.",
    )
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument(
        "-q", "--queue", dest="queues", action="append", type=_name, default=[],
        help="queue to consume; repeat for more, leased in the order given "
        "(default: every registered task's queue)",
    )  # fmt: skip
    p.add_argument(
        "-m", "--module", dest="modules", action="append", default=[], required=True,
        help="module defining tasks, imported from the current directory too; repeatable",
    )  # fmt: skip
    p.add_argument(
        "-c", "--concurrency", type=_positive_int, default=None,
        help=f"jobs run at once (default: CPUs, here {default_concurrency()})",
    )  # fmt: skip
    p.add_argument(
        "--pool", choices=POOL_KINDS, default="threads", help="default: threads"
    )
    p.add_argument(
        "--max-tasks-per-child", type=_positive_int, default=None,
        help="with --pool processes: replace a child after this many tasks",
    )  # fmt: skip
    p.add_argument(
        "--grace", type=_seconds, default=DEFAULT_GRACE,
        help=f"seconds running tasks get to finish after SIGTERM (default {DEFAULT_GRACE:g})",
    )  # fmt: skip
    p.add_argument(
        "--prefetch", type=_count, default=0, metavar="N",
        help="hold up to N jobs beyond the slots while runs are short; one that waits "
        f"{PREFETCH_HOLD:g} s for a slot goes back to the broker (default 0: lease only "
        "for free slots)",
    )  # fmt: skip
    p.add_argument(
        "--burst", action="store_true",
        help="run the jobs that are ready, then exit 0",
    )  # fmt: skip
    p.add_argument(
        "--url", default=None,
        help="broker URL (default: env QBROKER_URL, else http://127.0.0.1:7733)",
    )  # fmt: skip
    p.add_argument(
        "--token", default=None,
        help="the broker's bearer token (default: env QBROKER_TOKEN)",
    )  # fmt: skip
    p.add_argument(
        "--ca", default=None,
        help="PEM file of the CA that signed an https broker's certificate "
        "(default: env QBROKER_CA, else the system's CAs)",
    )  # fmt: skip
    p.add_argument(
        "--django-settings", default=None, metavar="MODULE",
        help="a Django settings module: set Django up before importing the task "
        "modules (default: env DJANGO_SETTINGS_MODULE)",
    )  # fmt: skip
    p.add_argument(
        "--name", default=None, help="worker name in the broker (default: host:pid)"
    )
    p.add_argument(
        "--beat-interval", type=_beat_seconds, default=BEAT_INTERVAL, metavar="S",
        help="seconds between the beats that list the worker in `qbroker workers`; "
        f"3 missed make it lost (default {BEAT_INTERVAL:g})",
    )  # fmt: skip
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"],
        default=os.environ.get("QWORKER_LOG_LEVEL", "info"),
        help="default: env QWORKER_LOG_LEVEL, else info",
    )  # fmt: skip
    p.add_argument(
        "--log-format", choices=LOG_FORMATS,
        default=os.environ.get("QWORKER_LOG_FORMAT", "kv"),
        help="key=value lines (default) or JSON lines; env QWORKER_LOG_FORMAT",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `qworker` command.

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.max_tasks_per_child is not None and ns.pool != "processes":
        parser.error("--max-tasks-per-child needs --pool processes")
    configure(ns.log_level, ns.log_format)
    if ns.django_settings:  # read by the task-module import, here and in pool children
        os.environ["DJANGO_SETTINGS_MODULE"] = ns.django_settings
    try:
        worker = Worker(
            ns.queues,
            modules=ns.modules,
            url=ns.url,
            token=ns.token,
            ca=ns.ca,
            concurrency=ns.concurrency,
            pool=ns.pool,
            max_tasks_per_child=ns.max_tasks_per_child,
            grace=ns.grace,
            name=ns.name,
            prefetch=ns.prefetch,
            beat_interval=ns.beat_interval,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return worker.run(burst=ns.burst)
    except ValueError as exc:
        parser.error(str(exc))
    except PoolStartError as exc:
        log.error("worker.pool_failed", error=str(exc))
        return 2
    except Exception as exc:  # a task module failed to import: say which and why
        log.error(
            "worker.import_failed",
            modules=ns.modules,
            error=f"{type(exc).__name__}: {exc}",
        )
        traceback.print_exc(file=sys.stderr)
        return 2
