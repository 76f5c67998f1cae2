"""Running one job once, the same way in a pool thread and in a pool child process.

`execute()` calls the task and turns whatever happens into an `Outcome`: a plain
msgspec struct that crosses a process boundary as msgpack (no pickle) and tells the runner
all it needs to ack or fail the job: the result, or the error text, traceback and whether
the task's policy asks for a retry.
"""

from __future__ import annotations

import inspect
import os
import time
import traceback as tb
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import msgspec
from qclient.tags import tag, untag

from qworker._context import JobContext, in_context, reset_current, set_current
from qworker._task import InvalidArguments, Retry

if TYPE_CHECKING:
    from qclient import wire

    from qworker._task import Task

__all__ = [
    "BROKER_DEFAULT_LEASE",
    "MAX_ERROR_CHARS",
    "MAX_TRACEBACK_CHARS",
    "Execution",
    "Outcome",
    "context_of",
    "execute",
]

MAX_ERROR_CHARS = (
    4096  #: the wire allows 65,536; an error line longer than this is noise
)
MAX_TRACEBACK_CHARS = 200_000  #: the wire allows 262,144 characters; we keep the tail
#: seconds: the lease a job gets when sent without `timeout` (protocol.md). The broker
#: stores it in the job, so a lease cannot tell it from one asked for: a job carrying
#: exactly this is taken as sent without one, and its task's `timeout` applies.
BROKER_DEFAULT_LEASE = 30.0
HEARTBEAT_FRACTION = 1 / 3  #: extend a lease when this fraction of it has passed

RunAsync = Callable[[Coroutine[Any, Any, Any]], Any]


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """What one run of a task came to."""

    ok: bool
    result: Any = None  #: the return value as JSON-like builtins (ok only)
    error: str = ""  #: "ExcType: message"
    traceback: str | None = None
    retry: bool = False  #: the task's policy asks for a retry (if attempts are left)
    retry_delay: float | None = (
        None  #: Retry(delay=...): seconds, overriding the backoff
    )
    duration: float = 0.0  #: seconds the function ran


MEAN_WEIGHT = 0.2  #: weight of the newest run in a moving mean of run times


def moving_mean(mean: float | None, value: float) -> float:
    """`mean` moved toward `value` by MEAN_WEIGHT (`value` itself when no mean yet)."""
    return value if mean is None else mean + MEAN_WEIGHT * (value - mean)


def describe(exc: BaseException) -> str:
    """`"ExcType: message"` (just `"ExcType"` with no message), cut to MAX_ERROR_CHARS."""
    try:
        text = str(exc)
    except Exception:  # a task's exception whose __str__ fails is still reported
        text = "<unprintable>"
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line[:MAX_ERROR_CHARS]


def format_traceback(exc: BaseException) -> str:
    """The formatted traceback, keeping its tail when it is too long for the wire."""
    text = "".join(tb.format_exception(exc))
    if len(text) > MAX_TRACEBACK_CHARS:
        text = "...(cut)...\n" + text[-(MAX_TRACEBACK_CHARS - 20) :]
    return text


def failure(
    exc: BaseException,
    *,
    retry: bool,
    duration: float = 0.0,
    with_traceback: bool = True,
) -> Outcome:
    """An `Outcome` for an exception."""
    return Outcome(
        ok=False,
        error=describe(exc),
        traceback=format_traceback(exc) if with_traceback else None,
        retry=retry,
        retry_delay=exc.delay if isinstance(exc, Retry) else None,
        duration=duration,
    )


def context_of(job: wire.LeasedJob) -> JobContext:
    """The context a task running `job` sees through `current_job()`."""
    return JobContext(job.id, job.queue, job.task, job.attempt, job.headers)


def execute(
    task: Task[..., Any],
    args: list[Any],
    kwargs: dict[str, Any],
    run_async: RunAsync,
    context: JobContext | None = None,
) -> Outcome:
    """Call the task once and report what happened. Never raises.

    Args:
        task: the task to run.
        args: positional arguments from the job.
        kwargs: keyword arguments from the job.
        run_async: runs a coroutine to completion and returns its value (an `async def`
            task's call returns one).
        context: what `current_job()` returns during the call.

    Returns:
        The outcome; a result that msgspec cannot turn into JSON-like builtins is a
        failure with no retry (it would fail the same way every time). Arguments
        and result pass through `qclient.tags`, so a datetime sent arrives as one,
        and one returned comes back from `Job.result()` as one.
    """
    try:
        task.check_arguments(args, kwargs)
    except InvalidArguments as exc:  # the sender's mistake: no traceback of ours
        return failure(exc, retry=task.should_retry(exc), with_traceback=False)
    start = time.monotonic()
    pid = os.getpid()
    token = set_current(context)
    try:
        value = task.fn(*untag(args), **untag(kwargs))
        if inspect.iscoroutine(value):
            value = run_async(in_context(value, context))
    except BaseException as exc:  # the task's failure, whatever it is, is data here
        if os.getpid() != pid:
            _end_fork(exc)
        return failure(
            exc, retry=task.should_retry(exc), duration=time.monotonic() - start
        )
    finally:
        reset_current(token)
    if os.getpid() != pid:
        _end_fork(None)
    duration = time.monotonic() - start
    try:
        result = msgspec.to_builtins(tag(value))
    except Exception as exc:  # TypeError, ValueError; RecursionError when too deep
        return Outcome(
            ok=False,
            error=f"UnserializableResult: {describe(exc)}"[:MAX_ERROR_CHARS],
            duration=duration,
        )
    return Outcome(ok=True, result=result, duration=duration)


def _end_fork(exc: BaseException | None) -> NoReturn:
    """End a process the task forked that came back out of the task (its code did
    not exit, or called sys.exit): a copy of the worker must never run worker code."""
    code = 0
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    elif exc is not None:
        tb.print_exception(exc)
        code = 1
    os._exit(code)


class Execution:
    """One leased job in this worker, from lease to ack/fail. Owned by the runner.

    The pools read `job`, `task` and `context` and set `started_at`; every other
    field is the runner's, read and written under its lock.

    The lease: a job sent without `timeout` (it carries the broker's default) whose
    task declares one gets the task's: `extend_with` is sent with each heartbeat, the
    first one at once when the task's lease is the shorter.
    """

    __slots__ = (
        "context",
        "done",
        "extend_with",
        "job",
        "lease_seconds",
        "leased_at",
        "next_extend",
        "progress_sent",
        "progress_sent_at",
        "started_at",
        "task",
    )

    def __init__(self, job: wire.LeasedJob, task: Task[..., Any], now: float) -> None:
        self.job = job
        self.task = task
        self.context = context_of(job)
        self.leased_at = now  #: time.monotonic() when the lease came back
        self.started_at: float | None = None  #: set by the pool when the run begins
        self.lease_seconds = job.timeout  #: the lease's length, once extended
        self.extend_with: float | None = None  #: lease seconds each extend asks for
        #: heartbeat at a third of the lease
        self.next_extend = now + job.timeout * HEARTBEAT_FRACTION
        own = task.timeout
        if own is not None and own != job.timeout == BROKER_DEFAULT_LEASE:
            self.lease_seconds = self.extend_with = own
            if own < job.timeout:
                self.next_extend = now
        self.done = False  #: an outcome was taken; later ones are ignored
        self.progress_sent: object = None  #: the context's Progress last sent
        self.progress_sent_at = -1e9  #: time.monotonic() it was sent

    def run(self, run_async: RunAsync) -> Outcome:
        """Run the task in the calling thread, marking when it began."""
        self.started_at = time.monotonic()
        job = self.job
        try:
            return execute(self.task, job.args, job.kwargs, run_async, self.context)
        except Exception as exc:  # a gap in `execute`: the slot must live on regardless
            return Outcome(
                ok=False, error=f"WorkerError: {describe(exc)}"[:MAX_ERROR_CHARS]
            )

    def __repr__(self) -> str:
        return f"<Execution {self.task.name} {self.job.id} attempt={self.job.attempt}>"
