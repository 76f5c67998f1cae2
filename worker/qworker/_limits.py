"""A worker's start: the global limits its tasks declare go to the broker.

`@task(rate_limit="10/m", concurrency=5)` is the broker's limit `task:<name>`, stored
there and enforced when it leases, across every worker. Each worker upserts the limits
of the tasks it has at start (an idempotent PUT), as schedules are synced; a limit set
with `qbroker limits set` on a task that declares none is left alone.
"""

from __future__ import annotations

from typing import Any

from qclient import BrokerError, Client, ProtocolError
from qclient.wire import RateSpec

from qworker.registry import Registry

__all__ = ["declared_limits", "sync_limits"]


def declared_limits(
    registry: Registry,
) -> dict[str, tuple[int | None, RateSpec | None]]:
    """`task:<name>` -> (concurrency, rate) for each task that declares either."""
    out: dict[str, tuple[int | None, RateSpec | None]] = {}
    for name in registry.names():
        t = registry.get(name)
        if t.rate_limit is None and t.concurrency is None:
            continue
        rate = None
        if t.rate_limit is not None:
            rate = RateSpec(limit=t.rate_limit.limit, per=t.rate_limit.per)
        out[f"task:{t.name}"] = (t.concurrency, rate)
    return out


def sync_limits(client: Client, registry: Registry, log: Any) -> None:
    """Upsert the declared limits. A broker that cannot be reached or refuses is
    logged, not fatal: the worker still runs jobs (under the limits stored before)."""
    limits = declared_limits(registry)
    if not limits:
        return
    try:
        for key, (concurrency, rate) in limits.items():
            client.set_limit(key, concurrency=concurrency, rate=rate)
    except (BrokerError, ProtocolError) as exc:
        log.warning("worker.limits_sync_failed", error=str(exc))
        return
    log.info("worker.limits_synced", limits=sorted(limits))
