"""Group commit: one thread owns the write connection and commits many calls at once.

Theory of operation (docs/architecture.md, "Performance"): a handler on the trio loop submits a store
call and parks. The writer thread takes every call pending, runs each in its own SAVEPOINT
inside one transaction, commits once, then reschedules all the parked tasks through one
`run_sync_soon`. Under load one fsync covers hundreds of requests, and each reply still
follows its own commit. A call that raises is rolled back to its savepoint alone; a failed
COMMIT fails every call of the batch (nothing of it is durable, so nothing is acknowledged).

The trio loop never touches SQLite; the writer thread never touches trio objects except
through the trio token, which is thread-safe.

If the thread itself fails (a ROLLBACK that fails leaves the connection in a state no
later call can be trusted with), every call pending or submitted later fails with
InternalError, so no request hangs, and `died` is set: the server then stops with an
error, for a supervisor to restart it on the database as last committed.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import structlog
import trio

from qbroker import errors, metrics
from qbroker.config import WRITER_MAX_BATCH
from qbroker.store.sqlite.schema import translate_error

T = TypeVar("T")
log = structlog.get_logger("qbroker.writer")


class Call:
    """One submitted store call: its result once committed (see `Writer.submit`)."""

    __slots__ = ("args", "done", "fn", "kwargs", "result", "task")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.result: outcome.Outcome[Any] | None = None  #: set by the writer thread
        self.done = False  #: set on the trio thread once `result` is committed
        self.task: Any = None  #: the trio task waiting for it, if any


_STOP = object()


class Writer:
    """The one writer thread. Start with `start()` from the trio thread; `stop()` drains.

    It owns `conn` from `start()` on and closes it when it ends. `rolled_back` is called
    (on the thread) after any rollback, so caches of what was committed can be dropped.
    `guard` runs before and after each commit; an error it returns fails the batch's
    calls (guards.FileGuard: a commit into a deleted file is not durable).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        rolled_back: Callable[[], None] = lambda: None,
        guard: Callable[[], errors.QBrokerError | None] | None = None,
    ) -> None:
        self.conn = conn
        self._rolled_back = rolled_back
        self._guard = guard
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="qbroker-writer", daemon=True
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._lock = threading.Lock()  #: orders `submit` against the thread's death
        self.error: BaseException | None = None  #: why the thread died, once it has
        self.died = trio.Event()  #: set on the trio thread once `error` is set

    def start(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` (a unit of writes.py) in the next group commit.

        Returns after the commit that made it durable. Not cancellable once submitted:
        a cancel waits for the commit, so a write is never half-reported.

        Raises:
            whatever `fn` raised (its savepoint rolled back), or errors.DiskFull /
            errors.InternalError when the commit itself failed.
        """
        result: T = await self.wait(self.submit(fn, *args, **kwargs))
        return result

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
        """Queue a call for the next group commit without waiting (trio thread only).

        Calls run and commit in the order they were submitted, so once a call is
        `done`, every call submitted before it is done too.
        """
        item = Call(fn, args, kwargs)
        with self._lock:
            if self.error is None:
                self._queue.put(item)
                return item
        item.result = outcome.Error(_dead(self.error))
        item.done = True
        return item

    async def wait(self, call: Call) -> Any:
        """The result of a `submit`ted call once it is durable (see `call`)."""
        if call.done:
            assert call.result is not None
            return call.result.unwrap()
        call.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def stop(self) -> None:
        """Commit what is pending and end the thread (blocking; call off the loop)."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        batch: list[Call] = []
        try:
            self._loop(batch)
        except BaseException as exc:
            log.critical("writer.died", error=repr(exc))
            with self._lock:
                self.error = exc
                while True:  # nothing is put in the queue after `error` is set
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        batch.append(item)
            failed = outcome.Error(_dead(exc))
            for c in batch:  # whether the batch in hand was committed is unknown
                c.result = failed
            assert self._token is not None
            self._token.run_sync_soon(_wake_all, batch)
            self._token.run_sync_soon(self.died.set)

    def _loop(self, batch: list[Call]) -> None:
        """Commit batches until stopped; `batch` holds the one in hand, for `_run`."""
        conn = self.conn
        stopping = False
        while not stopping:
            batch.clear()
            first = self._queue.get()
            if first is _STOP:
                break
            batch.append(first)
            while len(batch) < WRITER_MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)
            self._guarded_commit(conn, batch)
            metrics.COMMIT_BATCH.observe(len(batch))
            assert self._token is not None
            self._token.run_sync_soon(_wake_all, list(batch))
        conn.close()

    def _guarded_commit(self, conn: sqlite3.Connection, batch: list[Call]) -> None:
        """`_commit`, unless the guard finds the file gone, before it (nothing runs)
        or after it (what ran is in a file no restart will read): then all fail."""
        if self._guard is None:
            self._commit(conn, batch)
            return
        lost = self._guard()
        if lost is None:
            self._commit(conn, batch)
            lost = self._guard()
        if lost is not None:
            self._rolled_back()
            for c in batch:
                c.result = outcome.Error(lost)

    def _commit(self, conn: sqlite3.Connection, batch: list[Call]) -> None:
        # A call alone in its transaction needs no savepoint: ROLLBACK undoes it alone.
        alone = len(batch) == 1
        begun = 0  # index of the first call in the open transaction
        for i, c in enumerate(batch):
            try:
                if not conn.in_transaction:
                    conn.execute("BEGIN IMMEDIATE")
                    begun = i
                if not alone:
                    conn.execute("SAVEPOINT call")
                c.result = outcome.Value(c.fn(*c.args, **c.kwargs))
                if not alone:
                    conn.execute("RELEASE call")
            except BaseException as exc:  # the call's own failure: undo it alone
                self._rolled_back()
                c.result = outcome.Error(
                    translate_error(exc) if isinstance(exc, sqlite3.Error) else exc
                )
                if alone:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                elif conn.in_transaction:
                    conn.execute("ROLLBACK TO call")
                    conn.execute("RELEASE call")
                else:
                    # SQLite rolled back the whole transaction (e.g. SQLITE_FULL):
                    # the calls before this one in it are lost too.
                    err = c.result.error if isinstance(c.result, outcome.Error) else exc
                    for prev in batch[begun:i]:
                        prev.result = outcome.Error(err)
        try:
            if conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            log.error("writer.commit_failed", error=str(exc), calls=len(batch))
            self._rolled_back()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            err = translate_error(exc)
            for c in batch[begun:]:
                c.result = outcome.Error(err)


def _dead(exc: BaseException) -> errors.InternalError:
    return errors.InternalError(f"the writer thread failed: {exc!r}")


def _wake_all(batch: list[Call]) -> None:
    for c in batch:
        assert c.result is not None
        c.done = True
        if c.task is not None:
            trio.lowlevel.reschedule(c.task, c.result)
