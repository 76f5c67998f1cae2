"""The worker: lease jobs for free slots, run them in a pool, heartbeat, ack or fail.

Theory of operation. Three threads share one lock (`Worker._cond`) and the state under
it: `_running` (job id -> Execution, leased and not settled yet) and `_results` (settled
outcomes waiting to be reported).

- The **lease thread** waits until a slot is free, then asks for exactly that many jobs
  in one long-poll (`wait` = LEASE_WAIT): by default never a prefetch beyond free
  slots (see *Prefetch* below). The outcomes settled meanwhile (the one that freed the
  slot, usually) ride along in the same request, which the broker commits before it
  leases or waits: a busy worker makes one request per job, not a lease and an ack.
  When the jobs a lease brought drained the queue and runs are short (SHORT_RUN), it
  waits up to twice the mean run (at most CARRY_WAIT) for their outcomes to ride along
  too, instead of long-polling at once and leaving them to an ack of their own; with
  the thread pool it runs one of those jobs itself meanwhile (see `_dispatch`). When
  more jobs are ready and runs are short, a slot that frees up waits the same moment
  for the other slots about to free up (`_gather_slots`), so one lease refills them
  all instead of one request per slot. A job for an unknown task is settled at once
  as failed (no retry); the rest go to the pool.
  Transport trouble is logged once as `broker.unreachable` and retried with capped
  exponential backoff; `broker.reconnected` is logged when a request gets through.
- The **control thread** reports the other settled outcomes in batches
  (`ack_many`/`fail_many`): those settled while the lease thread is in a request or
  backing off, and any the broker refused (item by item then). Whatever piled up while
  the previous request was in flight goes in the next one. It also sends each
  running job's heartbeat (`extend`) at a third of its lease, and enforces `time_limit`.
- **Pool threads** run the tasks and hand outcomes to `_on_done`.

An execution is settled exactly once (`Execution.done`, under the lock): by its outcome,
by its time limit, by a cancel or lost lease seen at a heartbeat, or by shutdown. A late
outcome of a stopped execution is dropped, so a delivery is never reported twice.

Prefetch (opt-in, `prefetch=N`): for many short tasks, one request per job is the
bottleneck, so the worker may hold up to N jobs beyond its slots, in the pool's queue.
It holds only as many as its slots are expected to start within PREFETCH_HOLD, judged by
how long recent runs took and how long the running ones have run so far
(`prefetch_allowance`), and refills only once half of that allowance is free, so a
lease brings a batch. A held job that has waited PREFETCH_HOLD anyway (a long task
turned up) goes back to the broker with every other held job, its attempt not counted:
a long task never keeps jobs from other workers for longer than that.

Shutdown (first SIGTERM/SIGINT, `stop()`, or a drained `--burst`): stop leasing, release
jobs leased but not started, let running tasks finish within `grace` seconds, release
those still running after that (their run is abandoned; the attempt is not counted),
wait for the in-flight lease poll to return (and release what it brought), report every
outcome, exit 0. A second signal exits at once with status 1; jobs not reported yet
come back when their leases expire.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import msgspec
import structlog
from qclient import BrokerError, Client, JobNotFound, ProtocolError, StaleLease
from qclient.wire import (
    MAX_SECONDS,
    NAME_PATTERN,
    AckItem,
    BatchResult,
    FailItem,
    LeasedJob,
    ReleaseItem,
)

from qworker._execute import Execution, Outcome, describe, failure, moving_mean
from qworker._task import Task, TimeLimitExceeded, TooManyAttempts, backoff_delay
from qworker.periodic import sync_on_start
from qworker.pools import POOL_KINDS, Pool, ThreadPool, make_pool
from qworker.registry import NotRegistered, Registry, default_registry, import_modules

__all__ = [
    "DEFAULT_GRACE",
    "LEASE_WAIT",
    "PREFETCH_HOLD",
    "Worker",
    "default_concurrency",
    "prefetch_allowance",
]

LEASE_WAIT = 5.0  #: seconds one lease request long-polls when nothing is ready
DEFAULT_GRACE = 30.0  #: seconds running tasks get to finish after SIGTERM
HTTP_TIMEOUT = 10.0  #: seconds to connect, and for a reply beyond a long-poll's wait
HTTP_RETRIES = 2  #: the client's own quick resends before we see ProtocolError
RECONNECT_MIN = 0.1  #: seconds: first backoff after the broker could not be reached
RECONNECT_MAX = 5.0  #: seconds: the backoff's cap while the broker stays unreachable
REPORT_RETRY_MAX = 1.0  #: seconds: the cap for outcomes, which must beat lease expiry
HEARTBEAT_FRACTION = 1 / 3  #: extend a lease when this fraction of it has passed
REPORT_GIVE_UP = 10.0  #: seconds shutdown keeps trying to report outcomes
MAX_BATCH = 1000  #: items in one ack_many/fail_many request
MAX_LEASE = 1000  #: jobs in one lease request (the protocol's limit)
MAX_QUEUES = 100  #: queues in one lease request (the protocol's limit)
CARRY_WAIT = 0.02  #: seconds an outcome may wait for a lease in flight to carry it
SHORT_RUN = 0.005  #: seconds: runs this short get their outcome carried by the lease
INLINE_LIMIT = 0.02  #: seconds a run in the lease thread may last before another leases
IDLE_TICK = 1.0  #: seconds the control thread sleeps at most when nothing is due
POLL_TICK = 0.1  #: seconds between the main thread's looks at signals
START_POLL = 0.02  #: seconds between looks at whether a time-limited task has started
PREFETCH_HOLD = 1.0  #: seconds a prefetched job may wait here for a slot
STALLED_LOOK = 0.5  #: seconds between looks at a stalled pool (no child could start)

log = structlog.get_logger("qworker")


@dataclass(slots=True)
class _Report:
    """A settled outcome waiting to be sent to the broker."""

    job: LeasedJob
    item: AckItem | FailItem
    outcome: str  #: "succeeded" | "retry" | "failed"
    duration: float  #: seconds the task ran
    settled_at: float = field(default_factory=time.monotonic)


def _split(
    batch: Sequence[_Report],
) -> tuple[list[_Report], list[_Report], list[AckItem], list[FailItem]]:
    """The ack reports of `batch` and its fail reports, each in order (the broker
    answers the acks first), then their items."""
    ack_reports = [r for r in batch if isinstance(r.item, AckItem)]
    fail_reports = [r for r in batch if isinstance(r.item, FailItem)]
    acks = [r.item for r in ack_reports if isinstance(r.item, AckItem)]
    fails = [r.item for r in fail_reports if isinstance(r.item, FailItem)]
    return ack_reports, fail_reports, acks, fails


def _transient(exc: Exception) -> bool:
    """Whether an error means "the broker is not there right now" (retry later)."""
    if isinstance(exc, BrokerError):
        return exc.status >= 500 or exc.status in (408, 429)
    return True  # ProtocolError: refused, reset, timed out


def prefetch_allowance(
    prefetch: int,
    concurrency: int,
    mean_run: float | None,
    longest_running: float,
    hold: float = PREFETCH_HOLD,
) -> int:
    """How many jobs beyond its slots a worker may hold now.

    As many as `concurrency` slots are expected to start within `hold` seconds, at most
    `prefetch`, if a run takes `mean_run` seconds (the moving mean; None before the
    first run: hold none) or, when longer, as long as the longest run still going.
    """
    if prefetch <= 0 or mean_run is None:
        return 0
    run = max(mean_run, longest_running, 1e-6)
    return min(prefetch, int(concurrency * hold / run))


def default_concurrency() -> int:
    """The default slot count: the number of CPUs (Celery's default too)."""
    return os.cpu_count() or 1


def default_name() -> str:
    """`hostname:pid`, enough to find a worker's jobs in the broker's records."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Consume queues and run their jobs with the registered tasks.

    Not reusable: call `run()` once. `stop()` may be called from any thread.

    Args:
        queues: queues to lease from, in order; default: every registered task's queue.
        modules: modules to import for their `@task`s (the current directory is put on
            `sys.path` first).
        url: the broker; default: env QBROKER_URL, else http://127.0.0.1:7733.
        concurrency: slots, i.e. jobs run at once; default: the number of CPUs.
        pool: "threads" or "processes".
        max_tasks_per_child: replace a process-pool child after this many tasks.
        grace: seconds running tasks get to finish at shutdown.
        name: this worker's name in the broker's records; default `hostname:pid`.
        lease_wait: seconds one lease request long-polls; also the longest a shutdown
            waits for the poll in flight.
        prefetch: jobs it may hold beyond its slots while runs are short (default 0:
            lease only for free slots). See the module docstring.
        client: a `qclient.Client` to use instead of making one (closed at the end).

    Raises:
        ValueError: an unknown pool, a concurrency below 1 or a negative prefetch.
    """

    def __init__(
        self,
        queues: Sequence[str] | None = None,
        *,
        modules: Sequence[str] = (),
        url: str | None = None,
        concurrency: int | None = None,
        pool: str = "threads",
        max_tasks_per_child: int | None = None,
        grace: float = DEFAULT_GRACE,
        name: str | None = None,
        lease_wait: float = LEASE_WAIT,
        prefetch: int = 0,
        client: Client | None = None,
    ) -> None:
        if pool not in POOL_KINDS:
            raise ValueError(f"unknown pool {pool!r}; choose one of {POOL_KINDS}")
        if prefetch < 0:
            raise ValueError("prefetch must be 0 or more")
        self.prefetch = prefetch
        self.concurrency = concurrency if concurrency else default_concurrency()
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.queues = list(queues or ())
        self.modules = list(modules)
        self.pool_kind = pool
        self.max_tasks_per_child = max_tasks_per_child
        self.grace = grace
        self.name = name or default_name()
        self.lease_wait = lease_wait
        self.registry: Registry = default_registry
        if client is None:
            client = Client(url, timeout=HTTP_TIMEOUT, retries=HTTP_RETRIES)
        self.client = client
        self._log = log.bind(worker=self.name)
        self._cond = threading.Condition()
        # --- under _cond
        self._running: dict[str, Execution] = {}
        self._results: list[_Report] = []
        self._reporting = False  #: the control thread is sending a batch
        self._lease_parked = False  #: waits for a slot, to carry the reports along
        self._lease_in_flight = False  #: a lease request is out
        self._backlog = False  #: more were ready than the last lease got
        self._stopping = False  #: no more leases
        self._stop_reporting = False  #: the control thread ends once results are out
        self._broker_ok = True
        self._reconnects = 0  #: times the broker was seen back after being unreachable
        self._mean_run: float | None = None  #: moving mean of runs, start to outcome
        self._due = 0.0  #: no heartbeat, time limit or hold ends before this
        self._inline: Execution | None = None  #: run by the lease thread itself
        self._lease_gen = 0  #: the lease thread's number; a replaced one ends
        self._lease_thread: threading.Thread | None = None
        # ---
        self._stop_requested = threading.Event()
        self._signals: list[int] = []  #: appended by the signal handler only
        self._exit_code = 0
        self._burst = False
        self._pool: Pool | None = None

    # ------------------------------------------------------------ public

    def run(self, *, burst: bool = False, handle_signals: bool | None = None) -> int:
        """Consume until stopped (a signal or `stop()`), or with `burst` until drained.

        Args:
            burst: lease without waiting, and return once no job is ready and none
                runs (jobs waiting for a delay or a retry backoff are not waited for).
            handle_signals: install SIGTERM/SIGINT handlers; default: when called from
                the main thread.

        Returns:
            The exit status: 0 after a clean stop, 1 if an internal error stopped it.

        Raises:
            ValueError: no queue to consume (none given, no task registered).
            Exception: whatever a task module raised on import.
        """
        if self.modules:
            import_modules(self.modules, registry=self.registry)
        if not self.queues:
            self.queues = self.registry.queues()
        sync_on_start(self.client.url, self.registry, self._log)
        if not self.queues:
            raise ValueError("no queue to consume: pass queues or register tasks")
        if len(self.queues) > MAX_QUEUES:
            raise ValueError(f"at most {MAX_QUEUES} queues per worker")
        for queue in self.queues:
            if not re.match(NAME_PATTERN, queue):
                raise ValueError(f"{queue!r} is not a valid queue name")
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        self._burst = burst
        previous = self._install_signals() if handle_signals else {}
        try:
            return self._run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop(self) -> None:
        """Begin a graceful shutdown, as SIGTERM does. Thread-safe; returns at once."""
        self._stop_requested.set()

    # ------------------------------------------------------------ lifecycle

    def _run(self) -> int:
        self._pool = make_pool(
            self.pool_kind,
            self.concurrency,
            self._on_done,
            modules=self.modules,
            max_tasks_per_child=self.max_tasks_per_child,
        )
        self._pool.start()
        self._log.info(
            "worker.started",
            queues=self.queues,
            tasks=self.registry.names(),
            concurrency=self.concurrency,
            pool=self.pool_kind,
            burst=self._burst,
            url=self.client.url,
        )
        self._lease_thread = self._spawn(self._lease_loop, "qworker-lease")
        control_thread = self._spawn(self._control_loop, "qworker-control")
        while not self._signals and not self._stop_requested.wait(POLL_TICK):
            pass
        self._shutdown(control_thread)
        self._log.info("worker.stopped", exit_code=self._exit_code)
        return self._exit_code

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except BaseException:  # a bug: stop loudly rather than consume no more
                self._log.exception("worker.crashed", thread=name)
                self._exit_code = 1
                self._stop_requested.set()
                with self._cond:
                    self._stopping = self._stop_reporting = True
                    self._cond.notify_all()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def _shutdown(self, control: threading.Thread) -> None:
        pool = self._pool
        assert pool is not None
        why = signal.Signals(self._signals[0]).name if self._signals else "stop"
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            running = len(self._running)
        self._log.info("worker.stopping", reason=why, running=running, grace=self.grace)
        # Jobs leased but not started go back at once, their attempt not counted.
        self._release(self._unsettle(pool.drain()), "not_started")
        deadline = time.monotonic() + self.grace
        with self._cond:
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(min(left, POLL_TICK * 2))
            leftover = list(self._running.values())
            lease = self._lease_thread
            # a task the lease thread runs itself past the grace: not waited for
            stuck = self._inline is not None and self._inline in leftover
        if leftover:
            self._log.warning("worker.grace_expired", running=len(leftover))
            stopped = self._unsettle(leftover)
            now = time.monotonic()
            for ex in stopped:
                pool.stop_execution(ex)
                ran = now - ex.started_at if ex.started_at is not None else 0.0
                self._log_finished(ex.job, "abandoned", ran, reason="grace_expired")
            self._release(stopped, "grace_expired")
        if lease is not None and not stuck:
            lease.join(self.lease_wait + HTTP_TIMEOUT + 1)
        with self._cond:
            self._stop_reporting = True
            self._cond.notify_all()
        control.join(REPORT_GIVE_UP + HTTP_TIMEOUT + 1)
        pool.close(timeout=2.0)
        self.client.close()

    def _unsettle(self, executions: Sequence[Execution]) -> list[Execution]:
        """Settle executions with no outcome to report. Returns the ones not settled."""
        taken = []
        with self._cond:
            for ex in executions:
                if not ex.done:
                    ex.done = True
                    self._running.pop(ex.job.id, None)
                    taken.append(ex)
            self._cond.notify_all()
        return taken

    def _release(self, executions: Sequence[Execution], why: str) -> None:
        self._release_jobs([ex.job for ex in executions], why)

    def _release_jobs(self, jobs: Sequence[LeasedJob], why: str) -> None:
        """Hand jobs back unstarted, MAX_BATCH per request. One that cannot be comes
        back when its lease expires, with the attempt counted."""
        for start in range(0, len(jobs), MAX_BATCH):
            chunk = jobs[start : start + MAX_BATCH]
            items = [ReleaseItem(id=job.id, lease=job.lease) for job in chunk]
            try:
                results = self.client.release_many(items)
            except (BrokerError, ProtocolError) as exc:
                results = [
                    BatchResult(id=job.id, ok=False, error=describe(exc))
                    for job in chunk
                ]
            for job, result in zip(chunk, results, strict=False):
                if result.ok:
                    fields = {"task": job.task, "job_id": job.id, "queue": job.queue}
                    self._log.info("job.released", reason=why, **fields)
                else:
                    error = result.error or "unknown"
                    self._log.warning("job.release_failed", job_id=job.id, error=error)

    # ------------------------------------------------------------ signals

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes, maybe while it holds a lock:
        # take none here (a non-reentrant one would deadlock). The main thread polls.
        self._signals.append(signum)
        if len(self._signals) > 1:
            if self._pool is not None:
                self._pool.kill_children()
            os._exit(1)

    # ------------------------------------------------------------ broker health

    def _broker_down(self, exc: BaseException) -> None:
        with self._cond:
            was_ok, self._broker_ok = self._broker_ok, False
        if was_ok:
            url = self.client.url
            self._log.warning("broker.unreachable", url=url, error=describe(exc))

    def _broker_up(self) -> None:
        with self._cond:
            was_ok, self._broker_ok = self._broker_ok, True
            if not was_ok:
                # Outcomes waiting out a backoff go now: their leases are running out.
                self._reconnects += 1
                self._cond.notify_all()
        if not was_ok:
            self._log.info("broker.reconnected", url=self.client.url)

    # ------------------------------------------------------------ lease thread

    def _lease_loop(self, gen: int = 0) -> None:
        failures = 0
        carry = True  #: take settled outcomes along with the next lease
        dispatched = False  #: the last lease brought jobs and the queue had no more
        while True:
            with self._cond:
                # "In flight" lasts until here, dispatch included: the outcomes
                # settled meanwhile are taken below when a slot is free.
                self._lease_in_flight = False
                self._lease_parked = carry
                while not self._stopping and not (free := self._room(time.monotonic())):
                    self._cond.wait(STALLED_LOOK if self._stalled() else None)
                # Runs are short: a moment's wait saves a request.
                mean = self._mean_run
                if carry and mean is not None and mean < SHORT_RUN:
                    moment = min(CARRY_WAIT, 2 * mean + 0.001)
                    if dispatched:
                        free = self._await_outcomes(free, moment)
                    elif (
                        self._backlog and not self.prefetch and free < self.concurrency
                    ):
                        free = self._gather_slots(free, moment)
                dispatched = False
                self._lease_parked = False
                if self._stopping:
                    self._cond.notify_all()  # the control thread reports what is left
                    return
                # Long-poll only for a free slot: a job for the prefetch allowance
                # alone must be ready now, or it could arrive after a long run began.
                waits = not self._burst and len(self._running) < self.concurrency
                idle = not (self._running or self._results or self._reporting)
                batch: list[_Report] = []
                if carry and self._broker_ok and self._results:
                    batch = self._results[:MAX_BATCH]
                    del self._results[:MAX_BATCH]
                    if self._results:
                        self._cond.notify_all()  # the rest is the control thread's
                self._lease_in_flight = True
            carry = True
            asked = min(free, MAX_LEASE)
            ack_reports, fail_reports, acks, fails = _split(batch)
            try:
                reply = self.client.settle_and_lease(
                    self.queues,
                    acks,
                    fails,
                    max=asked,
                    wait=self.lease_wait if waits else 0.0,
                    worker=self.name,
                )
            except (ProtocolError, BrokerError) as exc:
                with self._cond:
                    self._lease_in_flight = self._backlog = False
                    self._results[:0] = batch  # to the front, for the control thread
                    self._cond.notify_all()
                if batch and not _transient(exc):
                    carry = False  # refused with them: lease again without them
                    continue
                failures += 1
                if _transient(exc):
                    self._broker_down(exc)
                    pause = backoff_delay(
                        failures, base=RECONNECT_MIN, cap=RECONNECT_MAX, jitter=True
                    )
                else:  # 401/403/422...: say so every time; someone must fix something
                    self._log.error("worker.lease_refused", error=describe(exc))
                    pause = RECONNECT_MAX
                self._sleep_unless_stopping(max(pause, RECONNECT_MIN / 2))
                continue
            failures = 0
            jobs = reply.jobs
            with self._cond:
                self._backlog = reply.more
            self._broker_up()
            if batch:
                self._log_reports(ack_reports + fail_reports, reply.results)
            dispatched = bool(jobs) and not self._backlog
            inline = self._dispatch(jobs, inline_ok=dispatched)
            if inline is not None:
                assert isinstance(self._pool, ThreadPool)
                self._pool.run_here(inline)
                with self._cond:
                    if self._inline is inline:
                        self._inline = None
                    if gen != self._lease_gen:
                        return  # it ran too long: another thread leases now
            if self._burst and not jobs:
                if idle:  # nothing ready, nothing ran or waited to be reported
                    self._log.info("worker.drained")
                    self._stop_requested.set()
                    return
                with self._cond:  # wait for a task to end, then look again
                    self._cond.wait(0.5)

    def _room(self, now: float) -> int:
        """How many jobs the next lease asks for; 0: not yet (lock held).

        The free slots plus the prefetch allowance. With every slot busy, only once
        half of that allowance is free (so a prefetching worker leases batches), and
        only while the broker said more were ready than the last lease got (such a
        lease does not wait, see `_lease_loop`).
        """
        allowance = 0
        if self.prefetch and (self._backlog or len(self._running) < self.concurrency):
            # Slots take jobs in lease order, so the runs going on are among the
            # first `concurrency` entries: no need to look at the held ones.
            first = itertools.islice(self._running.values(), self.concurrency)
            started = [ex.started_at for ex in first if ex.started_at is not None]
            longest = now - min(started, default=now)
            allowance = prefetch_allowance(
                self.prefetch, self.concurrency, self._mean_run, longest
            )
        free = self.concurrency + allowance - len(self._running)
        if self._stalled():
            return 0  # no child can start a job: lease none to hold here
        return free if free >= max(1, allowance // 2) else 0

    def _stalled(self) -> bool:
        return self._pool is not None and self._pool.stalled()

    def _await_outcomes(self, free: int, moment: float) -> int:
        """The jobs just dispatched drained the queue: wait up to `moment` for an
        outcome, so it rides on the next lease instead of an ack of its own (lock
        held). Returns the free slots."""
        until = time.monotonic() + moment
        while (
            not self._stopping
            and self._running
            and not self._results
            and (left := until - time.monotonic()) > 0
        ):
            self._cond.wait(left)
        return self._room(time.monotonic()) or free

    def _gather_slots(self, free: int, moment: float) -> int:
        """More jobs are ready: wait up to `moment` for the slots whose runs began
        less than that ago, so that one lease refills them all instead of one
        request per slot (lock held). Returns the free slots."""
        until = time.monotonic() + moment
        while not self._stopping:
            now = time.monotonic()
            free = self._room(now) or free
            left = until - now
            if free >= self.concurrency or left <= 0:
                break
            if not any(
                ex.started_at is None or now - ex.started_at < moment
                for ex in self._running.values()
            ):
                break  # what still runs is not about to end: lease for what is free
            self._cond.wait(left)
        return free

    def _lease_carries_reports(self, now: float) -> bool:
        """Whether the lease thread will take the settled outcomes along with its next
        lease soon, so the control thread leaves them to it (lock held): it waits for
        room and there is some (or, while prefetching, soon will be), or its request in
        flight is likely to come back at once (the broker said more were ready than
        the last one got); for at most CARRY_WAIT."""
        if self._stopping or not self._broker_ok:
            return False
        fresh = now - self._results[0].settled_at < CARRY_WAIT
        if self._lease_parked:
            return bool(self._room(now)) or fresh
        return self._lease_in_flight and self._backlog and fresh

    def _sleep_unless_stopping(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopping and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    def _runnable(self, job: LeasedJob) -> Task[..., Any]:
        """The task to run `job` with.

        Raises:
            NotRegistered: no such task here.
            TooManyAttempts: an earlier delivery's lease ran out, and the job's own
                bound (the broker's) is looser than the task's `max_retries`.
        """
        t = self.registry.get(job.task)
        if t.max_retries is not None and job.attempt > t.max_retries + 1:
            raise TooManyAttempts(
                f"attempt {job.attempt}, but the task allows"
                f" {t.max_retries + 1} (max_retries={t.max_retries})"
            )
        return t

    def _dispatch(
        self, jobs: list[LeasedJob], inline_ok: bool = False
    ) -> Execution | None:
        """Hand leased jobs to the pool.

        With `inline_ok` (the lease drained the queue, so the lease thread would only
        wait for their outcomes next), a threads pool and short runs, the last job is
        not handed over but returned, for the lease thread to run itself: the two
        thread hand-offs of a round trip (to a slot and back) are most of what a quick
        task costs a worker. Not for tasks with a `time_limit` or `async def` ones. If
        the run lasts INLINE_LIMIT, the control thread starts another lease thread
        (`_take_over_lease`).
        """
        if not jobs:
            return None
        now = time.monotonic()
        to_run: list[Execution] = []
        inline: Execution | None = None
        with self._cond:
            stopping = self._stopping
            if not stopping:
                for job in jobs:
                    try:
                        t = self._runnable(job)
                    except (NotRegistered, TooManyAttempts) as exc:
                        outcome = failure(exc, retry=False, with_traceback=False)
                        self._results.append(self._report(job, outcome, None))
                        continue
                    ex = Execution(job, t, now)
                    self._running[job.id] = ex
                    to_run.append(ex)
                mean = self._mean_run
                last = to_run[-1] if to_run else None
                if (
                    inline_ok
                    and last is not None
                    and mean is not None
                    and mean < SHORT_RUN
                    and isinstance(self._pool, ThreadPool)
                    and last.task.time_limit is None
                    and not last.task.is_async
                ):
                    inline = self._inline = to_run.pop()
                    # its outcome, and those settled meanwhile, ride on the next lease
                    self._lease_in_flight, self._lease_parked = False, True
                for ex in itertools.chain(to_run, (inline,) if inline else ()):
                    self._due = min(self._due, self._due_of(ex, now))
                self._cond.notify_all()
        if stopping:
            self._release_jobs(jobs, "not_started")
            return None
        assert self._pool is not None
        for ex in to_run:
            self._pool.submit(ex)
        return inline

    # ------------------------------------------------------------ settling

    def _on_done(self, ex: Execution, outcome: Outcome) -> None:
        """A pool reports a run. Called from pool threads."""
        with self._cond:
            if ex.done:
                return  # stopped before (time limit, cancel, shutdown): settled already
            ex.done = True
            self._running.pop(ex.job.id, None)
            first = not self._results
            self._results.append(self._report(ex.job, outcome, ex))
            now = time.monotonic()
            if ex.started_at is not None:
                self._mean_run = moving_mean(self._mean_run, now - ex.started_at)
            # Wake the other threads only when this changes what they wait for: the
            # first outcome to report, room for the lease thread, no run left. (A
            # prefetching worker would otherwise wake both for every job.)
            if (
                first
                or not self._running
                or self._burst
                or self._stopping
                or (not self._lease_in_flight and self._room(now))
            ):
                self._cond.notify_all()

    @staticmethod
    def _report(job: LeasedJob, outcome: Outcome, ex: Execution | None) -> _Report:
        """Turn an outcome into the ack or fail to send, applying the retry policy."""
        if outcome.ok:
            try:  # one result the wire cannot carry must not sink a whole batch
                msgspec.msgpack.encode(outcome.result)
            except (TypeError, ValueError, OverflowError) as exc:
                error = f"UnserializableResult: {describe(exc)}"
                outcome = Outcome(ok=False, error=error, duration=outcome.duration)
            else:
                ack = AckItem(id=job.id, lease=job.lease, result=outcome.result)
                return _Report(job, ack, "succeeded", outcome.duration)
        retry_in: float | None = None
        limit = job.max_retries
        if ex is not None and ex.task.max_retries is not None:
            limit = min(limit, ex.task.max_retries)  # the task's bound, however sent
        if outcome.retry and ex is not None and job.attempt <= limit:
            retry_in = outcome.retry_delay
            if retry_in is None:
                retry_in = ex.task.backoff(job.attempt)
            retry_in = min(retry_in, MAX_SECONDS)  # what the wire takes
        fail = FailItem(
            id=job.id,
            lease=job.lease,
            error=outcome.error,
            traceback=outcome.traceback,
            retry_in=retry_in,
        )
        verdict = "failed" if retry_in is None else "retry"
        return _Report(job, fail, verdict, outcome.duration)

    def _abandon(self, ex: Execution, outcome: str, reason: str) -> None:
        """Stop an execution whose outcome must not be reported (cancelled, lost)."""
        if not self._unsettle([ex]):
            return
        assert self._pool is not None
        self._pool.stop_execution(ex)
        started = ex.started_at
        duration = time.monotonic() - started if started is not None else 0.0
        self._log_finished(ex.job, outcome, duration, reason=reason)

    # ------------------------------------------------------------ control thread

    def _control_loop(self) -> None:
        report_after = 0.0  #: monotonic time before which a failed report waits
        give_up_at: float | None = None
        failures = 0
        seen_reconnects = 0
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._reconnects != seen_reconnects:
                        seen_reconnects = self._reconnects
                        report_after, failures = 0.0, 0
                    if self._stop_reporting:
                        if give_up_at is None:
                            give_up_at = now + REPORT_GIVE_UP
                        if not self._results or now >= give_up_at:
                            if self._results:
                                lost = len(self._results)
                                self._log.error("worker.reports_lost", jobs=lost)
                            return
                    upkeep = now >= self._due
                    due = self._due
                    mine = bool(self._results) and not self._lease_carries_reports(now)
                    if mine:
                        due = min(due, report_after)
                    elif self._results:  # look again when the lease's turn is over
                        due = min(due, self._results[0].settled_at + CARRY_WAIT)
                    if due <= now:
                        break
                    self._cond.wait(min(due - now, IDLE_TICK))
                batch: list[_Report] = []
                if mine and now >= report_after:
                    batch = self._results[:MAX_BATCH]
                    del self._results[:MAX_BATCH]
                    self._reporting = True
            if batch:
                unsent = self._send_reports(batch)
                with self._cond:
                    self._reporting = False
                    self._results[:0] = unsent  # keep their order; retry after a pause
                    self._cond.notify_all()
                if unsent:
                    failures += 1
                    report_after = time.monotonic() + backoff_delay(
                        failures, base=RECONNECT_MIN, cap=REPORT_RETRY_MAX, jitter=True
                    )
                else:
                    failures = 0
            if upkeep:
                self._take_over_lease()
                self._heartbeat()
                self._enforce_time_limits()
                self._return_held()
                with self._cond:
                    self._due = self._next_due(time.monotonic())

    def _next_due(self, now: float) -> float:
        """When the next heartbeat, time limit or hold ends among the executions, or
        in IDLE_TICK at the latest (lock held). Computed after each upkeep and kept as
        `_due`: executions that end only make it early, new ones lower it."""
        due = now + IDLE_TICK
        for ex in self._running.values():
            due = min(due, self._due_of(ex, now))
        return due

    def _due_of(self, ex: Execution, now: float) -> float:
        """When `ex` next needs the control thread."""
        due = ex.next_extend
        start = ex.started_at
        if self.prefetch and start is None:
            due = min(due, ex.leased_at + PREFETCH_HOLD)
        if ex is self._inline:
            due = min(due, ex.leased_at + INLINE_LIMIT)
        limit = ex.task.time_limit
        if limit is not None:
            # Not started yet: the pool sets started_at in a moment; look again soon
            # rather than sleep past the limit.
            due = min(due, now + START_POLL if start is None else start + limit)
        return due

    def _send_reports(self, batch: list[_Report]) -> list[_Report]:
        """Report a batch. Returns the reports the broker could not be reached for."""
        ack_reports, fail_reports, acks, fails = _split(batch)
        pending = ack_reports + fail_reports
        try:
            if acks:
                self._log_reports(ack_reports, self.client.ack_many(acks))
                pending = fail_reports
            if fails:
                self._log_reports(fail_reports, self.client.fail_many(fails))
                pending = []
        except (ProtocolError, BrokerError) as exc:
            if _transient(exc):
                self._broker_down(exc)
                return pending
            # The batch as a whole was refused (say 413, too large): one by one.
            return [r for r in pending if not self._send_one(r)]
        self._broker_up()
        return []

    def _send_one(self, report: _Report) -> bool:
        """Report one job alone; if the broker refuses its result, fail the job.

        Returns:
            False if the broker could not be reached (keep the report for later).
        """
        job, item = report.job, report.item
        error: str | None = None
        try:
            if isinstance(item, AckItem):
                try:
                    self.client.ack(item.id, item.lease, item.result)
                except BrokerError as exc:
                    if isinstance(exc, StaleLease | JobNotFound) or _transient(exc):
                        raise
                    report.outcome = "failed"
                    report.item = item = FailItem(
                        id=job.id,
                        lease=job.lease,
                        error=f"InvalidResult: the broker refused the result: {exc}",
                    )
                    self.client.fail(item.id, item.lease, item.error)
            else:
                try:
                    self.client.fail(
                        item.id, item.lease, item.error, item.traceback, item.retry_in
                    )
                except BrokerError as exc:
                    if isinstance(exc, StaleLease | JobNotFound) or _transient(exc):
                        raise
                    short = item.error[:1000]  # and without the traceback this time
                    self.client.fail(item.id, item.lease, short, None, item.retry_in)
        except (BrokerError, ProtocolError) as exc:
            if _transient(exc):
                self._broker_down(exc)
                return False
            error = exc.reason if isinstance(exc, BrokerError) else "refused"
        result = BatchResult(id=job.id, ok=error is None, error=error)
        self._log_reports([report], [result])
        return True

    def _log_reports(
        self, reports: Sequence[_Report], results: Sequence[BatchResult]
    ) -> None:
        for report, result in zip(reports, results, strict=False):
            extra: dict[str, Any] = {}
            item = report.item
            if isinstance(item, FailItem):
                extra["error"] = item.error.partition(":")[0]  # the type, not the text
                if item.retry_in is not None:
                    extra["retry_in"] = round(item.retry_in, 3)
            if result.ok:
                self._log_finished(report.job, report.outcome, report.duration, **extra)
            else:
                # stale_lease / job_not_found: the lease expired or the job was
                # cancelled, and another delivery owns it now. Drop this report.
                reason = result.error or "unknown"
                self._log_finished(
                    report.job, "lost", report.duration, reason=reason, **extra
                )

    def _log_finished(
        self, job: LeasedJob, outcome: str, duration: float, **extra: Any
    ) -> None:
        """The one `job.finished` line of each delivery. Never the job's arguments."""
        level = (
            self._log.info
            if outcome in ("succeeded", "retry", "failed")
            else (self._log.warning)
        )
        level(
            "job.finished",
            task=job.task,
            job_id=job.id,
            queue=job.queue,
            attempt=job.attempt,
            duration=round(duration, 6),
            outcome=outcome,
            **extra,
        )

    def _take_over_lease(self) -> None:
        """The lease thread has run a task itself (see `_dispatch`) for INLINE_LIMIT:
        start another lease thread, so the free slots get jobs meanwhile. The old one
        ends once the task does (its outcome is reported as any other)."""
        with self._cond:
            ex = self._inline
            if ex is None or self._stopping:
                return
            if time.monotonic() < ex.leased_at + INLINE_LIMIT:
                return
            self._inline = None
            self._lease_gen += 1
            gen = self._lease_gen
            # started under the lock, so a shutdown never joins the old one instead
            self._lease_thread = self._spawn(
                lambda: self._lease_loop(gen), f"qworker-lease-{gen}"
            )
        self._log.info(
            "worker.lease_thread_replaced", task=ex.task.name, job_id=ex.job.id
        )

    def _heartbeat(self) -> None:
        now = time.monotonic()
        with self._cond:
            due = [ex for ex in self._running.values() if ex.next_extend <= now]
        for ex in due:
            job = ex.job
            try:
                reply = self.client.extend(job.id, job.lease)
            except (StaleLease, JobNotFound) as exc:
                self._abandon(ex, "lost", exc.reason)
                continue
            except (ProtocolError, BrokerError) as exc:
                self._broker_down(exc)
                # Try again soon: the lease is still good for about two thirds of it.
                ex.next_extend = time.monotonic() + min(RECONNECT_MAX, job.timeout / 6)
                continue
            self._broker_up()
            if reply.cancelled:
                self._abandon(ex, "cancelled", "cancelled")
            else:
                ex.next_extend = time.monotonic() + job.timeout * HEARTBEAT_FRACTION

    def _return_held(self) -> None:
        """Give back every job waiting here for a slot (their attempts not counted)
        when the pool is stalled (its children fail to start, so nothing would run
        them), or once a job held for prefetch has waited PREFETCH_HOLD for a slot
        (the slots are busy with longer runs than the allowance assumed, and other
        workers may be free)."""
        assert self._pool is not None
        if self._pool.stalled():
            say, event, why = self._log.warning, "worker.pool_stalled", "pool_stalled"
        elif self._prefetch_overdue():
            say, event, why = (
                self._log.info,
                "worker.prefetch_returned",
                "held_too_long",
            )
        else:
            return
        held = self._unsettle(self._pool.drain())
        if held:
            say(event, jobs=len(held))
            self._release(held, why)

    def _prefetch_overdue(self) -> bool:
        """Whether a job held for prefetch has waited PREFETCH_HOLD for a slot."""
        if not self.prefetch:
            return False
        now = time.monotonic()
        with self._cond:
            return any(
                ex.started_at is None and now - ex.leased_at >= PREFETCH_HOLD
                for ex in self._running.values()
            )

    def _enforce_time_limits(self) -> None:
        now = time.monotonic()
        over: list[Execution] = []
        with self._cond:
            for ex in list(self._running.values()):
                limit, started = ex.task.time_limit, ex.started_at
                if limit is None or started is None or now < started + limit:
                    continue
                exc = TimeLimitExceeded(
                    f"{ex.task.name} ran longer than its time_limit of {limit:g} s"
                )
                outcome = failure(
                    exc,
                    retry=ex.task.should_retry(exc),
                    duration=now - started,
                    with_traceback=False,
                )
                ex.done = True
                del self._running[ex.job.id]
                self._results.append(self._report(ex.job, outcome, ex))
                over.append(ex)
            self._cond.notify_all()
        assert self._pool is not None
        for ex in over:
            self._pool.stop_execution(ex)
            self._log.warning(
                "job.time_limit",
                task=ex.task.name,
                job_id=ex.job.id,
                time_limit=ex.task.time_limit,
            )
