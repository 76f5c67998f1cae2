"""Restart durability and concurrent producers, through a real broker process."""

from __future__ import annotations

import threading
import time

from qbroker.store.sqlite.schema import WRITER_AUTOCHECKPOINT_PAGES

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire, wait_for


def test_sigkill_loses_no_acknowledged_enqueue(broker: BrokerProcess) -> None:
    w = Wire(broker.url)
    acked: list[str] = []
    for i in range(300):
        acked.append(w.enqueue("dur", args=[i], timeout=1.0))
    acked += w.ok(
        "POST", "/v1/queues/dur/jobs", {"jobs": [{"args": [i]} for i in range(200)]}
    )["ids"]
    leased = w.lease("dur", max=50)
    assert len(leased) == 50
    done = leased[:10]
    for job in done:
        w.ok(
            "POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"], "result": "ok"}
        )
    w.close()
    broker.kill()
    broker.start()
    w = Wire(broker.url)
    counts = w.ok("GET", "/v1/queues/dur")["counts"]
    assert counts["succeeded"] == 10
    assert counts["queued"] + counts["active"] == len(acked) - 10
    for job in done:
        assert w.job(job["id"])["result"] == "ok"
    # leased but unacked jobs come back once their lease runs out
    unacked = {j["id"] for j in leased[10:]}
    seen: set[str] = set()

    def drained() -> bool:
        for job in w.lease("dur", max=1000, wait=0.5):
            seen.add(job["id"])
        return unacked <= seen

    wait_for(drained, timeout=15)
    assert all(w.job(i)["attempts"] == 2 for i in unacked)
    w.close()


def test_a_lease_resent_to_a_restarted_broker_gets_the_same_jobs(
    broker: BrokerProcess,
) -> None:
    # The broker commits a lease and dies before its reply reaches the worker: the
    # worker's resend, to the restarted broker, gets those jobs (found by the request's
    # id in the tokens on disk), not others.
    w = Wire(broker.url)
    w.ok("POST", "/v1/queues/rl/jobs", {"jobs": [{}, {}, {}]})
    first = w.lease("rl", max=2, timeout=60, request_id="crash-0001")
    w.close()
    broker.kill()
    broker.start()
    w = Wire(broker.url)
    again = w.lease("rl", max=2, timeout=60, request_id="crash-0001", resend=True)
    assert [(j["id"], j["lease"], j["attempt"]) for j in again] == [
        (j["id"], j["lease"], 1) for j in first
    ]
    for job in again:
        w.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"]})
    counts = w.ok("GET", "/v1/queues/rl")["counts"]
    assert (counts["succeeded"], counts["queued"], counts["active"]) == (2, 1, 0)
    w.close()


def test_wal_starts_at_its_working_size_and_a_crash_loses_nothing(
    broker: BrokerProcess,
) -> None:
    """The broker grows the WAL with zeros at start (commits then write in place);
    SQLite must never take those zeros for data, across crashes and restarts."""
    wal = broker.data_dir / "qbroker.db-wal"
    assert wal.stat().st_size >= WRITER_AUTOCHECKPOINT_PAGES * 4096
    w = Wire(broker.url)
    ids = [w.enqueue("walq", args=[i]) for i in range(100)]
    w.close()
    for _ in range(2):
        broker.kill()
        broker.start()
        w = Wire(broker.url)
        assert [w.job(i)["args"] for i in ids] == [[i] for i in range(len(ids))]
        ids += [w.enqueue("walq", args=[len(ids) + i]) for i in range(50)]
        if len(ids) == 200:
            assert w.ok("GET", "/v1/queues/walq")["counts"]["queued"] == 200
        w.close()


def test_fifty_concurrent_clients_store_every_id_once(broker: BrokerProcess) -> None:
    ids: list[list[str]] = [[] for _ in range(50)]
    errors: list[BaseException] = []

    def produce(n: int) -> None:
        w = Wire(broker.url)
        try:
            for i in range(200):
                ids[n].append(w.enqueue("many", args=[n, i]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            w.close()

    threads = [threading.Thread(target=produce, args=(n,)) for n in range(50)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    flat = [i for batch in ids for i in batch]
    assert len(flat) == 10_000 and len(set(flat)) == 10_000
    w = Wire(broker.url)
    assert w.ok("GET", "/v1/queues/many")["counts"]["queued"] == 10_000
    leased = w.lease("many", max=1000)
    assert len(leased) == 1000
    print(f"50x200 enqueues in {time.monotonic() - start:.2f} s")
    w.close()


def test_bursts_of_reads_do_not_leak_file_handles(broker: BrokerProcess) -> None:
    """Regression: reader connections were per thread, and trio retires idle threads
    after ~10 s, so each burst of reads left its connections open (found by the soak)."""
    import os

    w = Wire(broker.url)
    job_id = w.enqueue("fd")
    assert broker.proc is not None
    fd_dir = f"/proc/{broker.proc.pid}/fd"

    def read_once() -> None:
        reader = Wire(broker.url)
        reader.job(job_id)
        reader.close()

    def burst() -> int:
        threads = []
        for _ in range(30):
            t = threading.Thread(target=read_once)
            threads.append(t)
            t.start()
        for t in threads:
            t.join(30)
        time.sleep(0.5)  # let the burst's sockets close
        return len(os.listdir(fd_dir))

    try:
        first = burst()
        time.sleep(11)  # trio's idle worker threads exit after 10 s
        second = burst()
        time.sleep(11)
        third = burst()
    finally:
        w.close()
    # The pool may grow while bursts differ in how many reads overlap, but never past
    # one connection per concurrent read (30); a per-thread leak adds ~60 fds a burst.
    assert third <= second + 5, (first, second, third)
    assert third <= first + 30, (first, second, third)
