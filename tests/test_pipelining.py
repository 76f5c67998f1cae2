"""HTTP/1.1 pipelining: requests written back to back on one connection, before any
reply, are answered in order; pipelined enqueues share group commits."""

from __future__ import annotations

import json
import random
import re
import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import BrokerFactory, BrokerProcess
from tests.wirehttp import Wire, get_request, post_request, read_replies


@pytest.fixture
def wire(broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(broker.url)
    yield w
    w.close()


def _commits(url: str) -> float:
    """Group commits so far: the count of `qbroker_commit_batch_size` from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    found = re.search(r"^qbroker_commit_batch_size_count (\S+)", text, re.M)
    assert found is not None
    return float(found[1])


def test_pipelined_enqueues_are_answered_in_order_and_share_commits(
    broker: BrokerProcess, wire: Wire
) -> None:
    n = 60
    ids = [f"pipe-{i}" for i in range(n)]
    requests = [
        post_request("/v1/queues/pipe/jobs", {"id": i, "args": [k]})
        for k, i in enumerate(ids)
    ]
    # a repeated id in the middle fails alone; a read after the enqueues sees them all,
    # and an enqueue after that read is answered too
    requests.insert(30, post_request("/v1/queues/pipe/jobs", {"id": "pipe-3"}))
    requests.append(get_request("/v1/jobs/pipe-59"))
    requests.append(post_request("/v1/queues/pipe/jobs", {"id": "pipe-last"}))
    before = _commits(broker.url)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        replies = read_replies(sock, len(requests))
    commits = _commits(broker.url) - before

    enqueued = replies[:30] + replies[31 : n + 1]
    assert enqueued == [(201, {"id": i}) for i in ids]
    status, err = replies[30]
    assert status == 409 and err["error"] == "duplicate_id"  # type: ignore[index]
    status, record = replies[n + 1]
    assert status == 200 and record["id"] == "pipe-59"  # type: ignore[index]
    assert record["state"] == "queued"  # type: ignore[index]
    assert replies[n + 2] == (201, {"id": "pipe-last"})
    # 62 enqueue requests: without pipelined batches, 62 commits
    assert commits < n / 2, commits

    # committed in the order they came: FIFO holds across the batch
    jobs = wire.ok("POST", "/v1/lease", {"queues": ["pipe"], "max": 100})["jobs"]
    assert [j["id"] for j in jobs] == [*ids, "pipe-last"]
    assert [j["args"] for j in jobs[:n]] == [[k] for k in range(n)]


def test_a_pipelined_request_cut_short_is_read_when_the_rest_comes(
    broker: BrokerProcess, wire: Wire
) -> None:
    first = post_request("/v1/queues/cut/jobs", {"id": "cut-0"})
    second = post_request("/v1/queues/cut/jobs", {"id": "cut-1"})
    closing = post_request(
        "/v1/queues/cut/jobs", {"id": "cut-2"}, extra=b"Connection: close\r\n"
    )
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        sock.sendall(first + second[:40])
        assert read_replies(sock, 1) == [(201, {"id": "cut-0"})]
        sock.sendall(
            second[40:] + closing + post_request("/v1/queues/cut/jobs", {"id": "cut-3"})
        )
        assert read_replies(sock, 2) == [(201, {"id": "cut-1"}), (201, {"id": "cut-2"})]
        assert sock.recv(65536) == b""  # closed after the request that asked for it
    assert wire.ok("GET", "/v1/queues/cut")["counts"]["queued"] == 3


def test_a_bad_request_in_a_pipeline_is_answered_after_those_before_it(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory(name="small", args=("--max-body", "200")).start()
    big = post_request("/v1/queues/bad/jobs", {"id": "bad-1", "args": ["x" * 300]})
    after = post_request("/v1/queues/bad/jobs", {"id": "bad-2"})
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
        sock.sendall(post_request("/v1/queues/bad/jobs", {"id": "bad-0"}) + big + after)
        (first, (status, err)) = read_replies(sock, 2)
        assert first == (201, {"id": "bad-0"})
        assert status == 413 and err["error"] == "body_too_large"  # type: ignore[index]
        assert sock.recv(65536) == b""  # a 413 closes: what came after is not done
    w = Wire(b.url)
    try:
        assert w.ok("GET", "/v1/queues/bad")["counts"]["queued"] == 1
    finally:
        w.close()


def _chunked_post(path: str, body: object) -> bytes:
    data = json.dumps(body).encode()
    half = len(data) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (data[:half], data[half:]))
    return (
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (path.encode(), chunks)
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_pipeline_cut_anywhere_gets_every_reply_in_order(
    broker: BrokerProcess, wire: Wire, seed: int
) -> None:
    # Enqueues (plain, chunked, repeated ids, malformed, invalid) with reads between,
    # written in random pieces: every reply comes, in order, and the queue holds the
    # jobs that got 201 in the order they were sent.
    rnd = random.Random(seed)
    queue = f"cut-{seed}"
    path = f"/v1/queues/{queue}/jobs"
    requests: list[bytes] = []
    expect: list[tuple[int, str | None]] = []  # status, and the id of a 201
    stored: list[str] = []
    for i in range(80):
        kind = rnd.choice(
            ["plain"] * 6 + ["chunked", "repeat", "malformed", "invalid", "read"]
        )
        job_id = f"{queue}-{i}"
        if kind == "repeat" and stored:
            requests.append(post_request(path, {"id": rnd.choice(stored)}))
            expect.append((409, None))
        elif kind == "malformed":
            requests.append(post_request(path, "x")[:-3] + b'{"i')
            expect.append((400, None))
        elif kind == "invalid":
            requests.append(post_request(path, {"id": job_id, "priority": "high"}))
            expect.append((422, None))
        elif kind == "read":
            requests.append(get_request(f"/v1/queues/{queue}"))
            expect.append((200, None))
        else:
            make = _chunked_post if kind == "chunked" else post_request
            requests.append(make(path, {"id": job_id}))
            expect.append((201, job_id))
            stored.append(job_id)
    stream = b"".join(requests)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        at = 0
        while at < len(stream):
            step = rnd.choice([1, 7, 60, 300, 2000, 9000])
            sock.sendall(stream[at : at + step])
            at += step
            if rnd.random() < 0.2:
                time.sleep(0.002)
        replies = read_replies(sock, len(requests))
    assert [status for status, _ in replies] == [status for status, _ in expect]
    for (_, body), (_, stored_id) in zip(replies, expect, strict=True):
        if stored_id is not None:
            assert body == {"id": stored_id}
    jobs = wire.ok("POST", "/v1/lease", {"queues": [queue], "max": 100})["jobs"]
    assert [j["id"] for j in jobs] == stored
