"""The dashboard over plain HTTP (the browser tests are test_ui_browser.py): status
codes, headers, access with a token, escaping, partial refreshes."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import qclient
from qbroker.ui.markup import Safe, el, esc, table

from tests.conftest import BrokerProcess


def fetch(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, _lower(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers), exc.read().decode()


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def test_pages_are_html_with_a_strict_content_security_policy(
    broker: BrokerProcess,
) -> None:
    status, headers, body = fetch(broker.url + "/ui")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert body.startswith("<!doctype html>") and "/ui/static/app.js" in body
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        status, headers, _ = fetch(f"{broker.url}/ui/static/{name}")
        assert status == 200 and headers["content-type"].startswith(kind)


def test_unknown_pages_and_other_methods_are_refused(broker: BrokerProcess) -> None:
    status, _, body = fetch(broker.url + "/ui/nope")
    assert status == 404 and "No dashboard page /ui/nope" in body
    assert fetch(broker.url + "/ui/static/nope.js")[0] == 404
    status, headers, _ = fetch(broker.url + "/ui", "POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_a_partial_refresh_is_the_content_alone(broker: BrokerProcess) -> None:
    with qclient.Client(broker.url) as c:
        c.send("partial_q")
    status, _, body = fetch(
        broker.url + "/ui/queues", headers={"X-QBroker-Partial": "1"}
    )
    assert status == 200 and "<html" not in body and "partial_q" in body


def test_a_job_that_is_gone_answers_404_with_the_brokers_message(
    broker: BrokerProcess,
) -> None:
    status, _, body = fetch(broker.url + "/ui/jobs/no-such")
    assert status == 404 and "404 job_not_found" in body


def test_with_a_token_a_page_needs_it_by_header_or_cookie(broker_factory: Any) -> None:
    b = broker_factory(args=("--token", "s3cret")).start()
    status, _, body = fetch(b.url + "/ui/workers")
    assert status == 401 and 'id="login"' in body and "refused" not in body
    status, _, body = fetch(
        b.url + "/ui/workers", headers={"Cookie": "qbroker_token=bad"}
    )
    assert status == 401 and "The broker refused that token" in body
    for headers in ({"Cookie": "other=1; qbroker_token=s3cret"},
                    {"Authorization": "Bearer s3cret"}):  # fmt: skip
        status, _, body = fetch(b.url + "/ui/workers", headers=headers)
        assert status == 200 and "Workers" in body
    # the cookie opens pages only: the API still wants the header
    assert (
        fetch(b.url + "/v1/workers", headers={"Cookie": "qbroker_token=s3cret"})[0]
        == 401
    )
    assert fetch(b.url + "/ui/static/app.js")[0] == 200  # the login page needs it


def test_markup_escapes_text_and_attributes() -> None:
    assert esc("<script>") == "&lt;script&gt;"
    assert esc(Safe("<b>")) == "<b>"
    assert el("td", '"><img>', title='" onmouseover="x') == (
        '<td title="&quot; onmouseover=&quot;x">&quot;&gt;&lt;img&gt;</td>'
    )
    assert "<script>" not in table(["<th>"], [["<script>"]])
