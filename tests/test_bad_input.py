"""Bad input gets a clear error, changes nothing, and never holds other clients up."""

from __future__ import annotations

import socket
import time
from typing import Any

import msgspec
import pytest

from tests.conftest import BrokerFactory, BrokerProcess
from tests.wirehttp import Wire

REQUEST_TIMEOUT = 1.5  #: the broker's --request-timeout in these tests


@pytest.fixture
def strict_broker(broker_factory: BrokerFactory) -> BrokerProcess:
    return broker_factory(
        name="strict",
        args=("--max-body", "4096", "--request-timeout", str(REQUEST_TIMEOUT),
              "--idle-timeout", "3"),
    ).start()  # fmt: skip


def _sock(b: BrokerProcess) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
    return s


def _read_reply(s: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(body) >= int(
                    line.split(b":")[1]
                ):
                    return data


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_bad_input_gets_clear_errors_and_keeps_stored_jobs(
    strict_broker: BrokerProcess,
) -> None:
    w = Wire(strict_broker.url)
    kept = [w.enqueue("keep", args=[i], id=f"keep-{i}") for i in range(20)]
    [leased] = w.lease("keep")
    cases: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
        ("POST", "/v1/queues/q/jobs", b'{"args": [1', {}, 400, "malformed_body"),
        ("POST", "/v1/queues/q/jobs", b"\xc1\xff", {"Content-Type": "application/msgpack"},
         400, "malformed_body"),
        ("POST", "/v1/queues/q/jobs", b'{"priority": "high"}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'{"priority": 10000000}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'{"timeout": -1}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'{"id": "bad id!"}', {}, 422, "invalid_field"),
        # a name may not end in a newline (a regex `$` alone would let one through)
        ("POST", "/v1/queues/q/jobs", b'{"id": "nl\\n"}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'{"task": "t\\n"}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'{"dedup_key": "k\\n"}', {}, 422,
         "invalid_field"),
        ("POST", "/v1/lease", b'{"queues": ["q\\n"]}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'[1, 2]', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b'{"jobs": []}', {}, 422, "invalid_field"),
        ("POST", "/v1/queues/q/jobs", b"<xml/>", {"Content-Type": "text/xml"}, 415,
         "unsupported_media_type"),
        ("POST", "/v1/lease", b'{"queues": []}', {}, 422, "invalid_field"),
        ("POST", "/v1/lease", b'{"queues": ["q"], "max": 0}', {}, 422, "invalid_field"),
        ("POST", "/v1/jobs/keep-1/ack", b'{}', {}, 422, "invalid_field"),
        ("GET", "/v1/jobs/keep-1/result?wait=abc", b"", {}, 422, "invalid_field"),
        ("GET", "/v1/jobs/keep-1/result?wait=9999", b"", {}, 422, "invalid_field"),
        ("GET", "/v1/jobs/keep-1/result?wait=1_0", b"", {}, 422, "invalid_field"),
        ("GET", "/v1/nothing", b"", {}, 404, "not_found"),
        ("GET", "/v1/queues/q/jobs", b"", {}, 405, "method_not_allowed"),
        ("PUT", "/v1/jobs/keep-1", b"", {}, 405, "method_not_allowed"),
        ("DELETE", "/v1/jobs/keep-1", b"", {}, 409, "invalid_state"),  # queued
        ("POST", "/v1/queues/q/jobs", b'{"args": "' + b"x" * 5000 + b'"}', {}, 413,
         "body_too_large"),
        ("POST", "/v1/queues/q/jobs", b"{\"args\": " + b"[" * 2000 + b"]" * 2000 + b"}", {},
         400, "malformed_body"),
        # a string that is not UTF-8, in JSON and in msgpack
        ("POST", "/v1/queues/q/jobs", b'{"task": "\xff"}', {}, 400, "malformed_body"),
        ("POST", "/v1/queues/q/jobs", b"\x81\xa4task\xa1\xff",
         {"Content-Type": "application/msgpack"}, 400, "malformed_body"),
        ("POST", "/v1/jobs/keep-1/ack", b'{"lease": "\xff"}', {}, 400, "malformed_body"),
    ]  # fmt: skip
    for method, path, body, headers, want_status, want_reason in cases:
        status, raw, got_headers = w.raw(method, path, body or None, headers)
        assert status == want_status, (path, body[:40], status, raw[:200])
        if got_headers["content-type"] == "application/msgpack":
            reply = msgspec.msgpack.decode(raw)
        else:
            reply = msgspec.json.decode(raw)
        assert reply["error"] == want_reason, (path, reply)
        assert reply["message"]
        if want_reason == "invalid_field" and body[:1] == b"{" and b"jobs" not in body:
            assert reply["field"], reply
    # nothing stored by any of it, everything before intact
    assert w.ok("GET", "/v1/queues/q")["counts"]["queued"] == 0
    stats = w.ok("GET", "/v1/queues/keep")["counts"]
    assert stats["queued"] == 19 and stats["active"] == 1
    assert [w.job(i)["args"] for i in kept] == [[i] for i in range(20)]
    w.ok("POST", f"/v1/jobs/{leased['id']}/ack", {"lease": leased["lease"]})
    w.close()


def test_an_invalid_field_is_named_where_it_is(strict_broker: BrokerProcess) -> None:
    w = Wire(strict_broker.url)
    big = 10**30  # JSON carries it; msgpack, and so the store, cannot
    cases: list[tuple[dict[str, Any], str]] = [
        ({"jobs": [{"id": "r-1"}, {"id": "r-2"}, {"id": "r-1"}]}, "jobs[2].id"),
        ({"jobs": [{"dedup_key": "k"}, {"dedup_key": "k"}]}, "jobs[1].dedup_key"),
        ({"args": [big]}, "args"),
        ({"kwargs": {"n": big}}, "kwargs"),
        ({"headers": {"n": big}}, "headers"),
    ]
    for body, field in cases:
        status, raw, _ = w.raw(
            "POST", "/v1/queues/named/jobs", msgspec.json.encode(body)
        )
        reply = msgspec.json.decode(raw)
        assert (status, reply["error"], reply["field"]) == (422, "invalid_field", field)
    assert w.ok("GET", "/v1/queues/named")["counts"]["queued"] == 0
    assert w.raw("GET", "/v1/jobs/r-1")[0] == 404
    # in a batch ack, an unstorable result fails its own item only
    w.enqueue("named", id="a-1")
    w.enqueue("named", id="a-2")
    leased = {j["id"]: j["lease"] for j in w.lease("named", max=2)}
    acks = [{"id": "a-1", "lease": leased["a-1"], "result": big},
            {"id": "a-2", "lease": leased["a-2"], "result": 2}]  # fmt: skip
    results = w.ok("POST", "/v1/ack", {"acks": acks})["results"]
    assert results == [
        {"id": "a-1", "ok": False, "error": "invalid_field"},
        {"id": "a-2", "ok": True, "error": None},
    ]
    assert [w.job(i)["state"] for i in ("a-1", "a-2")] == ["active", "succeeded"]
    w.close()


def test_a_wrong_method_gets_405_naming_the_allowed_ones(
    strict_broker: BrokerProcess,
) -> None:
    w = Wire(strict_broker.url)
    for method, path, allow in [
        ("GET", "/v1/queues/q/jobs", "POST"),
        ("PUT", "/v1/jobs/j1", "DELETE, GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/v1/lease", "POST"),
    ]:
        status, raw, headers = w.raw(method, path)
        assert status == 405, (method, path, raw)
        assert headers["allow"] == allow, (method, path, headers)
        assert msgspec.json.decode(raw)["error"] == "method_not_allowed"
    assert w.ok("GET", "/healthz")["status"] == "ok"  # the connection carries on
    w.close()


def test_oversized_declared_body_is_refused_before_it_is_read(
    strict_broker: BrokerProcess,
) -> None:
    s = _sock(strict_broker)
    s.sendall(
        b"POST /v1/queues/q/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{"
    )
    start = time.monotonic()
    reply = _read_reply(s)
    assert _status(reply) == 413 and b"body_too_large" in reply
    assert time.monotonic() - start < REQUEST_TIMEOUT  # did not wait for the body
    s.close()


def test_oversized_headers_get_431(strict_broker: BrokerProcess) -> None:
    s = _sock(strict_broker)
    s.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    )
    reply = _read_reply(s)
    assert _status(reply) == 431
    s.close()


def test_garbage_request_line_gets_400(strict_broker: BrokerProcess) -> None:
    s = _sock(strict_broker)
    s.sendall(b"\x00\x01\x02 nonsense\r\n\r\n")
    assert _status(_read_reply(s)) == 400
    s.close()


def test_slow_and_silent_clients_are_timed_out_without_holding_others(
    strict_broker: BrokerProcess,
) -> None:
    silent = [_sock(strict_broker) for _ in range(20)]
    slow = _sock(strict_broker)
    slow.sendall(b"POST /v1/queues/q/jobs HTTP/1.1\r\nHost: x\r\n")
    w = Wire(strict_broker.url)
    start = time.monotonic()
    # a normal client is served at once while the others dawdle
    for _ in range(20):
        w.enqueue("normal")
    assert time.monotonic() - start < 2.0
    # the slowloris sender: a byte at a time, never finishing within the deadline
    reply = b""
    slow.settimeout(0.2)
    deadline = time.monotonic() + REQUEST_TIMEOUT + 5
    while time.monotonic() < deadline:
        try:
            slow.sendall(b"X")
            chunk = slow.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        reply += chunk
        if b"\r\n\r\n" in reply:
            break
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    # the silent connections were answered 408 and closed, too
    for s in silent:
        s.settimeout(REQUEST_TIMEOUT + 5)
        data = _read_reply(s)
        assert data == b"" or _status(data) == 408
        s.close()
    slow.close()
    assert w.ok("GET", "/v1/queues/normal")["counts"]["queued"] == 20
    w.close()


def test_a_client_that_does_not_read_its_replies_is_dropped(
    strict_broker: BrokerProcess,
) -> None:
    n = 300  # replies of 30+ KiB each: far more than the socket buffers hold
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", strict_broker.port))
    s.sendall(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * n)
    w = Wire(strict_broker.url)
    time.sleep(REQUEST_TIMEOUT * 2 + 1)  # the broker waits on the send meanwhile
    assert w.ok("GET", "/healthz")["status"] == "ok"  # others are served
    s.settimeout(10)
    data = b""
    while chunk := s.recv(65536):  # the broker closes it, short of n replies
        data += chunk
    assert 0 < data.count(b"HTTP/1.1 200 ") < n
    s.close()
    w.close()


def test_connection_limit_refuses_with_429(broker_factory: BrokerFactory) -> None:
    b = broker_factory(name="limited", args=("--max-connections", "5")).start()
    held = [_sock(b) for _ in range(5)]
    extra = _sock(b)
    reply = _read_reply(extra)
    assert _status(reply) == 429 and b"too_many_connections" in reply
    for s in [*held, extra]:
        s.close()
    w: Any = None
    # once they are gone, new clients are served again
    for _ in range(50):
        try:
            w = Wire(b.url)
            if w.call("GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    assert w is not None and w.call("GET", "/healthz")[0] == 200
    w.close()
