"""The peers of bench/e2e.py: Celery 5 + Redis, the same Celery app on qbroker
(qclient.celery), and Dramatiq + RabbitMQ, measured the
way e2e.py measures qbroker, so its ratios come from one run on one machine.

Redis 127.0.0.1:6379 db 15 only (Celery's broker and results, Dramatiq's results; it is
FLUSHDB-ed before and after each peer) and RabbitMQ 127.0.0.1:5672 guest/guest. Each
peer gets a fresh queue name and its own worker subprocess (cwd bench/), warmed up with
max(20, 4 x concurrency) jobs end to end, stopped by PID at the end (its pool children
too); its RabbitMQ queues are deleted.

CPU comes from /proc: the server's process (found by its listening port) for the
broker, the worker and its children, and this process for the producer. Redis and
RabbitMQ are shared services: anything else using them meanwhile is counted too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import e2e
import psutil

REDIS_PORT, AMQP_PORT = 6379, 5672
WORKER_STOP_GRACE = 15.0  #: seconds a peer worker gets to exit before SIGKILL


def server_pid(port: int) -> int | None:
    """The PID of the process listening on 127.0.0.1:`port` (needs root for others')."""
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return c.pid
    return None


def flush_db15() -> None:
    import redis

    with contextlib.closing(redis.Redis(host="127.0.0.1", port=REDIS_PORT, db=15)) as r:
        r.flushdb()


class PeerWorker:
    """A peer's worker subprocess; only its own PIDs are ever signalled."""

    def __init__(
        self, cmd: list[str], queue: str, log: Path, stop_sig: int, **env_extra: str
    ) -> None:
        env = e2e.subprocess_env()
        env["QB_BENCH_QUEUE"] = queue
        env.update(env_extra)
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=e2e.BENCH_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.pids = [self.proc.pid]
        e2e.STARTED_PIDS.append(self.proc.pid)
        self.log, self.stop_sig = log, stop_sig

    def record_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                if c.pid not in self.pids:
                    self.pids.append(c.pid)
                    e2e.STARTED_PIDS.append(c.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"peer worker exited; see {self.log}")

    def cpu(self) -> float:
        return sum(e2e.proc_cpu(p) for p in self.pids)

    def stop(self) -> None:
        self.record_children()
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_sig)
            try:
                self.proc.wait(WORKER_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if left := e2e.alive(self.pids):
            e2e.kill_pids(left, signal.SIGKILL)


def _warm(worker: PeerWorker, send: Callable[[], Any], get: Callable[[Any], Any],
          k: int) -> None:  # fmt: skip
    handles = [send() for _ in range(k)]
    deadline = time.monotonic() + 60
    for h in handles:
        while True:
            worker.check_alive()
            try:
                get(h)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
    worker.record_children()


def _e2e(system: str, label: str, n: int, worker: PeerWorker, broker_pids: list[int],
         results_pids: list[int], send: Callable[[int], Any],
         fetch_all: Callable[[list[Any]], list[int]]) -> dict[str, Any]:  # fmt: skip
    """n x add(i, i) sent one at a time, then every result fetched and checked."""
    cpu0 = (e2e.cpu_of(broker_pids), e2e.cpu_of(results_pids), worker.cpu(),
            e2e.self_cpu())  # fmt: skip
    t0 = time.perf_counter()
    handles = [send(i) for i in range(n)]
    t_sent = time.perf_counter()
    values = fetch_all(handles)
    secs = time.perf_counter() - t0
    cpu1 = (e2e.cpu_of(broker_pids), e2e.cpu_of(results_pids), worker.cpu(),
            e2e.self_cpu())  # fmt: skip
    if values != [2 * i for i in range(n)]:
        raise RuntimeError(f"{system}: wrong results")
    broker, results, wcpu, producer = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    return e2e.e2e_row(system, label, "send()", n, secs, t_sent - t0,
                       broker + results, wcpu, producer,
                       results_store_us=results if results_pids else None)  # fmt: skip


def _latency(
    system: str, label: str, n: int, roundtrip: Callable[[int], int]
) -> dict[str, Any]:
    lat = []
    for i in range(n):
        t0 = time.perf_counter()
        if roundtrip(i) != 2 * i:
            raise RuntimeError(f"{system}: wrong result")
        lat.append((time.perf_counter() - t0) * 1000.0)
    return e2e.latency_row(system, label, lat)


def celery_redis(n: int, lat_n: int, log_dir: Path) -> list[dict[str, Any]]:
    """Celery 5 + Redis, prefork -c 2: e2e, round trips, and `delay()` with no worker."""
    flush_db15()
    try:
        redis_pids = [p for p in [server_pid(REDIS_PORT)] if p]
        return _celery("Celery+Redis", n, lat_n, log_dir, None, redis_pids)
    finally:
        flush_db15()


def celery_qbroker(n: int, lat_n: int, log_dir: Path) -> list[dict[str, Any]]:
    """The same Celery app and worker on a qbroker of its own (qclient.celery)."""
    with e2e.running_broker("celery-qbroker") as b:
        return _celery("Celery+qbroker", n, lat_n, log_dir, b.url, [b.pid])


def _celery(system: str, n: int, lat_n: int, log_dir: Path, qbroker: str | None,
            broker_pids: list[int]) -> list[dict[str, Any]]:  # fmt: skip
    import celery_tasks
    from celery.result import ResultSet

    queue = f"qb_bench_{uuid.uuid4().hex[:10]}"
    app = celery_tasks.make_app(queue, qbroker)
    add = app.tasks[celery_tasks.ADD_NAME]
    cmd = [sys.executable, "-m", "celery", "-A", "celery_tasks", "worker", "-P", "prefork",
           "-c", "2", "-Q", queue, "-n", f"{queue}@%h", "--without-gossip",
           "--without-mingle", "--without-heartbeat", "-l", "WARNING"]  # fmt: skip
    label = "prefork/2"
    rows = []
    env = {"QB_BENCH_CELERY_QBROKER": qbroker} if qbroker else {}
    log = log_dir / f"{system.lower().replace('+', '-')}-worker.log"
    # SIGQUIT: Celery's cold shutdown; its warm one waits seconds for nothing here
    worker = PeerWorker(cmd, queue, log, signal.SIGQUIT, **env)
    try:
        _warm(worker, lambda: add.delay(1, 1), lambda r: r.get(timeout=1), 20)

        def fetch_all(results: list[Any]) -> list[int]:
            return list(ResultSet(results, app=app).get(timeout=e2e.PHASE_TIMEOUT))

        rows.append(_e2e(system, label, n, worker, broker_pids, [],
                         lambda i: add.delay(i, i), fetch_all))  # fmt: skip
        rows.append(_latency(system, label, lat_n,
                             lambda i: add.delay(i, i).get(timeout=30)))  # fmt: skip
    finally:
        worker.stop()
    # with no worker: the same calls into a queue nobody reads
    idle = celery_tasks.make_app(f"{queue}_idle", qbroker).tasks[celery_tasks.ADD_NAME]
    cpu0 = e2e.self_cpu()
    t0 = time.perf_counter()
    for i in range(n):
        idle.delay(i, i)
    rows.append(e2e.send_row(system, "delay()", n, time.perf_counter() - t0,
                             e2e.self_cpu() - cpu0))  # fmt: skip
    with contextlib.suppress(Exception):
        app.close()
    return rows


def dramatiq_rabbitmq(n: int, lat_n: int, log_dir: Path) -> list[dict[str, Any]]:
    """Dramatiq + RabbitMQ (results in Redis), one process of 8 threads."""
    queue = f"qb_bench_{uuid.uuid4().hex[:10]}"
    os.environ["QB_BENCH_QUEUE"] = queue
    dt = importlib.import_module("dramatiq_tasks")
    flush_db15()
    rabbit = [p for p in [server_pid(AMQP_PORT)] if p]
    redis_pids = [p for p in [server_pid(REDIS_PORT)] if p]
    cmd = [sys.executable, "-m", "dramatiq", "dramatiq_tasks", "--processes", "1",
           "--threads", "8", "--queues", queue]  # fmt: skip
    label = "threads/8"
    rows = []
    worker = PeerWorker(cmd, queue, log_dir / "dramatiq-worker.log", signal.SIGTERM)
    try:

        def get(m: Any) -> int:
            return int(m.get_result(block=True, timeout=30_000))

        _warm(worker, lambda: dt.add.send(1, 1), get, 20)
        rows.append(_e2e("Dramatiq+RabbitMQ", label, n, worker, rabbit, redis_pids,
                         lambda i: dt.add.send(i, i), lambda ms: [get(m) for m in ms]))  # fmt: skip
        rows.append(_latency("Dramatiq+RabbitMQ", label, lat_n,
                             lambda i: get(dt.add.send(i, i))))  # fmt: skip
    finally:
        worker.stop()
        for q in (queue, f"{queue}.DQ", f"{queue}.XQ"):
            with contextlib.suppress(Exception):
                dt.broker.channel.queue_delete(q)
        with contextlib.suppress(Exception):
            dt.broker.close()
        flush_db15()
    return rows
