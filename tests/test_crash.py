"""Crash tests: SIGKILL the broker and the workers under load, restart them, check.

Run them alone, with their figures: `python -m pytest -m crash -s tests/test_crash.py`.

Every test runs producer threads (qclient, client-chosen ids; an id counts as
*acknowledged* once `send()`/`send_many()` returned) and `python -m qworker`
subprocesses running `tasks_crash.crash_job`, which appends fsync'd `start`/`end` lines
to a log (see tests/tasks_crash.py) and returns a fresh token plus the attempt number
the broker's record showed when it began. A driver kills processes by PID at random
moments and restarts them: the broker on the same data dir and the same port, a worker
under a new label. Then the producers stop, the workers drain the queue, and `verify()`
checks the invariants of DESIGN.md "Testing":

- every acknowledged enqueue is stored and ended `succeeded` (none lost);
- every job's result is the token of a run in the log that reached its end, and that run
  saw the job `active` at the attempt the record ends with: a result from an older
  delivery (an ack accepted on a stale lease) would carry a smaller attempt;
- the workers' own logs show at most one accepted ack per job, at the final attempt;
- a job ran more than once only if a kill falls between the start of one run and the
  start of the next (of the broker, or of the worker that held the earlier run), and
  never more often than it was leased;
- the counts by state add up to the jobs stored, all `succeeded`;
- with only workers killed, a job a kill interrupted ends within its lease plus a margin;
- no worker printed a traceback;
- `PRAGMA integrity_check` of the database after the last stop says ok.

Figures (kills, jobs sent, lost, duplicates, seconds) are printed; docs/reliability.md
"Crash tests" explains them and keeps the last run's.

The tasks lease for LEASE seconds, so an interrupted job comes back quickly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import qclient

from tests.conftest import BrokerFactory, BrokerProcess, child_env

pytestmark = pytest.mark.crash

TESTS_DIR = Path(__file__).resolve().parent
QUEUE = "crash_job"  #: the task's name, and so its queue
LEASE = 2.0  #: lease seconds of every job
#: A job whose every lease is lost ends `dead` (protocol.md section 5): with the broker's
#: default of 3 retries, a job leased four times by workers that were then killed could.
MAX_RETRIES = 50
SEND_GIVE_UP = 30.0  #: seconds a producer keeps resending one request
DRAIN_TIMEOUT = 60.0  #: seconds the workers get to finish every job at the end
WORKER_KILL_MARGIN = 6.0  #: seconds past the lease for a killed worker's job to end
STARTUP_SLACK = LEASE  #: a run may begin this long after the lease that carries it


# ------------------------------------------------------------------ the runs log


@dataclass
class Run:
    """One call of `crash_job`, from the `start`/`end` lines it wrote."""

    job_id: str
    token: str
    attempt: int  #: the record's `attempts` when it began (-1: could not read it)
    state: str  #: the record's state then; `active` for a job leased to us
    label: str  #: the worker that ran it
    pid: int  #: the process that ran it (a pool child with --pool processes)
    began: float  #: unix time the task was called
    ended: float | None = None  #: unix time of its `end` line, None if it never ended


def read_runs(path: Path) -> dict[str, Run]:
    """Every run in the log, by token."""
    runs: dict[str, Run] = {}
    if not path.exists():
        return runs
    lines = path.read_text().split("\n")
    # The last piece is "" or a line being written right now (a reader may see part
    # of a write that crosses a page boundary): leave it for the next read.
    for line in lines[:-1]:
        parts = line.split()
        if len(parts) != 9:  # cannot happen: one write(2) per line, O_APPEND
            raise AssertionError(f"torn line in the runs log: {line!r}")
        kind, job_id, token, attempt, state, label, pid, began, at = parts
        if kind == "start":
            runs[token] = Run(
                job_id, token, int(attempt), state, label, int(pid), float(began)
            )
        else:
            runs[token].ended = float(at)
    return runs


def runs_by_job(runs: dict[str, Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for run in runs.values():
        out[run.job_id].append(run)
    for job_runs in out.values():
        job_runs.sort(key=lambda r: r.began)
    return out


# ------------------------------------------------------------------ processes


class CrashWorker:
    """One `python -m qworker` subprocess; `label` names this incarnation."""

    def __init__(
        self, url: str, label: str, pool: str, concurrency: int, log_dir: Path
    ) -> None:
        self.label = label
        self.pool = pool
        self.concurrency = concurrency
        self.log_path = log_dir / f"worker-{label}.log"
        cmd = [
            sys.executable, "-m", "qworker", "--url", url, "--module", "tasks_crash",
            "--queue", QUEUE, "--pool", pool, "--concurrency", str(concurrency),
            "--name", label, "--grace", "5", "--log-format", "json",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=TESTS_DIR,
                env=child_env(QCRASH_WORKER=label),
                stdout=log,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL this worker's process (by its PID) and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:  # the last line of a SIGKILLed worker
                    continue
        return found


class Workers:
    """The test's workers: start, kill and replace them, stop them all at the end."""

    def __init__(self, url: str, log_dir: Path) -> None:
        self.url = url
        self.log_dir = log_dir
        self.all: list[CrashWorker] = []  #: every incarnation, dead or alive
        self._made = 0

    def start(self, pool: str, concurrency: int) -> CrashWorker:
        label = f"w{self._made}{pool[0]}"
        self._made += 1
        worker = CrashWorker(self.url, label, pool, concurrency, self.log_dir)
        self.all.append(worker)
        return worker

    def live(self) -> list[CrashWorker]:
        return [w for w in self.all if w.alive()]

    def stop_all(self, timeout: float = 20.0) -> list[int | None]:
        """SIGTERM every live worker, then wait for each (SIGKILL after `timeout`)."""
        live = self.live()
        for w in live:
            w.terminate()
        deadline = time.monotonic() + timeout
        return [w.wait(max(0.1, deadline - time.monotonic())) for w in live]

    def kill_all(self) -> None:
        for w in self.all:
            w.kill()


WorkersFactory = Callable[[str], Workers]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[WorkersFactory]:
    """`workers(url)` makes a test's `Workers`; every one is SIGKILLed after the test."""
    made: list[Workers] = []

    def make(url: str) -> Workers:
        w = Workers(url, tmp_path)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill_all()


@dataclass
class Kill:
    """One SIGKILL the driver sent."""

    at: float  #: unix time
    what: str  #: "broker", "worker" or "child"
    label: str = ""  #: the worker whose process (or pool child) was killed
    pid: int = 0
    in_flight: list[str] = field(default_factory=list)  #: jobs its runs had not ended
    down: float = 0.0  #: seconds until the broker answered again


# ------------------------------------------------------------------ producers


class Producer(threading.Thread):
    """Sends jobs at about `rate` per second, one (70 %) or 2-10 at a time, until stopped.

    A request that fails in transport is resent with the same ids until it gets a reply
    (for up to SEND_GIVE_UP seconds); a 409 `duplicate_id` after a resend means the first
    try stored the jobs. Ids are recorded as acknowledged only after the call returned.
    """

    def __init__(
        self,
        name: str,
        url: str,
        runs_log: Path,
        rate: float,
        seconds: tuple[float, float],
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"producer-{name}", daemon=True)
        self.prefix = name
        self.url = url
        self.runs_log = str(runs_log)
        self.rate = rate
        self.seconds = seconds
        self.stop = stop
        self.rng = random.Random()
        self.acked: list[str] = []  #: enqueues whose call returned: durably stored
        self.unknown: list[str] = []  #: enqueues given up on: stored or not
        self.errors: list[str] = []  #: replies no crash explains
        self.resends = 0

    def job_args(self, job_id: str) -> list[Any]:
        return [self.runs_log, job_id, self.url, self.rng.uniform(*self.seconds)]

    def run(self) -> None:
        with qclient.Client(self.url, timeout=5, retries=5) as client:
            n = 0
            next_at = time.monotonic()
            while not self.stop.is_set():
                size = 1 if self.rng.random() < 0.7 else self.rng.randint(2, 10)
                ids = [f"{self.prefix}-{n + i}" for i in range(size)]
                n += size
                if self._store(client, ids):
                    self.acked.extend(ids)
                else:
                    self.unknown.extend(ids)
                next_at += size / self.rate
                pause = next_at - time.monotonic()
                if pause > 0:
                    self.stop.wait(pause)
                else:  # behind after a broker outage: go on at the rate, no burst
                    next_at = time.monotonic()

    def _store(self, client: qclient.Client, ids: list[str]) -> bool:
        deadline = time.monotonic() + SEND_GIVE_UP
        resent = False
        while True:
            try:
                if len(ids) == 1:
                    client.send(
                        QUEUE,
                        args=self.job_args(ids[0]),
                        job_id=ids[0],
                        timeout=LEASE,
                        max_retries=MAX_RETRIES,
                    )
                else:
                    items = [
                        qclient.JobSpec(
                            id=i,
                            args=self.job_args(i),
                            timeout=LEASE,
                            max_retries=MAX_RETRIES,
                        )
                        for i in ids
                    ]
                    client.send_many(QUEUE, items)
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


class Producers:
    def __init__(
        self,
        url: str,
        runs_log: Path,
        count: int,
        rate: float,
        seconds: tuple[float, float],
    ) -> None:
        self.stop_event = threading.Event()
        self.threads = [
            Producer(f"p{i}", url, runs_log, rate / count, seconds, self.stop_event)
            for i in range(count)
        ]

    def start(self) -> None:
        for p in self.threads:
            p.start()

    def stop(self) -> None:
        self.stop_event.set()
        for p in self.threads:
            p.join(SEND_GIVE_UP + 10)
            assert not p.is_alive(), f"{p.name} did not stop"

    @property
    def acked(self) -> list[str]:
        return [i for p in self.threads for i in p.acked]

    @property
    def unknown(self) -> list[str]:
        return [i for p in self.threads for i in p.unknown]

    @property
    def errors(self) -> list[str]:
        return [e for p in self.threads for e in p.errors]

    @property
    def resends(self) -> int:
        return sum(p.resends for p in self.threads)


# ------------------------------------------------------------------ the drivers


def restart_broker(
    broker: BrokerProcess, port: int, kills: list[Kill], rng: random.Random
) -> None:
    """SIGKILL the broker, then start it again on the same data dir and port."""
    pid = broker.proc.pid if broker.proc is not None else 0
    kill = Kill(time.time(), "broker", pid=pid)
    kills.append(kill)
    broker.kill()
    # Down for a moment (a restart takes about 0.5 s more); one time in five, for
    # longer than a running job's lease can last without a heartbeat getting through.
    time.sleep(rng.uniform(1.5, 2.5) if rng.random() < 0.2 else rng.uniform(0.0, 0.3))
    for attempt in range(5):
        try:
            broker.start(port=port)
            break
        except RuntimeError:  # someone's socket holds the port for a moment
            if attempt == 4:
                raise
            time.sleep(0.5)
    kill.down = time.time() - kill.at


def in_flight(runs_log: Path, label: str) -> list[Run]:
    """Runs of worker `label` that have begun and not ended."""
    return [
        r for r in read_runs(runs_log).values() if r.label == label and r.ended is None
    ]


def environ_label(pid: int) -> str | None:
    """The QCRASH_WORKER of a live process, or None: never kill a recycled PID."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for entry in env.split(b"\0"):
        if entry.startswith(b"QCRASH_WORKER="):
            return entry.partition(b"=")[2].decode()
    return None


def kill_a_worker(
    workers: Workers, runs_log: Path, kills: list[Kill], rng: random.Random
) -> None:
    """SIGKILL a random live worker, or one of its pool children, in the middle of a
    run; start a replacement for a killed worker."""
    victim = rng.choice(workers.live())
    deadline = time.monotonic() + 3.0
    busy = in_flight(runs_log, victim.label)
    while not busy and time.monotonic() < deadline:  # wait until it runs something
        time.sleep(0.05)
        busy = in_flight(runs_log, victim.label)
    if victim.pool == "processes" and busy and rng.random() < 0.5:
        run = rng.choice(busy)
        if environ_label(run.pid) == victim.label and run.pid != victim.pid:
            at = time.time()
            os.kill(run.pid, signal.SIGKILL)
            kills.append(Kill(at, "child", victim.label, run.pid, [run.job_id]))
            return
    at = time.time()
    victim.kill()
    kills.append(
        Kill(at, "worker", victim.label, victim.pid, sorted({r.job_id for r in busy}))
    )
    workers.start(victim.pool, victim.concurrency)


# ------------------------------------------------------------------ checking


@dataclass
class Figures:
    name: str
    seconds: float = 0.0
    broker_kills: int = 0
    worker_kills: int = 0
    child_kills: int = 0
    long_outages: int = 0  #: broker kills it took over LEASE seconds to recover from
    sent: int = 0  #: acknowledged enqueues
    unknown: int = 0  #: enqueues given up on (stored or not)
    stored: int = 0
    lost: int = 0
    runs: int = 0
    duplicated_jobs: int = 0  #: jobs that ran more than once
    extra_runs: int = 0  #: runs beyond one per job
    deliveries_lost: int = 0  #: worker reports refused as stale (logged outcome=lost)
    #: logged outcome=lost, yet the broker had applied that very ack: must stay 0, a
    #: resend of an applied ack (its reply lost in a broker kill) is answered ok
    acks_applied_logged_lost: int = 0
    max_attempts: int = 0  #: the most leases one job took
    #: leases never run: the reply was lost in a broker kill, or the worker was
    #: killed with its lease request in flight or before it began the job
    orphan_leases: int = 0
    unverified: int = 0  #: results whose run could not read its attempt
    producer_resends: int = 0
    max_recovery: float = 0.0  #: worst seconds from a worker kill to its job's end

    def show(self) -> None:
        print(f"\n[crash] {self.name}: " + ", ".join(
            f"{k}={round(v, 2) if isinstance(v, float) else v}"
            for k, v in vars(self).items()
            if k != "name"
        ))  # fmt: skip


def wait_drained(client: qclient.Client, expected: int) -> dict[str, int]:
    """Wait until no stored job is unfinished; returns the final counts by state."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        counts = client.queue(QUEUE).counts
        unfinished = sum(counts[s] for s in ("scheduled", "queued", "active"))
        if unfinished == 0 and sum(counts.values()) >= expected:
            return counts
        if time.monotonic() > deadline:
            pytest.fail(f"not drained after {DRAIN_TIMEOUT} s: {counts}")
        time.sleep(0.2)


def integrity_ok(broker: BrokerProcess) -> str:
    conn = sqlite3.connect(broker.data_dir / "qbroker.db")
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def explained(prev: Run, nxt: Run, kills: list[Kill]) -> bool:
    """Whether a kill can explain why `prev` did not finish the job and `nxt` ran it:
    one between `prev`'s lease (at most STARTUP_SLACK before it began) and `nxt`'s
    start, of the broker or of the worker (or pool child) that ran `prev`."""
    low, high = prev.began - STARTUP_SLACK, nxt.began
    for k in kills:
        if not low <= k.at <= high:
            continue
        if k.what == "broker" or k.label == prev.label:
            return True
    return False


def verify(
    figures: Figures,
    client: qclient.Client,
    producers: Producers,
    workers: Workers,
    runs_log: Path,
    kills: list[Kill],
    *,
    recovery_bound: bool,
) -> None:
    """Drain, then check every invariant (see the module docstring); fills `figures`."""
    acked = producers.acked
    unknown = producers.unknown
    assert not producers.errors, producers.errors[:10]
    assert len(set(acked)) == len(acked)
    figures.sent, figures.unknown = len(acked), len(unknown)
    figures.producer_resends = producers.resends
    figures.broker_kills = sum(k.what == "broker" for k in kills)
    figures.worker_kills = sum(k.what == "worker" for k in kills)
    figures.child_kills = sum(k.what == "child" for k in kills)
    figures.long_outages = sum(k.down > LEASE for k in kills)

    counts = wait_drained(client, len(acked))
    records: dict[str, qclient.JobRecord] = {}
    lost = []
    for job_id in acked:
        try:
            records[job_id] = client.get_job(job_id)
        except qclient.JobNotFound:
            lost.append(job_id)
    for job_id in unknown:  # stored or not; if stored, it must have run too
        with contextlib.suppress(qclient.JobNotFound):
            records[job_id] = client.get_job(job_id)
    figures.lost = len(lost)
    figures.stored = len(records)
    assert not lost, f"{len(lost)} acknowledged enqueues are gone: {lost[:10]}"
    assert sum(counts.values()) == len(records), (counts, len(records))
    runs = read_runs(runs_log)
    by_job = runs_by_job(runs)
    not_done = [
        (r.id, r.state, r.attempts, r.error, by_job.get(r.id))
        for r in records.values()
        if r.state != "succeeded"
    ]
    assert not not_done, f"{counts}: {not_done[:5]}"
    figures.runs = len(runs)
    stale, unexplained, duplicated = [], [], []
    orphans = 0
    for job_id, record in records.items():
        job_runs = by_job.get(job_id, [])
        assert job_runs, f"{job_id} succeeded but never ran"
        result = record.result
        assert isinstance(result, dict), (job_id, result)
        run = runs.get(result["token"])
        # the kept result is that of a run of this job that reached its end...
        assert run is not None and run.job_id == job_id, (job_id, result)
        assert run.ended is not None, (job_id, result)
        # ...and that run held the job's last lease: an ack on a stale lease would
        # carry an older attempt (the record counts every lease).
        if result["attempt"] == -1:  # its GET of the record failed: cannot tell
            figures.unverified += 1
        elif (result["attempt"], result["state"]) != (record.attempts, "active"):
            stale.append((job_id, result, record.attempts))
        # every run had a lease of its own: more runs than leases would mean the
        # broker forgot a lease it had granted (a lost commit). (A worker's release at
        # shutdown uncounts a lease; these tests release nothing that ran: the workers
        # are SIGKILLed, or SIGTERMed once the queue is drained.)
        assert len(job_runs) <= record.attempts, (job_id, record.attempts, job_runs)
        orphans += record.attempts - len(job_runs)
        figures.max_attempts = max(figures.max_attempts, record.attempts)
        if len(job_runs) > 1:
            duplicated.append(job_id)
            for prev, nxt in itertools.pairwise(job_runs):
                if not explained(prev, nxt, kills):
                    unexplained.append((job_id, prev, nxt))
    figures.duplicated_jobs = len(duplicated)
    figures.extra_runs = sum(len(by_job[j]) - 1 for j in duplicated)
    figures.orphan_leases = orphans
    assert not stale, f"results from a stale lease: {stale[:10]}"
    assert not unexplained, f"runs repeated with no kill between: {unexplained[:5]}"

    # The workers' side: at most one accepted ack per job, and at its last attempt.
    acks: Counter[str] = Counter()
    for w in workers.all:
        for event in w.events():
            if event.get("event") != "job.finished":
                continue
            if event.get("outcome") == "lost":
                # The final attempt's delivery is the one whose ack the broker took:
                # its "lost" would be a resent ack_many refused after its own first try.
                if event["attempt"] == records[event["job_id"]].attempts:
                    figures.acks_applied_logged_lost += 1
                else:
                    figures.deliveries_lost += 1
            if event.get("outcome") == "succeeded":
                job_id = event["job_id"]
                acks[job_id] += 1
                assert event["attempt"] == records[job_id].attempts, event
    twice = [j for j, n in acks.items() if n > 1]
    assert not twice, f"acks accepted twice: {twice[:10]}"
    assert figures.acks_applied_logged_lost == 0, "a resent applied ack was refused"
    # Nothing crashed but what we killed: no traceback in any worker's output (a pool
    # child whose worker was SIGKILLed used to print BrokenPipeError on its reply).
    for w in workers.all:
        text = w.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"{w.label}:\n{text[-3000:]}"

    # A job a worker kill interrupted is back and done within its lease plus a margin
    # (checked without broker kills, which hold everything up).
    last_kill: dict[str, float] = {}
    for k in kills:
        if k.what != "broker":
            for job_id in k.in_flight:
                last_kill[job_id] = max(last_kill.get(job_id, 0.0), k.at)
    late = []
    for job_id, at in last_kill.items():
        finished = records[job_id].finished_at
        assert finished is not None
        figures.max_recovery = max(figures.max_recovery, finished - at)
        if finished > at + LEASE + WORKER_KILL_MARGIN:
            late.append((job_id, round(finished - at, 2)))
    if recovery_bound:
        assert not late, f"jobs finished too long after their worker's kill: {late}"

    if duplicated:
        t0 = min(r.began for r in runs.values())
        print(
            f"\n[crash] {figures.name}: jobs that ran more than once (worker@seconds)"
        )
        for job_id in duplicated[:20]:
            desc = ", ".join(
                f"{r.label}@{r.began - t0:.2f}{'' if r.ended else '(killed)'}"
                for r in by_job[job_id]
            )
            print(f"  {job_id} attempts={records[job_id].attempts}: {desc}")
        if len(duplicated) > 20:
            print(f"  ... and {len(duplicated) - 20} more")


def finish(
    figures: Figures,
    started: float,
    broker: BrokerProcess,
    workers: Workers,
) -> None:
    """Stop the workers and the broker gracefully, check the file, print figures."""
    codes = workers.stop_all()
    assert codes == [0] * len(codes), codes
    assert broker.stop() == 0
    assert integrity_ok(broker) == "ok"
    figures.seconds = time.monotonic() - started
    figures.show()


# ------------------------------------------------------------------ the tests


def seeded() -> random.Random:
    """The driver's random choices; the seed is printed (timing still varies)."""
    seed = random.randrange(2**32)
    print(f"\n[crash] seed={seed}")
    return random.Random(seed)


def test_broker_sigkilled_under_load_loses_nothing(
    tmp_path: Path, broker_factory: BrokerFactory, workers: WorkersFactory
) -> None:
    """SIGKILL the broker 20 times under producers and workers (both pools)."""
    started = time.monotonic()
    rng = seeded()
    figures = Figures("broker kills")
    broker = broker_factory().start()
    port = broker.port
    runs_log = tmp_path / "runs.log"
    pool: Workers = workers(broker.url)
    pool.start("threads", 4)
    pool.start("processes", 3)
    producers = Producers(broker.url, runs_log, 3, rate=24, seconds=(0.01, 0.3))
    producers.start()
    kills: list[Kill] = []
    for _ in range(20):
        time.sleep(rng.choice([rng.uniform(0.05, 0.4), rng.uniform(0.4, 1.5)]))
        restart_broker(broker, port, kills, rng)
    time.sleep(1.0)
    producers.stop()
    assert all(w.alive() for w in pool.all), "a worker died with the broker"
    with qclient.Client(broker.url, timeout=10) as client:
        verify(figures, client, producers, pool, runs_log, kills, recovery_bound=False)
    finish(figures, started, broker, pool)
    assert figures.broker_kills >= 20


@pytest.mark.parametrize("pool_kind", ["threads", "processes"])
def test_workers_sigkilled_mid_task_every_job_completes(
    tmp_path: Path, broker: BrokerProcess, workers: WorkersFactory, pool_kind: str
) -> None:
    """SIGKILL workers (and, with --pool processes, pool children) while they run tasks;
    start replacements; every job completes within its lease plus a margin of a kill."""
    started = time.monotonic()
    rng = seeded()
    figures = Figures(f"worker kills, --pool {pool_kind}")
    runs_log = tmp_path / "runs.log"
    pool: Workers = workers(broker.url)
    for _ in range(3):
        pool.start(pool_kind, 3)
    producers = Producers(broker.url, runs_log, 2, rate=10, seconds=(0.2, 0.6))
    producers.start()
    kills: list[Kill] = []
    time.sleep(1.5 if pool_kind == "threads" else 3.0)  # let the workers start
    for _ in range(8):
        kill_a_worker(pool, runs_log, kills, rng)
        time.sleep(rng.uniform(0.5, 1.5))
    time.sleep(1.0)
    producers.stop()
    with qclient.Client(broker.url, timeout=10) as client:
        verify(figures, client, producers, pool, runs_log, kills, recovery_bound=True)
    finish(figures, started, broker, pool)
    assert figures.worker_kills + figures.child_kills == 8


def test_broker_and_workers_sigkilled_together(
    tmp_path: Path, broker_factory: BrokerFactory, workers: WorkersFactory
) -> None:
    """Both at once, shorter: broker kills and worker/child kills interleaved."""
    started = time.monotonic()
    rng = seeded()
    figures = Figures("broker and worker kills")
    broker = broker_factory().start()
    port = broker.port
    runs_log = tmp_path / "runs.log"
    pool: Workers = workers(broker.url)
    pool.start("threads", 3)
    pool.start("processes", 3)
    pool.start("threads", 3)
    producers = Producers(broker.url, runs_log, 2, rate=12, seconds=(0.05, 0.5))
    producers.start()
    kills: list[Kill] = []
    time.sleep(2.0)
    for i in range(12):
        if i % 2:
            restart_broker(broker, port, kills, rng)
        else:
            kill_a_worker(pool, runs_log, kills, rng)
        time.sleep(rng.uniform(0.3, 1.2))
    time.sleep(1.0)
    producers.stop()
    with qclient.Client(broker.url, timeout=10) as client:
        verify(figures, client, producers, pool, runs_log, kills, recovery_bound=False)
    finish(figures, started, broker, pool)
