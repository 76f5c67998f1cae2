"""HTTP/1.1 pipelining: requests written back to back on one connection, before any
reply, are answered in order; pipelined enqueues share group commits."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import BrokerFactory, BrokerProcess
from tests.wirehttp import Wire


@pytest.fixture
def wire(broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(broker.url)
    yield w
    w.close()


def _post(path: str, body: object, extra: bytes = b"") -> bytes:
    data = json.dumps(body).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(data), data)
    )


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()


def _replies(sock: socket.socket, n: int) -> list[tuple[int, object]]:
    """Read `n` replies (each with a Content-Length) off `sock`: (status, JSON body)."""
    buf = b""
    out: list[tuple[int, object]] = []
    while len(out) < n:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
            if len(rest) >= length:
                out.append((int(head.split(b" ", 2)[1]), json.loads(rest[:length])))
                buf = rest[length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(out)} of {n} replies"
        buf += chunk
    assert buf == b"", "more bytes than replies"
    return out


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
        _post("/v1/queues/pipe/jobs", {"id": i, "args": [k]}) for k, i in enumerate(ids)
    ]
    # a repeated id in the middle fails alone; a read after the enqueues sees them all,
    # and an enqueue after that read is answered too
    requests.insert(30, _post("/v1/queues/pipe/jobs", {"id": "pipe-3"}))
    requests.append(_get("/v1/jobs/pipe-59"))
    requests.append(_post("/v1/queues/pipe/jobs", {"id": "pipe-last"}))
    before = _commits(broker.url)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        sock.sendall(b"".join(requests))
        replies = _replies(sock, len(requests))
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
    first = _post("/v1/queues/cut/jobs", {"id": "cut-0"})
    second = _post("/v1/queues/cut/jobs", {"id": "cut-1"})
    closing = _post(
        "/v1/queues/cut/jobs", {"id": "cut-2"}, extra=b"Connection: close\r\n"
    )
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as sock:
        sock.sendall(first + second[:40])
        assert _replies(sock, 1) == [(201, {"id": "cut-0"})]
        sock.sendall(
            second[40:] + closing + _post("/v1/queues/cut/jobs", {"id": "cut-3"})
        )
        assert _replies(sock, 2) == [(201, {"id": "cut-1"}), (201, {"id": "cut-2"})]
        assert sock.recv(65536) == b""  # closed after the request that asked for it
    assert wire.ok("GET", "/v1/queues/cut")["counts"]["queued"] == 3


def test_a_bad_request_in_a_pipeline_is_answered_after_those_before_it(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory(name="small", args=("--max-body", "200")).start()
    big = _post("/v1/queues/bad/jobs", {"id": "bad-1", "args": ["x" * 300]})
    after = _post("/v1/queues/bad/jobs", {"id": "bad-2"})
    with socket.create_connection(("127.0.0.1", b.port), timeout=10) as sock:
        sock.sendall(_post("/v1/queues/bad/jobs", {"id": "bad-0"}) + big + after)
        (first, (status, err)) = _replies(sock, 2)
        assert first == (201, {"id": "bad-0"})
        assert status == 413 and err["error"] == "body_too_large"  # type: ignore[index]
        assert sock.recv(65536) == b""  # a 413 closes: what came after is not done
    w = Wire(b.url)
    try:
        assert w.ok("GET", "/v1/queues/bad")["counts"]["queued"] == 1
    finally:
        w.close()
