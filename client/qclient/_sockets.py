"""The blocking client's connections: plain sockets in a keep-alive pool.

Each attempt takes an idle socket from the pool (or connects), writes the request
`_http.HTTPConnection` built, reads until a whole reply is parsed, and puts the socket
back if keep-alive allows. A socket serves one attempt at a time, so one pool (one
`Client`) can be shared by any number of threads; after a fork the child drops the
inherited sockets and opens its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import TYPE_CHECKING

import h11

from qclient._http import (
    MAX_IDLE_CONNECTIONS,
    RECV_SIZE,
    TRANSPORT_ERRORS,
    HTTPConnection,
    Response,
    readable_now,
)
from qclient._retry import Failure, Retry

if TYPE_CHECKING:
    import ssl

__all__ = ["Conn", "SocketPool"]


class Conn:
    """One pooled socket and its h11 state."""

    __slots__ = ("http", "reused", "sock", "timeout")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.http = HTTPConnection()
        self.timeout = timeout  #: the socket's current timeout, to skip needless calls
        self.reused = False  #: it served a request before this one

    def close(self) -> None:
        with contextlib.suppress(OSError):  # close() of a dead socket
            self.sock.close()

    def exchange(self, head: h11.Request, body: bytes, timeout: float) -> Response:
        """Write one request and read its whole reply.

        Raises:
            TimeoutError: no reply within `timeout`.
            OSError, ConnectionLost, h11.ProtocolError: the connection failed.
        """
        http = self.http
        data = http.request(head, body)
        sock = self.sock
        if self.timeout != timeout:
            sock.settimeout(timeout)
            self.timeout = timeout
        try:
            sock.sendall(data)
        except OSError as exc:
            # The broker may refuse a body early (413 before reading it) and close;
            # its reply is then the answer, not the reset our write ran into.
            try:
                response = self._read()
            except (*TRANSPORT_ERRORS, TimeoutError):
                raise exc from None
            http.reusable = False  # part of the request never left
            return response
        return self._read()

    def _read(self) -> Response:
        http = self.http
        while (response := http.next_response()) is None:
            http.receive(self.sock.recv(RECV_SIZE))
        return response


class SocketPool:
    """Keep-alive sockets to one address. Thread-safe.

    Args:
        address: (host, port).
        timeout: the socket timeout a new connection starts with.
        tls: for https, the context that wraps (and verifies) each new socket.
    """

    def __init__(
        self,
        address: tuple[str, int],
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.tls = tls
        self.idle: list[Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    def attempt(self, retry: Retry) -> Response | Failure:
        """Try `retry`'s request once, on an idle socket or a new one."""
        try:
            conn = self._checkout(retry.connect_timeout(time.monotonic()))
        except OSError as exc:  # refused, unreachable, connect timeout: nothing sent
            return Failure(exc)
        try:
            response = conn.exchange(retry.head, retry.body, retry.reply_timeout)
        except BaseException as exc:
            conn.close()  # interrupted mid-request: the socket's state is unknown
            if not isinstance(exc, TRANSPORT_ERRORS):
                raise
            if not isinstance(exc, TimeoutError):
                self._drop_idle()
            return Failure(
                exc, sent=True, stale=conn.reused and not conn.http.got_bytes
            )
        self._checkin(conn)
        return response

    def close(self) -> None:
        """Close the idle sockets; later attempts raise RuntimeError. Attempts in
        flight in other threads finish, and close their sockets after."""
        with self._lock:
            self._closed = True
        self._drop_idle()

    def _checkout(self, connect_timeout: float) -> Conn:
        if self._pid != os.getpid():
            self._after_fork()
        lock = self._lock
        while True:
            with lock:
                if self._closed:
                    raise RuntimeError("this qclient.Client is closed")
                if not self.idle:
                    break
                conn = self.idle.pop()
            if readable_now(conn.sock.fileno()):
                conn.close()  # the broker closed it while it sat idle
                continue
            conn.reused = True
            return conn
        sock = socket.create_connection(self.address, timeout=connect_timeout)
        with contextlib.suppress(OSError):  # not a TCP socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:  # the handshake, within the connect timeout; verifies the certificate
                sock = self.tls.wrap_socket(sock, server_hostname=self.address[0])
            except BaseException:
                sock.close()
                raise
        return Conn(sock, self.timeout)

    def _after_fork(self) -> None:
        # A forked child shares the parent's sockets: two processes reading one
        # socket would steal each other's replies. Forget them (closing our copy of
        # the fd leaves the parent's open) and the lock another thread may hold.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def _checkin(self, conn: Conn) -> None:
        if conn.http.reusable:
            with self._lock:
                if not self._closed and len(self.idle) < MAX_IDLE_CONNECTIONS:
                    self.idle.append(conn)
                    return
        conn.close()

    def _drop_idle(self) -> None:
        # One dead socket usually means the broker restarted: all idle ones are dead.
        with self._lock:
            idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
