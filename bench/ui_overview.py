"""How long the dashboard's pages take to render on a broker holding a million jobs.

Starts `qbroker serve` on a temp data dir (or `--data-dir`, kept for a rerun), fills
it through the API to `--jobs` jobs over `--queues` queues (`send_many` batches of
10,000; a few hundred leased and failed so the failure lists have rows), registers 20
workers, then fetches each page `--repeat` times over one keep-alive connection, as a
browser would, and prints the median and worst render time of each.

    python bench/ui_overview.py                     # 1,000,000 jobs (~2-4 min to fill)
    python bench/ui_overview.py --jobs 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in ("broker", "client", "worker"):
    sys.path.insert(0, str(ROOT / _p))

import qclient  # noqa: E402  (after the path set-up above)
from qclient.wire import WorkerBeat  # noqa: E402

PAGES = ("/ui", "/ui/queues", "/ui/workers", "/ui/jobs", "/ui/dead")
BATCH = 10_000


def start_broker(data: Path) -> tuple[subprocess.Popen[bytes], int]:
    ready = data.parent / f"{data.name}.ready"
    ready.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(ROOT / p) for p in ("broker", "client", "worker")))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "qbroker", "serve", "--port", "0", "--host", "127.0.0.1",
         "--data-dir", str(data), "--ready-file", str(ready), "--log-level", "error"],
        env=env,
    )  # fmt: skip
    while not ready.exists() or not ready.read_text().strip():
        if proc.poll() is not None:
            raise SystemExit("broker exited")
        time.sleep(0.05)
    return proc, int(ready.read_text())


def fill(url: str, jobs: int, queues: int) -> None:
    with qclient.Client(url, timeout=120) as c:
        have = sum(sum(q.counts.values()) for q in c.queues())
        started = time.monotonic()
        sent = have
        while sent < jobs:
            n = min(BATCH, jobs - sent)
            queue = f"queue-{sent // BATCH % queues}"
            c.send_many(queue, [{"i": sent + i, "user_id": i % 1000} for i in range(n)])
            sent += n
        if sent > have:
            print(f"filled {sent - have:,} jobs in {time.monotonic() - started:.1f} s")
        for leased in c.lease(["queue-0"], max=300):
            c.fail(leased.id, leased.lease, error="ValueError: bench")
        for i in range(20):
            c.beat(WorkerBeat(name=f"bench-worker-{i}", queues=["queue-0"],
                              pool="threads", concurrency=8, interval=3600))  # fmt: skip


def measure(port: int, repeat: int) -> dict[str, list[float]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out: dict[str, list[float]] = {}
    for page in PAGES:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            conn.request("GET", page)
            reply = conn.getresponse()
            body = reply.read()
            times.append(time.perf_counter() - t)
            assert reply.status == 200, (page, reply.status, body[:300])
        out[page] = times
    conn.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--queues", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--data-dir", type=Path, help="keep the filled broker here")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = ns.data_dir or Path(tmp) / "data"
        proc, port = start_broker(data)
        try:
            fill(f"http://127.0.0.1:{port}", ns.jobs, ns.queues)
            results = measure(port, ns.repeat)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{ns.jobs:,} jobs over {ns.queues} queues, {ns.repeat} fetches per page")
    print(f"{'page':<14}{'median ms':>10}{'max ms':>10}")
    for page, times in results.items():
        med, worst = statistics.median(times) * 1000, max(times) * 1000
        print(f"{page:<14}{med:>10.1f}{worst:>10.1f}")
    return 0 if proc.returncode is not None else 1


if __name__ == "__main__":
    sys.exit(main())
