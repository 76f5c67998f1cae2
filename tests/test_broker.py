"""The broker through the wire: every endpoint, leases, retries, priorities, delays."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import msgspec
import pytest

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire, read_replies, wait_for


@pytest.fixture
def wire(broker: BrokerProcess) -> Any:
    w = Wire(broker.url)
    yield w
    w.close()


def test_enqueue_one_then_read_its_record(wire: Wire) -> None:
    status, reply = wire.call(
        "POST", "/v1/queues/send_email/jobs", {"kwargs": {"to": "a@b.c"}}
    )
    assert status == 201
    job = wire.job(reply["id"])
    assert job["queue"] == "send_email"
    assert job["task"] == "send_email"  # defaults to the queue name
    assert job["state"] == "queued"
    assert job["kwargs"] == {"to": "a@b.c"}
    assert job["attempts"] == 0
    assert job["result"] is None and job["error"] is None


def test_enqueue_many_returns_ids_in_order(wire: Wire) -> None:
    status, reply = wire.call(
        "POST",
        "/v1/queues/q/jobs",
        {"jobs": [{"args": [i], "task": "t"} for i in range(5)]},
    )
    assert status == 201
    assert [wire.job(i)["args"] for i in reply["ids"]] == [[i] for i in range(5)]
    # 700 jobs span several multi-row INSERTs (256 + 256 + 128 + 32 + 16 + 8 + 4);
    # the broker's own ids and the given ones interleave in order
    jobs = [
        {"args": [i]} | ({"id": f"given-{i}"} if i % 7 == 0 else {}) for i in range(700)
    ]
    status, reply = wire.call("POST", "/v1/queues/big/jobs", {"jobs": jobs})
    assert status == 201 and len(set(reply["ids"])) == 700
    assert reply["ids"][7] == "given-7"
    made = [j for i, j in enumerate(reply["ids"]) if i % 7]
    assert made == sorted(made)
    leased = wire.lease("big", max=1000)
    assert [j["id"] for j in leased] == reply["ids"]
    assert [j["args"] for j in leased] == [[i] for i in range(700)]


def test_lease_ack_and_result(wire: Wire) -> None:
    job_id = wire.enqueue("q", args=[1, 2])
    [job] = wire.lease("q", max=5)
    assert job["id"] == job_id and job["attempt"] == 1 and job["args"] == [1, 2]
    assert wire.job(job_id)["state"] == "active"
    assert (
        wire.ok("POST", f"/v1/jobs/{job_id}/ack", {"lease": job["lease"], "result": 3})
        == {}
    )
    record = wire.ok("GET", f"/v1/jobs/{job_id}/result?wait=1")
    assert record["state"] == "succeeded" and record["result"] == 3
    assert record["finished_at"] >= record["started_at"] >= record["created_at"]


def _parked_long_poll(port: int, queue: str) -> socket.socket:
    """A lease long-poll (30 s) sent on a raw socket and left waiting."""
    body = json.dumps({"queues": [queue], "max": 5, "wait": 30}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/lease HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return sock


def test_a_long_poll_whose_client_has_gone_takes_no_jobs(
    wire: Wire, broker: BrokerProcess
) -> None:
    # A worker killed while its lease long-poll waits: the jobs that come next must
    # not be leased to it (they would sit active until their lease ran out).
    socks = [_parked_long_poll(broker.port, q) for q in ("gone-now", "gone-later")]
    time.sleep(0.5)  # both are parked
    for sock in socks:
        sock.close()
    time.sleep(0.2)
    now = wire.enqueue("gone-now")  # would be handed to the parked long-poll
    later = wire.enqueue("gone-later", delay=0.5)  # the reaper wakes the long-poll
    [job] = wire.lease("gone-now")
    assert job["id"] == now and job["attempt"] == 1
    wait_for(lambda: wire.job(later)["state"] != "scheduled", timeout=5)
    time.sleep(0.2)
    [job] = wire.lease("gone-later")
    assert job["id"] == later and job["attempt"] == 1


def test_stale_lease_gets_409_and_changes_nothing(wire: Wire) -> None:
    job_id = wire.enqueue("q")
    [job] = wire.lease("q")
    status, reply = wire.call("POST", f"/v1/jobs/{job_id}/ack", {"lease": "nope.1"})
    assert status == 409 and reply["error"] == "stale_lease"
    assert wire.job(job_id)["state"] == "active"
    wire.ok(
        "POST", f"/v1/jobs/{job_id}/ack", {"lease": job["lease"], "result": "first"}
    )
    for path in ("fail", "extend", "release"):
        status, reply = wire.call(
            "POST", f"/v1/jobs/{job_id}/{path}", {"lease": job["lease"]}
        )
        assert status == 409 and reply["error"] == "stale_lease", path
    assert wire.job(job_id)["result"] == "first"


def _finished_total(wire: Wire, queue: str, state: str) -> float:
    _, text, _ = wire.raw("GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith("qbroker_jobs_finished_total{") and (
            f'queue="{queue}"' in line and f'state="{state}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_ack_and_fail_are_safe_to_resend(wire: Wire) -> None:
    # an ack resent (its reply lost) is ok again and changes nothing
    acked = wire.enqueue("rs")
    [job] = wire.lease("rs")
    body = {"lease": job["lease"], "result": "first"}
    wire.ok("POST", f"/v1/jobs/{acked}/ack", body)
    finished_at = wire.job(acked)["finished_at"]
    wire.ok("POST", f"/v1/jobs/{acked}/ack", {"lease": job["lease"], "result": "again"})
    reply = wire.ok(
        "POST", "/v1/ack", {"acks": [{"id": acked, **body}, {"id": acked, **body}]}
    )
    assert [r["ok"] for r in reply["results"]] == [True, True]
    record = wire.job(acked)
    assert (record["state"], record["result"]) == ("succeeded", "first")
    assert record["finished_at"] == finished_at
    assert _finished_total(wire, "rs", "succeeded") == 1
    # ...but the other report on that lease is refused
    status, reply = wire.call("POST", f"/v1/jobs/{acked}/fail", {"lease": job["lease"]})
    assert status == 409 and reply["error"] == "stale_lease"

    # a fail resent gets the state the first one gave, even once its retry is due
    failed = wire.enqueue("rf", max_retries=1)
    [job] = wire.lease("rf")
    fail = {"lease": job["lease"], "error": "E: first", "retry_in": 0.2}
    assert wire.ok("POST", f"/v1/jobs/{failed}/fail", fail) == {"state": "scheduled"}
    assert wire.ok(
        "POST", f"/v1/jobs/{failed}/fail", {**fail, "error": "E: again"}
    ) == {"state": "scheduled"}
    wait_for(lambda: wire.job(failed)["state"] == "queued", timeout=5)
    reply = wire.ok("POST", "/v1/fail", {"fails": [{"id": failed, **fail}]})
    assert reply["results"] == [{"id": failed, "ok": True, "error": None}]
    status, _ = wire.call("POST", f"/v1/jobs/{failed}/ack", {"lease": job["lease"]})
    assert status == 409
    assert wire.job(failed)["error"] == "E: first"
    assert _finished_total(wire, "rf", "scheduled") == 1
    # once the job is leased again, the old token is stale for every report
    [again] = wire.lease("rf")
    for path in ("ack", "fail"):
        status, reply = wire.call("POST", f"/v1/jobs/{failed}/{path}", fail)
        assert status == 409 and reply["error"] == "stale_lease", path
    final = {"lease": again["lease"], "error": "E: last"}
    assert wire.ok("POST", f"/v1/jobs/{failed}/fail", final) == {"state": "failed"}
    assert wire.ok("POST", f"/v1/jobs/{failed}/fail", final) == {"state": "failed"}
    assert wire.job(failed)["attempts"] == 2


def test_unknown_job_is_404_not_pending(wire: Wire) -> None:
    status, reply = wire.call("GET", "/v1/jobs/no-such-job")
    assert status == 404 and reply["error"] == "job_not_found"
    status, reply = wire.call("POST", "/v1/jobs/no-such-job/ack", {"lease": "x"})
    assert status == 404 and reply["error"] == "job_not_found"


def test_expired_lease_requeues_job_then_makes_it_dead(wire: Wire) -> None:
    job_id = wire.enqueue("q", timeout=1.0, max_retries=1)  # the shortest lease
    [first] = wire.lease("q")
    assert first["attempt"] == 1
    second = wait_for(lambda: wire.lease("q"), timeout=5)[0]
    assert second["id"] == job_id and second["attempt"] == 2
    assert second["lease"] != first["lease"]
    status, _ = wire.call("POST", f"/v1/jobs/{job_id}/ack", {"lease": first["lease"]})
    assert status == 409  # the first delivery can no longer complete it
    record = wait_for(
        lambda: (j := wire.job(job_id))["state"] == "dead" and j, timeout=5
    )
    assert record["attempts"] == 2
    assert "LeaseExpired" in record["error"]


def test_extend_keeps_a_lease_alive(wire: Wire) -> None:
    job_id = wire.enqueue("q", timeout=1.0)  # the shortest lease
    [job] = wire.lease("q")
    for _ in range(4):
        time.sleep(0.5)
        reply = wire.ok("POST", f"/v1/jobs/{job_id}/extend", {"lease": job["lease"]})
        assert reply["cancelled"] is False
        assert reply["lease_expires_at"] > time.time()
    wire.ok("POST", f"/v1/jobs/{job_id}/ack", {"lease": job["lease"]})
    assert wire.job(job_id)["attempts"] == 1


def test_fail_with_retry_schedules_then_requeues(wire: Wire) -> None:
    job_id = wire.enqueue("q", max_retries=1)
    [job] = wire.lease("q")
    reply = wire.ok(
        "POST", f"/v1/jobs/{job_id}/fail",
        {"lease": job["lease"], "error": "ValueError: bad", "traceback": "tb", "retry_in": 0.3},
    )  # fmt: skip
    assert reply == {"state": "scheduled"}
    assert wire.job(job_id)["state"] == "scheduled"
    assert wire.lease("q") == []
    [again] = wire.lease("q", wait=5)  # woken when the retry falls due
    assert again["attempt"] == 2
    reply = wire.ok(
        "POST", f"/v1/jobs/{job_id}/fail",
        {"lease": again["lease"], "error": "ValueError: bad", "retry_in": 0.1},
    )  # fmt: skip
    assert reply == {"state": "failed"}  # no attempts left
    record = wire.ok("GET", f"/v1/jobs/{job_id}/result")
    assert record["state"] == "failed" and record["error"] == "ValueError: bad"


def test_fail_without_retry_is_final(wire: Wire) -> None:
    job_id = wire.enqueue("q")
    [job] = wire.lease("q")
    assert wire.ok("POST", f"/v1/jobs/{job_id}/fail", {"lease": job["lease"]}) == {
        "state": "failed"
    }


def test_release_does_not_count_the_attempt(wire: Wire) -> None:
    job_id = wire.enqueue("q")
    [job] = wire.lease("q")
    wire.ok("POST", f"/v1/jobs/{job_id}/release", {"lease": job["lease"]})
    record = wire.job(job_id)
    assert record["state"] == "queued" and record["attempts"] == 0
    [again] = wire.lease("q")
    assert again["attempt"] == 1


def test_a_resent_lease_gets_the_jobs_its_lost_reply_carried(wire: Wire) -> None:
    ids = wire.ok("POST", "/v1/queues/q/jobs", {"jobs": [{}, {}, {}]})["ids"]
    first = wire.lease("q", max=2, request_id="req-0001", timeout=30)
    again = wire.lease("q", max=2, request_id="req-0001", timeout=30, resend=True)
    assert [(j["id"], j["lease"], j["attempt"]) for j in again] == [
        (j["id"], j["lease"], 1) for j in first
    ]
    assert [j["id"] for j in first] == ids[:2]
    assert wire.ok("GET", "/v1/queues/q")["counts"]["queued"] == 1
    leased = b'qbroker_jobs_leased_total{queue="q"} 2.0'  # not counted again
    assert leased in wire.raw("GET", "/metrics")[1]
    # without `resend`, the same id leases anew; a resend of a request the broker
    # never saw, or whose jobs are no longer active under it, leases anew too
    [third] = wire.lease("q", request_id="req-0001")
    assert third["id"] == ids[2]
    for job in (*first, third):
        wire.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"]})
    wire.ok("POST", "/v1/queues/q/jobs", {"id": "late"})
    for rid in ("req-0001", "never-sent"):
        [job] = wire.lease("q", request_id=rid, resend=True)
        assert job["id"] == "late"
        wire.ok("POST", "/v1/jobs/late/release", {"lease": job["lease"]})
    for bad in ("short", "has:colon", "x" * 65):
        status, reply = wire.call(
            "POST", "/v1/lease", {"queues": ["q"], "request_id": bad}
        )
        assert (status, reply["field"]) == (422, "request_id"), bad


def test_a_resent_release_is_ok_again_and_changes_nothing(wire: Wire) -> None:
    job_id = wire.enqueue("q")
    [job] = wire.lease("q")
    for _ in range(2):  # the second one: a resend after a lost reply
        wire.ok("POST", f"/v1/jobs/{job_id}/release", {"lease": job["lease"]})
        record = wire.job(job_id)
        assert (record["state"], record["attempts"]) == ("queued", 0)
    # the released token settles nothing else: not a fail, not an ack, not an extend
    for action in ("fail", "ack", "extend"):
        status, body = wire.call(
            "POST", f"/v1/jobs/{job_id}/{action}", {"lease": job["lease"]}
        )
        assert (status, body["error"]) == (409, "stale_lease"), action
    [again] = wire.lease("q")
    assert again["attempt"] == 1
    status, body = wire.call(
        "POST", f"/v1/jobs/{job_id}/release", {"lease": job["lease"]}
    )
    assert (status, body["error"]) == (409, "stale_lease")  # leased again since


def test_batch_release_hands_back_each_item_alone(wire: Wire) -> None:
    ids = wire.ok("POST", "/v1/queues/q/jobs", {"jobs": [{}, {}, {}]})["ids"]
    jobs = wire.lease("q", max=3)
    reply = wire.ok("POST", "/v1/release", {"releases": [
        {"id": jobs[0]["id"], "lease": jobs[0]["lease"]},
        {"id": jobs[1]["id"], "lease": "stale.1"},
        {"id": "missing", "lease": "x"},
        {"id": jobs[2]["id"], "lease": jobs[2]["lease"]},
    ]})  # fmt: skip
    assert reply == {"results": [
        {"id": ids[0], "ok": True, "error": None},
        {"id": ids[1], "ok": False, "error": "stale_lease"},
        {"id": "missing", "ok": False, "error": "job_not_found"},
        {"id": ids[2], "ok": True, "error": None},
    ]}  # fmt: skip
    states = [(wire.job(i)["state"], wire.job(i)["attempts"]) for i in ids]
    assert states == [("queued", 0), ("active", 1), ("queued", 0)]
    again = wire.lease("q", max=3)  # back at their old places, attempts not counted
    assert [(j["id"], j["attempt"]) for j in again] == [(ids[0], 1), (ids[2], 1)]


def test_batch_ack_and_fail_apply_each_item_alone(wire: Wire) -> None:
    ids = wire.ok("POST", "/v1/queues/q/jobs", {"jobs": [{}, {}, {}, {}]})["ids"]
    jobs = wire.lease("q", max=4)
    assert [j["id"] for j in jobs] == ids
    reply = wire.ok("POST", "/v1/ack", {"acks": [
        {"id": jobs[0]["id"], "lease": jobs[0]["lease"], "result": 0},
        {"id": jobs[1]["id"], "lease": "stale.1"},
        {"id": "missing", "lease": "x"},
    ]})  # fmt: skip
    assert reply["results"] == [
        {"id": jobs[0]["id"], "ok": True, "error": None},
        {"id": jobs[1]["id"], "ok": False, "error": "stale_lease"},
        {"id": "missing", "ok": False, "error": "job_not_found"},
    ]
    reply = wire.ok("POST", "/v1/fail", {"fails": [
        {"id": j["id"], "lease": j["lease"], "error": "E: x", "retry_in": None} for j in jobs[1:]
    ]})  # fmt: skip
    assert all(r["ok"] for r in reply["results"])
    states = [wire.job(i)["state"] for i in ids]
    assert states == ["succeeded", "failed", "failed", "failed"]


def test_priority_first_then_fifo(wire: Wire) -> None:
    low = [wire.enqueue("q", priority=0, args=[i]) for i in range(3)]
    high = [wire.enqueue("q", priority=5, args=[i]) for i in range(3)]
    neg = wire.enqueue("q", priority=-1)
    leased = [j["id"] for j in wire.lease("q", max=10)]
    assert leased == [*high, *low, neg]


def test_lease_tries_queues_in_order(wire: Wire) -> None:
    b = wire.enqueue("b")
    a = wire.enqueue("a")
    assert [j["id"] for j in wire.lease("a", "b", max=2)] == [a, b]


def test_lease_says_whether_more_jobs_were_ready(wire: Wire) -> None:
    """`more` is true only when a lease got its `max` and its queues had more ready:
    a worker asks again at once then, and otherwise long-polls."""

    def lease(max_jobs: int, *queues: str) -> tuple[int, bool]:
        reply = wire.ok("POST", "/v1/lease", {"queues": list(queues), "max": max_jobs})
        return len(reply["jobs"]), reply["more"]

    for _ in range(3):
        wire.enqueue("m1")
    wire.enqueue("m2")
    assert lease(2, "m1") == (2, True)
    assert lease(1, "m1") == (1, False)  # got its max, and that was the last one
    assert lease(1, "m1", "m2") == (1, False)
    wire.enqueue("m2")
    wire.enqueue("m1", delay=60)  # scheduled, not ready
    assert lease(1, "m1", "m2") == (1, False)
    assert lease(5, "m1", "m2") == (0, False)
    wire.enqueue("m1")
    wire.enqueue("m2")
    assert lease(1, "m1", "m2") == (1, True)  # m2's job is ready too


def test_delayed_job_is_scheduled_until_its_time(wire: Wire) -> None:
    job_id = wire.enqueue("q", delay=0.5)
    assert wire.job(job_id)["state"] == "scheduled"
    assert wire.lease("q") == []
    start = time.monotonic()
    [job] = wire.lease("q", wait=5)
    waited = time.monotonic() - start
    assert job["id"] == job_id
    assert 0.2 < waited < 3.0


def test_eta_in_the_past_is_ready_now(wire: Wire) -> None:
    job_id = wire.enqueue("q", eta=time.time() - 10)
    assert wire.job(job_id)["state"] == "queued"


def test_delay_and_eta_together_are_invalid(wire: Wire) -> None:
    status, reply = wire.call(
        "POST", "/v1/queues/q/jobs", {"delay": 1, "eta": time.time()}
    )
    assert status == 422 and reply["field"] == "delay"


def test_long_poll_lease_is_woken_by_enqueue(broker: BrokerProcess, wire: Wire) -> None:
    import threading

    got: list[Any] = []
    waiter = Wire(broker.url)
    t = threading.Thread(target=lambda: got.append(waiter.lease("lp", wait=20)))
    start = time.monotonic()
    t.start()
    time.sleep(0.3)
    job_id = wire.enqueue("lp")
    t.join(10)
    assert got and got[0][0]["id"] == job_id
    assert time.monotonic() - start < 5  # well before the 20 s wait
    waiter.close()


def test_parked_lease_long_polls_are_handed_jobs_by_the_enqueue(
    broker: BrokerProcess, wire: Wire
) -> None:
    """An enqueue leases its jobs to parked long-polls in its own commit: each gets
    what its `max` allows, highest priority first, the delivery counted once, and
    the lease is good for an ack. Jobs beyond what they take stay queued."""
    import threading

    got: list[list[dict[str, Any]]] = []
    waiters = [Wire(broker.url) for _ in range(3)]
    threads = [
        threading.Thread(
            target=lambda w=w: got.append(w.lease("handoff", max=2, wait=20))
        )
        for w in waiters
    ]
    for t in threads:
        t.start()
        time.sleep(0.2)  # parked one after another
    prios = [0, 5, 1, 9, 3, 7, 2, 8]  # 8 jobs for 3 x max=2: two stay queued
    ids = wire.ok(
        "POST", "/v1/queues/handoff/jobs", {"jobs": [{"priority": p} for p in prios]}
    )["ids"]
    for t in threads:
        t.join(10)
    assert sorted(len(jobs) for jobs in got) == [2, 2, 2]
    leased = [j for jobs in got for j in jobs]
    by_id = dict(zip(ids, prios, strict=True))
    assert sorted((by_id[j["id"]] for j in leased), reverse=True) == [9, 8, 7, 5, 3, 2]
    assert all(j["attempt"] == 1 for j in leased)
    stats = wire.ok("GET", "/v1/queues/handoff")["counts"]
    assert (stats["active"], stats["queued"]) == (6, 2)
    for j in leased:
        record = wire.ok("GET", f"/v1/jobs/{j['id']}")
        # leased in the enqueue's own commit: one clock reading stamps both
        assert record["started_at"] == record["created_at"], record
        wire.ok("POST", f"/v1/jobs/{j['id']}/ack", {"lease": j["lease"], "result": 1})
        assert wire.ok("GET", f"/v1/jobs/{j['id']}")["attempts"] == 1
    for w in waiters:
        w.close()


def test_lease_wait_runs_out_with_empty_list(wire: Wire) -> None:
    start = time.monotonic()
    assert wire.lease("empty", wait=0.5) == []
    assert 0.4 < time.monotonic() - start < 3


def test_result_long_poll_is_woken_by_ack(broker: BrokerProcess, wire: Wire) -> None:
    import threading

    job_id = wire.enqueue("q")
    [job] = wire.lease("q")
    got: list[Any] = []
    other = Wire(broker.url)
    t = threading.Thread(
        target=lambda: got.append(other.ok("GET", f"/v1/jobs/{job_id}/result?wait=20"))
    )
    start = time.monotonic()
    t.start()
    time.sleep(0.3)
    wire.ok("POST", f"/v1/jobs/{job_id}/ack", {"lease": job["lease"], "result": "done"})
    t.join(10)
    assert got and got[0]["state"] == "succeeded" and got[0]["result"] == "done"
    assert time.monotonic() - start < 5
    other.close()


def test_parked_result_long_polls_get_the_final_records(
    broker: BrokerProcess, wire: Wire
) -> None:
    """Long-polls parked before the outcome are answered with the record the writer
    read at the commit: result, error and traceback all there, for each way to finish."""
    import threading

    ids = [wire.enqueue("parked") for _ in range(4)]
    leases = {j["id"]: j["lease"] for j in wire.lease("parked", max=4)}
    got: dict[str, Any] = {}
    waiters = [Wire(broker.url) for _ in ids]

    def wait(w: Wire, job_id: str) -> None:
        got[job_id] = w.ok("GET", f"/v1/jobs/{job_id}/result?wait=20")

    threads = [
        threading.Thread(target=wait, args=(w, j))
        for w, j in zip(waiters, ids, strict=True)
    ]
    for t in threads:
        t.start()
    time.sleep(0.3)  # all four parked
    a, b, c, d = ids
    wire.ok("POST", "/v1/ack", {"acks": [{"id": a, "lease": leases[a], "result": [1]}]})
    wire.ok("POST", f"/v1/jobs/{b}/ack", {"lease": leases[b], "result": {"k": 2}})
    wire.ok("POST", "/v1/fail", {"fails": [{"id": c, "lease": leases[c], "error": "E: c", "traceback": "tb c"}]})  # fmt: skip
    wire.ok("POST", f"/v1/jobs/{d}/fail", {"lease": leases[d], "error": "E: d", "traceback": "tb d"})  # fmt: skip
    for t in threads:
        t.join(10)
    assert (got[a]["state"], got[a]["result"]) == ("succeeded", [1])
    assert (got[b]["state"], got[b]["result"]) == ("succeeded", {"k": 2})
    assert (got[c]["state"], got[c]["error"], got[c]["traceback"]) == (
        "failed",
        "E: c",
        "tb c",
    )
    assert (got[d]["state"], got[d]["error"], got[d]["traceback"]) == (
        "failed",
        "E: d",
        "tb d",
    )
    for job_id in ids:  # the same record a plain read gives
        assert wire.ok("GET", f"/v1/jobs/{job_id}") == got[job_id]
    for w in waiters:
        w.close()


def test_lease_settles_its_acks_and_fails_first_in_the_same_commit(
    broker: BrokerProcess, wire: Wire
) -> None:
    """A lease may carry outcomes: each item settles on its own (a stale one fails
    alone), before the lease; a lease that then waits has committed them already."""
    import threading

    a, b, c = (wire.enqueue("settle", max_retries=0) for _ in range(3))
    leases = {j["id"]: j["lease"] for j in wire.lease("settle", max=3)}
    d = wire.enqueue("settle")
    reply = wire.ok("POST", "/v1/lease", {
        "queues": ["settle"], "max": 5,
        "acks": [{"id": a, "lease": leases[a], "result": "A"}, {"id": b, "lease": "stale"}],
        "fails": [{"id": c, "lease": leases[c], "error": "E: c"}],
    })  # fmt: skip
    assert [j["id"] for j in reply["jobs"]] == [d]
    assert reply["results"] == [
        {"id": a, "ok": True, "error": None},
        {"id": b, "ok": False, "error": "stale_lease"},
        {"id": c, "ok": True, "error": None},
    ]
    assert [wire.job(j)["state"] for j in (a, b, c)] == [
        "succeeded",
        "active",
        "failed",
    ]
    assert wire.job(a)["result"] == "A"
    # Settle b with a lease that finds nothing and waits: b's result long-poll is
    # answered while that lease is still waiting.
    results: list[Any] = []
    waiting: list[Any] = []
    w1, w2 = Wire(broker.url), Wire(broker.url)
    t1 = threading.Thread(
        target=lambda: results.append(w1.ok("GET", f"/v1/jobs/{b}/result?wait=20"))
    )
    body = {
        "queues": ["settle"],
        "wait": 20,
        "acks": [{"id": b, "lease": leases[b], "result": "B"}],
    }
    t2 = threading.Thread(
        target=lambda: waiting.append(w2.ok("POST", "/v1/lease", body))
    )
    t1.start()
    time.sleep(0.2)
    t2.start()
    t1.join(10)
    assert (
        results and results[0]["state"] == "succeeded" and results[0]["result"] == "B"
    )
    assert t2.is_alive() and not waiting  # still long-polling for a job
    e = wire.enqueue("settle")
    t2.join(10)
    assert [j["id"] for j in waiting[0]["jobs"]] == [e]
    assert waiting[0]["results"] == [{"id": b, "ok": True, "error": None}]
    w1.close()
    w2.close()


def test_results_waits_for_every_job_and_answers_in_order(
    broker: BrokerProcess, wire: Wire
) -> None:
    """`POST /v1/results` parks until every listed job is final, however each ends
    (ack, fail, cancel, the reaper), and answers one record per distinct id, in the
    order asked, null for an unknown id."""
    import threading

    a, b, c, d, e = (wire.enqueue("many", max_retries=0) for _ in range(5))
    done = wire.enqueue("many-done")
    [j] = wire.lease("many-done")
    wire.ok("POST", f"/v1/jobs/{done}/ack", {"lease": j["lease"], "result": "early"})
    leases = {x["id"]: x["lease"] for x in wire.lease("many", max=4, timeout=1.0)}
    assert set(leases) == {a, b, c, d}
    ids = [e, a, "no-such-job", b, c, d, done, a]
    got: list[Any] = []
    other = Wire(broker.url)
    t = threading.Thread(
        target=lambda: got.append(
            other.ok("POST", "/v1/results", {"ids": ids, "wait": 20})
        )
    )
    start = time.monotonic()
    t.start()
    time.sleep(0.3)
    assert not got  # e is still queued: the long-poll waits for all of them
    wire.ok("POST", "/v1/ack", {"acks": [{"id": a, "lease": leases[a], "result": 1}]})
    wire.ok("POST", f"/v1/jobs/{b}/fail", {"lease": leases[b], "error": "E: b"})
    wire.ok("POST", f"/v1/jobs/{c}/cancel")
    # d's 1 s lease runs out and, with no retries left, the reaper makes it dead
    time.sleep(0.3)
    assert not got
    wire.ok("POST", f"/v1/jobs/{e}/cancel")
    t.join(10)
    assert time.monotonic() - start < 8
    jobs = got[0]["jobs"]
    assert [r and r["id"] for r in jobs] == [e, a, None, b, c, d, done]  # `a` once
    assert [r and r["state"] for r in jobs] == [
        "cancelled", "succeeded", None, "failed", "cancelled", "dead", "succeeded",
    ]  # fmt: skip
    assert (jobs[1]["result"], jobs[3]["error"], jobs[6]["result"]) == (
        1,
        "E: b",
        "early",
    )
    for record in jobs:  # the same record a plain read gives
        if record is not None:
            assert wire.ok("GET", f"/v1/jobs/{record['id']}") == record
    other.close()


def test_results_wait_runs_out_with_current_records(wire: Wire) -> None:
    queued = wire.enqueue("many-idle")
    leased = wire.enqueue("many-busy")
    wire.lease("many-busy")
    start = time.monotonic()
    reply = wire.ok("POST", "/v1/results", {"ids": [queued, leased], "wait": 0.3})
    assert 0.25 < time.monotonic() - start < 5
    assert [r["state"] for r in reply["jobs"]] == ["queued", "active"]
    reply = wire.ok("POST", "/v1/results", {"ids": [queued]})  # wait 0: one look
    assert reply["jobs"][0]["state"] == "queued"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": []}, "ids"),
        ({"ids": ["x"] * 1001}, "ids"),
        ({"ids": ["bad id"]}, "ids[0]"),
        ({"ids": ["x"], "wait": 301}, "wait"),
    ],
)
def test_results_rejects_bad_requests(wire: Wire, body: Any, field: str) -> None:
    status, reply = wire.call("POST", "/v1/results", body)
    assert (status, reply["error"], reply["field"]) == (422, "invalid_field", field)


def test_result_wait_runs_out_with_current_record(wire: Wire) -> None:
    job_id = wire.enqueue("q")
    record = wire.ok("GET", f"/v1/jobs/{job_id}/result?wait=0.3")
    assert record["state"] == "queued"


def test_expired_job_is_never_leased(wire: Wire) -> None:
    job_id = wire.enqueue("q", expires=0.2)
    time.sleep(0.3)
    assert wire.lease("q") == []
    wait_for(lambda: wire.job(job_id)["state"] == "expired", timeout=5)


def test_duplicate_id_is_409_and_keeps_the_first(wire: Wire) -> None:
    wire.enqueue("q", id="order-42", args=[1])
    status, reply = wire.call(
        "POST", "/v1/queues/q/jobs", {"id": "order-42", "args": [2]}
    )
    assert status == 409 and reply["error"] == "duplicate_id"
    assert wire.job("order-42")["args"] == [1]
    # a batch with one duplicate stores nothing
    status, _ = wire.call(
        "POST", "/v1/queues/q/jobs", {"jobs": [{"id": "new-1"}, {"id": "order-42"}]}
    )
    assert status == 409
    assert wire.call("GET", "/v1/jobs/new-1")[0] == 404
    # ...also when the duplicate is in a later INSERT statement of a big batch
    jobs = [{"id": f"many-{i}"} for i in range(299)] + [{"id": "order-42"}]
    assert wire.call("POST", "/v1/queues/q/jobs", {"jobs": jobs})[0] == 409
    assert wire.call("GET", "/v1/jobs/many-0")[0] == 404
    assert wire.ok("GET", "/v1/queues/q")["counts"].get("queued", 0) == 1


def test_dedup_key_allows_one_unfinished_job(wire: Wire) -> None:
    wire.enqueue("q", dedup_key="user-7")
    status, reply = wire.call("POST", "/v1/queues/q/jobs", {"dedup_key": "user-7"})
    assert status == 409 and reply["error"] == "duplicate_dedup_key"
    [job] = wire.lease("q")
    wire.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"]})
    wire.enqueue("q", dedup_key="user-7")  # finished: a new one may be sent


def test_cancel_queued_and_active_jobs(wire: Wire) -> None:
    queued = wire.enqueue("c1")
    assert wire.ok("POST", f"/v1/jobs/{queued}/cancel") == {
        "id": queued,
        "state": "cancelled",
    }
    assert wire.lease("c1") == []
    active = wire.enqueue("c2")
    [job] = wire.lease("c2")
    wire.ok("POST", f"/v1/jobs/{active}/cancel")
    reply = wire.ok("POST", f"/v1/jobs/{active}/extend", {"lease": job["lease"]})
    assert reply["cancelled"] is True
    status, _ = wire.call("POST", f"/v1/jobs/{active}/ack", {"lease": job["lease"]})
    assert status == 409
    assert wire.job(active)["state"] == "cancelled"


def test_queue_stats_count_every_state(wire: Wire) -> None:
    for _ in range(3):
        wire.enqueue("stats")
    wire.enqueue("stats", delay=60)
    [job] = wire.lease("stats")
    wire.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"]})
    stats = wire.ok("GET", "/v1/queues/stats")
    assert stats["queue"] == "stats"
    assert stats["counts"] == {
        "scheduled": 1, "queued": 2, "active": 0, "succeeded": 1,
        "failed": 0, "dead": 0, "cancelled": 0, "expired": 0,
    }  # fmt: skip
    assert stats["oldest_age"] >= 0
    all_queues = wire.ok("GET", "/v1/queues")["queues"]
    assert [q["queue"] for q in all_queues] == ["stats"]
    empty = wire.ok("GET", "/v1/queues/nothing-here")
    assert sum(empty["counts"].values()) == 0 and empty["oldest_age"] is None


def test_msgpack_in_and_out(wire: Wire) -> None:
    body = msgspec.msgpack.encode({"args": [b"\x00\x01", 1.5], "kwargs": {"k": "v"}})
    status, raw, headers = wire.raw(
        "POST", "/v1/queues/mp/jobs", body, {"Content-Type": "application/msgpack"}
    )
    assert status == 201 and headers["content-type"] == "application/msgpack"
    job_id = msgspec.msgpack.decode(raw)["id"]
    status, raw, _ = wire.raw(
        "GET", f"/v1/jobs/{job_id}", None, {"Accept": "application/msgpack"}
    )
    record = msgspec.msgpack.decode(raw)
    assert record["args"] == [b"\x00\x01", 1.5] and record["kwargs"] == {"k": "v"}
    # every reply follows Accept, the empty ones of ack and release included
    wire.enqueue("mp")
    first, second = wire.lease("mp", max=2)
    mp = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
    for job, action in ((first, "ack"), (second, "release")):
        status, raw, headers = wire.raw(
            "POST", f"/v1/jobs/{job['id']}/{action}",
            msgspec.msgpack.encode({"lease": job["lease"]}), mp,
        )  # fmt: skip
        assert (status, headers["content-type"]) == (200, "application/msgpack")
        assert msgspec.msgpack.decode(raw) == {}
    # a msgpack type refused with q=0 gets JSON
    accept = {"Accept": "application/msgpack;q=0, application/json"}
    status, raw, headers = wire.raw("GET", f"/v1/jobs/{job_id}", None, accept)
    assert headers["content-type"] == "application/json"
    assert msgspec.json.decode(raw)["id"] == job_id


def test_healthz_metrics_and_openapi(wire: Wire) -> None:
    assert wire.ok("GET", "/healthz")["status"] == "ok"
    wire.enqueue("m")
    status, raw, _ = wire.raw("GET", "/metrics")
    assert status == 200 and b'qbroker_jobs_enqueued_total{queue="m"} 1.0' in raw
    doc = wire.ok("GET", "/v1/openapi.json")
    assert "/v1/lease" in doc["paths"] and "JobRecord" in doc["components"]["schemas"]
    assert {"/metrics", "/v1/openapi.json"} <= doc["paths"].keys()
    for op in (doc["paths"]["/v1/lease"]["post"], doc["paths"]["/v1/jobs/{id}"]["get"]):
        assert {"401", "429", "500", "503"} <= op["responses"].keys()
    assert "507" in doc["paths"]["/v1/lease"]["post"]["responses"]


def test_names_in_paths_may_be_percent_encoded(wire: Wire) -> None:
    # as JavaScript's encodeURIComponent writes "a:b" and "j-1@x"
    status, reply = wire.call("POST", "/v1/queues/a%3Ab/jobs", {"id": "j-1@x"})
    assert (status, reply) == (201, {"id": "j-1@x"})
    assert wire.ok("GET", "/v1/jobs/j-1%40x")["queue"] == "a:b"
    assert wire.ok("GET", "/v1/jobs/j%2D1@x")["id"] == "j-1@x"
    assert wire.ok("GET", "/v1/queues/a%3ab")["counts"]["queued"] == 1
    for bad in ("j-1%2Fx", "j-1%ffx", "j-1%"):  # a slash, bad UTF-8, a lone %
        assert wire.call("GET", f"/v1/jobs/{bad}")[0] == 404


def test_metrics_count_every_final_state_and_promoted_jobs(wire: Wire) -> None:
    wire.enqueue("fin", id="c-1")
    wire.ok("POST", "/v1/jobs/c-1/cancel")
    wire.enqueue("fin", id="e-1", delay=0.2, expires=0.1)  # expires before it is due
    for i in range(3):
        wire.enqueue("fin", id=f"d-{i}", delay=0.1, max_retries=0)
    [job] = wire.lease("fin", wait=5, timeout=1.0)  # then the lease runs out:
    deadline = time.monotonic() + 10  # its only attempt, so the job ends dead
    while wire.job(job["id"])["state"] != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    raw = wire.raw("GET", "/metrics")[1]
    for line in (
        b'qbroker_jobs_finished_total{queue="fin",state="cancelled"} 1.0',
        b'qbroker_jobs_finished_total{queue="fin",state="expired"} 1.0',
        b'qbroker_jobs_finished_total{queue="fin",state="dead"} 1.0',
        b'qbroker_reaped_total{outcome="promoted"} 3.0',
    ):
        assert line in raw, (line, raw)


def test_token_is_required_when_configured(broker_factory: Any) -> None:
    b = broker_factory(name="auth", args=("--token", "s3cret")).start()
    w = Wire(b.url)
    assert w.call("GET", "/v1/queues")[0] == 401
    status, _, _ = w.raw("GET", "/v1/queues", None, {"Authorization": "Bearer s3cret"})
    assert status == 200
    assert w.call("GET", "/healthz")[0] == 200
    w.close()


def test_sigterm_exits_cleanly(broker: BrokerProcess, wire: Wire) -> None:
    job_id = wire.enqueue("q")
    assert broker.stop() == 0
    broker.start()
    again = Wire(broker.url)
    assert again.job(job_id)["state"] == "queued"
    again.close()


def test_expect_100_continue_gets_the_go_ahead_at_once(broker: BrokerProcess) -> None:
    # curl sends `Expect: 100-continue` with a body over 1 KiB and waits for the go-ahead
    # (up to a second) before sending it.
    body = json.dumps({"args": ["x" * 3000]}).encode()
    head = (
        b"POST /v1/queues/expect/jobs HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(head)
        sock.settimeout(0.5)  # well before curl's own second
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(4096)
            assert chunk
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.settimeout(5)
        sock.sendall(body)
        [(status, reply)] = read_replies(sock, 1)
    assert status == 201 and isinstance(reply, dict)
    # a body declared too large is refused without the go-ahead
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/queues/expect/jobs HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Length: 99999999\r\n\r\n"
        )
        [(status, reply)] = read_replies(sock, 1)
    assert status == 413
