"""`qbroker` admin verbs beside `serve`: each asks a running broker over HTTP.

One module per concern (`overview.py`: status, queues, workers; `jobs.py`: jobs, job),
each exposing `VERBS`: {verb: (add_arguments, run)}. A verb prints aligned tables for
people, or the broker's JSON with `--json`; it exits 1 with one line on stderr when the
broker is unreachable or refuses (a wrong token, an unknown job).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qbroker.admin import jobs, overview
from qbroker.admin._http import AdminError, Http

__all__ = ["VERBS", "add_parsers", "main"]

Verb = tuple[
    Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Http], int]
]
VERBS: dict[str, Verb] = {**overview.VERBS, **jobs.VERBS}
_HELP = {
    "status": "the broker, its queues and workers on one screen",
    "queues": "every queue's jobs by state",
    "workers": "the workers registry: who runs what, who is lost",
    "jobs": "list jobs, newest first, by state/queue/task/schedule/arguments",
    "job": "one job's record: attempts, errors, traceback, result",
}


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add every admin verb to `qbroker`'s subcommands."""
    for name, (add_arguments, _) in VERBS.items():
        p = sub.add_parser(name, help=_HELP.get(name))
        p.add_argument(
            "--url", help="the broker (QBROKER_URL, default http://127.0.0.1:7733)"
        )
        p.add_argument("--token", help="its bearer token (QBROKER_TOKEN)")
        p.add_argument("--ca", help="the CA of an https broker, PEM (QBROKER_CA)")
        p.add_argument(
            "--json", action="store_true", help="print the broker's JSON replies"
        )
        add_arguments(p)


def main(ns: argparse.Namespace) -> int:
    """Run the admin verb `ns.command`; returns the exit status."""
    _, run = VERBS[ns.command]
    try:
        return run(ns, Http(ns.url, ns.token, ns.ca))
    except AdminError as exc:
        print(f"qbroker {ns.command}: {exc}", file=sys.stderr)
        return 1
