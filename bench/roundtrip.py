"""Where a round trip's time goes: send, lease, run+ack, result (issue 3's latency).

Starts a broker and a `qworker --pool threads --concurrency 8` (as bench/e2e.py does;
`--concurrency` and `--pool` change it),
then runs N sequential `client.send(...)` + `client.wait_job(id)` and splits each round
trip with the job's own timestamps (the broker's clock, the same host):

  send              client.send() returned (the enqueue committed)
  send -> leased    from the send's start to the job's started_at (its lease)
  leased -> finished  started_at to finished_at (the worker ran it and its ack arrived)
  finished -> got   finished_at to wait_job() returning in the client
  total             the whole round trip

and prints the CPU time each process (broker, worker with its pool children, this
client) spent per round trip.

Usage:

  python bench/roundtrip.py             # 300 round trips after 50 warm-up ones
  python bench/roundtrip.py --n 1000
  python bench/roundtrip.py --concurrency 2 --pool processes
  python bench/roundtrip.py --pin 0/01/01   # broker on CPU 0; worker, client on 0 or 1

`--pin B/W/C` sets the CPU affinity of every thread of the broker, of the worker (and its
children), and of this process, after the warm-up: digits are CPU numbers, "-" leaves
that process alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import e2e
import psutil
import qclient


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def _pin(procs: list[psutil.Process], cpus: str) -> None:
    """Set the CPU affinity of every thread of `procs` ("-": leave them alone)."""
    if cpus == "-":
        return
    mask = {int(c) for c in cpus}
    for p in procs:
        for th in p.threads():
            os.sched_setaffinity(th.id, mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="round trips measured")
    ap.add_argument("--concurrency", type=int, default=8, help="the worker's slots")
    ap.add_argument("--pool", choices=("threads", "processes"), default="threads")
    ap.add_argument(
        "--pin", help="CPU affinity B/W/C of broker/worker/client, e.g. 0/1/1"
    )
    a = ap.parse_args()
    with e2e.running_broker("roundtrip") as b:
        log = Path(tempfile.mkdtemp(prefix="qb-rt-")) / "worker.log"
        w = e2e.QWorker(b.url, "lat", a.pool, a.concurrency, log).start()
        try:
            c = qclient.Client(b.url)
            for _ in range(50):
                c.send("lat", task="noop").result(timeout=10)
            assert b.proc is not None
            assert w.proc is not None
            broker = [psutil.Process(b.proc.pid)]
            worker = [psutil.Process(w.proc.pid)]
            worker += worker[0].children(recursive=True)
            if a.pin:
                cb, cw, cc = a.pin.split("/")
                _pin(broker, cb)
                _pin(worker, cw)
                if cc != "-":
                    os.sched_setaffinity(0, {int(c) for c in cc})
            rows = []
            before = e2e.scrape(b.url)
            cpu0 = (_cpu_seconds(broker), _cpu_seconds(worker), time.process_time())
            for _ in range(a.n):
                t0 = time.time()
                job = c.send("lat", task="noop")
                t1 = time.time()
                r = c.wait_job(job.id, 10)
                t2 = time.time()
                if r.started_at is None or r.finished_at is None:
                    raise RuntimeError(f"job did not finish: {r}")
                rows.append(
                    (
                        t1 - t0,
                        r.started_at - t0,
                        r.finished_at - r.started_at,
                        t2 - r.finished_at,
                        t2 - t0,
                    )
                )
            cpu1 = (_cpu_seconds(broker), _cpu_seconds(worker), time.process_time())
            used = e2e.scrape(b.url) - before
            c.close()
        finally:
            w.stop()
    names = ["send", "send -> leased", "leased -> finished", "finished -> got", "total"]
    for i, name in enumerate(names):
        v = sorted(row[i] for row in rows)
        p50, p90 = v[len(v) // 2], v[int(len(v) * 0.9)]
        print(f"{name:20s} p50 {p50 * 1e3:6.2f} ms  p90 {p90 * 1e3:6.2f} ms")
    per = ", ".join(f"{k} {v / a.n:.2f}" for k, v in sorted(used.items()))
    print(f"per round trip: {per}")
    cpu = ", ".join(
        f"{name} {(t1 - t0) / a.n * 1e6:.0f} us"
        for name, t0, t1 in zip(("broker", "worker", "client"), cpu0, cpu1, strict=True)
    )
    print(f"CPU per round trip: {cpu}")


if __name__ == "__main__":
    main()
