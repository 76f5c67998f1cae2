"""Requests the broker holds: many parked result waits (memory, /healthz, clients that
go, SIGTERM), and requests that wait in the sockets through a stall of the broker."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire, read_message, wait_for

WAITS = 300  #: connections, each parked on the same JOBS jobs
JOBS = 1000  #: the most ids one POST /v1/results may name
ARG_BYTES = 1000  #: each job's argument: what a record held by a wait weighs
RSS_BOUND = 200 * 1024 * 1024  #: growth allowed for the parked waits (was 607 MiB)
GRACE = 10.0  #: the broker's shutdown grace (config.SHUTDOWN_GRACE)


def _rss(b: BrokerProcess) -> int:
    assert b.proc is not None
    for line in Path(f"/proc/{b.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _connections(w: Wire) -> float:
    text = w.raw("GET", "/metrics")[1].decode()
    found = re.search(r"^qbroker_connections (\S+)$", text, re.M)
    assert found is not None
    return float(found[1])


def _settled_rss(b: BrokerProcess) -> int:
    """The broker's RSS once it stops moving (its work on what was sent is done)."""
    last = _rss(b)
    for _ in range(60):
        time.sleep(0.5)
        now = _rss(b)
        if abs(now - last) < 1024 * 1024:
            return now
        last = now
    return last


@pytest.fixture
def enough_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WAITS + 200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} file descriptors, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_parked_result_waits_hold_ids_go_with_their_clients_and_end_at_sigterm(
    broker: BrokerProcess, enough_fds: None
) -> None:
    w = Wire(broker.url)
    jobs = [{"args": ["x" * ARG_BYTES, i]} for i in range(JOBS)]
    ids = w.ok("POST", "/v1/queues/parked/jobs", {"jobs": jobs})["ids"]
    body = json.dumps({"ids": ids, "wait": 120}).encode()
    request = (
        b"POST /v1/results HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
        % (
            len(body),
            body,
        )
    )
    base = _settled_rss(broker)
    waits = []
    for _ in range(WAITS):
        s = socket.create_connection(("127.0.0.1", broker.port), timeout=30)
        s.sendall(request)
        waits.append(s)
    wait_for(lambda: _connections(w) == WAITS + 1, timeout=30)
    parked = _settled_rss(broker)
    latencies = []
    for _ in range(20):
        start = time.perf_counter()
        assert w.ok("GET", "/healthz")["status"] == "ok"
        latencies.append(time.perf_counter() - start)
    print(
        f"\n{WAITS} waits on {JOBS} jobs: RSS {base / 2**20:.1f} MiB before,"
        f" {parked / 2**20:.1f} MiB parked (+{(parked - base) / 2**20:.1f});"
        f" /healthz p50 {statistics.median(latencies) * 1000:.2f} ms,"
        f" max {max(latencies) * 1000:.2f} ms"
    )
    assert parked - base < RSS_BOUND, (base, parked)
    assert max(latencies) < 2.0, latencies  # was 10.5 s with 1,000 waits

    # half the clients go: their waits are dropped, not kept for their 120 s
    gone, kept = waits[: WAITS // 2], waits[WAITS // 2 :]
    for s in gone:
        s.close()
    start = time.monotonic()
    wait_for(lambda: _connections(w) == len(kept) + 1, timeout=15)
    print(
        f"{len(gone)} gone clients' waits dropped in {time.monotonic() - start:.2f} s"
    )
    w.close()

    # SIGTERM: the rest are answered within the grace (503: ask the restarted broker
    # again); their clients read their replies meanwhile, as clients do
    assert broker.proc is not None
    with ThreadPoolExecutor(max_workers=len(kept)) as pool:
        replies = [pool.submit(read_message, s) for s in kept]
        start = time.monotonic()
        broker.proc.send_signal(signal.SIGTERM)
        assert broker.proc.wait(GRACE + 10) == 0
        took = time.monotonic() - start
    answered = 0
    for s, got in zip(kept, replies, strict=True):
        reply = got.result()
        if reply is not None:
            assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
            assert b"shutting_down" in reply
            answered += 1
        s.close()
    print(
        f"SIGTERM with {len(kept)} waits parked: exit 0 in {took:.2f} s, {answered} answered"
    )
    assert took < GRACE + 5
    assert answered == len(kept)


def test_long_polls_whose_clients_have_gone_are_dropped(broker: BrokerProcess) -> None:
    w = Wire(broker.url)
    job_id = w.enqueue("unfinished")
    polls = [
        ("/v1/results", {"ids": [job_id], "wait": 120}),
        ("/v1/lease", {"queues": ["empty"], "wait": 120}),
    ]
    socks = []
    for path, body in polls * 10:
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", broker.port), timeout=30)
        s.sendall(
            b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(data), data)
        )
        socks.append(s)
    wait_for(lambda: _connections(w) == len(socks) + 1, timeout=30)
    for s in socks:
        s.close()
    # dropped, not kept until their 120 s are up
    wait_for(lambda: _connections(w) == 1, timeout=15)
    assert w.lease("empty") == []  # and nothing was leased for them meanwhile
    assert w.job(job_id)["state"] == "queued"
    w.close()


LEASE = 5.0  #: lease seconds the stalled worker holds
STALL = 8.0  #: seconds the broker is stopped: longer than the lease


def test_acks_buffered_through_a_stall_are_answered_before_leases_expire(
    broker: BrokerProcess,
) -> None:
    w = Wire(broker.url)
    w.ok("POST", "/v1/queues/stall/jobs", {"jobs": [{"args": [i]} for i in range(10)]})
    socks = []
    for _ in range(10):  # one keep-alive connection per ack, already open
        s = socket.create_connection(("127.0.0.1", broker.port), timeout=30)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_message(s) is not None
        socks.append(s)
    leased = w.lease("stall", max=10, timeout=LEASE)
    assert len(leased) == 10
    assert broker.proc is not None
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        for s, job in zip(socks, leased, strict=True):
            body = json.dumps({"lease": job["lease"], "result": "done"}).encode()
            s.sendall(
                b"POST /v1/jobs/%s/ack HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                % (job["id"].encode(), len(body), body)
            )
        time.sleep(STALL)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    statuses = []
    for s in socks:
        reply = read_message(s)
        assert reply is not None
        statuses.append(int(reply.split(b" ", 2)[1]))
        s.close()
    assert statuses == [200] * 10, statuses  # were 409: the leases had run out
    again = Wire(broker.url)
    time.sleep(1.5)  # a reaper sweep or two later
    assert again.lease("stall", max=10) == []  # nothing was requeued to run twice
    for job in leased:
        record = again.job(job["id"])
        assert (record["state"], record["attempts"]) == ("succeeded", 1)
    log = broker.log_path.read_text()
    assert "broker.stalled" in log
    again.close()
    w.close()
