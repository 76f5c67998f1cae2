"""Execution pools: where tasks actually run, in threads or in child processes.

Theory of operation. Both pools have the same shape: `size` slots, each a thread of this
process, all taking `Execution`s from one queue. The runner only leases as many jobs as
there are free slots (plus, with `prefetch`, a few held jobs), so the queue is short; a
job waits in it while a slot replaces its child process, or while it is held.

- `ThreadPool`: a slot thread runs the task itself. `async def` tasks run on one asyncio
  loop in a dedicated thread, and the slot thread waits for them. Python cannot kill a
  thread, so stopping a sync task (time limit, cancel) *abandons* it: the slot is retired
  (it exits when the task finally returns, and its outcome is ignored) and a fresh slot
  takes its place. An async task is cancelled for real.
- `ProcessPool`: a slot thread owns one child process (forkserver where the platform has
  it, else spawn; never plain fork, since this process runs threads) and talks to it over a
  pipe in msgpack. Stopping a task kills the child; the slot starts a new one. A child that
  dies mid-task (segfault, OOM kill) fails the job with `WorkerLost`. Children ignore
  SIGINT/SIGTERM: the parent decides when they stop. When jobs wait in the pool's queue
  (a prefetching worker) and their tasks are known to be quick, a slot sends its child a
  *run* of them in one message (see `_ProcessSlot.take_run`): a pipe round trip per run
  instead of per job, which is most of what a no-op task costs in this pool.

Pools report each run to `on_done(execution, outcome)` from a slot thread; the runner
decides whether an outcome still counts (a stopped execution's late outcome does not).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import queue
import selectors
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.context import BaseContext
from types import FrameType
from typing import Any, Protocol

import msgspec
import structlog

from qworker._execute import (
    Execution,
    Outcome,
    describe,
    execute,
    failure,
    moving_mean,
)
from qworker.registry import NotRegistered, default_registry, import_modules

__all__ = ["POOL_KINDS", "Pool", "ProcessPool", "ThreadPool", "WorkerLost", "make_pool"]

POOL_KINDS = ("threads", "processes")
CHILD_START_TIMEOUT = 60.0  #: seconds a child may take to import the task modules
CHILD_STOP_TIMEOUT = 2.0  #: seconds a child gets to exit when asked, before SIGKILL
RESPAWN_BACKOFF_MAX = 30.0  #: seconds between tries to start a child that keeps failing
PARENT_CHECK = 1.0  #: seconds between a busy child's looks at whether its parent lives
RUN_SPAN = 0.002  #: seconds of expected run time one message to a child may carry
RUN_MAX = 64  #: jobs one message to a child may carry

log = structlog.get_logger("qworker.pool")
OnDone = Callable[[Execution, Outcome], None]


class WorkerLost(Exception):
    """The child process running the task died before it reported back."""


class Pool(Protocol):
    """What the runner needs from a pool. Every method is thread-safe."""

    def start(self) -> None:
        """Start the slots (and child processes); returns once they can take work."""

    def submit(self, execution: Execution) -> None:
        """Queue an execution; a free slot starts it at once."""

    def stop_execution(self, execution: Execution) -> bool:
        """Stop a running execution (kill its child, cancel or abandon it).

        Returns:
            True if it was running here and has been stopped or abandoned.
        """

    def drain(self) -> list[Execution]:
        """Take back every execution submitted but not yet started."""

    def stalled(self) -> bool:
        """Whether no slot can start a job now (every child failed to start)."""

    def close(self, timeout: float) -> None:
        """Stop the slots once they finish what runs; wait up to `timeout` seconds."""

    def kill_children(self) -> None:
        """SIGKILL every child process at once (the second-signal exit path)."""


def make_pool(
    kind: str,
    size: int,
    on_done: OnDone,
    *,
    modules: Sequence[str] = (),
    max_tasks_per_child: int | None = None,
) -> Pool:
    """Build the pool `kind` ("threads" or "processes") with `size` slots.

    Raises:
        ValueError: an unknown kind or a size below 1.
    """
    if size < 1:
        raise ValueError("concurrency must be at least 1")
    if kind == "threads":
        return ThreadPool(size, on_done)
    if kind == "processes":
        return ProcessPool(
            size, on_done, modules=modules, max_tasks_per_child=max_tasks_per_child
        )
    raise ValueError(f"unknown pool {kind!r}; choose one of {POOL_KINDS}")


def _take_all(q: queue.SimpleQueue[Execution | None]) -> list[Execution]:
    taken: list[Execution] = []
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return taken
        if item is not None:
            taken.append(item)


# ---------------------------------------------------------------- threads


class _AsyncLoop:
    """One asyncio event loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()
                    loop.close()

                self._thread = threading.Thread(
                    target=run, name="qworker-asyncio", daemon=True
                )
                self._thread.start()
                started.wait()
                self._loop = loop
            return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self, timeout: float) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)


class _ThreadSlot:
    def __init__(self, pool: ThreadPool, index: int) -> None:
        self.pool = pool
        self.current: Execution | None = None
        self.future: concurrent.futures.Future[Any] | None = None
        self.retired = False
        self.thread = threading.Thread(
            target=self.run, name=f"qworker-slot-{index}", daemon=True
        )

    def run_async(self, coro: Coroutine[Any, Any, Any]) -> Any:
        future = self.pool.loop.submit(coro)
        with self.pool.lock:
            self.future = future
        return future.result()

    def run(self) -> None:
        pool = self.pool
        while True:
            execution = pool.queue.get()
            if execution is None:
                return
            if execution.done:  # settled while it waited (cancelled): do not start it
                continue
            with pool.lock:
                self.current = execution
            outcome = execution.run(self.run_async)
            with pool.lock:
                self.current = self.future = None
                retired = self.retired
            pool.on_done(execution, outcome)
            if retired:
                return


class ThreadPool:
    """Runs tasks in `size` threads of this process. See the module docstring."""

    def __init__(self, size: int, on_done: OnDone) -> None:
        self.size = size
        self.on_done = on_done
        self.queue: queue.SimpleQueue[Execution | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.loop = _AsyncLoop()
        self._slots: list[_ThreadSlot] = []
        self._made = 0
        self.abandoned = 0  #: threads left running a stopped task

    def _add_slot(self) -> None:
        slot = _ThreadSlot(self, self._made)
        self._made += 1
        self._slots.append(slot)
        slot.thread.start()

    def start(self) -> None:
        with self.lock:
            for _ in range(self.size):
                self._add_slot()

    def submit(self, execution: Execution) -> None:
        self.queue.put(execution)

    def stop_execution(self, execution: Execution) -> bool:
        with self.lock:
            for slot in self._slots:
                if slot.current is execution:
                    break
            else:
                return False
            if slot.future is not None:  # an async task: cancel it for real
                slot.future.cancel()
                return True
            # A thread cannot be killed: leave it to finish on its own and replace it.
            slot.retired = True
            self._slots.remove(slot)
            self.abandoned += 1
            self._add_slot()
        log.warning(
            "pool.thread_abandoned",
            task=execution.task.name,
            job_id=execution.job.id,
            abandoned=self.abandoned,
        )
        return True

    def drain(self) -> list[Execution]:
        return _take_all(self.queue)

    def stalled(self) -> bool:
        return False  # a thread slot never fails to start

    def run_here(self, execution: Execution) -> None:
        """Run `execution` in the calling thread, outside the slots, and report it.
        `stop_execution` does not find it there: the caller is left to finish it."""
        outcome = execution.run(lambda c: self.loop.submit(c).result())
        self.on_done(execution, outcome)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            slots = list(self._slots)
        for _ in slots:
            self.queue.put(None)
        for slot in slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        self.loop.close(max(0.0, deadline - time.monotonic()))

    def kill_children(self) -> None:
        pass  # no children; the process exit ends the (daemon) threads


# ---------------------------------------------------------------- processes


class _Call(msgspec.Struct, array_like=True):
    task: str
    args: list[Any]
    kwargs: dict[str, Any]


_call_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(list[_Call])
_outcome_decoder = msgspec.msgpack.Decoder(list[Outcome])
_READY = b"ready"
_PIPE, _EXITED = "pipe", "exited"  #: what a slot's selector watches


def _not_now(signum: int, frame: FrameType | None) -> None:
    """A pool child's SIGINT and SIGTERM: left to the parent (see `_child_main`)."""


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _child_main(
    conn: multiprocessing.connection.Connection,
    modules: list[str],
    path: list[str],
    progress: Any,
) -> None:
    """A pool child: import the task modules, then run calls from `conn` until EOF.

    Each message is a run of calls, done in order; the reply is their outcomes, in one
    message once the last is done. `progress` (shared memory, a `RawValue("i")`) counts
    the calls of the current run begun so far: if the child dies mid-run, the parent
    learns from it which call it died in."""
    # The parent decides when children stop: a Ctrl-C to the process group, or a
    # SIGTERM to the whole cgroup (systemd), must not kill a task mid-way. Caught, not
    # ignored: an ignored signal stays ignored in every program a task starts (its
    # `Popen.terminate()` would do nothing), a caught one is reset by exec, and by the
    # fork hook in a process the task forks (a multiprocessing.Pool's workers).
    signal.signal(signal.SIGINT, _not_now)
    signal.signal(signal.SIGTERM, _not_now)
    os.register_at_fork(after_in_child=_default_signals)
    try:
        import_modules(modules, path=path)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
    running = _RunningCall()
    threading.Thread(target=_watch_parent, args=(conn, running), daemon=True).start()
    conn.send_bytes(_READY)
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        if not data:
            return  # asked to stop
        progress.value = 0
        running.begin()
        outcomes = []
        for call in _call_decoder.decode(data):
            progress.value += 1
            outcomes.append(_run_call(call))
        try:
            reply = _call_encoder.encode(outcomes)
        except (TypeError, ValueError, OverflowError):
            reply = _call_encoder.encode([_encodable(o) for o in outcomes])
        running.end()  # before the reply: the parent may send the next call after it
        try:
            conn.send_bytes(reply)
        except OSError:
            return  # the parent is gone (SIGKILLed while this task ran)


def _run_call(call: _Call) -> Outcome:
    try:
        t = default_registry.get(call.task)
    except NotRegistered as exc:
        return failure(exc, retry=False, with_traceback=False)
    return execute(t, call.args, call.kwargs, asyncio.run)


def _encodable(outcome: Outcome) -> Outcome:
    """`outcome`, or a failure saying why its result cannot cross the pipe."""
    try:
        _call_encoder.encode(outcome)
    except (TypeError, ValueError, OverflowError) as exc:
        error = f"UnserializableResult: {describe(exc)}"
        return Outcome(ok=False, error=error, duration=outcome.duration)
    return outcome


class _RunningCall:
    """Which call a child is in, for the watchdog (plain attributes: the GIL suffices)."""

    def __init__(self) -> None:
        self.busy = False
        self.number = 0

    def begin(self) -> None:
        self.number += 1
        self.busy = True

    def end(self) -> None:
        self.busy = False


def _watch_parent(
    conn: multiprocessing.connection.Connection, running: _RunningCall
) -> None:
    """Exit the child if the parent dies while a task runs (a SIGKILLed worker).

    The parent never writes while a call runs: it sends the next call only after the
    reply, and `end()` comes before the reply. So a pipe that turns readable during one
    and the same call can only mean EOF: the worker is gone, the result can never be
    reported, and the job will be redelivered; stop working on it now.
    """
    while True:
        number, busy = running.number, running.busy
        if not busy:
            time.sleep(PARENT_CHECK)
            continue
        readable = multiprocessing.connection.wait([conn], PARENT_CHECK)
        if readable and running.busy and running.number == number:
            os._exit(1)


class PoolStartError(RuntimeError):
    """No child of a processes pool could start: a task module that imports in the
    worker fails in a child (say, a setting the child does not have)."""


class _ProcessSlot:
    def __init__(self, pool: ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.current: list[Execution] = []  #: the run its child is on
        #: jobs this slot took and must start before the queue's (under pool.lock)
        self.held: collections.deque[Execution] = collections.deque()
        self.killing = False  #: stop_execution killed the child on purpose
        #: calls of the child's current run begun so far (the child writes it)
        self.progress = pool.ctx.RawValue("i", 0)
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        #: watches the child's pipe and its sentinel (readable once it has exited);
        #: made once per child, so a run costs one select, not a new poll object
        self.watch: selectors.BaseSelector | None = None
        self.tasks_run = 0
        self.failure = ""  #: why the last child failed to start
        self.failing = False  #: its last try to start a child failed: no child
        self.thread = threading.Thread(
            target=self.run, name=f"qworker-slot-{index}", daemon=True
        )

    def spawn(self) -> bool:
        """Start a child and wait for it to import the modules. False if it failed."""
        pool = self.pool
        parent_conn, child_conn = pool.ctx.Pipe()
        # typeshed: BaseContext has no Process; each concrete context has one
        proc = pool.ctx.Process(  # type: ignore[attr-defined]
            target=_child_main,
            args=(child_conn, list(pool.modules), list(sys.path), self.progress),
            name=f"qworker-child-{self.index}",
        )
        try:
            proc.start()
        except Exception as exc:  # the fork server died (a module raised in preload)
            child_conn.close()
            parent_conn.close()
            self.failure = describe(exc)
            log.error("pool.child_failed", slot=self.index, error=self.failure)
            return False
        child_conn.close()
        ready = multiprocessing.connection.wait(
            [parent_conn, proc.sentinel], CHILD_START_TIMEOUT
        )
        ok = False
        if parent_conn in ready:
            try:
                ok = parent_conn.recv_bytes() == _READY
            except (EOFError, OSError):
                ok = False
        if not ok:
            proc.kill()
            proc.join(CHILD_STOP_TIMEOUT)
            parent_conn.close()
            self.failure = f"exited with code {proc.exitcode}"
            log.error("pool.child_failed", slot=self.index, exitcode=proc.exitcode)
            return False
        watch = selectors.DefaultSelector()
        watch.register(parent_conn.fileno(), selectors.EVENT_READ, _PIPE)
        watch.register(proc.sentinel, selectors.EVENT_READ, _EXITED)
        with pool.lock:
            self.proc, self.conn, self.tasks_run = proc, parent_conn, 0
            self.watch, self.killing = watch, False
        log.debug("pool.child_started", slot=self.index, pid=proc.pid)
        return True

    def stop_child(self) -> None:
        with self.pool.lock:
            proc, conn, watch = self.proc, self.conn, self.watch
            self.proc = self.conn = self.watch = None
        if watch is not None:
            watch.close()
        if proc is None or conn is None:
            return
        with contextlib.suppress(OSError):
            conn.send_bytes(b"")  # please exit
        proc.join(CHILD_STOP_TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            proc.join(CHILD_STOP_TIMEOUT)
        conn.close()

    def ensure_child(self) -> bool:
        backoff = 0.5
        while not self.pool.closing:
            # An idle child's pipe is readable only at EOF, its sentinel only once it
            # has exited: anything ready means it is gone.
            if self.watch is not None and not self.watch.select(0):
                return True
            self.stop_child()
            if self.spawn():
                self.failing = False
                return True
            self.failing = True
            time.sleep(backoff)
            backoff = min(backoff * 2, RESPAWN_BACKOFF_MAX)
        return False

    def take_run(self, first: Execution) -> list[Execution]:
        """`first`, and after it as many waiting jobs as one message should carry.

        A run is for quick tasks only: each job's task must have no `time_limit` (a run
        is killed as a whole) and a known mean run time; together they may take about
        RUN_SPAN. The slot takes at most its share of the queue, so the other slots stay
        as busy as before. The first job that does not fit is held for the slot's next
        turn, so it keeps its place ahead of the jobs queued after it.
        """
        pool = self.pool
        budget = RUN_SPAN - pool.quick_run(first)
        if budget < 0:
            return [first]
        room = min(RUN_MAX, pool.queue.qsize() // pool.size + len(self.held) + 1)
        if pool.max_tasks_per_child:
            room = min(room, pool.max_tasks_per_child - self.tasks_run)
        run = [first]
        while len(run) < room:
            with pool.lock:
                item = self.held.popleft() if self.held else None
            if item is None:
                try:
                    item = pool.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    pool.queue.put(item)  # a stop sentinel: for a slot's next turn
                    break
            if item.done:  # settled while it waited (cancelled)
                continue
            budget -= pool.quick_run(item)
            if budget < 0:
                with pool.lock:
                    self.held.appendleft(item)
                break
            run.append(item)
        return run

    def run_calls(self, run: list[Execution]) -> list[Outcome | None]:
        """Run `run` in the child: each job's outcome, or None for a job to run again.

        If the child dies mid-run, the job it was in fails with `WorkerLost`, unless the
        child was killed on purpose (`stop_execution`: that job's outcome no longer
        counts). The jobs after it never began: they run again in a new child. So do
        the jobs before it, whose outcomes died with the child.
        """
        proc, conn = self.proc, self.conn
        assert proc is not None
        assert conn is not None
        calls = [_Call(ex.job.task, ex.job.args, ex.job.kwargs) for ex in run]
        try:
            conn.send_bytes(_call_encoder.encode(calls))
            assert self.watch is not None
            ready = self.watch.select()  # the reply, or the child's exit
            if any(key.data == _PIPE for key, _ in ready):
                outcomes = _outcome_decoder.decode(conn.recv_bytes())
                if len(outcomes) == len(run):
                    return list(outcomes)
        except (EOFError, OSError):
            pass
        proc.join(CHILD_STOP_TIMEOUT)
        code = proc.exitcode
        lost = max(self.progress.value, 1) - 1  # the call the child died in
        with self.pool.lock:
            on_purpose = self.killing
        self.stop_child()
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else (f"exited with code {code}")
        )
        exc = WorkerLost(f"the child process running the task {how}")
        again: list[Outcome | None] = [None] * len(run)
        if not on_purpose and lost < len(run):
            ex = run[lost]
            again[lost] = failure(
                exc, retry=ex.task.should_retry(exc), with_traceback=False
            )
        return again

    def run(self) -> None:
        pool = self.pool
        while True:
            if not self.ensure_child():
                return
            with pool.lock:
                execution = self.held.popleft() if self.held else None
            if execution is None:
                execution = pool.queue.get()
                if execution is None:
                    self.stop_child()
                    return
            if execution.done:  # settled while it waited (cancelled): do not start it
                continue
            if not self.ensure_child():  # it died while idle, and we are closing
                with pool.lock:
                    self.held.appendleft(execution)  # for drain()
                return
            run = self.take_run(execution)
            if len(run) > 1:
                log.debug("pool.run", slot=self.index, jobs=len(run))
            with pool.lock:
                self.current = run
            started = time.monotonic()
            for ex in run:
                ex.started_at = started
            outcomes = self.run_calls(run)
            with pool.lock:
                self.current = []
                self.held.extendleft(
                    reversed(
                        [ex for ex, o in zip(run, outcomes, strict=True) if o is None]
                    )
                )
            for ex, outcome in zip(run, outcomes, strict=True):
                if outcome is not None:
                    pool.ran(ex.task.name, outcome.duration)
                    pool.on_done(ex, outcome)
                    self.tasks_run += 1
            if pool.max_tasks_per_child and self.tasks_run >= pool.max_tasks_per_child:
                log.debug("pool.child_recycled", slot=self.index, tasks=self.tasks_run)
                self.stop_child()


def _default_context() -> BaseContext:
    methods = multiprocessing.get_all_start_methods()
    # forkserver forks from a clean single-threaded server; plain fork from this
    # threaded process could copy a held lock into the child.
    return multiprocessing.get_context(
        "forkserver" if "forkserver" in methods else "spawn"
    )


class ProcessPool:
    """Runs tasks in `size` child processes. See the module docstring."""

    def __init__(
        self,
        size: int,
        on_done: OnDone,
        *,
        modules: Sequence[str],
        max_tasks_per_child: int | None = None,
        ctx: BaseContext | None = None,
    ) -> None:
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be at least 1")
        self.size = size
        self.on_done = on_done
        self.modules = list(modules)
        self.max_tasks_per_child = max_tasks_per_child
        self.ctx = ctx if ctx is not None else _default_context()
        self.queue: queue.SimpleQueue[Execution | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.closing = False
        self._slots = [_ProcessSlot(self, i) for i in range(size)]
        #: moving mean run time per task name, from the children's outcomes
        self._mean_run: dict[str, float] = {}

    def quick_run(self, execution: Execution) -> float:
        """Its task's mean run time if it may ride in a run of calls, else infinity."""
        if execution.task.time_limit is not None:
            return float("inf")
        return self._mean_run.get(execution.task.name, float("inf"))

    def ran(self, task: str, duration: float) -> None:
        """Count one run of `task` into its moving mean (slot threads; the GIL suffices)."""
        self._mean_run[task] = moving_mean(self._mean_run.get(task), duration)

    def start(self) -> None:
        if self.ctx.get_start_method() == "forkserver":
            # Import qworker and the task modules once in the fork server, so each new
            # child starts as a cheap fork with them loaded (an ImportError there is
            # ignored and shows up in the child; any other error ends the server).
            self.ctx.set_forkserver_preload(["qworker.pools", *self.modules])
        # Start the children side by side; a slot whose child failed retries later,
        # but when none starts, the worker must not lease jobs it cannot run.
        starters = [
            threading.Thread(target=slot.spawn, daemon=True) for slot in self._slots
        ]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if all(slot.proc is None for slot in self._slots):
            raise PoolStartError(
                f"no pool child could start (the last {self._slots[-1].failure}); "
                "its error is above"
            )
        for slot in self._slots:
            slot.thread.start()

    def submit(self, execution: Execution) -> None:
        self.queue.put(execution)

    def stop_execution(self, execution: Execution) -> bool:
        with self.lock:
            for slot in self._slots:
                if execution in slot.current and slot.proc is not None:
                    # Its slot sees the death and respawns; the rest of the run goes
                    # again in the new child (see run_calls).
                    slot.killing = True
                    slot.proc.kill()
                    return True
        return False

    def drain(self) -> list[Execution]:
        held: list[Execution] = []
        with self.lock:
            for slot in self._slots:
                held.extend(slot.held)
                slot.held.clear()
        return held + _take_all(self.queue)

    def stalled(self) -> bool:
        # a flag per slot, read without the lock: a stale read only delays a look
        return all(slot.failing for slot in self._slots)

    def close(self, timeout: float) -> None:
        self.closing = True
        deadline = time.monotonic() + timeout
        for _ in self._slots:
            self.queue.put(None)
        for slot in self._slots:
            slot.thread.join(max(0.0, deadline - time.monotonic()))
        self.kill_children()

    def kill_children(self) -> None:
        for slot in self._slots:
            proc = slot.proc
            if proc is not None and proc.exitcode is None:
                proc.kill()
