"""The worker: lease jobs for free slots, run them in a pool, heartbeat, ack or fail.

Theory of operation. The state the worker's threads share, and every decision made
from it, is the slot book (`_book.py`, sans-IO, tested without threads); `_core.py`
holds it under one lock with the client, the pool and the log. Four threads are shells
around it:

- the **lease thread** (`_lease.py`) leases as many jobs as the book has room for, in
  one long-poll that carries the outcomes settled meanwhile;
- the **reporter** (`_reporter.py`) sends the outcomes the lease thread will not carry
  soon, in batches;
- the **upkeep thread** (`_upkeep.py`) extends leases (heartbeats), enforces time
  limits, gives back jobs held too long;
- the **pool's slot threads** (`pools/`) run the tasks and hand outcomes to the book.

This module starts and stops them. Shutdown (first SIGTERM/SIGINT, `stop()`, or a
drained `--burst`): stop leasing, release jobs leased but not started, let running tasks
finish within `grace` seconds, release those still running after that (their run is
abandoned; the attempt is not counted), wait for the in-flight lease poll to return (and
release what it brought), report every outcome, exit 0. A second signal exits at once
with status 1; jobs not reported yet come back when their leases expire. A broker that
refuses the worker's token (401/403), a broker certificate that fails verification, or
a broker a `--burst` worker cannot reach within the client's timeout, stops it with
status 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import structlog
from qclient import Client
from qclient.wire import NAME_PATTERN

from qworker._beat import BEAT_INTERVAL, Beater
from qworker._book import PREFETCH_HOLD, SlotBook, prefetch_allowance
from qworker._control import control_loop
from qworker._core import Core
from qworker._django import worker_client
from qworker._execute import Execution
from qworker._lease import LeaseLoop
from qworker._limits import sync_limits
from qworker._reporter import REPORT_GIVE_UP, report_loop
from qworker._upkeep import upkeep_loop
from qworker.periodic import sync_on_start
from qworker.pools import POOL_KINDS, make_pool
from qworker.registry import Registry, default_registry, import_modules

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
MAX_QUEUES = 100  #: queues in one lease request (the protocol's limit)
POLL_TICK = 0.1  #: seconds between the main thread's looks at signals

log = structlog.get_logger("qworker")


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
        token: the broker's bearer token; default: env QBROKER_TOKEN.
        ca: for an https URL, the PEM file of the CA that signed the broker's
            certificate; default: env QBROKER_CA, else the system's CAs.
        concurrency: slots, i.e. jobs run at once; default: the number of CPUs.
        pool: "threads" or "processes".
        max_tasks_per_child: replace a process-pool child after this many tasks.
        grace: seconds running tasks get to finish at shutdown.
        name: this worker's name in the broker's records; default `hostname:pid`.
        lease_wait: seconds one lease request long-polls; also the longest a shutdown
            waits for the poll in flight.
        prefetch: jobs it may hold beyond its slots while runs are short (default 0:
            lease only for free slots). See `_book.py`.
        beat_interval: seconds between the beats that keep the worker in the broker's
            workers registry (`GET /v1/workers`).
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
        token: str | None = None,
        ca: str | None = None,
        concurrency: int | None = None,
        pool: str = "threads",
        max_tasks_per_child: int | None = None,
        grace: float = DEFAULT_GRACE,
        name: str | None = None,
        lease_wait: float = LEASE_WAIT,
        prefetch: int = 0,
        client: Client | None = None,
        beat_interval: float = BEAT_INTERVAL,
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
        self.beat_interval = beat_interval
        self.registry: Registry = default_registry
        if client is None:
            client = worker_client(
                url, token, ca, timeout=HTTP_TIMEOUT, retries=HTTP_RETRIES
            )
        self.client = client
        self._token, self._ca = token, ca  #: for the schedules' sync (periodic.py)
        self._log = log.bind(worker=self.name)
        self._core: Core | None = None
        self._lease_thread: threading.Thread | None = None  #: under the core's lock
        self._stop_requested = threading.Event()
        self._signals: list[int] = []  #: appended by the signal handler only
        self._burst = False

    # ------------------------------------------------------------ public

    def run(self, *, burst: bool = False, handle_signals: bool | None = None) -> int:
        """Consume until stopped (a signal or `stop()`), or with `burst` until drained.

        Args:
            burst: lease without waiting, and return once no job is ready and none
                runs (jobs waiting for a delay or a retry backoff are not waited for).
            handle_signals: install SIGTERM/SIGINT handlers; default: when called from
                the main thread.

        Returns:
            The exit status: 0 after a clean stop; 1 if an internal error stopped it,
            the broker refused the token (401/403) or its certificate failed
            verification, or with `burst` the broker stayed
            unreachable for the client's timeout.

        Raises:
            ValueError: no queue to consume (none given, no task registered).
            PoolStartError: no process-pool child could start.
            Exception: whatever a task module raised on import.
        """
        if self.modules:
            import_modules(self.modules, registry=self.registry)
        if not self.queues:
            self.queues = self.registry.queues()
        sync_on_start(self.client.url, self._token, self._ca, self.registry, self._log)
        sync_limits(self.client, self.registry, self._log)
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
        book = SlotBook(
            self.concurrency,
            prefetch=self.prefetch,
            burst=self._burst,
            inline_pool=self.pool_kind == "threads",
        )
        core = self._core = Core(book, self.client, self._log, self._stop_requested)
        pool = core.pool = make_pool(
            self.pool_kind,
            self.concurrency,
            core.on_done,
            modules=self.modules,
            max_tasks_per_child=self.max_tasks_per_child,
        )
        book.stalled = pool.stalled
        pool.start()
        self._log.info(
            "worker.started",
            queues=self.queues,
            tasks=self.registry.names(),
            concurrency=self.concurrency,
            pool=self.pool_kind,
            burst=self._burst,
            url=self.client.url,
        )
        leasing = LeaseLoop(
            core,
            queues=self.queues,
            name=self.name,
            lease_wait=self.lease_wait,
            registry=self.registry,
        )

        def start_lease_thread(gen: int) -> None:
            # called with the core's lock held (or before any other thread runs)
            self._lease_thread = self._spawn(
                lambda: leasing.run(gen),
                f"qworker-lease-{gen}" if gen else "qworker-lease",
            )

        beater = Beater(
            core,
            name=self.name,
            queues=self.queues,
            pool=self.pool_kind,
            concurrency=self.concurrency,
            interval=self.beat_interval,
        )
        beater.start()
        start_lease_thread(0)
        reporter = self._spawn(lambda: report_loop(core), "qworker-reporter")
        upkeep = self._spawn(
            lambda: upkeep_loop(core, start_lease_thread), "qworker-upkeep"
        )
        # not joined at shutdown: its long-poll ends on its own, the thread after it
        self._spawn(lambda: control_loop(core, self.name), "qworker-control")
        while not self._signals and not self._stop_requested.wait(POLL_TICK):
            pass
        self._shutdown(reporter, upkeep, beater)
        self._log.info("worker.stopped", exit_code=core.exit_code)
        return core.exit_code

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        core = self._core
        assert core is not None

        def guarded() -> None:
            try:
                target()
            except BaseException:  # a bug: stop loudly rather than consume no more
                self._log.exception("worker.crashed", thread=name)
                core.fail_stop()
                with core.lock:
                    core.book.stopping = core.book.stop_reporting = True
                    core.wake_all()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def _shutdown(
        self, reporter: threading.Thread, upkeep: threading.Thread, beater: Beater
    ) -> None:
        core = self._core
        assert core is not None
        book, pool = core.book, core.the_pool
        why = signal.Signals(self._signals[0]).name if self._signals else "stop"
        with core.lock:
            book.stopping = True
            core.wake_all()
            running = len(book.running)
        self._log.info("worker.stopping", reason=why, running=running, grace=self.grace)
        # Jobs leased but not started go back at once, their attempt not counted.
        core.release(core.unsettle(pool.drain()), "not_started")
        deadline = time.monotonic() + self.grace
        with core.lock:
            while book.running and (left := deadline - time.monotonic()) > 0:
                core.cond.wait(min(left, POLL_TICK * 2))
            leftover: list[Execution] = list(book.running.values())
            lease = self._lease_thread
            # a task the lease thread runs itself past the grace: not waited for
            stuck = book.inline is not None and book.inline in leftover
        if leftover:
            self._log.warning("worker.grace_expired", running=len(leftover))
            stopped = core.unsettle(leftover)
            now = time.monotonic()
            for ex in stopped:
                pool.stop_execution(ex)
                ran = now - ex.started_at if ex.started_at is not None else 0.0
                core.log_finished(ex.job, "abandoned", ran, reason="grace_expired")
            core.release(stopped, "grace_expired")
        if lease is not None and not stuck:
            lease.join(self.lease_wait + HTTP_TIMEOUT + 1)
        with core.lock:
            book.stop_reporting = True
            core.wake_all()
        reporter.join(REPORT_GIVE_UP + HTTP_TIMEOUT + 1)
        upkeep.join(HTTP_TIMEOUT + 1)
        pool.close(timeout=2.0)
        beater.stop()
        self.client.close()

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
            core = self._core
            if core is not None and core.pool is not None:
                core.pool.kill_children()
            os._exit(1)
