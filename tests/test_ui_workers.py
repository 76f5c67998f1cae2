"""The workers registry: `POST /v1/workers` beats, `GET /v1/workers`, through real
brokers and real `qworker` processes (SIGKILL included)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import qclient
from qbroker.store.sqlite import workers as store_workers
from qclient.wire import WorkerBeat, WorkerState

from tests.conftest import BrokerProcess, child_env

TESTS_DIR = Path(__file__).resolve().parent


def call(
    url: str, method: str = "GET", body: Any = None, token: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def start_qworker(url: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "qworker", "--url", url, "--module", "tasks_ui",
           "--log-format", "json", *args]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, cwd=TESTS_DIR, env=child_env(), stdout=out, stderr=out
        )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []

    def start(url: str, *args: str) -> subprocess.Popen[bytes]:
        p = start_qworker(url, tmp_path / f"w{len(made)}.log", *args)
        made.append(p)
        return p

    yield start
    for p in made:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def listed(url: str) -> dict[str, Any]:
    status, body = call(url + "/v1/workers")
    assert status == 200, body
    return {w["name"]: w for w in body["workers"]}


def test_a_beat_registers_a_worker_and_the_listing_shows_it(
    broker: BrokerProcess,
) -> None:
    beat = {"name": "w1", "host": "h", "pid": 42, "queues": ["a", "b"],
            "pool": "threads", "concurrency": 4, "version": "0.1.0",
            "started_at": time.time(), "interval": 5, "jobs": ["J1"]}  # fmt: skip
    assert call(broker.url + "/v1/workers", "POST", beat) == (200, {})
    w = listed(broker.url)["w1"]
    assert w["state"] == "alive"
    assert (w["host"], w["pid"], w["queues"], w["pool"], w["concurrency"]) == (
        "h", 42, ["a", "b"], "threads", 4,
    )  # fmt: skip
    assert w["jobs"] == ["J1"] and w["interval"] == 5
    assert w["first_seen_at"] <= w["last_beat_at"]
    # a later beat replaces what the first said; the client does the same
    with qclient.Client(broker.url) as c:
        c.beat(WorkerBeat(name="w1", pid=42, jobs=[], stopped=True))
        (info,) = c.workers()
    assert info.state == WorkerState.STOPPED and info.jobs == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"pid": 1}, "name"),
        ({"name": ""}, "name"),
        ({"name": "w", "interval": 0}, "interval"),
        ({"name": "w", "queues": ["bad name"]}, "queues[0]"),
        ({"name": "w", "jobs": "J1"}, "jobs"),
    ],
)
def test_a_malformed_beat_is_refused_naming_its_field(
    broker: BrokerProcess, body: dict[str, Any], field: str
) -> None:
    status, reply = call(broker.url + "/v1/workers", "POST", body)
    assert status in (400, 422) and reply["field"] == field, reply
    assert listed(broker.url) == {}


def test_the_registry_needs_the_token(broker_factory: Any) -> None:
    b = broker_factory(args=("--token", "s3cret")).start()
    assert call(b.url + "/v1/workers")[0] == 401
    assert call(b.url + "/v1/workers", "POST", {"name": "w"})[0] == 401
    assert call(b.url + "/v1/workers", token="s3cret") == (200, {"workers": []})


def test_a_running_worker_lists_its_job_then_is_lost_after_sigkill(
    broker: BrokerProcess, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = workers(broker.url, "--queue", "ui_sleep", "--name", "w-kill",
                   "--beat-interval", "0.3", "--concurrency", "2")  # fmt: skip
    with qclient.Client(broker.url) as c:
        job = c.send("ui_sleep", args=[30])
        w = wait_for(
            lambda: (x := listed(broker.url).get("w-kill")) and x["jobs"] and x,
            20,
            "the worker to report its job",
        )
        assert w["state"] == "alive" and w["jobs"] == [job.id]
        assert w["pid"] == proc.pid and w["queues"] == ["ui_sleep"]
        assert (w["pool"], w["concurrency"]) == ("threads", 2)
        # the job's record names the worker that runs it
        assert c.get_job(job.id).worker == "w-kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        lost = wait_for(
            lambda: (x := listed(broker.url)["w-kill"])["state"] == "lost" and x,
            10,
            "the killed worker to be lost",
        )
    # what it ran when it was last heard from stays visible
    assert lost["jobs"] == [job.id]


def test_a_worker_stopped_by_sigterm_says_so(
    broker: BrokerProcess, workers: Callable[..., subprocess.Popen[bytes]]
) -> None:
    proc = workers(broker.url, "--queue", "ui_sleep", "--name", "w-term",
                   "--beat-interval", "0.3")  # fmt: skip
    wait_for(lambda: "w-term" in listed(broker.url), 20, "the worker to register")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    w = listed(broker.url)["w-term"]
    assert w["state"] == "stopped" and w["jobs"] == []


def test_the_registry_survives_a_broker_restart(broker: BrokerProcess) -> None:
    call(broker.url + "/v1/workers", "POST", {"name": "w-durable", "interval": 600})
    broker.stop()
    broker.start()
    assert listed(broker.url)["w-durable"]["state"] == "alive"


def test_workers_are_lost_after_three_intervals_and_forgotten_after_a_day() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(store_workers.SCHEMA)
    store_workers.beat(conn, WorkerBeat(name="a", interval=10), 1000.0)
    store_workers.beat(conn, WorkerBeat(name="b", interval=10), 1000.0)

    def states(now: float) -> dict[str, str]:
        return {w.name: w.state for w in store_workers.workers(conn, now)}

    assert states(1030.0) == {"a": "alive", "b": "alive"}
    assert states(1030.5) == {"a": "lost", "b": "lost"}
    store_workers.beat(conn, WorkerBeat(name="a", interval=10), 1000.0 + 86400)
    assert states(1000.0 + 86400) == {"a": "alive", "b": "lost"}
    assert states(1000.5 + 86400) == {"a": "alive"}  # b is no longer listed
    # and the next beat deletes its row
    store_workers.beat(conn, WorkerBeat(name="a", interval=10), 1001.0 + 86400)
    assert conn.execute("SELECT name FROM workers").fetchall() == [("a",)]
