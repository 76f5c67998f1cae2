"""Schedules through a real broker: firing once per tick across a SIGKILL, pause,
resume, run, validation, the job listing, worker sync and the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BrokerFactory, BrokerProcess, child_env
from tests.wirehttp import Wire, wait_for

TESTS_DIR = Path(__file__).resolve().parent
DECLARED = ["add", "mul-every-minute", "report-at-dawn", "weekly_report"]


@pytest.fixture
def w(broker: BrokerProcess) -> Iterator[Wire]:
    wire = Wire(broker.url)
    yield wire
    wire.close()


def jobs_of(w: Wire, name: str) -> list[dict[str, Any]]:
    return list(w.ok("GET", f"/v1/jobs?schedule={name}&limit=1000")["jobs"])


def run(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=TESTS_DIR, env=child_env(QBROKER_URL=url),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.slow
def test_every_second_fires_once_per_tick_across_a_sigkill(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory().start()
    w = Wire(b.url)
    rec = w.ok("PUT", "/v1/schedules/tick", {"task": "tick", "every": 1})
    anchor = rec["next_run_at"] - 1
    wait_for(lambda: len(jobs_of(w, "tick")) >= 3, timeout=30)
    b.kill()
    w.close()
    time.sleep(1.5)  # ticks missed while down: catch_up "latest" makes one job
    b.start()
    w = Wire(b.url)
    before = len(jobs_of(w, "tick"))
    wait_for(lambda: len(jobs_of(w, "tick")) >= before + 2, timeout=30)
    jobs = jobs_of(w, "tick")
    w.close()
    fires = [j["headers"]["qbroker.fire_time"] for j in jobs]
    assert len(set(fires)) == len(fires), "a tick fired twice"
    assert len({j["id"] for j in jobs}) == len(jobs)
    for t in fires:  # on the anchor's grid: no drift with firing latency
        assert abs((t - anchor) - round(t - anchor)) < 1e-3
    for j in jobs:
        assert j["headers"]["qbroker.schedule"] == "tick"
        assert j["created_at"] >= j["headers"]["qbroker.fire_time"]


def test_pause_resume_run_and_delete(broker: BrokerProcess, w: Wire) -> None:
    w.ok("PUT", "/v1/schedules/hourly", {"task": "report", "cron": "0 * * * *"})
    assert w.ok("POST", "/v1/schedules/hourly/pause")["paused"] is True
    status, reply = w.call("POST", "/v1/schedules/hourly/run")
    assert status == 201
    [job] = jobs_of(w, "hourly")
    assert job["id"] == reply["id"]
    assert (job["task"], job["queue"], job["state"]) == ("report", "report", "queued")
    rec = w.ok("GET", "/v1/schedules/hourly")
    assert (rec["paused"], rec["last_job_id"]) == (True, reply["id"])
    assert w.ok("POST", "/v1/schedules/hourly/resume")["paused"] is False
    assert w.ok("DELETE", "/v1/schedules/hourly") == {}
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/run")):
        status, reply = w.call(method, f"/v1/schedules/hourly{path}")
        assert (status, reply["error"]) == (404, "schedule_not_found")
    assert len(jobs_of(w, "hourly")) == 1  # the job stays


def test_a_paused_schedule_makes_nothing_until_resumed(
    broker: BrokerProcess, w: Wire
) -> None:
    body = {"task": "t", "every": 1, "paused": True, "catch_up": "latest"}
    w.ok("PUT", "/v1/schedules/p", body)
    time.sleep(2.5)
    assert jobs_of(w, "p") == []
    w.ok("POST", "/v1/schedules/p/resume")
    wait_for(lambda: jobs_of(w, "p"), timeout=10)
    # a worker's sync (no "paused") keeps the operator's pause
    w.ok("POST", "/v1/schedules/p/pause")
    assert w.ok("PUT", "/v1/schedules/p", {"task": "t", "every": 1})["paused"]


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("s", {"task": "t", "cron": "61 * * * *"}, "cron"),
        ("s", {"task": "t", "cron": "* * *"}, "cron"),
        ("s", {"task": "t", "every": 5, "tz": "Mars/Olympus"}, "tz"),
        ("s", {"task": "t", "every": 0}, "every"),
        ("s", {"task": "t", "every": -3}, "every"),
        ("s", {"task": "t", "every": 1e-300}, "every"),  # once hung the writer
        ("s", {"task": "t", "every": 5, "cron": "* * * * *"}, "every"),
        ("s", {"task": "t"}, "cron"),
        ("s", {"task": "t", "every": 5, "catch_up": "some"}, "catch_up"),
        ("s", {"task": "bad task", "every": 5}, "task"),
        ("bad%20name", {"task": "t", "every": 5}, "name"),
        ("x" * 201, {"task": "t", "every": 5}, "name"),
    ],
)
def test_bad_schedules_get_422_naming_the_field_and_change_nothing(
    w: Wire, name: str, body: dict[str, Any], field: str
) -> None:
    kept = w.ok("PUT", "/v1/schedules/s", {"task": "t", "every": 60})
    status, reply = w.call("PUT", f"/v1/schedules/{name}", body)
    assert (status, reply["error"], reply["field"]) == (422, "invalid_field", field)
    assert w.ok("GET", "/v1/schedules") == {"schedules": [kept]}


def test_job_listing_by_schedule_needs_a_sane_limit(
    broker: BrokerProcess, w: Wire
) -> None:
    for query, field in (("?schedule=a&limit=0", "limit"),
                         ("?schedule=a&limit=x", "limit")):  # fmt: skip
        status, reply = w.call("GET", f"/v1/jobs{query}")
        assert (status, reply["field"]) == (422, field)
    assert w.ok("GET", "/v1/jobs?schedule=nothing") == {"jobs": [], "next": None}


def test_a_schedule_whose_task_no_worker_knows_still_fires(
    broker: BrokerProcess, w: Wire
) -> None:
    w.ok("PUT", "/v1/schedules/orphan", {"task": "nobody_knows", "every": 1})
    [job, *_] = wait_for(lambda: jobs_of(w, "orphan"), timeout=10)
    assert job["state"] == "queued"
    assert w.ok("GET", "/v1/queues/nobody_knows")["counts"]["queued"] >= 1
    _, text, _ = w.raw("GET", "/metrics")
    assert b'qbroker_schedule_ticks_total{outcome="fired"}' in text


def test_two_workers_starting_at_once_leave_one_copy_of_each(
    broker: BrokerProcess, w: Wire
) -> None:
    cmd = [
        "-m",
        "qworker",
        "--burst",
        "--module",
        "tasks_periodic",
        "--url",
        broker.url,
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, *cmd],
            cwd=TESTS_DIR,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out
        assert "worker.schedules_synced" in out
    records = w.ok("GET", "/v1/schedules")["schedules"]
    assert [r["name"] for r in records] == DECLARED
    add = records[0]
    assert (add["task"], add["every"], add["args"]) == ("add", 10.0, [3, 4])
    weekly = records[3]
    assert (weekly["cron"], weekly["tz"]) == ("30 7 * * 1", "Europe/Berlin")


def test_cli_sync_lists_stale_prunes_and_prints_in_words(
    broker: BrokerProcess, w: Wire
) -> None:
    w.ok("PUT", "/v1/schedules/old", {"task": "gone", "every": 60})
    done = run("-m", "qbroker", "schedules", "sync", "--module", "tasks_periodic",
               url=broker.url)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stale   old (not declared; --prune deletes it)" in done.stdout
    assert "old" in [r["name"] for r in w.ok("GET", "/v1/schedules")["schedules"]]
    done = run("-m", "qbroker", "schedules", "sync", "-m", "tasks_periodic", "--prune",
               url=broker.url)  # fmt: skip
    assert "deleted old" in done.stdout
    assert [r["name"] for r in w.ok("GET", "/v1/schedules")["schedules"]] == DECLARED
    listing = run("-m", "qbroker", "schedules", url=broker.url)
    assert listing.returncode == 0, listing.stderr
    assert "at 07:30 on Monday (Europe/Berlin)" in listing.stdout
    assert "every 10 seconds" in listing.stdout
    done = run("-m", "qbroker", "schedules", "run", "nope", url=broker.url)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "schedule_not_found" in done.stderr


def test_readme_periodic_example_syncs(
    broker: BrokerProcess, w: Wire, tmp_path: Path
) -> None:
    text = (TESTS_DIR.parent / "README.md").read_text()
    section = text[text.index("## Periodic tasks") :]
    code = section[section.index("```python\n") + 10 :]
    (tmp_path / "readme_tasks.py").write_text(code[: code.index("```")])
    done = subprocess.run(
        [sys.executable, "-m", "qbroker", "schedules", "sync", "-m", "readme_tasks"],
        cwd=tmp_path, env=child_env(QBROKER_URL=broker.url),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    names = [r["name"] for r in w.ok("GET", "/v1/schedules")["schedules"]]
    assert "add" in names and "weekly_report" in names


def test_schedules_hold_while_the_disk_is_under_the_floor(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory(args=("--min-free-disk", str(10**18))).start()
    w = Wire(b.url)
    try:
        w.ok("PUT", "/v1/schedules/held", {"task": "t", "every": 1})
        status, reply = w.call("POST", "/v1/schedules/held/run")
        assert (status, reply["error"]) == (507, "disk_low")
        time.sleep(2.5)
        assert jobs_of(w, "held") == []
    finally:
        w.close()


def test_a_worker_token_syncs_schedules_but_may_not_delete_them(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("worker:work-Tok3n\nread:read-Tok3n\nadmin:admin-Tok3n\n")
    b = broker_factory(args=("--tokens-file", str(tokens))).start()
    cmd = ["-m", "qworker", "--burst", "--module", "tasks_periodic", "--url", b.url,
           "--token", "work-Tok3n"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, *cmd], cwd=TESTS_DIR, env=child_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "worker.schedules_synced" in done.stdout + done.stderr
    w = Wire(b.url)
    try:
        for token, method, path, status in (
            ("read-Tok3n", "GET", "/v1/schedules", 200),
            ("read-Tok3n", "PUT", "/v1/schedules/add", 403),
            ("work-Tok3n", "DELETE", "/v1/schedules/add", 403),
            ("admin-Tok3n", "DELETE", "/v1/schedules/add", 200),
        ):
            body = b'{"task": "add", "every": 5}' if method == "PUT" else None
            got, raw, _ = w.raw(
                method, path, body, {"Authorization": f"Bearer {token}"}
            )
            assert got == status, (token, method, path, raw)
    finally:
        w.close()


def test_schedules_sync_and_list_over_tls(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    from tests.test_secure_tls import pki as make_pki

    pki = make_pki.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    args = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    b = broker_factory(name="tls", args=args, ca=pki.ca).start()
    assert b.url.startswith("https://")
    for extra in (["--ca", str(pki.ca)], ["--ca", str(pki.other_ca)]):
        done = run("-m", "qbroker", "schedules", "sync", "-m", "tasks_periodic",
                   *extra, url=b.url)  # fmt: skip
        if extra[1] == str(pki.ca):
            assert done.returncode == 0, done.stderr
            assert "synced  weekly_report" in done.stdout
        else:  # a certificate the CA did not sign: refused at once, one line
            assert done.returncode == 1
            assert done.stderr.count("\n") == 1, done.stderr
