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

Usage:

  python bench/roundtrip.py             # 300 round trips after 50 warm-up ones
  python bench/roundtrip.py --n 1000
  python bench/roundtrip.py --concurrency 2 --pool processes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import e2e
import qclient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="round trips measured")
    ap.add_argument("--concurrency", type=int, default=8, help="the worker's slots")
    ap.add_argument("--pool", choices=("threads", "processes"), default="threads")
    a = ap.parse_args()
    with e2e.running_broker("roundtrip") as b:
        log = Path(tempfile.mkdtemp(prefix="qb-rt-")) / "worker.log"
        w = e2e.QWorker(b.url, "lat", a.pool, a.concurrency, log).start()
        try:
            c = qclient.Client(b.url)
            for _ in range(50):
                c.send("lat", task="noop").result(timeout=10)
            rows = []
            before = e2e.scrape(b.url)
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


if __name__ == "__main__":
    main()
