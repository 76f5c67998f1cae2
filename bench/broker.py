"""qbroker broker benchmark (issue 2): durable enqueue, batches, lease+ack, depth.

Every scenario starts its own `python -m qbroker serve` on 127.0.0.1 (port 0, a fresh temp
data dir, the broker's defaults: synchronous=FULL), drives it with the lean raw-socket
client of `_rawhttp.py` (pre-built HTTP/1.1 keep-alive requests, msgpack bodies), then
stops it by PID (SIGTERM, wait, SIGKILL). The raw SQLite group-commit limit is measured in
the same run, on the same filesystem, so the broker's figures come with a ratio to what
SQLite itself can do there.

Scenarios (`--scenarios`, comma-separated; default all):

  sqlite    raw SQLite, WAL + synchronous=FULL, a job-shaped table: (a) one row per
            commit (commits/s), (b) 100 rows per commit (rows/s)
  client    which multi-connection client leaves the broker most headroom: 8 connections
            of GET /v1/nope (404 from the router: CPU-bound, no fsync) with each driver
            (threads, epoll, procs = 2 x epoll, procs-threads = 2 x threads); the fastest
            drives every multi-connection row (skipped when --client names one)
  enqueue   durable enqueue, one job per request, 1 and 8 connections, each reply
            awaited before the next request; then 1 connection with 32 requests in
            flight (HTTP/1.1 pipelining). First, with the same client and request, the
            ceiling for one connection in turn: a bare trio+h11 server (class Bare)
            without disk, and committing one row per request inline (no threads)
  batch     enqueue in batches of 100, 1 and 4 connections
  leaseack  lease max=100 + batch ack of 100 until empty, 1 and 4 connections; then
            the same with each batch's acks carried on the next lease (qworker's form)
  depth     single lease(max=1)+ack latency and broker RSS at queue depth 10k, 100k, 1M
            (one broker per depth, probed in turns so fsync drift hits all depths alike)
  control   the lease path with job control in use against the same without it (issue
            25): one broker with 100 limits (two of them apply to the leased jobs, not
            binding: queue:bench concurrency 10^6, task:send_email 10^6/s with a burst
            of 1,000, as a batch of starts at one instant needs) and 1,000 jobs
            in a paused queue the lease names first; one broker with neither. Both
            pre-filled alike, probed in turns as 'depth' is: lease(max=1)+ack latency,
            then lease 100 carrying 100 acks (qworker's form) for the same N on each

Not in the default run (name it in --scenarios):

  tls       durable enqueue, one job per request on 1 connection, plain HTTP and HTTPS
            (`--tls-cert/--tls-key`, a throwaway CA made with trustme), alternating
            plain and TLS windows (TLS_ROUNDS each, one broker apiece) so drift hits both
            alike; the median rates and their ratio (target: TLS >= 70% of plain)

With 'sqlite' selected, every broker row is also compared with the raw limit measured
just before and after it (fsync latency on a shared VM drifts several-fold in minutes).

Usage:

  python bench/broker.py                      # full run (~2-3 min on 2 cores)
  python bench/broker.py --quick              # small N, depth up to 100k (~40 s)
  python bench/broker.py --scenarios sqlite,enqueue --json out.json
  python bench/broker.py --max-depth 100000 --client epoll
  python bench/broker.py --scenarios control --quick   # job control's cost (~1 min)
  python bench/broker.py --scenarios tls      # plain vs TLS enqueue (~35 s)

Targets (issue 2): single enqueue >= 4,000 jobs/s on 1 connection; batch enqueue
>= 50,000 jobs/s; lease+ack in batches >= 30,000 jobs/s; lease latency and RSS at 1M
deep within 1.25x of 10k deep. Issue 25: the lease path with 100 limits and 1,000
paused-queue jobs within 10% of its cost without them (scenario control).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _rawhttp as rh  # noqa: E402
import e2e  # noqa: E402  (the Broker subprocess wrapper)

QUEUE = "bench"
KWARGS = {"to": "user@example.com", "subject": "hello", "n": 42}
JOB = {"task": "send_email", "kwargs": KWARGS}
PIPELINE_DEPTH = 32  #: requests in flight on the pipelined enqueue row
PIPELINED = f"enqueue 1/request, {PIPELINE_DEPTH} pipelined"
CEILING = "bare trio+h11 (ceiling)"  #: rows of the Bare servers
CLIENT_MODES = ("threads", "epoll", "procs", "procs-threads")
TARGETS = {
    "enqueue-1": 4000.0,
    "batch": 50000.0,
    "leaseack": 30000.0,
    "depth_ratio": 1.25,
    "control_ratio": 1.10,
    "tls_ratio": 0.70,  #: TLS enqueue rate / plain, one connection (issue 27)
}
TLS_ROUNDS = 5  #: alternating plain and TLS windows of the 'tls' scenario (the rate is fsync-bound
#: and drifts on a shared VM; the broker's CPU per job is the steadier figure)


# ------------------------------------------------------------------ the broker process

Broker = e2e.Broker  # one `qbroker serve` subprocess on a fresh temp data dir


def broker(root: Path, name: str) -> contextlib.AbstractContextManager[Broker]:
    return e2e.running_broker(name, root)


@contextlib.contextmanager
def profiled(b: Broker, out_dir: Path | None, name: str) -> Iterator[None]:
    """Optionally run `py-spy record -f raw -t` on the broker during the block."""
    if out_dir is None:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.txt"
    spy = subprocess.Popen(
        ["py-spy", "record", "-p", str(b.pid), "-f", "raw", "-t", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


# ------------------------------------------------------------------ sessions


class Repeat(rh.Session):
    """Send the same request over and over, for `seconds` or `count` requests."""

    def __init__(
        self,
        req: bytes,
        per: int,
        expect: int,
        *,
        seconds: float | None = None,
        count: int | None = None,
    ) -> None:
        super().__init__()
        self.req = req
        self.per = per
        self.expect = expect
        self.seconds = seconds
        self.count = count
        self.deadline = float("inf")
        self.left = 0

    def start(self) -> bytes | None:
        if self.seconds is not None:
            self.deadline = time.monotonic() + self.seconds
        if self.count is not None:
            if self.count <= 0:
                return None
            self.left = self.count
        return self.req

    def feed(self, status: int, body: bytes) -> bytes | None:
        if status != self.expect:
            self.fail(status, body)
            return None
        self.jobs += self.per
        if self.count is not None:
            self.left -= 1
            if self.left <= 0:
                return None
        if self.seconds is not None and time.monotonic() >= self.deadline:
            return None
        return self.req


class _Ok(msgspec.Struct):
    ok: bool


class _Ack(msgspec.Struct):
    id: str
    lease: str
    result: None = None


class _Leased(msgspec.Struct):
    jobs: list[_Ack]
    results: list[_Ok] = []


class _AckMany(msgspec.Struct):
    acks: list[_Ack]


class _LeaseCarrying(msgspec.Struct):
    queues: list[str]
    max: int
    worker: str
    acks: list[_Ack]


class _BatchReply(msgspec.Struct):
    results: list[_Ok]


_decode_leased = msgspec.msgpack.Decoder(_Leased).decode
_decode_batch = msgspec.msgpack.Decoder(_BatchReply).decode


class LeaseAck(rh.Session):
    """lease max=N, then ack all of them in one batch; stop at the first empty lease."""

    def __init__(self, queue: str, max_jobs: int) -> None:
        super().__init__()
        self.lease_req = rh.request_bytes(
            "POST", "/v1/lease", {"queues": [queue], "max": max_jobs, "worker": "bench"}
        )
        self.ack_head = (
            b"POST /v1/ack HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/msgpack\r\n"
            b"Content-Type: application/msgpack\r\nContent-Length: %d\r\n\r\n"
        )
        self.leasing = True

    def start(self) -> bytes | None:
        self.leasing = True
        return self.lease_req

    def feed(self, status: int, body: bytes) -> bytes | None:
        if status != 200:
            self.fail(status, body)
            return None
        if self.leasing:
            jobs = _decode_leased(body).jobs
            if not jobs:
                return None
            self.leasing = False
            payload = rh.encode(_AckMany(acks=jobs))
            return self.ack_head % len(payload) + payload
        self.jobs += sum(r.ok for r in _decode_batch(body).results)
        self.leasing = True
        return self.lease_req


class LeaseCarryingAcks(rh.Session):
    """What qworker sends: lease max=N carrying the acks of the jobs the previous lease
    brought, one request (and one commit) per batch; stop once a lease brings nothing."""

    def __init__(self, queue: str, max_jobs: int) -> None:
        super().__init__()
        self.queue = queue
        self.max_jobs = max_jobs

    def request(self, acks: list[_Ack]) -> bytes:
        body = _LeaseCarrying([self.queue], self.max_jobs, "bench", acks)
        return rh.request_bytes("POST", "/v1/lease", body)

    def start(self) -> bytes | None:
        return self.request([])

    def feed(self, status: int, body: bytes) -> bytes | None:
        if status != 200:
            self.fail(status, body)
            return None
        reply = _decode_leased(body)
        self.jobs += sum(r.ok for r in reply.results)  # a shortfall is reported below
        if not reply.jobs:
            return None
        return self.request(reply.jobs)


# ------------------------------------------------------------------ drivers


def drive(
    addr: tuple[str, int], make: Callable[[int], rh.Session], n: int, mode: str
) -> rh.RunStats:
    """Run `n` sessions (`make(i)`) over `n` connections with the given client mode."""
    if n == 1:
        return rh.run_blocking(addr, make(0))
    if mode == "threads":
        return rh.run_threads(addr, [make(i) for i in range(n)])
    if mode == "epoll":
        return rh.run_epoll(addr, [make(i) for i in range(n)])
    if mode == "procs":
        return rh.run_procs(addr, make, n, procs=2, inner="epoll")
    if mode == "procs-threads":
        return rh.run_procs(addr, make, n, procs=2, inner="threads")
    raise ValueError(mode)


def measured(
    b: Broker, fn: Callable[..., rh.RunStats], *args: Any
) -> tuple[rh.RunStats, float, float]:
    """Run fn(*args); return its stats and the broker's and client's CPU % over the run."""
    c0 = b.cpu()
    st = fn(*args)
    c1 = b.cpu()
    secs = st.seconds or 1e-9
    if st.errors:
        raise RuntimeError(f"client errors: {st.errors[:3]}")
    return st, 100 * (c1 - c0) / secs, 100 * st.cpu / secs


def fill(b: Broker, n: int, *, batch: int = 1000, conns: int = 4) -> rh.RunStats:
    """Enqueue n jobs in batches of `batch` over `conns` connections (epoll)."""
    req = rh.request_bytes("POST", f"/v1/queues/{QUEUE}/jobs", {"jobs": [JOB] * batch})
    reqs = n // batch
    per_conn = [reqs // conns + (1 if i < reqs % conns else 0) for i in range(conns)]
    st = rh.run_epoll(b.addr, [Repeat(req, batch, 201, count=c) for c in per_conn])
    rest = n - reqs * batch
    if rest:
        tail = rh.request_bytes(
            "POST", f"/v1/queues/{QUEUE}/jobs", {"jobs": [JOB] * rest}
        )
        st.merge(rh.run_blocking(b.addr, Repeat(tail, rest, 201, count=1)))
    if st.errors:
        raise RuntimeError(f"fill errors: {st.errors[:3]}")
    return st


# ------------------------------------------------------------------ reporting


class Report:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.raw_runs: dict[str, list[float]] = {"a": [], "b": []}  #: scenario 1
        self.rawdb: RawSqlite | None = None  #: set when scenario 'sqlite' runs
        self.adjacent_secs = 1.0
        self.depth: list[dict[str, Any]] = []
        self.depth_ratio: dict[str, Any] | None = None
        self.control: dict[str, Any] | None = None  #: scenario control
        self.notes: list[str] = []
        self.client_mode = ""
        self.calibration: list[dict[str, Any]] = []
        self.tls: dict[str, Any] | None = None  #: scenario 'tls'

    def row(
        self,
        scenario: str,
        conns: int | str,
        jobs: int,
        seconds: float,
        *,
        raw_key: str | None = None,
        raw: float | None = None,
        broker_cpu: float | None = None,
        client_cpu: float | None = None,
        client: str = "",
        unit: str = "jobs/s",
    ) -> dict[str, Any]:
        rate = jobs / seconds if seconds > 0 else float("nan")
        ratio = rate / raw if raw_key and raw else None
        r = {
            "scenario": scenario,
            "conns": conns,
            "jobs": jobs,
            "seconds": round(seconds, 3),
            "rate": round(rate, 1),
            "unit": unit,
            "vs_raw": None if ratio is None else round(ratio, 3),
            "raw_ref": raw_key if ratio is not None else None,
            "raw_adjacent": None if ratio is None else round(raw or 0.0, 1),
            "broker_cpu_pct": None if broker_cpu is None else round(broker_cpu, 1),
            "client_cpu_pct": None if client_cpu is None else round(client_cpu, 1),
            "client": client,
            "load1": round(os.getloadavg()[0], 2),
        }
        self.rows.append(r)
        print("  " + fmt_row(r), flush=True)
        return r


HEAD = (
    f"{'scenario':<34} {'conns':>5} {'jobs':>9} {'seconds':>8} {'rate':>10} {'unit':<9}"
    f" {'vs raw (adjacent)':>22} {'broker':>7} {'client':>7}  client"
)


def fmt_row(r: dict[str, Any]) -> str:
    ratio = (
        ""
        if r["vs_raw"] is None
        else f"{r['vs_raw']:.2f}x {r['raw_ref']}={r['raw_adjacent']:,.0f}"
    )
    bcpu = "" if r["broker_cpu_pct"] is None else f"{r['broker_cpu_pct']:.0f}%"
    ccpu = "" if r["client_cpu_pct"] is None else f"{r['client_cpu_pct']:.0f}%"
    return (
        f"{r['scenario']:<34} {r['conns']!s:>5} {r['jobs']:>9} {r['seconds']:>8.2f}"
        f" {r['rate']:>10,.0f} {r['unit']:<9} {ratio:>22} {bcpu:>7} {ccpu:>7}  {r['client']}"
    )


# ------------------------------------------------------------------ scenarios


def banner(text: str) -> None:
    """A scenario's title, with the machine's load (other work skews fsync and CPU)."""
    one, five, _ = os.getloadavg()
    print(f"\n{text}   [load avg {one:.2f} / {five:.2f}]", flush=True)


class RawSqlite:
    """The raw SQLite limit on the data root's filesystem: WAL, synchronous=FULL, a
    job-shaped table (~200-byte payload, the broker's ready index and a second one)."""

    SQL = (
        "INSERT INTO jobs (id, queue, task, state, priority, payload, max_retries,"
        " timeout, created_at, available_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
    )

    def __init__(self, root: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qb-bench-sqlite-", dir=root))
        self.conn = conn = sqlite3.connect(self.dir / "raw.db", isolation_level=None)
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
            " queue TEXT NOT NULL, task TEXT NOT NULL, state TEXT NOT NULL,"
            " priority INTEGER NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL"
            " DEFAULT 0, max_retries INTEGER NOT NULL, timeout REAL NOT NULL,"
            " created_at REAL NOT NULL, available_at REAL NOT NULL, lease TEXT)"
        )
        conn.execute(
            "CREATE INDEX jobs_ready ON jobs(queue, priority DESC, available_at, seq)"
            " WHERE state = 'queued'"
        )
        conn.execute("CREATE INDEX jobs_queue_state ON jobs(queue, state)")
        self.payload = os.urandom(200)
        self.counter = 0

    def _row(self) -> tuple[Any, ...]:
        self.counter += 1
        now = time.time()
        return (f"{self.counter:026d}", QUEUE, "send_email", "queued", 0, self.payload,
                3, 30.0, now, now)  # fmt: skip

    def one_per_commit(self, secs: float) -> tuple[int, float]:
        """(a): one-row transactions, committed one at a time. Returns (commits, s)."""
        conn, n = self.conn, 0
        t0 = time.monotonic()
        end = t0 + secs
        while True:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(self.SQL, self._row())
            conn.execute("COMMIT")
            n += 1
            if n % 8 == 0 and time.monotonic() >= end:
                break
        return n, time.monotonic() - t0

    def hundred_per_commit(self, secs: float) -> tuple[int, float]:
        """(b): 100 rows per commit. Returns (rows, s)."""
        conn, n = self.conn, 0
        t0 = time.monotonic()
        end = t0 + secs
        while True:
            rows = [self._row() for _ in range(100)]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(self.SQL, rows)
            conn.execute("COMMIT")
            n += 100
            if time.monotonic() >= end:
                break
        return n, time.monotonic() - t0

    def rate(self, key: str, secs: float) -> float:
        n, t = (self.one_per_commit if key == "a" else self.hundred_per_commit)(secs)
        return n / t

    def close(self) -> None:
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def sc_sqlite(rep: Report, secs: float, tag: str = "") -> None:
    banner(f"[1] raw SQLite group-commit limit (WAL, synchronous=FULL){tag}")
    assert rep.rawdb is not None
    n, t = rep.rawdb.one_per_commit(secs)
    rep.raw_runs["a"].append(n / t)
    rep.row(f"sqlite (a) 1 row/commit{tag}", "-", n, t, unit="commits/s")
    n, t = rep.rawdb.hundred_per_commit(secs)
    rep.raw_runs["b"].append(n / t)
    rep.row(f"sqlite (b) 100 rows/commit{tag}", "-", n, t, unit="rows/s")


def bracketed(
    rep: Report, key: str, b: Broker, fn: Callable[..., rh.RunStats], *args: Any
) -> tuple[rh.RunStats, float, float, float | None]:
    """`measured`, with the raw SQLite limit `key` taken just before and just after.

    fsync latency on a shared VM drifts several-fold within minutes, so each broker
    figure is compared with the raw limit measured next to it (the mean of both sides).
    """
    before = rep.rawdb.rate(key, rep.adjacent_secs) if rep.rawdb else None
    st, bcpu, ccpu = measured(b, fn, *args)
    if rep.rawdb is None or before is None:
        return st, bcpu, ccpu, None
    after = rep.rawdb.rate(key, rep.adjacent_secs)
    return st, bcpu, ccpu, (before + after) / 2


def _enqueue_one_req() -> bytes:
    return rh.request_bytes("POST", f"/v1/queues/{QUEUE}/jobs", JOB)


def sc_client(rep: Report, root: Path, secs: float, prof: Path | None) -> None:
    """Pick the multi-connection client that leaves the broker the most CPU.

    Durable writes are fsync-bound (and fsync latency on this VM is noisy), so the
    comparison uses a request that never touches the database or a thread (GET of an
    unknown path: 404 from the router) over 8 connections: CPU-bound on both sides, so
    the client that costs least lets the broker answer the most.
    """
    banner(
        "[client] which 8-connection client leaves the broker most headroom"
        " (GET /v1/nope -> 404, CPU-bound)"
    )
    req = rh.request_bytes("GET", "/v1/nope")
    best = ("", -1.0)

    def make(i: int) -> Repeat:
        return Repeat(req, 1, 404, seconds=secs)

    with broker(root, "client") as b:
        drive(b.addr, lambda i: Repeat(req, 1, 404, seconds=0.5), 8, "epoll")  # warm-up
        for mode in CLIENT_MODES:
            st, bcpu, ccpu = measured(b, drive, b.addr, make, 8, mode)
            r = rep.row(f"404 client={mode}", 8, st.jobs, st.seconds, broker_cpu=bcpu,
                        client_cpu=ccpu, client=mode, unit="req/s")  # fmt: skip
            us = 1e6 * st.cpu / max(1, st.requests)
            rep.calibration.append({**r, "client_us_per_request": round(us, 1)})
            print(f"      client CPU per request: {us:.0f} us", flush=True)
            if r["rate"] > best[1]:
                best = (mode, r["rate"])
    rep.client_mode = best[0]
    print(
        f"  -> using client mode '{best[0]}' for multi-connection scenarios", flush=True
    )


def sc_enqueue(rep: Report, root: Path, secs: float, prof: Path | None) -> None:
    banner("[2] durable enqueue, one job per request")
    req = _enqueue_one_req()

    def make(i: int) -> Repeat:
        return Repeat(req, 1, 201, seconds=secs)

    # the ceiling for one connection in turn: a bare trio+h11 server (Bare)
    # with no disk, and with one inline commit per request, driven the same way
    for mode, name in ((m, f"{CEILING}, {m}") for m in BARE_MODES):
        with Bare(mode, root) as b:
            drive(b.addr, lambda i: Repeat(req, 1, 201, seconds=0.5), 1, "blocking")
            st, bcpu, ccpu, raw = bracketed(
                rep, "a", b, drive, b.addr, make, 1, "blocking"
            )
            rep.row(name, 1, st.jobs, st.seconds, raw_key="a", raw=raw,
                    broker_cpu=bcpu, client_cpu=ccpu, client="blocking", unit="req/s")  # fmt: skip
    for conns in (1, 8):
        with broker(root, f"enqueue{conns}") as b:
            drive(
                b.addr,
                lambda i: Repeat(req, 1, 201, seconds=0.5),
                conns,
                rep.client_mode,
            )
            with profiled(b, prof, f"enqueue-{conns}"):
                st, bcpu, ccpu, raw = bracketed(
                    rep, "a", b, drive, b.addr, make, conns, rep.client_mode
                )
            rep.row("enqueue 1/request", conns, st.jobs, st.seconds, raw_key="a", raw=raw,
                    broker_cpu=bcpu, client_cpu=ccpu,
                    client="blocking" if conns == 1 else rep.client_mode)  # fmt: skip
    # one connection again, PIPELINE_DEPTH requests in flight (HTTP/1.1 pipelining):
    # still one job and one durable reply per request, but replies no longer wait in turn
    with broker(root, "enqueue1-pipelined") as b:

        def pipelined(seconds: float) -> rh.RunStats:
            return rh.run_pipelined(
                b.addr, req, expect=201, per=1, depth=PIPELINE_DEPTH, seconds=seconds
            )

        pipelined(0.5)
        with profiled(b, prof, "enqueue-1-pipelined"):
            st, bcpu, ccpu, raw = bracketed(rep, "a", b, pipelined, secs)
        rep.row(PIPELINED, 1, st.jobs, st.seconds, raw_key="a", raw=raw,
                broker_cpu=bcpu, client_cpu=ccpu, client="pipelined")  # fmt: skip


def sc_batch(rep: Report, root: Path, secs: float, prof: Path | None) -> None:
    banner("[3] enqueue in batches of 100")
    req = rh.request_bytes("POST", f"/v1/queues/{QUEUE}/jobs", {"jobs": [JOB] * 100})

    def make(i: int) -> Repeat:
        return Repeat(req, 100, 201, seconds=secs)

    for conns in (1, 4):
        with broker(root, f"batch{conns}") as b:
            drive(b.addr, lambda i: Repeat(req, 100, 201, seconds=0.5), conns,
                  rep.client_mode)  # fmt: skip
            with profiled(b, prof, f"batch-{conns}"):
                st, bcpu, ccpu, raw = bracketed(
                    rep, "b", b, drive, b.addr, make, conns, rep.client_mode
                )
            rep.row("enqueue batch of 100", conns, st.jobs, st.seconds, raw_key="b", raw=raw,
                    broker_cpu=bcpu, client_cpu=ccpu,
                    client="blocking" if conns == 1 else rep.client_mode)  # fmt: skip


def sc_leaseack(rep: Report, root: Path, n: int, prof: Path | None) -> None:
    forms: list[tuple[str, str, Callable[[int], rh.Session]]] = [
        ("lease 100 + ack 100", "", lambda i: LeaseAck(QUEUE, 100)),
        ("lease 100 carrying 100 acks", "-carry",
         lambda i: LeaseCarryingAcks(QUEUE, 100)),
    ]  # fmt: skip
    banner(f"[4] lease max=100 + batch ack, {n:,} pre-filled jobs")
    for conns in (1, 4):
        for scen, tag, make in forms:
            with broker(root, f"leaseack{conns}{tag}") as b:
                f = fill(b, n)
                print(
                    f"      (pre-fill: {n:,} jobs in {f.seconds:.1f} s, not timed)",
                    flush=True,
                )
                with profiled(b, prof, f"leaseack-{conns}{tag}"):
                    st, bcpu, ccpu, raw = bracketed(
                        rep, "b", b, drive, b.addr, make, conns, rep.client_mode
                    )
                if st.jobs != n:
                    rep.notes.append(f"{scen} x{conns}: acked {st.jobs} of {n} jobs")
                    print(f"      WARNING: acked {st.jobs} of {n}", flush=True)
                rep.row(scen, conns, st.jobs, st.seconds, raw_key="b", raw=raw,
                        broker_cpu=bcpu, client_cpu=ccpu,
                        client="blocking" if conns == 1 else rep.client_mode)  # fmt: skip


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def sc_depth(rep: Report, root: Path, depths: list[int], probes: int,
             prof: Path | None) -> None:  # fmt: skip
    """One broker per depth, all alive at once, probed in turns.

    A probe is one `lease max=1` then one `POST /v1/jobs/{id}/ack`, timed on the client.
    Both are durable writes, so a probe costs two fsyncs, whose latency on a shared VM
    drifts from one second to the next. Probing the depths round-robin (one probe each,
    rotating who goes first) exposes every depth to the same drift, so their ratio shows
    what depth costs rather than when it was measured.
    """
    banner(
        f"[5] lease(max=1)+ack latency and broker RSS vs queue depth ({probes} probes"
        " per depth, depths probed in turns)"
    )
    lease_req = rh.request_bytes(
        "POST", "/v1/lease", {"queues": [QUEUE], "max": 1, "worker": "bench"}
    )
    ack_head = (
        "POST /v1/jobs/{}/ack HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/msgpack\r\n"
        "Content-Type: application/msgpack\r\nContent-Length: {}\r\n\r\n"
    )
    warm = 50
    with contextlib.ExitStack() as stack:
        brokers: list[tuple[int, Broker, rh.RunStats, float]] = []
        for depth in depths:
            b = stack.enter_context(broker(root, f"depth{depth}"))
            rss0 = b.rss_mib()
            f = fill(
                b, depth + probes + warm
            )  # the probes take jobs: keep `depth` deep
            print(
                f"      filled {f.jobs:,} jobs in {f.seconds:.1f} s"
                f" ({f.jobs / f.seconds:,.0f} jobs/s, 1000/request, 4 connections);"
                f" RSS {rss0:.1f} -> {b.rss_mib():.1f} MiB; WAL {b.file_mib('-wal'):.0f} MiB",
                flush=True,
            )
            brokers.append((depth, b, f, rss0))
        conns = [rh.Conn(*b.addr) for _, b, _, _ in brokers]
        rts: list[list[float]] = [[] for _ in brokers]
        leases: list[list[float]] = [[] for _ in brokers]
        deepest = brokers[-1][1]
        with profiled(deepest, prof, f"depth-{brokers[-1][0]}"):
            for i in range(probes + warm):
                for turn in range(len(brokers)):
                    k = (turn + i) % len(brokers)  # rotate who goes first
                    conn = conns[k]
                    t0 = time.perf_counter()
                    status, body = conn.roundtrip(lease_req)
                    t1 = time.perf_counter()
                    if status != 200:
                        raise RuntimeError(f"lease: HTTP {status} {body[:200]!r}")
                    job = _decode_leased(body).jobs[0]
                    payload = rh.encode({"lease": job.lease, "result": None})
                    status, body = conn.roundtrip(
                        ack_head.format(job.id, len(payload)).encode() + payload
                    )
                    t2 = time.perf_counter()
                    if status != 200:
                        raise RuntimeError(f"ack: HTTP {status} {body[:200]!r}")
                    if i >= warm:
                        rts[k].append(t2 - t0)
                        leases[k].append(t1 - t0)
        for c in conns:
            c.close()
        print(
            f"  {'depth':>9} {'fill jobs/s':>11} {'rt p50 ms':>10} {'rt p99 ms':>10}"
            f" {'lease p50':>10} {'lease p99':>10} {'RSS MiB':>8} {'RSS@start':>9}"
            f" {'db MiB':>8} {'wal MiB':>8}",
            flush=True,
        )
        for k, (depth, b, f, rss0) in enumerate(brokers):
            d = {
                "depth": depth,
                "fill_rate": round(f.jobs / f.seconds, 1) if f.seconds else None,
                "rt_p50_ms": round(1e3 * statistics.median(rts[k]), 3),
                "rt_p99_ms": round(1e3 * _pct(rts[k], 99), 3),
                "lease_p50_ms": round(1e3 * statistics.median(leases[k]), 3),
                "lease_p99_ms": round(1e3 * _pct(leases[k], 99), 3),
                "rss_mib": round(b.rss_mib(), 1),
                "rss_start_mib": round(rss0, 1),
                "db_mib": round(b.file_mib(), 1),
                "wal_mib": round(b.file_mib("-wal"), 1),
            }
            rep.depth.append(d)
            print(
                f"  {depth:>9,} {d['fill_rate'] or 0:>11,.0f} {d['rt_p50_ms']:>10.3f}"
                f" {d['rt_p99_ms']:>10.3f} {d['lease_p50_ms']:>10.3f}"
                f" {d['lease_p99_ms']:>10.3f} {d['rss_mib']:>8.1f} {rss0:>9.1f}"
                f" {d['db_mib']:>8.1f} {d['wal_mib']:>8.1f}",
                flush=True,
            )
    rows = rep.depth
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        keys = ("rt_p50_ms", "rt_p99_ms", "lease_p50_ms", "lease_p99_ms", "rss_mib")
        ratios = {k: round(hi[k] / lo[k], 3) for k in keys}
        rep.depth_ratio = {"ratio": f"{hi['depth']}/{lo['depth']}", **ratios}
        print(
            f"  ratio {hi['depth']:,}/{lo['depth']:,}: round trip p50 {ratios['rt_p50_ms']:.2f}x,"
            f" p99 {ratios['rt_p99_ms']:.2f}x; lease p50 {ratios['lease_p50_ms']:.2f}x,"
            f" p99 {ratios['lease_p99_ms']:.2f}x; RSS {ratios['rss_mib']:.2f}x"
            f" (target <= {TARGETS['depth_ratio']})",
            flush=True,
        )


# ------------------------------------------------------------------ job control

HELD = "held"  #: the paused queue of scenario control, named first by every lease
CONTROL_LIMITS = 100
PAUSED_JOBS = 1000


def _control_setup(b: Broker) -> None:
    """100 limits, two of which apply to the bench jobs without binding, and 1,000 jobs
    in a paused queue."""
    conn = rh.Conn(*b.addr)
    try:
        puts: list[tuple[str, dict[str, Any]]] = [
            ("queue:bench", {"concurrency": 1_000_000}),
            (
                "task:send_email",
                {"rate": {"limit": 1_000_000, "per": 1, "burst": 1000}},
            ),
        ]
        for i in range(CONTROL_LIMITS - len(puts)):
            key = f"task:other{i}" if i % 2 else f"customer:{i}"
            puts.append((key, {"concurrency": 5, "rate": {"limit": 10, "per": 1}}))
        for key, spec in puts:
            status, body = conn.roundtrip(
                rh.request_bytes("PUT", f"/v1/limits/{key}", spec)
            )
            if status != 200:
                raise RuntimeError(
                    f"PUT /v1/limits/{key}: HTTP {status} {body[:200]!r}"
                )
        status, _ = conn.roundtrip(rh.request_bytes("POST", f"/v1/queues/{HELD}/pause"))
        if status != 200:
            raise RuntimeError(f"pause: HTTP {status}")
        req = rh.request_bytes(
            "POST", f"/v1/queues/{HELD}/jobs", {"jobs": [JOB] * PAUSED_JOBS}
        )
        status, _ = conn.roundtrip(req)
        if status != 201:
            raise RuntimeError(f"enqueue to {HELD}: HTTP {status}")
    finally:
        conn.close()


CONTROL_ROUNDS = 8  #: alternating batch rounds per broker in scenario control


def sc_control(rep: Report, root: Path, probes: int, n: int) -> None:
    """Job control's cost on the lease path: two brokers, used in turns (see 'depth').

    The figure is the broker's CPU per job (its process CPU time over the jobs it
    leased and acked): wall-clock rates swing by half on a shared 2-core VM within a
    minute, CPU per job much less. Wall-clock figures are shown beside it.
    """
    banner(
        f"[6] job control: lease path with {CONTROL_LIMITS} limits and {PAUSED_JOBS:,}"
        f" paused-queue jobs vs none ({probes} lease(max=1)+ack probes each, in turns;"
        f" then {CONTROL_ROUNDS} alternating rounds each of lease 100 carrying acks)"
    )
    lease_req = rh.request_bytes(
        "POST", "/v1/lease", {"queues": [HELD, QUEUE], "max": 1, "worker": "bench"}
    )
    ack_head = (
        "POST /v1/jobs/{}/ack HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/msgpack\r\n"
        "Content-Type: application/msgpack\r\nContent-Length: {}\r\n\r\n"
    )
    warm = 50
    names = ("without", "with")
    per_round = max(1000, n // CONTROL_ROUNDS)
    with contextlib.ExitStack() as stack:
        brokers = [stack.enter_context(broker(root, f"control-{n_}")) for n_ in names]
        _control_setup(brokers[1])
        for b in brokers:
            fill(b, probes + warm)
        conns = [rh.Conn(*b.addr) for b in brokers]
        rts: list[list[float]] = [[], []]
        cpu = [0.0, 0.0]
        for i in range(probes + warm):
            for turn in range(2):
                k = (turn + i) % 2
                c0 = brokers[k].cpu()
                t0 = time.perf_counter()
                status, body = conns[k].roundtrip(lease_req)
                if status != 200:
                    raise RuntimeError(f"lease: HTTP {status} {body[:200]!r}")
                job = _decode_leased(body).jobs[0]
                payload = rh.encode({"lease": job.lease, "result": None})
                status, body = conns[k].roundtrip(
                    ack_head.format(job.id, len(payload)).encode() + payload
                )
                if status != 200:
                    raise RuntimeError(f"ack: HTTP {status} {body[:200]!r}")
                if i >= warm:
                    rts[k].append(time.perf_counter() - t0)
                    cpu[k] += brokers[k].cpu() - c0
        for c in conns:
            c.close()
        p50 = [statistics.median(x) * 1e3 for x in rts]
        probe_cpu = [1e6 * c / probes for c in cpu]
        rates: list[list[float]] = [[], []]
        cpus: list[list[float]] = [[], []]
        for r in range(CONTROL_ROUNDS):
            for k in (r % 2, 1 - r % 2):  # who goes first alternates
                fill(brokers[k], per_round)
                c0 = brokers[k].cpu()
                st = rh.run_blocking(brokers[k].addr, LeaseCarryingHeld(QUEUE, 100))
                c1 = brokers[k].cpu()
                if st.jobs != per_round:
                    raise RuntimeError(f"control: acked {st.jobs} of {per_round}")
                rates[k].append(st.jobs / st.seconds)
                cpus[k].append(1e6 * (c1 - c0) / st.jobs)
        held = _queue_counts(brokers[1], HELD)
    rate = [statistics.median(x) for x in rates]
    batch_cpu = [statistics.median(x) for x in cpus]
    ratios = {
        "probe_cpu": probe_cpu[1] / probe_cpu[0],
        "probe_p50": p50[1] / p50[0],
        "batch_cpu": batch_cpu[1] / batch_cpu[0],
        "batch_rate": rate[0] / rate[1],
    }
    print(f"  lease(max=1)+ack: broker CPU per probe without {probe_cpu[0]:.0f} us, with"
          f" {probe_cpu[1]:.0f} us -> {ratios['probe_cpu']:.3f}x; wall p50 without"
          f" {p50[0]:.3f} ms, with {p50[1]:.3f} ms -> {ratios['probe_p50']:.3f}x",
          flush=True)  # fmt: skip
    print(f"  lease 100 carrying acks, {CONTROL_ROUNDS} x {per_round:,} jobs each:"
          f" broker CPU per job (median) without {batch_cpu[0]:.1f} us, with"
          f" {batch_cpu[1]:.1f} us -> {ratios['batch_cpu']:.3f}x; rate (median) without"
          f" {rate[0]:,.0f}, with {rate[1]:,.0f} jobs/s -> {ratios['batch_rate']:.3f}x"
          f" the time", flush=True)  # fmt: skip
    print(f"  the paused queue still holds {held} queued jobs", flush=True)
    rep.notes.append(
        "control: broker CPU per job with 100 limits and 1,000 paused jobs vs none:"
        f" lease(max=1)+ack {ratios['probe_cpu']:.3f}x, lease 100 carrying acks"
        f" {ratios['batch_cpu']:.3f}x"
    )
    rep.control = {
        "probe_cpu_us": [round(x, 1) for x in probe_cpu],
        "probe_p50_ms": [round(x, 3) for x in p50],
        "batch_cpu_us": [round(x, 2) for x in batch_cpu],
        "batch_rate": [round(x, 1) for x in rate],
        **{f"{k}_ratio": round(v, 3) for k, v in ratios.items()},
    }


class LeaseCarryingHeld(LeaseCarryingAcks):
    """LeaseCarryingAcks naming the paused queue first."""

    def request(self, acks: list[_Ack]) -> bytes:
        body = _LeaseCarrying([HELD, self.queue], self.max_jobs, "bench", acks)
        return rh.request_bytes("POST", "/v1/lease", body)


def _queue_counts(b: Broker, queue: str) -> int:
    conn = rh.Conn(*b.addr)
    try:
        status, body = conn.roundtrip(rh.request_bytes("GET", f"/v1/queues/{queue}"))
    finally:
        conn.close()
    return (
        int(msgspec.msgpack.decode(body)["counts"]["queued"]) if status == 200 else -1
    )


# ------------------------------------------------------------------ main


ALL = ("sqlite", "client", "enqueue", "batch", "leaseack", "depth")
EXTRA = ("tls", "control")  #: scenarios run only when named


def verdicts(rep: Report) -> list[str]:
    out = []

    def best(scen: str, conns: int | None = None) -> dict[str, Any] | None:
        rows = [r for r in rep.rows if r["scenario"] == scen
                and (conns is None or r["conns"] == conns)]  # fmt: skip
        return max(rows, key=lambda r: r["rate"]) if rows else None

    def v(label: str, r: dict[str, Any] | None, target: float) -> None:
        if r is None:
            return
        ok = r["rate"] >= target
        line = (
            f"{label}: {r['rate']:,.0f} jobs/s ({r['conns']} conn) vs target {target:,.0f}"
            f" -> {'MET' if ok else 'NOT met'} ({r['rate'] / target:.2f}x of target)"
        )
        if r["vs_raw"] is not None:
            line += (
                f"; raw SQLite ({r['raw_ref']}) next to it: {r['raw_adjacent']:,.0f}/s,"
                f" broker at {r['vs_raw']:.2f}x of it"
            )
        out.append(line)

    v("single enqueue, 1 conn", best("enqueue 1/request", 1), TARGETS["enqueue-1"])
    ceiling = best(f"{CEILING}, commit", 1)
    if ceiling is not None:
        t = TARGETS["enqueue-1"]
        out.append(
            f"  ceiling for 1 conn in turn, a bare trio+h11 server committing inline:"
            f" {ceiling['rate']:,.0f} req/s ({ceiling['rate'] / t:.2f}x of target)"
        )
    v(f"single enqueue, 1 conn, {PIPELINE_DEPTH} pipelined", best(PIPELINED, 1),
      TARGETS["enqueue-1"])  # fmt: skip
    v("batch enqueue, best", best("enqueue batch of 100"), TARGETS["batch"])
    v("lease+ack batches, best", best("lease 100 + ack 100"), TARGETS["leaseack"])
    v("lease+ack batches, acks carried, best", best("lease 100 carrying 100 acks"),
      TARGETS["leaseack"])  # fmt: skip
    if rep.tls:
        t, got = TARGETS["tls_ratio"], rep.tls["ratio"]
        out.append(
            f"TLS enqueue, 1 conn: median {rep.tls['tls']:,.0f} jobs/s vs plain"
            f" {rep.tls['plain']:,.0f}: {got:.2f}x vs target >= {t}"
            f" -> {'MET' if got >= t else 'NOT met'}; broker CPU per job (median)"
            f" {rep.tls['cpu_tls']:.0f} µs vs {rep.tls['cpu_plain']:.0f} µs plain"
        )
    if rep.control:
        t = TARGETS["control_ratio"]
        for k, name in (("probe_cpu_ratio", "lease(max=1)+ack"),
                        ("batch_cpu_ratio", "lease 100 carrying acks")):  # fmt: skip
            got = rep.control[k]
            out.append(
                f"job control (100 limits, 1,000 paused jobs) {name}: broker CPU per"
                f" job {got:.3f}x of none vs target <= {t}"
                f" -> {'MET' if got <= t else 'NOT met'}"
            )
    ratio = rep.depth_ratio
    if ratio:
        t = TARGETS["depth_ratio"]
        for k, name in (("rt_p50_ms", "lease+ack p50"), ("rt_p99_ms", "lease+ack p99"),
                        ("rss_mib", "RSS")):  # fmt: skip
            out.append(
                f"depth {ratio['ratio']} {name}: {ratio[k]:.2f}x vs target <= {t}"
                f" -> {'MET' if ratio[k] <= t else 'NOT met'}"
            )
    return out


class TlsBroker(e2e.Broker):
    """The broker serving HTTPS with a certificate made for the run."""

    def __init__(self, name: str, root: Path, cert: Path, key: Path) -> None:
        super().__init__(name, root)
        self.tls_args = ["--tls-cert", str(cert), "--tls-key", str(key)]

    def command(self) -> list[str]:
        return [*super().command(), *self.tls_args]


def run_blocking_tls(
    addr: tuple[str, int], session: rh.Session, ctx: Any
) -> rh.RunStats:
    """`rh.run_blocking` over one TLS connection (handshake before the clock starts)."""
    conn = rh.Conn(*addr)
    conn.sock = ctx.wrap_socket(conn.sock, server_hostname=addr[0])
    cpu0 = rh._cpu_self()
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
    st = rh._collect([session], t_first, t_last)
    st.cpu = rh._cpu_self() - cpu0
    return st


def sc_tls(rep: Report, root: Path, secs: float) -> None:
    banner("[tls] enqueue 1/request on 1 connection: plain HTTP vs HTTPS")
    import ssl

    import trustme  # the test dependency that makes throwaway certificates

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    pki = Path(tempfile.mkdtemp(prefix="qb-tls-", dir=root))
    cert, key = pki / "cert.pem", pki / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    req = _enqueue_one_req()
    rates: dict[str, list[float]] = {"plain": [], "tls": []}
    cpu_us: dict[str, list[float]] = {"plain": [], "tls": []}  #: broker CPU per job
    try:
        for n in range(TLS_ROUNDS):
            for kind in ("plain", "tls"):
                b = (
                    TlsBroker(f"tls{n}", root, cert, key)
                    if kind == "tls"
                    else e2e.Broker(f"plain{n}", root)
                )
                with b:
                    if kind == "tls":
                        run = functools.partial(run_blocking_tls, ctx=ctx)
                    else:
                        run = rh.run_blocking
                    run(b.addr, Repeat(req, 1, 201, seconds=0.5))  # warm up
                    st, bcpu, ccpu = measured(
                        b, run, b.addr, Repeat(req, 1, 201, seconds=secs)
                    )
                r = rep.row(f"enqueue 1/request, {kind}", 1, st.jobs, st.seconds,
                            broker_cpu=bcpu, client_cpu=ccpu, client="blocking")  # fmt: skip
                rates[kind].append(r["rate"])
                cpu_us[kind].append(1e4 * bcpu / r["rate"])
    finally:
        shutil.rmtree(pki, ignore_errors=True)
    plain, tls = statistics.median(rates["plain"]), statistics.median(rates["tls"])
    rep.tls = {"plain": plain, "tls": tls, "ratio": tls / plain, "rates": rates,
               "broker_cpu_us_per_job": cpu_us,
               "cpu_plain": statistics.median(cpu_us["plain"]),
               "cpu_tls": statistics.median(cpu_us["tls"])}  # fmt: skip


def git_state() -> str:
    """The commit the broker runs from, and whether broker/ has uncommitted edits."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "broker"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}" + (" + uncommitted edits in broker/" if dirty else "")


def run_all(
    rep: Report,
    scen: list[str],
    a: argparse.Namespace,
    root: Path,
    secs: float,
    n_la: int,
    depths: list[int],
) -> None:
    raw_secs = min(secs, 3.0)
    for s in ALL:
        if s not in scen:
            continue
        if s == "sqlite":
            sc_sqlite(rep, raw_secs)
        elif s == "client":
            sc_client(rep, root, min(secs, 2.5), a.profile)
        elif s == "enqueue":
            sc_enqueue(rep, root, secs, a.profile)
        elif s == "batch":
            sc_batch(rep, root, secs, a.profile)
        elif s == "leaseack":
            sc_leaseack(rep, root, n_la, a.profile)
        elif s == "depth":
            sc_depth(rep, root, depths, a.probes, a.profile)
    if "tls" in scen:
        sc_tls(rep, root, secs)
    if "control" in scen:
        sc_control(rep, root, a.probes, n_la)
    if "sqlite" in scen and len(scen) > 1:
        # fsync latency on a shared VM drifts: show the limit again at the end
        sc_sqlite(rep, raw_secs, " (again)")


# ------------------------------------------------------------------ the bare server


BARE_MODES = ("http", "commit")
_BARE_BODY = b'{"id":"01M810Z4ZTK4GFCSEXRBEAK31E"}'
_BARE_INSERT = (
    "INSERT INTO jobs (id, queue, task, state, priority, payload, max_retries, timeout,"
    " created_at, available_at) VALUES (?, 'bench', 'task', 'queued', 0, ?, 3, 30, ?, ?)"
)


def _open_bare_db(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "bare.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
        " queue TEXT NOT NULL, task TEXT NOT NULL, state TEXT NOT NULL,"
        " priority INTEGER NOT NULL, payload BLOB NOT NULL, attempts INTEGER NOT NULL"
        " DEFAULT 0, max_retries INTEGER NOT NULL, timeout REAL NOT NULL,"
        " created_at REAL NOT NULL, available_at REAL NOT NULL, lease TEXT)"
    )
    db.execute(
        "CREATE INDEX jobs_ready ON jobs(queue, priority DESC, available_at, seq)"
        " WHERE state = 'queued'"
    )
    return db


def serve_bare(mode: str, data_dir: Path, ready_file: Path) -> None:
    """Run the bare server on a free loopback port until killed."""
    import itertools

    import h11
    import trio

    db = _open_bare_db(data_dir) if mode == "commit" else None
    ids = itertools.count()
    head = [(b"content-type", b"application/json"),
            (b"content-length", str(len(_BARE_BODY)).encode())]  # fmt: skip

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        body: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif type(event) is h11.Data:
                body.append(event.data)
            elif type(event) is h11.EndOfMessage:
                if db is not None:
                    db.execute("BEGIN IMMEDIATE")
                    now = time.time()
                    row = (f"{next(ids):026d}", b"".join(body), now, now)
                    db.execute(_BARE_INSERT, row)
                    db.execute("COMMIT")
                body.clear()
                out = conn.send(h11.Response(status_code=201, headers=head))
                out += conn.send(h11.Data(data=_BARE_BODY))  # type: ignore[operator]
                out += conn.send(h11.EndOfMessage())  # type: ignore[operator]
                await stream.send_all(out)  # type: ignore[arg-type]
                conn.start_next_cycle()
            elif type(event) is h11.ConnectionClosed:
                return

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await trio.Path(ready_file).write_text(str(port))
        await trio.serve_listeners(handle, listeners)

    trio.run(main)


class Bare(e2e.Broker):
    """A bare trio + h11 server (none of qbroker's code) answering each request with
    the 201 an enqueue gets: `http` with no disk, `commit` also committing one
    job-shaped row per request inline on the trio thread (WAL, synchronous=FULL, no
    thread hand-offs): the ceiling for one connection sending in turn."""

    def __init__(self, mode: str, root: Path | None = None) -> None:
        super().__init__(f"floor-{mode}", root)
        self.mode = mode

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--serve-bare", self.mode,
                "--data-dir", str(self.data), "--ready-file", str(self.ready)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small N, depth up to 100k")
    p.add_argument("--scenarios", default=",".join(ALL),
                   help=f"comma-separated subset of {','.join(ALL)}, or"
                        f" {','.join(EXTRA)}")  # fmt: skip
    p.add_argument("--json", type=Path, help="write all figures here")
    p.add_argument("--client", choices=("auto", *CLIENT_MODES), default="auto",
                   help="multi-connection client; auto measures them (scenario 'client')")  # fmt: skip
    p.add_argument("--max-depth", type=int, default=None,
                   help="deepest queue for 'depth' (default 1,000,000; --quick 100,000)")  # fmt: skip
    p.add_argument("--seconds", type=float, default=None,
                   help="length of each timed window (default 5; --quick 1.5)")  # fmt: skip
    p.add_argument("--leaseack-n", type=int, default=None,
                   help="jobs pre-filled for lease+ack (default 100,000; --quick 20,000)")  # fmt: skip
    p.add_argument("--probes", type=int, default=500, help="lease+ack probes per depth")
    p.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()),
                   help="where the temp data dirs go (the raw SQLite test uses it too)")  # fmt: skip
    p.add_argument("--profile", type=Path, default=None,
                   help="record py-spy raw profiles of the broker into this dir (slows it)")  # fmt: skip
    p.add_argument("--serve-bare", choices=BARE_MODES, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_bare:  # a Bare server's own process
        serve_bare(a.serve_bare, a.data_dir, a.ready_file)
        return 0
    # SIGTERM unwinds like Ctrl-C, so every broker started here is stopped by its PID
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    scen = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    bad = [s for s in scen if s not in ALL + EXTRA]
    if bad:
        p.error(f"unknown scenario(s) {bad}; choose from {ALL + EXTRA}")
    secs = a.seconds or (1.5 if a.quick else 5.0)
    n_la = a.leaseack_n or (20_000 if a.quick else 100_000)
    max_depth = a.max_depth or (100_000 if a.quick else 1_000_000)
    depths = [d for d in (10_000, 100_000, 1_000_000) if d <= max_depth] or [max_depth]
    root = a.data_root
    root.mkdir(parents=True, exist_ok=True)

    rep = Report()
    multi = any(s in scen for s in ("enqueue", "batch", "leaseack"))
    if a.client != "auto":
        rep.client_mode = a.client
        scen = [s for s in scen if s != "client"]
    elif multi and "client" not in scen:
        scen.insert(0, "client")
    if not rep.client_mode:
        rep.client_mode = "epoll"

    started = datetime.datetime.now().astimezone()
    cmd = "python " + " ".join(
        [os.path.relpath(__file__, os.getcwd()), *(argv or sys.argv[1:])]
    )
    print(f"qbroker broker benchmark - {started:%Y-%m-%d %H:%M %Z}")
    print(f"command: {cmd}")
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}")  # fmt: skip
    print(f"broker code: {git_state()}")
    print(f"data root: {root} (same filesystem for broker and raw SQLite)")
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"timed window {secs:g} s; lease+ack N={n_la:,}; depths {depths}")
    print("columns: rate; ratio to the raw SQLite limit (a) commits/s or (b) rows/s measured"
          " just before and after that row (mean shown); broker and client CPU % over the"
          " window (200% = both cores)")  # fmt: skip
    print(HEAD)
    t_all = time.monotonic()
    if "sqlite" in scen:
        rep.rawdb = RawSqlite(root)
        rep.adjacent_secs = 0.5 if a.quick else 1.0
    try:
        run_all(rep, scen, a, root, secs, n_la, depths)
    finally:
        if rep.rawdb is not None:
            rep.rawdb.close()
    total = time.monotonic() - t_all

    print("\nsummary")
    if rep.rows:
        print(HEAD)
        for r in rep.rows:
            print(fmt_row(r))
    print(f"\nmulti-connection client: {rep.client_mode}"
          + (" (measured fastest in scenario 'client')" if rep.calibration else " (given)"))  # fmt: skip
    print("targets:")
    vs = verdicts(rep)
    for line in vs:
        print("  " + line)
    for n in rep.notes:
        print("note: " + n)
    print(f"total {total:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({
            "date": started.isoformat(timespec="seconds"),
            "command": cmd,
            "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "sqlite": sqlite3.sqlite_version},
            "load_at_start": load,
            "broker_code": git_state(),
            "client_mode": rep.client_mode,
            "raw_sqlite_runs": rep.raw_runs,
            "rows": rep.rows,
            "client_calibration": rep.calibration,
            "depth": rep.depth,
            "depth_ratio": rep.depth_ratio,
            "control": rep.control,
            "tls": rep.tls,
            "targets": vs,
            "notes": rep.notes,
            "total_seconds": round(total, 1),
        }, indent=2) + "\n")  # fmt: skip
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
