"""Peer harness: measure Celery 5 (and raw Redis) on this machine, in-process,
so qbroker bench scripts can print ratios against numbers taken in the same run.

Usage from a bench script::

    sys.path.insert(0, bench_dir); import peers
    c = peers.celery_end_to_end(n=10_000, broker="redis", pool="prefork",
                                concurrency=2, mode="one")
    print(qbroker_jobs_per_s / c["jobs_per_s"])

Standalone::

    python bench/peers.py --n 2000            # full table
    python bench/peers.py --n 10000 --brokers redis --pools prefork --json out.json

Everything talks to 127.0.0.1 only: Redis 127.0.0.1:6379 **db 15** (broker for
broker="redis", and the result backend for both brokers; only db 15 is ever
flushed) and RabbitMQ 127.0.0.1:5672 guest/guest (broker="amqp", vhost "/").

Each Celery function starts its own worker subprocess (``python -m celery -A
celery_tasks worker``, cwd=bench/), waits until it has executed warm-up tasks,
measures, then stops exactly the PIDs it started (SIGTERM to the worker, then
SIGKILL by PID to the worker and its recorded pool children if they linger).
Worker logs are kept in a fresh ``tempfile.mkdtemp(prefix="qb-celery-bench-")``
directory whose path is returned as ``"log_dir"``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psutil

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import celery_tasks  # noqa: E402  (needs BENCH_DIR on sys.path)

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_DB = 15
BROKER_URLS = {"redis": celery_tasks.REDIS_URL, "amqp": celery_tasks.AMQP_URL}
BACKEND_URL = celery_tasks.BACKEND_URL

BATCH_FORMS = ("producer", "group")
# "batch" means: the fastest honest per-job Celery send we found on this
# machine -- Task.apply_async(producer=P) in a loop inside one
# app.producer_or_acquire() block (one connection/channel, one producer, every
# job still its own message and its own stored result).  group(...) was
# measured too and is slower (it clones n signatures and builds a GroupResult);
# chunks() is NOT used because it packs several calls into one message/result,
# i.e. it is not n jobs any more.
DEFAULT_BATCH_FORM = "producer"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _redis_client() -> Any:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)


def _flush_db15() -> None:
    r = _redis_client()
    try:
        r.flushdb()  # db 15 only
    finally:
        r.close()


def _delete_amqp_queue(queue: str) -> None:
    import kombu

    with (
        contextlib.suppress(Exception),
        kombu.Connection(BROKER_URLS["amqp"], connect_timeout=5) as conn,
    ):
        conn.default_channel.queue_delete(queue)


def _kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


class CeleryWorker:
    """A Celery worker subprocess we own.  Only ever signals its own PIDs."""

    def __init__(
        self,
        broker: str,
        pool: str,
        concurrency: int,
        queue: str,
        log_dir: str | None = None,
        loglevel: str = "WARNING",
    ) -> None:
        if broker not in BROKER_URLS:
            raise ValueError(f"broker must be one of {sorted(BROKER_URLS)}")
        self.broker = broker
        self.pool = pool
        self.concurrency = concurrency
        self.queue = queue
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="qb-celery-bench-")
        tag = f"{broker}-{pool}{concurrency}-{queue[-8:]}"
        self.log_path = os.path.join(self.log_dir, f"worker-{tag}.log")
        self.out_path = os.path.join(self.log_dir, f"worker-{tag}.out")
        self.loglevel = loglevel
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # worker + pool children we saw

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = BENCH_DIR + os.pathsep + env.get("PYTHONPATH", "")
        env["QB_BENCH_BROKER_URL"] = BROKER_URLS[self.broker]
        env["QB_BENCH_BACKEND_URL"] = BACKEND_URL
        env["QB_BENCH_QUEUE"] = self.queue
        cmd = [
            sys.executable, "-m", "celery", "-A", "celery_tasks", "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-Q", self.queue,
            "-n", f"qbbench-{self.queue}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", self.loglevel, "--logfile", self.log_path,
        ]  # fmt: skip
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, cwd=BENCH_DIR, env=env, stdout=self._out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.pids = [self.proc.pid]

    def _record_children(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                if c.pid not in self.pids:
                    self.pids.append(c.pid)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(
                f"celery worker exited (rc={self.proc and self.proc.returncode});"
                f" see {self.out_path} / {self.log_path}"
            )

    def wait_ready(self, app: Any, warmup: int, timeout: float) -> float:
        """Ready == it has run `warmup` tasks end to end. Returns seconds."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        noop = app.tasks[celery_tasks.NOOP_NAME]
        results = [noop.delay() for _ in range(warmup)]
        for r in results:
            while True:
                self.check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"worker not ready in {timeout}s; see {self.log_path}"
                    )
                try:
                    r.get(timeout=min(1.0, left))
                    break
                except Exception as e:  # celery TimeoutError
                    if type(e).__name__ != "TimeoutError":
                        raise
        self._record_children()
        return time.perf_counter() - t0

    def stop(self, grace: float = 15.0) -> list[int]:
        """Stop our worker by PID; returns PIDs that had to be SIGKILLed."""
        if self.proc is None:
            return []
        self._record_children()
        killed: list[int] = []
        if self.proc.poll() is None:
            # All measured work is done by now, so use SIGQUIT = Celery's cold
            # shutdown (SIGTERM's warm shutdown takes 5-10 s with amqp); the
            # main process still reaps its own pool children.
            _kill_pids([self.proc.pid], signal.SIGQUIT)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill_pids([self.proc.pid], signal.SIGKILL)
                killed.append(self.proc.pid)
                self.proc.wait(timeout=10)
        left = _alive([p for p in self.pids if p != self.proc.pid])
        if left:
            _kill_pids(left, signal.SIGKILL)
            killed += left
            deadline = time.monotonic() + 5
            while _alive(left) and time.monotonic() < deadline:
                time.sleep(0.05)
        still = _alive(self.pids)
        self._out.close()
        if still:
            raise RuntimeError(f"celery worker PIDs survived SIGKILL: {still}")
        return killed


@contextlib.contextmanager
def _celery_session(
    broker: str,
    pool: str,
    concurrency: int,
    warmup: int | None = None,
    ready_timeout: float = 60.0,
    log_dir: str | None = None,
) -> Iterator[tuple[Any, CeleryWorker, dict[str, Any]]]:
    """Fresh queue + worker + producer app; everything torn down afterwards."""
    queue = f"qbroker_bench_{uuid.uuid4().hex[:12]}"
    _flush_db15()
    app = celery_tasks.make_app(BROKER_URLS[broker], queue, BACKEND_URL)
    worker = CeleryWorker(broker, pool, concurrency, queue, log_dir=log_dir)
    info: dict[str, Any] = {
        "broker": broker, "pool": pool, "concurrency": concurrency,
        "celery": _celery_version(), "log_dir": worker.log_dir,
    }  # fmt: skip
    try:
        worker.start()
        info["ready_seconds"] = round(
            worker.wait_ready(app, warmup or max(20, 4 * concurrency), ready_timeout), 3
        )
        info["worker_pids"] = list(worker.pids)
        yield app, worker, info
    finally:
        try:
            info["sigkilled_pids"] = worker.stop()
        finally:
            with contextlib.suppress(Exception):
                # results abandoned by a timeout: let them unsubscribe now,
                # not from __del__ at interpreter shutdown
                for mapping in app.backend._pending_results:
                    mapping.clear()
                gc.collect()
            with contextlib.suppress(Exception):
                app.backend.result_consumer.stop()
            with contextlib.suppress(Exception):
                app.close()
            if broker == "amqp":
                _delete_amqp_queue(queue)
            _flush_db15()


def _celery_version() -> str:
    import celery

    return celery.__version__


# --------------------------------------------------------------------------
# 1. end to end throughput
# --------------------------------------------------------------------------
def celery_end_to_end(
    n: int = 10_000,
    broker: str = "redis",
    pool: str = "prefork",
    concurrency: int = 2,
    mode: str = "one",
    batch_form: str = DEFAULT_BATCH_FORM,
    timeout: float = 300.0,
    log_dir: str | None = None,
    repeat: int = 1,
) -> dict[str, Any]:
    """n no-op tasks; wait for ALL stored results; time first send -> last result.

    mode="one":   ``noop.delay()`` n times (each call acquires a producer from
                  Celery's pool, as ordinary user code does).
    mode="batch": batch_form="producer" (default, fastest measured): one
                  ``with app.producer_or_acquire() as P:`` block with
                  ``noop.apply_async(producer=P)`` n times;
                  batch_form="group":
                  ``group(noop.s() for _ in range(n)).apply_async()``.
    Results are collected with ``ResultSet(results).get()`` which, for the
    Redis result backend, is the native join (pub/sub + MGET), i.e. the
    fastest way Celery offers to wait for many results.

    repeat > 1 runs the measured phase that many times on the same worker;
    "seconds"/"jobs_per_s"/"send_*" are then medians, "best_jobs_per_s" the best
    run, "runs_jobs_per_s" all of them.  `timeout` bounds all repeats together.

    Returns {"jobs", "seconds", "jobs_per_s", "best_jobs_per_s",
    "runs_jobs_per_s", "send_seconds", "send_per_s", "ready_seconds",
    "worker_pids", "sigkilled_pids", "log_dir", "loadavg_1m", ...}.
    Raises TimeoutError if not all results arrive within `timeout` seconds.
    """
    from celery import group
    from celery.result import ResultSet

    if mode not in ("one", "batch"):
        raise ValueError("mode must be 'one' or 'batch'")
    if batch_form not in BATCH_FORMS:
        raise ValueError(f"batch_form must be one of {BATCH_FORMS}")
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    deadline = time.monotonic() + timeout
    with _celery_session(broker, pool, concurrency, log_dir=log_dir) as (app, _w, info):
        noop = app.tasks[celery_tasks.NOOP_NAME]
        runs: list[tuple[float, float]] = []  # (total seconds, send seconds)
        for _ in range(repeat):
            t0 = time.perf_counter()
            if mode == "one":
                results = [noop.delay() for _ in range(n)]
            elif batch_form == "producer":
                with app.producer_or_acquire() as producer:
                    results = [noop.apply_async(producer=producer) for _ in range(n)]
            else:
                results = list(group(noop.s() for _ in range(n)).apply_async().results)
            t_sent = time.perf_counter()
            left = max(0.1, deadline - time.monotonic())
            try:
                values = ResultSet(results, app=app).get(timeout=left, propagate=True)
            except Exception as e:
                # drop the AsyncResults now, while their backend is still open
                # (their __del__ unsubscribes from Redis pub/sub)
                results.clear()
                if type(e).__name__ == "TimeoutError":
                    msg = f"not all {n} results within {timeout}s"
                    raise TimeoutError(msg) from None
                raise
            t1 = time.perf_counter()
            if len(values) != n:
                raise RuntimeError(f"got {len(values)} results for {n} tasks")
            runs.append((t1 - t0, t_sent - t0))
        secs = statistics.median(r[0] for r in runs)
        send = statistics.median(r[1] for r in runs)
        info.update(
            peer="celery",
            mode=mode if mode == "one" else f"batch/{batch_form}",
            jobs=n,
            repeat=repeat,
            seconds=round(secs, 4),
            jobs_per_s=round(n / secs, 1),
            best_jobs_per_s=round(n / min(r[0] for r in runs), 1),
            runs_jobs_per_s=[round(n / r[0], 1) for r in runs],
            send_seconds=round(send, 4),
            send_per_s=round(n / send, 1),
            loadavg_1m=round(os.getloadavg()[0], 2),
        )
    return info


# --------------------------------------------------------------------------
# 2. sequential round-trip latency
# --------------------------------------------------------------------------
def _pct(sorted_vals: list[float], p: float) -> float:
    # nearest-rank percentile
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def celery_roundtrip_latency(
    n: int = 1000,
    broker: str = "redis",
    pool: str = "prefork",
    concurrency: int = 2,
    timeout: float = 120.0,
    log_dir: str | None = None,
) -> dict[str, Any]:
    """n sequential ``noop.delay().get()``; returns p50/p99/mean/min/max in ms."""
    with _celery_session(broker, pool, concurrency, log_dir=log_dir) as (app, _w, info):
        noop = app.tasks[celery_tasks.NOOP_NAME]
        lat: list[float] = []
        deadline = time.monotonic() + timeout
        t_all = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            noop.delay().get(timeout=max(0.1, deadline - time.monotonic()))
            lat.append((time.perf_counter() - t0) * 1000.0)
        total = time.perf_counter() - t_all
        lat.sort()
        info.update(
            peer="celery",
            mode="delay().get()",
            loadavg_1m=round(os.getloadavg()[0], 2),
            jobs=n,
            seconds=round(total, 4),
            p50_ms=round(_pct(lat, 50), 3),
            p99_ms=round(_pct(lat, 99), 3),
            mean_ms=round(statistics.fmean(lat), 3),
            min_ms=round(lat[0], 3),
            max_ms=round(lat[-1], 3),
        )
    return info


# --------------------------------------------------------------------------
# 3. raw Redis baseline (context: what the wire + Redis alone can do)
# --------------------------------------------------------------------------
def _echo_consumer(inq: str, outq: str, n: int) -> None:
    r = _redis_client()
    for _ in range(n):
        _, v = r.brpop([inq], timeout=30)
        r.lpush(outq, v)
    r.close()


def redis_raw_baseline(n: int = 20_000, timeout: float = 60.0) -> dict[str, Any]:
    """redis-benchmark-like rates through redis-py, one connection each, no pipelining.

    lpush_per_s:  n sequential LPUSH
    brpop_per_s:  n sequential BRPOP draining them
    pipelined_lpush_per_s: n LPUSH in pipelines of 1000 (upper bound for a batch send)
    relay_jobs_per_s: "minimal broker": this process LPUSHes n jobs while one
        consumer process BRPOPs each and LPUSHes a reply; time until this process
        has BRPOPed all n replies (queue -> worker -> result, no framework).
    """
    r = _redis_client()
    key = f"qbroker_bench_raw_{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"peer": "redis-py", "jobs": n, "redis_db": REDIS_DB}
    try:
        r.delete(key)
        payload = b"x" * 64
        t0 = time.perf_counter()
        for _ in range(n):
            r.lpush(key, payload)
        out["lpush_per_s"] = round(n / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        for _ in range(n):
            r.brpop([key], timeout=5)
        out["brpop_per_s"] = round(n / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.lpush(key, payload)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        out["pipelined_lpush_per_s"] = round(n / (time.perf_counter() - t0), 1)
        r.delete(key)

        inq, outq = key + "_in", key + "_out"
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_echo_consumer, args=(inq, outq, n), daemon=True)
        proc.start()
        try:
            r.ping()
            time.sleep(0.3)  # let the consumer connect
            t0 = time.perf_counter()
            for i in range(n):
                r.lpush(inq, b"%d" % i)
            got = 0
            deadline = time.monotonic() + timeout
            while got < n:
                if r.brpop([outq], timeout=5) is not None:
                    got += 1
                elif time.monotonic() > deadline:
                    raise TimeoutError("raw relay baseline timed out")
            secs = time.perf_counter() - t0
            out["relay_seconds"] = round(secs, 4)
            out["relay_jobs_per_s"] = round(n / secs, 1)
        finally:
            proc.join(timeout=10)
            if proc.is_alive() and proc.pid is not None:
                _kill_pids([proc.pid], signal.SIGKILL)
                proc.join(timeout=5)
    finally:
        with contextlib.suppress(Exception):
            r.delete(key, key + "_in", key + "_out")
        r.close()
    return out


def redis_benchmark_cli(n: int = 100_000) -> dict[str, Any] | None:
    """`redis-benchmark -t lpush,rpop -c 1` on db 15 if the binary exists, else None."""
    import shutil

    exe = shutil.which("redis-benchmark")
    if not exe:
        return None
    cmd = [exe, "-h", REDIS_HOST, "-p", str(REDIS_PORT), "--dbnum", str(REDIS_DB),
           "-t", "lpush,rpop", "-n", str(n), "-c", "1", "-q"]  # fmt: skip
    try:
        txt = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    finally:
        _flush_db15()
    res: dict[str, Any] = {"peer": "redis-benchmark", "clients": 1, "requests": n}
    for line in txt.replace("\r", "\n").splitlines():
        if "requests per second" in line:
            name, rest = line.split(":", 1)
            res[name.strip().lower() + "_per_s"] = float(rest.split()[0])
    return res


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
def _celery_pids() -> set[int]:
    try:
        out = subprocess.run(
            ["pgrep", "-f", "celery"], capture_output=True, text=True
        ).stdout
    except FileNotFoundError:
        return set()
    return {int(x) for x in out.split()} - {os.getpid()}


_COLS = ("peer", "broker", "pool", "mode", "jobs", "sec", "jobs/s")
_FMT = "{:<9} {:<6} {:<10} {:<16} {:>6} {:>8} {:>9}  {}"


def _row(*cells: Any, extra: str = "") -> None:
    print(_FMT.format(*cells, extra), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="jobs per throughput run")
    ap.add_argument("--latency-n", type=int, help="round trips (default n/4)")
    ap.add_argument("--brokers", default="redis,amqp")
    ap.add_argument(
        "--pools", default="prefork,threads", help="prefork -c2, threads -c8"
    )
    ap.add_argument("--modes", default="one,batch")
    ap.add_argument("--batch-form", default=DEFAULT_BATCH_FORM, choices=BATCH_FORMS)
    ap.add_argument("--repeat", type=int, default=1, help="runs per config (median)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-raw", action="store_true")
    ap.add_argument("--json", help="also write all result dicts to this file")
    a = ap.parse_args(argv)
    conc = {"prefork": 2, "threads": 8}
    lat_n = a.latency_n if a.latency_n is not None else max(50, a.n // 4)
    before = _celery_pids()
    log_dir = tempfile.mkdtemp(prefix="qb-celery-bench-")
    rows: list[dict[str, Any]] = []
    print(
        f"# celery {_celery_version()} | python {platform.python_version()} | "
        f"{os.cpu_count()} cpus | n={a.n} repeat={a.repeat} latency_n={lat_n} | "
        f"loadavg {os.getloadavg()[0]:.2f}"
    )
    _row(*_COLS, extra="extra")
    print("-" * 78)
    for broker in a.brokers.split(","):
        for pool in a.pools.split(","):
            for mode in a.modes.split(","):
                d = celery_end_to_end(
                    a.n, broker, pool, conc[pool], mode, a.batch_form,
                    log_dir=log_dir, repeat=a.repeat,
                )  # fmt: skip
                rows.append(d)
                _row(
                    "celery", broker, f"{pool}/{conc[pool]}", d["mode"], d["jobs"],
                    f"{d['seconds']:.3f}", f"{d['jobs_per_s']:.0f}",
                    extra=f"send {d['send_per_s']:.0f}/s"
                    f"  best {d['best_jobs_per_s']:.0f}  load {d['loadavg_1m']}",
                )  # fmt: skip
        if not a.no_latency:
            d = celery_roundtrip_latency(lat_n, broker, log_dir=log_dir)
            rows.append(d)
            _row(
                "celery", broker, "prefork/2", "delay().get()", d["jobs"],
                f"{d['seconds']:.3f}", f"{d['jobs'] / d['seconds']:.0f}",
                extra=f"p50 {d['p50_ms']:.2f} ms  p99 {d['p99_ms']:.2f} ms",
            )  # fmt: skip
    if not a.no_raw:
        d = redis_raw_baseline(max(a.n, 10_000))
        rows.append(d)
        _row(
            "redis-py", "redis", "1 proc", "lpush>brpop>rep", d["jobs"],
            f"{d['relay_seconds']:.3f}", f"{d['relay_jobs_per_s']:.0f}",
            extra=f"lpush {d['lpush_per_s']:.0f}/s  brpop {d['brpop_per_s']:.0f}/s  "
            f"pipelined lpush {d['pipelined_lpush_per_s']:.0f}/s",
        )  # fmt: skip
        rb = redis_benchmark_cli()
        if rb:
            rows.append(rb)
            extra = "  ".join(
                f"{k[:-6]} {v:.0f}/s" for k, v in rb.items() if k.endswith("_per_s")
            )
            _row("redis-bm", "redis", "-c 1", "-t lpush,rpop", rb["requests"], "", "",
                 extra=extra)  # fmt: skip
    leftover = _celery_pids() - before
    if leftover:
        print(
            f"WARNING: new celery processes remain: {sorted(leftover)}", file=sys.stderr
        )
    print(f"# worker logs: {log_dir}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if leftover else 0


if __name__ == "__main__":
    sys.exit(main())
