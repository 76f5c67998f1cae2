"""The dashboard at /ui, served by the broker itself: server-rendered HTML with one small
script (static/app.js) and one stylesheet, both shipped in this package (no CDN).

Theory of operation: a page is rendered from the broker's own API, called in-process
with the browser's credentials (api.py); every button is one documented API call that
app.js makes with the same token, and each page lists both as curl commands. app.js
refreshes the page's content every few seconds by asking for it again with the
`X-QBroker-Partial: 1` header (only the content comes back).

Access: with a token configured, a page needs it as `Authorization: Bearer` or in the
`qbroker_token` cookie (set by the login form, read by app.js for its calls); without
it, the page is a login form (401). The static files need no token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from urllib.parse import unquote

from qbroker import __version__
from qbroker.protocol import UI_PATH, Request, Response
from qbroker.ui import pages, pages_jobs
from qbroker.ui.api import Api, ApiError, Broker
from qbroker.ui.context import Ctx
from qbroker.ui.markup import Safe, el, layout, notice

__all__ = ["COOKIE", "respond"]

COOKIE = "qbroker_token"  #: the cookie the login form stores the token in
HTML = b"text/html; charset=utf-8"
#: no inline script or style, nothing from elsewhere: a job's text that slipped
#: through escaping still could not run
_HEADERS = (
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
     b" frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)  # fmt: skip
_STATIC_TYPES = {
    "app.js": b"text/javascript; charset=utf-8",
    "app.css": b"text/css; charset=utf-8",
}
_STATIC = {
    name: resources.files(__name__).joinpath("static", name).read_bytes()
    for name in _STATIC_TYPES
}

Page = Callable[[Ctx], Awaitable[tuple[str, Safe]]]
_PAGES: dict[str, tuple[Page, str]] = {
    "": (pages.overview, "/ui"),
    "queues": (pages.queues, "/ui/queues"),
    "jobs": (pages_jobs.jobs, "/ui/jobs"),
    "workers": (pages.workers, "/ui/workers"),
    "schedules": (pages.schedules, "/ui/schedules"),
    "dead": (pages_jobs.dead, "/ui/dead"),
    "limits": (pages.limits, "/ui/limits"),
}


def _token_from(req: Request) -> bytes | None:
    """The Authorization to send on the browser's behalf: its own header, else the
    login cookie's token as a Bearer."""
    given = req.headers.get(b"authorization")
    if given is not None:
        return given
    raw = req.headers.get(b"cookie")
    if not raw:
        return None
    try:
        cookie = SimpleCookie(raw.decode("latin-1"))
    except CookieError:
        return None
    morsel = cookie.get(COOKIE)
    if morsel is None or not morsel.value:
        return None
    return b"Bearer " + unquote(morsel.value).encode()


async def respond(broker: Broker, req: Request) -> Response:
    """Answer one GET under /ui: a static file, a page, or the login form."""
    rest = req.path[len(UI_PATH) :].strip("/")
    if rest.startswith("static/"):
        name = rest[len("static/") :]
        if name not in _STATIC:
            return _page("Not found", notice(f"No file {name}."), 404, "")
        return Response(200, _STATIC[name], _STATIC_TYPES[name], headers=_HEADERS[1:2])
    api = Api(broker, _token_from(req))
    host = req.headers.get(b"host", b"127.0.0.1").decode("latin-1")
    ctx = Ctx(
        api=api,
        now=broker.clock.now(),
        query=dict(req.query),
        base_url=f"{'https' if broker.config.tls_cert else 'http'}://{host}",
        token=broker.needs_token,
    )
    first, _, tail = rest.partition("/")
    try:
        if first == "queues" and tail:
            title, content = await pages.queue(ctx, unquote(tail))
            active = "/ui/queues"
        elif first == "jobs" and tail:
            title, content = await pages_jobs.job(ctx, unquote(tail))
            active = "/ui/jobs"
        elif first in _PAGES and not tail:
            page, active = _PAGES[first]
            title, content = await page(ctx)
        else:
            title, content = pages.not_found(req.path)
            return _page(title, content, 404, "", partial=_partial(req))
    except ApiError as exc:  # 401: no token, or a wrong one
        return _login(exc, refused=api.authorization is not None)
    content = Safe(content + ctx.curl())
    return _page(title, content, ctx.status, active, partial=_partial(req))


def _partial(req: Request) -> bool:
    return req.headers.get(b"x-qbroker-partial") == b"1"


def _page(
    title: str, content: Safe, status: int, active: str, *, partial: bool = False
) -> Response:
    if partial:
        return Response(status, content.encode(), HTML, headers=_HEADERS)
    body = layout(title, active, content, version=__version__)
    return Response(status, body.encode(), HTML, headers=_HEADERS)


def _login(exc: ApiError, *, refused: bool) -> Response:
    form = el(
        "form",
        el("label", "Token ", el("input", type="password", name="token",
                                 autocomplete="current-password", required=True)),
        el("button", "Sign in", type="submit"),
        id="login",
    )  # fmt: skip
    parts = [
        el("h2", "This broker needs its token"),
        el(
            "p",
            "The token stays in this browser (a cookie for this site, sent only to "
            "this broker) and is sent as 'Authorization: Bearer'.",
            class_="muted",
        ),
    ]
    if refused:
        parts.append(notice(f"The broker refused that token: {exc.message}"))
    parts.append(form)
    return _page("Sign in", el("section", *parts), 401, "")
