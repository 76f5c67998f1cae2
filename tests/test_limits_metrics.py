"""Per-queue metric series are bounded (issue 21, item 6): at most 1,000 queues get
series of their own, the rest are summed under queue="(other)", and a queue's series
go once it holds no jobs. Figures for /healthz while /metrics renders:
`bench/metrics_stall.py` (docs/reliability.md)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import BrokerProcess
from tests.wirehttp import Wire, wait_for

CAP = 1000  #: config.METRICS_MAX_QUEUES
_SAMPLE = re.compile(r'^(qbroker_jobs_\w+_total)\{queue="([^"]*)"[^}]*\} (\S+)$', re.M)


@pytest.fixture
def wire(broker: BrokerProcess) -> Iterator[Wire]:
    w = Wire(broker.url)
    yield w
    w.close()


def _series(w: Wire) -> dict[str, dict[str, float]]:
    """family -> queue label -> value (summed over states) from /metrics."""
    status, raw, _ = w.raw("GET", "/metrics")
    assert status == 200
    out: dict[str, dict[str, float]] = {}
    for family, queue, value in _SAMPLE.findall(raw.decode()):
        by_queue = out.setdefault(family, {})
        by_queue[queue] = by_queue.get(queue, 0.0) + float(value)
    return out


def test_queue_series_are_capped_and_go_with_their_jobs(wire: Wire) -> None:
    n = CAP + 100
    names = [f"m{i:05d}" for i in range(n)]
    for name in names:
        wire.ok("POST", f"/v1/queues/{name}/jobs", {"result_ttl": 0.5})
    enqueued = _series(wire)["qbroker_jobs_enqueued_total"]
    assert len(enqueued) == CAP + 1, len(enqueued)  # was one series per queue
    assert set(enqueued) - set(names) == {"(other)"}
    assert enqueued["(other)"] == 100
    assert sum(enqueued.values()) == n  # every job counted once

    acks = []
    for start in range(0, n, 100):
        jobs = wire.lease(*names[start : start + 100], max=100)
        acks += [{"id": j["id"], "lease": j["lease"]} for j in jobs]
    assert len(acks) == n
    wire.ok("POST", "/v1/ack", {"acks": acks})
    # once the reaper purges them (result_ttl 0.5 s), the queues hold no jobs
    wait_for(
        lambda: set(_series(wire)["qbroker_jobs_enqueued_total"]) == {"(other)"},
        timeout=30,
    )
    series = _series(wire)
    for family in ("enqueued", "leased", "finished"):
        values = series[f"qbroker_jobs_{family}_total"]
        assert values == {"(other)": 100}, (family, len(values))  # never goes down

    # the places are free again: a new queue gets its own series
    wire.enqueue("fresh")
    assert _series(wire)["qbroker_jobs_enqueued_total"]["fresh"] == 1


def test_queue_holding_jobs_keeps_its_series(wire: Wire) -> None:
    wire.enqueue("kept")
    done = wire.enqueue("gone", result_ttl=0.3)
    [job] = wire.lease("gone")
    wire.ok("POST", f"/v1/jobs/{done}/ack", {"lease": job["lease"]})
    wait_for(lambda: "gone" not in _series(wire)["qbroker_jobs_enqueued_total"])
    series = _series(wire)
    assert series["qbroker_jobs_enqueued_total"]["kept"] == 1
    assert "gone" not in series.get("qbroker_jobs_finished_total", {})
