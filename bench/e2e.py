"""End to end, qbroker against Celery + Redis and Dramatiq + RabbitMQ, in one run.

Each system runs the same workload on the same (shared, noisy) machine, so the ratios
mean something:

  e2e        n x ``add(i, i)`` sent one at a time, then every result fetched and
             checked; jobs/s from the first send to the last result
  round trip lat_n sequential send + result; p50 and p99
  CPU        per job of the e2e phase, from /proc: the broker's process (for Dramatiq,
             RabbitMQ plus Redis holding the results), the worker and its children,
             and this process (the producer, results fetched included)

Systems (peers in bench/peers.py):

  Celery+Redis        prefork -c 2; ``add.delay()``, ``ResultSet.get()``
  Celery+qbroker      the same app and worker on qbroker (qclient.celery), settings only
  Dramatiq+RabbitMQ   1 process x 8 threads; ``add.send()``, ``get_result(block=True)``
  qbroker             a fresh ``qbroker serve`` (its defaults: every 2xx to a write is
                      fsynced) per worker; ``qworker --pool processes -c 2`` and
                      ``--pool threads -c 8``: ``client.send()``, ``client.results()``,
                      round trips ``client.send()`` + ``wait_job()`` (the request
                      ``Job.result()`` makes); and ``client.send_many()`` with a
                      qworker started with no flags but --queue/--module/--url

plus the rate of one-at-a-time sends with no worker: ``qclient.send()`` against
Celery's ``delay()``. Targets are issue 23's; the table prints each with its verdict.

Usage:

  python bench/e2e.py                         # n=10,000, lat_n=1,000 (~3 min)
  python bench/e2e.py --n 2000                # lat_n = n/10
  python bench/e2e.py --only qbroker --profile /tmp/prof   # py-spy the qbroker runs
  python bench/e2e.py --summarize /tmp/prof/broker-send-threads8.txt

Needs the `bench` extra (pyproject.toml), Redis on 127.0.0.1:6379 (db 15 only) and
RabbitMQ on 127.0.0.1:5672 (guest/guest). Every process it starts is stopped by PID
and checked gone at the end; exit status 1 if one survived.
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

CLK_TCK = os.sysconf("SC_CLK_TCK")
PHASE_TIMEOUT = 150.0  #: seconds one measured phase may take before it is abandoned
BASE = "Celery+Redis"  #: the system every ratio is taken against

#: every PID this process started, to check at the end that none survived
STARTED_PIDS: list[int] = []


# ------------------------------------------------------------------ small helpers


def pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO / p) for p in ("broker", "client", "worker")] + [str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _stat_cpu(path: str) -> tuple[float, float]:
    """(user, system) CPU seconds from a /proc .../stat file; zeros if it is gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu(pid: int, which: str = "both") -> float:
    """CPU seconds (user, sys or both; all threads) of one process so far."""
    user, system = _stat_cpu(f"/proc/{pid}/stat")
    return {"user": user, "sys": system}.get(which, user + system)


def cpu_of(pids: list[int]) -> float:
    return sum(proc_cpu(p) for p in pids)


def self_cpu() -> float:
    """This process's CPU seconds, all threads (the producer's side)."""
    return proc_cpu(os.getpid())


def thread_cpu(pid: int) -> collections.Counter[str]:
    """CPU seconds so far of each thread of `pid`, summed by thread name."""
    out: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                out[name] += sum(_stat_cpu(f"/proc/{pid}/task/{tid}/stat"))
    return out


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


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def e2e_row(system: str, worker: str, mode: str, n: int, secs: float, send_secs: float,
            broker_cpu: float, worker_cpu: float, producer_cpu: float,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
    """One e2e measurement; CPU figures in µs per job."""
    return {
        "system": system, "worker": worker, "mode": mode, "jobs": n,
        "seconds": round(secs, 3), "jobs_per_s": round(n / secs, 1),
        "send_per_s": round(n / send_secs, 1),
        "broker_us": round(1e6 * broker_cpu / n), "worker_us": round(1e6 * worker_cpu / n),
        "producer_us": round(1e6 * producer_cpu / n), "loadavg_1m": loadavg(),
        **{k: round(1e6 * v / n) if isinstance(v, float) else v
           for k, v in extra.items() if v is not None},
    }  # fmt: skip


def latency_row(system: str, worker: str, lat_ms: list[float]) -> dict[str, Any]:
    lat = sorted(lat_ms)
    return {
        "system": system, "worker": worker, "mode": "round trip", "jobs": len(lat),
        "p50_ms": round(pct(lat, 50), 3), "p99_ms": round(pct(lat, 99), 3),
        "mean_ms": round(statistics.fmean(lat), 3), "max_ms": round(lat[-1], 3),
        "loadavg_1m": loadavg(),
    }  # fmt: skip


def send_row(system: str, call: str, n: int, secs: float, cpu: float) -> dict[str, Any]:
    """One-at-a-time sends with no worker running."""
    return {
        "system": system, "mode": f"{call}, no worker", "jobs": n,
        "send_per_s": round(n / secs, 1), "producer_us": round(1e6 * cpu / n),
        "loadavg_1m": loadavg(),
    }  # fmt: skip


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
        with open(self.log_path, "ab") as log:
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
    """`python -m qworker --queue Q --module bench_tasks --url URL [flags]`, cwd bench/.

    `flags` None starts it with no other flag (its defaults, logging included).
    """

    def __init__(
        self, url: str, queue: str, log: Path, pool: str = "", concurrency: int = 0,
        flags: list[str] | None = None,
    ):  # fmt: skip
        self.url, self.queue, self.log_path = url, queue, log
        if flags is None and pool:
            flags = ["--pool", pool, "--concurrency", str(concurrency),
                     "--log-level", "warning", "--grace", "5"]  # fmt: skip
        self.flags = flags or []
        self.label = f"{pool}/{concurrency}" if pool else "defaults"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []

    def start(self) -> QWorker:
        cmd = [sys.executable, "-m", "qworker", "--queue", self.queue,
               "--module", "bench_tasks", "--url", self.url, *self.flags]  # fmt: skip
        with open(self.log_path, "ab") as log:
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
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"qworker exited; see {self.log_path}")

    def cpu(self) -> float:
        """CPU seconds of the worker and its pool children (those alive now)."""
        return cpu_of(self.pids)

    def stop(self) -> None:
        """SIGTERM by PID, then SIGKILL what lingers."""
        if self.proc is None:
            return
        self.record_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(self.pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_pids(alive(self.pids), signal.SIGKILL)


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
    r"^(qbroker_http_requests_total|qbroker_commit_batch_size_count)"
    r"(?:\{([^}]*)\})? ([0-9.e+]+)$"
)


def scrape(url: str) -> collections.Counter[str]:
    """Requests answered by route, and group commits, from the broker's /metrics."""
    import urllib.request

    out: collections.Counter[str] = collections.Counter()
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if m := _METRIC.match(line):
            if m[1] == "qbroker_http_requests_total":
                route = re.search(r'route="([^"]*)"', m[2] or "")
                out[route[1] if route else "?"] += int(float(m[3]))
            else:
                out["(commits)"] += int(float(m[3]))
    return out


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of a process's main thread: the broker's trio loop."""
    return sum(_stat_cpu(f"/proc/{pid}/task/{pid}/stat"))


class Budget:
    """The run's wall-time bound: every phase gets at most what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def phase(self, cap: float = PHASE_TIMEOUT) -> float:
        """Seconds the next phase may take; raises TimeoutError when none are left."""
        left = self.end - time.monotonic()
        if left < 5:
            raise TimeoutError("the run's time budget is spent")
        return min(cap, left)


def warm_up(client: qclient.Client, worker: QWorker, queue: str, k: int) -> None:
    jobs = [client.send(queue, task="add", args=[1, 1]) for _ in range(k)]
    deadline = time.monotonic() + 60
    for job in jobs:
        while True:
            worker.check_alive()
            try:
                job.result(timeout=1.0)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
    worker.record_children()


def qb_e2e(b: Broker, w: QWorker, client: qclient.Client, n: int, many: bool,
           timeout: float) -> dict[str, Any]:  # fmt: skip
    """n x add(i, i), sent one at a time (or by send_many), then every result."""
    m0 = scrape(b.url)
    cpu0 = (b.cpu(), main_thread_cpu(b.pid), w.cpu(), self_cpu())
    t0 = time.perf_counter()
    if many:
        jobs = client.send_many(
            w.queue, [qclient.JobSpec(task="add", args=[i, i]) for i in range(n)]
        )
    else:
        jobs = [client.send(w.queue, task="add", args=[i, i]) for i in range(n)]
    t_sent = time.perf_counter()
    values = client.results(jobs, timeout=timeout)
    secs = time.perf_counter() - t0
    cpu1 = (b.cpu(), main_thread_cpu(b.pid), w.cpu(), self_cpu())
    if values != [2 * i for i in range(n)]:
        raise RuntimeError("qbroker: wrong results")
    used = scrape(b.url) - m0
    used["metrics"] -= 1  # our own scrape
    broker, trio, wcpu, producer = (y - x for x, y in zip(cpu0, cpu1, strict=True))
    return e2e_row(
        "qbroker", w.label, "send_many()" if many else "send()", n, secs, t_sent - t0,
        broker, wcpu, producer, broker_trio_us=trio,
        per_job={k: round(v / n, 2) for k, v in sorted(used.items()) if v > 0},
    )  # fmt: skip


def qb_latency(client: qclient.Client, w: QWorker, n: int) -> dict[str, Any]:
    """n x send + wait_job (the request `Job.result()` makes), with the job's own
    timestamps splitting each round trip: send, to the lease, to the ack, to us."""
    lat, split = [], []
    for i in range(n):
        t0 = time.time()
        job = client.send(w.queue, task="add", args=[i, i])
        t1 = time.time()
        rec = client.wait_job(job.id, 30)
        t2 = time.time()
        if rec.result != 2 * i or rec.started_at is None or rec.finished_at is None:
            raise RuntimeError(f"qbroker: round trip {i} ended {rec.state}")
        lat.append((t2 - t0) * 1000)
        # the lease may come before the send's reply: handed off in the same commit
        split.append((t1 - t0, rec.started_at - t0, rec.finished_at - rec.started_at,
                      t2 - rec.finished_at))  # fmt: skip
    row = latency_row("qbroker", w.label, lat)
    parts = ("send", "send to lease", "run+ack", "to client")
    row["split_p50_ms"] = {
        k: round(1000 * statistics.median(s[j] for s in split), 3)
        for j, k in enumerate(parts)
    }
    return row


def qb_session(shape: str, n: int, lat_n: int, log_dir: Path, prof_dir: Path | None,
               budget: Budget) -> list[dict[str, Any]]:  # fmt: skip
    """A fresh broker and one worker: `processes2` / `threads8` (e2e with send() and
    round trips) or `defaults` (e2e with send_many(), worker with no flags)."""
    rows: list[dict[str, Any]] = []
    with running_broker(f"e2e-{shape}") as b:
        queue = f"e2e_{shape}_{os.getpid()}"
        log = log_dir / f"qworker-{shape}.log"
        if shape == "defaults":
            w = QWorker(b.url, queue, log, flags=None).start()
        else:
            m = re.fullmatch(r"(processes|threads)(\d+)", shape)
            if not m:
                raise SystemExit(f"bad worker shape {shape!r}")
            w = QWorker(b.url, queue, log, m[1], int(m[2])).start()
        spied = {"broker": (b.pid, False), "worker": (w.pid, True),
                 "producer": (os.getpid(), False)}  # fmt: skip
        try:
            with qclient.Client(b.url, timeout=30) as client:
                warm_up(client, w, queue, 20)
                many = shape == "defaults"
                tag = f"{'send_many' if many else 'send'}-{shape}"
                with profiled(prof_dir, tag, spied):
                    rows.append(qb_e2e(b, w, client, n, many, budget.phase()))
                print_row(rows[-1])
                if lat_n and not many:
                    qb_latency(client, w, min(50, lat_n))  # warm
                    rows.append(qb_latency(client, w, lat_n))
                    print_row(rows[-1])
        finally:
            w.stop()
    return rows


def qb_send_only(n: int) -> dict[str, Any]:
    """n x client.send() to a fresh broker with no worker."""
    with running_broker("e2e-send") as b, qclient.Client(b.url, timeout=30) as client:
        for i in range(50):
            client.send("idle", task="add", args=[i, i])
        cpu0, bcpu0 = self_cpu(), b.cpu()
        t0 = time.perf_counter()
        for i in range(n):
            client.send("idle", task="add", args=[i, i])
        secs = time.perf_counter() - t0
        row = send_row("qbroker", "send()", n, secs, self_cpu() - cpu0)
        row["broker_us"] = round(1e6 * (b.cpu() - bcpu0) / n)
    return row


# ------------------------------------------------------------------ output


def print_row(d: dict[str, Any]) -> None:
    head = f"  {d['system']:<18} {d.get('worker', ''):<11} {d['mode']:<17} {d['jobs']:>6}  "
    if "p50_ms" in d:
        split = d.get("split_p50_ms")
        tail = ("  p50 split " + ", ".join(f"{k} {v:.2f}" for k, v in split.items())
                if split else "")  # fmt: skip
        print(f"{head}p50 {d['p50_ms']:.2f} ms  p99 {d['p99_ms']:.2f} ms  max "
              f"{d['max_ms']:.1f} ms{tail}  load {d['loadavg_1m']}", flush=True)  # fmt: skip
    elif "jobs_per_s" in d:
        extra = "".join(f" {k[:-3]} {d[k]}" for k in ("results_store_us", "broker_trio_us")
                        if k in d)  # fmt: skip
        print(f"{head}{d['jobs_per_s']:7.0f} jobs/s  send {d['send_per_s']:.0f}/s  "
              f"CPU us/job broker {d['broker_us']}{extra} worker {d['worker_us']} "
              f"producer {d['producer_us']}  load {d['loadavg_1m']}", flush=True)  # fmt: skip
        if d.get("per_job"):
            print(
                "      per job: "
                + ", ".join(f"{k} {v:g}" for k, v in d["per_job"].items())
            )
    else:
        print(f"{head}{d['send_per_s']:7.0f} sends/s  producer {d['producer_us']} us/send"
              f"  load {d['loadavg_1m']}", flush=True)  # fmt: skip


def tables(rows: list[dict[str, Any]]) -> str:
    """The summary (markdown): each system against Celery+Redis, then the targets."""
    e2e = [r for r in rows if "jobs_per_s" in r]
    lat = {(r["system"], r["worker"]): r for r in rows if "p50_ms" in r}
    sends = {r["system"]: r for r in rows if r["mode"].endswith("no worker")}
    base = next((r for r in e2e if r["system"] == BASE), None)
    base_lat = lat.get((BASE, base["worker"])) if base else None

    def ratio(x: float | None, y: float | None) -> str:
        return f"{x / y:.2f}x" if x and y else "-"

    out = ["| system | worker | sent with | e2e jobs/s | vs Celery+Redis | p50 ms | p99 ms "
           "| broker CPU µs/job | worker CPU µs/job | producer CPU µs/job |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for r in e2e:
        la = lat.get((r["system"], r["worker"])) if r["mode"] == "send()" else None
        broker = str(r["broker_us"])
        if "results_store_us" in r:
            broker += f" (of which Redis, results: {r['results_store_us']})"
        out.append(
            f"| {r['system']} | {r['worker']} | {r['mode']} | {r['jobs_per_s']:,.0f} | "
            f"{ratio(r['jobs_per_s'], base and base['jobs_per_s'])} | "
            f"{la['p50_ms'] if la else '-'} | {la['p99_ms'] if la else '-'} | {broker} | "
            f"{r['worker_us']} | {r['producer_us']} |"
        )  # fmt: skip
    out.append("")
    q, c = sends.get("qbroker"), sends.get(BASE)
    out.append("| one at a time, no worker | sends/s | producer CPU µs/send |")
    out.append("|---|--:|--:|")
    for r in (q, c):
        if r:
            out.append(f"| {r['system']} {r['mode'].split(',')[0]} | "
                       f"{r['send_per_s']:,.0f} | {r['producer_us']} |")  # fmt: skip
    out.append("")

    def qrow(worker: str, mode: str = "send()") -> dict[str, Any] | None:
        return next((r for r in e2e if r["system"] == "qbroker" and r["worker"] == worker
                     and r["mode"] == mode), None)  # fmt: skip

    t8, many = qrow("threads/8"), qrow("defaults", "send_many()")
    t8_lat = lat.get(("qbroker", "threads/8"))
    checks: list[tuple[str, str, bool | None]] = []
    if t8:
        checks.append(("broker CPU per job, send(), threads/8 <= 900 µs",
                       f"{t8['broker_us']} µs", t8["broker_us"] <= 900))  # fmt: skip
    if base:
        for r in (qrow("threads/8"), qrow("processes/2")):
            if r:
                x = r["jobs_per_s"] / base["jobs_per_s"]
                checks.append((f"e2e send(), {r['worker']} >= 1.5x Celery+Redis",
                               f"{x:.2f}x", x >= 1.5))  # fmt: skip
        if many:
            x = many["jobs_per_s"] / base["jobs_per_s"]
            checks.append(("e2e send_many(), worker defaults >= 10x Celery+Redis",
                           f"{x:.2f}x", x >= 10))  # fmt: skip
    if t8_lat and base_lat:
        checks.append(("round trip p50, threads/8 <= Celery+Redis's",
                       f"{t8_lat['p50_ms']:.2f} vs {base_lat['p50_ms']:.2f} ms",
                       t8_lat["p50_ms"] <= base_lat["p50_ms"]))  # fmt: skip
    if q and c:
        x = q["send_per_s"] / c["send_per_s"]
        checks.append(
            ("send() with no worker >= Celery's delay()", f"{x:.2f}x", x >= 1)
        )
    out.append("| target (issue 23) | measured | verdict |")
    out.append("|---|--:|---|")
    out += [
        f"| {name} | {got} | {'met' if ok else 'NOT met'} |" for name, got, ok in checks
    ]
    return "\n".join(out)


def redis_persistence() -> str:
    try:
        import redis

        with contextlib.closing(redis.Redis(host="127.0.0.1", port=6379)) as r:
            save = r.config_get("save").get("save")
            aof = r.config_get("appendonly").get("appendonly")
        return f"Redis save={save!r} appendonly={aof}"
    except Exception as exc:
        return f"Redis config unknown ({type(exc).__name__})"


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="jobs per e2e run")
    ap.add_argument("--latency-n", type=int, help="round trips (default n/10)")
    ap.add_argument("--only", choices=["all", "qbroker", "peers"], default="all")
    ap.add_argument("--workers", default="processes2,threads8,defaults",
                    help="qbroker worker shapes (defaults = send_many, no flags)")  # fmt: skip
    ap.add_argument(
        "--profile", type=Path, help="py-spy the qbroker runs into this dir"
    )
    ap.add_argument("--summarize", type=Path, nargs="+", help="summarize py-spy files")
    ap.add_argument("--json", type=Path, help="also write every row here")
    ap.add_argument("--budget", type=float, default=540.0,
                    help="wall-time bound of the run in seconds")  # fmt: skip
    a = ap.parse_args(argv)
    if a.summarize:
        for p in a.summarize:
            print(summarize(p))
        return 0
    n = a.n
    lat_n = a.latency_n if a.latency_n is not None else max(50, n // 10)
    t_start = time.monotonic()
    budget = Budget(a.budget)
    log_dir = Path(tempfile.mkdtemp(prefix="qb-e2e-logs-"))
    print(f"# e2e {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} | python "
          f"{platform.python_version()} | {os.cpu_count()} cpus | n={n} latency_n={lat_n}"
          f" | loadavg {loadavg()}")  # fmt: skip
    print(f"# qbroker fsyncs every 2xx write (SQLite WAL, synchronous=FULL); "
          f"{redis_persistence()}; Dramatiq publishes without confirms | logs: {log_dir}",
          flush=True)  # fmt: skip
    rows: list[dict[str, Any]] = []
    rc = 0
    try:
        if a.only in ("all", "peers"):
            import peers

            for fn in (
                peers.celery_redis,
                peers.celery_qbroker,
                peers.dramatiq_rabbitmq,
            ):
                for row in fn(n, lat_n, log_dir):
                    rows.append(row)
                    print_row(row)
        if a.only in ("all", "qbroker"):
            for shape in a.workers.split(","):
                rows += qb_session(shape, n, lat_n, log_dir, a.profile, budget)
            rows.append(qb_send_only(n))
            print_row(rows[-1])
        print()
        print(tables(rows))
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
        print(f"# wall time {time.monotonic() - t_start:.0f} s; {len(STARTED_PIDS)} "
              f"started PIDs checked: {len(survivors)} left")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
