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
  SIGINT/SIGTERM: the parent decides when they stop.

Pools report each run to `on_done(execution, outcome)` from a slot thread; the runner
decides whether an outcome still counts (a stopped execution's late outcome does not).
"""

from __future__ import annotations

import asyncio
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
from typing import Any, Protocol

import msgspec
import structlog

from qworker._execute import Execution, Outcome, describe, execute, failure
from qworker.registry import NotRegistered, default_registry, import_modules

__all__ = ["POOL_KINDS", "Pool", "ProcessPool", "ThreadPool", "WorkerLost", "make_pool"]

POOL_KINDS = ("threads", "processes")
CHILD_START_TIMEOUT = 60.0  #: seconds a child may take to import the task modules
CHILD_STOP_TIMEOUT = 2.0  #: seconds a child gets to exit when asked, before SIGKILL
RESPAWN_BACKOFF_MAX = 30.0  #: seconds between tries to start a child that keeps failing
PARENT_CHECK = 1.0  #: seconds between a busy child's looks at whether its parent lives

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
            execution.started_at = time.monotonic()
            job = execution.job
            outcome = execute(execution.task, job.args, job.kwargs, self.run_async)
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
_call_decoder = msgspec.msgpack.Decoder(_Call)
_outcome_decoder = msgspec.msgpack.Decoder(Outcome)
_READY = b"ready"
_PIPE, _EXITED = "pipe", "exited"  #: what a slot's selector watches


def _child_main(
    conn: multiprocessing.connection.Connection, modules: list[str], path: list[str]
) -> None:
    """A pool child: import the task modules, then run calls from `conn` until EOF."""
    # The parent decides when children stop: a Ctrl-C to the process group, or a
    # SIGTERM to the whole cgroup (systemd), must not kill a task mid-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
        call = _call_decoder.decode(data)
        running.begin()
        try:
            t = default_registry.get(call.task)
        except NotRegistered as exc:
            outcome = failure(exc, retry=False, with_traceback=False)
        else:
            outcome = execute(t, call.args, call.kwargs, asyncio.run)
        try:
            reply = _call_encoder.encode(outcome)
        except (TypeError, ValueError, OverflowError) as exc:
            error = f"UnserializableResult: {describe(exc)}"
            reply = _call_encoder.encode(Outcome(ok=False, error=error))
        running.end()  # before the reply: the parent may send the next call after it
        try:
            conn.send_bytes(reply)
        except OSError:
            return  # the parent is gone (SIGKILLed while this task ran)


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


class _ProcessSlot:
    def __init__(self, pool: ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.current: Execution | None = None
        self.proc: multiprocessing.process.BaseProcess | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        #: watches the child's pipe and its sentinel (readable once it has exited);
        #: made once per child, so a run costs one select, not a new poll object
        self.watch: selectors.BaseSelector | None = None
        self.tasks_run = 0
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
            args=(child_conn, list(pool.modules), list(sys.path)),
            name=f"qworker-child-{self.index}",
        )
        proc.start()
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
            log.error("pool.child_failed", slot=self.index, exitcode=proc.exitcode)
            return False
        watch = selectors.DefaultSelector()
        watch.register(parent_conn.fileno(), selectors.EVENT_READ, _PIPE)
        watch.register(proc.sentinel, selectors.EVENT_READ, _EXITED)
        with pool.lock:
            self.proc, self.conn, self.tasks_run = proc, parent_conn, 0
            self.watch = watch
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
                return True
            time.sleep(backoff)
            backoff = min(backoff * 2, RESPAWN_BACKOFF_MAX)
        return False

    def run_one(self, execution: Execution) -> Outcome:
        proc, conn = self.proc, self.conn
        assert proc is not None
        assert conn is not None
        job = execution.job
        try:
            conn.send_bytes(_call_encoder.encode(_Call(job.task, job.args, job.kwargs)))
            assert self.watch is not None
            ready = self.watch.select()  # the reply, or the child's exit
            if any(key.data == _PIPE for key, _ in ready):
                return _outcome_decoder.decode(conn.recv_bytes())
        except (EOFError, OSError):
            pass
        proc.join(CHILD_STOP_TIMEOUT)
        code = proc.exitcode
        self.stop_child()
        how = (
            f"was killed by signal {-code}"
            if code is not None and code < 0
            else (f"exited with code {code}")
        )
        exc = WorkerLost(f"the child process running the task {how}")
        return failure(
            exc, retry=execution.task.should_retry(exc), with_traceback=False
        )

    def run(self) -> None:
        pool = self.pool
        while True:
            if not self.ensure_child():
                return
            execution = pool.queue.get()
            if execution is None:
                self.stop_child()
                return
            if execution.done:  # settled while it waited (cancelled): do not start it
                continue
            if not self.ensure_child():  # it died while idle, and we are closing
                pool.queue.put(execution)  # for drain()
                return
            with pool.lock:
                self.current = execution
            execution.started_at = time.monotonic()
            outcome = self.run_one(execution)
            with pool.lock:
                self.current = None
            pool.on_done(execution, outcome)
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

    def start(self) -> None:
        if self.ctx.get_start_method() == "forkserver":
            # Import qworker and the task modules once in the fork server, so each new
            # child starts as a cheap fork with them loaded (errors there are ignored
            # and show up in the child instead).
            self.ctx.set_forkserver_preload(["qworker.pools", *self.modules])
        # Start the children side by side; a slot whose child failed retries later.
        starters = [
            threading.Thread(target=slot.spawn, daemon=True) for slot in self._slots
        ]
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        for slot in self._slots:
            slot.thread.start()

    def submit(self, execution: Execution) -> None:
        self.queue.put(execution)

    def stop_execution(self, execution: Execution) -> bool:
        with self.lock:
            for slot in self._slots:
                if slot.current is execution and slot.proc is not None:
                    slot.proc.kill()  # its slot sees the death, reports, and respawns
                    return True
        return False

    def drain(self) -> list[Execution]:
        return _take_all(self.queue)

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
