"""The shell: trio sockets and h11 around the handlers in app.py.

Charter:
  Rule 1: this module reads, writes and waits; protocol.py and app.py decide.
  Rule 2: exceptions become replies in exactly one place, `_respond_error`.
  Rule 3: every task lives in a nursery; a crash of the reaper or writer ends the server.

Per connection: read a request head (h11, 16 KiB limit -> 431) within REQUEST_TIMEOUT of
its first byte; refuse a declared body over --max-body with 413 before reading it; read the
body within the same deadline; answer, closing the connection if the client has not taken
the reply within REQUEST_TIMEOUT; keep the connection for the next request, closing it
after IDLE_TIMEOUT of silence. A connection past --max-connections gets 429 and is closed.
Pipelined enqueues already buffered behind the one just read are answered as one batch
whose writes share commits (`_buffered_batch`, `_answer_batch`); anything else, in turn.

Timeouts cost no cancel scope per request: each connection enters one CancelScope once
and keeps a float deadline (the end of the current wait for request bytes, or inf while
it answers) that it moves with a plain assignment. One watchdog task for the whole server
(`Server.watch_timeouts`) cancels a connection's scope once its deadline has passed.
Entering and leaving a trio cancel scope per read, twice a request, cost about 14 us of
CPU (and a watchdog task per connection about 50 us a connection).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
import signal
import socket
import time
from collections.abc import Awaitable
from typing import Any

import h11
import structlog
import trio

from qbroker import errors, metrics, protocol
from qbroker.app import Broker
from qbroker.clock import Clock
from qbroker.config import MAX_HEADER_BYTES, Config
from qbroker.readers import ReadThreads
from qbroker.reaper import run_checkpointer, run_reaper
from qbroker.schedule_api import open_schedules
from qbroker.schedule_store import ScheduleStore
from qbroker.store import Reader, Store
from qbroker.writer import Writer

log = structlog.get_logger("qbroker.server")
READ_SIZE = 65536  #: bytes per socket read
EAGER_READS = 16  #: reads in a row that found bytes waiting before one yields anyway
PIPELINE_MAX = 64  #: pipelined enqueues answered as one batch (see `_buffered_batch`)
_SERVER_HEADER = (b"server", b"qbroker")
#: what a send or receive raises when the client has gone
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class _Conn:
    """One client connection."""

    def __init__(self, stream: trio.SocketStream, conn_id: int) -> None:
        self.stream = stream
        own = stream.socket
        #: the same fd as a plain socket, for reads and writes without trio's extra
        #: scheduler pass per call; `detach()`ed (never closed) when the connection ends
        self.sock = socket.socket(own.family, own.type, own.proto, own.fileno())
        self.sock.setblocking(False)
        self._eager = 0  #: reads in a row that found bytes waiting (see `receive`)
        self.id = conn_id
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES
        )
        self.timer = _Timer()

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
            except BlockingIOError:
                self._eager = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:  # reset, timed out: as trio's streams say it
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
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                raise trio.BrokenResourceError(str(exc)) from exc

    def peer_alive(self) -> bool:
        """False once the client has closed or reset its end. A peek, never a read:
        bytes of a pipelined next request stay where they are."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return True  # open, and nothing sent yet
        except OSError:
            return False

    async def send(self, resp: protocol.Response, *, head: bool = False) -> None:
        await self.send_bytes(self.render(resp, head=head))

    def render(self, resp: protocol.Response, *, head: bool = False) -> bytes:
        """The bytes of a reply to the request `self.h11` has read."""
        out = [self.h11.send(_response_event(resp))]
        if resp.body and not head:
            out.append(self.h11.send(h11.Data(data=resp.body)))
        out.append(self.h11.send(_END))
        return b"".join(out)


#: one EndOfMessage for every reply (h11 events are immutable)
_END = h11.EndOfMessage()
#: the go-ahead for a client that waits before sending its body (Expect: 100-continue)
_CONTINUE = h11.InformationalResponse(status_code=100, headers=[_SERVER_HEADER])
#: (status, content type, body length, close, more headers) -> the h11 Response event,
#: headers validated once: h11 skips the header checks for a Headers it made itself
_RESPONSES: dict[
    tuple[int, bytes, int, bool, tuple[tuple[bytes, bytes], ...]], h11.Response
] = {}
_MAX_RESPONSES = 4096  #: distinct reply heads cached before the cache starts over


def _response_event(resp: protocol.Response) -> h11.Response:
    key = (resp.status, resp.content_type, len(resp.body), resp.close, resp.headers)
    event = _RESPONSES.get(key)
    if event is None:
        headers = [
            (b"content-type", resp.content_type),
            (b"content-length", str(len(resp.body)).encode()),
            _SERVER_HEADER,
            *resp.headers,
        ]
        if resp.close:
            headers.append((b"connection", b"close"))
        event = h11.Response(status_code=resp.status, headers=headers)
        if len(_RESPONSES) >= _MAX_RESPONSES:
            _RESPONSES.clear()
        _RESPONSES[key] = event
    return event


class _Timer:
    """A connection's read deadline, for `Server.watch_timeouts`."""

    __slots__ = ("deadline", "done", "scope")

    def __init__(self) -> None:
        #: trio time by which the awaited request bytes must come; inf while answering
        self.deadline = math.inf
        #: the connection's loop runs in it; cancelled once `deadline` has passed
        self.scope = trio.CancelScope()
        self.done = False  #: the connection has ended: forget the timer


class Server:
    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.active_requests = 0
        self.connections = 0
        self._next_conn_id = 0
        self.idle = trio.Event()  #: set when no request is in flight during shutdown
        #: (when to look, tie-break, timer): a heap of every open connection's timer
        self._timers: list[tuple[float, int, _Timer]] = []
        self._timer_ids = itertools.count()
        #: the watchdog looks at each timer at least this often (seconds); no deadline
        #: is ever set closer than this to the moment it is set (with a timeout under
        #: the 10 ms floor, which keeps the watchdog from spinning, it may be 10 ms late)
        self._step = max(0.01, min(config.request_timeout, config.idle_timeout))

    def _watch(self, timer: _Timer, now: float) -> None:
        """Have the watchdog look at `timer` by its deadline, and within `_step`."""
        heapq.heappush(
            self._timers,
            (min(timer.deadline, now + self._step), next(self._timer_ids), timer),
        )

    async def watch_timeouts(self) -> None:
        """Cancel each connection's scope once its deadline has passed; runs forever.

        Never late, with no wake-up per deadline move: a connection only ever sets a
        deadline `now + t` with t >= `_step` (t is the request or idle timeout), and
        each timer is looked at again within `_step` of the last look, so a deadline
        set in between is never before that next look.
        """
        timers = self._timers
        while True:
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if timer.done:
                    continue
                if timer.deadline <= now:
                    timer.scope.cancel()
                else:
                    self._watch(timer, now)
            wake = now + self._step
            if timers and timers[0][0] < wake:
                wake = timers[0][0]
            await trio.sleep_until(wake)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        self._next_conn_id += 1
        conn = _Conn(stream, self._next_conn_id)
        self.connections += 1
        metrics.CONNECTIONS.inc()
        try:
            if self.connections > self.config.max_connections:
                err = errors.TooManyConnections("the broker is at its connection limit")
                with trio.move_on_after(1):
                    await conn.send(protocol.error_response(None, err))
                return
            await self._serve(conn)
        except _GONE:
            pass
        finally:
            conn.timer.done = True
            conn.sock.detach()  # the fd is the stream's to close
            self.connections -= 1
            metrics.CONNECTIONS.dec()
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _serve(self, conn: _Conn) -> None:
        """The keep-alive loop; returns when the connection should close."""
        cfg = self.config
        first = True  #: no request has begun on this connection yet
        reading = False  #: waiting for the rest of a begun request (else for its start)
        sending: tuple[str, int] | None = None  #: writing a reply: (route, status)
        timer = conn.timer
        now = trio.current_time()
        timer.deadline = now + cfg.request_timeout
        self._watch(timer, now)
        with timer.scope:
            while True:
                # Wait for the first byte of the next request (idle keep-alive), then
                # give the whole request REQUEST_TIMEOUT seconds to arrive (slowloris).
                reading = False
                if conn.h11.their_state is h11.IDLE and not conn.h11.trailing_data[0]:
                    wait = cfg.request_timeout if first else cfg.idle_timeout
                    timer.deadline = trio.current_time() + wait
                    data = await conn.receive()
                    if not data:
                        return
                    conn.h11.receive_data(data)
                first = False
                reading = True
                timer.deadline = trio.current_time() + cfg.request_timeout
                try:
                    req = await self._read_request(conn)
                except h11.RemoteProtocolError as exc:
                    err: errors.QBrokerError = (
                        errors.HeadersTooLarge("the request head is over 16 KiB")
                        if exc.error_status_hint == 431
                        else errors.BadRequest(str(exc))
                    )
                    await self._respond_error(conn, None, err)
                    return
                except errors.QBrokerError as exc:
                    await self._respond_error(conn, None, exc)
                    return
                timer.deadline = math.inf
                if timer.scope.cancel_called:
                    # the deadline passed as the last bytes came: a timeout, as if
                    # they had come a moment later (nothing of the request was done)
                    break
                if req is None:
                    return  # the client closed the connection
                req.peer_alive = conn.peer_alive
                batch = (
                    self._buffered_batch(conn.h11, req)
                    if conn.h11.trailing_data[0]
                    else None
                )
                reading = False
                try:  # in flight, for a graceful stop, until the reply is written
                    if batch is None:
                        resp = await self._dispatch(req)
                        out = conn.render(resp, head=req.method == "HEAD")
                    else:
                        out, resp = await self._answer_batch(conn, batch)
                    # a client that does not read its reply is dropped like a slow sender
                    sending = (req.route, resp.status)
                    timer.deadline = trio.current_time() + cfg.request_timeout
                    await conn.send_bytes(out)
                finally:
                    self._done(1 if batch is None else len(batch))
                sending = None
                if resp.close or conn.h11.our_state is h11.MUST_CLOSE:
                    return
                try:
                    conn.h11.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        # the watchdog cancelled the scope: a request (or its first byte) is late, or
        # the client has not taken its reply
        if sending is not None:
            log.warning("reply.undelivered", route=sending[0], status=sending[1],
                        seconds=cfg.request_timeout)  # fmt: skip
            return
        if reading:
            msg = "the request did not arrive in time"
        elif first:
            msg = "no request arrived in time"
        else:
            return  # an idle keep-alive connection: close quietly
        await self._respond_error(conn, None, errors.RequestTimeout(msg))

    def _buffered_batch(
        self, parser: h11.Connection, req: protocol.Request
    ) -> list[tuple[h11.Connection, protocol.Request]] | None:
        """`req` and the pipelined enqueues after it whose bytes are all buffered
        already, each with the h11 connection that parsed it (h11 reads a request
        only after the reply to the one before; a fresh one per request reads on).

        A request that is not whole yet, or not an enqueue, ends the batch: the
        last taken request's parser still holds its bytes, for the keep-alive loop.
        """
        try:
            protocol.route(req)
        except errors.QBrokerError:
            return None  # answered as it is
        if not _pipelinable(parser, req):
            return None
        batch = [(parser, req)]
        while len(batch) < PIPELINE_MAX:
            rest = parser.trailing_data[0]
            if not rest:
                break
            parser = h11.Connection(
                h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES
            )
            parser.receive_data(rest)
            try:
                nxt = self._whole_request(parser)
            except (h11.RemoteProtocolError, errors.QBrokerError):
                break  # answered where it is read again, after the batch
            if nxt is None or not _pipelinable(parser, nxt):
                break
            nxt.peer_alive = req.peer_alive
            batch.append((parser, nxt))
        return batch if len(batch) > 1 else None

    def _whole_request(self, parser: h11.Connection) -> protocol.Request | None:
        """The request at the start of `parser`'s buffer, routed, if all of it is
        there.

        Raises:
            as `_request_head`, `_body_size` and `protocol.route` do
        """
        event = parser.next_event()
        if type(event) is not h11.Request:
            return None
        req = self._request_head(event)
        chunks: list[bytes] = []
        size = 0
        while True:
            event = parser.next_event()
            if type(event) is h11.Data:
                size = self._body_size(size, event.data)
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                req.body = b"".join(chunks)
                protocol.route(req)
                return req
            else:
                return None

    async def _answer_batch(
        self, conn: _Conn, batch: list[tuple[h11.Connection, protocol.Request]]
    ) -> tuple[bytes, protocol.Response]:
        """The replies to pipelined enqueues, in order, all their writes submitted
        before the first is awaited, so one commit can cover them; and the last reply.

        Each write is submitted in `_begin` (see `Broker.start`), so they commit
        in the order the requests came, and every reply still follows its commit.
        """
        started = [self._begin(req) for _, req in batch]
        # no await between the begins and here, and none of the ends can be cancelled
        # out of its write: every submitted enqueue is settled before a reply is sent
        replies = [
            await self._end(req, *begun)
            for (_, req), begun in zip(batch, started, strict=True)
        ]
        out = []
        for (parser, _), resp in zip(batch, replies, strict=True):
            conn.h11 = parser
            out.append(conn.render(resp))
            if resp.close or parser.our_state is h11.MUST_CLOSE:
                break
        return b"".join(out), resp

    async def _read_request(self, conn: _Conn) -> protocol.Request | None:
        # h11 events are plain final classes: `type(e) is` spares ABCMeta.__instancecheck__
        event = await conn.next_event()
        if type(event) is h11.ConnectionClosed:
            return None
        assert type(event) is h11.Request, event
        req = self._request_head(event)
        if conn.h11.they_are_waiting_for_100_continue:
            # curl sends `Expect: 100-continue` with a body over 1 KiB and waits a
            # second for this before sending it anyway (a refused body got its 413)
            await conn.send_bytes(conn.h11.send(_CONTINUE))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await conn.next_event()
            if type(event) is h11.Data:
                size = self._body_size(size, event.data)
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                break
            elif type(event) is h11.ConnectionClosed:
                return None
        req.body = b"".join(chunks)
        return req

    def _body_size(self, size: int, data: bytes) -> int:
        """The size of a body read so far once `data` is added to its `size` bytes.

        Raises:
            errors.BodyTooLarge: over --max-body.
        """
        size += len(data)
        if size > self.config.max_body:
            raise errors.BodyTooLarge(
                f"the body is over the limit of {self.config.max_body} bytes"
            )
        return size

    def _request_head(self, event: h11.Request) -> protocol.Request:
        """A Request for an h11 request head, refused if too large (the head) or
        declared too large (the body).

        Raises:
            errors.HeadersTooLarge, errors.BodyTooLarge
        """
        # h11 only bounds a head that arrives in pieces; bound one that came whole, too
        headers: dict[bytes, bytes] = {}
        head_size = len(event.target)
        for k, v in event.headers:  # h11 gives the names lower-cased
            headers[k] = v
            head_size += len(k) + len(v) + 4
        if head_size > MAX_HEADER_BYTES:
            raise errors.HeadersTooLarge("the request head is over 16 KiB")
        req = protocol.Request.from_target(
            event.method.decode("ascii", "replace"),
            event.target.decode("ascii", "replace"),
            headers,
        )
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > self.config.max_body:
            raise errors.BodyTooLarge(
                f"the body is {int(declared)} bytes; the limit is {self.config.max_body}"
            )
        return req

    async def _dispatch(self, req: protocol.Request) -> protocol.Response:
        return await self._end(req, *self._begin(req))

    def _begin(
        self, req: protocol.Request
    ) -> tuple[float, Awaitable[protocol.Response] | protocol.Response]:
        """Start answering `req` (see `Broker.start`): its reply, or what to await
        for it (`_end`). It counts as in flight until `_done`, once its reply is
        written, so a graceful stop does not cut a reply short."""
        start = time.perf_counter()
        self.active_requests += 1
        try:
            if self.broker.closing:
                raise errors.ShuttingDown("the broker is stopping")
            self.broker.authorize(req)
            if req.route == "unmatched":  # not yet routed (a batch's requests are)
                protocol.route(req)
            return start, self.broker.start(req)
        except Exception as exc:
            return start, _error_reply(req, exc)

    async def _end(
        self,
        req: protocol.Request,
        start: float,
        work: Awaitable[protocol.Response] | protocol.Response,
    ) -> protocol.Response:
        try:
            if isinstance(work, protocol.Response):
                resp = work
            else:
                resp = await work
        except Exception as exc:
            resp = _error_reply(req, exc)
        metrics.observe_request(req.route, resp.status, time.perf_counter() - start)
        return resp

    def _done(self, n: int) -> None:
        """`n` requests begun by `_begin` are over: replied to, or given up on."""
        self.active_requests -= n
        if self.broker.closing and self.active_requests == 0:
            self.idle.set()

    async def _respond_error(
        self, conn: _Conn, req: protocol.Request | None, exc: errors.QBrokerError
    ) -> None:
        """The one place a transport-level failure becomes a reply; then the caller closes."""
        resp = protocol.error_response(req, exc)
        resp.close = True
        metrics.observe_request("unmatched", resp.status, None)
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            with trio.move_on_after(1):
                await conn.send(resp)
        except (
            h11.LocalProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ):
            pass


def _error_reply(req: protocol.Request, exc: Exception) -> protocol.Response:
    """The reply for a request whose handler raised (call from its except block)."""
    if isinstance(exc, errors.QBrokerError):
        return protocol.error_response(req, exc)
    log.exception("request.failed", route=req.route, method=req.method)
    return protocol.error_response(req, errors.InternalError("internal error"))


def _pipelinable(parser: h11.Connection, req: protocol.Request) -> bool:
    """Whether `req` (just read by `parser`) may join a batch of pipelined requests:
    a small enqueue on a connection that stays open."""
    return (
        req.route == "enqueue"
        and len(req.body) <= protocol.BIG_BODY
        and parser.their_state is h11.DONE
    )


def _raise_fd_limit() -> None:
    """Let the broker hold as many sockets as the hard limit allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _watch_writer(writer: Writer) -> None:
    """Stop the server, with an error, if the writer thread dies."""
    await writer.died.wait()
    raise errors.InternalError("the writer thread died") from writer.error


async def serve(config: Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the broker until SIGTERM/SIGINT; `task_status.started(port)` once bound.

    Raises:
        errors.InternalError: the database cannot be opened or is not a qbroker database.
        OSError: the address cannot be bound.
    """
    _raise_fd_limit()
    store = await trio.to_thread.run_sync(
        lambda: Store(
            config.db_path,
            synchronous=config.synchronous,
            max_db_bytes=config.max_db_bytes,
        )
    )
    schedule_store = await trio.to_thread.run_sync(ScheduleStore, store)
    reader = Reader(config.db_path)
    writer = Writer(store)
    writer.start()
    reads = ReadThreads()
    reads.start()
    broker = Broker(config, writer, reader, reads, Clock())
    schedules = open_schedules(broker, schedule_store, config.db_path)
    server = Server(config, broker)
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:
        await trio.to_thread.run_sync(writer.stop)
        await trio.to_thread.run_sync(reads.stop)
        raise OSError(exc.errno or errno.EADDRINUSE, f"cannot listen: {exc}") from exc
    port = listeners[0].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_reaper, broker)
            nursery.start_soon(schedules.run)
            nursery.start_soon(server.watch_timeouts)
            nursery.start_soon(run_checkpointer, broker)
            nursery.start_soon(_watch_writer, writer)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as conn_nursery:
                    accept_scope = trio.CancelScope()

                    async def accept(
                        task_status: Any = trio.TASK_STATUS_IGNORED,
                    ) -> None:
                        with accept_scope:
                            await trio.serve_listeners(
                                server.handle_connection,
                                listeners,
                                handler_nursery=conn_nursery,
                                task_status=task_status,
                            )

                    await conn_nursery.start(accept)
                    log.info("broker.listening", host=config.host, port=port,
                             db=str(config.db_path))  # fmt: skip
                    task_status.started(port)
                    async for signum in signals:
                        log.info("broker.stopping", signal=signal.Signals(signum).name)
                        break
                    # stop accepting, wake long-polls, let in-flight requests finish
                    accept_scope.cancel()
                    for listener in listeners:
                        await listener.aclose()
                    broker.closing = True
                    broker.queue_waiters.notify_all()
                    broker.job_waiters.notify_all()
                    if server.active_requests:
                        with trio.move_on_after(config.shutdown_grace):
                            await server.idle.wait()
                    conn_nursery.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(writer.stop)
            await trio.to_thread.run_sync(reads.stop)
            reader.close()
            schedules.reader.close()
        log.info("broker.stopped")
