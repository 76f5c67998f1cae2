"""The slot book: what a worker holds, and what it should do next. Sans-IO.

Theory of operation. The book is the state a worker's threads share (the executions
leased and not settled, the outcomes waiting to be reported, what the lease thread is
doing, whether the broker answers) and every decision made from it: how many jobs the
next lease asks for, which outcomes ride along with it and how long it may wait, when
the next heartbeat, time limit or prefetch hold is due, which executions are over their
time limit. It does no I/O, starts no thread, takes no lock and reads no clock: callers
pass `now` (time.monotonic()) and hold the worker's lock around every call, so the
book's tests need no threads (h11's `Connection` is the model). The loops in
`_lease.py`, `_reporter.py` and `_upkeep.py` are the shells that wait and talk.

- **How many to lease** (`room`): the free slots, plus with `prefetch` as many held jobs
  as the slots are expected to start within PREFETCH_HOLD (`prefetch_allowance`); with
  every slot busy, only once half of that allowance is free, so a lease brings a batch;
  none while the pool is stalled (no child process can start).
- **Carrying outcomes**: the outcomes settled while the lease thread waits ride along in
  its next lease, which the broker commits before it leases or waits: a busy worker
  makes one request per job. When jobs trickle in and runs are short (SHORT_RUN), the
  lease thread waits a moment (`carry_moment`) for the outcomes of the jobs it just
  handed out, or for the slots about to free up, instead of a request each. A lease
  that carries outcomes long-polls at most CARRY_POLL (and never past a retry it
  carries), so their `job.finished` lines leave when the broker took them.
- **Reporting the rest** (`plan_report`): outcomes the lease thread will not carry soon
  go in batches of their own; whatever piles up while a batch is in flight goes next.
- **Upkeep** (`next_due`): heartbeats at a third of each lease, time limits, prefetched
  jobs held too long, and a run in the lease thread itself that lasts (`take_over`).

An execution is settled exactly once (`Execution.done`): by its outcome (`settle`), its
time limit, a cancel or lost lease, or shutdown (`unsettle`); a late outcome of a
stopped execution is dropped, so a delivery is never reported twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from qclient.wire import LeasedJob

from qworker._execute import (
    HEARTBEAT_FRACTION,
    Execution,
    Outcome,
    failure,
    moving_mean,
)
from qworker._reports import Report, make_report
from qworker._task import Task, TimeLimitExceeded, TooManyAttempts
from qworker.registry import NotRegistered, Registry

__all__ = [
    "CARRY_POLL",
    "CARRY_WAIT",
    "IDLE_TICK",
    "INLINE_LIMIT",
    "MAX_BATCH",
    "PREFETCH_HOLD",
    "SHORT_RUN",
    "Admission",
    "LeasePlan",
    "SlotBook",
    "prefetch_allowance",
    "runnable",
]

MAX_BATCH = 1000  #: items in one ack_many/fail_many request
CARRY_WAIT = 0.02  #: seconds an outcome may wait for a lease in flight to carry it
CARRY_POLL = 0.05  #: seconds a lease carrying outcomes may long-poll
SHORT_RUN = 0.005  #: seconds: runs this short get their outcome carried by the lease
INLINE_LIMIT = 0.02  #: seconds a run in the lease thread may last before another leases
IDLE_TICK = 1.0  #: seconds upkeep sleeps at most when nothing is due
START_POLL = 0.02  #: seconds between looks at whether a time-limited task has started
PREFETCH_HOLD = 1.0  #: seconds a prefetched job may wait here for a slot
PROGRESS_EVERY = 1.0  #: seconds: a job's progress goes to the broker at most this often


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


def runnable(registry: Registry, job: LeasedJob) -> Task[..., Any]:
    """The task to run `job` with.

    Raises:
        NotRegistered: no such task here.
        TooManyAttempts: an earlier delivery's lease ran out, and the job's own bound
            (the broker's) is looser than the task's `max_retries`.
    """
    t = registry.get(job.task)
    if t.max_retries is not None and job.attempt > t.max_retries + 1:
        raise TooManyAttempts(
            f"attempt {job.attempt}, but the task allows"
            f" {t.max_retries + 1} (max_retries={t.max_retries})"
        )
    return t


@dataclass(slots=True, frozen=True)
class LeasePlan:
    """The lease request to send now."""

    batch: list[Report]  #: outcomes to carry
    wait: float  #: seconds the broker may long-poll
    idle: bool  #: nothing ran, waited or was being reported when it was planned


@dataclass(slots=True)
class Admission:
    """What became of the jobs a lease brought."""

    to_run: list[Execution]  #: for the pool
    inline: Execution | None  #: for the lease thread to run itself
    due_lowered: bool  #: upkeep is due sooner than it was told


class SlotBook:
    """The shared state of one worker and the decisions made from it. Not
    thread-safe: the worker holds its lock around every call.

    Args:
        concurrency: slots, jobs run at once.
        prefetch: jobs it may hold beyond its slots while runs are short.
        burst: the worker drains and exits (leases never long-poll).
        stalled: whether the pool can start no job now (no child process starts).
        inline_pool: the pool runs tasks in threads of this process, so the lease
            thread may run a quick one itself.
    """

    def __init__(
        self,
        concurrency: int,
        *,
        prefetch: int = 0,
        burst: bool = False,
        stalled: Callable[[], bool] = lambda: False,
        inline_pool: bool = False,
    ) -> None:
        self.concurrency = concurrency
        self.prefetch = prefetch
        self.burst = burst
        self.stalled = stalled
        self.inline_pool = inline_pool
        self.running: dict[str, Execution] = {}  #: leased, not settled
        self.results: list[Report] = []  #: settled, not yet sent
        self.reporting = False  #: a batch of reports is in flight
        self.lease_parked = False  #: the lease thread waits, to carry reports along
        self.lease_in_flight = False  #: a lease request is out
        self.backlog = False  #: more were ready than the last lease got
        self.stopping = False  #: no more leases
        self.stop_reporting = False  #: the reporter ends once results are out
        self.broker_ok = True
        self.reconnects = 0  #: times the broker was seen back after being unreachable
        self.mean_run: float | None = None  #: moving mean of runs, start to outcome
        self.due = 0.0  #: no heartbeat, time limit or hold ends before this
        self.inline: Execution | None = None  #: run by the lease thread itself
        self.lease_gen = 0  #: the lease thread's number; a replaced one ends

    # ------------------------------------------------------------ leasing

    def room(self, now: float) -> int:
        """How many jobs the next lease asks for; 0: not yet."""
        allowance = 0
        if self.prefetch and (self.backlog or len(self.running) < self.concurrency):
            # Slots take jobs in lease order, so the runs going on are among the
            # first `concurrency` entries: no need to look at the held ones.
            first = itertools.islice(self.running.values(), self.concurrency)
            started = [ex.started_at for ex in first if ex.started_at is not None]
            longest = now - min(started, default=now)
            allowance = prefetch_allowance(
                self.prefetch, self.concurrency, self.mean_run, longest
            )
        free = self.concurrency + allowance - len(self.running)
        if self.stalled():
            return 0  # no child can start a job: lease none to hold here
        return free if free >= max(1, allowance // 2) else 0

    def carry_moment(self) -> float | None:
        """How long the lease thread may wait for outcomes to carry, when runs are
        short (twice the mean run, at most CARRY_WAIT); None: do not wait."""
        mean = self.mean_run
        if mean is None or mean >= SHORT_RUN:
            return None
        return min(CARRY_WAIT, 2 * mean + 0.001)

    def should_gather(self, free: int) -> bool:
        """Whether a lease for `free` slots should first wait for the slots about to
        free up: more jobs are ready and every slot would take one."""
        return self.backlog and not self.prefetch and free < self.concurrency

    def awaits_outcome(self) -> bool:
        """Whether jobs just handed out may still bring an outcome to carry."""
        return not self.stopping and bool(self.running) and not self.results

    def about_to_free(self, now: float, moment: float) -> bool:
        """Whether a run began less than `moment` ago (or not yet): its slot may free
        up within the moment."""
        return any(
            ex.started_at is None or now - ex.started_at < moment
            for ex in self.running.values()
        )

    def plan_lease(self, carry: bool, lease_wait: float) -> LeasePlan | None:
        """The lease to send now, the outcomes it carries taken off the book; None
        once stopping."""
        self.lease_parked = False
        if self.stopping:
            return None
        # Long-poll only for a free slot: a job for the prefetch allowance alone must
        # be ready now, or it could arrive after a long run began.
        waits = not self.burst and len(self.running) < self.concurrency
        idle = not (self.running or self.results or self.reporting)
        batch: list[Report] = []
        if carry and self.broker_ok and self.results:
            batch = self.results[:MAX_BATCH]
            del self.results[:MAX_BATCH]
        wait = lease_wait if waits else 0.0
        if batch:
            # its outcomes' lines leave with the reply: not up to lease_wait later,
            # and never after a retry they carry could have run elsewhere
            retries = [r.retry_in for r in batch if r.retry_in is not None]
            wait = min(wait, CARRY_POLL, *retries)
        self.lease_in_flight = True
        return LeasePlan(batch, wait, idle)

    def lease_failed(self, batch: Sequence[Report]) -> None:
        """The lease request failed: its outcomes go back to the front."""
        self.lease_in_flight = self.backlog = False
        self.results[:0] = batch

    def admit(
        self,
        jobs: Sequence[LeasedJob],
        now: float,
        resolve: Callable[[LeasedJob], Task[..., Any]],
        *,
        inline_ok: bool = False,
    ) -> Admission | None:
        """Take the jobs a lease brought: each becomes a running execution, or, when
        no task here can run it, a failure to report at once. None when stopping:
        the caller hands them all back.

        With `inline_ok` (the lease drained the queue, so the lease thread would only
        wait for their outcomes next), a threads pool and short runs, the last job is
        the lease thread's to run itself: the two thread hand-offs of a round trip are
        most of what a quick task costs a worker. Not a task with a `time_limit`, nor
        an `async def` one.
        """
        if self.stopping:
            return None
        to_run: list[Execution] = []
        for job in jobs:
            try:
                t = resolve(job)
            except (NotRegistered, TooManyAttempts) as exc:
                outcome = failure(exc, retry=False, with_traceback=False)
                self.results.append(make_report(job, outcome, None, now))
                continue
            ex = Execution(job, t, now)
            self.running[job.id] = ex
            to_run.append(ex)
        inline: Execution | None = None
        mean = self.mean_run
        last = to_run[-1] if to_run else None
        if (
            inline_ok
            and self.inline_pool
            and last is not None
            and mean is not None
            and mean < SHORT_RUN
            and last.task.time_limit is None
            and not last.task.is_async
        ):
            inline = self.inline = to_run.pop()
            # its outcome, and those settled meanwhile, ride on the next lease
            self.lease_in_flight, self.lease_parked = False, True
        was = self.due
        for ex in itertools.chain(to_run, (inline,) if inline else ()):
            self.due = min(self.due, self.due_of(ex, now))
        return Admission(to_run, inline, self.due < was)

    def inline_done(self, ex: Execution, gen: int) -> bool:
        """The lease thread ran `ex` itself. Returns whether it still leases (False:
        it ran too long and another lease thread took over)."""
        if self.inline is ex:
            self.inline = None
        return gen == self.lease_gen

    def take_over(self, now: float) -> Execution | None:
        """The run the lease thread does itself has lasted INLINE_LIMIT: another lease
        thread takes over (`lease_gen` is its number). Returns that run, or None."""
        ex = self.inline
        if ex is None or self.stopping or now < ex.leased_at + INLINE_LIMIT:
            return None
        self.inline = None
        self.lease_gen += 1
        return ex

    # ------------------------------------------------------------ settling

    def settle(self, ex: Execution, outcome: Outcome, now: float) -> bool:
        """A run's outcome. Returns whether the waiting threads should be woken: it
        changes what they wait for (the first outcome to report, room for the lease
        thread, no run left). A prefetching worker would otherwise wake both for
        every job."""
        if ex.done:
            return False  # stopped before (time limit, cancel, shutdown): settled
        ex.done = True
        self.running.pop(ex.job.id, None)
        first = not self.results
        self.results.append(make_report(ex.job, outcome, ex.task, now))
        if ex.started_at is not None:
            self.mean_run = moving_mean(self.mean_run, now - ex.started_at)
        return (
            first
            or not self.running
            or self.burst
            or self.stopping
            or (not self.lease_in_flight and bool(self.room(now)))
        )

    def unsettle(self, executions: Sequence[Execution]) -> list[Execution]:
        """Settle executions with no outcome to report. Returns the ones not settled
        before."""
        taken = []
        for ex in executions:
            if not ex.done:
                ex.done = True
                self.running.pop(ex.job.id, None)
                taken.append(ex)
        return taken

    def over_time_limit(self, now: float) -> list[Execution]:
        """Settle the runs over their task's `time_limit` as failed
        (`TimeLimitExceeded`). Returns them, for the pool to stop."""
        over: list[Execution] = []
        for ex in list(self.running.values()):
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
            del self.running[ex.job.id]
            self.results.append(make_report(ex.job, outcome, ex.task, now))
            over.append(ex)
        return over

    # ------------------------------------------------------------ upkeep

    def due_of(self, ex: Execution, now: float) -> float:
        """When `ex` next needs upkeep."""
        due = ex.next_extend
        start = ex.started_at
        if self.prefetch and start is None:
            due = min(due, ex.leased_at + PREFETCH_HOLD)
        if ex is self.inline:
            due = min(due, ex.leased_at + INLINE_LIMIT)
        limit = ex.task.time_limit
        if limit is not None:
            # Not started yet: the pool sets started_at in a moment; look again soon
            # rather than sleep past the limit.
            due = min(due, now + START_POLL if start is None else start + limit)
        return due

    def next_due(self, now: float) -> float:
        """When the next heartbeat, time limit or hold ends, or in IDLE_TICK at the
        latest. Kept as `due` after each upkeep: executions that end only make it
        early, new ones lower it (`admit`)."""
        due = now + IDLE_TICK
        for ex in self.running.values():
            due = min(due, self.due_of(ex, now))
        return due

    def heartbeats_due(self, now: float) -> list[Execution]:
        """The running executions whose lease should be extended now: a third of
        the way through it, or early to carry progress the task reported (at most
        every PROGRESS_EVERY seconds)."""
        return [
            ex
            for ex in self.running.values()
            if ex.next_extend <= now
            or (
                ex.context.last_progress is not ex.progress_sent
                and now >= ex.progress_sent_at + PROGRESS_EVERY
            )
        ]

    @staticmethod
    def extended(ex: Execution, now: float) -> None:
        """`ex`'s lease was extended at `now`: the next heartbeat is due at a third
        of the lease."""
        ex.next_extend = now + ex.lease_seconds * HEARTBEAT_FRACTION

    def prefetch_overdue(self, now: float) -> bool:
        """Whether a job held for prefetch has waited PREFETCH_HOLD for a slot."""
        if not self.prefetch:
            return False
        return any(
            ex.started_at is None and now - ex.leased_at >= PREFETCH_HOLD
            for ex in self.running.values()
        )

    # ------------------------------------------------------------ reporting

    def lease_carries_reports(self, now: float) -> bool:
        """Whether the lease thread will take the settled outcomes along with its next
        lease soon, so the reporter leaves them to it: it waits for room and there is
        some (or, while prefetching, soon will be), or its request in flight is likely
        to come back at once (the broker said more were ready than the last one got);
        for at most CARRY_WAIT."""
        if self.stopping or not self.broker_ok:
            return False
        fresh = now - self.results[0].settled_at < CARRY_WAIT
        if self.lease_parked:
            return bool(self.room(now)) or fresh
        return self.lease_in_flight and self.backlog and fresh

    def plan_report(
        self, now: float, report_after: float
    ) -> tuple[list[Report], float | None]:
        """The batch the reporter sends now (taken off the book), or none and when to
        look again (None: when woken). `report_after`: a failed batch's backoff."""
        if not self.results:
            return [], None
        if self.lease_carries_reports(now):  # look again when the lease's turn is over
            return [], self.results[0].settled_at + CARRY_WAIT
        if now < report_after:
            return [], report_after
        batch = self.results[:MAX_BATCH]
        del self.results[:MAX_BATCH]
        self.reporting = True
        return batch, None

    def reports_returned(self, unsent: Sequence[Report]) -> None:
        """A batch came back; `unsent` could not reach the broker: first in line."""
        self.reporting = False
        self.results[:0] = unsent

    # ------------------------------------------------------------ broker health

    def broker_seen(self, ok: bool) -> bool:
        """Whether the broker answered. Returns True when that changed."""
        changed = ok != self.broker_ok
        self.broker_ok = ok
        if changed and ok:
            self.reconnects += 1  # outcomes waiting out a backoff go now
        return changed
