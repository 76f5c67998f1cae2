"""What a page renderer works with: the in-process API, the time, the query, and the
calls its buttons make (listed as curl commands at the page's foot)."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qbroker.ui.api import Api, ApiError
from qbroker.ui.markup import Safe, action, as_json, el, notice


@dataclass
class Ctx:
    api: Api
    now: float  #: the broker's clock, unix seconds
    query: dict[str, str]  #: the page's own query parameters
    base_url: str  #: what the browser used to reach the broker, for curl lines
    token: bool  #: the broker wants a token (curl lines send $QBROKER_TOKEN)
    actions: list[tuple[str, str, str | None]] = field(default_factory=list)
    status: int = 200  #: the page's status: a broker's 4xx for what the page is about

    def action(
        self,
        label: str,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        confirm: str | None = None,
        danger: bool = False,
        selected: bool = False,
    ) -> Safe:
        """A button making one documented API call; its curl goes to the page foot."""
        self.actions.append((method, path, None if body is None else as_json(body)))
        return action(
            label,
            method,
            path,
            body=body,
            confirm=confirm,
            danger=danger,
            selected=selected,
        )

    def curl(self) -> Safe:
        """The page's reads and its buttons' calls, as curl commands."""
        lines = []
        seen: set[tuple[str, str, str | None]] = set()
        for method, target, body in [*self.api.calls, *self.actions]:
            if (method, target, body) in seen:
                continue
            seen.add((method, target, body))
            words = ["curl", "-s"]
            if method != "GET":
                words += ["-X", method]
            line = " ".join(words)
            if self.token:
                line += ' -H "Authorization: Bearer $QBROKER_TOKEN"'
            line += " " + shlex.quote(self.base_url + target)
            if body is not None:
                line += " -d " + shlex.quote(body)
            lines.append(line)
        return el(
            "details",
            el("summary", "Equivalent curl"),
            el("pre", "\n".join(lines)),
            class_="curl",
        )


def problem(exc: ApiError, what: str) -> Safe:
    """A broker's error reply as a message on the page."""
    if exc.status == 404 and exc.reason == "not_found" and "no route" in exc.message:
        return notice(
            f"{what}: this broker has no such endpoint ({exc.message}).", "warn"
        )
    return notice(f"{what}: {exc.status} {exc.reason}: {exc.message}")


def section(title: str, *content: Any) -> Safe:
    return el("section", el("h2", title), *content)


def kv(pairs: list[tuple[str, Any]]) -> Safe:
    """A two-column definition table."""
    return el(
        "table",
        el("tbody", *(el("tr", el("th", k), el("td", v)) for k, v in pairs)),
        class_="kv",
    )


def short(text: Any, limit: int = 80) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"
