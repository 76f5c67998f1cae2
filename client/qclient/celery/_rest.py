"""A small blocking caller of the broker endpoints qclient.Client has no method for:
the key-value store (`/v1/kv/*`) and a queue purge, for the Celery integration.

msgpack on the wire; one keep-alive connection per thread (and per process: a forked
prefork child opens its own); connection errors and 408/429/503 are retried with
backoff for up to `retry_for` seconds, then raise ProtocolError.
"""

from __future__ import annotations

import http.client
import os
import random
import select
import threading
import time
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import msgspec

from qclient import BrokerError, ProtocolError
from qclient._errors import broker_error
from qclient.wire import ErrorBody

T = TypeVar("T")

TIMEOUT = 30.0  #: seconds for connect, and for a reply beyond a long-poll's wait
RETRY_FOR = 10.0  #: seconds of retries after connection trouble before giving up
_RETRY_STATUSES = frozenset({408, 429, 503})
_encode = msgspec.msgpack.Encoder().encode
_decode_error = msgspec.msgpack.Decoder(ErrorBody).decode
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


class Rest:
    """Thread-safe; usable across fork."""

    def __init__(
        self, url: str, token: str | None = None, *, retry_for: float = RETRY_FOR
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the broker URL must be http://host:port, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 7733
        self.retry_for = retry_for
        self._headers = {
            "Content-Type": "application/msgpack",
            "Accept": "application/msgpack",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []  #: every thread's, for close()
        self._pid = os.getpid()

    def _conn(self) -> http.client.HTTPConnection:
        local = self._local
        pid = os.getpid()
        if self._pid != pid:  # a forked child: never share the parent's sockets
            with self._lock:
                self._pid, self._all = pid, []
        if getattr(local, "pid", None) != pid:
            local.conn, local.pid = None, pid
        if local.conn is not None and _closed(local.conn):
            self._drop()  # the broker closed it while it sat idle
        if local.conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            with self._lock:
                self._all.append(conn)
            local.conn = conn
        current: http.client.HTTPConnection = local.conn
        return current

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
        self._local.conn = None

    def post(
        self,
        path: str,
        request: Any,
        reply: type[T],
        wait: float = 0.0,
        *,
        resend: bool = True,
    ) -> T:
        """POST `request` to `path` and decode the reply as `reply`.

        With `resend` False (a write that is not safe to apply twice), only a refused
        connection is retried: after any other error the request may have been applied.

        Raises:
            BrokerError: the broker answered with an error (its subclass by reason).
            ProtocolError: the broker could not be reached for `retry_for` seconds.
        """
        body = _encode(request)
        give_up = time.monotonic() + self.retry_for
        attempt = 0
        while True:
            error: BaseException | None = None
            try:
                conn = self._conn()
                conn.timeout = TIMEOUT + wait
                if conn.sock is not None:
                    conn.sock.settimeout(TIMEOUT + wait)
                conn.request("POST", path, body, self._headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if not resend and not isinstance(exc, ConnectionRefusedError):
                    raise ProtocolError(
                        f"POST {path} to {self.host}:{self.port} failed, maybe"
                        f" after it was applied: {exc!r}"
                    ) from exc
                error = exc
            else:
                if resp.will_close:
                    self._drop()
                if 200 <= status < 300:
                    dec = _decoders.get(reply)
                    if dec is None:
                        dec = _decoders[reply] = msgspec.msgpack.Decoder(reply)
                    result: T = dec.decode(data)
                    return result
                if status not in _RETRY_STATUSES:
                    raise _error(status, data)
                error = _error(status, data)
            pause = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random() / 2)
            if time.monotonic() + pause > give_up:
                if isinstance(error, BrokerError):
                    raise error
                raise ProtocolError(
                    f"POST {path} to {self.host}:{self.port} failed: {error!r}"
                ) from error
            time.sleep(pause)
            attempt += 1

    def close(self) -> None:
        """Close every thread's connection; only when no call is in flight."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:  # a forked child's copies: closes only its own fds
            conn.close()


def _closed(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle keep-alive socket has something to read: its EOF, surely."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _error(status: int, data: bytes) -> BrokerError:
    try:
        body = _decode_error(data)
    except msgspec.DecodeError:
        return BrokerError(status, "unknown", data[:200].decode(errors="replace"))
    return broker_error(status, body.error, body.message, body.field)


def queue_path(queue: str) -> str:
    return quote(queue, safe="")
