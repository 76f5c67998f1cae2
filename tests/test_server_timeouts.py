"""The server's read timeouts on a local socket pair, with trio's autojumping clock.

The real-broker tests (test_bad_input, test_load_hostile) check that slow and silent
clients are cut off; these check that the one watchdog does it exactly at the deadline,
however the deadline and the watchdog's look-again interval (`_step`) line up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
from qbroker.config import Config
from qbroker.server import Server

REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 3.0  #: shorter than REQUEST_TIMEOUT: the watchdog looks every 3 s


@dataclass
class Client:
    """What the client end saw: (trio time, bytes) per read, and when the server closed."""

    sent: list[tuple[float, bytes]] = field(default_factory=list)
    closed_at: float | None = None
    closed: trio.Event = field(default_factory=trio.Event)


async def _run(chunks: list[tuple[float, bytes]]) -> Client:
    """Serve one connection whose client writes `chunks` as (time to wait, bytes), then
    says nothing; returns once the server has closed it."""
    config = Config(request_timeout=REQUEST_TIMEOUT, idle_timeout=IDLE_TIMEOUT)
    # a GET of an unknown path needs no more of a broker (it has no token)
    broker: Any = SimpleNamespace(closing=False, authorize=lambda req: None)
    server = Server(config, broker)
    ours, theirs = trio.socket.socketpair()
    client = Client()

    async def talk() -> None:
        for delay, data in chunks:
            await trio.sleep(delay)
            await ours.send(data)

    async def listen() -> None:
        while data := await ours.recv(65536):
            client.sent.append((trio.current_time(), data))
        client.closed_at = trio.current_time()
        client.closed.set()

    with ours:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.watch_timeouts)
            nursery.start_soon(talk)
            nursery.start_soon(listen)
            await server.handle_connection(trio.SocketStream(theirs))
            with trio.fail_after(1):  # the server's close reaches the client at once
                await client.closed.wait()
            nursery.cancel_scope.cancel()
    return client


async def test_silent_client_gets_408_at_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = await _run([])
    [(at, reply)] = client.sent
    assert reply.startswith(b"HTTP/1.1 408")
    assert at == REQUEST_TIMEOUT and client.closed_at == REQUEST_TIMEOUT


async def test_slow_request_gets_408_request_timeout_after_its_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = await _run([(4.0, b"GET /nope HTTP/1.1\r\n")])
    [(at, reply)] = client.sent
    assert reply.startswith(b"HTTP/1.1 408")
    assert at == 4.0 + REQUEST_TIMEOUT


async def test_idle_keep_alive_connection_closes_quietly_at_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    client = await _run([(1.0, request), (2.5, request)])
    assert [at for at, _ in client.sent] == [1.0, 3.5]
    assert all(reply.startswith(b"HTTP/1.1 404") for _, reply in client.sent)
    assert client.closed_at == 3.5 + IDLE_TIMEOUT
