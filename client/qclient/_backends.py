"""Event-loop adapters for `AsyncClient`: trio and asyncio behind one small interface.

A backend opens a TCP stream, runs one request/reply exchange under a deadline,
and sleeps; a stream moves bytes. Everything else (h11, retries, decoding) is the
loop-agnostic code in `_http`, `_retry` and `_ops`. `current_backend()` asks sniffio which
loop runs the calling task. Neither trio nor asyncio is imported before the first
async call, so `import qclient` stays light.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any, Protocol, cast

from qclient._http import (
    RECV_SIZE,
    TRANSPORT_ERRORS,
    ConnectionLost,
    HTTPConnection,
    Response,
    readable_now,
)

if TYPE_CHECKING:
    import asyncio
    import ssl

__all__ = ["Backend", "Stream", "current_backend"]


class Stream(Protocol):
    """A connected byte stream (one per pooled connection)."""

    async def send_all(self, data: bytes) -> None: ...
    async def receive_some(self) -> bytes: ...
    def idle_dead(self) -> bool: ...
    def abort(self) -> None: ...
    async def aclose(self) -> None: ...


class Backend(Protocol):
    """One event loop's way to connect, exchange, and sleep."""

    name: str

    def owner(self) -> object: ...
    async def connect(
        self, host: str, port: int, limit: float, tls: ssl.SSLContext | None
    ) -> Stream: ...
    async def exchange(
        self, stream: Stream, http: HTTPConnection, data: bytes, limit: float
    ) -> Response: ...
    async def sleep(self, seconds: float) -> None: ...


async def _exchange(stream: Stream, http: HTTPConnection, data: bytes) -> Response:
    try:
        await stream.send_all(data)
    except (OSError, ConnectionLost) as exc:
        # An early reply (413 before the body was read) beats the reset; see _sync.
        try:
            response = await _read_response(stream, http)
        except TRANSPORT_ERRORS:
            raise exc from None
        http.reusable = False  # part of the request never left
        return response
    return await _read_response(stream, http)


async def _read_response(stream: Stream, http: HTTPConnection) -> Response:
    while (response := http.next_response()) is None:
        http.receive(await stream.receive_some())
    return response


def _trio_errors() -> tuple[type[Exception], ...]:
    """trio's "connection reset" and "used after close" errors."""
    trio: Any = importlib.import_module("trio")
    return (trio.BrokenResourceError, trio.ClosedResourceError)


class _TrioStream:
    __slots__ = ("_socket", "_stream")

    def __init__(self, stream: Any) -> None:
        #: a trio.SocketStream (TCP_NODELAY is trio's default), or an SSLStream on one
        self._stream = stream
        self._socket = getattr(stream, "transport_stream", stream).socket

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except _trio_errors() as exc:
            raise ConnectionLost(str(exc)) from exc

    async def receive_some(self) -> bytes:
        try:
            data: bytes = await self._stream.receive_some(RECV_SIZE)
        except _trio_errors() as exc:
            raise ConnectionLost(str(exc)) from exc
        return data

    def idle_dead(self) -> bool:
        return readable_now(self._socket.fileno())

    def abort(self) -> None:
        sock = self._socket
        try:
            sock.close()
        except RuntimeError:
            # outside the trio run that opened it (the client is now used from
            # asyncio): trio cannot be told, and no task of that run waits on it
            os.close(sock.detach())

    async def aclose(self) -> None:
        await self._stream.aclose()


class _TrioBackend:
    name = "trio"

    def __init__(self) -> None:
        # importlib keeps trio (no py.typed in 0.22) out of mypy's and import's way.
        self._trio: Any = importlib.import_module("trio")

    def owner(self) -> object:
        return self._trio.lowlevel.current_trio_token()

    async def connect(
        self, host: str, port: int, limit: float, tls: ssl.SSLContext | None
    ) -> Stream:
        trio = self._trio
        try:
            with trio.fail_after(limit):
                stream = await trio.open_tcp_stream(host, port)
                if tls is None:
                    return _TrioStream(stream)
                # https_compatible: the broker ends without a close_notify (its
                # replies are framed by Content-Length, RFC 9112 section 9.8)
                ssl_stream = trio.SSLStream(
                    stream, tls, server_hostname=host, https_compatible=True
                )
                try:  # now, so a certificate refused is a failed connect
                    await ssl_stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    stream.socket.close()
                    cause = exc.__cause__
                    raise (
                        cause if isinstance(cause, OSError) else OSError(str(exc))
                    ) from None
                return _TrioStream(ssl_stream)
        except trio.TooSlowError:
            raise TimeoutError(f"connect to {host}:{port} timed out") from None

    async def exchange(
        self, stream: Stream, http: HTTPConnection, data: bytes, limit: float
    ) -> Response:
        trio = self._trio
        try:
            with trio.fail_after(limit):
                return await _exchange(stream, http, data)
        except trio.TooSlowError:
            raise TimeoutError from None

    async def sleep(self, seconds: float) -> None:
        await self._trio.sleep(seconds)


class _AsyncioStream:
    """A bare asyncio Protocol with the stream methods `_exchange` needs.

    Not asyncio's StreamReader: its read() raises a connection reset even when the
    reply that came before the reset (an early 413) is buffered, and it costs more.
    Transports only call the protocol methods, so no asyncio base class is needed.
    """

    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_loop",
        "_lost",
        "_paused",
        "_transport",
        "_waiter",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []
        self._eof = False  #: no more bytes will come
        self._lost = False  #: connection_lost() ran: the socket is closed
        self._error: Exception | None = None
        self._paused = False  #: the transport's write buffer is over its high mark
        self._waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol callbacks (TCP_NODELAY is asyncio's default for TCP)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        self._error = exc
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # ---- the Stream methods

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def send_all(self, data: bytes) -> None:
        if self._eof or self._transport is None:
            raise self._error or ConnectionLost("the broker closed the connection")
        self._transport.write(data)
        while self._paused and not self._eof:
            await self._wait()
        if self._lost:
            raise self._error or ConnectionLost("the broker closed the connection")

    async def receive_some(self) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._error is not None:
                    raise self._error
                return b""
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def idle_dead(self) -> bool:
        return self._eof or bool(self._chunks)

    def abort(self) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        if not self._loop.is_closed():
            transport.abort()
            return
        # Its event loop has ended (the client is now used under another): the close
        # a transport schedules on its loop would never run, so run it here. asyncio
        # has no public call for this; without one the socket waits for the collector.
        close_now = getattr(transport, "_call_connection_lost", None)
        if close_now is not None:
            close_now(None)

    async def aclose(self) -> None:
        if self._transport is not None and not self._lost:
            self._transport.close()
            while not self._lost:
                await self._wait()


class _AsyncioBackend:
    name = "asyncio"

    def __init__(self) -> None:
        import asyncio  # lazily: `import qclient` must stay light

        self._asyncio = asyncio

    def owner(self) -> object:
        return self._asyncio.get_running_loop()

    async def connect(
        self, host: str, port: int, limit: float, tls: ssl.SSLContext | None
    ) -> Stream:
        loop = self._asyncio.get_running_loop()
        stream = _AsyncioStream(loop)
        async with self._asyncio.timeout(limit):
            # A duck-typed protocol: see _AsyncioStream's docstring.
            protocol = cast("asyncio.Protocol", stream)
            await loop.create_connection(lambda: protocol, host, port, ssl=tls)
        return stream

    async def exchange(
        self, stream: Stream, http: HTTPConnection, data: bytes, limit: float
    ) -> Response:
        async with self._asyncio.timeout(limit):
            return await _exchange(stream, http, data)

    async def sleep(self, seconds: float) -> None:
        await self._asyncio.sleep(seconds)


_backends: dict[str, Backend] = {}  #: one instance per loop library


def current_backend() -> Backend:
    """The backend of the event loop running this task (via sniffio, trio's helper)."""
    try:
        import sniffio  # lazily: only async callers need it

        name = sniffio.current_async_library()
    except ImportError:  # no trio installed, so no sniffio either: asyncio it is
        name = "asyncio"
    except Exception as exc:  # sniffio.AsyncLibraryNotFoundError
        raise RuntimeError("AsyncClient needs a running trio or asyncio loop") from exc
    backend = _backends.get(name)
    if backend is None:
        if name == "trio":
            backend = _TrioBackend()
        elif name == "asyncio":
            backend = _AsyncioBackend()
        else:
            raise RuntimeError(f"AsyncClient supports trio and asyncio, not {name}")
        _backends[name] = backend
    return backend
