"""The dashboard's pages other than the job listings (pages_jobs.py): overview, queues,
one queue, workers, schedules, limits. Each reads through `ctx.api` (the broker's own
API) and returns its title and content; a failed read shows as a message in place."""

from __future__ import annotations

import time
from collections import deque
from typing import Any
from urllib.parse import quote

from qbroker import metrics
from qbroker.ui.context import Ctx, kv, problem, section, short
from qbroker.ui.markup import Safe, duration, el, link, notice, table, when
from qbroker.ui.pages_jobs import job_table

RATE_WINDOW = 60.0  #: seconds of counter samples the overview's rates are taken over
_STATES = ("queued", "scheduled", "active", "succeeded", "failed", "dead")


def qpath(name: str) -> str:
    return quote(name, safe="")


class Rates:
    """Jobs in and out per minute by queue, from the broker's own /metrics counters,
    sampled each time the overview renders (no background task)."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, dict[str, tuple[float, float]]]] = deque()

    def per_minute(self) -> dict[str, tuple[float | None, float | None]]:
        now = time.monotonic()
        sample = {
            q: (float(i), float(o)) for q, (i, o) in metrics.QUEUES.totals().items()
        }
        while self._samples and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        self._samples.append((now, sample))
        then, old = self._samples[0]
        span = now - then
        out: dict[str, tuple[float | None, float | None]] = {}
        for q, (i, o) in sample.items():
            if span < 1.0 or q not in old:
                out[q] = (None, None)
                continue
            i0, o0 = old[q]
            out[q] = (
                (i - i0) * 60 / span if i >= i0 else None,
                (o - o0) * 60 / span if o >= o0 else None,
            )
        return out


RATES = Rates()


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def queue_rows(ctx: Ctx, queues: list[dict[str, Any]]) -> Safe:
    ctx.api.calls.append(("GET", "/metrics", None))
    rates = RATES.per_minute()
    rows = []
    for q in queues:
        name = q.get("queue", "")
        counts = q.get("counts", {})
        rate_in, rate_out = rates.get(name, (None, None))
        label: list[Any] = [link(f"/ui/queues/{qpath(name)}", name)]
        if q.get("paused"):
            label.append(el("span", "paused", class_="badge st-paused"))
        rows.append(
            [
                Safe(" ".join(label)),
                *(counts.get(s, 0) for s in _STATES),
                duration(q.get("oldest_age")),
                _rate(rate_in),
                _rate(rate_out),
            ]
        )
    return table(
        ["queue", *_STATES, "oldest ready", "in/min", "out/min"],
        rows,
        empty="No queues yet: enqueue a job to make one.",
    )


def worker_rows(ctx: Ctx, workers: list[dict[str, Any]], *, all_: bool) -> Safe:
    rows = []
    for w in workers:
        if not all_ and w.get("state") == "stopped":
            continue
        jobs = w.get("jobs", [])
        rows.append(
            [
                w.get("name"),
                el("span", w.get("state"), class_=f"badge st-{w.get('state')}"),
                w.get("host"),
                w.get("pid"),
                ", ".join(w.get("queues", [])),
                f"{w.get('pool')} x {w.get('concurrency')}",
                Safe(" ".join(link(f"/ui/jobs/{qpath(j)}", short(j, 30)) for j in jobs))
                if jobs
                else "idle",
                when(w.get("started_at"), ctx.now),
                when(w.get("last_beat_at"), ctx.now),
                w.get("version"),
            ]
        )
    return table(
        ["worker", "state", "host", "pid", "queues", "pool", "running", "started",
         "last beat", "version"],
        rows,
        empty="No workers have registered (a qworker beats every 10 s).",
    )  # fmt: skip


async def overview(ctx: Ctx) -> tuple[str, Safe]:
    parts: list[Safe] = []
    data, err = await ctx.api.try_get("/v1/queues")
    parts.append(
        section(
            "Queues",
            problem(err, "queues") if err else queue_rows(ctx, data["queues"]),
        )
    )
    data, err = await ctx.api.try_get("/v1/workers")
    if err:
        parts.append(section("Workers", problem(err, "workers")))
    else:
        ws = data["workers"]
        counts = {s: sum(1 for w in ws if w["state"] == s) for s in ("alive", "lost")}
        parts.append(
            section(
                f"Workers: {counts['alive']} alive, {counts['lost']} lost",
                worker_rows(ctx, ws, all_=False),
            )
        )
    data, err = await ctx.api.try_get("/v1/jobs", {"state": "failed", "limit": "10"})
    parts.append(
        section(
            "Recent failures",
            problem(err, "failed jobs")
            if err
            else job_table(ctx, data["jobs"], select=False),
        )
    )
    return "Overview", Safe("".join(parts))


async def queues(ctx: Ctx) -> tuple[str, Safe]:
    data, err = await ctx.api.try_get("/v1/queues")
    body = problem(err, "queues") if err else queue_rows(ctx, data["queues"])
    return "Queues", section("Queues", body)


async def queue(ctx: Ctx, name: str) -> tuple[str, Safe]:
    path = f"/v1/queues/{qpath(name)}"
    q, err = await ctx.api.try_get(path)
    if err:
        ctx.status = err.status
        return f"Queue {name}", problem(err, f"queue {name}")
    paused = q.get("paused")
    buttons = [
        ctx.action("Resume", "POST", path + "/resume")
        if paused
        else ctx.action("Pause", "POST", path + "/pause"),
        ctx.action(
            "Purge queued and scheduled",
            "POST",
            path + "/purge",
            body={"states": ["queued", "scheduled"]},
            confirm=f"Delete every queued and scheduled job of {name}?",
            danger=True,
        ),
    ]
    counts = q.get("counts", {})
    head = [
        el("div", *buttons, class_="buttons"),
        kv(
            [
                ("paused", "yes" if paused else "no"),
                *((s, counts.get(s, 0)) for s in counts),
                ("oldest ready", duration(q.get("oldest_age"))),
            ]
        ),
    ]
    jobs, err = await ctx.api.try_get("/v1/jobs", {"queue": name, "limit": "50"})
    listing = (
        problem(err, "its jobs") if err else job_table(ctx, jobs["jobs"], select=False)
    )
    more = link(f"/ui/jobs?queue={qpath(name)}", "all its jobs, with filters")
    return f"Queue {name}", Safe(
        section(f"Queue {name}", *head) + section("Newest jobs", listing, more)
    )


async def workers(ctx: Ctx) -> tuple[str, Safe]:
    data, err = await ctx.api.try_get("/v1/workers")
    body = (
        problem(err, "workers") if err else worker_rows(ctx, data["workers"], all_=True)
    )
    note = el(
        "p",
        "A worker is lost after 3 missed beats and forgotten after a day.",
        class_="muted",
    )
    return "Workers", section("Workers", body, note)


async def schedules(ctx: Ctx) -> tuple[str, Safe]:
    data, err = await ctx.api.try_get("/v1/schedules")
    if err:
        return "Schedules", section("Schedules", problem(err, "schedules"))
    rows = []
    for s in data.get("schedules", []):
        name = s.get("name", "")
        path = f"/v1/schedules/{qpath(name)}"
        pause = (
            ctx.action("Resume", "POST", path + "/resume")
            if s.get("paused")
            else ctx.action("Pause", "POST", path + "/pause")
        )
        last = s.get("last_job_id")
        rows.append(
            [
                name,
                s.get("task"),
                s.get("queue"),
                s.get("words") or s.get("cron") or s.get("every"),
                "paused" if s.get("paused") else when(s.get("next_run_at"), ctx.now),
                when(s.get("last_run_at"), ctx.now),
                link(f"/ui/jobs/{qpath(last)}", short(last, 30)) if last else "-",
                link(f"/ui/jobs?schedule={qpath(name)}", "jobs"),
                Safe(ctx.action("Run now", "POST", path + "/run") + pause),
            ]
        )
    body = table(
        ["schedule", "task", "queue", "when", "next run", "last run", "last job",
         "", ""],
        rows,
        empty="No schedules.",
    )  # fmt: skip
    return "Schedules", section("Schedules", body)


async def limits(ctx: Ctx) -> tuple[str, Safe]:
    data, err = await ctx.api.try_get("/v1/limits")
    if err:
        return "Limits", section("Limits", problem(err, "limits"))
    rows = []
    for lim in data.get("limits", []):
        key = lim.get("key", "")
        rate = lim.get("rate")
        rows.append(
            [
                key,
                lim.get("concurrency") or "-",
                f"{rate['limit']} per {rate['per']:g}s (+{rate.get('burst', 0)})"
                if rate
                else "-",
                lim.get("active"),
                when(lim.get("updated_at"), ctx.now),
                ctx.action(
                    "Delete",
                    "DELETE",
                    f"/v1/limits/{qpath(key)}",
                    confirm=f"Delete the limit {key}?",
                    danger=True,
                ),
            ]
        )
    ctx.actions.append(("PUT", "/v1/limits/KEY", '{"concurrency": 5, "rate": "10/m"}'))
    form = el(
        "form",
        el("input", name="key", placeholder="task:send_email", required=True),
        el("input", name="concurrency", placeholder="concurrency", type="number"),
        el("input", name="rate", placeholder="rate, e.g. 10/m"),
        el("button", "Set limit", type="submit"),
        class_="api-form",
        data_method="PUT",
        data_path="/v1/limits/{key}",
    )
    body = table(
        ["key", "concurrency", "rate", "active", "updated", ""],
        rows,
        empty="No limits.",
    )
    return "Limits", section("Limits", body, form)


def not_found(what: str) -> tuple[str, Safe]:
    return "Not found", notice(f"No dashboard page {what}.")
