"""`qbroker backup DEST`: a consistent copy of the database taken while a producer
and a worker keep the broker busy, restored by starting a broker on it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import qclient

from tests.conftest import BrokerFactory, child_env

QUEUE = "backupq"


def run_backup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qbroker", "backup", *args],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_backup_under_load_restores_every_acknowledged_job(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    live = broker_factory(name="live").start()
    stop = threading.Event()
    lock = threading.Lock()
    enqueued: list[tuple[float, str]] = []  #: (when the enqueue's 2xx came, id)
    acked: list[tuple[float, str]] = []  #: (when the ack's 2xx came, id)
    errors: list[BaseException] = []

    def produce() -> None:
        with qclient.Client(live.url, timeout=30) as client:
            n = 0
            while not stop.is_set():
                job = client.send(QUEUE, {"n": n, "pad": "x" * 200})
                with lock:
                    enqueued.append((time.monotonic(), job.id))
                n += 1

    def work() -> None:
        with qclient.Client(live.url, timeout=30) as client:
            while not stop.is_set():
                for job in client.lease([QUEUE], max=5, wait=0.2):
                    client.ack(job.id, job.lease, job.kwargs["n"])
                    with lock:
                        acked.append((time.monotonic(), job.id))

    def guarded(fn: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
                stop.set()

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    threads = [guarded(produce), guarded(work)]
    try:
        deadline = time.monotonic() + 60
        while len(acked) < 200 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        dest = tmp_path / "copy"
        dest.mkdir()
        started = time.monotonic()
        proc = run_backup(str(dest), "--data-dir", str(live.data_dir))
        finished = time.monotonic()
        time.sleep(0.3)  # the load goes on after the copy too
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert proc.returncode == 0, proc.stderr
    assert "backed up" in proc.stdout and str(dest / "qbroker.db") in proc.stdout
    with lock:
        before = {i for t, i in enqueued if t < started}
        done_before = {i for t, i in acked if t < started}
        after = {i for t, i in enqueued if t > finished}
    assert len(done_before) >= 200 and after, "the load ran during the backup"
    assert sorted(p.name for p in dest.iterdir()) == ["qbroker.db"]  # one file

    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    shutil.copy(dest / "qbroker.db", restored_dir / "qbroker.db")
    restored = broker_factory(name="restored").start()
    with qclient.Client(restored.url, timeout=30) as client:
        for job_id in sorted(before):
            record = client.get_job(job_id)  # JobNotFound if the copy lost it
            if job_id in done_before:
                assert record.state == "succeeded", record
        # a job enqueued after the copy finished is not in it
        with pytest.raises(qclient.JobNotFound):
            client.get_job(sorted(after)[-1])
    live.stop()


def test_backup_refuses_to_overwrite_and_needs_a_database(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    live = broker_factory(name="live").start()
    with qclient.Client(live.url) as client:
        client.send(QUEUE, 1)
    target = tmp_path / "one.db"
    assert run_backup(str(target), "--data-dir", str(live.data_dir)).returncode == 0
    again = run_backup(str(target), "--data-dir", str(live.data_dir))
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "exists" in again.stderr
    missing = run_backup(str(tmp_path / "two.db"), "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 1 and "no database" in missing.stderr
    assert not (tmp_path / "two.db").exists()
