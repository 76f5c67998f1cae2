"""Long-polls parked in the broker: lease requests wait on queue names, result
requests on job ids, until transitions.py wakes them.

Not thread-safe: used from the trio thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import trio
from qclient.wire import LeaseRequest


class Slot:
    """One parked task: its wake-up event, and what the notifier handed over, if any.

    A lease long-poll also carries its request; while it is `parked` an enqueue may
    `claim` it and lease jobs for it in the enqueue's own commit (`handoff` is set
    once that commit is done, `value` then holds the jobs).

    A slot parked under many keys (`many`) collects what each notify hands over in
    `values`, by key, instead; its owner drains them and swaps in a fresh `event`.
    """

    __slots__ = ("alive", "event", "handoff", "parked", "request", "value", "values")

    def __init__(
        self,
        request: LeaseRequest | None = None,
        many: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.values: dict[str, Any] | None = {} if many else None
        self.request = request
        self.alive = alive  #: whether the long-poll's client is still connected
        self.parked = False
        self.handoff: trio.Event | None = None


class Waiters:
    """Tasks parked until a key (a queue name or a job id) is notified.

    Not thread-safe: use from the trio thread only.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, dict[Slot, None]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def register(
        self,
        keys: Iterable[str],
        request: LeaseRequest | None = None,
        *,
        many: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> _Registration:
        """Park a slot under `keys` for a `with` block (which gets the Slot); register
        before checking state, so a notify between the check and the wait is not lost."""
        return _Registration(self._by_key, list(keys), Slot(request, many, alive))

    def notify(self, key: str, n: int | None = None, value: Any = None) -> None:
        """Wake up to `n` waiters of `key` (all when None), oldest first, handing
        each `value` (when not None).

        Counted against `n` are only the waiters that will act on the wake-up: not
        one an enqueue has claimed (it gets that enqueue's jobs anyway), nor one
        whose client has gone (woken to end, it leases nothing). Either would take
        the wake-up from a live long-poll behind it, leaving jobs ready and it asleep.
        """
        waiting = self._by_key.get(key)
        if not waiting:
            return
        for slot in waiting:
            if n is not None and n <= 0:
                break
            if slot.values is not None:
                slot.values[key] = value
                slot.event.set()
            elif not slot.event.is_set():
                if n is not None and slot.handoff is not None:
                    continue
                if value is not None:
                    slot.value = value
                slot.event.set()
                if n is not None and (slot.alive is None or slot.alive()):
                    n -= 1

    def claim(self, key: str, jobs: int) -> list[Slot]:
        """Parked lease long-polls of `key`, oldest first, enough to take `jobs`
        jobs; each is marked claimed (see Slot) and must be handed its jobs. A
        long-poll whose client has gone is woken to end instead: jobs leased for it
        would sit active until their lease ran out."""
        taken: list[Slot] = []
        for slot in self._by_key.get(key, ()):
            if jobs <= 0:
                break
            if slot.parked and slot.handoff is None and not slot.event.is_set():
                assert slot.request is not None
                if slot.alive is not None and not slot.alive():
                    slot.event.set()
                    continue
                slot.handoff = trio.Event()
                taken.append(slot)
                jobs -= slot.request.max
        return taken

    def notify_all(self) -> None:
        for waiting in self._by_key.values():
            for slot in waiting:
                slot.event.set()


class _Registration:
    """`Waiters.register`'s context manager: a plain class, as a lease or result
    request enters one each (the @contextmanager generator cost 0.6 us more)."""

    __slots__ = ("_by_key", "_keys", "_slot")

    def __init__(
        self, by_key: dict[str, dict[Slot, None]], keys: list[str], slot: Slot
    ) -> None:
        self._by_key = by_key
        self._keys = keys
        self._slot = slot

    def __enter__(self) -> Slot:
        for k in self._keys:
            self._by_key.setdefault(k, {})[self._slot] = None
        return self._slot

    def __exit__(self, *exc_info: object) -> None:
        for k in self._keys:
            waiting = self._by_key.get(k)
            if waiting is not None:
                waiting.pop(self._slot, None)
                if not waiting:
                    del self._by_key[k]
