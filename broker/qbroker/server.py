"""The shell: trio sockets and h11 around the handlers in app.py.

Charter:
  Rule 1: this module reads, writes and waits; protocol.py and app.py decide.
  Rule 2: exceptions become replies in exactly one place, `_respond_error`.
  Rule 3: every task lives in a nursery; a crash of the reaper or the store ends the server.

Per connection: read a request head (h11, 16 KiB limit -> 431) within REQUEST_TIMEOUT of
its first byte; refuse a declared body over --max-body with 413 before reading it; read the
body within the same deadline; answer, closing the connection if the client has not taken
the reply within REQUEST_TIMEOUT; keep the connection for the next request, closing it
after IDLE_TIMEOUT of silence. A connection past --max-connections first makes room by
closing the keep-alive connection idle the longest; with none idle it gets 429 and is
closed. An error reply that ends the connection is followed by a lingering close
(connection.py, `Connection.linger`), so a client still writing its body reads the reply instead of a reset.
A request in flight whose client has gone (a parked long-poll, mostly) is dropped by
`Server.watch_parked`.
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
import time
from collections.abc import Awaitable
from typing import Any

import h11
import structlog
import trio

from qbroker import errors, metrics, protocol, tls
from qbroker.app import Broker
from qbroker.clock import STALL_SECONDS, Clock
from qbroker.config import MAX_HEADER_BYTES, Config
from qbroker.connection import (
    CONTINUE,
    Connection,
    Timer,
    body_size,
    request_head,
    whole_request,
)
from qbroker.datadir import DataDirLock
from qbroker.reaper import run_heartbeat, run_reaper
from qbroker.store.sqlite import SQLiteStore

log = structlog.get_logger("qbroker.server")
PIPELINE_MAX = 64  #: pipelined enqueues answered as one batch (see `_buffered_batch`)
PARKED_CHECK_SECONDS = 1.0  #: how often requests in flight are checked for gone clients
REFUSED_LOG_SECONDS = 10.0  #: at most one `conn.refused` log line this often
#: what a send or receive raises when the client has gone
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


class Server:
    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.tls_context = (
            tls.server_context(config.tls_cert, config.tls_key)
            if config.tls_cert is not None and config.tls_key is not None
            else None
        )
        self.active_requests = 0
        self.connections = 0
        self._conns: dict[Connection, None] = {}  #: every open connection
        #: keep-alive connections waiting for their next request, idle longest first
        self._idle: dict[Connection, None] = {}
        self._refused = 0  #: connections refused since the last `conn.refused` line
        self._refused_logged = -math.inf  #: trio time of that line
        self._next_conn_id = 0
        self.idle = trio.Event()  #: set when no request is in flight during shutdown
        #: (when to look, tie-break, timer): a heap of every open connection's timer
        self._timers: list[tuple[float, int, Timer]] = []
        self._timer_ids = itertools.count()
        #: the watchdog looks at each timer at least this often (seconds); no deadline
        #: is ever set closer than this to the moment it is set (with a timeout under
        #: the 10 ms floor, which keeps the watchdog from spinning, it may be 10 ms late)
        self._step = max(0.01, min(config.request_timeout, config.idle_timeout))

    def _watch(self, timer: Timer, now: float) -> None:
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
        wake = trio.current_time()
        while True:
            now = trio.current_time()
            late = now - wake
            if late > STALL_SECONDS:
                # the broker stalled (clock.py): the time it read nothing does not
                # count against its clients either
                for entry in timers:
                    entry[2].deadline += late
                timers[:] = [(at + late, i, t) for at, i, t in timers]
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

    async def watch_parked(self) -> None:
        """Drop the requests whose client has gone; runs forever.

        Every PARKED_CHECK_SECONDS, a request still in flight since the last look (a
        long-poll parked for a job or a result, mostly) has its socket peeked; once
        the client has closed it, the request's connection is cancelled, which ends
        its wait and frees what it holds. A write already submitted still commits
        (the writer's waits cannot be cancelled). A peek is one syscall, for the
        requests that have waited a second or more only.
        """
        while True:
            await trio.sleep(PARKED_CHECK_SECONDS)
            for conn in self._conns:
                if (
                    conn.answering
                    and conn.answering == conn.seen
                    and not conn.dropped
                    and not conn.peer_alive()
                ):
                    conn.dropped = True
                    conn.timer.scope.cancel()
                conn.seen = conn.answering

    def _evict_idle(self) -> bool:
        """Close the keep-alive connection idle the longest, to make room for a new
        one (nginx reuses its keep-alive connections so); False if none is idle.

        Only one whose task waits on its socket with nothing unread is taken: the
        cancel then lands in that wait, never in a request it has begun to read.
        """
        for conn in self._idle:
            if conn.waiting and conn.quiet():
                del self._idle[conn]
                conn.timer.scope.cancel()
                return True
        return False

    def _log_refused(self) -> None:
        """Log refused connections, one line per REFUSED_LOG_SECONDS at most: a flood
        of them must not become a flood of log lines."""
        self._refused += 1
        now = trio.current_time()
        if now - self._refused_logged >= REFUSED_LOG_SECONDS:
            log.warning("conn.refused", reason="too_many_connections",
                        refused=self._refused, limit=self.config.max_connections)  # fmt: skip
            self._refused = 0
            self._refused_logged = now

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        self._next_conn_id += 1
        conn = Connection(stream, self._next_conn_id, self.tls_context)
        self.connections += 1
        metrics.CONNECTIONS.inc()
        try:
            if self.connections > self.config.max_connections and not (
                self._evict_idle()
            ):
                self._log_refused()
                err = errors.TooManyConnections("the broker is at its connection limit")
                with trio.move_on_after(1):
                    await conn.send(protocol.error_response(None, err))
                await conn.linger()
                return
            self._conns[conn] = None
            await self._serve(conn)
            if conn.linger_after:
                await conn.linger()
        except _GONE:
            pass
        finally:
            self._conns.pop(conn, None)
            self._idle.pop(conn, None)
            conn.timer.done = True
            # the fd is the stream's to close (a TLS connection ends without a
            # close_notify: its replies are framed by Content-Length, RFC 9112 9.8)
            if conn.tls is not None:
                conn.tls.detach()
            conn.raw.detach()
            self.connections -= 1
            metrics.CONNECTIONS.dec()
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _serve(self, conn: Connection) -> None:
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
                    if first:
                        data = await conn.receive()
                    else:
                        self._idle[conn] = None
                        try:
                            data = await conn.receive()
                        finally:
                            self._idle.pop(conn, None)
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
                conn.requests += 1
                conn.answering = conn.requests
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
                    conn.answering = 0
                    self._done(1 if batch is None else len(batch))
                sending = None
                if resp.close or conn.h11.our_state is h11.MUST_CLOSE:
                    conn.linger_after = resp.status >= 400
                    return
                try:
                    conn.h11.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        # the watchdog cancelled the scope: a request (or its first byte) is late, or
        # the client has not taken its reply; or the client has gone (`watch_parked`),
        # or the connection was idle and its slot is wanted (`_evict_idle`)
        if conn.dropped:
            log.debug("request.dropped", conn_id=conn.id, reason="client gone")
            return
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
                nxt = whole_request(parser, self.config.max_body)
            except (h11.RemoteProtocolError, errors.QBrokerError):
                break  # answered where it is read again, after the batch
            if nxt is None or not _pipelinable(parser, nxt):
                break
            nxt.peer_alive = req.peer_alive
            batch.append((parser, nxt))
        return batch if len(batch) > 1 else None

    async def _answer_batch(
        self, conn: Connection, batch: list[tuple[h11.Connection, protocol.Request]]
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

    async def _read_request(self, conn: Connection) -> protocol.Request | None:
        # h11 events are plain final classes: `type(e) is` spares ABCMeta.__instancecheck__
        event = await conn.next_event()
        if type(event) is h11.ConnectionClosed:
            return None
        assert type(event) is h11.Request, event
        req = request_head(event, self.config.max_body)
        if conn.h11.they_are_waiting_for_100_continue:
            # curl sends `Expect: 100-continue` with a body over 1 KiB and waits a
            # second for this before sending it anyway (a refused body got its 413,
            # a request without the token its 401: RFC 9110 section 10.1.1)
            self.broker.authorize(req)
            await conn.send_bytes(conn.h11.send(CONTINUE))
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await conn.next_event()
            if type(event) is h11.Data:
                size = body_size(size, event.data, self.config.max_body)
                chunks.append(event.data)
            elif type(event) is h11.EndOfMessage:
                break
            elif type(event) is h11.ConnectionClosed:
                return None
        req.body = b"".join(chunks)
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
        self, conn: Connection, req: protocol.Request | None, exc: errors.QBrokerError
    ) -> None:
        """The one place a transport-level failure becomes a reply; then the caller closes."""
        resp = protocol.error_response(req, exc)
        resp.close = True
        metrics.observe_request("unmatched", resp.status, None)
        if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        conn.linger_after = True
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


async def serve(config: Config, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Run the broker until SIGTERM/SIGINT; `task_status.started(port)` once bound.

    Raises:
        DataDirInUse: another process holds the data dir.
        errors.InternalError: the database cannot be opened or is not a qbroker database.
        OSError: the address cannot be bound.
    """
    _raise_fd_limit()
    lock = DataDirLock(config.data_dir)  # held until the broker has stopped
    try:
        await _serve_locked(config, task_status)
    finally:
        lock.release()


async def _serve_locked(config: Config, task_status: Any) -> None:
    store = await SQLiteStore.open(
        config.db_path,
        synchronous=config.synchronous,
        max_db_bytes=config.max_db_bytes,
        min_free_disk=config.min_free_disk,
    )
    broker = Broker(config, store, Clock())
    server = Server(config, broker)
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except OSError as exc:
        await store.aclose()
        raise OSError(exc.errno or errno.EADDRINUSE, f"cannot listen: {exc}") from exc
    port = listeners[0].socket.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_heartbeat, broker)
            nursery.start_soon(run_reaper, broker)
            nursery.start_soon(server.watch_timeouts)
            nursery.start_soon(server.watch_parked)
            nursery.start_soon(store.maintain)
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
        await store.aclose()
        log.info("broker.stopped")
