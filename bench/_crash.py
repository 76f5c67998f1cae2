"""`bench/soak.py --crash`: the broker SIGKILLed under high load loses nothing.

One broker, restarted on the same data dir and port after each of `--kills` SIGKILLs
spread over `--seconds`; 8 producer threads sending as fast as they can, half of their
calls `send()` of one job and half `send_many()` of 100, with ids chosen here; two
`qworker`s (threads/8 and processes/2, `--prefetch 1000`) running
`bench_tasks.crash_run`, which appends `job_id token time` to a runs log and returns
the token. Producers pause while more than `--backlog` jobs wait, so the drain at the
end stays short.

An enqueue is *acknowledged* once its `send()`/`send_many()` returned; a call that
failed in transport is resent with the same ids (a 409 after a resend means the lost
try stored them). After the last restart the producers stop and the workers drain the
queue. Checked, per acknowledged job:

- lost: no record, or a record not `succeeded`. Must be 0.
- stale: the workers' `job.finished` lines show exactly one accepted ack (outcome
  `succeeded`) per job, at the attempt the record ends with; an ack accepted on an
  older lease would show a smaller attempt. Must be 0.
- the record's result is the token of one of the job's runs, and the job ran no more
  often than it was leased (`runs <= attempts`).
- re-runs: a job that ran more than once is at-least-once delivery only if a broker
  kill falls between its first run's lease (at most LEASE + PREFETCH_HOLD before the
  run) and its last run. Those are counted as crash re-runs; any other is a duplicate
  and fails the run.
- no job stored but never sent, and `PRAGMA quick_check` says ok after a clean stop.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import e2e
import qclient

QUEUE = "crash_run"  #: the task's name, and so its queue
LEASE = 10.0  #: lease seconds of every job
PREFETCH_HOLD = 2.0  #: seconds a prefetched job may wait for a slot before it runs
BATCH = 100  #: jobs per send_many()
MAX_RETRIES = 50
SEND_GIVE_UP = 30.0  #: seconds a producer keeps resending one call
DRAIN_TIMEOUT = 300.0  #: seconds the workers get to finish every job at the end
WORKERS = (("threads", 8), ("processes", 2))


class RestartableBroker(e2e.Broker):
    """A broker that keeps its port and data dir across SIGKILLs."""

    fixed_port = 0

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--port") + 1] = str(self.fixed_port)
        return cmd

    def crash_and_restart(self) -> float:
        """SIGKILL by PID, start again; returns seconds until it answered again."""
        assert self.proc is not None
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.ready.unlink(missing_ok=True)
        for attempt in range(10):
            try:
                self.start()
                break
            except RuntimeError:  # the port may be held for a moment
                if attempt == 9:
                    raise
                time.sleep(0.5)
        return time.monotonic() - t0


class Producer(threading.Thread):
    """Sends until stopped: `send()` of one job or `send_many()` of BATCH, by turns."""

    def __init__(
        self, index: int, url: str, stop: threading.Event, go: threading.Event
    ):
        super().__init__(name=f"producer-{index}", daemon=True)
        self.prefix = f"p{index}"
        self.url, self.stop, self.go = url, stop, go
        self.acked: list[str] = []
        self.unknown: list[str] = []  #: given up on after SEND_GIVE_UP: stored or not
        self.errors: list[str] = []
        self.resends = 0
        self.rng = random.Random(index)

    def run(self) -> None:
        n = 0
        with qclient.Client(self.url, timeout=5, retries=5) as client:
            while not self.stop.is_set():
                self.go.wait()
                size = 1 if self.rng.random() < 0.5 else BATCH
                ids = [f"{self.prefix}-{n + i}" for i in range(size)]
                n += size
                (self.acked if self._store(client, ids) else self.unknown).extend(ids)

    def _store(self, client: qclient.Client, ids: list[str]) -> bool:
        deadline = time.monotonic() + SEND_GIVE_UP
        resent = False
        while True:
            try:
                if len(ids) == 1:
                    client.send(QUEUE, args=ids, job_id=ids[0], timeout=LEASE,
                                max_retries=MAX_RETRIES)  # fmt: skip
                else:
                    client.send_many(QUEUE, [
                        qclient.JobSpec(id=i, args=[i], timeout=LEASE,
                                        max_retries=MAX_RETRIES) for i in ids
                    ])  # fmt: skip
                return True
            except qclient.DuplicateJob as exc:
                if resent:  # our ids are unique: the lost try stored them (all or none)
                    return True
                self.errors.append(f"{ids[0]}: {exc}")
                return False
            except qclient.ProtocolError:
                resent = True
                self.resends += 1
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            except qclient.BrokerError as exc:
                self.errors.append(f"{ids[0]}: {exc}")
                return False


def _throttle(
    url: str, backlog: int, go: threading.Event, stop: threading.Event
) -> None:
    """Hold the producers while more than `backlog` jobs wait to run."""
    with qclient.Client(url, timeout=2, retries=0) as client:
        while not stop.is_set():
            try:
                counts = client.queue(QUEUE).counts
                waiting = counts.get("queued", 0) + counts.get("scheduled", 0)
                (go.clear if waiting > backlog else go.set)()
            except qclient.QClientError:
                pass  # the broker is restarting: leave the gate as it is
            stop.wait(0.25)
    go.set()


def _start_worker(url: str, pool: str, conc: int, log: Path, runs: Path) -> Any:
    cmd = [sys.executable, "-m", "qworker", "--url", url, "--module", "bench_tasks",
           "--queue", QUEUE, "--pool", pool, "--concurrency", str(conc),
           "--prefetch", "1000", "--grace", "10", "--log-format", "json"]  # fmt: skip
    env = {**e2e.subprocess_env(), "QB_CRASH_RUNS": str(runs)}
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=e2e.BENCH_DIR, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    e2e.STARTED_PIDS.append(proc.pid)
    return proc


def _wait_drained(client: qclient.Client, expected: int) -> dict[str, int]:
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        counts = client.queue(QUEUE).counts
        unfinished = sum(counts.get(s, 0) for s in ("scheduled", "queued", "active"))
        if unfinished == 0 and sum(counts.values()) >= expected:
            return counts
        if time.monotonic() > deadline:
            raise TimeoutError(f"not drained after {DRAIN_TIMEOUT} s: {counts}")
        time.sleep(0.5)


def _read_runs(path: Path) -> dict[str, list[tuple[float, str]]]:
    runs: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    with path.open() as f:
        for line in f:
            job_id, token, at = line.split()
            runs[job_id].append((float(at), token))
    return runs


def _accepted_acks(logs: list[Path]) -> tuple[dict[str, list[int]], int]:
    """Per job, the attempts whose ack the broker accepted; and the deliveries it
    refused as stale (outcome `lost`)."""
    acks: dict[str, list[int]] = collections.defaultdict(list)
    refused = 0
    for log in logs:
        with log.open(errors="replace") as f:
            for line in f:
                if '"job.finished"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if ev.get("outcome") == "succeeded":
                        acks[ev["job_id"]].append(ev["attempt"])
                    elif ev.get("outcome") == "lost":
                        refused += 1
    return acks, refused


def run(a: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The crash run; returns its figures and an exit status (1 if a check failed)."""
    fig: dict[str, Any] = {"seconds": a.seconds, "kills": a.kills}
    b = RestartableBroker("crash")
    b.start()
    b.fixed_port = b.port  # restarts come back on the port it chose
    runs_path = b.dir / "runs.log"
    runs_path.touch()
    logs = [b.dir / f"worker-{pool}{c}.log" for pool, c in WORKERS]
    workers = [
        _start_worker(b.url, pool, c, log, runs_path)
        for (pool, c), log in zip(WORKERS, logs, strict=True)
    ]
    stop, go = threading.Event(), threading.Event()
    go.set()
    producers = [Producer(i, b.url, stop, go) for i in range(a.producers)]
    throttle = threading.Thread(target=_throttle, args=(b.url, a.backlog, go, stop))
    rng = random.Random(a.seed)
    kill_at = sorted(rng.uniform(0.05, 0.95) * a.seconds for _ in range(a.kills))
    kill_times: list[float] = []  #: unix times of the SIGKILLs
    downs: list[float] = []
    rc = 0
    try:
        t0 = time.monotonic()
        throttle.start()
        for p in producers:
            p.start()
        for at in kill_at:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            kill_times.append(time.time())
            downs.append(b.crash_and_restart())
            print(f"  kill {len(downs)} at {at:5.1f} s: back in {downs[-1]:.2f} s",
                  flush=True)  # fmt: skip
        time.sleep(max(0.0, t0 + a.seconds - time.monotonic()))
        stop.set()
        go.set()
        for p in producers:
            p.join(SEND_GIVE_UP + 10)
        throttle.join(5)
        sent_s = time.monotonic() - t0
        acked = [i for p in producers for i in p.acked]
        unknown = [i for p in producers for i in p.unknown]
        errors = [e for p in producers for e in p.errors]
        fig.update(acknowledged=len(acked), enqueues_per_s=round(len(acked) / sent_s),
                   unknown=len(unknown), producer_errors=len(errors),
                   producer_resends=sum(p.resends for p in producers),
                   max_down_s=round(max(downs, default=0.0), 2))  # fmt: skip
        print(f"  producers stopped: {len(acked):,} acknowledged in {sent_s:.0f} s; "
              "draining", flush=True)  # fmt: skip
        with qclient.Client(b.url, timeout=30) as client:
            t_drain = time.monotonic()
            counts = _wait_drained(client, len(acked))
            fig["drain_s"] = round(time.monotonic() - t_drain, 1)
            records: dict[str, tuple[str, int, Any]] = {}
            ids = acked + unknown
            for start in range(0, len(ids), 1000):
                chunk = ids[start : start + 1000]
                for job_id, rec in zip(
                    chunk, client.wait_jobs(chunk, 0.0), strict=True
                ):
                    if rec is not None:
                        records[job_id] = (str(rec.state), rec.attempts, rec.result)
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(30)
        b.stop(keep_dir=True)
        rc = _check(fig, acked, unknown, errors, records, counts, runs_path, logs,
                    kill_times, b.data / "qbroker.db")  # fmt: skip
    finally:
        stop.set()
        go.set()
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait(10)
        b.stop(keep_dir=rc != 0)
        if rc:
            print(f"  kept for inspection: {b.dir}")
    return fig, rc


def _check(fig: dict[str, Any], acked: list[str], unknown: list[str], errors: list[str],
           records: dict[str, tuple[str, int, Any]], counts: dict[str, int],
           runs_path: Path, logs: list[Path], kill_times: list[float],
           db: Path) -> int:  # fmt: skip
    """Fill in the figures of the checks; returns 1 if one failed."""
    runs = _read_runs(runs_path)
    acks, fig["deliveries_refused"] = _accepted_acks(logs)
    lost = [i for i in acked if i not in records]
    not_done = [i for i, r in records.items() if r[0] != "succeeded"]
    stale, bad_result, over, duplicates = [], [], [], []
    crash_reruns = reran_jobs = 0
    for job_id, (_state, attempts, result) in records.items():
        job_runs = sorted(runs.get(job_id, []))
        if result not in {token for _, token in job_runs}:
            bad_result.append(job_id)
        if len(job_runs) > attempts:
            over.append(job_id)
        if acks.get(job_id) != [attempts]:
            stale.append((job_id, acks.get(job_id), attempts))
        if len(job_runs) > 1:
            reran_jobs += 1
            low, high = job_runs[0][0] - LEASE - PREFETCH_HOLD, job_runs[-1][0]
            k = bisect.bisect_left(kill_times, low)
            if k < len(kill_times) and kill_times[k] <= high:
                crash_reruns += len(job_runs) - 1
            else:
                duplicates.append(job_id)
    acked_set = set(acked)
    stored = sum(counts.values())
    with contextlib.closing(sqlite3.connect(db)) as conn:
        quick_check = conn.execute("PRAGMA quick_check").fetchone()[0]
    fig.update(lost=len(lost) + sum(i in acked_set for i in not_done),
               duplicates=len(duplicates), stale_acks=len(stale),
               results_not_from_a_run=len(bad_result), runs_over_leases=len(over),
               jobs_rerun_after_crash=reran_jobs, crash_reruns=crash_reruns,
               runs=sum(len(v) for v in runs.values()), stored=stored,
               stored_never_sent=stored - len(records), quick_check=quick_check)  # fmt: skip
    problems = {
        "producer errors": errors[:5], "lost": lost[:5], "not succeeded": not_done[:5],
        "stale acks": stale[:5], "result not from a run": bad_result[:5],
        "runs over leases": over[:5], "duplicates": duplicates[:5],
    }  # fmt: skip
    failed = {k: v for k, v in problems.items() if v}
    if stored != len(records):
        failed["stored but never sent"] = [stored - len(records)]
    if quick_check != "ok":
        failed["quick_check"] = [quick_check]
    for what, examples in failed.items():
        print(f"  FAILED: {what}: {examples}")
    return 1 if failed else 0
