"""The ceiling for one connection sending one request at a time (issue 2's 4,000/s).

A bare trio + h11 server, none of qbroker's code, answers each request with the same
201 and a small JSON body as an enqueue gets. Two modes:

  http      no disk: the HTTP round trip alone, with the benchmark's own client
  commit    the same, plus one INSERT and COMMIT (WAL, synchronous=FULL, a job-shaped
            table) per request, run inline on the trio thread: no thread hand-offs,
            no routing, validation or group commit. qbroker may not work this way
            (its trio loop never waits on SQLite), which is what makes it a ceiling.

`bench/broker.py`'s enqueue scenario drives both with the same client and request as
its one-connection row, so the three rates compare within one run.

Usage:

  python bench/floor.py [--seconds 4]          # both modes, printed
  python bench/floor.py --serve commit --data-dir D --ready-file F   # one server
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import _rawhttp as rh  # noqa: E402
import e2e  # noqa: E402  (the server subprocess wrapper)

MODES = ("http", "commit")
_BODY = b'{"id":"01M810Z4ZTK4GFCSEXRBEAK31E"}'
_INSERT = (
    "INSERT INTO jobs (id, queue, task, state, priority, payload, max_retries, timeout,"
    " created_at, available_at) VALUES (?, 'bench', 'task', 'queued', 0, ?, 3, 30, ?, ?)"
)


def _open_db(data_dir: Path) -> sqlite3.Connection:
    data_dir.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(data_dir / "floor.db", isolation_level=None)
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


def serve(mode: str, data_dir: Path, ready_file: Path) -> None:
    """Run the bare server on a free loopback port until killed."""
    import itertools

    import h11
    import trio

    db = _open_db(data_dir) if mode == "commit" else None
    ids = itertools.count()
    head = [(b"content-type", b"application/json"),
            (b"content-length", str(len(_BODY)).encode())]  # fmt: skip

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
                    db.execute(_INSERT, row)
                    db.execute("COMMIT")
                body.clear()
                out = conn.send(h11.Response(status_code=201, headers=head))
                out += conn.send(h11.Data(data=_BODY))  # type: ignore[operator]
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
    """One bare server subprocess, started and stopped like a broker (a `with`
    block starts it and stops it by PID)."""

    def __init__(self, mode: str, root: Path | None = None) -> None:
        super().__init__(f"floor-{mode}", root)
        self.mode = mode

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--serve", self.mode,
                "--data-dir", str(self.data), "--ready-file", str(self.ready)]  # fmt: skip


def rate(addr: tuple[str, int], req: bytes, seconds: float) -> float:
    """Requests per second on one connection, each reply awaited before the next."""
    conn = rh.Conn(*addr)
    try:
        n = 0
        t0 = time.monotonic()
        end = t0 + seconds
        while True:
            status, _ = conn.roundtrip(req)
            if status != 201:
                raise RuntimeError(f"HTTP {status}")
            n += 1
            if n % 64 == 0 and time.monotonic() >= end:
                return n / (time.monotonic() - t0)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", choices=MODES, help="run one bare server (internal)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--ready-file", type=Path)
    p.add_argument("--seconds", type=float, default=4.0)
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve, a.data_dir, a.ready_file)
        return 0
    req = rh.request_bytes("POST", "/v1/queues/bench/jobs", {"task": "t", "args": [1]})
    for mode in MODES:
        with Bare(mode) as b:
            rate(b.addr, req, 0.5)  # warm up
            r = rate(b.addr, req, a.seconds)
        print(f"bare trio+h11, {mode:6}: {r:8,.0f} requests/s (1 connection, in turn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
