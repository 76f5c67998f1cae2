"""The reaper's schedule, in process, around one interleaving that the wire cannot
produce on demand: a write committed just after a sweep's read asks for a sweep soon.

The real-broker tests (test_broker, test_wakeups) check delays and lease expiry end
to end; this one pins the poke that lands while a sweep is in the writer.
"""

from __future__ import annotations

from pathlib import Path

import trio
from qbroker.app import Broker
from qbroker.clock import Clock
from qbroker.config import Config
from qbroker.reaper import run_reaper
from qbroker.store import Swept
from qbroker.store.sqlite import SQLiteStore


def test_a_poke_during_a_sweep_brings_the_next_sweep_forward(tmp_path: Path) -> None:
    sweeps: list[float] = []

    async def main() -> None:
        store = await SQLiteStore.open(tmp_path / "qbroker.db", synchronous="OFF")
        broker = Broker(Config(data_dir=tmp_path), store, Clock())
        second = trio.Event()
        real_sweep = store.sweep

        async def sweep(*, now: float) -> Swept:
            out = await real_sweep(now=now)
            sweeps.append(broker.clock.now())
            if len(sweeps) == 1:
                # as an enqueue with delay=0.1 does once its commit (after this
                # sweep's read) returns, before the reaper has run again
                broker.poke_reaper(broker.clock.now() + 0.1)
            else:
                second.set()
            return out

        store.sweep = sweep  # type: ignore[method-assign]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_reaper, broker)
                with trio.move_on_after(0.9):  # the reaper's idle sleep is 1 s
                    await second.wait()
                nursery.cancel_scope.cancel()
        finally:
            await store.aclose()

    trio.run(main)
    assert len(sweeps) >= 2, "the poke during the sweep was lost"
    assert 0.09 <= sweeps[1] - sweeps[0] < 0.6
