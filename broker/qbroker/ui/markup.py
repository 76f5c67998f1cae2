"""HTML building for the dashboard: everything is escaped unless it is `Safe`.

Job data (task names, arguments, errors, results) reaches a page only through `esc`,
`el` or `table`, which escape every `str` they are given; only markup built here is
`Safe`. A task named `<script>` is shown as text.
"""

from __future__ import annotations

import datetime
import html
import string
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import msgspec

_json = msgspec.json.Encoder()


class Safe(str):
    """Markup that is already HTML (built by this module from escaped parts)."""

    __slots__ = ()


def esc(value: Any) -> Safe:
    """`value` as HTML: Safe as it is, anything else escaped as text; iterables joined."""
    if isinstance(value, Safe):
        return value
    if value is None:
        return Safe("")
    if isinstance(value, str | int | float):
        return Safe(html.escape(str(value), quote=True))
    if isinstance(value, Iterable):
        return Safe("".join(esc(v) for v in value))
    return Safe(html.escape(str(value), quote=True))


def el(tag: str, *content: Any, **attrs: Any) -> Safe:
    """`<tag attrs>content</tag>`, every attribute value and text escaped.

    Attribute names: a trailing `_` is dropped (`class_`), `_` becomes `-` (`data_path`);
    a value of None or False leaves the attribute out, True writes it bare.
    """
    parts = [tag]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        name = name.rstrip("_").replace("_", "-")
        if value is True:
            parts.append(name)
        else:
            parts.append(f'{name}="{html.escape(str(value), quote=True)}"')
    opening = "<" + " ".join(parts) + ">"
    if tag in ("input", "br", "meta", "link"):
        return Safe(opening)
    return Safe(f"{opening}{esc(content)}</{tag}>")


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "none"
) -> Safe:
    """A table; each cell is escaped unless Safe."""
    body = [el("tr", *(el("td", cell) for cell in row)) for row in rows]
    if not body:
        return el("p", empty, class_="muted")
    head = el("thead", el("tr", *(el("th", h) for h in headers)))
    return el("table", head, el("tbody", *body))


def link(href: str, text: Any) -> Safe:
    return el("a", text, href=href)


def as_json(value: Any) -> str:
    """A value as compact JSON text (to be escaped where it is shown)."""
    try:
        return _json.encode(value).decode()
    except (TypeError, OverflowError):
        return repr(value)


def pre(value: Any) -> Safe:
    return el("pre", value if isinstance(value, str) else as_json(value))


def when(ts: float | None, now: float) -> Safe:
    """A unix time as UTC text, with how long ago (or until) in its title."""
    if ts is None:
        return Safe("-")
    stamp = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return el(
        "time",
        ago(now - ts),
        datetime=stamp.isoformat(),
        title=stamp.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC",
    )


def ago(seconds: float) -> str:
    """3.2 -> "3s ago", -70 -> "in 1m 10s"."""
    future = seconds < 0
    s = abs(seconds)
    text = duration(s)
    return f"in {text}" if future else f"{text} ago"


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s // 60:.0f}m {s % 60:.0f}s"
    if s < 86400:
        return f"{s // 3600:.0f}h {s % 3600 // 60:.0f}m"
    return f"{s // 86400:.0f}d {s % 86400 // 3600:.0f}h"


def state_badge(state: str) -> Safe:
    return el("span", state, class_=f"badge st-{state}")


def notice(message: Any, kind: str = "error") -> Safe:
    """A message box on the page (a broker's 4xx, a hint)."""
    return el("div", message, class_=f"notice {kind}", role="alert")


def action(
    label: str,
    method: str,
    path: str,
    *,
    body: Mapping[str, Any] | None = None,
    confirm: str | None = None,
    danger: bool = False,
    selected: bool = False,
) -> Safe:
    """A button that makes one API call (app.js sends it with the page's token).

    `selected`: the call is made once per checked row, `{id}` in `path` replaced by its
    job id.
    """
    return el(
        "button",
        label,
        type="button",
        class_="act danger" if danger else "act",
        data_method=method,
        data_path=path,
        data_body=None if body is None else as_json(body),
        data_confirm=confirm,
        data_selected="1" if selected else None,
    )


def _template(name: str) -> string.Template:
    text = resources.files("qbroker.ui").joinpath("templates", name).read_text("utf-8")
    return string.Template(text)


_LAYOUT = _template("layout.html")
NAV = (
    ("/ui", "Overview"),
    ("/ui/queues", "Queues"),
    ("/ui/jobs", "Jobs"),
    ("/ui/workers", "Workers"),
    ("/ui/schedules", "Schedules"),
    ("/ui/dead", "Dead letters"),
    ("/ui/limits", "Limits"),
)


def layout(title: str, active: str, content: Safe, *, version: str) -> Safe:
    """The whole page around `content`."""
    nav = Safe(
        "".join(
            el("a", text, href=href, class_="on" if href == active else None)
            for href, text in NAV
        )
    )
    return Safe(
        _LAYOUT.substitute(
            title=esc(title), nav=nav, content=content, version=esc(version)
        )
    )
