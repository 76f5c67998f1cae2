"""A lean HTTP/1.1 client for benchmarks: raw sockets, pre-built request bytes.

The load generator shares two cores with the broker, so every microsecond spent here is
taken from the thing being measured. Hence no http library: requests are built once as
bytes (keep-alive, Content-Length, msgpack body), and a reply is parsed just enough to
find its status and its Content-Length body. No chunked replies: qbroker always answers
with Content-Length, one reply per request, in order (so `run_pipelined` can count them).

Three ways to drive many connections (all run the same `Session` state machines):

- `run_blocking`: one connection in the calling thread.
- `run_threads`:  one thread per connection (blocking sockets; the GIL is released in
  send/recv).
- `run_epoll`:    one thread, all connections, an epoll loop over blocking sockets
  (a socket epoll reports readable never blocks in recv; sendall on loopback of a
  request the broker reads whole does not block for long).
- `run_pipelined`: one connection, one fixed request, `depth` of them in flight at once
  (HTTP/1.1 pipelining: each written before the replies to those before it have come).
- `run_procs`:    P forked processes, each running `run_epoll` (or `run_threads`) over
  its share of the connections.

Every driver returns a `RunStats` with the first-send and last-reply monotonic times
(CLOCK_MONOTONIC is system-wide on Linux, so they compare across processes) and the
client CPU seconds it used.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import resource
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

__all__ = [
    "Conn",
    "RunStats",
    "Session",
    "request_bytes",
    "run_blocking",
    "run_epoll",
    "run_pipelined",
    "run_procs",
    "run_threads",
]

MSGPACK = b"application/msgpack"
RECV_SIZE = 262144

encode = msgspec.msgpack.Encoder().encode


def request_bytes(
    method: str,
    path: str,
    body: Any = None,
    *,
    host: str = "127.0.0.1",
    raw: bool = False,
) -> bytes:
    """One complete HTTP/1.1 request (head + msgpack body) as bytes.

    `body` is encoded with msgpack unless `raw` (then it must already be bytes).
    """
    if body is None:
        payload = b""
    elif raw:
        payload = body
    else:
        payload = encode(body)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/msgpack\r\n"
    ).encode()
    if method != "GET" or payload:
        head += b"Content-Type: application/msgpack\r\nContent-Length: %d\r\n" % len(
            payload
        )
    return head + b"\r\n" + payload


def parse_reply(buf: bytes) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) when `buf` holds a whole reply, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        length = 0
    else:
        j = head.find(b"\r\n", i + 17)
        length = int(head[i + 17 : j if j >= 0 else len(head)])
    start = end + 4
    if len(buf) < start + length:
        return None
    return int(buf[9:12]), buf[start : start + length], start + length


class Conn:
    """One keep-alive connection with blocking request/reply."""

    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.sock = socket.create_connection(self.addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def roundtrip(self, req: bytes) -> tuple[int, bytes]:
        sock = self.sock
        sock.sendall(req)
        buf = sock.recv(RECV_SIZE)
        while True:
            if not buf:
                raise ConnectionError("the broker closed the connection")
            got = parse_reply(buf)
            if got is not None:
                return got[0], got[1]
            more = sock.recv(RECV_SIZE)
            if not more:
                raise ConnectionError("the broker closed the connection mid-reply")
            buf += more

    def close(self) -> None:
        self.sock.close()


class Session:
    """A per-connection state machine: the driver sends what `start`/`feed` return.

    Subclasses set `jobs` (jobs done, counted by the subclass) and may set `error`.
    Return None from `start`/`feed` to end the session.
    """

    def __init__(self) -> None:
        self.jobs = 0
        self.requests = 0
        self.error: str | None = None

    def start(self) -> bytes | None:
        raise NotImplementedError

    def feed(self, status: int, body: bytes) -> bytes | None:
        raise NotImplementedError

    def fail(self, status: int, body: bytes) -> None:
        self.error = f"HTTP {status}: {body[:200]!r}"


@dataclasses.dataclass
class RunStats:
    jobs: int = 0
    requests: int = 0
    t_first: float = float("inf")
    t_last: float = float("-inf")
    cpu: float = 0.0  #: client CPU seconds (user + system)
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return max(0.0, self.t_last - self.t_first)

    def merge(self, other: RunStats) -> None:
        self.jobs += other.jobs
        self.requests += other.requests
        self.t_first = min(self.t_first, other.t_first)
        self.t_last = max(self.t_last, other.t_last)
        self.cpu += other.cpu
        self.errors += other.errors


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _collect(sessions: Sequence[Session], t_first: float, t_last: float) -> RunStats:
    st = RunStats(t_first=t_first, t_last=t_last)
    for s in sessions:
        st.jobs += s.jobs
        st.requests += s.requests
        if s.error:
            st.errors.append(s.error)
    return st


def run_blocking(addr: tuple[str, int], session: Session) -> RunStats:
    conn = Conn(*addr)
    cpu0 = _cpu_self()
    t_first = time.monotonic()
    try:
        req = session.start()
        while req is not None:
            status, body = conn.roundtrip(req)
            session.requests += 1
            req = session.feed(status, body)
    except OSError as exc:
        session.error = f"{type(exc).__name__}: {exc}"
    t_last = time.monotonic()
    conn.close()
    st = _collect([session], t_first, t_last)
    st.cpu = _cpu_self() - cpu0
    return st


def run_threads(addr: tuple[str, int], sessions: Sequence[Session]) -> RunStats:
    """One thread per session. CPU is the whole process's (the threads are all ours)."""
    conns = [Conn(*addr) for _ in sessions]
    go = threading.Event()
    ends: list[float] = []

    def loop(conn: Conn, session: Session) -> None:
        go.wait()
        try:
            req = session.start()
            while req is not None:
                status, body = conn.roundtrip(req)
                session.requests += 1
                req = session.feed(status, body)
        except OSError as exc:
            session.error = f"{type(exc).__name__}: {exc}"
        ends.append(time.monotonic())

    threads = [
        threading.Thread(target=loop, args=(c, s), daemon=True)
        for c, s in zip(conns, sessions, strict=True)
    ]
    for t in threads:
        t.start()
    cpu0 = _cpu_self()
    t_first = time.monotonic()
    go.set()
    for t in threads:
        t.join()
    cpu = _cpu_self() - cpu0
    for c in conns:
        c.close()
    st = _collect(sessions, t_first, max(ends))
    st.cpu = cpu
    return st


def run_epoll(addr: tuple[str, int], sessions: Sequence[Session]) -> RunStats:
    """All sessions in this thread, multiplexed with epoll."""
    conns = [Conn(*addr) for _ in sessions]
    ep = select.epoll()
    by_fd: dict[int, tuple[socket.socket, Session]] = {}
    bufs: dict[int, bytes] = {}
    cpu0 = _cpu_self()
    t_first = time.monotonic()
    for c, s in zip(conns, sessions, strict=True):
        req = s.start()
        if req is None:
            continue
        fd = c.sock.fileno()
        by_fd[fd] = (c.sock, s)
        bufs[fd] = b""
        ep.register(fd, select.EPOLLIN)
        c.sock.sendall(req)
    parse = parse_reply
    try:
        while by_fd:
            for fd, _ev in ep.poll():
                sock, s = by_fd[fd]
                try:
                    data = sock.recv(RECV_SIZE)
                except OSError as exc:
                    data = b""
                    s.error = f"{type(exc).__name__}: {exc}"
                if not data:
                    s.error = s.error or "the broker closed the connection"
                    ep.unregister(fd)
                    del by_fd[fd]
                    continue
                buf = bufs[fd] + data if bufs[fd] else data
                got = parse(buf)
                if got is None:
                    bufs[fd] = buf
                    continue
                bufs[fd] = b""
                s.requests += 1
                req = s.feed(got[0], got[1])
                if req is None:
                    ep.unregister(fd)
                    del by_fd[fd]
                else:
                    sock.sendall(req)
    finally:
        t_last = time.monotonic()
        ep.close()
        for c in conns:
            c.close()
    st = _collect(sessions, t_first, t_last)
    st.cpu = _cpu_self() - cpu0
    return st


def run_pipelined(
    addr: tuple[str, int],
    req: bytes,
    *,
    expect: int,
    per: int,
    depth: int,
    seconds: float,
) -> RunStats:
    """Send `req` over one connection for `seconds`, keeping `depth` in flight: `depth`
    at first, then as many as replies came, in one write; then take the replies still
    due. Each reply with status `expect` counts `per` jobs."""
    conn = Conn(*addr)
    sock = conn.sock
    st = RunStats()
    cpu0 = _cpu_self()
    st.t_first = time.monotonic()
    deadline = st.t_first + seconds
    sock.sendall(req * depth)
    in_flight = depth
    buf = b""
    try:
        while in_flight:
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("the broker closed the connection")
            buf = buf + data if buf else data
            got = 0
            while (reply := parse_reply(buf)) is not None:
                status, body, used = reply
                buf = buf[used:]
                got += 1
                if status == expect:
                    st.jobs += per
                elif not st.errors:
                    st.errors.append(f"HTTP {status}: {body[:200]!r}")
            st.requests += got
            in_flight -= got
            if got and time.monotonic() < deadline:
                sock.sendall(req * got)
                in_flight += got
    except OSError as exc:
        st.errors.append(f"{type(exc).__name__}: {exc}")
    st.t_last = time.monotonic()
    conn.close()
    st.cpu = _cpu_self() - cpu0
    return st


def _child(
    addr: tuple[str, int],
    make: Callable[[int], Session],
    indexes: Sequence[int],
    inner: str,
    go: Any,
    pipe: Any,
) -> None:
    try:
        sessions = [make(i) for i in indexes]
        go.wait()
        runner = run_epoll if inner == "epoll" else run_threads
        st = runner(addr, sessions)
        pipe.send(dataclasses.asdict(st))
    except BaseException as exc:  # report, never hang the parent
        pipe.send({"errors": [f"child: {type(exc).__name__}: {exc}"]})
    finally:
        pipe.close()
        os._exit(0)


def run_procs(
    addr: tuple[str, int],
    make: Callable[[int], Session],
    n_sessions: int,
    *,
    procs: int = 2,
    inner: str = "epoll",
) -> RunStats:
    """Fork `procs` processes; session i is `make(i)`, built in its child (fork start)."""
    ctx = multiprocessing.get_context("fork")
    go = ctx.Event()
    children = []
    for p in range(procs):
        idx = list(range(p, n_sessions, procs))
        if not idx:
            continue
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child, args=(addr, make, idx, inner, go, send), daemon=True
        )
        proc.start()
        send.close()
        children.append((proc, recv))
    time.sleep(0.05)  # let the children connect before the start signal
    go.set()
    total = RunStats()
    for proc, recv in children:
        try:
            d = recv.recv()
        except EOFError:
            d = {"errors": ["child died without a report"]}
        proc.join()
        part = RunStats(**d) if "jobs" in d else RunStats(errors=d["errors"])
        total.merge(part)
    return total
