"""A tiny raw HTTP helper for tests that are about the wire itself (no qclient)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec


class Wire:
    """One keep-alive connection to a broker; JSON in, (status, decoded body) out."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def close(self) -> None:
        self.conn.close()

    def raw(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:  # fmt: skip
        for attempt in range(2):
            try:
                self.conn.request(method, path, body, headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
                return resp.status, data, {k.lower(): v for k, v in resp.getheaders()}
            except (ConnectionError, http.client.RemoteDisconnected):
                self.conn.close()
                self.conn = http.client.HTTPConnection(
                    self.host, self.port, timeout=self.timeout
                )
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        status, raw, headers = self.raw(method, path, data, hdrs)
        if headers.get("content-type", "").startswith("application/msgpack"):
            return status, msgspec.msgpack.decode(raw)
        return status, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = self.call(method, path, body)
        assert 200 <= status < 300, (status, reply)
        return reply

    # shorthands
    def enqueue(self, queue: str, **job: Any) -> str:
        return str(self.ok("POST", f"/v1/queues/{queue}/jobs", job)["id"])

    def lease(self, *queues: str, **kw: Any) -> list[dict[str, Any]]:
        return list(
            self.ok("POST", "/v1/lease", {"queues": list(queues), **kw})["jobs"]
        )

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.ok("GET", f"/v1/jobs/{job_id}"))


def wait_for(
    cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02
) -> Any:
    """Poll `cond` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


# raw requests and replies, for tests that write bytes on a socket themselves


def post_request(path: str, body: object, extra: bytes = b"") -> bytes:
    """The bytes of a POST of `body` as JSON (`extra`: more header lines)."""
    data = json.dumps(body).encode()
    return (
        b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"%sContent-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(data), data)
    )


def get_request(path: str) -> bytes:
    """The bytes of a GET."""
    return b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()


def read_replies(sock: socket.socket, n: int) -> list[tuple[int, object]]:
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


def read_message(sock: socket.socket) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body (or none); None at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body
