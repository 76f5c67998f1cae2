"""`qbroker status`, `qbroker queues`, `qbroker workers`."""

from __future__ import annotations

import argparse
import time
from typing import Any

from qbroker.admin._http import Http
from qbroker.admin._table import ago, print_json, print_table, span

STATES = ("queued", "scheduled", "active", "succeeded", "failed", "dead")


def _queue_rows(queues: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for q in queues:
        counts = q.get("counts", {})
        name = q["queue"] + (" (paused)" if q.get("paused") else "")
        rows.append(
            [name, *(counts.get(s, 0) for s in STATES), span(q.get("oldest_age"))]
        )
    return rows


def _print_queues(queues: list[dict[str, Any]]) -> None:
    if not queues:
        print("no queues yet")
        return
    print_table(["queue", *STATES, "oldest"], _queue_rows(queues))


def _print_workers(workers: list[dict[str, Any]], now: float) -> None:
    if not workers:
        print("no workers registered")
        return
    rows = [
        [
            w["name"],
            w["state"],
            ",".join(w.get("queues", [])),
            f"{w.get('pool')}x{w.get('concurrency')}",
            len(w.get("jobs", [])),
            ago(w.get("last_beat_at"), now),
            " ".join(w.get("jobs", [])[:3]) + (" ..." if len(w["jobs"]) > 3 else ""),
        ]
        for w in workers
    ]
    print_table(
        ["worker", "state", "queues", "pool", "running", "last beat", "jobs"], rows
    )


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


def run_queues(ns: argparse.Namespace, http: Http) -> int:
    data = http.get("/v1/queues")
    if ns.json:
        print_json(data)
    else:
        _print_queues(data["queues"])
    return 0


def run_workers(ns: argparse.Namespace, http: Http) -> int:
    data = http.get("/v1/workers")
    if ns.json:
        print_json(data)
    else:
        _print_workers(data["workers"], time.time())
    return 0


def run_status(ns: argparse.Namespace, http: Http) -> int:
    health = http.get("/healthz")
    queues = http.get("/v1/queues")
    workers = http.get("/v1/workers")
    if ns.json:
        print_json({"health": health, **queues, **workers})
        return 0
    ws = workers["workers"]
    alive = sum(1 for w in ws if w["state"] == "alive")
    lost = sum(1 for w in ws if w["state"] == "lost")
    print(
        f"broker {http.url}: {health['status']}, version {health['version']}; "
        f"{len(queues['queues'])} queues, {alive} workers alive, {lost} lost"
    )
    print()
    _print_queues(queues["queues"])
    print()
    _print_workers(ws, time.time())
    return 0


VERBS = {
    "status": (_no_args, run_status),
    "queues": (_no_args, run_queues),
    "workers": (_no_args, run_workers),
}
