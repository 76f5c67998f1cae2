"""The processes pool: each slot thread owns one child process and talks to it over a
pipe in msgpack.

Children start with forkserver where the platform has it, else spawn; never plain
fork, since the worker runs threads. Stopping a task kills its child; the slot starts a
new one. A child that dies mid-task (segfault, OOM kill) fails the job with
`WorkerLost`. Children leave SIGINT/SIGTERM to the parent. When jobs wait in the pool's
queue (a prefetching worker) and their tasks are known to be quick, a slot sends its
child a *run* of them in one message (`_ProcessSlot.take_run`): a pipe round trip per
run instead of per job, which is most of what a no-op task costs in this pool.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import queue
import selectors
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.context import BaseContext

import structlog

from qworker._execute import Execution, Outcome, describe, failure, moving_mean
from qworker.pools._base import OnDone, PoolStartError, WorkerLost, take_all
from qworker.pools._child import READY, Call, call_encoder, child_main, outcome_decoder
from qworker.pools._progress import ProgressArea

__all__ = ["CHILD_START_TIMEOUT", "RESPAWN_BACKOFF_MAX", "RUN_MAX", "ProcessPool"]

CHILD_START_TIMEOUT = 60.0  #: seconds a child may take to import the task modules
CHILD_STOP_TIMEOUT = 2.0  #: seconds a child gets to exit when asked, before SIGKILL
RESPAWN_BACKOFF_MAX = 30.0  #: seconds between tries to start a child that keeps failing
RUN_SPAN = 0.002  #: seconds of expected run time one message to a child may carry
RUN_MAX = 64  #: jobs one message to a child may carry
_PIPE, _EXITED = "pipe", "exited"  #: what a slot's selector watches

log = structlog.get_logger("qworker.pool")


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
        #: what the child's tasks report through `current_job().progress()`
        self.area = ProgressArea(pool.ctx)
        self.runs = 0  #: runs of calls sent to the current child (the child counts too)
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
            target=child_main,
            args=(
                child_conn,
                list(pool.modules),
                list(sys.path),
                self.progress,
                self.area,
            ),
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
                ok = parent_conn.recv_bytes() == READY
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
            self.runs = 0
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
        calls = [
            Call(j.task, j.args, j.kwargs, j.id, j.queue, j.attempt, j.headers)
            for j in (ex.job for ex in run)
        ]
        try:
            conn.send_bytes(call_encoder.encode(calls))
            assert self.watch is not None
            ready = self.watch.select()  # the reply, or the child's exit
            if any(key.data == _PIPE for key, _ in ready):
                outcomes = outcome_decoder.decode(conn.recv_bytes())
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
                self.runs += 1
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
            self.ctx.set_forkserver_preload(["qworker.pools._child", *self.modules])
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

    def collect_progress(self) -> None:
        """Hand what the children's tasks reported to their executions' contexts."""
        with self.lock:
            for slot in self._slots:
                got = slot.area.take()
                if got is None:
                    continue
                run, index, progress = got
                if run == slot.runs and index < len(slot.current):
                    slot.current[index].context.record_progress(progress)

    def drain(self) -> list[Execution]:
        held: list[Execution] = []
        with self.lock:
            for slot in self._slots:
                held.extend(slot.held)
                slot.held.clear()
        return held + take_all(self.queue)

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
