"""The process pool's own cost per job, without a broker: qworker's side of issue 3.

Submits N no-op executions one after another to a `ProcessPool` of one child (the
`noop` task of bench_tasks.py) and prints the parent's CPU time and the wall time per
job. Both exclude HTTP and the broker, so they isolate the pipe, the child's decode and
encode, and the slot thread's wait for the reply.

Usage (from the repository root; run it against another checkout with PYTHONPATH):

  python bench/pool.py               # 3 rounds of 5,000 jobs
  python bench/pool.py --n 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_tasks  # registers noop
from qclient.wire import LeasedJob
from qworker._execute import Execution, Outcome
from qworker.pools import make_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="jobs per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    done = threading.Event()
    outcomes: list[Outcome] = []

    def on_done(_: Execution, outcome: Outcome) -> None:
        outcomes.append(outcome)
        done.set()

    pool = make_pool("processes", 1, on_done, modules=["bench_tasks"])
    pool.start()
    noop = bench_tasks.noop
    job = LeasedJob(
        id="j", queue="q", task="noop", args=[], kwargs={}, headers={}, lease="l",
        attempt=1, max_retries=0, timeout=30.0, lease_expires_at=0.0,
    )  # fmt: skip
    try:
        for _ in range(a.rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(a.n):
                done.clear()
                pool.submit(Execution(job, noop, 0.0))
                done.wait()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(
                f"parent CPU {cpu / a.n * 1e6:5.1f} us/job   "
                f"wall {wall / a.n * 1e6:5.1f} us/job   ({a.n} jobs)"
            )
    finally:
        pool.close(timeout=5.0)
    if not all(o.ok for o in outcomes):
        raise SystemExit("a no-op job failed")


if __name__ == "__main__":
    main()
