"""The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright, against a real broker holding real jobs and a real worker.

One broker and one browser serve the whole module (each test makes its own jobs), so
the lot stays well under two minutes. Set QBROKER_UI_SCREENSHOTS=DIR to save a
screenshot of each page there (docs/ holds the README's).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import qclient
from qclient.schedules import Schedules
from qclient.wire import ScheduleSpec

from tests.conftest import BrokerProcess
from tests.test_ui_workers import start_qworker

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TIMEOUT_MS = 15_000  #: how long a page or an element may take (a loaded machine)
HOSTILE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script>'

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def ui_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path_factory.mktemp("ui") / "data").start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def client(ui_broker: BrokerProcess) -> Iterator[qclient.Client]:
    with qclient.Client(ui_broker.url, timeout=10) as c:
        yield c


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.on("dialog", lambda dialog: dialog.accept())
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert errors == [], errors  # no script error on any page


def shoot(page: Any, name: str) -> None:
    out = os.environ.get("QBROKER_UI_SCREENSHOTS")
    if out:
        page.screenshot(path=str(Path(out) / f"ui-{name}.png"), full_page=True)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


def failed_job(client: qclient.Client, queue: str, error: str) -> str:
    """A job in `queue` that failed with `error`, by hand (lease, fail)."""
    job = client.send(queue, args=[HOSTILE], kwargs={"note": HOSTILE})
    (leased,) = client.lease([queue], worker="browser-test")
    client.fail(job.id, leased.lease, error=error, traceback=f"Traceback: {HOSTILE}")
    return job.id


def test_every_page_renders_real_data_and_escapes_it(
    page: Any, ui_broker: BrokerProcess, client: qclient.Client, tmp_path: Path
) -> None:
    url = ui_broker.url
    failed = failed_job(client, "emails", f"ValueError: {HOSTILE}")
    client.send_many("emails", [{"to": f"user{i}@example.com"} for i in range(5)])
    worker = start_qworker(url, tmp_path / "w.log", "--queue", "ui_sleep",
                           "--name", "worker-1", "--beat-interval", "0.5")  # fmt: skip
    try:
        running = client.send("ui_sleep", args=[60])
        wait_for(
            lambda: any(running.id in w.jobs for w in client.workers()),
            20,
            "the worker to run its job",
        )
        page.goto(url + "/ui")
        page.get_by_role("link", name="emails").first.wait_for()
        table = page.locator("main table").first.inner_text()
        assert "emails" in table and "ui_sleep" in table
        assert "worker-1" in page.locator("main").inner_text()
        shoot(page, "overview")

        page.goto(url + "/ui/workers")
        row = page.locator("tr", has_text="worker-1")
        assert "alive" in row.inner_text() and str(worker.pid) in row.inner_text()
        row.get_by_role("link").first.click()  # its running job
        page.wait_for_url(f"**/ui/jobs/{running.id}")
        assert "active" in page.locator("main").inner_text()

        page.goto(url + "/ui/queues/emails")
        assert page.get_by_role("heading", name="Queue emails").is_visible()

        page.goto(f"{url}/ui/jobs/{failed}")
        text = page.locator("main").inner_text()
        assert HOSTILE in text  # shown as text: in the arguments, error, traceback
        # args and kwargs show as JSON (its quotes escaped), error and traceback as sent
        assert text.count("<script>window.__pwned=1</script>") >= 4
        assert page.evaluate("window.__pwned") is None
        assert page.locator("main img").count() == 0
        assert "browser-test" in text  # the worker that ran it
        shoot(page, "job")

        for path in ("/ui/queues", "/ui/jobs", "/ui/dead", "/ui/schedules",
                     "/ui/limits"):  # fmt: skip
            reply = page.goto(url + path)
            assert reply.status == 200, path
            assert page.locator("details.curl pre").text_content().startswith("curl -s")
            assert page.evaluate("window.__pwned") is None
        # and the curl lines are what the page asked the broker
        page.goto(url + "/ui")
        page.locator("details.curl summary").click()
        assert (
            f"curl -s {url}/v1/queues" in page.locator("details.curl pre").inner_text()
        )
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(5)


def test_the_cancel_button_cancels_the_job_in_the_broker(
    page: Any, ui_broker: BrokerProcess, client: qclient.Client
) -> None:
    job = client.send("cancel_me", delay=3600)
    page.goto(f"{ui_broker.url}/ui/jobs/{job.id}")
    page.get_by_role("button", name="Cancel").click()
    page.locator("#flash .notice.ok").wait_for()
    assert client.get_job(job.id).state == "cancelled"
    # the page refreshed itself: the job is shown cancelled, Cancel is gone
    page.locator("main .badge", has_text="cancelled").first.wait_for()
    assert page.get_by_role("button", name="Cancel").count() == 0


def test_a_refused_action_shows_the_brokers_message(
    page: Any, ui_broker: BrokerProcess, client: qclient.Client
) -> None:
    job = client.send("gone_soon", delay=3600)
    page.goto(f"{ui_broker.url}/ui/jobs/{job.id}")
    page.get_by_role("checkbox", name="live").uncheck()  # keep the stale page
    client.cancel(job.id)
    page.get_by_role("button", name="Cancel").click()
    # cancelling a finished job is refused; the page says why, in words
    flash = page.locator("#flash .notice")
    flash.wait_for()
    assert flash.inner_text()


def test_a_job_that_is_gone_is_a_message_not_a_blank_page(
    page: Any, ui_broker: BrokerProcess
) -> None:
    reply = page.goto(f"{ui_broker.url}/ui/jobs/no-such-job")
    assert reply.status == 404
    notice = page.locator("main .notice.error").inner_text()
    assert "404" in notice and "no-such-job" in notice


def test_pages_refresh_themselves(
    page: Any, ui_broker: BrokerProcess, client: qclient.Client
) -> None:
    page.goto(ui_broker.url + "/ui/queues")
    assert page.get_by_role("link", name="live_q").count() == 0
    client.send("live_q")
    page.get_by_role("link", name="live_q").wait_for()  # no reload


def test_with_a_token_the_dashboard_asks_for_it(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    b = BrokerProcess(tmp_path_factory.mktemp("ui-token") / "data",
                      ("--token", "s3cret")).start()  # fmt: skip
    try:
        with qclient.Client(b.url, "s3cret") as c:
            job = c.send("locked", delay=3600)
        reply = page.goto(f"{b.url}/ui/jobs/{job.id}")
        assert reply.status == 401
        page.locator("input[name=token]").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("The broker refused that token").wait_for()
        page.locator("input[name=token]").fill("s3cret")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("button", name="Cancel").click()  # sent with the token
        page.locator("#flash .notice.ok").wait_for()
        with qclient.Client(b.url, "s3cret") as c:
            assert c.get_job(job.id).state == "cancelled"
        assert page.get_by_role("button", name="sign out").is_visible()
    finally:
        b.stop()


def test_a_read_token_sees_the_dashboard_and_an_admin_token_acts(
    page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("ui-roles")
    (home / "tokens").write_text("read:r3ad\nadmin:adm1n\n")
    b = BrokerProcess(home / "data", ("--tokens-file", str(home / "tokens"))).start()
    try:
        with qclient.Client(b.url, "adm1n") as c:
            job = c.send("roles", delay=3600)
            page.goto(f"{b.url}/ui/jobs/{job.id}")
            page.locator("input[name=token]").fill("r3ad")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("checkbox", name="live").uncheck()
            page.get_by_role("button", name="Cancel").click()
            refused = page.locator("#flash .notice.error")
            assert "403 forbidden" in refused.inner_text()
            assert c.get_job(job.id).state == "scheduled"
            page.get_by_role("button", name="sign out").click()
            page.locator("input[name=token]").fill("adm1n")
            page.get_by_role("button", name="Sign in").click()
            page.get_by_role("button", name="Cancel").click()
            page.locator("#flash .notice.ok").wait_for()
            assert c.get_job(job.id).state == "cancelled"
    finally:
        b.stop()


def test_the_purge_button_empties_the_queue_in_the_broker(
    page: Any, ui_broker: BrokerProcess, client: qclient.Client
) -> None:
    client.send_many("purge_me", list(range(4)))
    page.goto(f"{ui_broker.url}/ui/queues/purge_me")
    page.get_by_role("button", name="Purge queued and scheduled").click()
    page.locator("#flash .notice.ok").wait_for()
    counts = client.queue("purge_me").counts
    assert counts["queued"] == 0 and counts["scheduled"] == 0


def test_the_schedules_page_runs_and_pauses_a_schedule_in_the_broker(
    page: Any, ui_broker: BrokerProcess
) -> None:
    with Schedules(ui_broker.url) as schedules:
        schedules.put("nightly", ScheduleSpec(task="report", cron="0 3 * * *"))
        page.goto(ui_broker.url + "/ui/schedules")
        row = page.locator("tr", has_text="nightly")
        assert "report" in row.inner_text()
        row.get_by_role("button", name="Run now").click()
        page.locator("#flash .notice.ok").wait_for()
        (job,) = schedules.jobs("nightly")
        assert job.task == "report"
        row.get_by_role("button", name="Pause").click()
        page.locator("#flash .notice.ok", has_text="Pause").wait_for()
        assert schedules.get("nightly").paused
        # its jobs, through the listing's schedule filter
        page.goto(ui_broker.url + "/ui/jobs?schedule=nightly")
        page.get_by_role("link", name=job.id[:29]).wait_for()
