"""`qbroker pause|resume|purge|limits|retry|cancel`: job control from a shell.

    qbroker pause send_email                  # lease nothing from it (it still takes jobs)
    qbroker resume send_email
    qbroker purge send_email --state queued --state scheduled
    qbroker limits                            # every limit, its active jobs now
    qbroker limits set task:charge --rate 10/s --concurrency 5 [--burst 2]
    qbroker limits delete task:charge
    qbroker retry JOB_ID                      # or, in bulk, with the filters of `jobs`:
    qbroker retry --state dead --queue send_email
    qbroker cancel JOB_ID

A client of a running broker (`--url`, env QBROKER_URL; `--token`, env
QBROKER_TOKEN; `--ca`, env QBROKER_CA, for an https:// broker with a private CA). Plain text for people; `--json` prints the broker's reply for scripts.
Exit status: 0 done; 1 the broker refused or could not be reached; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from qclient import BrokerError, Client, ProtocolError
from qclient.rates import format_rate
from qclient.wire import LimitRecord

__all__ = ["COMMANDS", "add_parsers", "main"]

COMMANDS = ("pause", "resume", "purge", "limits", "retry", "cancel")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--url",
        help="broker URL (default: env QBROKER_URL, else http://127.0.0.1:7733)",
    )
    p.add_argument("--token", help="the broker's token (default: env QBROKER_TOKEN)")
    p.add_argument(
        "--ca", help="CA file to verify an https:// broker (default: env QBROKER_CA)"
    )
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    return p


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", help="dead, failed, expired, cancelled, ...")
    p.add_argument("--queue")
    p.add_argument("--task")
    p.add_argument("--schedule", help="jobs made by this schedule")
    p.add_argument(
        "--where", action="append", default=[], metavar="PATH=VALUE",
        help="argument content, such as kwargs.user_id=42 (VALUE read as JSON when"
        " it is, else as a string); repeatable",
    )  # fmt: skip


def add_parsers(sub: Any) -> None:
    """Add the job-control verbs to the `qbroker` subcommands (argparse subparsers)."""
    common = _common()
    for verb, text in (
        ("pause", "stop leasing from a queue (it still takes jobs)"),
        ("resume", "lease from a paused queue again"),
    ):
        p = sub.add_parser(verb, parents=[common], help=text, description=text)
        p.add_argument("queue")
    p = sub.add_parser(
        "purge", parents=[common], help="delete a queue's waiting jobs",
        description="Delete a queue's jobs in the given states (default: queued and"
        " scheduled). Active jobs are never purged.",
    )  # fmt: skip
    p.add_argument("queue")
    p.add_argument(
        "--state", dest="states", action="append",
        help="a state to purge; repeatable (default: queued, scheduled)",
    )  # fmt: skip
    p = sub.add_parser(
        "limits", parents=[common], help="list, set or delete global limits"
    )
    acts = p.add_subparsers(dest="action")
    acts.add_parser("list", parents=[common], help="every limit (the default)")
    s = acts.add_parser(
        "set", parents=[common], help="create or replace a limit",
        description="KEY is queue:NAME, task:NAME or a jobs' limit_key (customer:42).",
    )  # fmt: skip
    s.add_argument("key")
    s.add_argument("--concurrency", type=int, help="jobs active at once")
    s.add_argument("--rate", help="starts, as 10/s, 100/m or 1000/h")
    s.add_argument("--burst", type=int, default=0, help="starts allowed early")
    d = acts.add_parser("delete", parents=[common], help="remove a limit")
    d.add_argument("key")
    p = sub.add_parser(
        "retry", parents=[common], help="put dead/failed jobs back to queued",
        description="Retry one job by id, or every job the filters match.",
    )  # fmt: skip
    p.add_argument("id", nargs="?")
    _filters(p)
    p = sub.add_parser("cancel", parents=[common], help="cancel a job now")
    p.add_argument("id")


def _where(pairs: list[str]) -> dict[str, Any]:
    """`--where` PATH=VALUE pairs as the client's `where`.

    Raises:
        ValueError: a pair without "=".
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        path, eq, raw = pair.partition("=")
        if not eq or not path:
            raise ValueError(f"--where {pair!r}: use PATH=VALUE, such as kwargs.id=42")
        try:
            out[path] = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            out[path] = raw
    return out


def _show(ns: argparse.Namespace, value: Any, text: Callable[[], str]) -> None:
    if ns.json:
        print(msgspec.json.encode(value).decode())
    else:
        print(text())


def main(ns: argparse.Namespace) -> int:
    """Run one job-control verb; returns the exit status."""
    try:
        with Client(
            ns.url, ns.token, ca=ns.ca or os.environ.get("QBROKER_CA")
        ) as client:
            _run(ns, client)
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
        field = f" (field {exc.field})" if getattr(exc, "field", None) else ""
        print(f"qbroker: the broker refused: {exc}{field}", file=sys.stderr)
        return 1
    return 0


def _run(ns: argparse.Namespace, client: Client) -> None:
    cmd = ns.command
    if cmd in ("pause", "resume"):
        paused = client.pause(ns.queue) if cmd == "pause" else client.resume(ns.queue)
        reply = {"queue": ns.queue, "paused": paused}
        _show(ns, reply, lambda: f"{ns.queue}: {'paused' if paused else 'running'}")
    elif cmd == "purge":
        states = ns.states or ["queued", "scheduled"]
        n = client.purge(ns.queue, states)
        _show(ns, {"deleted": n}, lambda: f"{ns.queue}: deleted {n} jobs")
    elif cmd == "limits":
        _limits(ns, client)
    elif cmd == "retry":
        _retry(ns, client)
    elif cmd == "cancel":
        state = client.cancel(ns.id)
        _show(ns, {"id": ns.id, "state": state}, lambda: f"{ns.id}: {state}")


def _limits(ns: argparse.Namespace, client: Client) -> None:
    if ns.action == "set":
        if ns.concurrency is None and ns.rate is None:
            raise ValueError("give --concurrency, --rate or both")
        record = client.set_limit(
            ns.key, concurrency=ns.concurrency, rate=ns.rate, burst=ns.burst
        )
        _show(ns, record, lambda: _limits_table([record]))
    elif ns.action == "delete":
        client.delete_limit(ns.key)
        _show(ns, {"key": ns.key, "deleted": True}, lambda: f"{ns.key}: deleted")
    else:
        records = client.limits()
        _show(ns, {"limits": records}, lambda: _limits_table(records))


def _retry(ns: argparse.Namespace, client: Client) -> None:
    filters = (ns.state, ns.queue, ns.task, ns.schedule)
    if ns.id is not None:
        if any(f is not None for f in filters) or ns.where:
            raise ValueError("give a job id or filters, not both")
        state = client.retry(ns.id)
        _show(ns, {"id": ns.id, "state": state}, lambda: f"{ns.id}: {state}")
        return
    if all(f is None for f in filters) and not ns.where:
        raise ValueError("give a job id, or filters such as --state dead --queue Q")
    n = client.retry_jobs(
        state=ns.state, queue=ns.queue, task=ns.task, schedule=ns.schedule,
        where=_where(ns.where),
    )  # fmt: skip
    _show(ns, {"retried": n}, lambda: f"retried {n} jobs")


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _limits_table(records: list[LimitRecord]) -> str:
    if not records:
        return "no limits"
    rows = [("KEY", "CONCURRENCY", "RATE", "ACTIVE")]
    for r in records:
        rate = "-"
        if r.rate is not None:
            rate = format_rate(r.rate.limit, r.rate.per)
            rate += f" burst {r.rate.burst}" if r.rate.burst else ""
        conc = "-" if r.concurrency is None else str(r.concurrency)
        rows.append((r.key, conc, rate, str(r.active)))
    return _table(rows)
