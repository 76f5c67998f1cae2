"""Faults from outside the broker: a full disk, a quota, an unusable data dir, a damaged
database file, a wall clock that jumps.

The full-disk test mounts a small tmpfs (we run as root in CI; elsewhere it skips) and
fills it; the same promises are checked with `--max-db-bytes`, which needs no mount.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from qbroker.clock import Clock
from qbroker.store import Changes, Defaults
from qbroker.store.sqlite.schema import open_writer
from qbroker.store.sqlite.writes import Writes
from qclient.wire import JobSpec

from tests.conftest import BrokerFactory, BrokerProcess, child_env
from tests.wirehttp import Wire, wait_for

FS_BYTES = 4 * 1024 * 1024  #: size of the small filesystem
HEADROOM = 600_000  #: bytes left free after the filler: the WAL fills them, then 507s
BATCH = [{"args": ["x" * 1000, i]} for i in range(20)]  #: ~21 KB an enqueue


def _mount_tmpfs(where: Path, size: int, *options: str) -> bool:
    """Mount a tmpfs; False where we may not (not root, no mount, a sandbox)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
        capture_output=True,
        timeout=10,
    )
    return done.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=10)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted after the test (after its brokers are stopped)."""
    where = tmp_path / "small"
    if not _mount_tmpfs(where, FS_BYTES):
        pytest.skip("cannot mount a tmpfs here (needs root); the quota test covers 507")
    yield where
    _umount(where)


def _enqueue_until_refused(w: Wire, queue: str, acked: list[str]) -> Counter[int]:
    """Enqueue batches until the broker answers 507; returns the statuses seen."""
    seen: Counter[int] = Counter()
    for _ in range(2000):
        status, reply = w.call("POST", f"/v1/queues/{queue}/jobs", {"jobs": BATCH})
        seen[status] += 1
        if status == 201:
            acked += reply["ids"]
        else:
            assert status == 507, (status, reply)
            assert reply["error"] == "disk_full" and reply["message"], reply
            break
    assert seen[507] == 1, f"never refused: {seen}"
    return seen


def _check_reads_and_nothing_lost(w: Wire, queue: str, acked: list[str]) -> None:
    assert w.ok("GET", "/healthz")["status"] == "ok"
    counts = w.ok("GET", f"/v1/queues/{queue}")["counts"]
    assert sum(counts.values()) == len(acked), counts
    for job_id in acked[:: max(1, len(acked) // 50)] + acked[-1:]:
        assert w.job(job_id)["queue"] == queue


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_full_disk_gets_507_keeps_reads_and_loses_nothing(
    small_fs: Path, broker_factory: BrokerFactory
) -> None:
    # no free-space floor: this is about the disk really filling up
    b = BrokerProcess(small_fs / "data", ("--min-free-disk", "0"))
    try:
        b.start()
        w = Wire(b.url)
        acked: list[str] = []
        acked += w.ok("POST", "/v1/queues/full/jobs", {"jobs": BATCH})["ids"]
        # due while the disk is full: the reaper must survive its failing sweeps
        delayed = w.ok("POST", "/v1/queues/full/jobs", {"jobs": [{"delay": 1.0}] * 10})[
            "ids"
        ]
        acked += delayed
        [leased] = w.lease("full")
        w.ok("POST", f"/v1/jobs/{leased['id']}/ack", {"lease": leased["lease"]})

        filler = small_fs / "filler"
        free = os.statvfs(small_fs)
        filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - HEADROOM))
        seen = _enqueue_until_refused(w, "full", acked)
        # other writes are refused too, with 507 and not a crash
        status, _ = w.call("POST", "/v1/queues/other/jobs", {"jobs": BATCH * 5})
        assert status == 507
        # let the checkpointer and the reaper run into the full disk
        time.sleep(3.0)
        assert b.proc is not None and b.proc.poll() is None, "the broker died"
        _check_reads_and_nothing_lost(w, "full", acked)
        assert w.job(leased["id"])["state"] == "succeeded"

        filler.unlink()
        status, reply = wait_for(
            lambda: (
                (r := w.call("POST", "/v1/queues/full/jobs", {"jobs": BATCH}))[0] == 201
                and r
            ),
            timeout=10,
        )
        acked += reply["ids"]
        wait_for(lambda: w.job(delayed[-1])["state"] == "queued", timeout=10)
        _check_reads_and_nothing_lost(w, "full", acked)
        w.close()
        assert b.stop() == 0
        assert _integrity(small_fs / "data" / "qbroker.db") == "ok"
        b.start()  # and the file holds it all
        w = Wire(b.url)
        _check_reads_and_nothing_lost(w, "full", acked)
        w.close()
        print(
            f"\ndisk full: {seen[201]} enqueues of 20 accepted, then 507; "
            f"{len(acked)} acknowledged jobs all kept"
        )
    finally:
        b.stop()


def test_db_quota_gets_507_keeps_reads_and_loses_nothing(
    broker_factory: BrokerFactory,
) -> None:
    b = broker_factory(name="quota", args=("--max-db-bytes", "400000")).start()
    w = Wire(b.url)
    acked: list[str] = []
    seen = _enqueue_until_refused(w, "quota", acked)
    assert len(acked) >= 100  # the quota let real work in first
    for _ in range(3):  # refused again, the same way
        status, reply = w.call("POST", "/v1/queues/quota/jobs", {"jobs": BATCH})
        assert (status, reply["error"]) == (507, "disk_full")
    _check_reads_and_nothing_lost(w, "quota", acked)
    # small writes that need no new page still work: lease and ack
    [job] = w.lease("quota")
    w.ok("POST", f"/v1/jobs/{job['id']}/ack", {"lease": job["lease"], "result": 1})
    w.close()
    assert b.stop() == 0
    size = (b.data_dir / "qbroker.db").stat().st_size
    assert size <= 400_000 + 4096, size
    b.args = ()  # lift the quota: writes are accepted again, nothing was lost
    b.start()
    w = Wire(b.url)
    acked += w.ok("POST", "/v1/queues/quota/jobs", {"jobs": BATCH})["ids"]
    _check_reads_and_nothing_lost(w, "quota", acked)
    w.close()
    print(f"\nquota: {seen[201]} enqueues of 20 accepted, then 507; db {size} bytes")


def test_max_db_bytes_comes_from_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qbroker import cli

    parse = cli.build_parser().parse_args
    assert cli.config_from(parse(["serve"])).max_db_bytes is None
    monkeypatch.setenv("QBROKER_MAX_DB_BYTES", "5000000")
    assert cli.config_from(parse(["serve"])).max_db_bytes == 5_000_000
    flagged = parse(["serve", "--max-db-bytes", "7000000"])
    assert cli.config_from(flagged).max_db_bytes == 7_000_000


# ---------------------------------------------------------------- refusing to start


def _serve(data_dir: Path, timeout: float = 30.0) -> tuple[int, str, str]:
    """Run `qbroker serve` on `data_dir`; it should exit by itself."""
    done = subprocess.run(
        [sys.executable, "-m", "qbroker", "serve", "--host", "127.0.0.1",
         "--port", "0", "--data-dir", str(data_dir)],
        env=child_env(), capture_output=True, timeout=timeout,
    )  # fmt: skip
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _assert_refused(data_dir: Path, *words: str) -> str:
    rc, out, err = _serve(data_dir)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0, (rc, out, err)
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("qbroker: "), lines
    for word in words:
        assert word in lines[0], lines
    assert "listening" not in out
    return lines[0]


@pytest.mark.parametrize("flag", ["--request-timeout", "--idle-timeout"])
def test_a_timeout_of_zero_is_refused(tmp_path: Path, flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "qbroker", "serve", "--port", "0",
         "--data-dir", str(tmp_path), flag, "0"],
        env=child_env(), capture_output=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.decode().strip().startswith("qbroker: the ")
    assert b"listening" not in done.stdout


@pytest.fixture(scope="module")
def real_db(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a real qbroker.db holding 300 jobs, closed cleanly."""
    path = tmp_path_factory.mktemp("realdb") / "qbroker.db"
    writes = Writes(open_writer(path))
    writes.conn.execute("BEGIN")
    writes.enqueue(
        "q",
        [JobSpec(args=["x" * 2000, i]) for i in range(300)],
        defaults=Defaults(max_retries=3, lease_seconds=30.0, result_ttl=3600.0),
        now=1e9,
        changes=Changes(),
    )
    writes.conn.execute("COMMIT")
    writes.conn.close()
    return path.read_bytes()


def _damaged(good: bytes) -> dict[str, bytes]:
    rnd = random.Random(4)
    page = 4096
    scattered = bytearray(good)
    for p in range(5, len(good) // page, 7):
        start = p * page  # the page's header and cell pointers: never free space
        scattered[start : start + 200] = rnd.randbytes(200)
    return {
        "random bytes": rnd.randbytes(50_000),
        "truncated to half": good[: len(good) // 2],
        "truncated mid-page": good[: 3 * page + 100],
        "header only": good[:100],
        "page 1 garbled": good[:100] + rnd.randbytes(page - 100) + good[page:],
        "tail garbled": good[: 2 * page] + rnd.randbytes(len(good) - 2 * page),
        "some pages garbled": bytes(scattered),
    }


def test_damaged_database_is_refused_with_one_line_and_left_untouched(
    tmp_path: Path, real_db: bytes
) -> None:
    reasons = {}
    for name, data in _damaged(real_db).items():
        data_dir = tmp_path / name.replace(" ", "-")
        data_dir.mkdir()
        db = data_dir / "qbroker.db"
        db.write_bytes(data)
        reasons[name] = _assert_refused(data_dir, str(db))
        assert db.read_bytes() == data, f"{name}: the broker changed the file"
    print("\n" + "\n".join(f"{k}: {v}" for k, v in reasons.items()))


def test_healthy_database_still_starts(tmp_path: Path, real_db: bytes) -> None:
    data_dir = tmp_path / "ok"
    data_dir.mkdir()
    (data_dir / "qbroker.db").write_bytes(real_db)
    b = BrokerProcess(data_dir).start()
    try:
        w = Wire(b.url)
        assert w.ok("GET", "/v1/queues/q")["counts"]["queued"] == 300
        w.close()
    finally:
        b.stop()


def test_port_in_use_is_refused_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "qbroker", "serve", "--host", "127.0.0.1",
             "--port", str(port), "--data-dir", str(tmp_path / "data")],
            env=child_env(), capture_output=True, timeout=30,
        )  # fmt: skip
    lines = [ln for ln in done.stderr.decode().splitlines() if ln.strip()]
    assert done.returncode == 1, done
    assert len(lines) == 1 and "cannot listen" in lines[0], lines


def test_data_dir_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    _assert_refused(a_file / "data", "cannot create data dir")  # parent is a file
    _assert_refused(a_file, "cannot create data dir")  # the data dir is a file
    assert a_file.read_text() == "not a directory\n"


def test_read_only_data_dir_is_refused_and_left_untouched(
    tmp_path: Path, real_db: bytes
) -> None:
    """Root ignores permission bits, so the read-only dir is a read-only mount."""
    where = tmp_path / "ro"
    if not _mount_tmpfs(where, FS_BYTES):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (where / "data").mkdir()
        db = where / "data" / "qbroker.db"
        db.write_bytes(real_db)
        remount = subprocess.run(
            ["mount", "-o", "remount,ro", str(where)], capture_output=True, timeout=10
        )
        assert remount.returncode == 0, remount.stderr
        _assert_refused(where / "data", "not writable")
        _assert_refused(where / "new", "cannot create data dir")
        assert db.read_bytes() == real_db
        assert sorted(p.name for p in (where / "data").iterdir()) == ["qbroker.db"]
    finally:
        _umount(where)


# ---------------------------------------------------------------- the clock


def test_clock_never_goes_back_when_the_wall_clock_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Leases and delays are timed by Clock.now(): the wall clock read once at start,
    advanced by time.monotonic(). Stepping the wall clock back an hour, or forward a
    day, after that changes nothing."""
    real_time = time.time
    c = Clock()
    start = c.now()
    wall: list[float] = [real_time()]

    def jumping_wall() -> float:
        wall[0] -= 3600.0  # an hour back at every read
        return wall[0]

    monkeypatch.setattr(time, "time", jumping_wall)
    seen = [c.now() for _ in range(1000)]
    assert all(b >= a for a, b in itertools.pairwise(seen))
    assert abs(seen[-1] - real_time()) < 5.0
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400.0)
    assert abs(c.now() - real_time()) < 5.0
    # a clock made now reads the (wrong) wall clock once: that is the anchor
    assert abs(Clock().now() - (real_time() + 86400.0)) < 5.0
    assert c.now() >= start
