"""The server's read timeouts without sockets: a fake stream, trio's autojumping clock.

The real-broker tests (test_bad_input, test_load_hostile) check that slow and silent
clients are cut off; these check that the one watchdog does it exactly at the deadline,
however the deadline and the watchdog's look-again interval (`_step`) line up.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio
import trio.testing
from qbroker.config import Config
from qbroker.server import Server

REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 3.0  #: shorter than REQUEST_TIMEOUT: the watchdog looks every 3 s


class FakeStream:
    """Hands out `chunks` as (time to wait, bytes); then waits forever. Records replies."""

    def __init__(self, chunks: list[tuple[float, bytes]]) -> None:
        self.chunks = chunks
        self.sent: list[tuple[float, bytes]] = []
        self.closed_at: float | None = None

    async def receive_some(self, max_bytes: int) -> bytes:
        if not self.chunks:
            await trio.sleep_forever()
        delay, data = self.chunks.pop(0)
        await trio.sleep(delay)
        return data

    async def send_all(self, data: bytes) -> None:
        self.sent.append((trio.current_time(), data))

    async def aclose(self) -> None:
        self.closed_at = trio.current_time()


async def _run(chunks: list[tuple[float, bytes]]) -> FakeStream:
    config = Config(request_timeout=REQUEST_TIMEOUT, idle_timeout=IDLE_TIMEOUT)
    broker: Any = SimpleNamespace(closing=False)  # GET of an unknown path needs no more
    server = Server(config, broker)
    stream = FakeStream(chunks)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.watch_timeouts)
        await server.handle_connection(stream)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()
    return stream


async def test_silent_client_gets_408_at_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = await _run([])
    [(at, reply)] = stream.sent
    assert reply.startswith(b"HTTP/1.1 408")
    assert at == REQUEST_TIMEOUT and stream.closed_at == REQUEST_TIMEOUT


async def test_slow_request_gets_408_request_timeout_after_its_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = await _run([(4.0, b"GET /nope HTTP/1.1\r\n")])
    [(at, reply)] = stream.sent
    assert reply.startswith(b"HTTP/1.1 408")
    assert at == 4.0 + REQUEST_TIMEOUT


async def test_idle_keep_alive_connection_closes_quietly_at_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    request = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = await _run([(1.0, request), (2.5, request)])
    assert [at for at, _ in stream.sent] == [1.0, 3.5]
    assert all(reply.startswith(b"HTTP/1.1 404") for _, reply in stream.sent)
    assert stream.closed_at == 3.5 + IDLE_TIMEOUT
