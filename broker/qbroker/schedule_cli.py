"""`qbroker schedules`: list a broker's schedules, sync them from code, pause, run.

    qbroker schedules                          # each schedule, its next run, in words
    qbroker schedules sync --module tasks      # send the code's; say what is stale
    qbroker schedules sync --module tasks --prune
    qbroker schedules pause|resume|run|delete NAME

A client of a running broker (`--url`, env QBROKER_URL; token: env QBROKER_TOKEN, an
admin one to change schedules; `--ca` or env QBROKER_CA for an https broker).
Exit status: 0 done; 1 the broker refused or could not be reached; 2 bad flags or a
task module that fails to import.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from datetime import datetime
from typing import Any

from qclient import BrokerError, ProtocolError
from qclient.schedules import Schedules
from qclient.wire import ScheduleRecord

_HELP = "list, sync and change the broker's periodic schedules"


def add_parser(sub: Any) -> None:
    """Add `schedules` to the `qbroker` subcommands (`sub`: argparse's subparsers)."""
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument(
        "--url", default=argparse.SUPPRESS,
        help="broker URL (default: env QBROKER_URL, else http://127.0.0.1:7733)",
    )  # fmt: skip
    url.add_argument(
        "--ca", default=argparse.SUPPRESS,
        help="for an https broker, its CA's PEM file (default: env QBROKER_CA)",
    )  # fmt: skip
    p = sub.add_parser("schedules", help=_HELP, description=_HELP, parents=[url])
    acts = p.add_subparsers(dest="action")
    acts.add_parser(
        "list", parents=[url], help="each schedule, its next run (local time), in words"
    )
    s = acts.add_parser(
        "sync",
        parents=[url],
        help="send the schedules a module declares (@periodic, beat_schedule)",
        description="Upsert every schedule the modules declare, by name. Schedules"
        " the broker has that they do not declare are listed, and deleted with --prune.",
    )
    s.add_argument(
        "-m", "--module", dest="modules", action="append", required=True,
        help="module declaring tasks, imported from the current directory; repeatable",
    )  # fmt: skip
    s.add_argument(
        "--prune", action="store_true", help="delete the schedules not declared"
    )
    for action, text in (
        ("pause", "stop firing (missed ticks follow catch_up on resume)"),
        ("resume", "fire again"),
        ("run", "make one job now, outside the ticks"),
        ("delete", "delete the schedule (its jobs stay)"),
    ):
        a = acts.add_parser(action, parents=[url], help=text)
        a.add_argument("name")


def main(ns: argparse.Namespace) -> int:
    """Run `qbroker schedules ...`; returns the exit status."""
    ns.url = getattr(ns, "url", None)  # --url may come before or after the action
    ns.ca = getattr(ns, "ca", None)
    try:
        with Schedules(ns.url, ca=ns.ca) as client:
            if ns.action == "sync":
                return _sync(ns)
            if ns.action in ("pause", "resume"):
                record = getattr(client, ns.action)(ns.name)
                print(f"{record.name}: {'paused' if record.paused else 'running'}")
            elif ns.action == "run":
                print(f"{ns.name}: made job {client.run(ns.name)}")
            elif ns.action == "delete":
                client.delete(ns.name)
                print(f"{ns.name}: deleted")
            else:
                _print_table(client.list())
    except ValueError as exc:
        print(f"qbroker: {exc}", file=sys.stderr)
        return 2
    except ProtocolError as exc:
        print(
            f"qbroker: cannot reach the broker ({exc}); pass --url or set QBROKER_URL",
            file=sys.stderr,
        )
        return 1
    except BrokerError as exc:
        print(f"qbroker: the broker refused: {exc}", file=sys.stderr)
        return 1
    return 0


def _sync(ns: argparse.Namespace) -> int:
    from qworker import periodic
    from qworker.registry import import_modules

    try:
        import_modules(ns.modules)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(
            f"qbroker: importing {ns.modules} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    report = periodic.sync(ns.url, ca=ns.ca, prune=ns.prune)
    for name in report.put:
        print(f"synced  {name}")
    for name in report.deleted:
        print(f"deleted {name}")
    for name in report.stale:
        if name not in report.deleted:
            print(f"stale   {name} (not declared; --prune deletes it)")
    if not report.put and not report.stale:
        print(f"no schedules declared in {', '.join(ns.modules)}")
    return 0


def _print_table(records: list[ScheduleRecord]) -> None:
    if not records:
        print("no schedules")
        return
    rows = [("NAME", "NEXT RUN (local)", "WHEN", "TASK", "QUEUE")]
    for r in records:
        at = datetime.fromtimestamp(r.next_run_at).astimezone()
        nxt = "paused" if r.paused else at.strftime("%Y-%m-%d %H:%M:%S %Z")
        rows.append((r.name, nxt, r.words, r.task, r.queue))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
