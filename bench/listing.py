"""The job listing's cost against table size (issue 25): `GET /v1/jobs` pages at 10,000
and at 1,000,000 stored jobs, with and without an argument filter.

Store level, no HTTP: it builds each table with the broker's own write unit
(synchronous=OFF: building is not what is measured), then times the reader's
`list_jobs` for one page (median of 5). A page examines one window of at most 20,000
rows (qbroker.jobfilter.SCAN_LIMIT), so its cost should not grow with the table.

    python bench/listing.py            # ~30 s
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / p) for p in ("broker", "client")]

from qbroker.jobfilter import parse_filter  # noqa: E402
from qbroker.store.interface import Changes, Defaults  # noqa: E402
from qbroker.store.sqlite import schema  # noqa: E402
from qbroker.store.sqlite.reads import Reader  # noqa: E402
from qbroker.store.sqlite.writes import Writes  # noqa: E402
from qclient.wire import JobSpec  # noqa: E402

BATCH = 10_000


def build(root: Path, n: int) -> tuple[Reader, float]:
    """`n` queued jobs in five queues, kwargs {"user_id": i}."""
    conn = schema.open_writer(root / "qbroker.db", synchronous="OFF")
    writes = Writes(conn)
    defaults = Defaults(max_retries=3, lease_seconds=30, result_ttl=3600)
    now = time.time()
    for start in range(0, n, BATCH):
        specs = [
            JobSpec(task="t", kwargs={"user_id": i, "to": "a@b.c"})
            for i in range(start, start + BATCH)
        ]
        conn.execute("BEGIN")
        writes.enqueue(
            f"q{start // BATCH % 5}", specs, defaults=defaults, now=now,
            changes=Changes(),
        )  # fmt: skip
        conn.execute("COMMIT")
    conn.close()
    return Reader(root / "qbroker.db"), now


def main() -> int:
    print(f"{'jobs':>9}  {'query':<40} {'page ms':>8} {'jobs':>5}  next")
    for n in (10_000, 1_000_000):
        with tempfile.TemporaryDirectory() as tmp:
            reader, now = build(Path(tmp), n)
            for query in (
                {"limit": "50"},
                {"queue": "q1", "state": "queued", "limit": "50"},
                {"kwargs.user_id": str(n // 2)},
                {"kwargs.user_id": "-1"},
            ):
                where = parse_filter(query)
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    page = reader.list_jobs(where, now)
                    times.append(time.perf_counter() - t0)
                text = "&".join(f"{k}={v}" for k, v in query.items())
                print(
                    f"{n:>9,}  {text:<40} {1e3 * statistics.median(times):>8.1f}"
                    f" {len(page.jobs):>5}  {page.next}"
                )
            reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
