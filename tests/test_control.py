"""Job control through a real broker: pause, purge, limits, the job listing, retry and
delete, live cancel, progress, every attempt's error, and the `qbroker` verbs.

Workers run as `qworker` subprocesses with `cwd=tests/` and `--module tasks_control`.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import qclient

from tests import tasks_control
from tests.conftest import BrokerProcess, child_env
from tests.test_worker import TESTS_DIR, wait_for
from tests.test_worker_behaviour import Proc
from tests.wirehttp import Wire


@pytest.fixture
def wire(broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(broker.url)
    yield w
    w.close()


@pytest.fixture
def client(broker: BrokerProcess) -> Iterator[qclient.Client]:
    with qclient.Client(broker.url, timeout=10) as c:
        yield c


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    made: list[Proc] = []
    yield made
    for p in made:
        p.kill()


@pytest.fixture
def start(
    tmp_path: Path, broker: BrokerProcess, procs: list[Proc]
) -> Callable[..., Proc]:
    def start(*args: str) -> Proc:
        cmd = [
            sys.executable, "-m", "qworker", "--url", broker.url,
            "--module", "tasks_control", "--log-format", "json", *args,
        ]  # fmt: skip
        p = Proc(cmd, tmp_path / f"worker{len(procs)}.log")
        procs.append(p)
        return p

    return start


def refused(reply: tuple[int, Any], status: int, field: str) -> None:
    """Assert an error reply of `status` naming `field`."""
    got, body = reply
    assert got == status, reply
    assert body["field"] == field, reply


# ---------------------------------------------------------------- pause and purge


def test_a_paused_queue_takes_jobs_but_leases_none_until_resumed(
    broker: BrokerProcess, wire: Wire
) -> None:
    assert wire.ok("POST", "/v1/queues/fresh/pause") == {
        "queue": "fresh",
        "paused": True,
    }
    assert wire.ok("GET", "/v1/queues/fresh")["paused"] is True  # no jobs yet: allowed
    job = wire.ok("POST", "/v1/queues/fresh/jobs", {"args": [1]})["id"]
    assert wire.ok("POST", "/v1/lease", {"queues": ["fresh"]})["jobs"] == []
    record = wire.ok("GET", f"/v1/jobs/{job}")
    assert (record["state"], record["waiting_on"]) == ("queued", "paused")
    (listed,) = wire.ok("GET", "/v1/jobs?queue=fresh")["jobs"]
    assert listed["waiting_on"] == "paused"
    broker.stop()  # a pause is stored: it survives a restart
    broker.start()
    w = Wire(broker.url)
    try:
        assert w.ok("GET", "/v1/queues/fresh")["paused"] is True
        # a long-poll on a paused queue waits, and gets the job once resumed
        with qclient.Client(broker.url) as c:
            t0 = time.monotonic()
            assert c.lease(["fresh"], wait=0.5) == []
            assert time.monotonic() - t0 >= 0.4
            assert w.ok("POST", "/v1/queues/fresh/resume")["paused"] is False
            (leased,) = c.lease(["fresh"], wait=5)
            assert leased.id == job
    finally:
        w.close()


def test_a_parked_lease_gets_the_job_when_its_queue_resumes(
    broker: BrokerProcess, wire: Wire, client: qclient.Client
) -> None:
    wire.ok("POST", "/v1/queues/held/pause")
    job = client.send("held", {"x": 1})
    import threading

    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(client.lease(["held"], wait=20)))
    t.start()
    time.sleep(0.3)
    assert not got
    t0 = time.monotonic()
    wire.ok("POST", "/v1/queues/held/resume")
    t.join(10)
    assert [j.id for j in got[0]] == [job.id]
    assert time.monotonic() - t0 < 5


def test_purge_deletes_the_states_named_and_never_active_jobs(
    wire: Wire, client: qclient.Client
) -> None:
    client.send_many("pq", [{"n": n} for n in range(4)])
    client.send("pq", {"n": 9}, delay=3600)
    (active,) = client.lease(["pq"])
    assert wire.ok("POST", "/v1/queues/pq/purge", {"states": ["scheduled"]}) == {
        "deleted": 1
    }
    assert wire.ok("POST", "/v1/queues/pq/purge") == {"deleted": 3}  # queued, scheduled
    counts = wire.ok("GET", "/v1/queues/pq")["counts"]
    assert (counts["queued"], counts["scheduled"], counts["active"]) == (0, 0, 1)
    client.ack(active.id, active.lease, "ok")  # the active job was untouched


def test_purge_naming_active_or_an_unknown_state_is_refused(wire: Wire) -> None:
    wire.ok("POST", "/v1/queues/pq2/jobs", {"args": []})
    refused(
        wire.call("POST", "/v1/queues/pq2/purge", {"states": ["active"]}), 422, "states"
    )
    refused(
        wire.call("POST", "/v1/queues/pq2/purge", {"states": ["gone"]}),
        422,
        "states[0]",
    )
    refused(wire.call("POST", "/v1/queues/pq2/purge", {"states": []}), 422, "states")
    assert wire.ok("GET", "/v1/queues/pq2")["counts"]["queued"] == 1


# ---------------------------------------------------------------- limits


def test_limits_are_put_listed_and_deleted(wire: Wire) -> None:
    put = wire.ok(
        "PUT", "/v1/limits/task:charge",
        {"concurrency": 3, "rate": {"limit": 10, "per": 60, "burst": 2}},
    )  # fmt: skip
    assert put["key"] == "task:charge"
    assert (put["concurrency"], put["rate"], put["active"]) == (
        3, {"limit": 10, "per": 60.0, "burst": 2}, 0,
    )  # fmt: skip
    wire.ok("PUT", "/v1/limits/customer:42", {"rate": "100/m"})  # a Celery string
    listed = wire.ok("GET", "/v1/limits")["limits"]
    assert [r["key"] for r in listed] == ["customer:42", "task:charge"]
    assert listed[0]["rate"] == {"limit": 100, "per": 60.0, "burst": 0}
    assert listed[0]["concurrency"] is None
    wire.ok("DELETE", "/v1/limits/customer:42")
    assert [r["key"] for r in wire.ok("GET", "/v1/limits")["limits"]] == ["task:charge"]
    status, body = wire.call("DELETE", "/v1/limits/customer:42")
    assert (status, body["error"]) == (404, "limit_not_found")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -1}, "concurrency"),
        ({"rate": {"limit": 0, "per": 1}}, "rate.limit"),
        ({"rate": {"limit": 5, "per": 0}}, "rate.per"),
        ({"rate": {"limit": 5, "per": -1}}, "rate.per"),
        ({"rate": "lots"}, "rate"),
        ({}, "concurrency"),
    ],
)
def test_a_bad_limit_is_refused_naming_the_field_and_changes_nothing(
    wire: Wire, body: dict[str, Any], field: str
) -> None:
    wire.ok("PUT", "/v1/limits/queue:x", {"concurrency": 7})
    refused(wire.call("PUT", "/v1/limits/queue:x", body), 422, field)
    (stored,) = wire.ok("GET", "/v1/limits")["limits"]
    assert (stored["concurrency"], stored["rate"]) == (7, None)


def test_a_concurrency_limit_holds_jobs_back_without_blocking_others(
    wire: Wire, client: qclient.Client
) -> None:
    wire.ok("PUT", "/v1/limits/task:slow", {"concurrency": 2})
    slow = [client.send("mixed", task="slow").id for _ in range(4)]
    fast = [client.send("mixed", task="fast").id for _ in range(3)]
    leased = client.lease(["mixed"], max=10)
    # two of the slow ones, and the fast ones queued behind the other two
    assert sorted(j.id for j in leased) == sorted(slow[:2] + fast)
    record = wire.ok("GET", f"/v1/jobs/{slow[2]}")
    assert (record["state"], record["waiting_on"]) == ("queued", "limit task:slow")
    assert wire.ok("GET", "/v1/limits")["limits"][0]["active"] == 2
    first = next(j for j in leased if j.id == slow[0])
    client.ack(first.id, first.lease, None)  # a slot frees: one more may start
    (again,) = client.lease(["mixed"], max=10, wait=5)
    assert again.id == slow[2]


def test_a_dead_workers_slot_frees_when_its_lease_lapses(
    wire: Wire, client: qclient.Client
) -> None:
    wire.ok("PUT", "/v1/limits/queue:lapse", {"concurrency": 1})
    a = client.send("lapse", {}, timeout=1).id
    b = client.send("lapse", {}).id
    (got,) = client.lease(["lapse"], max=5)
    assert got.id == a
    assert client.lease(["lapse"], max=5) == []  # held back by the limit
    # nobody acks `a`: once its one-second lease lapses, `b` may start
    (later,) = client.lease(["lapse"], max=5, wait=10)
    assert later.id in (a, b)


def test_a_limit_key_of_its_own_limits_one_customers_jobs(
    wire: Wire, client: qclient.Client
) -> None:
    wire.ok("PUT", "/v1/limits/customer:7", {"concurrency": 1})
    mine = [client.send("cust", {"n": n}, limit_key="customer:7").id for n in range(3)]
    other = client.send("cust", {"n": 9}, limit_key="customer:8").id
    leased = client.lease(["cust"], max=10)
    assert sorted(j.id for j in leased) == sorted([mine[0], other])
    assert wire.ok("GET", f"/v1/jobs/{mine[1]}")["limit_key"] == "customer:7"


def test_a_rate_limit_spaces_starts(wire: Wire, client: qclient.Client) -> None:
    wire.ok(
        "PUT", "/v1/limits/queue:paced", {"rate": {"limit": 4, "per": 1, "burst": 1}}
    )
    client.send_many("paced", [{"n": n} for n in range(8)])
    starts: list[float] = []
    deadline = time.monotonic() + 20
    while len(starts) < 8 and time.monotonic() < deadline:
        for job in client.lease(["paced"], max=8, wait=2):
            starts.append(client.get_job(job.id).started_at or 0.0)
            client.ack(job.id, job.lease, None)
    assert len(starts) == 8
    starts.sort()
    for i, t in enumerate(starts):  # at most 4 + 1 in any one-second window
        assert sum(1 for u in starts[i:] if u < t + 1.0) <= 5
    assert starts[-1] - starts[0] >= 0.7  # 8 starts at 4/s with a burst of 1


def test_task_limits_hold_across_three_workers_while_others_run_freely(
    tmp_path: Path, client: qclient.Client, wire: Wire, start: Callable[..., Proc]
) -> None:
    """The issue's test: 3 workers, 5/s and concurrency 2 on one task, over ~10 s."""
    notes = tmp_path / "notes"
    workers = [start("--concurrency", "4") for _ in range(3)]
    wait_for(
        lambda: any(r.key == "task:ctl_limited" for r in client.limits()),
        20, "the task's limit synced by a worker",
    )  # fmt: skip
    limited = [
        tasks_control.ctl_limited.send(args=[str(notes)], client=client)
        for _ in range(20)
    ]
    free = [
        client.send("ctl_limited", task="ctl_free", args=[str(notes)])
        for _ in range(20)
    ]
    t0 = time.monotonic()
    client.results(free, timeout=30)
    free_done = time.monotonic() - t0
    client.results(limited, timeout=60)
    records = [client.get_job(j.id) for j in limited]
    starts = sorted(r.started_at or 0.0 for r in records)
    ends = [(r.started_at or 0.0, r.finished_at or 0.0) for r in records]
    for i, t in enumerate(starts):
        assert sum(1 for u in starts[i:] if u < t + 1.0) <= 5  # 5/s, no burst
    for s, _ in ends:  # never more than 2 running at any start
        assert sum(1 for a, b in ends if a <= s < b) <= 2
    assert free_done < 10  # the free task's jobs did not wait behind the limited ones
    for w in workers:
        w.proc.terminate()


# ---------------------------------------------------------------- finding jobs


def _dead_jobs(client: qclient.Client, queue: str, n: int) -> list[str]:
    """`n` jobs failed for good, each with kwargs user_id = its index."""
    ids = [client.send(queue, {"user_id": i}, max_retries=0).id for i in range(n)]
    for job in client.lease([queue], max=n):
        client.fail(job.id, job.lease, f"Boom: {job.kwargs['user_id']}")
    return ids


def test_the_listing_filters_and_pages_newest_first(
    wire: Wire, client: qclient.Client
) -> None:
    ids = _dead_jobs(client, "lst", 7)
    client.send("lst", {"user_id": 3})  # queued, not failed
    page = wire.ok("GET", "/v1/jobs?state=failed&queue=lst&limit=3")
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:3]
    seen = [j["id"] for j in page["jobs"]]
    while page["next"] is not None:
        page = wire.ok(
            "GET", f"/v1/jobs?state=failed&queue=lst&limit=3&cursor={page['next']}"
        )
        seen += [j["id"] for j in page["jobs"]]
    assert seen == ids[::-1]
    by_user = wire.ok("GET", "/v1/jobs?queue=lst&kwargs.user_id=3")["jobs"]
    assert sorted(j["state"] for j in by_user) == ["failed", "queued"]
    assert wire.ok("GET", "/v1/jobs?kwargs.user_id=%223%22")["jobs"] == []  # "3"
    assert [
        j.id for j in client.iter_jobs(queue="lst", state="failed", limit=2)
    ] == ids[::-1]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("cursor=abc", "cursor"),
        ("limit=0", "limit"),
        ("state=nope", "state"),
        ("colour=red", "colour"),
        ("kwargs.=1", "kwargs."),
    ],
)
def test_a_malformed_listing_is_refused_naming_the_field(
    wire: Wire, query: str, field: str
) -> None:
    refused(wire.call("GET", f"/v1/jobs?{query}"), 422, field)


def test_retry_puts_a_failed_job_back_with_its_history(
    wire: Wire, client: qclient.Client
) -> None:
    (job,) = _dead_jobs(client, "rt", 1)
    assert wire.ok("POST", f"/v1/jobs/{job}/retry") == {"id": job, "state": "queued"}
    record = client.get_job(job)
    assert (record.state, record.attempts, record.error) == ("queued", 1, "Boom: 0")
    assert [e.error for e in record.errors] == ["Boom: 0"]
    (again,) = client.lease(["rt"])
    assert again.attempt == 1  # a fresh run of attempts, the old one kept in history
    client.fail(again.id, again.lease, "Boom: again")
    record = client.get_job(job)
    assert record.attempts == 2
    assert [e.error for e in record.errors] == ["Boom: 0", "Boom: again"]


def test_retry_of_an_unfinished_job_is_409_with_its_state(
    wire: Wire, client: qclient.Client
) -> None:
    job = client.send("rt2", {}).id
    status, body = wire.call("POST", f"/v1/jobs/{job}/retry")
    assert (status, body["error"], body["state"]) == (409, "invalid_state", "queued")
    client.lease(["rt2"])
    status, body = wire.call("POST", f"/v1/jobs/{job}/retry")
    assert (status, body["state"]) == (409, "active")
    assert client.get_job(job).state == "active"  # nothing changed


def test_bulk_retry_takes_the_listings_filters(
    wire: Wire, client: qclient.Client
) -> None:
    ids = _dead_jobs(client, "bulk", 5)
    _dead_jobs(client, "other", 2)
    assert wire.ok("POST", "/v1/jobs/retry?queue=bulk&kwargs.user_id=2") == {
        "retried": 1
    }
    assert client.get_job(ids[2]).state == "queued"
    assert client.retry_jobs(state="failed", queue="bulk") == 4
    assert wire.ok("GET", "/v1/queues/bulk")["counts"]["queued"] == 5
    assert wire.ok("GET", "/v1/queues/other")["counts"]["failed"] == 2
    refused(wire.call("POST", "/v1/jobs/retry?state=active"), 422, "state")


def test_delete_removes_a_finished_job_only(wire: Wire, client: qclient.Client) -> None:
    (done,) = _dead_jobs(client, "del", 1)
    waiting = client.send("del", {}).id
    assert wire.ok("DELETE", f"/v1/jobs/{done}") == {"id": done, "deleted": True}
    assert wire.call("GET", f"/v1/jobs/{done}")[0] == 404
    status, body = wire.call("DELETE", f"/v1/jobs/{waiting}")
    assert (status, body["state"]) == (409, "queued")
    assert wire.call("DELETE", "/v1/jobs/nosuch")[0] == 404


# ---------------------------------------------------------------- live cancel


@pytest.mark.parametrize(
    ("pool", "task", "stopped"),
    [
        ("threads", "ctl_until_cancelled", "flagged"),
        ("threads", "ctl_async_until_cancelled", "cancelled"),
        ("processes", "ctl_sleep", None),
    ],
)
def test_a_cancel_reaches_a_running_job_within_two_seconds(
    tmp_path: Path,
    client: qclient.Client,
    start: Callable[..., Proc],
    pool: str,
    task: str,
    stopped: str | None,
) -> None:
    notes = tmp_path / "notes"
    worker = start("--pool", pool, "--concurrency", "3", "--queue", "ctl_live")
    args: list[Any] = [str(notes)] + ([60] if task == "ctl_sleep" else [])
    jobs = [client.send("ctl_live", task=task, args=args) for _ in range(3)]
    wait_for(
        lambda: notes.exists() and notes.read_text().count("start") == 3, 30, "3 starts"
    )

    def seen(job_id: str) -> bool:
        if stopped is not None:  # the task itself saw it
            return f"{stopped} {job_id}" in notes.read_text()
        return any(  # the worker killed the child
            e.get("job_id") == job_id and e.get("outcome") == "cancelled"
            for e in worker.events("job.finished")
        )

    for job in jobs:
        t0 = time.monotonic()
        assert job.cancel() == "cancelled"
        wait_for(functools.partial(seen, job.id), 2.0, f"the cancel of {job.id}")
        assert time.monotonic() - t0 < 2.5
    time.sleep(0.5)  # a late outcome, if any, would have been reported by now
    for job in jobs:
        assert client.get_job(job.id).state == "cancelled"
    assert "end " not in notes.read_text()  # no child ran on to the end


# ---------------------------------------------------------------- progress


def test_progress_reaches_the_broker_with_heartbeats(
    tmp_path: Path, client: qclient.Client, start: Callable[..., Proc]
) -> None:
    seen = tmp_path / "seen"
    for pool in ("threads", "processes"):
        seen.unlink(missing_ok=True)
        worker = start("--pool", pool, "--concurrency", "1")
        job = tasks_control.ctl_progress.send(args=[str(seen)], client=client)
        got = wait_for(job.progress, 10, f"progress in the job's record ({pool})")
        assert got == (0.4, "resized 40 of 100")
        record = client.get_job(job.id)
        assert (record.progress, record.progress_note) == (0.4, "resized 40 of 100")
        seen.write_text("seen")
        assert job.result(timeout=20) == "ok"
        worker.proc.terminate()
        worker.wait(20)


# ---------------------------------------------------------------- retry policy


def test_every_attempts_error_is_kept(
    client: qclient.Client, start: Callable[..., Proc]
) -> None:
    start()
    job = tasks_control.ctl_fails_every_time.send(args=[5], client=client)
    with pytest.raises(qclient.TaskFailed):
        job.result(timeout=30)
    record = client.get_job(job.id)
    assert record.attempts == 3
    assert [e.attempt for e in record.errors] == [1, 2, 3]
    assert all(e.error == "ValueError: attempt failed (n=5)" for e in record.errors)


def test_dont_retry_for_and_raise_retry(
    client: qclient.Client, start: Callable[..., Proc]
) -> None:
    start()
    key = tasks_control.ctl_policy.send(args=["key"], client=client)
    retried = tasks_control.ctl_policy.send(args=["retry"], client=client)
    with pytest.raises(qclient.TaskFailed):
        key.result(timeout=30)
    assert client.get_job(key.id).attempts == 1  # KeyError: not retried
    assert retried.result(timeout=30) == "attempt 3"
    errors = [e.error for e in client.get_job(retried.id).errors]
    assert errors == ["Retry: not yet (1)", "Retry: not yet (2)"]


# ---------------------------------------------------------------- the CLI


def qbroker(broker: BrokerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qbroker", *args, "--url", broker.url],
        env=child_env(), capture_output=True, text=True, timeout=60, cwd=TESTS_DIR,
    )  # fmt: skip


def test_the_cli_verbs_speak_plain_text_and_json(
    broker: BrokerProcess, client: qclient.Client
) -> None:
    out = qbroker(broker, "pause", "cli")
    assert (out.returncode, out.stdout.strip()) == (0, "cli: paused")
    assert json.loads(qbroker(broker, "resume", "cli", "--json").stdout) == {
        "queue": "cli", "paused": False,
    }  # fmt: skip
    out = qbroker(
        broker, "limits", "set", "task:x", "--rate", "10/m", "--concurrency", "2"
    )
    assert out.returncode == 0 and "task:x" in out.stdout and "10/m" in out.stdout
    listed = json.loads(qbroker(broker, "limits", "--json").stdout)["limits"]
    assert listed[0]["rate"] == {"limit": 10, "per": 60.0, "burst": 0}
    bad = qbroker(broker, "limits", "set", "task:x", "--rate", "lots")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "rate" in bad.stderr
    assert qbroker(broker, "limits", "delete", "task:x").returncode == 0
    (dead,) = _dead_jobs(client, "cli", 1)
    assert qbroker(broker, "retry", dead).stdout.strip() == f"{dead}: queued"
    conflict = qbroker(broker, "retry", dead)
    assert conflict.returncode == 1 and "queued" in conflict.stderr
    assert qbroker(broker, "cancel", dead, "--json").stdout.strip() == json.dumps(
        {"id": dead, "state": "cancelled"}, separators=(",", ":")
    )
    assert json.loads(qbroker(broker, "retry", "--queue", "cli", "--json").stdout) == {
        "retried": 1
    }
    jobs = json.loads(qbroker(broker, "jobs", "--queue", "cli", "--json").stdout)
    assert [j["id"] for j in jobs["jobs"]] == [dead]
    out = qbroker(broker, "purge", "cli")
    assert out.stdout.strip() == "cli: deleted 1 jobs"
