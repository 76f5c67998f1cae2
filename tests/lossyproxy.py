"""Network trouble for client tests: a TCP proxy in front of a real broker that can
lose one request or one reply, and an address whose connects hang.

`swallow(n)`: the next n requests are read and dropped (never reach the broker), and
their connection closed, as when the broker closes an idle connection just as a
request goes out. `lose_replies(n)`: the next n requests reach the broker, which
applies them, and their replies are dropped with the connection, as when a network
blip cuts the reply. Either way the client sees its connection end without a reply.
One request per connection at a time, as qclient sends them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from .wirehttp import read_message


class LossyProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._swallow = 0
        self._lose = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def swallow(self, n: int = 1) -> None:
        with self._lock:
            self._swallow += n

    def lose_replies(self, n: int = 1) -> None:
        with self._lock:
            self._lose += n

    def _take(self, which: str) -> bool:
        with self._lock:
            left = getattr(self, which)
            if left:
                setattr(self, which, left - 1)
            return bool(left)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        with client, upstream:
            while True:
                request = read_message(client)
                if request is None or self._take("_swallow"):
                    return
                upstream.sendall(request)
                reply = read_message(upstream)
                if reply is None or self._take("_lose"):
                    return
                client.sendall(reply)

    def close(self) -> None:
        self.listener.close()


def unanswered_address() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose backlog is full, so a new connect hangs (no SYN-ACK): a
    broker too busy to accept. Returns it and the connections that fill it."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filling = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(listener.getsockname())
        filling.append(s)
    time.sleep(0.2)
    return listener, filling
