"""The dashboard's job pages: the filtered listing with paging and bulk actions, one
job's timeline, and the dead letters. They drive `GET /v1/jobs` (keyset paging by
`cursor`), `POST /v1/jobs/retry` (bulk, by the same filters), and per job `retry`,
`cancel` and `DELETE`."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from qbroker.ui.context import Ctx, kv, problem, section, short
from qbroker.ui.markup import Safe, el, link, notice, pre, state_badge, table, when

PAGE_SIZE = 50  #: jobs per listing page
FILTERS = ("state", "queue", "task", "schedule")  #: the listing's plain filters
ARG_PREFIXES = ("args.", "kwargs.")  #: an argument filter's path starts so
STATES = ("", "scheduled", "queued", "active", "succeeded", "failed", "dead",
          "cancelled", "expired")  # fmt: skip
_RETRYABLE = ("failed", "dead", "expired", "cancelled")
_CANCELLABLE = ("scheduled", "queued", "active")


def _jpath(job_id: str) -> str:
    return "/v1/jobs/" + quote(job_id, safe="")


def job_table(ctx: Ctx, jobs: list[dict[str, Any]], *, select: bool) -> Safe:
    rows = []
    for j in jobs:
        jid = j.get("id", "")
        cells: list[Any] = []
        if select:
            cells.append(
                el("input", type="checkbox", class_="sel", value=jid, aria_label=jid)
            )
        cells += [
            link(f"/ui/jobs/{quote(jid, safe='')}", short(jid, 30)),
            link(f"/ui/queues/{quote(j.get('queue', ''), safe='')}", j.get("queue")),
            j.get("task"),
            state_badge(j.get("state", "")),
            f"{j.get('attempts')}/{(j.get('max_retries') or 0) + 1}",
            when(j.get("created_at"), ctx.now),
            j.get("worker") or "-",
            el("span", short(j.get("error"), 60), class_="err"),
        ]
        rows.append(cells)
    head = ["id", "queue", "task", "state", "attempts", "created", "worker", "error"]
    return table(["", *head] if select else head, rows, empty="No jobs match.")


def _filters(ctx: Ctx) -> tuple[dict[str, str], Safe | None]:
    """The listing's filters from the page's query: plain ones, and one argument
    filter `arg=kwargs.user_id=42` passed on as `kwargs.user_id=42`."""
    out = {k: ctx.query[k] for k in FILTERS if ctx.query.get(k)}
    arg = ctx.query.get("arg", "").strip()
    if arg:
        path, eq, value = arg.partition("=")
        if not eq or not path.startswith(ARG_PREFIXES):
            return out, notice(
                f'An argument filter looks like kwargs.user_id=42 or args.0="x", '
                f"not {arg!r}."
            )
        out[path.strip()] = value.strip()
    return out, None


def _filter_form(ctx: Ctx) -> Safe:
    q = ctx.query
    state = el(
        "select",
        *(
            el("option", s or "any state", value=s, selected=q.get("state", "") == s)
            for s in STATES
        ),
        name="state",
    )
    fields = [
        el("label", "state ", state),
        *(
            el("label", f"{k} ", el("input", name=k, value=q.get(k, ""), size=14))
            for k in ("queue", "task", "schedule")
        ),
        el(
            "label",
            "argument ",
            el(
                "input",
                name="arg",
                value=q.get("arg", ""),
                placeholder="kwargs.user_id=42",
                size=20,
            ),
        ),
        el("button", "Filter", type="submit"),
        el("a", "clear", href="/ui/jobs"),
    ]
    return el("form", *fields, method="get", action="/ui/jobs", class_="filters")


async def jobs(ctx: Ctx) -> tuple[str, Safe]:
    filters, bad = _filters(ctx)
    parts: list[Any] = [_filter_form(ctx)]
    if bad is not None:
        return "Jobs", section("Jobs", *parts, bad)
    query = {**filters, "limit": str(PAGE_SIZE)}
    if ctx.query.get("cursor"):
        query["cursor"] = ctx.query["cursor"]
    data, err = await ctx.api.try_get("/v1/jobs", query)
    if err:
        return "Jobs", section("Jobs", *parts, problem(err, "the listing"))
    bulk = "/v1/jobs/retry" + (
        "?" + urlencode(filters, quote_via=quote) if filters else ""
    )
    parts.append(
        el(
            "div",
            ctx.action(
                "Retry all matching",
                "POST",
                bulk,
                confirm="Put every retryable job this filter matches back to queued?",
            ),
            ctx.action("Retry selected", "POST", "/v1/jobs/{id}/retry", selected=True),
            ctx.action(
                "Cancel selected",
                "POST",
                "/v1/jobs/{id}/cancel",
                selected=True,
                confirm="Cancel the selected jobs?",
                danger=True,
            ),
            ctx.action(
                "Delete selected",
                "DELETE",
                "/v1/jobs/{id}",
                selected=True,
                confirm="Delete the selected finished jobs?",
                danger=True,
            ),
            class_="buttons",
        )
    )
    parts.append(job_table(ctx, data["jobs"], select=True))
    nxt = data.get("next")
    pager = [link("/ui/jobs?" + urlencode(_keep(ctx)), "newest")]
    if nxt:
        pager.append(
            link("/ui/jobs?" + urlencode({**_keep(ctx), "cursor": nxt}), "older →")
        )
    parts.append(el("nav", *pager, class_="pager"))
    return "Jobs", section("Jobs", *parts)


def _keep(ctx: Ctx) -> dict[str, str]:
    """The page's filters, without its cursor (for the pager's links)."""
    return {k: v for k, v in ctx.query.items() if k in (*FILTERS, "arg") and v}


async def dead(ctx: Ctx) -> tuple[str, Safe]:
    query = {"state": "dead", "limit": str(PAGE_SIZE)}
    if ctx.query.get("cursor"):
        query["cursor"] = ctx.query["cursor"]
    data, err = await ctx.api.try_get("/v1/jobs", query)
    intro = el(
        "p",
        "Jobs whose leases ran out more often than their attempts allow (a worker "
        "crashed or hung on them each time). Fix the cause, then put them back.",
        class_="muted",
    )
    if err:
        return "Dead letters", section("Dead letters", intro, problem(err, "dead jobs"))
    buttons = el(
        "div",
        ctx.action(
            "Retry all dead",
            "POST",
            "/v1/jobs/retry?state=dead",
            confirm="Put every dead job back to queued?",
        ),
        ctx.action("Retry selected", "POST", "/v1/jobs/{id}/retry", selected=True),
        class_="buttons",
    )
    parts = [intro, buttons, job_table(ctx, data["jobs"], select=True)]
    if data.get("next"):
        parts.append(link("/ui/dead?" + urlencode({"cursor": data["next"]}), "older →"))
    return "Dead letters", section("Dead letters", *parts)


async def job(ctx: Ctx, job_id: str) -> tuple[str, Safe]:
    path = _jpath(job_id)
    j, err = await ctx.api.try_get(path)
    if err:
        ctx.status = err.status
        return f"Job {job_id}", problem(err, f"job {job_id}")
    state = j.get("state", "")
    buttons = []
    if state in _RETRYABLE:
        buttons.append(ctx.action("Retry", "POST", path + "/retry"))
    if state in _CANCELLABLE:
        buttons.append(
            ctx.action(
                "Cancel", "POST", path + "/cancel", confirm="Cancel it?", danger=True
            )
        )
    if state not in _CANCELLABLE:
        buttons.append(
            ctx.action(
                "Delete", "DELETE", path, confirm="Delete this job?", danger=True
            )
        )
    summary = kv(
        [
            ("state", state_badge(state)),
            ("queue", link(f"/ui/queues/{quote(j.get('queue', ''), safe='')}",
                           j.get("queue"))),
            ("task", j.get("task")),
            ("attempts", f"{j.get('attempts')} of {(j.get('max_retries') or 0) + 1}"),
            ("priority", j.get("priority")),
            ("worker", j.get("worker") or "-"),
            ("waiting on", j.get("waiting_on") or "-"),
            ("progress", _progress(j)),
            ("dedup key", j.get("dedup_key") or "-"),
            ("lease seconds", j.get("timeout")),
        ]
    )  # fmt: skip
    parts = [
        el("div", *buttons, class_="buttons"),
        summary,
        section("Timeline", _timeline(ctx, j)),
        section("Arguments", kv([("args", pre(j.get("args"))),
                                 ("kwargs", pre(j.get("kwargs"))),
                                 ("headers", pre(j.get("headers")))])),
    ]  # fmt: skip
    if j.get("result") is not None or state == "succeeded":
        parts.append(section("Result", pre(j.get("result"))))
    if j.get("traceback"):
        parts.append(section("Last traceback", pre(j["traceback"])))
    return f"Job {job_id}", section(f"Job {job_id}", *parts)


def _progress(j: dict[str, Any]) -> Any:
    fraction = j.get("progress")
    if fraction is None:
        return "-"
    bar = el("progress", f"{fraction:.0%}", value=f"{fraction:.3f}", max="1")
    return Safe(
        bar + " " + el("span", f"{fraction:.0%} {j.get('progress_note') or ''}")
    )


def _timeline(ctx: Ctx, j: dict[str, Any]) -> Safe:
    events: list[tuple[float, str, Any]] = []
    if j.get("created_at") is not None:
        events.append((j["created_at"], "created", ""))
    avail = j.get("available_at")
    if avail is not None and avail > (j.get("created_at") or 0) + 0.001:
        events.append((avail, "due (delay, eta or retry backoff)", ""))
    for e in j.get("errors") or []:
        events.append((e.get("at", 0), f"attempt {e.get('attempt')} failed",
                       el("span", e.get("error"), class_="err")))  # fmt: skip
    if j.get("started_at") is not None:
        who = f"by {j.get('worker')}" if j.get("worker") else ""
        events.append((j["started_at"], f"leased (attempt {j.get('attempts')})", who))
    if j.get("finished_at") is not None:
        err = j.get("error")
        events.append((j["finished_at"], f"finished: {j.get('state')}",
                       el("span", err, class_="err") if err else ""))  # fmt: skip
    if j.get("expires_at") is not None:
        events.append((j["expires_at"], "expires (never leased after)", ""))
    events.sort(key=lambda e: e[0])
    return table(
        ["when", "what", ""],
        [[when(t, ctx.now), what, detail] for t, what, detail in events],
    )
