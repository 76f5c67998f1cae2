"""How long `/healthz` waits while `/metrics` renders, with many queue names.

Starts `qbroker serve` on a temp data dir, puts one job in each of `--queues` queues
(pipelined enqueues), then for `--seconds` scrapes `/metrics` back to back on one
connection (in a child process) while this one asks `/healthz` every 2 ms. Prints the size and
time of a scrape, and /healthz latency while scraping against the same without.

    python bench/metrics_stall.py --queues 20000 --seconds 10 [--interval 0.2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _rawhttp import parse_reply

ROOT = Path(__file__).resolve().parent.parent


def start_broker(data: Path) -> tuple[subprocess.Popen[bytes], int]:
    ready = data.parent / "ready"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(ROOT / p) for p in ("broker", "client", "worker")))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "qbroker", "serve", "--port", "0",
         "--data-dir", str(data), "--ready-file", str(ready), "--log-level", "error"],
        env=env,
    )  # fmt: skip
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None:
            raise SystemExit("broker exited")
        time.sleep(0.05)
    return proc, int(ready.read_text())


class Conn:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def replies(self, n: int) -> list[tuple[int, bytes]]:
        out = []
        while len(out) < n:
            got = parse_reply(self.buf)
            if got is None:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
                continue
            status, body, used = got
            self.buf = self.buf[used:]
            out.append((status, body))
        return out

    def get(self, path: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
        return self.replies(1)[0]


def fill(port: int, queues: int) -> None:
    conn = Conn(port)
    body = json.dumps({"args": [1]}).encode()
    for start in range(0, queues, 500):
        reqs = b"".join(
            b"POST /v1/queues/q%06d/jobs HTTP/1.1\r\nHost: b\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (i, len(body), body)
            for i in range(start, min(queues, start + 500))
        )
        conn.sock.sendall(reqs)
        for status, _ in conn.replies(min(queues, start + 500) - start):
            assert status == 201, status


def healthz_latencies(port: int, stop: threading.Event) -> list[tuple[float, float]]:
    """(start, seconds) of /healthz requests, one every 2 ms, until `stop`."""
    conn = Conn(port)
    out = []
    while not stop.is_set():
        t = time.monotonic()
        status, _ = conn.get("/healthz")
        out.append((t, time.monotonic() - t))
        assert status == 200
        time.sleep(0.002)
    return out


def scrape_loop(port: int, seconds: float, interval: float, out: Any) -> None:
    """Scrape /metrics every `interval` s for `seconds` (in a child process, so its
    parsing does not share a GIL with the /healthz probe); sends (times, size)."""
    conn = Conn(port)
    renders: list[tuple[float, float]] = []
    size = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t = time.monotonic()
        status, body = conn.get("/metrics")
        renders.append((t, time.monotonic() - t))
        assert status == 200, status
        size = len(body)
        time.sleep(interval)
    out.send((renders, size))


def measure(
    port: int, seconds: float, scrape: bool, interval: float = 0.0
) -> tuple[list[float], list[float], int]:
    """/healthz latencies (only those overlapping a scrape, when scraping), scrape
    times, and the size of a scrape. CLOCK_MONOTONIC is shared by the processes."""
    stop = threading.Event()
    lat: list[tuple[float, float]] = []
    th = threading.Thread(target=lambda: lat.extend(healthz_latencies(port, stop)))
    th.start()
    renders: list[tuple[float, float]] = []
    size = 0
    if scrape:
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.Process(
            target=scrape_loop, args=(port, seconds, interval, theirs)
        )
        child.start()
        renders, size = ours.recv()
        child.join()
    else:
        time.sleep(seconds)
    stop.set()
    th.join()
    if not scrape:
        return [d for _, d in lat], [], 0
    during = [
        d
        for t, d in lat
        if any(s < t + d and t < s + r for s, r in renders)  # overlaps a scrape
    ]
    return during, [r for _, r in renders], size


def ms(xs: list[float], q: float) -> str:
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queues", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", type=float, default=0.0, help="s between scrapes")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_broker(Path(tmp) / "data")
        try:
            t = time.perf_counter()
            fill(port, args.queues)
            print(f"{args.queues} queues filled in {time.perf_counter() - t:.1f} s")
            idle, _, _ = measure(port, args.seconds / 2, scrape=False)
            busy, renders, size = measure(
                port, args.seconds, scrape=True, interval=args.interval
            )
            print(f"/metrics: {size:,} bytes, {len(renders)} scrapes, median "
                  f"{statistics.median(renders) * 1e3:.1f} ms")  # fmt: skip
            for name, xs in (("idle", idle), ("while scraping", busy)):
                print(f"/healthz {name}: n={len(xs)} p50 {ms(xs, 0.5)} ms, "
                      f"p99 {ms(xs, 0.99)} ms, max {max(xs) * 1e3:.1f} ms")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
