"""A processes-pool child: import the task modules, run the calls the parent sends.

This is all a child process runs (the fork server preloads this module). Messages are
msgpack: a run of `Call`s one way, their `Outcome`s the other (no pickle).
"""

from __future__ import annotations

import asyncio
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from typing import Any

import msgspec

from qworker._context import JobContext, Progress
from qworker._execute import Outcome, describe, execute, failure
from qworker.pools._progress import ProgressArea
from qworker.registry import NotRegistered, default_registry, import_modules

__all__ = ["READY", "Call", "call_encoder", "child_main", "outcome_decoder"]

PARENT_CHECK = 1.0  #: seconds between a busy child's looks at whether its parent lives


class Call(msgspec.Struct, array_like=True):
    """One job for the child to run, and what its task's `current_job()` says."""

    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    id: str = ""
    queue: str = ""
    attempt: int = 0
    headers: dict[str, Any] = {}


call_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(list[Call])
outcome_decoder = msgspec.msgpack.Decoder(list[Outcome])
READY = b"ready"


def _not_now(signum: int, frame: FrameType | None) -> None:
    """A pool child's SIGINT and SIGTERM: left to the parent (see `child_main`)."""


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def child_main(
    conn: multiprocessing.connection.Connection,
    modules: list[str],
    path: list[str],
    progress: Any,
    area: ProgressArea,
) -> None:
    """A pool child: import the task modules, then run calls from `conn` until EOF.

    Each message is a run of calls, done in order; the reply is their outcomes, in one
    message once the last is done. `progress` (shared memory, a `RawValue("i")`) counts
    the calls of the current run begun so far: if the child dies mid-run, the parent
    learns from it which call it died in. A task's `current_job().progress()` goes
    to `area`, for the parent to send with its heartbeats."""
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
    conn.send_bytes(READY)
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
        for index, call in enumerate(_call_decoder.decode(data)):
            progress.value += 1
            outcomes.append(_run_call(call, area, running.number, index))
        try:
            reply = call_encoder.encode(outcomes)
        except (TypeError, ValueError, OverflowError):
            reply = call_encoder.encode([_encodable(o) for o in outcomes])
        running.end()  # before the reply: the parent may send the next call after it
        try:
            conn.send_bytes(reply)
        except OSError:
            return  # the parent is gone (SIGKILLed while this task ran)


def _run_call(call: Call, area: ProgressArea, run: int, index: int) -> Outcome:
    try:
        t = default_registry.get(call.task)
    except NotRegistered as exc:
        return failure(exc, retry=False, with_traceback=False)

    def on_progress(p: Progress) -> None:
        area.write(run, index, p)

    context = JobContext(
        call.id, call.queue, call.task, call.attempt, call.headers, on_progress
    )
    return execute(t, call.args, call.kwargs, asyncio.run, context)


def _encodable(outcome: Outcome) -> Outcome:
    """`outcome`, or a failure saying why its result cannot cross the pipe."""
    try:
        call_encoder.encode(outcome)
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
