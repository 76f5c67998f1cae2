"""What follows from the store's transitions: metrics, wake-ups, the reaper's schedule.

Every write verb of the store returns `Changes` (the transitions it made, when the
reaper must next look, the final records it read); the handler or the reaper hands
them to `Effects.apply` once the write is durable. This is the one place that knows
what a job becoming ready, leased or final sets off, and where later hooks subscribe
(a finished job releases its workflow's children, a dashboard stream, a NOTIFY).

  to_state     counted in                          wakes
  new job      qbroker_jobs_enqueued_total         lease long-polls of its queue
  queued       (reaper: qbroker_reaped_total)      lease long-polls of its queue
  active       qbroker_jobs_leased_total           -
  final        qbroker_jobs_finished_total         result long-polls of the job
  scheduled    ..._finished_total (a retry, from active only)
  deleted      (reaper: qbroker_reaped_total)      -
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable

import structlog
from qclient.wire import FINAL_STATES, JobState

from qbroker import metrics
from qbroker.store import Changes
from qbroker.waiters import Waiters

log = structlog.get_logger("qbroker.reaper")
_SCHEDULED, _QUEUED, _ACTIVE = JobState.SCHEDULED, JobState.QUEUED, JobState.ACTIVE
_DEAD, _EXPIRED = JobState.DEAD, JobState.EXPIRED
_FINAL_STATES: frozenset[JobState | None] = frozenset(FINAL_STATES)
_NEVER = float("inf")
_Shape = tuple[str, JobState | None, JobState | None]
_SHAPE = operator.itemgetter(1, 2, 3)  #: a transition's (queue, from, to)


class Effects:
    """Applies Changes. Not thread-safe: the trio thread only."""

    def __init__(
        self,
        queue_waiters: Waiters,
        job_waiters: Waiters,
        poke_reaper: Callable[[float], None],
    ) -> None:
        self.queue_waiters = queue_waiters
        self.job_waiters = job_waiters
        self.poke_reaper = poke_reaper
        #: queues whose parked leases limits held back: a job leaving `active` there
        #: may free a concurrency slot, so it wakes them
        self.held: set[str] = set()

    def apply(self, changes: Changes, *, swept: bool = False) -> None:
        """Count, wake and schedule what `changes` calls for (see the module table).

        Args:
            swept: the reaper's changes: also counted by outcome, and a queue that got
                ready jobs wakes all its lease long-polls (a sweep may ready many).
        """
        if changes.transitions:
            self._transitions(changes, swept)
        if changes.due != _NEVER:
            self.poke_reaper(changes.due)

    def _transitions(self, changes: Changes, swept: bool) -> None:
        trans = changes.transitions
        # (queue, from, to) -> jobs; a batch's, which has one per job, counted in C
        counts: dict[_Shape, int] = (
            {_SHAPE(trans[0]): 1} if len(trans) == 1 else Counter(map(_SHAPE, trans))
        )
        ready: dict[str, int] | None = None  #: queue -> jobs made ready, less leased
        finished = False
        for (queue, old, new), n in counts.items():
            if old is None:
                metrics.jobs_enqueued(queue).inc(n)
            elif old is _QUEUED:
                ready = ready or {}
                ready[queue] = ready.get(queue, 0) - n
            if new is _QUEUED:
                ready = ready or {}
                ready[queue] = ready.get(queue, 0) + n
            elif new is _ACTIVE:
                metrics.jobs_leased(queue).inc(n)
            elif new in _FINAL_STATES or (new is _SCHEDULED and old is _ACTIVE):
                assert new is not None  # final, or a retry
                finished = finished or new is not _SCHEDULED
                metrics.jobs_finished(queue, new).inc(n)
        if finished:
            records = changes.records
            notify = self.job_waiters.notify
            for job, _, _, new in trans:
                if new in _FINAL_STATES:
                    notify(job, value=records.get(job))
        if ready:
            for queue, n in ready.items():
                if n > 0:
                    self.queue_waiters.notify(queue, None if swept else n)
        if self.held:
            self._wake_held(counts)
        if swept:
            _count_sweep(counts)

    def _wake_held(self, counts: dict[_Shape, int]) -> None:
        # a task's or a limit_key's jobs may be in any queue: wake every held one
        if any(old is _ACTIVE for _, old, _ in counts):
            for queue in self.held:
                self.queue_waiters.notify(queue)
            self.held.clear()


def _count_sweep(counts: dict[_Shape, int]) -> None:
    """qbroker_reaped_total by outcome, and a log line when leases or jobs ran out."""
    outcomes = dict.fromkeys(("promoted", "requeued", "dead", "expired", "purged"), 0)
    for (_, old, new), n in counts.items():
        if new is _QUEUED:
            outcomes["promoted" if old is _SCHEDULED else "requeued"] += n
        elif new is _DEAD:
            outcomes["dead"] += n
        elif new is _EXPIRED:
            outcomes["expired"] += n
        elif new is None:
            outcomes["purged"] += n
    for outcome, n in outcomes.items():
        if n:
            metrics.REAPED.labels(outcome).inc(n)
    if outcomes["requeued"] or outcomes["dead"] or outcomes["expired"]:
        log.info("reaper.swept", requeued=outcomes["requeued"], dead=outcomes["dead"],
                 expired=outcomes["expired"])  # fmt: skip
