"""What one small request costs the broker: CPU per request, per thread.

One blocking connection (no concurrency, so no group commit and no contention from
other clients) sends, one at a time:

  healthz      GET /healthz: the HTTP and trio floor, no store call
  lease+ack    POST /v1/lease max=1 carrying the previous job's ack, as a worker with
               one free slot does: one writer call and one commit per request
  enqueue      POST one job: one writer call and one commit per request
  batch100     POST 100 jobs in one request

and reads the broker's per-thread CPU from /proc before and after. Figures move with
the machine's speed: compare them with a base tree run alternately, e.g. with
`python /tmp/base/bench/reqcost.py` (each tree's bench runs its own broker code).

Usage:

  python bench/reqcost.py [--n 3000]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import _rawhttp as rh
import e2e
import msgspec
from qclient.wire import LeaseReply

_TICK = os.sysconf("SC_CLK_TCK")
QUEUE = "bench"
JOB = {
    "task": "send_email",
    "kwargs": {"to": "user@example.com", "subject": "hi", "n": 42},
}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of `pid`, keyed by thread id."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def measure(pid: int, n: int, step: Callable[[], None]) -> tuple[float, list[float]]:
    """Run `step` n times; wall us per step and per-thread CPU us per step."""
    before = thread_cpu(pid)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    wall = time.perf_counter() - t0
    after = thread_cpu(pid)
    per = sorted(
        ((after[t] - before.get(t, 0.0)) / n * 1e6 for t in after), reverse=True
    )
    return wall / n * 1e6, [p for p in per if p >= 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per measure")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy raw profiles of the broker, one per measure")  # fmt: skip
    ap.add_argument("--all-threads", dest="gil", action="store_false",
                    help="profile every thread, not only the GIL holder")  # fmt: skip
    a = ap.parse_args()
    decode_lease = msgspec.msgpack.Decoder(LeaseReply).decode
    with e2e.running_broker("reqcost") as b:
        conn = rh.Conn(*b.addr)
        health = rh.request_bytes("GET", "/healthz")
        one = rh.request_bytes("POST", f"/v1/queues/{QUEUE}/jobs", JOB)
        batch = rh.request_bytes(
            "POST", f"/v1/queues/{QUEUE}/jobs", {"jobs": [JOB] * 1000}
        )
        for _ in range(a.n // 1000 + 2):
            conn.roundtrip(batch)
        hundred = rh.request_bytes(
            "POST", f"/v1/queues/{QUEUE}/jobs", {"jobs": [JOB] * 100}
        )
        held: list[dict[str, str]] = []

        def lease_ack() -> None:
            body = {"queues": [QUEUE], "max": 1, "worker": "w", "acks": held[-1:]}
            status, reply = conn.roundtrip(rh.request_bytes("POST", "/v1/lease", body))
            assert status == 200, reply
            [job] = decode_lease(reply).jobs
            held[:] = [{"id": job.id, "lease": job.lease}]

        steps: list[tuple[str, Callable[[], None]]] = [
            ("healthz", lambda: conn.roundtrip(health)),
            ("lease+ack", lease_ack),
            ("enqueue", lambda: conn.roundtrip(one)),
            ("batch100", lambda: conn.roundtrip(hundred)),
        ]
        for name, step in steps:
            for _ in range(200):  # warm up
                step()
            spy = None
            if a.profile is not None:
                a.profile.mkdir(parents=True, exist_ok=True)
                spy = e2e.Spy(b.pid, a.profile / f"{name}.txt", gil=a.gil)
                time.sleep(0.5)
            wall, threads = measure(b.pid, a.n, step)
            if spy is not None:
                spy.stop()
            cpu = " + ".join(f"{t:.0f}" for t in threads)
            print(f"{name:10s} wall {wall:6.0f} us/request  broker CPU {sum(threads):5.0f}"
                  f" us/request (by thread: {cpu})")  # fmt: skip
        conn.close()


if __name__ == "__main__":
    main()
