"""Every Prometheus metric of the broker (prefix qbroker_, labels queue/state/route)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS_ENQUEUED = Counter(
    "qbroker_jobs_enqueued_total",
    "Jobs stored by enqueue.",
    ["queue"],
    registry=REGISTRY,
)
JOBS_LEASED = Counter(
    "qbroker_jobs_leased_total",
    "Jobs handed out by lease.",
    ["queue"],
    registry=REGISTRY,
)
JOBS_FINISHED = Counter(
    "qbroker_jobs_finished_total",
    "Jobs that reached a final state, or were scheduled for a retry (state=scheduled).",
    ["queue", "state"],
    registry=REGISTRY,
)
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


class _Children:
    """A labelled metric's children by label values, looked up once each.

    Not thread-safe (a race only looks a child up twice); the broker calls it from the
    trio thread. Holds no more than the metric itself does: one child per label set.
    """

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


jobs_enqueued = _Children(JOBS_ENQUEUED)  #: jobs_enqueued(queue).inc(n)
jobs_leased = _Children(JOBS_LEASED)  #: jobs_leased(queue).inc(n)
jobs_finished = _Children(JOBS_FINISHED)  #: jobs_finished(queue, state).inc()


def count_finished(counts: Mapping[tuple[str, str], int]) -> None:
    """Count jobs finished, given as (queue, state) -> n (a store call's `counts`)."""
    for (queue, state), n in counts.items():
        jobs_finished(queue, state).inc(n)
