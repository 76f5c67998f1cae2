"""`qbroker jobs` (the listing's filters) and `qbroker job ID` (one record)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from qbroker.admin._http import AdminError, Http, path_name
from qbroker.admin._table import ago, print_json, print_table, stamp

FILTERS = ("state", "queue", "task", "schedule")


def _add_jobs(p: argparse.ArgumentParser) -> None:
    for name in FILTERS:
        p.add_argument(f"--{name}", help=f"only jobs of this {name}")
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="PATH=JSON",
        help="argument filter, e.g. kwargs.user_id=42 or 'args.0=\"x\"'; repeatable",
    )
    p.add_argument("--limit", type=int, default=50, help="jobs to show (default 50)")
    p.add_argument("--cursor", help="the `next` cursor of a previous page")


def run_jobs(ns: argparse.Namespace, http: Http) -> int:
    query = {k: getattr(ns, k) for k in FILTERS if getattr(ns, k)}
    for where in ns.where:
        path, eq, value = where.partition("=")
        if not eq or not path.startswith(("args.", "kwargs.")):
            raise AdminError(f"--where {where!r}: write it as kwargs.user_id=42")
        query[path] = value
    query["limit"] = str(ns.limit)
    if ns.cursor:
        query["cursor"] = ns.cursor
    data = http.get("/v1/jobs", query)
    if ns.json:
        print_json(data)
        return 0
    now = time.time()
    rows = [
        [
            j["id"],
            j["queue"],
            j["task"],
            j["state"],
            j["attempts"],
            ago(j.get("created_at"), now),
            j.get("worker"),
            (j.get("error") or "")[:60],
        ]
        for j in data["jobs"]
    ]
    if rows:
        print_table(
            ["id", "queue", "task", "state", "tries", "created", "worker", "error"],
            rows,
        )
    else:
        print("no jobs match")
    if data.get("next"):
        print(f"\nmore: --cursor {data['next']}")
    return 0


def _add_job(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="the job's id")


def run_job(ns: argparse.Namespace, http: Http) -> int:
    j: dict[str, Any] = http.get(f"/v1/jobs/{path_name(ns.id)}")
    if ns.json:
        print_json(j)
        return 0
    fields = [
        ("id", j["id"]),
        ("queue", j["queue"]),
        ("task", j["task"]),
        ("state", j["state"]),
        ("attempts", f"{j['attempts']} of {j['max_retries'] + 1}"),
        ("priority", j["priority"]),
        ("worker", j.get("worker") or "-"),
        ("created", stamp(j.get("created_at"))),
        ("available", stamp(j.get("available_at"))),
        ("started", stamp(j.get("started_at"))),
        ("finished", stamp(j.get("finished_at"))),
        ("args", j.get("args")),
        ("kwargs", j.get("kwargs")),
    ]
    for key in ("progress", "progress_note", "waiting_on", "limit_key", "dedup_key"):
        if j.get(key) is not None:
            fields.append((key, j[key]))
    if j.get("result") is not None:
        fields.append(("result", j["result"]))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        print(f"{key.ljust(width)}  {value}")
    attempts = j.get("errors") or []
    if attempts:
        print("\nerrors:")
        for e in attempts:
            print(
                f"  attempt {e.get('attempt')} at {stamp(e.get('at'))}: {e.get('error')}"
            )
    elif j.get("error"):
        print(f"\nerror: {j['error']}")
    if j.get("traceback"):
        print("\n" + j["traceback"].rstrip())
    return 0


VERBS = {"jobs": (_add_jobs, run_jobs), "job": (_add_job, run_job)}
