"""Every Prometheus metric of the broker (prefix qbroker_, labels queue/state/route)."""

from __future__ import annotations

import copy
from collections.abc import Container, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from qbroker.config import METRICS_MAX_QUEUES

# `_created` series (a timestamp per series) doubled the text and its render time
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "qbroker_http_requests_total",
    "HTTP requests answered.",
    ["route", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "qbroker_request_seconds",
    "Seconds from a request's body to its reply (long-polls included).",
    ["route"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30),
)
COMMIT_BATCH = Histogram(
    "qbroker_commit_batch_size",
    "Store calls per group commit.",
    registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
CONNECTIONS = Gauge(
    "qbroker_connections", "Open client connections.", registry=REGISTRY
)
REAPED = Counter(
    "qbroker_reaped_total",
    "Jobs the reaper changed, by outcome.",
    ["outcome"],  # requeued, dead, expired, promoted, purged
    registry=REGISTRY,
)
SCHEDULE_TICKS = Counter(
    "qbroker_schedule_ticks_total",
    "Schedule ticks, by outcome.",
    ["outcome"],  # fired, skipped (catch_up), repeated (its job existed)
    registry=REGISTRY,
)

_request_children: dict[tuple[str, int], tuple[Any, Any]] = {}


def observe_request(route: str, status: int, seconds: float | None) -> None:
    """Count one reply; the labelled children are cached (labels() costs ~1 us each)."""
    children = _request_children.get((route, status))
    if children is None:
        children = (REQUESTS.labels(route, str(status)), REQUEST_SECONDS.labels(route))
        _request_children[(route, status)] = children
    children[0].inc()
    if seconds is not None:
        children[1].observe(seconds)


OTHER_QUEUES = "(other)"  #: the queue label of queues without series of their own
RENDER_ROWS = 250  #: queues per piece of /metrics text (about 0.5 ms each)
RENDER_SAMPLES = 64  #: samples per piece of the other families' text (about 1 ms)


class _Row(dict[str, int]):
    """One queue's job counts (or the sum of the queues under OTHER_QUEUES), by
    "enqueued", "leased" or a finished state; `seen`: the `QueueSeries` epoch it
    was last counted in."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0


class _Count:
    """`family(queue, ...).inc(n)`: prometheus_client's call shape, for the callers."""

    __slots__ = ("_key", "_row")

    def __init__(self, row: _Row, key: str) -> None:
        self._row = row
        self._key = key

    def inc(self, n: int = 1) -> None:
        self._row[self._key] = self._row.get(self._key, 0) + n


class QueueSeries:
    """The per-queue counters behind qbroker_jobs_{enqueued,leased,finished}_total.

    At most `cap` queues get series of their own, first come; jobs of any other queue
    are counted under queue="(other)". Once a queue holds no jobs, `prune` drops its
    series and its place goes to the next new queue (issue 21, item 6: 100,000 queue
    names made /metrics 130 MB). No counter ever goes down: past counts stay in
    "(other)", and a queue that gets a place starts its own series at 0 (a new series
    to Prometheus, as after a restart).

    Not thread-safe: count and render on the trio thread.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._rows: dict[str, _Row] = {}
        self._other = _Row()
        self._epoch = 0

    def row(self, queue: str) -> _Row:
        """The counts to add `queue`'s jobs to."""
        row = self._rows.get(queue)
        if row is None:
            if len(self._rows) >= self.cap:
                return self._other
            row = self._rows[queue] = _Row()
        row.seen = self._epoch
        return row

    def queues(self) -> list[str]:
        """The queues with series of their own."""
        return list(self._rows)

    def totals(self) -> dict[str, tuple[int, int]]:
        """Jobs enqueued and finished (retries not counted) so far, by queue with
        its own series: what the dashboard's rates are taken from."""
        return {
            queue: (
                row.get("enqueued", 0),
                sum(n for k, n in row.items() if k not in _NOT_STATES | {"scheduled"}),
            )
            for queue, row in self._rows.items()
        }

    def begin_prune(self) -> int:
        """Call before reading which queues hold jobs; pass the result to `prune`."""
        self._epoch += 1
        return self._epoch

    def prune(self, epoch: int, holding: Container[str]) -> int:
        """Drop the series of the queues not `holding` jobs (as read after
        `begin_prune` gave `epoch`) and not counted since; returns how many."""
        gone = [q for q, r in self._rows.items() if r.seen < epoch and q not in holding]
        for queue in gone:
            del self._rows[queue]
        return len(gone)

    def text(self, rows_per_piece: int = RENDER_ROWS) -> Iterator[bytes]:
        """The three families in Prometheus text format, in pieces of at most
        `rows_per_piece` queues (see `render`). Written here, not by
        `generate_latest`, which took ~8 ms for 1,000 queues, this ~4 ms."""
        rows = [*self._rows.items(), (OTHER_QUEUES, self._other)]
        for name, doc in _FAMILIES:
            head = f"# HELP {name} {doc}\n# TYPE {name} counter\n"
            yield head.encode()
            for start in range(0, len(rows), rows_per_piece):
                lines = []
                for queue, row in rows[start : start + rows_per_piece]:
                    if name is not _FINISHED:
                        n = row.get(_KEYS[name])
                        if n:
                            lines.append(f'{name}{{queue="{queue}"}} {_go(n)}\n')
                        continue
                    for state, n in row.items():
                        if state not in _NOT_STATES:
                            lines.append(
                                f'{name}{{queue="{queue}",state="{state}"}} {_go(n)}\n'
                            )
                yield "".join(lines).encode()


def _go(n: int) -> str:
    """A sample's value as prometheus_client writes it (`1.0`, `1.2345678901e+10`)."""
    text: str = floatToGoString(n)  # type: ignore[no-untyped-call]  # unannotated upstream
    return text


_FINISHED = "qbroker_jobs_finished_total"
_FAMILIES = (
    ("qbroker_jobs_enqueued_total", "Jobs stored by enqueue."),
    ("qbroker_jobs_leased_total", "Jobs handed out by lease."),
    (
        _FINISHED,
        "Jobs that reached a final state, or were scheduled for a retry"
        " (state=scheduled).",
    ),
)
_KEYS = {
    "qbroker_jobs_enqueued_total": "enqueued",
    "qbroker_jobs_leased_total": "leased",
}
_NOT_STATES = frozenset(_KEYS.values())


QUEUES = QueueSeries(METRICS_MAX_QUEUES)


class _Part:
    """A Collector of one family with some of its samples, for `generate_latest`."""

    def __init__(self, family: Metric, samples: list[Sample]) -> None:
        self._family = copy.copy(family)
        self._family.samples = samples

    def collect(self) -> list[Metric]:
        return [self._family]


def render() -> Iterator[bytes]:
    """The /metrics text in pieces of about a millisecond each, for a caller on the
    trio thread to let other tasks run between them. `generate_latest(REGISTRY)`
    took 9-21 ms at once here, 2-10 ms of it the request histograms' collect(); in
    a thread it holds the GIL against the loop just as long."""
    for metric in (REQUESTS, COMMIT_BATCH, CONNECTIONS, REAPED, SCHEDULE_TICKS):
        for family in metric.collect():
            yield from _pieces(family, family.samples)
    # the histograms one route at a time (its child), the route label put back
    first = True
    children = {route: pair[1] for (route, _), pair in _request_children.items()}
    for route, child in sorted(children.items()):
        for family in child.collect():
            labelled = [
                s._replace(labels={**s.labels, "route": route}) for s in family.samples
            ]
            for piece in _pieces(family, labelled):
                yield piece if first else piece.split(b"\n", 2)[2]
                first = False
    yield from QUEUES.text()


def _pieces(family: Metric, samples: list[Sample]) -> Iterator[bytes]:
    """`family` with `samples` as text, RENDER_SAMPLES samples a piece."""
    for start in range(0, max(1, len(samples)), RENDER_SAMPLES):
        text = generate_latest(_Part(family, samples[start : start + RENDER_SAMPLES]))
        # no `_created` samples (disabled above), so the only lines that are not
        # samples are the family's HELP and TYPE: written once
        yield text if not start else text.split(b"\n", 2)[2]


def jobs_enqueued(queue: str) -> _Count:
    """`jobs_enqueued(queue).inc(n)`"""
    return _Count(QUEUES.row(queue), "enqueued")


def jobs_leased(queue: str) -> _Count:
    """`jobs_leased(queue).inc(n)`"""
    return _Count(QUEUES.row(queue), "leased")


def jobs_finished(queue: str, state: str) -> _Count:
    """`jobs_finished(queue, state).inc()`"""
    return _Count(QUEUES.row(queue), state)
