"""What one hand-off between two Python threads costs on this machine, on one CPU and
across two: the broker hands every write to its writer thread and back (and reads to
its reader threads), so a round trip pays for several such hops.

Two threads ping-pong a token through two `queue.SimpleQueue`s (the writer's and
readers' queue type); each round trip is two hops, each a wake-up of a parked thread.

Usage:

  python bench/threadhop.py             # 20,000 round trips per placement, twice
  python bench/threadhop.py --n 50000
"""

from __future__ import annotations

import argparse
import os
import queue
import threading
import time


def ping_pong(main_cpus: set[int] | None, peer_cpus: set[int] | None, n: int) -> float:
    """Microseconds per round trip (two hops) with the two threads on these CPUs."""
    there: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    back: queue.SimpleQueue[int] = queue.SimpleQueue()

    def peer() -> None:
        if peer_cpus is not None:
            os.sched_setaffinity(0, peer_cpus)
        while (x := there.get()) is not None:
            back.put(x)

    everywhere = os.sched_getaffinity(0)
    thread = threading.Thread(target=peer)
    thread.start()
    try:
        if main_cpus is not None:
            os.sched_setaffinity(0, main_cpus)
        for i in range(500):  # warm up
            there.put(i)
            back.get()
        start = time.perf_counter()
        for i in range(n):
            there.put(i)
            back.get()
        return (time.perf_counter() - start) / n * 1e6
    finally:
        there.put(None)
        thread.join()
        os.sched_setaffinity(0, everywhere)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="round trips per placement")
    a = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    placements: list[tuple[str, set[int] | None, set[int] | None]] = [
        (f"both on CPU {cpus[0]}", {cpus[0]}, {cpus[0]}),
        ("as the OS places them", None, None),
    ]
    if len(cpus) > 1:
        placements.insert(1, (f"CPU {cpus[0]} and {cpus[1]}", {cpus[0]}, {cpus[1]}))
    for _ in range(2):
        for name, main_cpus, peer_cpus in placements:
            us = ping_pong(main_cpus, peer_cpus, a.n)
            print(f"{name:24s} {us:6.1f} us per round trip ({us / 2:.1f} us per hop)")


if __name__ == "__main__":
    main()
