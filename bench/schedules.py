"""qbroker schedules benchmark (issue 24): what 10,000 schedules cost a lease, and how
soon 1,000 schedules due in the same second fire.

  lease   two brokers side by side, one with no schedules and one with N (default
          10,000; cron `M H * * *`, none due during the run), each with the same queue
          of jobs; rounds of R lease(max=1)+ack pairs, one at a time on one connection,
          alternate between the two (so disk and CPU drift hit both alike). Prints the
          mean and p50 microseconds per lease+ack for each, and their ratio.
  fire    one broker, F (default 1,000) cron schedules all due at the same minute;
          prints how late the jobs were: `created_at - fire time` (the broker's firing
          pass) and, seen from a client polling every 10 ms, when all F were queued.

Usage:

  python bench/schedules.py                       # both, ~2-3 min (fire waits for a minute)
  python bench/schedules.py --only lease --schedules 10000 --rounds 10 --per-round 300
  python bench/schedules.py --only fire --fire 1000

Each broker is `python -m qbroker serve --port 0` on a fresh temp data dir with its
defaults (synchronous=FULL), stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in ("broker", "client", "worker"):
    sys.path.insert(0, str(REPO / _p))

from qclient import Client  # noqa: E402
from qclient.schedules import Schedules, ScheduleSpec  # noqa: E402

QUEUE = "bench"


@contextlib.contextmanager
def broker(root: Path, name: str) -> Iterator[str]:
    """A `qbroker serve` on a fresh data dir; yields its URL."""
    data, ready = root / name, root / f"{name}.ready"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        str(REPO / p) for p in ("broker", "client", "worker")
    )
    cmd = [sys.executable, "-m", "qbroker", "serve", "--port", "0",
           "--data-dir", str(data), "--ready-file", str(ready), "--log-level", "warning"]  # fmt: skip
    log = (root / f"{name}.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker {name} did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{int(ready.read_text())}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def add_schedules(url: str, n: int, prefix: str, cron: str | None = None) -> float:
    """PUT n cron schedules; returns the seconds it took. Without `cron`, each gets a
    daily time an hour or more away (none fires during the run)."""
    base = datetime.now() + timedelta(hours=2)
    start = time.perf_counter()
    with Schedules(url) as s:
        for i in range(n):
            when = base + timedelta(minutes=i % 600)
            expr = cron or f"{when.minute} {when.hour} * * *"
            s.put(f"{prefix}{i}", ScheduleSpec(task="tick", queue="ticks", cron=expr))
    return time.perf_counter() - start


def lease_round(client: Client, n: int) -> list[float]:
    """n lease(max=1)+ack pairs, in turn; seconds each."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        [job] = client.lease([QUEUE], max=1)
        client.ack(job.id, job.lease, None)
        out.append(time.perf_counter() - t)
    return out


def bench_lease(root: Path, schedules: int, rounds: int, per_round: int) -> None:
    print(f"== lease+ack with 0 vs {schedules:,} schedules "
          f"({rounds} rounds x {per_round}, alternating) ==")  # fmt: skip
    with broker(root, "plain") as plain, broker(root, "sched") as sched:
        took = add_schedules(sched, schedules, "s")
        print(f"   {schedules:,} schedules PUT in {took:.1f} s")
        times: dict[str, list[float]] = {"0 schedules": [], f"{schedules:,}": []}
        clients = {}
        for key, url in zip(times, (plain, sched), strict=True):
            clients[key] = c = Client(url, encoding="msgpack")
            for start in range(0, rounds * per_round, 1000):
                c.send_many(QUEUE, [{"args": [i]} for i in range(start, start + 1000)])
        for r in range(rounds):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for key in order:
                times[key] += lease_round(clients[key], per_round)
        for c in clients.values():
            c.close()
    means = {}
    for key, xs in times.items():
        means[key] = statistics.fmean(xs) * 1e6
        p50 = statistics.median(xs) * 1e6
        p99 = sorted(xs)[int(len(xs) * 0.99)] * 1e6
        print(f"   {key:>12}: mean {means[key]:7.0f} us  p50 {p50:7.0f} us  "
              f"p99 {p99:7.0f} us per lease+ack  (n={len(xs)})")  # fmt: skip
    a, b = means.values()
    print(f"   ratio with/without schedules: {b / a:.3f}")


def bench_fire(root: Path, n: int) -> None:
    print(f"== {n:,} schedules due in the same second ==")
    with broker(root, "fire") as url:
        at = datetime.now().replace(second=0, microsecond=0) + timedelta(minutes=1)
        if (at - datetime.now()).total_seconds() < 15:
            at += timedelta(minutes=1)  # time to PUT them all first
        took = add_schedules(url, n, "f", cron=f"{at.minute} {at.hour} * * *")
        fire_time = at.timestamp()
        print(f"   {n:,} schedules PUT in {took:.1f} s; all due at {at:%H:%M:%S}")
        with Client(url) as c:
            while c.queue("ticks").counts["queued"] < n:
                time.sleep(0.01)
            seen = time.time() - fire_time
            with Schedules(url) as s:
                jobs = [s.jobs(f"f{i}", limit=1)[0] for i in range(n)]
    lags = sorted(j.created_at - j.headers["qbroker.fire_time"] for j in jobs)
    print(f"   firing lag (created_at - fire time): min {lags[0]:.3f} s, "
          f"max {lags[-1]:.3f} s")  # fmt: skip
    print(f"   all {n:,} queued, seen by a client polling every 10 ms: "
          f"{seen:.3f} s after the fire time")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("lease", "fire"))
    ap.add_argument("--schedules", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=300)
    ap.add_argument("--fire", type=int, default=1000)
    ns = ap.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f}; commit "
          + subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True).stdout.strip())  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="qb-sched-") as tmp:
        if ns.only in (None, "lease"):
            bench_lease(Path(tmp), ns.schedules, ns.rounds, ns.per_round)
        if ns.only in (None, "fire"):
            bench_fire(Path(tmp), ns.fire)


if __name__ == "__main__":
    main()
