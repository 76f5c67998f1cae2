"""qbroker end to end vs Celery 5 + Redis (issue 3): throughput and round-trip latency.

In one run, on the same (shared, noisy) machine, so the ratios mean something:

  Celery 5 on the machine's Redis (bench/peers.py; prefork -c 2, results in Redis):
    e2e/one    n x ``noop.delay()``, then every result (``ResultSet.get()``)
    e2e/batch  n x ``noop.apply_async(producer=P)`` in one producer, then every result
    latency    lat_n sequential ``noop.delay().get()``

  qbroker (a fresh ``python -m qbroker serve`` per worker shape, its defaults: every
  2xx to a write is fsynced, SQLite synchronous=FULL), worker ``python -m qworker
  --module bench_tasks`` as ``--pool processes --concurrency 2`` and as ``--pool threads
  --concurrency 8``, each also with ``--prefetch 1000`` (opt-in; rows "+p1000"):
    e2e/send()      one producer thread: ``client.send(queue, task="noop")`` n times
    e2e/send_many() ``client.send_many(queue, [JobSpec(task="noop")] * n)`` (1,000 per request)
    ...then every result: ``client.final_records(jobs)``, 1,000 ids per long-poll --
       the requests ``qclient.results(jobs)`` makes, as Celery's side uses
       ``ResultSet.get()`` (it returns the records, so we also learn ``finished_at``);
       a job that is not ``succeeded`` aborts the run.
    latency  (threads worker) lat_n sequential ``job = client.send(...); job.result()``

Time is from the first send to the last result received (both peers). "done" is when the
broker had finished the last job (max ``finished_at``), i.e. without the result fetch.
Workers log at WARNING (Celery's harness runs ``-l WARNING`` too). Each worker is warmed
up with max(20, 4*c) jobs end to end before the clock starts.

Usage:

  python bench/e2e.py --quick                 # n=2,000, lat_n=200 (~1 min)
  python bench/e2e.py                         # n=10,000, lat_n=1,000 (~2-3 min)
  python bench/e2e.py --only qbroker --profile /tmp/qb-e2e-prof   # py-spy broker/worker/client
  python bench/e2e.py --summarize /tmp/qb-e2e-prof/broker-one-threads8.txt

Targets (issue 3): end to end >= 10x Celery+Redis sent one at a time, >= 30x with
send_many; round trip p50 < 1.5 ms and p99 < 5 ms.

Every process this script starts (brokers, workers and their pool children, py-spy) is
stopped by PID and checked gone at the end; exit status 1 if one survived.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (BENCH_DIR, REPO / "broker", REPO / "client", REPO / "worker"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import psutil  # noqa: E402
import qclient  # noqa: E402
from qclient.wire import JobState  # noqa: E402

TARGETS = {"one": 10.0, "many": 30.0, "p50_ms": 1.5, "p99_ms": 5.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASE_TIMEOUT = 150.0  #: seconds one measured phase may take before it is abandoned

#: every PID this process started, to check at the end that none survived
STARTED_PIDS: list[int] = []


# ------------------------------------------------------------------ small helpers


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile (the same definition as peers.py)."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / p) for p in ("broker", "client", "worker")] + [str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def proc_cpu(pid: int, which: str = "both") -> float:
    """CPU seconds (user, system or both; all threads) of one process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    return {"user": user, "sys": system}.get(which, user + system)


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def kill_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------ the broker process


class Broker:
    """One `python -m qbroker serve` on 127.0.0.1, port 0, a fresh temp data dir."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"qb-{name}-", dir=root))
        self.data = self.dir / "data"
        self.ready = self.dir / "ready"
        self.log_path = self.dir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "qbroker", "serve", "--host", "127.0.0.1",
            "--port", "0", "--data-dir", str(self.data), "--ready-file", str(self.ready),
            "--log-level", "warning",
        ]  # fmt: skip

    def start(self) -> Self:
        cmd = self.command()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=subprocess_env(),
            )  # fmt: skip
        STARTED_PIDS.append(self.proc.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.ready.exists() and (text := self.ready.read_text().strip()):
                self.port = int(text)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"broker did not start; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def file_mib(self, suffix: str = "") -> float:
        """Size of qbroker.db (suffix "") or qbroker.db-wal (suffix "-wal")."""
        try:
            return (self.data / f"qbroker.db{suffix}").stat().st_size / 2**20
        except OSError:
            return 0.0

    def cpu(self, which: str = "both") -> float:
        return proc_cpu(self.pid, which)

    def rss_mib(self) -> float:
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def stop(self, keep_dir: bool = False) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        elif proc is not None:
            proc.wait()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def running_broker(name: str, root: Path | None = None) -> Broker:
    """A broker for a `with` block: started on entry, stopped (by PID) on exit."""
    return Broker(name, root)


# ------------------------------------------------------------------ the qworker process


class QWorker:
    """`python -m qworker --queue Q --module bench_tasks ...` with cwd bench/."""

    def __init__(
        self, url: str, queue: str, pool: str, concurrency: int, log: Path,
        prefetch: int = 0,
    ):  # fmt: skip
        self.url, self.queue, self.pool, self.concurrency = (
            url,
            queue,
            pool,
            concurrency,
        )
        self.prefetch = prefetch
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def start(self) -> QWorker:
        cmd = [
            sys.executable, "-m", "qworker", "--queue", self.queue,
            "--module", "bench_tasks", "--concurrency", str(self.concurrency),
            "--pool", self.pool, "--url", self.url, "--log-level", "warning",
            "--grace", "5", "--prefetch", str(self.prefetch),
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=BENCH_DIR, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=subprocess_env(),
            )  # fmt: skip
        self.pids = [self.proc.pid]
        STARTED_PIDS.append(self.proc.pid)
        return self

    def record_children(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for c in psutil.Process(self.proc.pid).children(recursive=True):
                if c.pid not in self.pids:
                    self.pids.append(c.pid)
                    STARTED_PIDS.append(c.pid)

    @property
    def label(self) -> str:
        """`processes/2`, or `processes/2+p100` with a prefetch."""
        extra = f"+p{self.prefetch}" if self.prefetch else ""
        return f"{self.pool}/{self.concurrency}{extra}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"qworker exited; see {self.log_path}")

    def cpu(self) -> float:
        """CPU seconds of the worker and its pool children (those alive now)."""
        return sum(proc_cpu(p) for p in self.pids)

    def stop(self) -> list[int]:
        """SIGTERM by PID, then SIGKILL what lingers; returns PIDs SIGKILLed."""
        if self.proc is None:
            return []
        self.record_children()
        killed: list[int] = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                killed.append(self.proc.pid)
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = alive(self.pids)
        if left:
            kill_pids(left, signal.SIGKILL)
            killed += left
        return killed


# ------------------------------------------------------------------ py-spy


class Spy:
    """`py-spy record -f raw -t [--gil] [--subprocesses] -p PID -o OUT` until stopped.

    `--gil` keeps only samples of the thread holding the GIL: Python CPU time. Without
    it, py-spy's idle detection does not work on this VM (threads parked in
    epoll_wait, SimpleQueue.get or a lock show up as busy). Time spent with the GIL
    released (fdatasync, SQLite, socket syscalls) is therefore not in these profiles.
    """

    def __init__(
        self, pid: int, out: Path, subprocesses: bool = False, gil: bool = True
    ) -> None:
        cmd = ["py-spy", "record", "-f", "raw", "-t", "-r", "250",
               "-p", str(pid), "-o", str(out)] + (["--gil"] if gil else [])  # fmt: skip
        if subprocesses:
            cmd.append("--subprocesses")
        self.out = out
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        STARTED_PIDS.append(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def profiled(
    prof_dir: Path | None, tag: str, targets: dict[str, tuple[int, bool]]
) -> Iterator[None]:
    """Run py-spy on each {name: (pid, with_subprocesses)} during the block."""
    if prof_dir is None:
        yield
        return
    prof_dir.mkdir(parents=True, exist_ok=True)
    spies = [
        Spy(pid, prof_dir / f"{name}-{tag}.txt", sub)
        for name, (pid, sub) in targets.items()
    ]
    time.sleep(0.7)  # attach
    try:
        yield
    finally:
        for s in spies:
            s.stop()


_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str, with_line: bool = False) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    short = os.path.basename(m["file"])
    return f"{m['fn']} ({short}:{m['line']})" if with_line else f"{m['fn']} ({short})"


#: innermost frame's file -> "layer" (library), for the layer view
_LAYERS = [
    ("h11", ("h11/",)),
    ("prometheus_client", ("prometheus_client/",)),
    ("msgspec", ("msgspec/",)),
    ("structlog/logging", ("structlog/", "logging/")),
    ("trio", ("trio/", "outcome/", "sniffio/")),
    ("qbroker store+writer", ("qbroker/store.py", "qbroker/writer.py")),
    ("qbroker server+app+protocol", ("qbroker/",)),
    ("qclient", ("qclient/",)),
    ("qworker", ("qworker/",)),
    ("multiprocessing", ("multiprocessing/",)),
    ("threading/queue/selectors", ("threading.py", "queue.py", "selectors.py")),
    (
        "contextlib/abc/typing",
        ("contextlib.py", "<frozen abc>", "_collections_abc", "typing.py"),
    ),
]
_PROJECT = ("qbroker/", "qclient/", "qworker/", "e2e.py", "soak.py")
_ROOTS = (
    "main (",
    "<module> (",
    "Worker._spawn.<locals>.guarded",
    "Worker.run (",
    "Worker._run (",
)


def summarize(path: Path, top: int = 15) -> str:
    """Summarize a `py-spy record -f raw -t --gil` file: share of samples per thread,
    top functions by self time (innermost frame) and by inclusive time, and the
    innermost "layer" (library) each sample is in."""
    by_fn: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    by_layer: collections.Counter[str] = collections.Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [
            f for f in stack.split(";") if not f.startswith(("process ", "thread "))
        ]
        thread = next((f for f in stack.split(";") if f.startswith("thread ")), "?")
        by_thread[re.sub(r"\(\d+\): ", "", thread)] += n
        if not frames:
            continue
        by_fn[_frame_name(frames[-1])] += n
        by_line[_frame_name(frames[-1], True)] += n
        for name in {_frame_name(f) for f in frames if any(k in f for k in _PROJECT)}:
            incl[name] += n
        m = _FRAME.match(frames[-1])
        file = m["file"] if m else frames[-1]
        layer = next(
            (lay for lay, keys in _LAYERS if any(k in file for k in keys)), "other"
        )
        by_layer[layer] += n
        total += n
    if not total:
        return f"{path.name}: no samples\n"
    out = [f"{path.name}: {total} samples with the GIL held"]
    out.append("  threads: " + ", ".join(
        f"{t} {100 * c / total:.0f}%" for t, c in by_thread.most_common(6)
    ))  # fmt: skip
    out.append("  innermost layer: " + ", ".join(
        f"{k} {100 * c / total:.0f}%" for k, c in by_layer.most_common()
    ))  # fmt: skip
    out.append("  self time by function:")
    out += [f"    {100 * c / total:5.1f}%  {k}" for k, c in by_fn.most_common(top)]
    out.append("  self time by line:")
    out += [f"    {100 * c / total:5.1f}%  {k}" for k, c in by_line.most_common(top)]
    out.append("  inclusive (on the stack), project functions:")
    common = [(k, c) for k, c in incl.most_common() if not k.startswith(_ROOTS)]
    out += [f"    {100 * c / total:5.1f}%  {k}" for k, c in common[: top + 5]]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ qbroker measurements


_METRIC = re.compile(
    r"^(qbroker_http_requests_total|qbroker_commit_batch_size_count|"
    r"qbroker_commit_batch_size_sum)(?:\{([^}]*)\})? ([0-9.e+]+)$"
)


def scrape(url: str) -> collections.Counter[str]:
    """Requests answered by route, and group commits, from the broker's /metrics."""
    import urllib.request

    out: collections.Counter[str] = collections.Counter()
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        if m[1] == "qbroker_http_requests_total":
            route = re.search(r'route="([^"]*)"', m[2] or "")
            out[route[1] if route else "?"] += int(float(m[3]))
        elif m[1].endswith("_count"):
            out["(commits)"] += int(float(m[3]))
        else:
            out["(store calls)"] += int(float(m[3]))
    return out


def wait_all(client: qclient.Client, jobs: list[qclient.Job], deadline: float) -> float:
    """Wait for every job's final record with ``client.final_records()``, 1,000 per
    ``POST /v1/results`` long-poll (what ``qclient.results()`` does); returns the max
    finished_at."""
    records = client.final_records(jobs, timeout=max(0.0, deadline - time.monotonic()))
    for job, rec in zip(jobs, records, strict=True):
        if rec is None or rec.state is not JobState.SUCCEEDED:
            raise RuntimeError(f"job {job.id} ended {rec and rec.state}")
    return max(rec.finished_at or 0.0 for rec in records if rec is not None)


def warm_up(client: qclient.Client, worker: QWorker, queue: str, k: int) -> float:
    t0 = time.perf_counter()
    deadline = time.monotonic() + 60
    jobs = [client.send(queue, task="noop") for _ in range(k)]
    for job in jobs:
        while True:
            worker.check_alive()
            try:
                job.result(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
    worker.record_children()
    return time.perf_counter() - t0


class Budget:
    """The run's wall-time bound: every phase gets at most what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def phase(self, cap: float = PHASE_TIMEOUT) -> float:
        """Seconds the next phase may take; raises TimeoutError when none are left."""
        left = self.left()
        if left < 5:
            raise TimeoutError("the run's time budget is spent")
        return min(cap, left)


def qb_end_to_end(
    b: Broker, w: QWorker, client: qclient.Client, n: int, mode: str, timeout: float
) -> dict[str, Any]:
    queue = w.queue
    cpu_bu, cpu_bs = b.cpu("user"), b.cpu("sys")
    cpu_w, cpu_c = w.cpu(), self_cpu()
    m0 = scrape(b.url)
    deadline = time.monotonic() + timeout
    wall0 = time.time()
    t0 = time.perf_counter()
    if mode == "one":
        jobs = []
        for _ in range(n):
            jobs.append(client.send(queue, task="noop"))
            if len(jobs) % 500 == 0 and time.monotonic() > deadline:
                raise TimeoutError("sending took too long")
    else:
        jobs = client.send_many(queue, [qclient.JobSpec(task="noop")] * n)
    t_sent = time.perf_counter()
    last_finished = wait_all(client, jobs, deadline)
    t1 = time.perf_counter()
    secs = t1 - t0
    done = last_finished - wall0
    bu, bs = b.cpu("user") - cpu_bu, b.cpu("sys") - cpu_bs
    m1 = scrape(b.url)
    m1.subtract(m0)
    m1["metrics"] -= 1  # our own scrape
    per_job = {k: round(v / n, 3) for k, v in sorted(m1.items()) if v > 0}
    return {
        "peer": "qbroker",
        "mode": "send()" if mode == "one" else "send_many()",
        "pool": w.label,
        "jobs": n,
        "seconds": round(secs, 4),
        "jobs_per_s": round(n / secs, 1),
        "send_seconds": round(t_sent - t0, 4),
        "send_per_s": round(n / (t_sent - t0), 1),
        "results_seconds": round(t1 - t_sent, 4),
        "done_seconds": round(done, 4),
        "done_jobs_per_s": round(n / done, 1) if done > 0 else None,
        "cpu_broker": round(bu + bs, 2),
        "cpu_broker_user": round(bu, 2),
        "cpu_broker_sys": round(bs, 2),
        "cpu_worker": round(w.cpu() - cpu_w, 2),
        "cpu_client": round(self_cpu() - cpu_c, 2),
        "per_job": per_job,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def qb_latency(
    client: qclient.Client, queue: str, n: int, timeout: float
) -> dict[str, Any]:
    lat: list[float] = []
    deadline = time.monotonic() + timeout
    t_all = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        job = client.send(queue, task="noop")
        job.result(timeout=30)
        lat.append((time.perf_counter() - t0) * 1000.0)
        if time.monotonic() > deadline:
            raise TimeoutError("latency phase took too long")
    total = time.perf_counter() - t_all
    lat.sort()
    return {
        "peer": "qbroker",
        "mode": "send()+result()",
        "jobs": n,
        "seconds": round(total, 4),
        "p50_ms": round(pct(lat, 50), 3),
        "p90_ms": round(pct(lat, 90), 3),
        "p99_ms": round(pct(lat, 99), 3),
        "mean_ms": round(statistics.fmean(lat), 3),
        "min_ms": round(lat[0], 3),
        "max_ms": round(lat[-1], 3),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def qb_session(
    pool: str,
    conc: int,
    prefetch: int,
    n: int,
    modes: list[str],
    lat_n: int,
    repeat: int,
    log_dir: Path,
    prof_dir: Path | None,
    budget: Budget,
) -> list[dict[str, Any]]:
    """A fresh broker + worker; the e2e modes (median of `repeat`), then latency."""
    rows: list[dict[str, Any]] = []
    tag = f"{pool}{conc}" + (f"p{prefetch}" if prefetch else "")
    with running_broker(f"e2e-{tag}") as b:
        queue = f"e2e_{tag}_{os.getpid()}"
        w = QWorker(
            b.url, queue, pool, conc, log_dir / f"qworker-{tag}.log", prefetch
        ).start()
        targets = {"broker": (b.pid, False), "worker": (w.pid, True),
                   "client": (os.getpid(), False)}  # fmt: skip
        try:
            with qclient.Client(b.url, timeout=30) as client:
                ready = warm_up(client, w, queue, max(20, 4 * conc))
                for mode in modes:
                    runs = []
                    for _ in range(repeat):
                        with profiled(prof_dir, f"{mode}-{tag}", targets):
                            runs.append(
                                qb_end_to_end(b, w, client, n, mode, budget.phase())
                            )
                    runs.sort(key=lambda r: r["seconds"])
                    row = dict(runs[len(runs) // 2])
                    row["runs_jobs_per_s"] = [r["jobs_per_s"] for r in runs]
                    row["ready_seconds"] = round(ready, 3)
                    rows.append(row)
                    print_row(row)
                if lat_n:
                    qb_latency(client, queue, min(50, lat_n), budget.phase())  # warm
                    with profiled(prof_dir, f"latency-{tag}", targets):
                        row = qb_latency(client, queue, lat_n, budget.phase())
                    row["pool"] = w.label
                    rows.append(row)
                    print_row(row)
        finally:
            w.stop()
    return rows


# ------------------------------------------------------------------ output


def print_row(d: dict[str, Any]) -> None:
    head = f"  {d['peer']:<8} {d['pool']:<12} {d['mode']:<16} {d['jobs']:>6}  "
    if "p50_ms" in d:
        print(
            f"{head}p50 {d['p50_ms']:.2f} ms  p99 {d['p99_ms']:.2f} ms  "
            f"mean {d['mean_ms']:.2f} ms  max {d['max_ms']:.1f} ms  "
            f"load {d.get('loadavg_1m')}",
            flush=True,
        )
        return
    extra = f"send {d['send_per_s']:.0f}/s"
    if "done_seconds" in d:
        per = 1e6 / d["jobs"]
        extra += (
            f"  done {d['done_seconds']:.2f}s  cpu us/job broker "
            f"{d['cpu_broker_user'] * per:.0f}u+{d['cpu_broker_sys'] * per:.0f}s "
            f"worker {d['cpu_worker'] * per:.0f} client {d['cpu_client'] * per:.0f}"
        )
    print(
        f"{head}{d['seconds']:8.3f}s {d['jobs_per_s']:8.0f} jobs/s  {extra}  "
        f"load {d.get('loadavg_1m')}",
        flush=True,
    )
    if d.get("per_job"):
        print(
            "      per job: "
            + ", ".join(f"{k} {v:g}" for k, v in d["per_job"].items()),
            flush=True,
        )


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def final_table(qb: list[dict[str, Any]], cel: dict[str, dict[str, Any]]) -> str:
    """The summary table (markdown), qbroker vs Celery, with ratios and targets."""
    w0 = 52
    lines = [
        f"| {'measure':<{w0}} | {'qbroker':>9} | {'Celery+Redis':>12} | {'ratio':>6} "
        f"| {'target':>8} | {'verdict':<7} |",
        f"|{'-' * (w0 + 2)}|{'-' * 11}|{'-' * 14}|{'-' * 8}|{'-' * 10}|{'-' * 9}|",
    ]

    def row(name: str, q: str, c: str, ratio: str, target: str, ok: str) -> None:
        lines.append(
            f"| {name:<{w0}} | {q:>9} | {c:>12} | {ratio:>6} | {target:>8} | {ok:<7} |"
        )

    e2e = [r for r in qb if "p50_ms" not in r]
    for r in e2e:
        kind = "one" if r["mode"] == "send()" else "many"
        c = cel.get(kind)
        name = f"e2e jobs/s {r['mode']} x{r['jobs']}, {r['pool']}"
        if c is None:
            row(name, f"{r['jobs_per_s']:.0f}", "-", "-", "-", "")
            continue
        ratio = r["jobs_per_s"] / c["jobs_per_s"]
        row(
            name, f"{r['jobs_per_s']:.0f}", f"{c['jobs_per_s']:.0f}", f"{ratio:.2f}x",
            f">= {TARGETS[kind]:.0f}x", verdict(ratio >= TARGETS[kind]),
        )  # fmt: skip
    for r in e2e:
        kind = "one" if r["mode"] == "send()" else "many"
        c = cel.get(kind)
        if c is None or not r.get("done_jobs_per_s"):
            continue
        ratio = r["done_jobs_per_s"] / c["jobs_per_s"]
        row(
            f"  (no result fetch) {r['mode']}, {r['pool']}",
            f"{r['done_jobs_per_s']:.0f}", f"{c['jobs_per_s']:.0f}", f"{ratio:.2f}x",
            "info", "",
        )  # fmt: skip
    for r in qb:
        if "p50_ms" not in r:
            continue
        c = cel.get("latency")
        for key, lim in (("p50_ms", TARGETS["p50_ms"]), ("p99_ms", TARGETS["p99_ms"])):
            cv = f"{c[key]:.2f}" if c else "-"
            ratio = f"{c[key] / r[key]:.2f}x" if c else "-"
            row(
                f"round trip {key[:3]} ms, send+result, {r['pool']}",
                f"{r[key]:.2f}", cv, ratio, f"< {lim:g} ms", verdict(r[key] < lim),
            )  # fmt: skip
    lines.append("")
    lines.append(
        "ratio: qbroker/Celery for jobs/s, Celery/qbroker for latency (> 1 = qbroker "
        "better). Celery: prefork -c 2, Redis broker + Redis results, same n. "
        "'no result fetch': n / (last finished_at - first send), vs Celery's full time."
    )
    return "\n".join(lines)


def redis_persistence() -> str:
    try:
        import redis

        r = redis.Redis(host="127.0.0.1", port=6379)
        save = r.config_get("save").get("save")
        aof = r.config_get("appendonly").get("appendonly")
        r.close()
        return f"redis save={save!r} appendonly={aof}"
    except Exception as exc:
        return f"redis config unknown ({type(exc).__name__})"


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="n=2000, latency n=200")
    ap.add_argument("--n", type=int, help="jobs per throughput run (default 10,000)")
    ap.add_argument("--latency-n", type=int, help="round trips (default 1,000)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per e2e config (median)"
    )
    ap.add_argument("--only", choices=["both", "qbroker", "celery"], default="both")
    ap.add_argument(
        "--pools", default="processes2,threads8,processes2+p1000,threads8+p1000",
        help="qworker shapes, comma-separated: processes2, threads8, ...; "
        "+pN adds --prefetch N",
    )  # fmt: skip
    ap.add_argument("--modes", default="one,many", help="one (send) and/or many")
    ap.add_argument("--profile", type=Path, help="py-spy raw profiles into this dir")
    ap.add_argument("--summarize", type=Path, nargs="+", help="summarize py-spy files")
    ap.add_argument("--json", type=Path, help="also write all result dicts here")
    ap.add_argument(
        "--budget", type=float, default=450.0,
        help="wall-time bound of the run in seconds (default 450)",
    )  # fmt: skip
    a = ap.parse_args(argv)
    if a.summarize:
        for p in a.summarize:
            print(summarize(p))
        return 0
    n = a.n or (2000 if a.quick else 10_000)
    lat_n = a.latency_n if a.latency_n is not None else (200 if a.quick else 1000)
    modes = a.modes.split(",")
    t_start = time.monotonic()
    budget = Budget(a.budget)
    log_dir = Path(tempfile.mkdtemp(prefix="qb-e2e-logs-"))
    print(
        f"# e2e {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | python "
        f"{platform.python_version()} | {os.cpu_count()} cpus | n={n} latency_n={lat_n} "
        f"repeat={a.repeat} | loadavg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# qbroker fsyncs every 2xx write (SQLite WAL, synchronous=FULL); "
        f"{redis_persistence()} (Redis keeps nothing on disk)"
    )
    print(f"# logs: {log_dir}", flush=True)
    rows: list[dict[str, Any]] = []
    cel: dict[str, dict[str, Any]] = {}
    rc = 0
    try:
        if a.only in ("both", "celery"):
            import peers

            print("Celery 5 + Redis (prefork -c 2):", flush=True)
            for mode in modes:
                d = peers.celery_end_to_end(
                    n, "redis", "prefork", 2, "one" if mode == "one" else "batch",
                    timeout=budget.phase(PHASE_TIMEOUT * a.repeat), log_dir=str(log_dir),
                    repeat=a.repeat,
                )  # fmt: skip
                d["pool"] = "prefork/2"
                STARTED_PIDS.extend(d.get("worker_pids", []))
                cel[mode] = d
                rows.append(d)
                print_row(d)
            if lat_n:
                d = peers.celery_roundtrip_latency(
                    lat_n, "redis", timeout=budget.phase(), log_dir=str(log_dir)
                )
                d["pool"] = "prefork/2"
                STARTED_PIDS.extend(d.get("worker_pids", []))
                cel["latency"] = d
                rows.append(d)
                print_row(d)
        qb: list[dict[str, Any]] = []
        if a.only in ("both", "qbroker"):
            print("qbroker (every reply fsynced):", flush=True)
            for shape in a.pools.split(","):
                m = re.fullmatch(r"(processes|threads)(\d+)(?:\+p(\d+))?", shape)
                if not m:
                    raise SystemExit(f"bad pool shape {shape!r}")
                pool, conc, prefetch = m[1], int(m[2]), int(m[3] or 0)
                lat = lat_n if pool == "threads" and not prefetch else 0
                qb += qb_session(
                    pool, conc, prefetch, n, modes, lat,
                    a.repeat, log_dir, a.profile, budget,
                )  # fmt: skip
            rows += qb
        print()
        print(final_table(qb, cel))
        if a.profile:
            print(f"\n# py-spy profiles in {a.profile}; summaries:")
            for p in sorted(a.profile.glob("*.txt")):
                print(summarize(p, top=12))
    finally:
        survivors = alive(STARTED_PIDS)
        if survivors:
            kill_pids(survivors, signal.SIGKILL)
            print(f"WARNING: had to SIGKILL leftover PIDs {survivors}", file=sys.stderr)
            rc = 1
        print(
            f"# wall time {time.monotonic() - t_start:.0f} s; "
            f"{len(STARTED_PIDS)} started PIDs (brokers, workers + pool children, "
            f"py-spy) checked by PID: {len(survivors)} left"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
