"""One client connection: its socket, its h11 state and read deadline, reading a
request head and body within limits, and rendering replies. Used by server.py, which
decides when to read, answer and close.
"""

from __future__ import annotations

import math
import socket
import ssl
from typing import Any

import h11
import trio

from qbroker import errors, protocol
from qbroker.config import MAX_HEADER_BYTES

READ_SIZE = 65536  #: bytes per socket read
EAGER_READS = 16  #: reads in a row that found bytes waiting before one yields anyway
LINGER_SECONDS = 2.0  #: how long a lingering close reads what the client still sends
LINGER_BYTES = 4 * 1024 * 1024  #: and how much of it, at most
SERVER_HEADER = (b"server", b"qbroker")


#: a TLS read or write that must wait for the socket (OpenSSL's WANT_READ/WANT_WRITE)
_WANT_READ = (BlockingIOError, ssl.SSLWantReadError)
_WANT_WRITE = (BlockingIOError, ssl.SSLWantWriteError)
#: a TLS peer's end of the stream, with (SSLZeroReturnError) or without close_notify
_TLS_EOF = (ssl.SSLZeroReturnError, ssl.SSLEOFError)


class Connection:
    """One client connection: plain, or TLS when given a server context."""

    def __init__(
        self,
        stream: trio.SocketStream,
        conn_id: int,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.stream = stream
        own = stream.socket
        #: the same fd as a plain socket, for reads and writes without trio's extra
        #: scheduler pass per call; `detach()`ed (never closed) when the connection ends
        self.raw = socket.socket(own.family, own.type, own.proto, own.fileno())
        self.raw.setblocking(False)
        #: what requests are read from and replies written to: `raw`, or a TLS socket
        #: on the same fd (non-blocking; OpenSSL shakes hands at the first read/write)
        self.tls: ssl.SSLSocket | None = None
        if tls_context is not None:
            dup = socket.socket(own.family, own.type, own.proto, own.fileno())
            dup.setblocking(False)
            self.tls = tls_context.wrap_socket(
                dup, server_side=True, do_handshake_on_connect=False
            )
        self.sock: socket.socket = self.raw if self.tls is None else self.tls
        self._eager = 0  #: reads in a row that found bytes waiting (see `receive`)
        self.id = conn_id
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES
        )
        self.timer = Timer()
        self.waiting = False  #: blocked until the socket is readable
        self.linger_after = False  #: an error reply ends it: close lingering
        #: the number of the request being answered (0: none); `server.Server.watch_parked`
        #: drops the request if its client has gone
        self.answering = 0
        self.requests = 0  #: requests begun on this connection
        self.seen = 0  #: `answering` at the watcher's last look
        self.dropped = False  #: its client went while a request was in flight

    async def next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.receive())
                continue
            return event

    async def receive(self) -> bytes:
        """The next bytes from the client (b"" once it has closed its end).

        trio's `receive_some` yields to the scheduler after a read that did not have
        to wait, as `send_all` does after a write: a loop pass per request, one of
        four for a small enqueue. Here only a read that must wait yields, plus one
        read in EAGER_READS in a row that did not, so a client pipelining requests
        that need no other thread cannot keep the others from their turn.
        Cancellation (the timeout watchdog) lands at those waits.
        """
        while True:
            try:
                data = self.sock.recv(READ_SIZE)
            except _WANT_READ:
                self._eager = 0
                self.waiting = True
                try:
                    await trio.lowlevel.wait_readable(self.raw)
                finally:
                    self.waiting = False
                continue
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.raw)
                continue
            except _TLS_EOF:
                return b""
            except OSError as exc:  # reset, timed out, TLS refused: as trio says it
                raise trio.BrokenResourceError(str(exc)) from exc
            self._eager += 1
            if self._eager >= EAGER_READS:
                self._eager = 0
                await trio.lowlevel.checkpoint()
            return data

    async def send_bytes(self, data: bytes) -> None:
        """Write all of `data`, waiting only while the socket's buffer is full."""
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except _WANT_WRITE:
                await trio.lowlevel.wait_writable(self.raw)
            except ssl.SSLWantReadError:  # a TLS handshake not yet done
                await trio.lowlevel.wait_readable(self.raw)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    def peer_alive(self) -> bool:
        """False once the client has closed or reset its end. A peek, never a read:
        bytes of a pipelined next request stay where they are. Over TLS, a client
        that closes with a close_notify alert looks alive until its socket closes."""
        try:
            return bool(self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return True  # open, and nothing sent yet
        except OSError:
            return False

    def quiet(self) -> bool:
        """True while the client has sent nothing unread (and not closed): a peek."""
        if self.tls is not None and self.tls.pending():
            return False  # decrypted bytes wait in the TLS layer
        try:
            self.raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    async def linger(self) -> None:
        """Close as nginx's lingering close does: end our side, then read and discard
        what the client still sends, for LINGER_SECONDS and LINGER_BYTES at most.
        Closing with unread bytes makes the kernel send a reset, which reaches a
        client still writing a body (urllib, requests: no `Expect: 100-continue`)
        before it can read the error reply that was sent. Not when the request was
        read whole and nothing follows it: then the slot is freed at once."""
        if (
            self.h11.their_state in (h11.DONE, h11.MUST_CLOSE)
            and not self.h11.trailing_data[0]
            and self.quiet()
        ):
            return
        try:
            self.raw.shutdown(socket.SHUT_WR)
        except OSError:
            return
        left = LINGER_BYTES  # of raw bytes: TLS records are discarded unread
        with trio.move_on_after(LINGER_SECONDS):
            while left > 0:
                try:
                    data = self.raw.recv(min(READ_SIZE, left))
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.raw)
                    continue
                except OSError:
                    return
                if not data:
                    return
                left -= len(data)

    async def send(self, resp: protocol.Response, *, head: bool = False) -> None:
        await self.send_bytes(self.render(resp, head=head))

    def render(self, resp: protocol.Response, *, head: bool = False) -> bytes:
        """The bytes of a reply to the request `self.h11` has read."""
        out = [self.h11.send(response_event(resp))]
        if resp.body and not head:
            out.append(self.h11.send(h11.Data(data=resp.body)))
        out.append(self.h11.send(END))
        return b"".join(out)


#: one EndOfMessage for every reply (h11 events are immutable)
END = h11.EndOfMessage()
#: the go-ahead for a client that waits before sending its body (Expect: 100-continue)
CONTINUE = h11.InformationalResponse(status_code=100, headers=[SERVER_HEADER])
#: (status, content type, body length, close, more headers) -> the h11 Response event,
#: headers validated once: h11 skips the header checks for a Headers it made itself
_RESPONSES: dict[
    tuple[int, bytes, int, bool, tuple[tuple[bytes, bytes], ...]], h11.Response
] = {}
_MAX_RESPONSES = 4096  #: distinct reply heads cached before the cache starts over


def response_event(resp: protocol.Response) -> h11.Response:
    key = (resp.status, resp.content_type, len(resp.body), resp.close, resp.headers)
    event = _RESPONSES.get(key)
    if event is None:
        headers = [
            (b"content-type", resp.content_type),
            (b"content-length", str(len(resp.body)).encode()),
            SERVER_HEADER,
            *resp.headers,
        ]
        if resp.close:
            headers.append((b"connection", b"close"))
        event = h11.Response(status_code=resp.status, headers=headers)
        if len(_RESPONSES) >= _MAX_RESPONSES:
            _RESPONSES.clear()
        _RESPONSES[key] = event
    return event


class Timer:
    """A connection's read deadline, for `server.Server.watch_timeouts`."""

    __slots__ = ("deadline", "done", "scope")

    def __init__(self) -> None:
        #: trio time by which the awaited request bytes must come; inf while answering
        self.deadline = math.inf
        #: the connection's loop runs in it; cancelled once `deadline` has passed
        self.scope = trio.CancelScope()
        self.done = False  #: the connection has ended: forget the timer


def body_size(size: int, data: bytes, max_body: int) -> int:
    """The size of a body read so far once `data` is added to its `size` bytes.

    Raises:
        errors.BodyTooLarge: over --max-body.
    """
    size += len(data)
    if size > max_body:
        raise errors.BodyTooLarge(f"the body is over the limit of {max_body} bytes")
    return size


def request_head(event: h11.Request, max_body: int) -> protocol.Request:
    """A Request for an h11 request head, refused if too large (the head) or
    declared too large (the body).

    Raises:
        errors.HeadersTooLarge, errors.BodyTooLarge
        errors.BadRequest: a head that could be read two ways (see below).
    """
    # h11 only bounds a head that arrives in pieces; bound one that came whole, too
    headers: dict[bytes, bytes] = {}
    head_size = len(event.target)
    auths = 0
    for k, v in event.headers:  # h11 gives the names lower-cased
        if k == b"authorization":
            auths += 1
        headers[k] = v
        head_size += len(k) + len(v) + 4
    if head_size > MAX_HEADER_BYTES:
        raise errors.HeadersTooLarge("the request head is over 16 KiB")
    if b"transfer-encoding" in headers and b"content-length" in headers:
        # RFC 9112 section 6.1: h11 reads such a body by its chunks, a proxy in
        # front may read it by its length; a request hidden in the difference is
        # smuggled past the proxy. An error, and the connection must close.
        raise errors.BadRequest(
            "a request may not have both Content-Length and Transfer-Encoding"
        )
    if auths > 1:  # which one a proxy checked is anyone's guess
        raise errors.BadRequest("a request may have one Authorization header")
    req = protocol.Request.from_target(
        event.method.decode("ascii", "replace"),
        event.target.decode("ascii", "replace"),
        headers,
    )
    declared = headers.get(b"content-length")
    if declared is not None and int(declared) > max_body:
        raise errors.BodyTooLarge(
            f"the body is {int(declared)} bytes; the limit is {max_body}"
        )
    return req


def whole_request(parser: h11.Connection, max_body: int) -> protocol.Request | None:
    """The request at the start of `parser`'s buffer, routed, if all of it is
    there.

    Raises:
        as `request_head`, `body_size` and `protocol.route` do
    """
    event = parser.next_event()
    if type(event) is not h11.Request:
        return None
    req = request_head(event, max_body)
    chunks: list[bytes] = []
    size = 0
    while True:
        event = parser.next_event()
        if type(event) is h11.Data:
            size = body_size(size, event.data, max_body)
            chunks.append(event.data)
        elif type(event) is h11.EndOfMessage:
            req.body = b"".join(chunks)
            protocol.route(req)
            return req
        else:
            return None
