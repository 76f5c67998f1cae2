"""The `@task` decorator, the `Task` it makes, and the exceptions tasks raise.

A `Task` is a plain function plus the options the worker and the broker need: its name
(what jobs carry in `task`), its queue, its retry policy, its lease length and its hard
time limit. Decorating registers it in the default registry, so importing a module of
tasks is all a worker needs to find them.

Retry policy (the one rule, also in docs/worker.md):

- An exception whose type is in `retry_for` (default: `(Exception,)`, every ordinary
  exception) and not in `dont_retry_for` retries the job while attempts are left
  (`attempt <= max_retries`, the job's own and the task's, when it declares one), after
  `backoff(attempt)` seconds. Any other exception fails the job at once.
- Arguments that do not bind to the function's signature (`InvalidArguments`) and a
  run over its `time_limit` (`TimeLimitExceeded`) would fail the same way again: they
  retry only when `retry_for` names their class itself (or, for a time limit,
  `retry_on_timeout=True`), never through a base class such as `Exception`.
- `raise Retry(delay=...)` always retries while attempts are left, whatever `retry_for` says,
  after `delay` seconds (or the backoff when `delay` is None).
- With no attempts left, the job ends `failed` with the last error and traceback.
"""

from __future__ import annotations

import functools
import inspect
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, Unpack, overload

from qclient.rates import Rate, parse_rate
from qclient.wire import NAME_PATTERN

if TYPE_CHECKING:
    import qclient

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_MAX",
    "InvalidArguments",
    "Retry",
    "Task",
    "TimeLimitExceeded",
    "backoff_delay",
    "task",
]

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_BACKOFF_BASE = 1.0  #: seconds before the first retry when retry_backoff=True
DEFAULT_BACKOFF_MAX = 600.0  #: seconds; no retry waits longer than this
_MAX_EXPONENT = (
    60  #: 2**60 already dwarfs any cap; avoids float overflow at attempt 1000
)

_NAME_RE = re.compile(NAME_PATTERN)


class Retry(Exception):
    """Raise inside a task to retry the job on purpose.

    The job is retried while attempts are left, whatever the task's `retry_for` says;
    with none left it ends `failed`. Chain the cause (`raise Retry(delay=5) from exc`) to
    keep it in the traceback.

    Args:
        delay: seconds until the retry; None uses the task's backoff for this attempt.
        reason: a short text stored as the job's error.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and not 0 <= delay < math.inf:
            raise ValueError("Retry delay must be a finite number of seconds >= 0")
        self.delay = delay
        self.reason = reason
        super().__init__(
            reason or ("retry requested" if delay is None else f"retry in {delay:g} s")
        )


class TimeLimitExceeded(Exception):
    """The task ran longer than its `time_limit` and was stopped (or, in a thread, abandoned)."""


class InvalidArguments(TypeError):
    """The job's arguments do not bind to the task's signature (checked with
    `inspect.Signature.bind` before the call, so a TypeError the task raises itself
    is not mistaken for one)."""


#: Failures that the same job would meet again: retried only when asked by name.
_RETRIED_ONLY_BY_NAME = (InvalidArguments, TimeLimitExceeded)


class TooManyAttempts(Exception):
    """The job came back (a lease ran out) more often than the task's `max_retries`
    allows; it fails without running."""


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    jitter: bool,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retrying after failed attempt number `attempt` (1-based).

    Exponential, `base * 2**(attempt-1)` capped at `cap`; with `jitter`, a uniform draw
    from `[0, that]` ("full jitter", AWS architecture blog, "Exponential Backoff And
    Jitter"), so many jobs failing together do not retry together.

    Args:
        attempt: the attempt that just failed, 1 for the first delivery.
        base: seconds for the first retry; 0 or less means retry at once.
        cap: the largest delay in seconds.
        jitter: draw uniformly below the exponential delay.
        rng: the random source (tests pass a seeded one).

    Returns:
        The delay in seconds, between 0 and `cap`.
    """
    if base <= 0:
        return 0.0
    exponent = min(max(attempt - 1, 0), _MAX_EXPONENT)
    delay = min(cap, base * 2.0**exponent)
    if jitter:
        delay = (rng or random).uniform(0.0, delay)
    return delay


def _one_of(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    """An option given under our name or Celery's (`alias`), not both."""
    if value is not None and alias_value is not None:
        raise ValueError(f"give {name} or {alias} (Celery's name for it), not both")
    if value is not None:
        return value
    return alias_value if alias_value is not None else default


class Task(Generic[P, R]):
    """A function the worker can run, with its options. Made by `@task`; do not build by hand.

    Calling the task runs the function here and now; `delay()` and `send()` enqueue a job
    for a worker instead.

    Attributes:
        fn: the decorated function (sync or `async def`).
        name: the task name jobs carry; the registry key.
        queue: the queue `delay()`/`send()` enqueue to and a worker consumes by default.
        max_retries: the most retries after the first attempt for any job of this
            task, however it was sent (a job's own `max_retries` may lower it); sent
            with each job by `delay()`/`send()`. None: the job's own (the broker's
            default is 3).
        retry_backoff: base seconds of the exponential backoff (0: retry at once).
        retry_backoff_max: the largest backoff in seconds.
        retry_jitter: use full jitter on the backoff.
        retry_for: exception types that retry automatically.
        dont_retry_for: exception types that never retry, though `retry_for` names
            a base class of theirs.
        rate_limit: the task's global rate (`qclient.rates.Rate`), or None.
        concurrency: the most of its jobs active at once across all workers, or None.
        retry_on_timeout: a run over `time_limit` retries (as `retry_for` allows).
        timeout: lease seconds sent with each job (None: the broker's default, 30 s),
            and applied by the worker to a job sent without one.
        time_limit: hard limit in seconds on one run (None: no limit).
    """

    __name__: str  # copied from the function, with its __doc__ and __module__
    __qualname__: str

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int | None = None,
        retry_for: Sequence[type[BaseException]] | None = None,
        dont_retry_for: Sequence[type[BaseException]] | None = None,
        backoff: bool | float | None = None,
        backoff_max: float | None = None,
        jitter: bool | None = None,
        timeout: float | None = None,
        time_limit: float | None = None,
        retry_on_timeout: bool = False,
        rate_limit: str | None = None,
        concurrency: int | None = None,
        autoretry_for: Sequence[type[BaseException]] | None = None,
        dont_autoretry_for: Sequence[type[BaseException]] | None = None,
        retry_backoff: bool | float | None = None,
        retry_backoff_max: float | None = None,
        retry_jitter: bool | None = None,
    ) -> None:
        retry_for = _one_of(
            "retry_for", retry_for, "autoretry_for", autoretry_for, (Exception,)
        )
        dont_retry_for = _one_of(
            "dont_retry_for",
            dont_retry_for,
            "dont_autoretry_for",
            dont_autoretry_for,
            (),
        )
        backoff = _one_of("backoff", backoff, "retry_backoff", retry_backoff, True)
        backoff_max = _one_of(
            "backoff_max",
            backoff_max,
            "retry_backoff_max",
            retry_backoff_max,
            DEFAULT_BACKOFF_MAX,
        )
        jitter = _one_of("jitter", jitter, "retry_jitter", retry_jitter, True)
        self.fn = fn
        self.name = name if name is not None else fn.__name__
        self.queue = queue if queue is not None else self.name
        for what, value in (("name", self.name), ("queue", self.queue)):
            if not _NAME_RE.match(value):
                raise ValueError(f"task {what} {value!r} does not match {NAME_PATTERN}")
        if max_retries is not None and not 0 <= max_retries <= 1000:
            raise ValueError("max_retries must be between 0 and 1000")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout (lease seconds) must be > 0")
        if time_limit is not None and time_limit <= 0:
            raise ValueError("time_limit must be > 0 seconds")
        if concurrency is not None and not 1 <= concurrency <= 1_000_000:
            raise ValueError("concurrency must be between 1 and 1,000,000")
        self.max_retries = max_retries
        if backoff is True:
            self.retry_backoff = DEFAULT_BACKOFF_BASE
        else:
            self.retry_backoff = float(backoff)  # False -> 0.0: retry at once
        self.retry_backoff_max = float(backoff_max)
        self.retry_jitter = bool(jitter)
        self.retry_for: tuple[type[BaseException], ...] = tuple(retry_for)
        self.dont_retry_for: tuple[type[BaseException], ...] = tuple(dont_retry_for)
        self.rate_limit: Rate | None = (
            None if rate_limit is None else parse_rate(rate_limit)
        )
        self.concurrency = concurrency
        self.timeout = timeout
        self.time_limit = time_limit
        self.retry_on_timeout = retry_on_timeout
        self.is_async = inspect.iscoroutinefunction(fn)
        self._signature: inspect.Signature | None = None
        self._signature_known = False
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function in this process, now (no broker involved)."""
        return self.fn(*args, **kwargs)

    def should_retry(self, exc: BaseException) -> bool:
        """True if `exc` asks for a retry: a `Retry`, or an instance of `retry_for`
        and not of `dont_retry_for`.

        `InvalidArguments` and `TimeLimitExceeded` retry only when `retry_for` names
        their class itself (a time limit also with `retry_on_timeout`).
        """
        if isinstance(exc, Retry):
            return True
        if self.dont_retry_for and isinstance(exc, self.dont_retry_for):
            return False
        for special in _RETRIED_ONLY_BY_NAME:
            if isinstance(exc, special):
                asked = special in self.retry_for
                if special is TimeLimitExceeded:
                    asked = asked or self.retry_on_timeout
                return asked
        return isinstance(exc, Exception) and isinstance(exc, self.retry_for)

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Check that a job's arguments bind to the function's signature.

        Raises:
            InvalidArguments: they do not; the message names the task and why.
        """
        if not self._signature_known:
            try:
                self._signature = inspect.signature(self.fn)
            except (TypeError, ValueError):  # a builtin without one: let the call say
                self._signature = None
            self._signature_known = True
        if self._signature is None:
            return
        signature = self._signature
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            why = str(exc)
            params = signature.parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                # bind names a missing argument first; a misspelt one says more
                unknown = [repr(k) for k in kwargs if k not in params]
                if unknown and "unexpected" not in why:
                    why = f"unexpected keyword argument {', '.join(unknown)}; {why}"
            raise InvalidArguments(
                f"the job's arguments do not fit {self.name}{_bare(signature)}: {why}"
            ) from None

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before the retry that follows failed attempt `attempt`."""
        return backoff_delay(
            attempt,
            base=self.retry_backoff,
            cap=self.retry_backoff_max,
            jitter=self.retry_jitter,
        )

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> qclient.Job:
        """Enqueue a job that calls this task with these arguments (Celery's `delay`).

        Returns:
            The `qclient.Job` handle; `job.result(timeout)` waits for the outcome.

        Raises:
            qclient.BrokerError, qclient.ProtocolError: as `qclient.send` does.
        """
        return self.send(args=list(args), kwargs=dict(kwargs))

    def send(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        client: qclient.Client | None = None,
        **options: Unpack[qclient.JobOptions],
    ) -> qclient.Job:
        """Enqueue a job for this task with options (Celery's `apply_async`).

        The job goes to `self.queue` with `task=self.name`; `max_retries` and `timeout`
        default to the task's own options.

        Args:
            args: positional arguments for the function.
            kwargs: keyword arguments for the function.
            client: the `qclient.Client` to use; default: qclient's module-level one.
            **options: `delay`, `eta`, `expires`, `priority`, `job_id`,
                `max_retries`, `timeout`, `result_ttl`, `headers`, `dedup_key`: the
                options of `qclient.send` (`qclient.JobOptions`). The task's own
                `max_retries`, when it declares one, still bounds the job's.

        Returns:
            The `qclient.Job` handle.

        Raises:
            qclient.BrokerError, qclient.ProtocolError: as `qclient.send` does.
            TypeError, ValueError: an unknown option or a naive datetime, as
                `qclient.send` does.
        """
        import qclient  # here, so that importing tasks never needs a broker or the client

        if options.get("max_retries") is None:
            options["max_retries"] = self.max_retries
        if options.get("timeout") is None:
            options["timeout"] = self.timeout
        send = client.send if client is not None else qclient.send
        return send(self.queue, task=self.name, args=args, kwargs=kwargs, **options)


def _bare(signature: inspect.Signature) -> inspect.Signature:
    """`signature` without annotations: what a sender needs to see, and short."""
    empty = inspect.Parameter.empty
    params = [p.replace(annotation=empty) for p in signature.parameters.values()]
    return signature.replace(parameters=params, return_annotation=empty)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str | None = None,
    max_retries: int | None = None,
    retry_for: Sequence[type[BaseException]] | None = None,
    dont_retry_for: Sequence[type[BaseException]] | None = None,
    backoff: bool | float | None = None,
    backoff_max: float | None = None,
    jitter: bool | None = None,
    timeout: float | None = None,
    time_limit: float | None = None,
    retry_on_timeout: bool = False,
    rate_limit: str | None = None,
    concurrency: int | None = None,
    autoretry_for: Sequence[type[BaseException]] | None = None,
    dont_autoretry_for: Sequence[type[BaseException]] | None = None,
    retry_backoff: bool | float | None = None,
    retry_backoff_max: float | None = None,
    retry_jitter: bool | None = None,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    max_retries: int | None = None,
    retry_for: Sequence[type[BaseException]] | None = None,
    dont_retry_for: Sequence[type[BaseException]] | None = None,
    backoff: bool | float | None = None,
    backoff_max: float | None = None,
    jitter: bool | None = None,
    timeout: float | None = None,
    time_limit: float | None = None,
    retry_on_timeout: bool = False,
    rate_limit: str | None = None,
    concurrency: int | None = None,
    autoretry_for: Sequence[type[BaseException]] | None = None,
    dont_autoretry_for: Sequence[type[BaseException]] | None = None,
    retry_backoff: bool | float | None = None,
    retry_backoff_max: float | None = None,
    retry_jitter: bool | None = None,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Make a function a task and register it, bare (`@task`) or with options.

    Args:
        fn: the function, when used bare.
        name: the task name jobs carry; default: the function's `__name__`.
        queue: the queue `delay()`/`send()` use; default: the task name.
        max_retries: the most retries after the first attempt (0..1000) for any job
            of this task, however it was sent (`delay()`, `send()`, `qclient.send`);
            default: the job's own, which is the broker's default (3) unless the
            producer set one.
        retry_for: exception types that retry automatically (Celery:
            `autoretry_for`); default `(Exception,)`, so every ordinary exception
            retries while attempts are left. Pass `()` to retry only on
            `raise Retry(...)`. Arguments that do not fit the function
            (`InvalidArguments`) and `TimeLimitExceeded` retry only when named here.
        dont_retry_for: exception types that never retry, even when a base class of
            theirs is in `retry_for` (Celery: `dont_autoretry_for`).
        backoff: True for exponential backoff from 1 s, a float for another base in
            seconds, False to retry at once (Celery: `retry_backoff`).
        backoff_max: the largest backoff, seconds; default 600 (Celery:
            `retry_backoff_max`).
        jitter: full jitter on the backoff; default True (Celery: `retry_jitter`).
        timeout: lease seconds sent with each job by `delay()`/`send()`; the worker
            applies it to a job sent without one (`qclient.send` by name, which gets
            the broker's 30 s); it heartbeats at a third of it, so it bounds how soon
            a dead worker's job comes back, not how long it may run.
        time_limit: hard limit on one run, seconds; over it the run is stopped and fails
            with `TimeLimitExceeded`, not retried unless `retry_on_timeout`.
        retry_on_timeout: retry a run stopped by `time_limit` (while attempts are left).
        rate_limit: the task's global rate across all workers, Celery's way ("10/s",
            "100/m", "1000/h"): the broker starts no more of its jobs than that.
        concurrency: the most of its jobs active at once across all workers.
            Both are the broker's limit `task:<name>`, set when a worker starts.
        autoretry_for, dont_autoretry_for, retry_backoff, retry_backoff_max,
            retry_jitter: Celery's names for the options above; give one name each.

    Returns:
        The `Task` (bare use), or a decorator that makes one.

    Raises:
        ValueError: an invalid option (an unknown rate string, an option given under
            both names), or another task already has this name.
    """
    from qworker.registry import default_registry

    def decorate(f: Callable[P, R]) -> Task[P, R]:
        t = Task(
            f,
            name=name,
            queue=queue,
            max_retries=max_retries,
            retry_for=retry_for,
            dont_retry_for=dont_retry_for,
            backoff=backoff,
            backoff_max=backoff_max,
            jitter=jitter,
            timeout=timeout,
            time_limit=time_limit,
            retry_on_timeout=retry_on_timeout,
            rate_limit=rate_limit,
            concurrency=concurrency,
            autoretry_for=autoretry_for,
            dont_autoretry_for=dont_autoretry_for,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=retry_jitter,
        )
        default_registry.register(t)
        return t

    if fn is not None:
        return decorate(fn)
    return decorate
